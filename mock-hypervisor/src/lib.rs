//! # mock-hypervisor
//!
//! One process (or one in-process server for tests) that emulates the
//! virtualization platforms the backup providers talk to, with real disk
//! data: SCP now ([`scp`]); oVirt and ZStack plug in later as sibling
//! modules implementing [`platform::Platform`] over the same disk model.
//!
//! ## Pieces
//!
//! - [`disk`]: platform-neutral disks. A [`disk::VirtualDisk`] is a chain of
//!   an optional [`disk::BaseImage`] plus a writable overlay, with
//!   copy-on-write snapshots and change tracking (checkpoints, changed
//!   blocks, allocation maps). [`disk::DiskStore`] owns them.
//! - [`exports`]: named NBD exports of disks, snapshots and base images,
//!   with per-export byte counters and fault hooks; [`nbd_export`] serves
//!   them with the workspace `nbd` server (`base:allocation` and
//!   `qemu:dirty-bitmap:checkpoint-<id>` contexts, optional TLS).
//! - [`scp`]: the SCP janus OpenAPI subset (token auth, envelope, tasks,
//!   servers, snapshots, CBT, base images, replicas, custom attributes,
//!   backup resources, hot-add, recovery-baseimage).
//! - [`admin`]: the test/demo API (guest writes, digests, object listing,
//!   counters, fault injection). [`faults`] holds armed faults.
//! - [`inventory`], [`persist`]: platform objects as JSON documents.
//! - [`mock`]: [`MockHypervisor::start`] → [`RunningMock`].
//!
//! ## State directory and file format
//!
//! ```text
//! <state-dir>/
//!   scp.json                 SCP inventory (servers, snapshots, base images, ...)
//!   images/<id>/data.raw     base image data: sparse raw file of the virtual size
//!   images/<id>/meta.json    size, sealed flag, 64 KiB-block allocation bitmap
//!   disks/<id>/overlay.raw   the disk's own data: sparse raw file of the virtual size
//!   disks/<id>/snap-<s>.cow  blocks preserved for snapshot <s> (sparse)
//!   disks/<id>/meta.json     base image id, overlay allocation bitmap, per-block
//!                            write generation, checkpoints, per-snapshot preserved
//!                            blocks (generation + whether the overlay held them)
//!   hotadd/<id>.raw          hot-added disks as the backup proxy sees them
//! ```
//!
//! Every JSON file is written to a temporary file and renamed over the old
//! one. A guest write first copies the old block into each snapshot that
//! has not preserved it and saves the metadata, then writes the overlay and
//! saves again, so a crash never leaves a snapshot pointing at new data.
//!
//! ## Locking
//!
//! | lock | guards | order |
//! | --- | --- | --- |
//! | `VirtualDisk` state (`RwLock`) | overlay, snapshots, generations, checkpoints | after a platform inventory lock |
//! | `BaseImage` state (`RwLock`) | image data and seal | after the disk lock (reads through) |
//! | `Inventory` (`Mutex`) | one platform's objects | first; not held across long copies |
//! | export registry, lease table, task board (`Mutex`) | their maps | leaf locks, never held while taking another |
//!
//! Guest writes take the disk's write lock; snapshot reads take its read
//! lock, so a read never sees a half-preserved block.
//!
//! ## Example
//!
//! ```no_run
//! # async fn demo() -> mock_hypervisor::error::Result<()> {
//! use mock_hypervisor::{MockConfig, MockHypervisor, Seed};
//! let mut config = MockConfig::new("/tmp/mock-state");
//! config.seed = Some(Seed::Demo);
//! let mock = MockHypervisor::start(config).await?;
//! println!("SCP at {}", mock.endpoints().scp_url());
//! mock.shutdown().await;
//! # Ok(()) }
//! ```
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test double: a poisoned lock or a broken invariant of the mock is a failed test, not a user's error"
)]

pub mod admin;
pub mod disk;
pub mod error;
pub mod exports;
pub mod faults;
pub mod hypervisor;
pub mod ids;
pub mod inventory;
pub mod mock;
pub mod nbd_export;
pub mod ovirt;
pub mod persist;
pub mod platform;
pub mod scp;
pub mod seed;
pub mod tls;
pub mod zstack;

pub use mock::{Endpoints, MockConfig, MockHypervisor, RunningMock, Seed};
