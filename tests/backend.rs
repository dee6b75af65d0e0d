//! The datastore's storage contract (`datastore::backend`), one suite run
//! against a local directory and against a real S3 server (moto): whole
//! objects, conditional creates and replaces that exactly one of several
//! racing writers wins, listings, the store's clock, leases (taken,
//! refused, expired and taken over by exactly one host, lost on renewal);
//! then, on S3 only, recovery from injected 503s, 500s and connection
//! resets, and one clear error each for bad credentials, a missing bucket
//! and a store that keeps failing.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use datastore::backend::{Backend, Lease, LocalBackend, S3Backend};
use datastore::{ChunkHash, ChunkStore, Crypt, MasterKey};
use provider_api::ErrorKind;
use scenarios::s3::{Fault, FaultProxy, Moto, options_at};

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn objects(backend: &dyn Backend) {
    let at = backend.location();
    assert_eq!(backend.get("a/missing", 10).unwrap(), None, "{at}");
    assert_eq!(backend.head("a/missing").unwrap(), None, "{at}");
    let v1 = backend.put("a/one", b("first")).unwrap();
    let (data, meta) = backend.get("a/one", 100).unwrap().unwrap();
    assert_eq!((data.as_slice(), meta.size), (&b"first"[..], 5), "{at}");
    assert_eq!(meta.version, v1, "{at}");
    assert_eq!(backend.head("a/one").unwrap().unwrap().version, v1);
    let v2 = backend.put("a/one", b("second!")).unwrap();
    assert_ne!(v1, v2, "{at}: a replacement has a new version");
    assert_eq!(backend.get("a/one", 100).unwrap().unwrap().0, b"second!");
    // Bounded before reading.
    let err = backend.get("a/one", 3).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{at}: {err}");
    assert!(err.to_string().contains("a/one"), "{err}");
    // Keys with the characters snapshot names use.
    backend
        .put("scp/vm%2F1/2026-12-01T08:00:00Z-1/index.json", b("{}"))
        .unwrap();
    backend.put("a/deeper/two", b("2")).unwrap();
    let mut keys: Vec<(String, u64)> = backend
        .list("a/")
        .unwrap()
        .into_iter()
        .map(|m| (m.key, m.size))
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![("a/deeper/two".into(), 1), ("a/one".into(), 7)],
        "{at}"
    );
    let all = backend.list("").unwrap();
    assert!(
        all.iter()
            .any(|m| m.key == "scp/vm%2F1/2026-12-01T08:00:00Z-1/index.json"),
        "{at}: {all:?}"
    );
    backend.delete("a/one").unwrap();
    backend.delete("a/one").unwrap();
    assert_eq!(backend.head("a/one").unwrap(), None);
    // Bad keys are refused, never mapped somewhere else.
    for bad in ["../x", "/abs", "a//b", "a/./b"] {
        assert_eq!(
            backend.put(bad, b("x")).unwrap_err().kind(),
            ErrorKind::InvalidInput,
            "{bad}"
        );
    }
}

fn conditional_writes(backend: Arc<dyn Backend>) {
    let at = backend.location();
    let v = backend.put_new("c/new", b("mine")).unwrap();
    assert!(v.is_some(), "{at}");
    assert_eq!(backend.put_new("c/new", b("theirs")).unwrap(), None);
    assert_eq!(backend.get("c/new", 100).unwrap().unwrap().0, b"mine");
    // Replace only the version read.
    let v = v.unwrap();
    let v2 = backend
        .put_if_version("c/new", b("mine, 2"), &v)
        .unwrap()
        .expect("the version read");
    assert_eq!(
        backend.put_if_version("c/new", b("stale"), &v).unwrap(),
        None
    );
    assert_eq!(backend.get("c/new", 100).unwrap().unwrap().0, b"mine, 2");
    assert_eq!(
        backend.put_if_version("c/absent", b("x"), &v2).unwrap(),
        None,
        "{at}: a missing object has no version"
    );
    // Eight racing creators: exactly one wins, and its bytes stay.
    let winners: Vec<Option<String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let backend = backend.clone();
                s.spawn(move || {
                    backend
                        .put_new("c/race", Bytes::from(format!("writer {i}")))
                        .unwrap()
                        .map(|_| format!("writer {i}"))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let won: Vec<&String> = winners.iter().flatten().collect();
    assert_eq!(won.len(), 1, "{at}: {winners:?}");
    assert_eq!(
        backend.get("c/race", 100).unwrap().unwrap().0,
        won[0].as_bytes()
    );
    // Eight racing replacers of one version: exactly one wins.
    let base = backend.put("c/cas", b("base")).unwrap();
    let won = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let (backend, base) = (backend.clone(), base.clone());
                s.spawn(move || {
                    backend
                        .put_if_version("c/cas", Bytes::from(format!("r{i}")), &base)
                        .unwrap()
                        .is_some()
                })
            })
            .collect();
        hs.into_iter()
            .filter(|_| true)
            .map(|h| h.join().unwrap())
            .filter(|w| *w)
            .count()
    });
    assert_eq!(won, 1, "{at}");
}

