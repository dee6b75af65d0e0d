//! # engine: the reference host
//!
//! Drives the backup provider transaction of `provider-api` with one
//! provider and one target, and moves the data between them.
//!
//! - [`backup::BackupDriver`] runs a backup job over many guests with
//!   bounded parallelism and enforces the contract's cleanup guarantees
//!   whatever the provider does (see the module docs for the list);
//! - [`restore::RestoreDriver`] runs restores with the same discipline;
//! - [`cancel`]: interrupting a job so that its cleanups still run;
//! - [`jobs::JobRegistry`]: which jobs of this host are running (for the
//!   providers' sweeps of what dead jobs left behind);
//! - [`expose::NbdExposer`] and [`http_expose::HttpExposer`] serve stored
//!   volumes to providers that pull a restore's data: NBD URIs by default,
//!   HTTP URLs on an address the platform reaches when the provider asks
//!   for them (`BackupProvider::restore_source_kind`);
//! - [`mover::DataMover`] is the data path's interface: the driver says
//!   which regions go where, a mover copies them with several reads in
//!   flight and bounded memory.
//!
//! Tracing spans: `job` (id, provider) → `guest` (id) → `volume`. Each
//! guest also gets a plain-text task log, handed to the provider's
//! `backup_handle_log_file`.

pub mod backup;
pub mod cancel;
pub mod data_mover;
pub mod expose;
pub mod guest_log;
pub mod http_expose;
pub mod jobs;
pub mod mover;
pub mod restore;

pub use backup::{
    BackupDriver, CONTAINER_ARCHIVE, GuestBackup, GuestOutcome, JobOptions, JobReport, VolumeReport,
};
pub use cancel::{CancelToken, Canceller, cancel_pair};
pub use data_mover::{MoverOptions, StandardMover};
pub use expose::{NbdExposer, VolumeExport};
pub use http_expose::HttpExposer;
pub use jobs::{JobLease, JobRegistry};
pub use mover::{BackupCopy, CopyStats, DataMover, NoProgress, Progress, SourceExposer};
pub use provider_kit::RetryPolicy;
pub use restore::{RestoreDriver, RestoreReport};
