//! The decoded-chunk cache shared by every reader of a datastore.
//!
//! [`ChunkCache`] holds plaintext chunks that passed [`ChunkStore::load`]
//! (CRC, decompression, SHA-256 of the plaintext) and the reader's length
//! check, keyed by [`Digest`], bounded in bytes and evicted least recently
//! used first. On top of the cache:
//!
//! - **Single-flight.** Concurrent misses for one digest share one load:
//!   the first starts it, the others wait for its outcome and get the same
//!   [`Bytes`] (or the same error). A failed load is not cached: its
//!   waiters all get the error and the next read tries again.
//! - **Bounded decoding.** At most [`ChunkCache::decode_limit`] chunks are
//!   read and decoded at once (a semaphore in front of
//!   [`tokio::task::spawn_blocking`]), so a storm of reads costs a few
//!   blocking threads and a few chunk buffers, not one of each per read.
//! - **Read-ahead.** [`ChunkCache::prefetch`] starts the load of a chunk a
//!   sequential reader will want next without waiting for it; the load is
//!   a read's load (verified, bounded, single-flight), so a read that
//!   arrives while it runs joins it.
//! - **Cancellation.** A load runs in a task of its own, not in the reader
//!   that started it: a reader that gives up (a client that disconnects)
//!   neither stops the load its waiters need nor wastes it (its result is
//!   still cached). Should a load task vanish without an outcome (its
//!   runtime shutting down, a panic), its waiters start another.
//!
//! LRU rather than CLOCK: with chunks of megabytes a cache holds tens to
//! thousands of entries, so an exact LRU (a hash map plus an ordered map of
//! use ticks) costs a few hundred nanoseconds under its mutex per read,
//! which is nothing next to copying the read's bytes out; CLOCK would let
//! hits skip the lock, a win only at far higher read rates than a disk
//! and a network link allow, at the price of a cruder eviction order.
//!
//! The mutex guards only map updates; it is never held across an await,
//! a load or a copy.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use provider_api::{Error, Result};
use tokio::sync::{Semaphore, watch};

use crate::chunk::{ChunkStore, Digest};
use crate::util::corrupt;

/// Default bound of a datastore's chunk cache: 64 MiB.
pub const DEFAULT_CHUNK_CACHE_BYTES: u64 = 64 << 20;

/// How often a reader starts a load again when the load it waited for
/// vanished without an outcome, before giving up.
const MAX_TAKEOVERS: usize = 3;

/// Counters of a [`ChunkCache`], for tests, benchmarks and logs. The
/// counters only grow (since the cache was created); `bytes`, `chunks`,
/// `max_bytes`, `loading` and `decoding` are current values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkCacheStats {
    /// Reads answered from the cache.
    pub hits: u64,
    /// Reads that found the chunk neither cached nor being loaded, and so
    /// started a load.
    pub misses: u64,
    /// Reads that found the chunk being loaded and waited for that load
    /// (single-flight).
    pub joined: u64,
    /// Loads started by [`ChunkCache::prefetch`] (read-ahead) rather than
    /// by a read.
    pub prefetches: u64,
    /// Chunks read from disk and decoded ([`ChunkStore::load`] calls),
    /// successful or not.
    pub loads: u64,
    /// Loads that failed (nothing cached).
    pub load_failures: u64,
    /// Chunks dropped to stay within the bound (or by
    /// [`ChunkCache::clear`]).
    pub evictions: u64,
    /// Bytes of plaintext held now (never more than `max_bytes`).
    pub bytes: u64,
    /// Chunks held now.
    pub chunks: u64,
    /// The bound, in bytes.
    pub max_bytes: u64,
    /// Chunks being loaded now (waiting for a decode slot or decoding).
    pub loading: usize,
    /// The most chunks ever being loaded at once.
    pub max_loading: usize,
    /// Decodes running now.
    pub decoding: usize,
    /// The most decodes that ever ran at once (never more than the
    /// decode limit).
    pub max_decoding: usize,
}

