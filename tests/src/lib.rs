//! Shared fixtures of the end-to-end scenarios in this directory: an
//! in-process mock hypervisor, a fresh datastore, and the engine wired
//! between them.

pub mod ovirt;
pub mod python;
pub mod scp;
pub mod scp_flow;
pub mod zstack;
