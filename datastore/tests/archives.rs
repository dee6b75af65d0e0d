//! File archives in the datastore, on every storage the suite runs on
//! (plain, encrypted, S3): entries and content round trip, an incremental
//! reuses unchanged files' chunks without their bytes, GC keeps what any
//! snapshot's archive names, verify finds a damaged index, and bad input
//! is refused.

use crate::common;

use std::time::Duration;

use common::*;
use datastore::VerifyScope;
use provider_api::*;

fn file(path: &str, size: usize) -> FileEntry {
    let mut e = FileEntry::new(path.as_bytes().to_vec(), FileKind::File);
    e.size = size as u64;
    e.mode = 0o644;
    e.mtime_ns = 1_700_000_000_123_456_789;
    e.inode = size as u64 + 1;
    e
}

fn content(path: &str, size: usize) -> Vec<u8> {
    noise(
        blake3::hash(path.as_bytes()).as_bytes()[0] as u64 + size as u64,
        size,
    )
}

/// Files of the tree: (path, size); sizes cross the CDC bounds of the
/// suite's 4 KiB chunks (max 4 KiB, average 1 KiB).
fn tree() -> Vec<(String, usize)> {
    let mut v = vec![("a/big".to_string(), 40_000), ("a/empty".to_string(), 0)];
    for i in 0..60 {
        v.push((format!("b/f{i:02}"), 100 + i * 37));
    }
    v.push(("c/last".into(), 4096));
    v
}

async fn write(
    ds: &datastore::Datastore,
    time: i64,
    previous: Option<&SnapshotId>,
    changed: &[&str],
) -> (SnapshotInfo, ArchiveStats) {
    let mut snap = ds.begin_snapshot(spec("ct", time)).await.unwrap();
    let mut w = snap.begin_file_archive("root", previous).await.unwrap();
    let changed: Vec<String> = changed.iter().map(|c| c.to_string()).collect();
    let stats = tokio::task::spawn_blocking(move || {
        w.add(FileEntry::new(Vec::new(), FileKind::Dir)).unwrap();
        let mut dir = String::new();
        for (p, size) in tree() {
            let d = p.split('/').next().unwrap().to_string();
            if d != dir {
                w.add(FileEntry::new(d.as_bytes().to_vec(), FileKind::Dir))
                    .unwrap();
                dir = d;
            }
            let mut e = file(&p, size);
            let is_changed = changed.contains(&p);
            if let Some(prev) = w.previous(p.as_bytes()).unwrap()
                && !is_changed
            {
                w.reuse(e, &prev).unwrap();
                continue;
            }
            if is_changed {
                e.mtime_ns += 1;
            }
            w.add(e).unwrap();
            for piece in content(&p, size).chunks(3000) {
                w.write(piece).unwrap();
            }
        }
        let mut l = FileEntry::new(b"c/link".to_vec(), FileKind::Symlink);
        l.link = b"../a/big".to_vec();
        w.add(l).unwrap();
        w.finish().unwrap()
    })
    .await
    .unwrap();
    (snap.commit(vec![]).await.unwrap(), stats)
}

