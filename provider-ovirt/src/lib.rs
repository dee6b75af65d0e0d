//! # provider-ovirt: back up and restore oVirt VMs
//!
//! A [`provider_api::BackupProvider`] for oVirt engines (REST API v4, XML
//! or JSON, see [`WireFormat`]). It runs inside (or next to) a *backup
//! appliance* VM: disks are read and written through that VM.
//!
//! ## Modes
//!
//! - **Snapshot attach** ([`BackupMode::SnapshotAttach`], the backup API
//!   of oVirt 3.4+): take a snapshot without memory, wait until it is `ok`,
//!   list its disks, attach each disk snapshot to the appliance (`disk id`
//!   plus `snapshot id`, `bootable=false`, `interface=virtio`,
//!   `active=true`), and let the host read the attached disk as a local
//!   file (mechanism `file-handle`: the appliance's device of the disk,
//!   see [Data path](#data-path)). Always a full backup.
//! - **Incremental** ([`BackupMode::Incremental`], oVirt 4.4+): `POST
//!   /vms/{vm}/backups` (with `from_checkpoint_id` for an incremental),
//!   poll `phase` until `ready`, one raw download image transfer per disk,
//!   polled until `transferring`, each disk exposed over NBD (mechanism
//!   `nbd`, see [Data path](#data-path)). Only `cow` disks with
//!   `backup=incremental` have checkpoints; other disks are read in full.
//!   Which disks are read as changes only follows the host's rule
//!   ([`BackupVmRequest::host_mode`](provider_api::BackupVmRequest::host_mode)), never the provider's plan alone: a
//!   disk resized since the previous backup is read in full.
//!
//! ## Data path
//!
//! Snapshot attach: the host reads each attached disk snapshot as a local
//! device, found as a real appliance finds it: by its serial under
//! [`OvirtOptions::device_root`] (`/dev/disk/by-id`), `virtio-<first 20
//! characters of the disk id>` (virtio) or `scsi-0QEMU_QEMU_HARDDISK_<disk
//! id>` (virtio-scsi), waited for up to [`OvirtOptions::operation_timeout`].
//! The attachment's `logical_name` is not used: the engine reports it
//! only once the guest agent has (if ever). A disk that does not appear
//! in time fails the guest with a [`ErrorKind::Timeout`](provider_api::ErrorKind::Timeout) naming the disk id
//! and the directory; the disks attached so far are detached by the
//! cleanup. (Restore finds the disks it attaches the same way, and also
//! accepts a `logical_name` that names a device present here.)
//!
//! Incremental: the API model offers no NBD access to an image transfer,
//! only its image server URL (imageio), and nothing is staged on disk.
//! Each backup runs its own NBD server on `127.0.0.1` (any free port) and
//! exports each disk as an [`imageio::ImageioExport`] named after the
//! volume's device:
//!
//! - a read is one ranged `GET` on the transfer URL (retried like every
//!   image server read);
//! - `base:allocation` answers from `extents?context=zero` (zero and hole
//!   flags), so holes and zero extents are never read;
//! - on a disk the host reads as changes only, `qemu:dirty-bitmap:<from
//!   checkpoint>` answers from `extents?context=dirty` and the volume's
//!   dirty source is [`DirtySource::NbdBitmap`](provider_api::DirtySource::NbdBitmap): the host's data mover
//!   reads only the dirty, allocated ranges, exactly as from qemu-nbd.
//!
//! The transfer URL is asked `OPTIONS` once per disk; the extents lists
//! are fetched once per disk, checked to cover every byte of the disk in
//! order (a region an answer skipped would be taken for unchanged or zero
//! and its data lost) and kept: they are small (one entry per run). An
//! image server that does not offer `extents` has its disks read in full,
//! every byte; an incremental that needs the dirty extents of such a
//! server fails, naming the URL. Because the export serves the whole
//! point-in-time image, the host may always read a disk in full (a resize,
//! a lost checkpoint), and the access is [`AccessScope::Whole`](provider_api::AccessScope::Whole).
//!
//! Memory stays bounded whatever the disk size: the host keeps a few
//! reads in flight, and the NBD server's in-flight budgets (32 MiB per
//! connection, 128 MiB in total) cap what a client can make it hold. A
//! read the image server fails (retries spent) fails the NBD request with
//! `EIO` and a message naming the disk and offset; the host retries it,
//! then fails the volume. `backup_cleanup` (and `job_cleanup`, for a
//! backup whose cleanup never ran) closes the listener, removes the
//! exports and closes the connections before it finalizes the transfers:
//! nothing is left listening.
//!
//! [`BackupMode::Auto`] picks incremental on engines 4.4 and later and
//! snapshot attach before. Fallbacks to a full backup (checkpoint invalid
//! or missing, a disk without incremental backup) are automatic and leave
//! a warning in the stored snapshot.
//!
//! The guest configuration stored with each backup is the VM's OVF (`GET
//! /vms/{id}?all_content=true`); the metadata records each disk (id,
//! alias, size, format, sparseness, interface, bootable flag).
//!
//! ## Cleanup guarantees
//!
//! `backup_cleanup` runs on every path and is idempotent: it stops the
//! backup's NBD server, detaches every
//! disk this backup attached to the appliance, deletes the snapshot,
//! finalizes (or cancels) every image transfer and waits for it, then
//! finalizes the backup. Besides the ids it recorded, it sweeps by the
//! description `vmbackup:<archive> vmbackup.<host>.<job>` it gave its
//! snapshots, backups and image transfers, so an object whose creation
//! answer was lost (a malformed answer, a timeout) is found and removed
//! too. An attachment failing half-way leaves the disks already attached
//! to this cleanup.
//!
//! ## Interrupted jobs
//!
//! Every object the provider creates carries the job's
//! [`JobMarker`](provider_api::JobMarker) (`vmbackup.<host>.<job>`) in its description. `job_init`
//! sweeps what an earlier job of the same host left when it died before
//! its cleanups (its marker names this host and a job that is not in
//! [`JobInfo::running_jobs`](provider_api::JobInfo::running_jobs)): it finalizes (or cancels) that job's image
//! transfers and finalizes its backups (a backup left `ready` makes every
//! later backup of the VM fail), detaches its snapshot disks from the
//! appliance and deletes its snapshots. Objects of a running job or of
//! another host are never touched: the marker is parsed and compared
//! whole, never matched by prefix.
//!
//! ## Retries
//!
//! Answers 502, 503 and 504 and failed connections are retryable; calls
//! that are safe to repeat (`GET`s, the login, `DELETE`s, image server
//! reads) are retried with [`OvirtOptions::retry`] (see
//! [`provider_kit::retry()`]). Other calls run once.
//!
//! ## Restore
//!
//! To a new VM: `restore_vm_init` checks that the name is free and picks
//! the new VM's id, creating nothing; each disk is created on the storage
//! domain with its saved size, format and sparseness, attached to the
//! appliance, written by the host through the attachment's file and
//! detached. The VM comes last, once every disk is written: from the saved
//! OVF rewritten ([`ovf::rewrite`]) with the new VM id, the new disk ids in
//! place of the source's, and the disks not restored left out, because the
//! engine attaches every disk an OVF's `DiskSection` names (a detached
//! source disk would go to the restored VM). The disks the engine did not
//! attach are attached with their saved interface and bootable flag, and
//! the attachments are checked. A failure at any step detaches whatever is
//! not the restore's from the new VM, and deletes the VM and every disk
//! created. In place, each original disk (the VM must be down) is detached
//! from the VM, attached to the appliance, overwritten and re-attached with
//! its saved interface and bootable flag, on every path.
//!
//! A backup also records the VM platform-neutrally (`spec.rs`: CPUs,
//! memory, firmware, OS type, disks with their interface and boot flag,
//! NICs with their vNIC profile's name) for restores onto other
//! platforms. A snapshot taken on another platform, or imported, restores
//! as a new VM from its spec the same way, with two differences: each
//! disk is a thin qcow2 disk enabled for incremental backup on the
//! `storage_domain` option (required: the snapshot names none of this
//! engine's) with the interface its bus maps to, and the OVF the VM is
//! added from is built from the spec (the engine's layout, NICs on the
//! `network` option's profile). What oVirt cannot take (NVMe buses, NIC
//! models it does not emulate, MACs, free-text OS names) is a restore
//! warning.
//!
//! ## Errors
//!
//! Errors name the guest, the volume, the offset where one applies and the
//! API call (`POST /vms/{id}/snapshots`); a certificate the engine CA
//! ([`OvirtOptions::tls_ca`]) does not vouch for is refused, naming the
//! host (`host:port`) it came from; credentials never appear in
//! errors or logs ([`OvirtOptions`]' `Debug` hides the password). Answers
//! are read into the typed shapes of [`api`]: a field the provider acts on
//! that is missing or malformed is an [`ErrorKind::Platform`](provider_api::ErrorKind::Platform) error naming
//! the call and the field.
//!
//! ## Example
//!
//! ```no_run
//! # async fn demo() -> provider_api::Result<()> {
//! use std::sync::Arc;
//! use provider_ovirt::{OvirtOptions, OvirtProvider};
//! let mut options = OvirtOptions::new(
//!     "https://engine.example/ovirt-engine/api",
//!     "admin@internal",
//!     "secret",
//!     "backup-appliance",
//! );
//! options.mode = provider_ovirt::BackupMode::Auto;
//! let provider: Arc<dyn provider_api::BackupProvider> = Arc::new(OvirtProvider::new(options)?);
//! // Hand `provider` to a host: engine::BackupDriver::new(provider, target, mover)...
//! # Ok(()) }
//! ```

pub mod api;
pub mod client;
pub mod imageio;
pub mod metadata;
pub mod options;
pub mod ovf;
pub mod provider;
pub mod settings;
mod spec;

pub use client::WireFormat;
pub use metadata::{DiskRecord, OvirtMetadata};
pub use options::{BackupMode, OvirtOptions};
pub use provider::OvirtProvider;
pub use provider_kit::RetryPolicy;
pub use settings::{OvirtSettings, register};
