//! The integration tests of `mock-hypervisor`, linked into one binary: a binary per
//! file would compile and link the whole dependency graph once per file.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod binary;
mod common;
mod ovirt_api;
mod ovirt_resize;
mod scp_backup;
mod scp_cbt;
mod scp_errors;
mod scp_restore;
mod zstack_api;
