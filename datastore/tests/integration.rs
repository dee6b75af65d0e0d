//! The integration tests of `datastore`, linked into one binary: a binary per
//! file would compile and link the whole dependency graph once per file.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod archives;
mod cache;
mod common;
mod crash;
mod encryption;
mod model;
mod target;
