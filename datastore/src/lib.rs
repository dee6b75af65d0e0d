//! # datastore: the default backup target
//!
//! A content-addressed, deduplicating, crash-safe repository of VM
//! snapshots in a local directory or on S3-compatible object storage
//! ([`Datastore::create_on`], [`backend`]), implementing
//! [`provider_api::Target`]. The same formats and guarantees hold on both;
//! where a local datastore renames directories and takes `flock`s, one on
//! an object store copies a snapshot's few small files into place, commits
//! with a conditional create of its manifest, and locks with leases (the
//! "Object stores" section below).
//! Every snapshot is logically full (an index naming every chunk of every
//! volume), so any snapshot can be deleted without breaking another;
//! retention is [`Datastore::prune`] followed by [`Datastore::gc`].
//!
//! ## On-disk format (versions 1, 2 and 3 read and written; magic numbers never change)
//!
//! ```text
//! <root>/.datastore.json                  sealed config: format "vmbackup-datastore", version, chunk_size,
//!                                         chunk_hash (version 2: "blake3"; version 1 has none: SHA-256);
//!                                         version 3 (encrypted): also encryption {cipher, chunk_id,
//!                                         key_fingerprint, auth}
//! <root>/.chunks/<2 hex>/<64 hex>         chunks, named by the hash of their plaintext
//! <root>/.locks/                          lock files (see below); writers/<start-ns>-<pid>-<n>
//! <root>/<platform>/<guest>/<RFC 3339 time>[-N]/   one snapshot
//!     <device>.fidx                       fixed index per volume
//!     <archive>.data.didx <archive>.catalog.didx   file archive: dynamic indexes of its data and
//!                                         catalog streams (see [`archive`]; manifest version 2)
//!     guest.conf.blob firewall.conf.blob metadata.json.blob
//!     spec.json.blob                      the platform-neutral guest spec (platform backups;
//!                                         blob kind `spec`, which older readers ignore)
//!     index.json                          the manifest (sealed); its presence makes the snapshot
//!     verify.json                         last verification (sealed), optional
//!     protected                           marker, optional
//! <root>/<platform>/<guest>/.tmp-<writer>/  a snapshot being written (invisible)
//! <root>/.base-images/<platform>/<id>/image.fidx + manifest.json   shared base images
//! ```
//!
//! Platform, guest, device and base image ids are path-encoded
//! (`[A-Za-z0-9_.-]` kept, everything else and a leading `.` as `%XX`). A
//! [`SnapshotId`](provider_api::SnapshotId) is `platform/guest/time` in that
//! encoding; two snapshots of one guest in the same second get a `-1`, `-2`
//! suffix.
//!
//! - **Chunk** (see [`chunk`]): magic `VBDSCHK1`, encoding (plain or zstd
//!   level 1, kept only when smaller), plaintext and stored lengths, CRC-32
//!   over header and stored bytes (checked before decompression), then the
//!   bytes; the plaintext's hash (the datastore's [`ChunkHash`]: BLAKE3
//!   in version 2, SHA-256 in version 1) is rechecked after. Chunks are fixed
//!   size (default 4 MiB, a power of two from 4 KiB to 64 MiB, fixed per
//!   datastore); a volume's last chunk may be shorter. The all-zero chunk
//!   is never stored: the index names it with the reserved all-zero digest.
//! - **Fixed index** (see [`index`]): magic `VBDSFIX1`, version, chunk size,
//!   volume size, chunk count, one 32-byte digest per chunk, SHA-256 of all
//!   of it.
//! - **Manifests** (see [`manifest`]): JSON sealed as
//!   `{"checksum": sha256, "manifest": {...}}`; a snapshot's lists its
//!   volumes (with the index file's size and SHA-256), blobs (size, SHA-256,
//!   media type) and warnings.
//! - **Encryption** (version 3, see [`crypt`]): chunk names are keyed
//!   BLAKE3, chunk bodies AES-256-GCM (bit 7 of the encoding byte), and
//!   every index, manifest, blob and verify state is wrapped as `VBDSENC1 ‖
//!   salt ‖ nonce ‖ AES-256-GCM ciphertext ‖ tag` (the manifest's
//!   checksums cover the wrapped bytes; manifests record the key's
//!   fingerprint). The config stays readable and carries a keyed tag.
//!   Opening needs the key ([`Datastore::open_with_key`]); a wrong key, a
//!   missing one, or a key for an unencrypted datastore is refused.
//! - **Key files** (see [`key`]): a master key sealed by a passphrase
//!   (Argon2id + ChaCha20-Poly1305).
//!
//! Sizes read from any header are bounded before allocation; a damaged
//! chunk, index, manifest or blob is reported (kind
//! [`Corrupt`](provider_api::ErrorKind::Corrupt)) with its path and digest
//! and never returned as data.
//!
//! ## Permissions
//!
//! Everything the datastore creates is private to its owner: directories
//! 0700 (the root too, when `create` finds it existing and empty), files
//! 0600, whatever the process's umask (it can only remove bits).
//!
//! ## Crash safety
//!
//! A chunk is written to a temp file, fsynced and renamed (inserting is
//! idempotent). A snapshot is written into `.tmp-<writer>/`; at commit the
//! chunk directories holding new chunks are fsynced, the manifest is
//! written last (temp, fsync, rename), and the directory is renamed into
//! place and its parent fsynced. Listing shows only directories with a
//! manifest; leftovers are removed by [`Datastore::gc`].
//!
//! ## Locks
//!
//! All locks are `flock(2)` locks (released when a process dies), so they
//! work between threads, tasks and processes alike.
//!
//! | lock | held by | against | guarantees |
//! |------|---------|---------|------------|
//! | `.locks/chunks.lock` shared, per insert | chunk insert | sweep (exclusive, per prefix dir) | a chunk found existing is touched before any sweep can remove it |
//! | `.locks/writers/<name>` exclusive, for a backup's lifetime | snapshot writer | GC | GC keeps every chunk written or touched (mtime) since the oldest running backup began, minus the grace period, and never removes a running backup's temp dir |
//! | `<snapshot>/index.json` shared | snapshot readers, writers starting from it (incremental) | delete / prune (exclusive try-lock) | a snapshot being read or used as an incremental base cannot be deleted, so its chunks stay marked |
//! | base image `manifest.json` shared | writers starting from it, readers of its layers | `delete_base_image` (exclusive try-lock; also refused while any snapshot refers to it) | a base image in use stays, so GC keeps marking its chunks |
//! | `<platform>/<guest>/.lock` exclusive | commit (choosing the name), prune | each other | two commits in one second get distinct names; prunes of a guest do not interleave |
//! | `.locks/gc.lock` exclusive | GC | GC | one GC at a time |
//!
//! ## Reading and the chunk cache
//!
//! Volume readers ([`VolReader`]) share one [`ChunkCache`] per
//! [`Datastore`] (see [`cache`]): decoded plaintext chunks, keyed by digest,
//! bounded in bytes ([`DEFAULT_CHUNK_CACHE_BYTES`], 64 MiB, by default;
//! [`Datastore::set_chunk_cache_bytes`], 0 to cache nothing) and evicted
//! least recently used first. A chunk enters the cache only after
//! [`ChunkStore::load`] checked its CRC and hash and its length matched
//! the index, so a hit is as trustworthy as a fresh load (damage on disk
//! after that is found by [`Datastore::verify`], not by reads). Concurrent
//! misses for one chunk share a single load (single-flight), whose error,
//! if any, all of them get and none is cached; at most
//! [`ChunkCache::decode_limit`] chunks (default: the number of cores, at
//! least 2) are decoded at once on blocking threads, and a read spanning
//! several chunks fetches them concurrently. Loads run in their own tasks,
//! so a cancelled read never strands the readers waiting for its chunk.
//! One mutex guards the cache's maps, held for map updates only (never
//! across I/O, decoding, copying or an await); [`ChunkCache::stats`]
//! counts hits, loads and bytes held. Verification ([`Datastore::verify`])
//! and incremental backups read chunks from disk, never from the cache.
//!
//! ## Garbage collection against running backups
//!
//! GC (1) notes the start of the oldest running backup from the writer
//! registry; (2) marks every chunk named by any snapshot index (each
//! snapshot read under its shared lock) and any base image index, listing
//! snapshots again until no new one appears, so a snapshot committed
//! meanwhile is marked too; (3) sweeps chunks neither marked nor modified
//! since `oldest backup start - grace`. A running backup only references
//! chunks it wrote or touched (mtime refreshed under the insert lock) and
//! chunks of its incremental base or base image, which it keeps locked
//! against deletion until it ends. Timestamps are set explicitly from the
//! same clock as the cutoff; a grace period covers clock steps.
//!
//! ## Object stores: several hosts on one datastore
//!
//! The layout (keys) is the local one. What differs, and why it is safe
//! with backups on several hosts and a GC on another, none sharing
//! anything but the store (S3 is strongly consistent for reads after
//! writes and for listings; conditional writes make creations atomic):
//!
//! - **Leases instead of `flock`s** ([`backend::lease`]): a backup holds
//!   `.locks/writers/<name>`, a GC `.locks/gc`, a commit or prune
//!   `.locks/groups/<platform>/<guest>`, a reader of a snapshot or base
//!   image `.locks/shared/<dir>/r-<id>`, a deletion `.locks/shared/<dir>/delete`.
//!   Each is renewed every third of its lifetime ([`DEFAULT_LEASE_TTL`])
//!   and expires by the store's clock, so a crashed host's locks free
//!   themselves. A backup whose lease could not be renewed refuses to
//!   commit.
//! - **Commit**: the backup writes its indexes and blobs under
//!   `<group>/.tmp-<writer>/`; under the group's lease it picks a free
//!   name, copies them there, and creates the manifest with `put_new`
//!   (`If-None-Match: *`). Listings show only snapshots with a manifest,
//!   so a reader never sees half a snapshot; a name is never given twice.
//! - **Deletion against readers**: a reader writes its lease, then looks
//!   for a deletion's lease; a deletion writes its lease, then looks for
//!   live readers. With a consistent store one of them sees the other, so
//!   a snapshot being restored, or the base of a running incremental,
//!   is never deleted under it. The manifest is deleted first: the
//!   snapshot vanishes at once, its files after.
//! - **GC against running backups (no referenced chunk is deleted)**.
//!   Let `S` be a backup's start (its lease object's time, store clock)
//!   and `G` the object grace ([`DEFAULT_OBJECT_GRACE`]). The backup
//!   reuses an existing chunk only if the chunk's `Last-Modified` is at or
//!   after `S - G`; otherwise it stores it again (a new `Last-Modified`).
//!   Chunks of its incremental base are reused by index without a check;
//!   that snapshot is held by its reader lease, so it stays and is marked.
//!   A GC takes `T0` = store time, lists live writer leases, sets
//!   `cutoff = min(T0, their S) - max(grace, G)`, marks every snapshot and
//!   base image (listing again until nothing new appears), and deletes
//!   only unmarked chunks older than `cutoff`. A chunk a running backup
//!   relies on was written or checked at or after `S - G >= cutoff` if
//!   the GC saw that backup's lease, or is younger than `T0 - G >= cutoff`
//!   if the backup began after the GC's listing (its lease, hence `S`,
//!   comes after `T0`); either way the sweep keeps it. Every time compared
//!   is the store's. A snapshot committed after the GC's last listing
//!   names only such chunks and its base's. A GC's own lease keeps two
//!   GCs apart; temp directories are removed only when their writer's
//!   lease is gone when asked.
//! - **What the tests run**: the whole datastore suite against moto
//!   (`scripts/test`, `VMBACKUP_TEST_S3`), including processes killed
//!   mid-backup and GCs concurrent with backups; `tests/backend.rs` (the
//!   storage contract, leases taken over by exactly one of four racing
//!   hosts, injected 503/500/resets); `cli/tests/s3.rs` (three `vmbackup`
//!   processes and looping GCs on one encrypted S3 datastore, one backup
//!   and one GC killed, every snapshot restored byte for byte).
//!
//! ## Example
//!
//! ```
//! use datastore::{Datastore, DatastoreOptions};
//! use provider_api::*;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<()> {
//! let dir = tempfile::tempdir()?;
//! let ds = Datastore::create(dir.path().join("ds"), DatastoreOptions { chunk_size: 64 << 10, ..Default::default() })?;
//! let spec = SnapshotSpec {
//!     platform: "scp".into(),
//!     guest: GuestId::from("vm-1"),
//!     archive: ArchiveName::new("vm/vm-1")?,
//!     time: 1_700_000_000,
//! };
//! let mut snap = ds.begin_snapshot(spec).await?;
//! let volume = Volume { device: "sys".into(), size: 1 << 20, format: VolumeFormat::Raw };
//! let mut w = snap
//!     .begin_volume(VolumeSpec {
//!         volume,
//!         start_from: StartFrom::Empty,
//!         base: None,
//!         bitmap_mode: BitmapMode::None,
//!         checkpoint: None,
//!     })
//!     .await?;
//! w.write(0, bytes::Bytes::from(vec![7u8; 100_000])).await?;
//! w.write_zeroes(100_000, (1 << 20) - 100_000).await?;
//! w.finish().await?;
//! let info = snap.commit(vec![]).await?;
//! assert_eq!(info.id.0, "scp/vm-1/2023-11-14T22:13:20Z");
//!
//! let r = ds.open_snapshot(&info.id).await?.open_volume("sys", Layer::Merged).await?;
//! assert_eq!(&r.read_at(99_999, 2).await?[..], &[7, 0]);
//! # Ok(())
//! # }
//! ```

pub mod archive;
pub mod backend;
pub mod cache;
pub mod chunk;
pub mod crypt;
pub mod index;
pub mod key;
mod maintenance;
pub mod manifest;
mod reader;
mod storage;
mod store;
mod util;
mod writer;

pub use cache::{ChunkCache, ChunkCacheStats, DEFAULT_CHUNK_CACHE_BYTES};
pub use chunk::{ChunkHash, ChunkStore, Digest};
pub use crypt::Crypt;
pub use key::{KeyFile, MasterKey};
pub use maintenance::{BadChunk, DatastoreStats, GcStats, KeepOptions, VerifyReport, VerifyScope};
pub use reader::VolReader;
pub use store::{
    DATASTORE_VERSION_ENCRYPTED, DEFAULT_CHUNK_SIZE, DEFAULT_LEASE_TTL, DEFAULT_OBJECT_GRACE,
    Datastore, DatastoreOptions,
};
