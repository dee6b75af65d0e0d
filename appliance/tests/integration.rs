//! The integration tests of `appliance`, linked into one binary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod hostile;
mod roundtrip;
mod samples;
