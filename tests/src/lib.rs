//! Shared fixtures of the end-to-end scenarios in this directory: an
//! in-process mock hypervisor, a fresh datastore, and the engine wired
//! between them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test fixtures: a failed unwrap is a failed test"
)]

pub mod ovirt;
pub mod python;
pub mod s3;
pub mod scp;
pub mod scp_flow;
pub mod zstack;