/// A decoded-chunk cache, bounded in bytes, with single-flight loads and a
/// bounded number of concurrent decodes (see the [module docs](crate::cache)).
/// Cheap to clone: clones share the cache.
///
/// A cache is meant for the chunks of one datastore; since chunks are
/// named by the SHA-256 of their content, sharing one between datastores
/// is still correct.
#[derive(Clone)]
pub struct ChunkCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("decode_limit", &self.inner.decode_limit)
            .field("stats", &self.stats())
            .finish()
    }
}

/// The outcome of a load, as handed to every waiter.
type Outcome = std::result::Result<Bytes, Arc<Error>>;

struct Inner {
    state: Mutex<State>,
    decodes: Arc<Semaphore>,
    decode_limit: usize,
    loads: AtomicU64,
    load_failures: AtomicU64,
    decoding: AtomicUsize,
    max_decoding: AtomicUsize,
}

struct State {
    lru: Lru,
    /// Loads under way: their id and a receiver of their outcome.
    flights: HashMap<Digest, (u64, watch::Receiver<Option<Outcome>>)>,
    next_flight: u64,
    max_loading: usize,
    hits: u64,
    misses: u64,
    joined: u64,
    prefetches: u64,
}

/// Least recently used first: `order` maps a use tick to its digest.
struct Lru {
    max_bytes: u64,
    bytes: u64,
    tick: u64,
    evictions: u64,
    map: HashMap<Digest, (Bytes, u64)>,
    order: BTreeMap<u64, Digest>,
}

impl Lru {
    fn get(&mut self, digest: &Digest) -> Option<Bytes> {
        let (data, tick) = self.map.get_mut(digest)?;
        self.order.remove(tick);
        self.tick += 1;
        *tick = self.tick;
        self.order.insert(self.tick, *digest);
        Some(data.clone())
    }

    fn insert(&mut self, digest: Digest, data: Bytes) {
        let len = data.len() as u64;
        if len > self.max_bytes || self.map.contains_key(&digest) {
            return;
        }
        self.shrink_to(self.max_bytes - len);
        self.tick += 1;
        self.order.insert(self.tick, digest);
        self.map.insert(digest, (data, self.tick));
        self.bytes += len;
    }

    /// Evict until at most `bytes` are held.
    fn shrink_to(&mut self, bytes: u64) {
        while self.bytes > bytes {
            let Some((_, d)) = self.order.pop_first() else {
                break;
            };
            if let Some((data, _)) = self.map.remove(&d) {
                self.bytes -= data.len() as u64;
                self.evictions += 1;
            }
        }
    }
}

impl Default for ChunkCache {
    fn default() -> Self {
        ChunkCache::new(DEFAULT_CHUNK_CACHE_BYTES)
    }
}

