//! The datastore: layout, locks, listing, and the [`Target`] implementation.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use provider_api::{
    BaseImageCatalog, BaseImageId, Error, ErrorKind, GuestId, Result, SnapshotId, SnapshotInfo,
    SnapshotReader, SnapshotSpec, SnapshotWriter, Target,
};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, KeptLease, LeaseInfo};
use crate::cache::{ChunkCache, DEFAULT_CHUNK_CACHE_BYTES};
use crate::chunk::{ChunkHash, ChunkStore};
use crate::crypt::Crypt;
use crate::index::{FixedIndex, MAX_CHUNK_LOG2, MIN_CHUNK_LOG2};
use crate::key::MasterKey;
use crate::manifest::{
    BaseImageManifest, Manifest, VerifyState, check_key, check_manifest, load_sealed, read_sealed,
    store_sealed,
};
use crate::storage::{Held, Storage, key_of};
use crate::util::{encode_component, io_err, is_safe_component, unique_suffix};

/// Default chunk size: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// Format name in `.datastore.json` (never changes).
pub const DATASTORE_FORMAT: &str = "vmbackup-datastore";
/// Datastore format version written for a BLAKE3 datastore (chunks named
/// by BLAKE3; `chunk_hash` in the config). A SHA-256 datastore is written
/// as version 1 (no `chunk_hash`), which every earlier release reads; a
/// release that knows only version 1 refuses version 2 instead of
/// misreading its chunk names.
pub const DATASTORE_VERSION: u32 = 2;

/// Object stores: default lifetime of a lease without renewal (renewed
/// every third of it).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(120);
/// Object stores: default freshness window of existing chunks and least
/// GC grace (see [`ChunkStore`]).
pub const DEFAULT_OBJECT_GRACE: Duration = Duration::from_secs(3600);

pub(crate) const CONFIG_FILE: &str = ".datastore.json";
pub(crate) const MANIFEST_FILE: &str = "index.json";
pub(crate) const VERIFY_FILE: &str = "verify.json";
pub(crate) const PROTECTED_FILE: &str = "protected";
pub(crate) const BASE_DIR: &str = ".base-images";
pub(crate) const BASE_INDEX_FILE: &str = "image.fidx";
pub(crate) const BASE_MANIFEST_FILE: &str = "manifest.json";

/// How to create a datastore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreOptions {
    /// Chunk size in bytes: a power of two from 4 KiB to 64 MiB.
    pub chunk_size: u64,
    /// The hash naming chunks (default BLAKE3).
    #[serde(default)]
    pub chunk_hash: ChunkHash,
}

impl Default for DatastoreOptions {
    fn default() -> Self {
        DatastoreOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            chunk_hash: ChunkHash::default(),
        }
    }
}

/// Datastore format version of an encrypted datastore (chunks named by
/// keyed BLAKE3, every chunk and metadata file encrypted; see
/// [`crate::crypt`]). A release that knows only versions 1 and 2 refuses
/// it instead of misreading it.
pub const DATASTORE_VERSION_ENCRYPTED: u32 = 3;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    format: String,
    version: u32,
    chunk_size: u64,
    /// Versions 2 and 3 (version 1 is SHA-256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chunk_hash: Option<ChunkHash>,
    /// Version 3 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encryption: Option<EncryptionConfig>,
}

/// How an encrypted datastore is encrypted, authenticated by a keyed
/// BLAKE3 tag over the whole config (with `auth` empty).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EncryptionConfig {
    cipher: String,
    chunk_id: String,
    key_fingerprint: String,
    auth: String,
}

impl Config {
    /// The bytes the config's tag covers.
    fn auth_bytes(&self) -> Vec<u8> {
        let mut c = self.clone();
        if let Some(e) = &mut c.encryption {
            e.auth.clear();
        }
        serde_json::to_vec(&c).unwrap_or_default()
    }
}

#[derive(Clone)]
pub(crate) struct Inner {
    pub(crate) root: PathBuf,
    pub(crate) storage: Storage,
    /// Leases of an object-store datastore last this long unless renewed.
    pub(crate) lease_ttl: Duration,
    /// Object stores: how far back from its start a writer trusts an
    /// existing chunk, and the least grace a GC uses (see [`ChunkStore`]).
    pub(crate) object_grace: Duration,
    pub(crate) crypt: Option<Arc<Crypt>>,
    pub(crate) chunks: ChunkStore,
    pub(crate) chunk_size: u64,
    pub(crate) workers: usize,
    pub(crate) cache: ChunkCache,
}

