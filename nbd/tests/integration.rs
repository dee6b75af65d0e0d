//! The integration tests of `nbd`, linked into one binary: a binary per
//! file would compile and link the whole dependency graph once per file.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod client_nbdkit;
mod client_qemu;
mod common;
mod server;
mod server_limits;
