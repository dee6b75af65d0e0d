//! The shared chunk cache: single-flight loads, the byte bound, failures
//! not cached, cancellation, the decode limit and concurrent multi-chunk
//! reads.

use crate::common;

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use common::*;
use datastore::{ChunkCache, Datastore, DatastoreOptions};
use provider_api::*;

/// A datastore of `chunk_size` using `cache`, holding one snapshot of a
/// volume `sys` of `data`; returns it with the snapshot id.
async fn setup(
    dir: &std::path::Path,
    chunk_size: u64,
    cache: ChunkCache,
    data: &[u8],
) -> (Datastore, SnapshotId) {
    let ds = create_ds(
        &dir.join("ds"),
        DatastoreOptions {
            chunk_size,
            ..Default::default()
        },
    )
    .with_chunk_cache(cache);
    let info = backup(
        &ds,
        "vm",
        1,
        vspec("sys", data.len() as u64, StartFrom::Empty),
        &[Op::Data(0, data.to_vec())],
    )
    .await
    .unwrap();
    (ds, info.id)
}

async fn open(ds: &Datastore, id: &SnapshotId) -> Arc<dyn VolumeReader> {
    ds.open_snapshot(id)
        .await
        .unwrap()
        .open_volume("sys", Layer::Merged)
        .await
        .unwrap()
}