/// A datastore in a local directory. Cheap to clone; every clone (and every
/// process) may write, read and maintain it concurrently.
#[derive(Clone)]
pub struct Datastore {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Datastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datastore")
            .field("root", &self.inner.root)
            .field("chunk_size", &self.inner.chunk_size)
            .field("crypt", &self.inner.crypt)
            .finish()
    }
}

/// Where a snapshot lives, parsed from its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapPath {
    pub(crate) platform: String,
    pub(crate) guest: String,
    pub(crate) name: String,
}

impl SnapPath {
    pub(crate) fn parse(id: &SnapshotId) -> Result<SnapPath> {
        let parts: Vec<&str> = id.0.split('/').collect();
        match parts[..] {
            [p, g, n] if is_safe_component(p) && is_safe_component(g) && is_safe_component(n) => {
                Ok(SnapPath {
                    platform: p.into(),
                    guest: g.into(),
                    name: n.into(),
                })
            }
            _ => Err(Error::invalid(format!(
                "snapshot id {id} is not of the form platform/guest/time"
            ))),
        }
    }

    pub(crate) fn id(&self) -> SnapshotId {
        SnapshotId(format!("{}/{}/{}", self.platform, self.guest, self.name))
    }
}

pub(crate) fn open_lock_file(path: &Path) -> Result<File> {
    crate::util::private_file_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| io_err("opening lock", path, e))
}

/// A running backup, registered in `.locks/writers/` under an exclusive
/// lock that dies with the process.
pub(crate) struct WriterRegistration {
    pub(crate) name: String,
    path: Option<PathBuf>,
    held: Held,
    /// When it began: the store's clock for object stores.
    pub(crate) started: SystemTime,
}

impl WriterRegistration {
    /// Object stores: `LeaseLost` when the writer's lease was not renewed
    /// in time (a GC may then have judged it dead).
    pub(crate) fn check(&self) -> Result<()> {
        match &self.held {
            Held::Lease(l) => l.check(),
            Held::File(_) => Ok(()),
        }
    }
}

impl Drop for WriterRegistration {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = fs::remove_file(p);
        }
    }
}

/// Run blocking work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::other("a datastore worker failed").with_source(e))?
}

impl Datastore {
    /// Create a new, empty, unencrypted datastore in `path` (created if
    /// missing; must be empty if it exists).
    pub fn create(path: impl AsRef<Path>, options: DatastoreOptions) -> Result<Datastore> {
        Datastore::create_with_key(path, options, None)
    }

    /// Create a new, empty datastore in `path`, encrypted under `key` if
    /// given (format version 3: keyed BLAKE3 chunk names; see
    /// [`crate::crypt`]; `options.chunk_hash` must then be BLAKE3).
    pub fn create_with_key(
        path: impl AsRef<Path>,
        options: DatastoreOptions,
        key: Option<&MasterKey>,
    ) -> Result<Datastore> {
        let root = path.as_ref().to_path_buf();
        let cs = options.chunk_size;
        if !cs.is_power_of_two()
            || !(MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(&cs.trailing_zeros())
        {
            return Err(Error::invalid(format!(
                "chunk size {cs} must be a power of two from 4 KiB to 64 MiB"
            )));
        }
        new_config(&options, key)?;
        crate::util::create_dir_all_private(&root).map_err(|e| io_err("creating", &root, e))?;
        let non_empty = fs::read_dir(&root)
            .map_err(|e| io_err("listing", &root, e))?
            .next()
            .is_some();
        if non_empty {
            return Err(Error::new(
                ErrorKind::Refused,
                format!(
                    "{} is not empty: refusing to create a datastore there",
                    root.display()
                ),
            ));
        }
        // The root may have existed (empty): make it private too.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
                .map_err(|e| io_err("making private", &root, e))?;
        }
        for d in [".locks/writers", BASE_DIR] {
            let p = root.join(d);
            crate::util::create_dir_all_private(&p).map_err(|e| io_err("creating", &p, e))?;
        }
        ChunkStore::new(&root, cs as usize, options.chunk_hash, None).create()?;
        let cfg = new_config(&options, key)?;
        store_sealed(&root.join(CONFIG_FILE), &cfg, None)?;
        Datastore::open_with_key(root, key)
    }