async fn check(ds: &datastore::Datastore, id: &SnapshotId) {
    let r = ds.open_snapshot(id).await.unwrap();
    assert_eq!(r.file_archives(), vec!["root".to_string()]);
    let a = r.open_file_archive("root").await.unwrap();
    tokio::task::spawn_blocking(move || {
        let entries: Vec<FileEntry> = a.entries().unwrap().map(|e| e.unwrap()).collect();
        assert_eq!(entries.len() as u64, a.len());
        let files = tree();
        for (p, size) in &files {
            let e = entries.iter().find(|e| e.path == p.as_bytes()).unwrap();
            assert_eq!(e.size, *size as u64, "{p}");
            let got = a.read(e, 0, *size).unwrap();
            assert!(got == content(p, *size), "{p}");
            if *size > 10 {
                // A read inside the file, across chunk boundaries.
                assert_eq!(
                    a.read(e, 7, size - 10).unwrap(),
                    content(p, *size)[7..size - 3]
                );
            }
            assert!(a.read(e, 1, *size).is_err(), "past the end of {p}");
        }
        let l = entries.iter().find(|e| e.path == b"c/link").unwrap();
        assert_eq!((l.kind, &l.link[..]), (FileKind::Symlink, &b"../a/big"[..]));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_archives_round_trip_reuse_unchanged_files_and_survive_gc() {
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let (s1, st1) = write(&ds, 1000, None, &[]).await;
    assert_eq!(st1.files_reused, 0);
    check(&ds, &s1.id).await;
    let (s2, st2) = write(&ds, 2000, Some(&s1.id), &["b/f10", "b/f11"]).await;
    assert_eq!(st2.files_read, 2, "{st2:?}");
    assert_eq!(st2.files_reused as usize, tree().len() - 2, "{st2:?}");
    assert_eq!(st2.bytes_read, (100 + 10 * 37) + (100 + 11 * 37), "{st2:?}");
    check(&ds, &s2.id).await;
    // The first snapshot goes; GC must keep every chunk the second reuses.
    ds.delete_snapshot(&s1.id).unwrap();
    let gc = ds.gc(Duration::ZERO).unwrap();
    assert!(
        gc.removed_chunks > 0,
        "the rewritten files' old chunks go: {gc:?}"
    );
    check(&ds, &s2.id).await;
    assert!(ds.verify(VerifyScope::All).unwrap().is_ok());
}

#[tokio::test]
async fn damaged_archive_chunks_and_indexes_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let (s1, _) = write(&ds, 1000, None, &[]).await;
    // Damage one chunk of the data stream: verify names the snapshot's
    // chunk, reading the file that holds it fails.
    let snap_dir = ds.root().join(&s1.id.0);
    let names = raw_names(&ds, &snap_dir);
    assert!(names.iter().any(|n| n == "root.data.didx"), "{names:?}");
    assert!(names.iter().any(|n| n == "root.catalog.didx"), "{names:?}");
    let idx = raw_read(&ds, &snap_dir.join("root.data.didx"));
    let mut bad = idx.clone();
    let at = bad.len() - 40;
    bad[at] ^= 1;
    raw_write(&ds, &snap_dir.join("root.data.didx"), &bad);
    let rep = ds.verify(VerifyScope::All).unwrap();
    assert!(!rep.is_ok());
    assert!(
        rep.errors.iter().any(|e| e.contains("root.data.didx")),
        "{:?}",
        rep.errors
    );
    let r = ds.open_snapshot(&s1.id).await.unwrap();
    assert!(r.open_file_archive("root").await.is_err());
    assert_eq!(
        r.open_file_archive("nope").await.err().unwrap().kind(),
        ErrorKind::NotFound
    );
}

#[tokio::test]
async fn archive_writers_refuse_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let mut snap = ds.begin_snapshot(spec("ct", 1000)).await.unwrap();
    let mut w = snap.begin_file_archive("root", None).await.unwrap();
    assert!(
        snap.begin_file_archive("root", None).await.is_err(),
        "twice"
    );
    tokio::task::spawn_blocking(move || {
        w.add(FileEntry::new(b"b".to_vec(), FileKind::Dir)).unwrap();
        let out_of_order = w
            .add(FileEntry::new(b"a".to_vec(), FileKind::Dir))
            .unwrap_err();
        assert!(
            out_of_order.to_string().contains("walk order"),
            "{out_of_order}"
        );
        let dotdot = w
            .add(FileEntry::new(b"c/../x".to_vec(), FileKind::Dir))
            .unwrap_err();
        assert!(dotdot.to_string().contains("relative"), "{dotdot}");
        w.add(file("d", 10)).unwrap();
        assert!(w.write(&[0; 11]).is_err(), "more than its size");
        w.write(&[0; 5]).unwrap();
        let short = w.add(file("e", 1)).unwrap_err();
        assert!(short.to_string().contains("missing"), "{short}");
    })
    .await
    .unwrap();
    // An unfinished archive blocks the commit.
    let err = snap.commit(vec![]).await.unwrap_err();
    assert!(err.to_string().contains("not finished"), "{err}");
}