impl ChunkCache {
    /// The default decode limit: the number of cores, at least 2.
    pub fn default_decode_limit() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .max(2)
    }

    /// A cache of at most `max_bytes` of plaintext (0: cache nothing; loads
    /// are still shared and bounded) with the default decode limit.
    pub fn new(max_bytes: u64) -> ChunkCache {
        ChunkCache::with_decode_limit(max_bytes, ChunkCache::default_decode_limit())
    }

    /// A cache of at most `max_bytes` that decodes at most `decode_limit`
    /// chunks at once (at least 1).
    pub fn with_decode_limit(max_bytes: u64, decode_limit: usize) -> ChunkCache {
        let decode_limit = decode_limit.max(1);
        ChunkCache {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    lru: Lru {
                        max_bytes,
                        bytes: 0,
                        tick: 0,
                        evictions: 0,
                        map: HashMap::new(),
                        order: BTreeMap::new(),
                    },
                    flights: HashMap::new(),
                    next_flight: 0,
                    max_loading: 0,
                    hits: 0,
                    misses: 0,
                    joined: 0,
                    prefetches: 0,
                }),
                decodes: Arc::new(Semaphore::new(decode_limit)),
                decode_limit,
                loads: AtomicU64::new(0),
                load_failures: AtomicU64::new(0),
                decoding: AtomicUsize::new(0),
                max_decoding: AtomicUsize::new(0),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bound, in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.state().lru.max_bytes
    }

    /// Change the bound (for every clone), evicting at once what no longer
    /// fits. 0 empties the cache and caches nothing from then on.
    pub fn set_max_bytes(&self, max_bytes: u64) {
        let mut st = self.state();
        st.lru.max_bytes = max_bytes;
        st.lru.shrink_to(max_bytes);
    }

    /// The most chunks decoded at once.
    pub fn decode_limit(&self) -> usize {
        self.inner.decode_limit
    }

    /// Drop every cached chunk (loads under way are not affected).
    pub fn clear(&self) {
        self.state().lru.shrink_to(0);
    }

    /// The counters.
    pub fn stats(&self) -> ChunkCacheStats {
        let st = self.state();
        ChunkCacheStats {
            hits: st.hits,
            misses: st.misses,
            joined: st.joined,
            prefetches: st.prefetches,
            loads: self.inner.loads.load(Ordering::Relaxed),
            load_failures: self.inner.load_failures.load(Ordering::Relaxed),
            evictions: st.lru.evictions,
            bytes: st.lru.bytes,
            chunks: st.lru.map.len() as u64,
            max_bytes: st.lru.max_bytes,
            loading: st.flights.len(),
            max_loading: st.max_loading,
            decoding: self.inner.decoding.load(Ordering::Relaxed),
            max_decoding: self.inner.max_decoding.load(Ordering::Relaxed),
        }
    }

    /// The plaintext of chunk `digest`, which must be `len` bytes long: from
    /// the cache, or from a load already under way, or loaded from `store`
    /// (verified) and then cached. Never call it for [`Digest::ZERO`] (which
    /// is never stored). Must run inside a Tokio runtime.
    pub async fn get(&self, store: &ChunkStore, digest: Digest, len: u64) -> Result<Bytes> {
        for _ in 0..=MAX_TAKEOVERS {
            let mut rx = {
                let mut st = self.state();
                if let Some(data) = st.lru.get(&digest) {
                    st.hits += 1;
                    drop(st);
                    return check_len(store, &digest, len, data);
                }
                match st.flights.get(&digest) {
                    Some((_, rx)) => {
                        let rx = rx.clone();
                        st.joined += 1;
                        rx
                    }
                    None => {
                        st.misses += 1;
                        self.start_load(st, store, digest, len)
                    }
                }
            };
            let outcome = match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone(),
                // The load task vanished: start another.
                Err(_) => continue,
            };
            return match outcome {
                Some(Ok(data)) => check_len(store, &digest, len, data),
                Some(Err(e)) => Err(share(&e)),
                None => continue,
            };
        }
        Err(Error::other(format!(
            "loading chunk {digest} was abandoned {} times",
            MAX_TAKEOVERS + 1
        )))
    }

    /// Starts loading chunk `digest` (of `len` bytes) unless it is cached
    /// or being loaded, without waiting: read-ahead for a sequential
    /// reader. The load is the same as a read's (verified, bounded by the
    /// decode limit, cached on success); a failed one is simply not cached
    /// and the read that needs the chunk loads it again and gets the
    /// error. Must run inside a Tokio runtime.
    pub fn prefetch(&self, store: &ChunkStore, digest: Digest, len: u64) {
        let mut st = self.state();
        if st.lru.max_bytes < len
            || st.lru.map.contains_key(&digest)
            || st.flights.contains_key(&digest)
        {
            return;
        }
        st.prefetches += 1;
        drop(self.start_load(st, store, digest, len));
    }

    /// Registers a flight for `digest` and spawns its load; returns the
    /// channel its outcome comes on.
    fn start_load(
        &self,
        mut st: MutexGuard<'_, State>,
        store: &ChunkStore,
        digest: Digest,
        len: u64,
    ) -> watch::Receiver<Option<Outcome>> {
        st.next_flight += 1;
        let id = st.next_flight;
        let (tx, rx) = watch::channel(None);
        st.flights.insert(digest, (id, rx.clone()));
        st.max_loading = st.max_loading.max(st.flights.len());
        drop(st);
        let guard = FlightGuard {
            cache: self.clone(),
            digest,
            id,
        };
        tokio::spawn(load(guard, store.clone(), len, tx));
        rx
    }
}