    /// Create a new, empty datastore on an object store (encrypted under
    /// `key` if given). Refused where a datastore or anything else already
    /// is.
    pub fn create_on(
        backend: Arc<dyn Backend>,
        options: DatastoreOptions,
        key: Option<&MasterKey>,
    ) -> Result<Datastore> {
        backend.check()?;
        let at = backend.location();
        let cs = options.chunk_size;
        if !cs.is_power_of_two()
            || !(MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(&cs.trailing_zeros())
        {
            return Err(Error::invalid(format!(
                "chunk size {cs} must be a power of two from 4 KiB to 64 MiB"
            )));
        }
        let present = backend.children("")?;
        if !present.is_empty() {
            let what = if present.iter().any(|n| n == CONFIG_FILE) {
                "a datastore is already there".to_owned()
            } else {
                format!(
                    "it already holds objects ({}), and no datastore config",
                    present
                        .iter()
                        .take(3)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return Err(Error::new(
                ErrorKind::Refused,
                format!("{at}: refusing to create a datastore: {what}"),
            ));
        }
        let cfg = new_config(&options, key)?;
        let data = crate::manifest::seal(&cfg)?;
        if backend
            .put_new(CONFIG_FILE, bytes::Bytes::from(data))?
            .is_none()
        {
            return Err(Error::new(
                ErrorKind::Refused,
                format!("{at}: another host created a datastore there at the same time"),
            ));
        }
        Datastore::open_on(backend, key)
    }

    /// Whether the datastore on `backend` is encrypted, and under which key
    /// (its fingerprint), without opening it; `None` also when there is no
    /// datastore (opening says why).
    pub fn key_fingerprint_on(backend: &Arc<dyn Backend>) -> Result<Option<String>> {
        let Some((data, _)) = backend.get(CONFIG_FILE, crate::manifest::MAX_MANIFEST_LEN)? else {
            return Ok(None);
        };
        let cfg: Config = crate::manifest::unseal(&data, Path::new(CONFIG_FILE))?;
        Ok(cfg.encryption.map(|e| e.key_fingerprint))
    }

    /// Open an existing datastore on an object store (`key` as for
    /// [`Datastore::open_with_key`]).
    pub fn open_on(backend: Arc<dyn Backend>, key: Option<&MasterKey>) -> Result<Datastore> {
        backend.check()?;
        let at = backend.location();
        let Some((data, _)) = backend.get(CONFIG_FILE, crate::manifest::MAX_MANIFEST_LEN)? else {
            let present = backend.children("")?;
            return Err(if present.is_empty() {
                Error::not_found(format!(
                    "no datastore at {at} (nothing there: create one with vmbackup init)"
                ))
            } else {
                Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "{at} is not a vmbackup datastore: it holds objects ({}) but no {CONFIG_FILE}",
                        present
                            .iter()
                            .take(3)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            });
        };
        let cfg_path = format!("{at}/{CONFIG_FILE}");
        let cfg: Config = crate::manifest::unseal(&data, Path::new(&cfg_path))?;
        let (hash, cs, crypt) = check_config(&cfg, &cfg_path, &at, key)?;
        let chunks = ChunkStore::on_backend(backend.clone(), cs as usize, hash, crypt.clone());
        Ok(Datastore::assemble(
            PathBuf::new(),
            Storage::Object(backend),
            chunks,
            cs,
            crypt,
        ))
    }

    /// Where the datastore is: its directory, or its object store's
    /// location.
    pub fn location(&self) -> String {
        match self.inner.storage.object() {
            Some(b) => b.location(),
            None => self.inner.root.display().to_string(),
        }
    }

    /// The object store under the datastore, if it is on one.
    pub fn backend(&self) -> Option<&Arc<dyn Backend>> {
        self.inner.storage.object()
    }

    pub(crate) fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    /// Open an existing, unencrypted datastore (an encrypted one is
    /// refused with an error naming its key's fingerprint).
    pub fn open(path: impl AsRef<Path>) -> Result<Datastore> {
        Datastore::open_with_key(path, None)
    }

    /// Whether the datastore at `path` is encrypted, and under which key
    /// (its fingerprint), without opening it.
    pub fn key_fingerprint_at(path: impl AsRef<Path>) -> Result<Option<String>> {
        let cfg: Config = load_sealed(&path.as_ref().join(CONFIG_FILE), None)?;
        Ok(cfg.encryption.map(|e| e.key_fingerprint))
    }

    /// Open an existing datastore; `key` must be given for an encrypted
    /// one (and must be its key), and must not be for an unencrypted one.
    pub fn open_with_key(path: impl AsRef<Path>, key: Option<&MasterKey>) -> Result<Datastore> {
        let root = path.as_ref().to_path_buf();
        let cfg_path = root.join(CONFIG_FILE);
        let cfg: Config = load_sealed(&cfg_path, None)?;
        let (hash, cs, crypt) = check_config(
            &cfg,
            &cfg_path.display().to_string(),
            &root.display().to_string(),
            key,
        )?;
        Ok(Datastore::assemble(
            root,
            Storage::Local,
            ChunkStore::new(&root_of(&cfg_path), cs as usize, hash, crypt.clone()),
            cs,
            crypt,
        ))
    }

    fn assemble(
        root: PathBuf,
        storage: Storage,
        chunks: ChunkStore,
        cs: u64,
        crypt: Option<Arc<Crypt>>,
    ) -> Datastore {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .max(1);
        Datastore {
            inner: Arc::new(Inner {
                chunks,
                crypt,
                root,
                storage,
                lease_ttl: DEFAULT_LEASE_TTL,
                object_grace: DEFAULT_OBJECT_GRACE,
                chunk_size: cs,
                workers,
                cache: ChunkCache::new(DEFAULT_CHUNK_CACHE_BYTES),
            }),
        }
    }

    /// Number of chunks hashed and compressed at once by each volume writer
    /// (default: the number of cores).
    pub fn with_workers(self, workers: usize) -> Datastore {
        let mut inner = (*self.inner).clone();
        inner.workers = workers.max(1);
        Datastore {
            inner: Arc::new(inner),
        }
    }

    /// Object stores: how long a lease lasts unless renewed (default
    /// [`DEFAULT_LEASE_TTL`]); a crashed host's leases free up after this.
    pub fn with_lease_ttl(self, ttl: Duration) -> Datastore {
        let mut inner = (*self.inner).clone();
        inner.lease_ttl = ttl.max(Duration::from_secs(2));
        Datastore {
            inner: Arc::new(inner),
        }
    }

    /// Object stores: how far back from its start a backup trusts an
    /// existing chunk without storing it again, which is also the least
    /// grace period of a GC (default [`DEFAULT_OBJECT_GRACE`]).
    pub fn with_object_grace(self, grace: Duration) -> Datastore {
        let mut inner = (*self.inner).clone();
        inner.object_grace = grace;
        Datastore {
            inner: Arc::new(inner),
        }
    }

    /// Use `cache` for the decoded chunks of this handle's readers (default:
    /// a [`ChunkCache`] of [`DEFAULT_CHUNK_CACHE_BYTES`] created at open,
    /// shared by every clone of the handle).
    pub fn with_chunk_cache(self, cache: ChunkCache) -> Datastore {
        let mut inner = (*self.inner).clone();
        inner.cache = cache;
        Datastore {
            inner: Arc::new(inner),
        }
    }

    /// The decoded-chunk cache shared by this handle's readers.
    pub fn chunk_cache(&self) -> &ChunkCache {
        &self.inner.cache
    }

    /// Bound the decoded-chunk cache to `bytes` of plaintext (0: cache
    /// nothing). Affects every handle sharing the cache, at once.
    pub fn set_chunk_cache_bytes(&self, bytes: u64) {
        self.inner.cache.set_max_bytes(bytes);
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> u64 {
        self.inner.chunk_size
    }

    /// The chunk store.
    pub fn chunks(&self) -> &ChunkStore {
        &self.inner.chunks
    }

    /// The keys of an encrypted datastore.
    pub fn crypt(&self) -> Option<&Crypt> {
        self.inner.crypt.as_deref()
    }

    /// The fingerprint of an encrypted datastore's key.
    pub fn key_fingerprint(&self) -> Option<&str> {
        self.crypt().map(Crypt::fingerprint)
    }

    pub(crate) fn locks_dir(&self) -> PathBuf {
        self.inner.root.join(".locks")
    }

    pub(crate) fn group_dir(&self, platform: &str, guest: &str) -> PathBuf {
        self.inner.root.join(platform).join(guest)
    }

    pub(crate) fn snap_dir(&self, p: &SnapPath) -> PathBuf {
        self.group_dir(&p.platform, &p.guest).join(&p.name)
    }

    pub(crate) fn base_dir(&self, platform: &str, id: &BaseImageId) -> PathBuf {
        self.inner
            .root
            .join(BASE_DIR)
            .join(encode_component(platform))
            .join(encode_component(&id.0))
    }

    /// The exclusive lock of a snapshot group (naming at commit, prune).
    pub(crate) fn lock_group(&self, group: &Path) -> Result<Held> {
        if let Some(b) = self.storage().object() {
            let key = format!(".locks/groups/{}", key_of(group)?);
            return self.wait_for_lease(b, &key, "group").map(Held::Lease);
        }
        crate::util::create_dir_all_private(group).map_err(|e| io_err("creating", group, e))?;
        let f = open_lock_file(&group.join(".lock"))?;
        f.lock().map_err(|e| io_err("locking", group, e))?;
        Ok(Held::File(f))
    }

    /// An exclusive lease, waited for (up to two lease lifetimes: a holder
    /// that crashed is taken over after one).
    fn wait_for_lease(&self, b: &Arc<dyn Backend>, key: &str, purpose: &str) -> Result<KeptLease> {
        let deadline =
            std::time::Instant::now() + 2 * self.inner.lease_ttl + Duration::from_secs(5);
        loop {
            match KeptLease::acquire(b.clone(), key, purpose, self.inner.lease_ttl) {
                Err(e)
                    if e.kind() == ErrorKind::Refused && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(250));
                }
                other => return other,
            }
        }
    }

    /// Register a running backup (see the lock table in the crate docs).
    pub(crate) fn register_writer(&self) -> Result<WriterRegistration> {
        let name = unique_suffix();
        if let Some(b) = self.storage().object() {
            let lease = KeptLease::acquire(
                b.clone(),
                &format!(".locks/writers/{name}"),
                "backup",
                self.inner.lease_ttl,
            )?;
            return Ok(WriterRegistration {
                name,
                path: None,
                started: lease.started(),
                held: Held::Lease(lease),
            });
        }
        let dir = self.locks_dir().join("writers");
        crate::util::create_dir_all_private(&dir).map_err(|e| io_err("creating", &dir, e))?;
        let tmp = dir.join(format!(".new-{name}"));
        let file = open_lock_file(&tmp)?;
        file.lock().map_err(|e| io_err("locking", &tmp, e))?;
        let path = dir.join(&name);
        fs::rename(&tmp, &path).map_err(|e| io_err("registering writer", &path, e))?;
        Ok(WriterRegistration {
            name,
            path: Some(path),
            held: Held::File(file),
            started: SystemTime::now(),
        })
    }

    /// Object stores: a shared lock on `target` (a snapshot's or base
    /// image's directory key): a reader lease under
    /// `.locks/shared/<target>/`, held while no deletion of `target` is
    /// live. A reader writes its lease and then looks for a deletion; a
    /// deletion writes its lease and then looks for readers: with a
    /// strongly consistent store at least one of them sees the other.
    ///
    /// A live deletion lease is waited out: either the deletion finishes
    /// (`gone` reports the target's manifest missing: `NotFound`), or it
    /// backs off because it saw this reader, or its holder crashed and the
    /// lease lapses (within one lease lifetime). `what` names the target
    /// in errors.
    pub(crate) fn shared_lease(
        &self,
        b: &Arc<dyn Backend>,
        target: &str,
        what: &str,
        gone: &dyn Fn() -> Result<bool>,
    ) -> Result<Held> {
        let base = format!(".locks/shared/{target}");
        let lease = KeptLease::acquire(
            b.clone(),
            &format!("{base}/r-{}", unique_suffix()),
            "read",
            self.inner.lease_ttl,
        )?;
        let deadline = std::time::Instant::now() + self.inner.lease_ttl + Duration::from_secs(5);
        let mut waited = false;
        loop {
            let deleter = match b.get(&format!("{base}/delete"), 64 << 10)? {
                None => None,
                Some((data, meta)) => {
                    let now = b.now()?;
                    serde_json::from_slice::<LeaseInfo>(&data)
                        .ok()
                        .filter(|i| i.live_at(&meta, now))
                }
            };
            let Some(deleter) = deleter else {
                return Ok(Held::Lease(lease));
            };
            if gone()? {
                drop(lease);
                return Err(Error::not_found(format!("{what} does not exist")));
            }
            if std::time::Instant::now() >= deadline {
                drop(lease);
                return Err(Error::new(
                    ErrorKind::Refused,
                    format!(
                        "{what} is being deleted (by {} pid {}, whose lease is still renewed)",
                        deleter.host, deleter.pid
                    ),
                )
                .retryable(true));
            }
            if !waited {
                tracing::info!(
                    "{what} is being deleted by {} pid {}: waiting for the deletion to end \
                     or its lease to lapse",
                    deleter.host,
                    deleter.pid
                );
                waited = true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Object stores: the exclusive lock a deletion of `target` holds;
    /// `Refused` while a live reader holds it shared (after waiting a
    /// little: a GC or verify holds it only briefly).
    pub(crate) fn exclusive_lease(
        &self,
        b: &Arc<dyn Backend>,
        target: &str,
        what: &str,
    ) -> Result<Held> {
        let base = format!(".locks/shared/{target}");
        let mut tries = 0;
        loop {
            let lease = KeptLease::acquire(
                b.clone(),
                &format!("{base}/delete"),
                "delete",
                self.inner.lease_ttl,
            )
            .map_err(|e| {
                Error::new(ErrorKind::Refused, format!("{what} is being deleted: {e}"))
                    .retryable(true)
            })?;
            match self.live_reader(b, &base)? {
                None => return Ok(Held::Lease(lease)),
                Some(_) if tries < 20 => {
                    drop(lease);
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Some(who) => {
                    return Err(Error::new(
                        ErrorKind::Refused,
                        format!(
                            "{what} is in use (being read or the base of a running backup, on {who})"
                        ),
                    )
                    .retryable(true));
                }
            }
        }
    }

    /// A live reader lease under `base/` (host and pid), removing lapsed
    /// ones (crashed readers').
    fn live_reader(&self, b: &Arc<dyn Backend>, base: &str) -> Result<Option<String>> {
        let now = b.now()?;
        for m in b.list(&format!("{base}/"))? {
            if !m
                .key
                .rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with("r-"))
            {
                continue;
            }
            let Some((data, meta)) = b.get(&m.key, 64 << 10)? else {
                continue;
            };
            match serde_json::from_slice::<LeaseInfo>(&data) {
                Ok(i) if i.live_at(&meta, now) => {
                    return Ok(Some(format!("{} pid {}", i.host, i.pid)));
                }
                _ => b.delete(&m.key)?,
            }
        }
        Ok(None)
    }

    /// Lock a finished snapshot against deletion (shared) and load its
    /// manifest.
    pub(crate) fn lock_snapshot(&self, id: &SnapshotId) -> Result<(Held, PathBuf, Manifest)> {
        let sp = SnapPath::parse(id)?;
        let dir = self.snap_dir(&sp);
        let mpath = dir.join(MANIFEST_FILE);
        let held = match self.storage().object() {
            Some(b) => {
                let gone = || Ok(!self.storage().exists(&mpath)?);
                let held =
                    self.shared_lease(b, &key_of(&dir)?, &format!("snapshot {id}"), &gone)?;
                if !self.storage().exists(&mpath)? {
                    return Err(Error::not_found(format!("snapshot {id} does not exist")));
                }
                held
            }
            None => {
                let f = File::open(&mpath).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Error::not_found(format!("snapshot {id} does not exist"))
                    } else {
                        io_err("opening", &mpath, e)
                    }
                })?;
                f.lock_shared().map_err(|e| io_err("locking", &mpath, e))?;
                if !mpath.exists() {
                    return Err(Error::not_found(format!("snapshot {id} was deleted")));
                }
                Held::File(f)
            }
        };
        let m: Manifest = read_sealed(self.storage(), &mpath, self.crypt())?;
        check_manifest(&m, &mpath, self.crypt())?;
        Ok((held, dir, m))
    }

    /// Lock a base image against deletion (shared) and load its index.
    pub(crate) fn lock_base_image(
        &self,
        platform: &str,
        id: &BaseImageId,
    ) -> Result<(Held, FixedIndex)> {
        let dir = self.base_dir(platform, id);
        let mpath = dir.join(BASE_MANIFEST_FILE);
        let missing = || Error::not_found(format!("base image {id} of {platform} is not stored"));
        let held = match self.storage().object() {
            Some(b) => {
                let gone = || Ok(!self.storage().exists(&mpath)?);
                let what = format!("base image {id} of {platform}");
                let held =
                    self.shared_lease(b, &key_of(&dir)?, &what, &gone)
                        .map_err(|e| match e.kind() {
                            ErrorKind::NotFound => missing(),
                            _ => e,
                        })?;
                if !self.storage().exists(&mpath)? {
                    return Err(missing());
                }
                held
            }
            None => {
                let f = File::open(&mpath).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        missing()
                    } else {
                        io_err("opening", &mpath, e)
                    }
                })?;
                f.lock_shared().map_err(|e| io_err("locking", &mpath, e))?;
                Held::File(f)
            }
        };
        let m: BaseImageManifest = read_sealed(self.storage(), &mpath, self.crypt())?;
        check_key(m.key_fingerprint.as_deref(), self.crypt(), &mpath)?;
        let idx = FixedIndex::read(
            self.storage(),
            &dir.join(&m.index.file),
            Some(&m.index.sha256),
            self.crypt(),
        )?;
        Ok((held, idx))
    }

    pub(crate) fn info_of(&self, sp: &SnapPath, dir: &Path, m: &Manifest) -> SnapshotInfo {
        SnapshotInfo {
            id: sp.id(),
            platform: m.platform.clone(),
            guest: m.guest.clone(),
            archive: m.archive.clone(),
            time: m.time,
            volumes: m.volumes.iter().map(|v| v.stored()).collect(),
            warnings: m.warnings.clone(),
            verified: self.verify_state(dir),
        }
    }

    pub(crate) fn verify_state(&self, dir: &Path) -> Option<bool> {
        let p = dir.join(VERIFY_FILE);
        if !self.storage().exists(&p).unwrap_or(false) {
            return None;
        }
        match read_sealed::<VerifyState>(self.storage(), &p, self.crypt()) {
            Ok(v) => Some(v.state == "ok"),
            Err(_) => Some(false),
        }
    }

    /// Every finished snapshot (by directory), oldest first. Damaged
    /// manifests are skipped with a warning here (verify reports them).
    pub(crate) fn snapshot_paths(
        &self,
        platform: Option<&str>,
        guest: Option<&str>,
    ) -> Result<Vec<SnapPath>> {
        let mut out = Vec::new();
        if let Some(b) = self.storage().object() {
            let dirs = |dir: &Path| -> Result<Vec<String>> {
                Ok(self
                    .storage()
                    .children(dir)?
                    .into_iter()
                    .filter(|n| is_safe_component(n))
                    .collect())
            };
            let platforms = match platform {
                Some(p) => vec![encode_component(p)],
                None => dirs(&self.inner.root)?,
            };
            for p in platforms {
                let guests = match guest {
                    Some(g) => vec![encode_component(g)],
                    None => dirs(&self.inner.root.join(&p))?,
                };
                for g in guests {
                    let prefix = format!("{}/", key_of(&self.group_dir(&p, &g))?);
                    let mut names: Vec<String> = b
                        .list(&prefix)?
                        .into_iter()
                        .filter_map(|m| {
                            let rest = m.key.strip_prefix(&prefix)?;
                            let (name, file) = rest.split_once('/')?;
                            (file == MANIFEST_FILE && is_safe_component(name))
                                .then(|| name.to_owned())
                        })
                        .collect();
                    names.sort();
                    out.extend(names.into_iter().map(|name| SnapPath {
                        platform: p.clone(),
                        guest: g.clone(),
                        name,
                    }));
                }
            }
            return Ok(out);
        }
        let list = |dir: &Path| -> Result<Vec<String>> {
            let mut v = Vec::new();
            let rd = match fs::read_dir(dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
                Err(e) => return Err(io_err("listing", dir, e)),
            };
            for e in rd {
                let e = e.map_err(|e| io_err("listing", dir, e))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if is_safe_component(&name) && e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    v.push(name);
                }
            }
            v.sort();
            Ok(v)
        };
        let platforms = match platform {
            Some(p) => vec![encode_component(p)],
            None => list(&self.inner.root)?,
        };
        for p in platforms {
            let guests = match guest {
                Some(g) => vec![encode_component(g)],
                None => list(&self.inner.root.join(&p))?,
            };
            for g in guests {
                for n in list(&self.group_dir(&p, &g))? {
                    let sp = SnapPath {
                        platform: p.clone(),
                        guest: g.clone(),
                        name: n,
                    };
                    if self.snap_dir(&sp).join(MANIFEST_FILE).exists() {
                        out.push(sp);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Finished snapshots with their manifests, oldest first.
    pub(crate) fn list_sync(
        &self,
        platform: Option<&str>,
        guest: Option<&str>,
    ) -> Result<Vec<SnapshotInfo>> {
        let mut out = Vec::new();
        for sp in self.snapshot_paths(platform, guest)? {
            let dir = self.snap_dir(&sp);
            let mpath = dir.join(MANIFEST_FILE);
            match read_sealed::<Manifest>(self.storage(), &mpath, self.crypt())
                .and_then(|m| check_manifest(&m, &mpath, self.crypt()).map(|_| m))
            {
                Ok(m) => out.push(self.info_of(&sp, &dir, &m)),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("skipping snapshot {}: {}", sp.id(), e.report()),
            }
        }
        out.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
        Ok(out)
    }

    /// Whether a base image is stored and its index intact.
    pub fn has_base_image_sync(&self, platform: &str, id: &BaseImageId) -> Result<bool> {
        match self.lock_base_image(platform, id) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) if e.kind() == ErrorKind::Corrupt => {
                tracing::warn!("base image {id} is damaged: {}", e.report());
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// The config of a new datastore.
fn new_config(options: &DatastoreOptions, key: Option<&MasterKey>) -> Result<Config> {
    let cs = options.chunk_size;
    let (version, chunk_hash) = match (options.chunk_hash, key) {
        (ChunkHash::Sha256, None) => (1, None),
        (other, None) => (DATASTORE_VERSION, Some(other)),
        (ChunkHash::Blake3, Some(_)) => (DATASTORE_VERSION_ENCRYPTED, Some(ChunkHash::Blake3)),
        (ChunkHash::Sha256, Some(_)) => {
            return Err(Error::invalid(
                "an encrypted datastore names its chunks by keyed BLAKE3, not SHA-256",
            ));
        }
    };
    let mut cfg = Config {
        format: DATASTORE_FORMAT.into(),
        version,
        chunk_size: cs,
        chunk_hash,
        encryption: key.map(|k| EncryptionConfig {
            cipher: crate::crypt::CIPHER.into(),
            chunk_id: crate::crypt::CHUNK_ID.into(),
            key_fingerprint: k.fingerprint(),
            auth: String::new(),
        }),
    };
    if let Some(k) = key {
        let tag = Crypt::new(k).config_tag(&cfg.auth_bytes());
        if let Some(e) = &mut cfg.encryption {
            e.auth = tag;
        }
    }
    Ok(cfg)
}

/// Check a datastore config against the key given: (chunk hash, chunk
/// size, keys).
fn check_config(
    cfg: &Config,
    cfg_path: &str,
    root: &str,
    key: Option<&MasterKey>,
) -> Result<(ChunkHash, u64, Option<Arc<Crypt>>)> {
    let hash = match (
        cfg.format == DATASTORE_FORMAT,
        cfg.version,
        cfg.chunk_hash,
        &cfg.encryption,
    ) {
        (true, 1, None, None) => Some(ChunkHash::Sha256),
        (true, 2, Some(h), None) => Some(h),
        (true, 3, Some(ChunkHash::Blake3), Some(e))
            if e.cipher == crate::crypt::CIPHER && e.chunk_id == crate::crypt::CHUNK_ID =>
        {
            Some(ChunkHash::Blake3)
        }
        _ => None,
    };
    let Some(hash) = hash else {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "{} is format {:?} version {}, not a datastore this version reads",
                cfg_path, cfg.format, cfg.version
            ),
        ));
    };
    let cs = cfg.chunk_size;
    if !cs.is_power_of_two() || !(MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(&cs.trailing_zeros()) {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("{} has an invalid chunk size {cs}", cfg_path),
        ));
    }
    let crypt = match (&cfg.encryption, key) {
        (None, None) => None,
        (None, Some(k)) => {
            return Err(Error::invalid(format!(
                "datastore {} is not encrypted, but key {} was given: refusing to mix \
                     (create an encrypted datastore for it)",
                root,
                k.fingerprint()
            )));
        }
        (Some(e), None) => {
            return Err(Error::invalid(format!(
                "datastore {} is encrypted with key {}: open it with that key file",
                root, e.key_fingerprint
            )));
        }
        (Some(e), Some(k)) => {
            if e.key_fingerprint != k.fingerprint() {
                return Err(Error::invalid(format!(
                    "key {} is not the key of datastore {} (it is encrypted with key {})",
                    k.fingerprint(),
                    root,
                    e.key_fingerprint
                )));
            }
            let crypt = Crypt::new(k);
            if crypt.config_tag(&cfg.auth_bytes()) != e.auth {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "{} does not authenticate under key {}: it was altered",
                        cfg_path, e.key_fingerprint
                    ),
                ));
            }
            Some(Arc::new(crypt))
        }
    };
    Ok((hash, cs, crypt))
}

