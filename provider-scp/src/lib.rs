//! # provider-scp: Sangfor Cloud Platform (SCP / HCI) backups
//!
//! A [`provider_api::BackupProvider`] for SCP VMs, including *linked VMs*
//! (a system disk that is an overlay on a shared base image), following
//! the SCP linked-VM seed (sections 4.5.1 to 4.5.3) and the janus OpenAPI
//! shapes of `PLATFORMS.md` / the mock hypervisor's README.
//!
//! ## Backup
//!
//! Per guest: `backup_vm_query_incremental` answers `Use` for every disk
//! the previous snapshot holds with a checkpoint (same size, CBT enabled),
//! `New` otherwise. `backup_vm` then
//!
//! 1. refuses desktop VMs in revert mode ([`ErrorKind::Refused`](provider_api::ErrorKind::Refused) naming the VM);
//! 2. checks CBT (`GET …/cbt/status`): disabled → `PUT …/cbt/status
//!    {"enable":1}`, every volume `New`, and a warning in
//!    [`VmBackup::warnings`](provider_api::VmBackup) (the host stores it
//!    with the snapshot). Expiry shows only as the platform's documented
//!    message *"The VM CBT has expired. Please reset it."* in a CBT call's
//!    answer (recognised by its text, whatever the code): the provider
//!    resets CBT, retakes the snapshot and goes full the same way, with the
//!    warning; an invalid checkpoint makes that volume full with a warning;
//! 3. opens a *backup resource* (lease, `type: Backup`) and keeps it alive
//!    with a background task (`PUT …/backup-resources/{id}` every
//!    [`ScpOptions::renew_interval`]);
//! 4. takes a snapshot (a CBT checkpoint) and reads its `vmconf`: a disk
//!    with `hardware_option.disks[].base_image_id` makes the VM linked;
//! 5. per disk: changed areas (`GET …/cbt/changed-areas`, paged lazily)
//!    since the previous checkpoint (`Use`) or all the disk's own data
//!    (`New`, `checkpoint_id=0`), and an NBD export or hot-added file of
//!    the frozen disk; for a linked disk, per the rule table below, a
//!    [`BaseLayer`](provider_api::BaseLayer) whose data (`open_base_image=1`) is exposed only on a
//!    full backup and only when the target does not hold that base image
//!    id yet (`BackupVmRequest::base_images`);
//! 6. stores the snapshot's `vmconf` as guest config and, as
//!    `PlatformMetadata`, the VM, its disks and the base image's metadata,
//!    custom attributes and bindings ([`metadata::SnapshotMetadata`]).
//!
//! `backup_cleanup` (success or failure) closes exports, detaches
//! hot-added disks, releases the lease and deletes the snapshot (its
//! checkpoint stays usable); `job_cleanup` does the same for any guest
//! still holding something. A lease that the renew task found expired
//! fails the guest with [`ErrorKind::LeaseLost`](provider_api::ErrorKind::LeaseLost) (the dirty-region iterator
//! stops with it, and a success cleanup refuses), so nothing half-read
//! is published.
//!
//! ## Rule table (seed 4.5.3)
//!
//! | SCP version | desktop (`application=="desk"`) | revert mode | system disk | base image |
//! | --- | --- | --- | --- | --- |
//! | any | yes | `revert_mode==1` | refused | refused |
//! | ≥ 6.11.3 | any | 0 | own data from CBT (`base_image=0`) | from CBT (`base_image=1, checkpoint_id=0`), full backups only, once per base image id |
//! | < 6.11.3 | no | 0 | merged (base included), no base layer | not separate |
//! | < 6.11.3 | yes | 0 | own data from CBT | whole image read (no base CBT), full backups only, once |
//!
//! Incremental backups read only the system and data disks' changed areas
//! since the last checkpoint, never the base image.
//!
//! ## Access modes ([`AccessMode`])
//!
//! Backup and restore open every disk through one seam,
//! [`disk_access::DiskAccess`] (sfvddk's `sfdisklib_open`: server, disk,
//! base-image flag, read-only or read-write), picked from the options:
//! the platform's REST export ([`disk_access::RestExport`], the test
//! double of sfvddk), hot-add ([`disk_access::HotAdd`]) or a site helper
//! command serving NBD on a private Unix socket
//! ([`disk_access::HelperCommand`], [`ScpOptions::helper_command`]).
//!
//! - `Nbd`: `POST …/backup-resources/{id}/exports` (`transport: nbd`), the
//!   host reads `nbd://host:port/export` ([`provider_api::SnapshotAccess::Nbd`]);
//! - `NbdSsl`: the same with `transport: nbdssl`; the host verifies the
//!   server certificate against the configured CA
//!   ([`provider_api::TlsSettings`]); a wrong CA is refused;
//! - `HotAdd`: each disk is hot-added to the backup proxy VM
//!   (`PUT /janus/20250725/servers/{proxy}`, `open_base_image` for the base
//!   image) and read as a local file with the changed areas as dirty
//!   regions ([`provider_api::SnapshotAccess::FileHandle`]); detached in `backup_cleanup`.
//!   With [`ScpOptions::hotadd_device_root`] (the proxy's
//!   `/dev/disk/by-id`) the disk is found as `<root>/virtio-<serial>`
//!   (waited for up to [`ScpOptions::hotadd_device_wait`]) instead of the
//!   `local_path` the platform answers.
//!
//! ## Restore
//!
//! `restore_vm_init` creates the new VM (or, in place, prepares the
//! original: a linked system disk is erased with `recovery-baseimage`, never
//! deleted). For a linked VM whose base image exists, its replica is synced
//! to the target storage when missing and its custom attributes are
//! created and bound as needed. When the base image is missing, the VM
//! cannot be created yet (SCP links only to an `AVAILABLE` image), so the
//! guest returned is provisional ([`ScpProvider::restored_server_id`] gives
//! the real id) and the system disk's `restore_vm_volume_init` restores the
//! base image first, in the seed's order (4.5.2): create it (`POST`,
//! tagged with the job marker), set it `AVAILABLE` (`PUT`), sync the
//! replica, restore attributes, create (or relink) the VM, then write the
//! base image's data *through the VM's system disk opened with the
//! base-image flag* (an export with `open_base_image: 1` under the
//! `Recovery` resource, as sfvddk's `SFDISKLIB_FLAG_OPEN_BASE_IMAGE`, or a
//! rw hot-add with `open_base_image: 1`). The data goes through the
//! provider's own data path: the host's base source is read with the
//! `nbd` client and written in bounded 4 MiB pieces, zero ranges skipped
//! (no `qemu-img` child process, no CA file on disk). The job marker is
//! removed once the data is complete. A failed restore deletes the VM it
//! created, then the incomplete base image (seed 4.5.3 rule 8); a job that
//! dies meanwhile leaves both marker-tagged and the next job of the host
//! sweeps them (`provider/sweep.rs`). The disks are then written by the
//! host: the linked system disk as
//! [`Layer::Overlay`](provider_api::Layer::Overlay), other disks as
//! [`Layer::Merged`](provider_api::Layer::Merged). A failed restore to a
//! new VM deletes that VM.
//!
//! A backup also records the server platform-neutrally (`spec.rs`: cores,
//! memory, OS type, disks with the bus their name implies, the NICs of
//! the snapshot's `vmconf`) for restores onto other platforms. A snapshot
//! taken on another platform, or imported, restores as a new server with
//! one plain disk per volume (the spec's boot disk the system disk) on the
//! `restore_storage_id` option (required); what the server cannot take
//! here (NICs, firmware, buses, OS names other than linux or windows) is
//! a restore warning.
//!
//! Quick recovery of linked VMs is refused: [`ScpProvider::quick_recovery`]
//! answers [`ErrorKind::Refused`](provider_api::ErrorKind::Refused).
//!
//! ## Errors and credentials
//!
//! Errors carry guest, volume, offset and the janus call
//! (`Error::api_call`, e.g. `GET /janus/20240725/servers/{id}/cbt/changed-areas`).
//! A non-zero envelope `code` is an error even with HTTP 200; the CBT
//! expiry message maps to `ChangeTrackingLost`, codes to other kinds
//! (60002/60004 → `ChangeTrackingLost`, 60005 → `Refused`, 60006 →
//! `LeaseLost`, 401 → `Auth`, ...). Tasks are polled through `waiting` and
//! `doing` to `finish`; a `failure` fails the call with the platform's
//! text (`description`). The password is a [`Secret`] whose `Debug`
//! prints `***`; tokens never appear in errors.
//!
//! Login ([`ScpClient`]): the RSA modulus from `GET /janus/v2/public-key`
//! (or `/janus/public-key`), the password encrypted with it (PKCS#1 v1.5)
//! and hex-encoded to `POST /janus/authenticate`; the token is renewed
//! before `expires_in` runs out and on a 401. With
//! [`ScpOptions::access_key`] and [`ScpOptions::secret_key`] every request
//! is signed instead (`AWS4-HMAC-SHA256`, as the `sangfor-scp` client
//! signs). The version is read from `build_version`
//! (`SCP6.11.3 B-…`; [`ScpVersion::parse`]).
//!
//! ## Example
//!
//! ```no_run
//! # async fn demo() -> provider_api::Result<()> {
//! use std::sync::Arc;
//! use provider_scp::{AccessMode, ScpOptions, ScpProvider};
//!
//! let mut options = ScpOptions::new("http://127.0.0.1:34391", "admin", "admin-password");
//! options.access = AccessMode::NbdSsl {
//!     ca_pem: std::fs::read_to_string("/tmp/mock/tls/ca-cert.pem")?,
//!     server_name: None,
//! };
//! let provider: Arc<dyn provider_api::BackupProvider> = Arc::new(ScpProvider::new(options)?);
//! // hand it to engine::BackupDriver / RestoreDriver
//! # let _ = provider; Ok(()) }
//! ```

pub mod api;
pub mod client;
pub mod disk_access;
pub mod metadata;
pub mod options;
pub mod provider;
pub mod rules;
pub mod settings;
mod spec;

pub use client::ScpClient;
pub use options::{AccessMode, HelperCommandOptions, ScpOptions, Secret};
pub use provider::ScpProvider;
pub use provider_kit::RetryPolicy;
pub use rules::{BasePolicy, ScpVersion, base_policy};
pub use settings::{ScpSettings, register};
