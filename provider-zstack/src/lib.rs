//! # provider-zstack: back up and restore ZStack VMs
//!
//! A [`provider_api::BackupProvider`] for ZStack (`/zstack/v1` REST API),
//! built on what the platform offers a backup product: volume snapshots,
//! templates (images) on a backup storage, export of an image from the
//! backup storage as an HTTP URL, and AddImage from a URL.
//!
//! ## Backup flow (per VM, volumes one at a time)
//!
//! 1. `job_init` logs in (`PUT /v1/accounts/login`, SHA-512 of the
//!    password) and checks a `Connected` backup storage exists. A `401`
//!    later (the session expired) logs in again and repeats the call once;
//!    every API job is named by the client (`X-Job-UUID`), so a call whose
//!    answer was lost is followed by that name.
//! 2. `backup_vm` reads the VM (`GET /v1/vm-instances/{uuid}`) and checks
//!    the private-image quota `image.num` **before any work**: a backup
//!    holds one temporary template per volume until its cleanup (the
//!    volumes are streamed to the data mover after `backup_vm` returns),
//!    so it needs one free image slot per volume; a full quota is an
//!    [`ErrorKind::Refused`](provider_api::ErrorKind) error naming
//!    `image.num`.
//! 3. Per volume: `CreateVolumeSnapshot` → root or data volume template
//!    from the snapshot on the chosen backup storage →
//!    `exportImageFromBackupStorage`. Every non-GET call is an API job
//!    polled until 200/503, with a timeout. The export, template and
//!    snapshot are deleted (templates also expunged) by `backup_cleanup`,
//!    once the data mover has read the volume.
//! 4. Volumes are exposed as [`SnapshotAccess::Nbd`](provider_api::SnapshotAccess)
//!    on a loopback NBD server of this backup
//!    ([`provider_kit::http_export`]): every NBD read is one ranged `GET`
//!    of the export's `imageUrl`, resumed at the first missing byte when
//!    the transfer breaks (`download_retries` times per read). **Why:** the
//!    platform offers only an HTTP URL on the backup storage, the host's
//!    data mover reads NBD or files, and staging a whole disk in the work
//!    directory costs its size in local disk and a second pass; streamed,
//!    memory is bounded by the mover's window and the NBD server's
//!    budgets and nothing is written locally. The md5 (`exportMd5Sum`) is
//!    computed over the bytes in order as the mover reads them (a bounded
//!    reorder buffer, else a sequential verification pass): a mismatch
//!    fails the backup, naming the volume, both md5s and the API call.
//! 5. A root volume thin-cloned from a cached image (`rootImageUuid`) gets a
//!    [`BaseLayer`](provider_api::BaseLayer) with id = `rootImageUuid`:
//!    when the target lacks it (`has_base_image` false) the provider exports
//!    the image itself and exposes it the same way; otherwise nothing of
//!    it is read. The root volume's dirty regions are the 64 KiB blocks
//!    that differ from the base: a sequential pass over the volume's
//!    export (which also checks its md5) compares each block's SHA-256
//!    with the base's digests, cached in `work_dir/base-digests/` (without
//!    the cache the base is read once more to compute them). The regions
//!    are read again through NBD by the mover: the transfer is the volume
//!    plus its differing blocks. The template ZStack exports is always
//!    the *flattened* volume, so the transfer includes the base's data;
//!    only storage is saved. A base image that cannot be exported
//!    (Disabled, not Ready, gone, or an export that fails) is not an
//!    error: the flattened volume is stored in full and the snapshot
//!    carries a warning.
//!
//! ## Restore flow
//!
//! `restore_vm_init` checks the quota (one slot per volume that has no
//! reusable image), resolves what the VM is created with (the backed-up
//! inventory's instance offering, or its `cpuNum`/`memorySize` when it had
//! none, and its NICs' L3 networks, default first; the options
//! `instance_offering_uuid` and `l3_network_uuids` override them for a
//! target that lacks the originals; a missing one is a `NotFound` error
//! naming it and the option, before anything is created) and picks the new
//! VM's UUID (`resourceUuid`). A snapshot of another platform, or of an
//! imported appliance, restores from its platform-neutral guest spec
//! ([`ArchiveView::guest_spec`](provider_api::ArchiveView::guest_spec)):
//! the spec's boot disk (else the first volume) becomes the root volume,
//! CPUs and memory come from the spec, networks from `l3_network_uuids`
//! (required: the source's networks mean nothing here), and what ZStack
//! does not take (NIC models and MACs, firmware, disk buses) is a restore
//! warning. A backup records the VM's own spec (CPUs, memory, volumes as
//! virtio disks, NICs with MAC and L3 network) for restores elsewhere. Per volume,
//! an image already on the platform with the same md5, size and media type
//! (`Ready`, `Enabled`) is reused; otherwise AddImage with the host's
//! HTTP URL ([`RestoreSources::merged`](provider_api::RestoreSources))
//! onto the backup storage (the platform pulls the data; the import's
//! write list is empty). **Why HTTP:** ZStack's backup storage host
//! fetches AddImage URLs over http(s) from the network, never from the
//! backup host's loopback, so the provider asks for HTTP sources
//! ([`BackupProvider::restore_source_kind`](provider_api::BackupProvider::restore_source_kind)
//! = `Http`) and the host serves each volume under a one-time URL on the
//! address it advertises (`engine::HttpExposer`, `restore_listen` /
//! `advertise_url`); any other scheme is refused before AddImage, and a
//! fetch that fails names the advertised address. AddImage and template
//! jobs wait `job_timeout_secs` plus `job_timeout_secs_per_gib` per GiB.
//! Restored images are deleted and expunged once the VM exists unless
//! `keep_restore_images` (opt-in: each kept image takes an `image.num`
//! slot); a full quota is reported with how many slots are used and by
//! what. `restore_vm_cleanup` then creates the VM from the
//! root image and data volumes from the data volume templates, attached in
//! device order.
//!
//! ## Cleanup guarantees
//!
//! Every temporary object is named `<job marker>.<scope>.<device>` (the
//! marker is [`provider_api::JobMarker`], `vmbackup.<host>.<job>`; the
//! scope is `b<n>-<vm>` for a backup, `r<n>-<vm>` for a restore);
//! `backup_cleanup` (on every path) stops the backup's NBD server, deletes
//! the exports it knows of (a base image's export shared by guests backed
//! up in parallel: by its last user), then
//! finds images and volume snapshots with a `~=` query on that name (`%`,
//! `_` and `\` escaped: ZStack's `~=` is MySQL's `LIKE`, case-insensitive)
//! and deletes and expunges exactly those whose name matches on the client
//! (so that one whose job result was lost, e.g. a 503 while polling, is
//! found too, and scope `b1` never takes `b10`'s), and removes the work
//! directory. While a restore creates its VM and data volumes their
//! descriptions carry the tag; once everything is attached the
//! descriptions are replaced (VM last), and kept restore images are
//! renamed. `job_init` sweeps every object whose marker names this host
//! and a job that is not running (`JobMarker::is_stale_for`): VMs and data
//! volumes of interrupted restores, temporary templates, uploaded images,
//! volume snapshot groups (deleted as groups, `DeleteVolumeSnapshotGroup`,
//! which deletes their member snapshots), volume snapshots, and stale work
//! directories; another host's objects
//! and running jobs' objects are never touched. A failed restore destroys
//! the half-created VM, deletes its unattached volumes and deletes and
//! expunges the images it
//! uploaded. Credentials and session ids never appear in errors or logs;
//! errors name the guest, the volume, the offset and the API call.
//!
//! ## Example
//!
//! ```no_run
//! # async fn demo() -> provider_api::Result<()> {
//! use std::sync::Arc;
//! use provider_zstack::{ZStackOptions, ZStackProvider};
//! let options = ZStackOptions::new("http://zstack:8080/zstack", "admin", "password", "/var/tmp/zstack-backup");
//! let provider: Arc<dyn provider_api::BackupProvider> = Arc::new(ZStackProvider::new(options)?);
//! // hand it to engine::BackupDriver / engine::RestoreDriver
//! # let _ = provider; Ok(()) }
//! ```

pub mod api;
pub mod client;
pub mod download;
pub mod options;
mod provider;
pub mod settings;

pub use options::ZStackOptions;
pub use provider::ZStackProvider;
pub use settings::{ZStackSettings, register};