fn clock(backend: &dyn Backend) {
    let before = backend.now().unwrap();
    backend.put("clock/x", b("x")).unwrap();
    let m = backend.head("clock/x").unwrap().unwrap();
    let after = backend.now().unwrap();
    // Stores keep whole seconds (S3's Last-Modified): allow one.
    let slack = Duration::from_secs(1);
    assert!(
        m.modified + slack >= before && m.modified <= after + slack,
        "{}: {before:?} <= {:?} <= {after:?}",
        backend.location(),
        m.modified
    );
}

fn leases(backend: Arc<dyn Backend>) {
    let at = backend.location();
    let ttl = Duration::from_secs(2);
    let a = Lease::acquire(backend.clone(), "locks/gc.lease", "gc", ttl).unwrap();
    let err = Lease::acquire(backend.clone(), "locks/gc.lease", "gc", ttl).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused, "{at}: {err}");
    assert!(
        err.to_string()
            .contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    a.release().unwrap();
    let mut a = Lease::acquire(backend.clone(), "locks/gc.lease", "gc", ttl).unwrap();
    a.renew().unwrap();
    // Its holder stops renewing (a crash): after the ttl, by the store's
    // clock, four hosts race to take it over and exactly one does.
    std::thread::sleep(Duration::from_millis(3500));
    let taken: Vec<Lease> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let backend = backend.clone();
                s.spawn(move || Lease::acquire(backend, "locks/gc.lease", "gc", ttl).ok())
            })
            .collect();
        hs.into_iter().filter_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(taken.len(), 1, "{at}");
    // The old holder learns it at its next renewal.
    let err = a.renew().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LeaseLost, "{at}: {err}");
    // Releasing a lost lease leaves the new holder's alone.
    a.release().unwrap();
    assert!(Lease::acquire(backend.clone(), "locks/gc.lease", "gc", ttl).is_err());
    taken.into_iter().for_each(|l| l.release().unwrap());
    Lease::acquire(backend, "locks/gc.lease", "gc", ttl)
        .unwrap()
        .release()
        .unwrap();
}

fn contract(backend: Arc<dyn Backend>) {
    objects(&*backend);
    conditional_writes(backend.clone());
    clock(&*backend);
    leases(backend);
}

#[test]
fn the_contract_on_a_local_directory() {
    let dir = tempfile::tempdir().unwrap();
    contract(Arc::new(
        LocalBackend::new(dir.path().join("store")).unwrap(),
    ));
}

#[test]
fn the_contract_on_s3() {
    let Some(moto) = Moto::start(false) else {
        return;
    };
    moto.create_bucket("vmbackup-contract");
    let s3 = S3Backend::new(&moto.options("vmbackup-contract", "team/ds1")).unwrap();
    s3.check().unwrap();
    contract(Arc::new(s3));
    // Everything stayed under the prefix.
    let whole = S3Backend::new(&moto.options("vmbackup-contract", "")).unwrap();
    let outside: Vec<String> = whole
        .list("")
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .filter(|k| !k.starts_with("team/ds1/"))
        .collect();
    assert_eq!(outside, Vec::<String>::new());
}

