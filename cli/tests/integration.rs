//! The integration tests of `cli`, linked into one binary: a binary per
//! file would compile and link the whole dependency graph once per file.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod appliances;
mod cli;
mod common;
mod credentials;
mod demo;
mod encryption;
mod golden;
mod interrupt;
mod qemu_interop;
mod restore_files;
mod s3;
mod serve;
mod trees;
mod vm_files;
