//! The integration tests of `filetree`, linked into one binary: a binary per
//! file would compile and link the whole dependency graph once per file.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod round_trip;
mod safety;