#[test]
fn s3_requests_recover_from_slowdowns_errors_and_resets() {
    let Some(moto) = Moto::start(false) else {
        return;
    };
    moto.create_bucket("vmbackup-faults");
    let proxy = FaultProxy::start(moto.port());
    let mut options = options_at(&proxy.endpoint, "vmbackup-faults", "ds");
    options.no_connection_reuse = true;
    let s3 = S3Backend::new(&options).unwrap();
    use Fault::*;
    let data = Bytes::from(vec![7u8; 300_000]);
    proxy.inject(&[SlowDown, InternalError, Reset, SlowDown]);
    s3.put("chunks/x", data.clone()).unwrap();
    proxy.inject(&[SlowDown, Reset, InternalError]);
    assert_eq!(s3.get("chunks/x", 1 << 20).unwrap().unwrap().0, data);
    // A create whose first attempt reached the store but whose answer was
    // lost: the retry finds the key taken by its own bytes, and reports it
    // created. Another writer's create (reset before it reached the
    // store) finds it taken by other bytes.
    proxy.inject(&[LoseAnswer]);
    let created = s3.put_new("manifest", b("commit")).unwrap();
    assert!(created.is_some());
    assert_eq!(s3.get("manifest", 100).unwrap().unwrap().0, b"commit");
    proxy.inject(&[Reset]);
    assert_eq!(s3.put_new("manifest", b("other")).unwrap(), None);
    proxy.inject(&[LoseAnswer]);
    assert_eq!(s3.put_new("manifest", b("other")).unwrap(), None);
    assert_eq!(s3.get("manifest", 100).unwrap().unwrap().0, b"commit");
    proxy.inject(&[SlowDown, SlowDown]);
    assert_eq!(s3.list("chunks/").unwrap().len(), 1);
    assert_eq!(proxy.pending(), 0, "every fault was met");

    // A store that keeps failing: one error naming the operation, the
    // object and the store, after the retries.
    let mut options = options_at(&proxy.endpoint, "vmbackup-faults", "ds");
    options.no_connection_reuse = true;
    options.max_retries = Some(2);
    let s3 = S3Backend::new(&options).unwrap();
    proxy.inject(&[SlowDown; 10]);
    let err = s3.put("chunks/y", data).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("S3 write of s3://vmbackup-faults/ds/chunks/y failed"),
        "{text}"
    );
    assert!(proxy.connections() > 10);
}