/// Ends a flight: whatever happens to its task, the flight leaves the map
/// (so that the next reader starts a new load).
struct FlightGuard {
    cache: ChunkCache,
    digest: Digest,
    id: u64,
}

impl FlightGuard {
    /// Remove the flight, and cache `data` if given, atomically: a reader
    /// finds the chunk either loading or cached, never neither (which
    /// would start a second load).
    fn finish(&self, data: Option<Bytes>) {
        let mut st = self.cache.state();
        if st.flights.get(&self.digest).is_some_and(|f| f.0 == self.id) {
            st.flights.remove(&self.digest);
        }
        if let Some(data) = data {
            st.lru.insert(self.digest, data);
        }
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.finish(None);
    }
}

/// A load task: wait for a decode slot, load and verify on a blocking
/// thread, cache on success, tell the waiters.
async fn load(guard: FlightGuard, store: ChunkStore, len: u64, tx: watch::Sender<Option<Outcome>>) {
    let inner = guard.cache.inner.clone();
    let digest = guard.digest;
    let res = match inner.decodes.clone().acquire_owned().await {
        Err(e) => Err(Error::other("the chunk decode limiter is closed").with_source(e)),
        Ok(permit) => {
            let inner = inner.clone();
            let task = tokio::task::spawn_blocking(move || {
                // The slot is held on the blocking thread, so it is freed
                // only when the decode really ends.
                let running = inner.decoding.fetch_add(1, Ordering::SeqCst) + 1;
                inner.max_decoding.fetch_max(running, Ordering::SeqCst);
                inner.loads.fetch_add(1, Ordering::Relaxed);
                let res = store.load(&digest);
                inner.decoding.fetch_sub(1, Ordering::SeqCst);
                drop(permit);
                res
            });
            match task.await {
                Ok(res) => res,
                Err(e) => Err(Error::other("a datastore worker failed").with_source(e)),
            }
        }
    };
    let outcome = match res {
        Ok(data) => {
            let data = Bytes::from(data);
            // Cache only what also passed the length check (the index's
            // view of the chunk); every reader checks its own length.
            guard.finish((data.len() as u64 == len).then(|| data.clone()));
            Ok(data)
        }
        Err(e) => {
            inner.load_failures.fetch_add(1, Ordering::Relaxed);
            guard.finish(None);
            Err(Arc::new(e))
        }
    };
    tx.send_replace(Some(outcome));
}

fn check_len(store: &ChunkStore, digest: &Digest, len: u64, data: Bytes) -> Result<Bytes> {
    if data.len() as u64 != len {
        return Err(corrupt(format!(
            "chunk {digest} at {} has {} bytes where the index expects {len}",
            store.path(digest).display(),
            data.len()
        )));
    }
    Ok(data)
}

/// A copy of a shared load error for one waiter: same kind, message,
/// context, retryability and source chain.
fn share(e: &Arc<Error>) -> Error {
    let mut out = Error::new(e.kind(), e.message()).retryable(e.is_retryable());
    let c = e.context();
    if let Some(g) = &c.guest {
        out = out.guest(g);
    }
    if let Some(v) = &c.volume {
        out = out.volume(v);
    }
    if let Some(o) = c.offset {
        out = out.offset(o);
    }
    if let Some(a) = &c.api_call {
        out = out.api_call(a);
    }
    if std::error::Error::source(&**e).is_some() {
        out = out.with_source(SourceOf(e.clone()));
    }
    out
}

/// The source of a shared error, standing in for it in a copy.
#[derive(Debug)]
struct SourceOf(Arc<Error>);

impl std::fmt::Display for SourceOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match std::error::Error::source(&*self.0) {
            Some(s) => std::fmt::Display::fmt(s, f),
            None => Ok(()),
        }
    }
}

impl std::error::Error for SourceOf {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0).and_then(|s| s.source())
    }
}
