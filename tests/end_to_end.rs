//! The end-to-end scenarios, linked into one binary: a binary per file
//! would compile and link the whole dependency graph once per file.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod backend;
mod cross_platform;
mod nbd_retry;
mod ovirt;
mod ovirt_kit;
mod ovirt_sdk;
mod scp;
mod scp_client;
mod scp_kit;
mod zstack;
mod zstack_client;
mod zstack_kit;