#[test]
fn bad_credentials_and_a_missing_bucket_are_one_clear_error_each() {
    let Some(moto) = Moto::start(false) else {
        return;
    };
    let s3 = S3Backend::new(&moto.options("no-such-bucket", "ds")).unwrap();
    let err = s3.check().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(
        err.to_string().contains("the bucket does not exist")
            && err.to_string().contains("s3://no-such-bucket/ds"),
        "{err}"
    );
    let err = s3.get("x", 10).unwrap_err();
    assert!(
        err.to_string().contains("the bucket does not exist"),
        "{err}"
    );

    let Some(strict) = Moto::start(true) else {
        return;
    };
    let s3 = S3Backend::new(&strict.options("any-bucket", "")).unwrap();
    let err = s3.check().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(err.to_string().contains("check the access key"), "{err}");
    let err = s3.put("x", b("x")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");

    // Not a bucket URL at all.
    for url in [
        "s3://",
        "s3://Bad_Bucket/x",
        "http://x/y",
        "s3://ok-bucket/../x",
    ] {
        let mut o = moto.options("x", "");
        o.url = url.into();
        let err = S3Backend::new(&o).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{url}: {err}");
    }
}

/// Chunks on S3: stored once while fresh, stored again (a new
/// Last-Modified) when older than the writer's fresh-after time, read back
/// and checked (plain and encrypted), damage refused, and a sweep that
/// removes only unmarked chunks older than its cutoff.
#[test]
fn chunks_on_s3() {
    let Some(moto) = Moto::start(false) else {
        return;
    };
    moto.create_bucket("vmbackup-chunks");
    for encrypted in [false, true] {
        let prefix = if encrypted { "enc" } else { "plain" };
        let backend: Arc<dyn Backend> =
            Arc::new(S3Backend::new(&moto.options("vmbackup-chunks", prefix)).unwrap());
        let crypt = encrypted.then(|| Arc::new(Crypt::new(&MasterKey::generate())));
        let store = ChunkStore::on_backend(backend.clone(), 1 << 16, ChunkHash::Blake3, crypt);
        let start = backend.now().unwrap();
        let store = store.with_fresh_after(start);
        let data: Vec<Vec<u8>> = (0..3u8)
            .map(|i| {
                (0..60_000u32)
                    .map(|j| (j * 7 + u32::from(i)) as u8)
                    .collect()
            })
            .collect();
        let digests: Vec<_> = data.iter().map(|d| store.digest_of(d)).collect();
        for (d, bytes) in digests.iter().zip(&data) {
            let first = store.insert(d, bytes).unwrap();
            assert!(first.new && first.stored > 0);
            assert!(!store.insert(d, bytes).unwrap().new, "fresh: deduplicated");
            assert_eq!(&store.load(d).unwrap(), bytes);
        }
        let key = |d: &datastore::Digest| format!(".chunks/{}/{}", &d.to_hex()[..2], d.to_hex());
        let stored = backend.head(&key(&digests[0])).unwrap().unwrap();
        if encrypted {
            let raw = backend.get(&key(&digests[0]), 1 << 20).unwrap().unwrap().0;
            assert!(!raw.windows(64).any(|w| data[0].windows(64).any(|x| x == w)));
        }
        // A writer that began later does not trust the old chunk: stored
        // again, its Last-Modified moves.
        std::thread::sleep(Duration::from_millis(1100));
        let later = store.with_fresh_after(backend.now().unwrap());
        assert!(later.insert(&digests[0], &data[0]).unwrap().new);
        let again = backend.head(&key(&digests[0])).unwrap().unwrap();
        assert!(
            again.modified > stored.modified,
            "{again:?} after {stored:?}"
        );
        // Damage is refused.
        backend
            .put(&key(&digests[1]), Bytes::from_static(b"VBDSCHK1garbage"))
            .unwrap();
        let err = store.load(&digests[1]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        assert!(err.to_string().contains(&digests[1].to_hex()), "{err}");
        backend.delete(&key(&digests[1])).unwrap();
        let err = store.load(&digests[1]).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        // Sweep: chunk 2 unmarked and older than the cutoff goes; chunk 0
        // is marked; nothing younger than the cutoff goes.
        std::thread::sleep(Duration::from_millis(1100));
        let cutoff = backend.now().unwrap();
        let live: std::collections::HashSet<_> = [digests[0]].into();
        let young = store.digest_of(b"young chunk");
        store
            .with_fresh_after(cutoff)
            .insert(&young, b"young chunk")
            .unwrap();
        let (removed, _, kept, _) = store.sweep(&live, cutoff).unwrap();
        assert_eq!((removed, kept), (1, 2), "{prefix}");
        assert!(backend.head(&key(&digests[2])).unwrap().is_none());
        assert_eq!(store.load(&digests[0]).unwrap(), data[0]);
        assert_eq!(store.load(&young).unwrap(), b"young chunk");
        assert_eq!(store.usage().unwrap().0, 2);
    }
}

/// Synchronous backend calls made from inside an async task (as the CLI
/// and tests call `prune`, `gc` or `delete_snapshot`) keep working past
/// tokio's cooperative budget of ~128 polls per task: waiting on the
/// request's join handle used to spend it, and the deferred wake-up then
/// never came (the caller's runtime was blocked by the wait).
#[tokio::test]
async fn s3_calls_from_an_async_task_do_not_stall() {
    let Some(moto) = Moto::start(false) else {
        return;
    };
    moto.create_bucket("vmbackup-async");
    let s3 = S3Backend::new(&moto.options("vmbackup-async", "p")).unwrap();
    s3.put("x", b("x")).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(120)).is_err() {
            eprintln!("s3_calls_from_an_async_task_do_not_stall: stalled");
            std::process::exit(101);
        }
    });
    for _ in 0..400 {
        assert!(s3.head("x").unwrap().is_some());
    }
    done_tx.send(()).unwrap();
}