/// `n` reads, the `k`th of `range(k)` = (offset, length), all started at
/// once on tasks of their own.
async fn concurrent_reads(
    r: &Arc<dyn VolumeReader>,
    n: u64,
    range: impl Fn(u64) -> (u64, u64),
) -> Vec<(u64, Result<bytes::Bytes>)> {
    let barrier = Arc::new(tokio::sync::Barrier::new(n as usize));
    let tasks: Vec<_> = (0..n)
        .map(|k| {
            let (r, barrier, (off, len)) = (r.clone(), barrier.clone(), range(k));
            tokio::spawn(async move {
                barrier.wait().await;
                (off, r.read_at(off, len).await)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Poll a read once (so that it starts its load) and drop it, as a client
/// that gives up does.
async fn start_and_drop(r: &Arc<dyn VolumeReader>, offset: u64, len: u64) {
    let mut lead = r.read_at(offset, len);
    let pending = std::future::poll_fn(|cx| Poll::Ready(lead.as_mut().poll(cx).is_pending())).await;
    assert!(pending, "the read should have been waiting for its load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reads_of_one_chunk_load_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let cs = 4 << 20;
    let data = noise(1, cs as usize);
    let (ds, id) = setup(dir.path(), cs, ChunkCache::default(), &data).await;
    let r = open(&ds, &id).await;
    assert_eq!(ds.chunk_cache().stats().loads, 0);

    for (off, res) in concurrent_reads(&r, 64, |k| (k * 65_536, 4096)).await {
        assert_eq!(res.unwrap()[..], data[off as usize..off as usize + 4096]);
    }
    let st = ds.chunk_cache().stats();
    assert_eq!(st.loads, 1, "{st:?}");
    assert_eq!(st.misses, 1, "{st:?}");
    assert_eq!(st.hits + st.joined, 63, "{st:?}");
    assert_eq!(st.bytes, cs);

    // A whole-chunk read is served from the cache too.
    assert_eq!(r.read_at(0, cs).await.unwrap()[..], data[..]);
    assert_eq!(ds.chunk_cache().stats().loads, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cache_stays_within_its_byte_bound() {
    let dir = tempfile::tempdir().unwrap();
    let cs = 64 << 10;
    let bound = 1 << 20;
    let size = 8 << 20; // 128 chunks, 8 times the bound
    let data = noise(2, size as usize);
    let (ds, id) = setup(dir.path(), cs, ChunkCache::default(), &data).await;
    ds.set_chunk_cache_bytes(bound);
    let r = open(&ds, &id).await;

    // Reads of odd sizes crossing chunk boundaries, 16 at a time.
    let step = 100_000;
    let mut off = 0;
    while off < size {
        let batch = concurrent_reads(&r, 16, |k| {
            let o = (off + k * step).min(size);
            (o, step.min(size - o))
        })
        .await;
        for (o, res) in batch {
            let got = res.unwrap();
            assert_eq!(got[..], data[o as usize..o as usize + got.len()]);
            let st = ds.chunk_cache().stats();
            assert!(st.bytes <= bound, "{st:?}");
        }
        off += 16 * step;
    }
    let st = ds.chunk_cache().stats();
    assert!(st.bytes <= bound && st.bytes > 0, "{st:?}");
    assert!(st.evictions >= 128 - 16, "{st:?}");
    assert!(st.loads >= 128, "{st:?}");

    // The last chunk read is still there: a hit, not a load.
    let loads = st.loads;
    assert_eq!(
        r.read_at(size - 10, 10).await.unwrap()[..],
        data[size as usize - 10..]
    );
    assert_eq!(ds.chunk_cache().stats().loads, loads);

    // Shrinking evicts at once; 0 caches nothing.
    ds.set_chunk_cache_bytes(0);
    let st = ds.chunk_cache().stats();
    assert_eq!((st.bytes, st.chunks, st.max_bytes), (0, 0, 0));
    r.read_at(0, 10).await.unwrap();
    r.read_at(0, 10).await.unwrap();
    assert_eq!(ds.chunk_cache().stats().loads, loads + 2);
    assert_eq!(ds.chunk_cache().stats().bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disabled_cache_still_loads_each_chunk_once_for_concurrent_readers() {
    let dir = tempfile::tempdir().unwrap();
    let cs = 4 << 20;
    let data = noise(3, cs as usize);
    let (ds, id) = setup(dir.path(), cs, ChunkCache::new(0), &data).await;
    let r = open(&ds, &id).await;
    for (off, res) in concurrent_reads(&r, 32, |k| (k * 4096, 512)).await {
        assert_eq!(res.unwrap()[..], data[off as usize..off as usize + 512]);
    }
    let st = ds.chunk_cache().stats();
    assert_eq!((st.loads, st.bytes), (1, 0), "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_load_fails_every_waiter_and_is_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let cs = 1 << 20;
    let data = noise(4, 4 * cs as usize);
    let (ds, id) = setup(dir.path(), cs, ChunkCache::default(), &data).await;
    let r = open(&ds, &id).await;

    let digest = ds.chunks().digest_of(&data[cs as usize..2 * cs as usize]);
    let path = ds.chunks().path(&digest);
    let good = raw_read(&ds, &path);
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    raw_write(&ds, &path, &bad);

    for (_, res) in concurrent_reads(&r, 32, |k| (cs + k * 4096, 4096)).await {
        let err = res.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.to_string().contains(&digest.to_hex()), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
    // A read spanning it fails too (and its neighbours load fine).
    assert_eq!(
        r.read_at(0, 3 * cs).await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    let st = ds.chunk_cache().stats();
    assert!(st.load_failures >= 2, "{st:?}");

    // Repaired: the next read loads it again and succeeds.
    raw_write(&ds, &path, &good);
    assert_eq!(
        r.read_at(cs, 4096).await.unwrap()[..],
        data[cs as usize..cs as usize + 4096]
    );
    assert_eq!(r.read_at(0, 4 * cs).await.unwrap()[..], data[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_leading_read_does_not_strand_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let cs = 4 << 20;
    let data = noise(5, cs as usize);
    let (ds, id) = setup(dir.path(), cs, ChunkCache::default(), &data).await;
    let r = open(&ds, &id).await;

    // The leader starts the load, then gives up (polled once, dropped).
    start_and_drop(&r, 0, 4096).await;
    assert_eq!(ds.chunk_cache().stats().misses, 1);

    let second = tokio::time::timeout(Duration::from_secs(20), r.read_at(4096, 4096))
        .await
        .expect("a reader of the same chunk hangs after the leader was dropped")
        .unwrap();
    assert_eq!(second[..], data[4096..8192]);
    // The dropped read's load was not wasted either.
    assert_eq!(ds.chunk_cache().stats().loads, 1);
}

#[test]
fn a_load_abandoned_with_its_runtime_does_not_strand_later_readers() {
    let dir = tempfile::tempdir().unwrap();
    let cs = 64 << 10;
    let data = noise(6, cs as usize);
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let first = rt();
    let (ds, r) = first.block_on(async {
        let (ds, id) = setup(dir.path(), cs, ChunkCache::default(), &data).await;
        let r = open(&ds, &id).await;
        // Start a load; the runtime goes away before its task ever runs.
        start_and_drop(&r, 0, 10).await;
        (ds, r)
    });
    drop(first);
    assert_eq!(ds.chunk_cache().stats().loading, 0);

    rt().block_on(async {
        let got = tokio::time::timeout(Duration::from_secs(20), r.read_at(0, 10))
            .await
            .expect("hangs")
            .unwrap();
        assert_eq!(got[..], data[..10]);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_decodes_stay_within_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cs = 1 << 20;
    let chunks = 32;
    let data = noise(7, (chunks * cs) as usize);
    let cache = ChunkCache::with_decode_limit(0, 2);
    let (ds, id) = setup(dir.path(), cs, cache, &data).await;
    assert_eq!(ds.chunk_cache().decode_limit(), 2);
    let r = open(&ds, &id).await;

    // One read per chunk, all at once, and a read of the whole volume.
    for (off, res) in concurrent_reads(&r, chunks, |k| (k * cs, cs)).await {
        assert_eq!(res.unwrap()[..], data[off as usize..(off + cs) as usize]);
    }
    assert_eq!(r.read_at(0, chunks * cs).await.unwrap()[..], data[..]);
    let st = ds.chunk_cache().stats();
    assert!(st.max_decoding <= 2 && st.max_decoding >= 1, "{st:?}");
    assert_eq!(st.decoding, 0);
    // Nothing cached (bound 0): every chunk loaded once per read of it.
    assert_eq!(st.loads, 2 * chunks, "{st:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_read_spanning_chunks_fetches_them_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let cs = 64 << 10;
    let mut data = noise(8, 12 * cs as usize);
    // Chunk 5 is zeroes: never loaded.
    data[5 * cs as usize..6 * cs as usize].fill(0);
    let (ds, id) = setup(dir.path(), cs, ChunkCache::default(), &data).await;
    let r = open(&ds, &id).await;

    // Chunks 1..=10, partly at both ends: 9 to load.
    let (off, len) = (cs + 100, 10 * cs - 200);
    let got = r.read_at(off, len).await.unwrap();
    assert_eq!(got[..], data[off as usize..(off + len) as usize]);
    let st = ds.chunk_cache().stats();
    assert_eq!(st.loads, 9, "{st:?}");
    // On one thread, the loads a read starts together are all under way
    // before any of them can finish; a read fetching one chunk after
    // another would have had one at a time.
    assert!(st.max_loading >= 2, "{st:?}");
}

/// Waits until no load is under way.
async fn loads_settled(ds: &Datastore) {
    for _ in 0..500 {
        if ds.chunk_cache().stats().loading == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("loads still under way: {:?}", ds.chunk_cache().stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_reader_gets_the_next_chunks_loaded_ahead_and_a_random_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let cs = 64 << 10;
    let mut data = noise(9, 12 * cs as usize);
    // Chunk 3 is zeroes: never loaded, not even ahead.
    data[3 * cs as usize..4 * cs as usize].fill(0);
    let (ds, id) = setup(dir.path(), cs, ChunkCache::default(), &data).await;
    let r = open(&ds, &id).await;

    // The first read from the start is sequential: chunks 1, 2 and 4 are
    // loaded ahead (3 is zeroes); reading them then only hits.
    let got = r.read_at(0, cs).await.unwrap();
    assert_eq!(got[..], data[..cs as usize]);
    loads_settled(&ds).await;
    let st = ds.chunk_cache().stats();
    assert_eq!((st.misses, st.prefetches, st.loads), (1, 3, 4), "{st:?}");
    for i in 1..5u64 {
        let got = r.read_at(i * cs, cs).await.unwrap();
        assert_eq!(got[..], data[(i * cs) as usize..((i + 1) * cs) as usize]);
    }
    loads_settled(&ds).await;
    let st = ds.chunk_cache().stats();
    assert_eq!(st.misses, 1, "read-ahead kept ahead: {st:?}");
    assert!(st.hits >= 3, "{st:?}");

    // Random reads (far from where the latest ended) start nothing.
    let ds2dir = tempfile::tempdir().unwrap();
    let (ds2, id2) = setup(ds2dir.path(), cs, ChunkCache::default(), &data).await;
    let r2 = open(&ds2, &id2).await;
    for i in [9u64, 1, 6] {
        let got = r2.read_at(i * cs + 7, 4096).await.unwrap();
        assert_eq!(
            got[..],
            data[(i * cs + 7) as usize..(i * cs + 7 + 4096) as usize]
        );
    }
    loads_settled(&ds2).await;
    let st = ds2.chunk_cache().stats();
    assert_eq!((st.prefetches, st.loads), (0, 3), "{st:?}");
}