fn root_of(cfg_path: &Path) -> PathBuf {
    cfg_path.parent().map(Path::to_path_buf).unwrap_or_default()
}

#[async_trait]
impl Target for Datastore {
    async fn begin_snapshot(&self, spec: SnapshotSpec) -> Result<Box<dyn SnapshotWriter>> {
        let ds = self.clone();
        let w = blocking(move || crate::writer::SnapWriter::begin(ds, spec)).await?;
        Ok(Box::new(w))
    }

    async fn list_snapshots(
        &self,
        platform: Option<&str>,
        guest: Option<&GuestId>,
    ) -> Result<Vec<SnapshotInfo>> {
        let ds = self.clone();
        let platform = platform.map(str::to_owned);
        let guest = guest.map(|g| g.0.clone());
        blocking(move || ds.list_sync(platform.as_deref(), guest.as_deref())).await
    }

    async fn open_snapshot(&self, id: &SnapshotId) -> Result<Box<dyn SnapshotReader>> {
        let ds = self.clone();
        let id = id.clone();
        let r = blocking(move || crate::reader::SnapReader::open(ds, &id)).await?;
        Ok(Box::new(r))
    }

    fn base_images(&self, platform: &str) -> Arc<dyn BaseImageCatalog> {
        Arc::new(Catalog {
            ds: self.clone(),
            platform: platform.to_owned(),
        })
    }
}

struct Catalog {
    ds: Datastore,
    platform: String,
}

#[async_trait]
impl BaseImageCatalog for Catalog {
    async fn has_base_image(&self, id: &BaseImageId) -> Result<bool> {
        let ds = self.ds.clone();
        let platform = self.platform.clone();
        let id = id.clone();
        blocking(move || ds.has_base_image_sync(&platform, &id)).await
    }
}
