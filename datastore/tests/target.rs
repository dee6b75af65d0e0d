//! The Target contract on a datastore: full, incremental, base images,
//! atomicity, bad input, prune, GC and verify.

use crate::common;

use std::time::Duration;

use common::*;
use datastore::{KeepOptions, VerifyScope};
use provider_api::*;

#[tokio::test]
async fn full_backup_round_trip_with_blobs_and_zero_map() {
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let size = 10 * CS + 123;
    let mut model = vec![0u8; size as usize];
    let ops = vec![
        Op::Data(100, noise(1, 5000)),
        Op::Zero(5100, 3 * CS),
        Op::Data(5100 + 3 * CS, noise(2, 3 * CS as usize)),
        Op::Data(size - 50, vec![9; 50]),
    ];
    apply(&mut model, &ops);
    let mut snap = ds.begin_snapshot(spec("vm-1", 1000)).await.unwrap();
    snap.put_config(
        ConfigKind::Guest,
        ConfigBlob::json(&serde_json::json!({"cpus": 2})),
    )
    .await
    .unwrap();
    snap.put_metadata(serde_json::json!({"base": "img-1"}))
        .await
        .unwrap();
    let stats = write_volume(&mut snap, vspec("sys", size, StartFrom::Empty), &ops)
        .await
        .unwrap();
    assert_eq!(stats.bytes_written, 5000 + 3 * CS + 3 * CS + 50);
    assert!(stats.bytes_new > 0 && stats.bytes_stored > 0);
    // Not visible before commit.
    assert!(ds.list_snapshots(None, None).await.unwrap().is_empty());
    let info = snap.commit(vec!["w".into()]).await.unwrap();
    assert_eq!(info.id.0, "scp/vm-1/1970-01-01T00:16:40Z");
    assert_eq!(info.warnings, vec!["w".to_string()]);

    let list = ds
        .list_snapshots(Some("scp"), Some(&GuestId::from("vm-1")))
        .await
        .unwrap();
    assert_eq!(list, vec![info.clone()]);
    assert_eq!(
        read_all(&ds, &info.id, "sys", Layer::Merged).await.unwrap(),
        model
    );

    let r = ds.open_snapshot(&info.id).await.unwrap();
    assert_eq!(
        r.config(ConfigKind::Guest).await.unwrap().unwrap().data,
        serde_json::to_vec_pretty(&serde_json::json!({"cpus": 2})).unwrap()
    );
    assert_eq!(r.config(ConfigKind::Firewall).await.unwrap(), None);
    assert_eq!(
        r.metadata().await.unwrap(),
        serde_json::json!({"base": "img-1"})
    );
    // Zero map: every zero region reads as zeroes, and chunks 2..=3 (fully
    // inside the write_zeroes) and the untouched chunks are zero.
    let v = r.open_volume("sys", Layer::Merged).await.unwrap();
    let regions = v.regions(0, size).await.unwrap();
    assert_eq!(regions.first().unwrap().extent.offset, 0);
    assert_eq!(regions.iter().map(|r| r.extent.length).sum::<u64>(), size);
    for w in regions.windows(2) {
        assert_eq!(w[0].extent.end(), w[1].extent.offset);
        assert_ne!(w[0].kind, w[1].kind);
    }
    for reg in &regions {
        if reg.kind == RegionKind::Zero {
            let s = reg.extent.offset as usize;
            assert!(
                model[s..s + reg.extent.length as usize]
                    .iter()
                    .all(|b| *b == 0)
            );
        }
    }
    assert!(
        regions
            .iter()
            .any(|r| r.kind == RegionKind::Zero && r.extent.length >= 2 * CS)
    );
    // Out-of-range reads are refused.
    assert_eq!(
        v.read_at(size - 1, 2).await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        r.open_volume("nope", Layer::Merged)
            .await
            .err()
            .unwrap()
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        r.open_volume("sys", Layer::Base)
            .await
            .err()
            .unwrap()
            .kind(),
        ErrorKind::InvalidInput
    );
}

#[tokio::test]
async fn zero_chunks_are_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let size = 64 * CS;
    let ops = vec![
        Op::Data(0, vec![0; (8 * CS + 7) as usize]),
        Op::Zero(8 * CS + 7, size - 8 * CS - 7),
    ];
    let info = backup(&ds, "vm", 1, vspec("sys", size, StartFrom::Empty), &ops)
        .await
        .unwrap();
    assert_eq!(ds.stats().unwrap().chunks, 0);
    let r = ds
        .open_snapshot(&info.id)
        .await
        .unwrap()
        .open_volume("sys", Layer::Merged)
        .await
        .unwrap();
    assert_eq!(
        r.regions(0, size).await.unwrap(),
        vec![Region {
            extent: Extent::new(0, size),
            kind: RegionKind::Zero
        }]
    );
}

#[tokio::test]
async fn writes_must_ascend_and_stay_inside() {
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let mut snap = ds.begin_snapshot(spec("vm", 1)).await.unwrap();
    let mut w = snap
        .begin_volume(vspec("sys", 4 * CS, StartFrom::Empty))
        .await
        .unwrap();
    w.write(CS, vec![1; 10].into()).await.unwrap();
    assert_eq!(
        w.write(0, vec![1; 10].into()).await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        w.write_zeroes(3 * CS, CS + 1).await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    drop(w);
    // A begun but unfinished volume cannot be committed.
    assert_eq!(
        snap.commit(vec![]).await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert!(ds.list_snapshots(None, None).await.unwrap().is_empty());
}

#[tokio::test]
async fn incremental_merges_partly_dirty_chunks_and_dedups() {
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let size = 16 * CS;
    let mut model = noise(5, size as usize);
    let full = vec![Op::Data(0, model.clone())];
    let s1 = backup(&ds, "vm", 1, vspec("sys", size, StartFrom::Empty), &full)
        .await
        .unwrap();
    // Dirty a few bytes inside chunk 3 and a range across chunks 7..9.
    let ops = vec![
        Op::Data(3 * CS + 10, vec![0xAA; 20]),
        Op::Data(7 * CS + 100, noise(9, 2 * CS as usize)),
    ];
    apply(&mut model, &ops);
    let mut snap = ds.begin_snapshot(spec("vm", 2)).await.unwrap();
    let st = write_volume(
        &mut snap,
        vspec("sys", size, StartFrom::Previous(s1.id.clone())),
        &ops,
    )
    .await
    .unwrap();
    let s2 = snap.commit(vec![]).await.unwrap();
    // Only the 4 touched chunks are new.
    assert_eq!(st.bytes_new, 4 * CS);
    assert_eq!(
        read_all(&ds, &s2.id, "sys", Layer::Merged).await.unwrap(),
        model
    );
    // Every snapshot is full: deleting the first leaves the second intact.
    ds.delete_snapshot(&s1.id).unwrap();
    ds.gc(Duration::ZERO).unwrap();
    assert_eq!(
        read_all(&ds, &s2.id, "sys", Layer::Merged).await.unwrap(),
        model
    );
    assert!(ds.verify(VerifyScope::All).unwrap().is_ok());
}

#[tokio::test]
async fn incremental_across_a_resize() {
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let size1 = 5 * CS + 300;
    let model1 = noise(11, size1 as usize);
    let s1 = backup(
        &ds,
        "vm",
        1,
        vspec("sys", size1, StartFrom::Empty),
        &[Op::Data(0, model1.clone())],
    )
    .await
    .unwrap();
    // Grow: the old partial chunk is padded with zeroes.
    let size2 = 9 * CS;
    let mut model2 = model1.clone();
    model2.resize(size2 as usize, 0);
    let ops = vec![Op::Data(8 * CS, vec![1; 10])];
    apply(&mut model2, &ops);
    let s2 = backup(
        &ds,
        "vm",
        2,
        vspec("sys", size2, StartFrom::Previous(s1.id.clone())),
        &ops,
    )
    .await
    .unwrap();
    assert_eq!(
        read_all(&ds, &s2.id, "sys", Layer::Merged).await.unwrap(),
        model2
    );
    // Shrink into the middle of a chunk.
    let size3 = 2 * CS + 17;
    let s3 = backup(
        &ds,
        "vm",
        3,
        vspec("sys", size3, StartFrom::Previous(s2.id.clone())),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        read_all(&ds, &s3.id, "sys", Layer::Merged).await.unwrap(),
        model2[..size3 as usize]
    );
}

#[tokio::test]
async fn base_images_are_stored_once_and_read_as_layers() {
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let bid = BaseImageId("img-1".into());
    let size = 8 * CS;
    let base = noise(21, size as usize);
    let catalog = ds.base_images("scp");
    assert!(!catalog.has_base_image(&bid).await.unwrap());

    let mut model = base.clone();
    let overlay = vec![
        Op::Data(2 * CS, vec![5; CS as usize]),
        Op::Data(6 * CS + 1, vec![6; 10]),
    ];
    apply(&mut model, &overlay);
    let mut snap = ds.begin_snapshot(spec("vm-a", 1)).await.unwrap();
    let mut bw = snap
        .begin_base_image(&bid, size)
        .await
        .unwrap()
        .expect("not stored yet");
    bw.write(0, base.clone().into()).await.unwrap();
    bw.finish().await.unwrap();
    assert!(catalog.has_base_image(&bid).await.unwrap());
    let mut vs = vspec("sys", size, StartFrom::BaseImage(bid.clone()));
    vs.base = Some(bid.clone());
    let st = write_volume(&mut snap, vs.clone(), &overlay).await.unwrap();
    assert_eq!(st.bytes_new, 2 * CS, "only the overlay's chunks are new");
    let a = snap.commit(vec![]).await.unwrap();
    assert_eq!(a.volumes[0].base, Some(bid.clone()));

    // A second guest linked to the same image: not stored again.
    let mut snap = ds.begin_snapshot(spec("vm-b", 1)).await.unwrap();
    assert!(snap.begin_base_image(&bid, size).await.unwrap().is_none());
    let st = write_volume(&mut snap, vs, &[]).await.unwrap();
    assert_eq!(st.bytes_new, 0);
    let b = snap.commit(vec![]).await.unwrap();

    assert_eq!(
        read_all(&ds, &a.id, "sys", Layer::Merged).await.unwrap(),
        model
    );
    assert_eq!(
        read_all(&ds, &a.id, "sys", Layer::Base).await.unwrap(),
        base
    );
    assert_eq!(
        read_all(&ds, &b.id, "sys", Layer::Merged).await.unwrap(),
        base
    );
    let r = ds.open_snapshot(&a.id).await.unwrap();
    let ov = r.open_volume("sys", Layer::Overlay).await.unwrap();
    let regions = ov.regions(0, size).await.unwrap();
    let data: Vec<Extent> = regions
        .iter()
        .filter(|r| r.kind == RegionKind::Data)
        .map(|r| r.extent)
        .collect();
    assert_eq!(data, vec![Extent::new(2 * CS, CS), Extent::new(6 * CS, CS)]);
    assert!(regions.iter().all(|r| r.kind != RegionKind::Zero));
    assert_eq!(ov.read_at(2 * CS, 4).await.unwrap()[..], [5, 5, 5, 5]);

    // A base image in use cannot be deleted; GC keeps its chunks even when
    // no snapshot remains, until it is deleted.
    drop(ov);
    drop(r);
    assert_eq!(
        ds.delete_base_image("scp", &bid).unwrap_err().kind(),
        ErrorKind::Refused
    );
    ds.delete_snapshot(&a.id).unwrap();
    ds.delete_snapshot(&b.id).unwrap();
    ds.gc(Duration::ZERO).unwrap();
    assert_eq!(ds.stats().unwrap().chunks, 8);
    assert_eq!(ds.stats().unwrap().base_images, 1);
    assert!(catalog.has_base_image(&bid).await.unwrap());
    ds.delete_base_image("scp", &bid).unwrap();
    assert!(!catalog.has_base_image(&bid).await.unwrap());
    ds.gc(Duration::ZERO).unwrap();
    assert_eq!(ds.stats().unwrap().chunks, 0);
}

#[tokio::test]
async fn abort_and_drop_leave_nothing_and_same_second_does_not_collide() {
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let mut snap = ds.begin_snapshot(spec("vm", 7)).await.unwrap();
    write_volume(
        &mut snap,
        vspec("sys", CS, StartFrom::Empty),
        &[Op::Data(0, vec![1; 10])],
    )
    .await
    .unwrap();
    snap.abort().await.unwrap();
    let snap = ds.begin_snapshot(spec("vm", 7)).await.unwrap();
    drop(snap);
    assert!(ds.list_snapshots(None, None).await.unwrap().is_empty());
    let group = ds.root().join("scp/vm");
    assert_eq!(
        raw_names(&ds, &group)
            .iter()
            .filter(|n| n.starts_with(".tmp"))
            .count(),
        0
    );

    let a = backup(&ds, "vm", 7, vspec("sys", CS, StartFrom::Empty), &[])
        .await
        .unwrap();
    let b = backup(&ds, "vm", 7, vspec("sys", CS, StartFrom::Empty), &[])
        .await
        .unwrap();
    assert_ne!(a.id, b.id);
    assert_eq!(ds.list_snapshots(None, None).await.unwrap().len(), 2);
    // Odd names are path-safe.
    let mut snap = ds.begin_snapshot(spec("../etc/x y", 7)).await.unwrap();
    write_volume(&mut snap, vspec("/dev/sda", CS, StartFrom::Empty), &[])
        .await
        .unwrap();
    let c = snap.commit(vec![]).await.unwrap();
    assert!(c.id.0.starts_with("scp/%2E.%2Fetc%2Fx%20y/"));
    assert_eq!(c.guest.0, "../etc/x y");
    assert_eq!(
        read_all(&ds, &c.id, "/dev/sda", Layer::Merged)
            .await
            .unwrap(),
        vec![0; CS as usize]
    );
    assert_eq!(
        ds.open_snapshot(&SnapshotId("../x/y".into()))
            .await
            .err()
            .unwrap()
            .kind(),
        ErrorKind::InvalidInput
    );
}

#[tokio::test]
async fn corruption_is_reported_and_fails_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let size = 4 * CS;
    let data = noise(3, size as usize);
    let s1 = backup(
        &ds,
        "vm",
        1,
        vspec("sys", size, StartFrom::Empty),
        &[Op::Data(0, data.clone())],
    )
    .await
    .unwrap();
    assert!(
        ds.verify(VerifyScope::Snapshot(s1.id.clone()))
            .unwrap()
            .is_ok()
    );
    assert_eq!(
        ds.list_snapshots(None, None).await.unwrap()[0].verified,
        Some(true)
    );

    // Flip a byte in the second chunk.
    let digest = ds.chunks().digest_of(&data[CS as usize..2 * CS as usize]);
    let path = ds.chunks().path(&digest);
    let mut bytes = raw_read(&ds, &path);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    raw_write(&ds, &path, &bytes);

    let r = ds
        .open_snapshot(&s1.id)
        .await
        .unwrap()
        .open_volume("sys", Layer::Merged)
        .await
        .unwrap();
    let err = r.read_at(CS, 10).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains(&digest.to_hex()));
    assert!(err.to_string().contains(&path.display().to_string()));
    assert_eq!(r.read_at(0, 10).await.unwrap()[..], data[..10]);
    drop(r);

    let rep = ds.verify(VerifyScope::All).unwrap();
    assert!(!rep.is_ok());
    assert_eq!(rep.bad_chunks.len(), 1);
    assert_eq!(rep.bad_chunks[0].digest, digest.to_hex());
    assert_eq!(rep.bad_chunks[0].path, path.display().to_string());
    let listed = ds.list_snapshots(None, None).await.unwrap();
    assert_eq!(listed[0].verified, Some(false));
    // A failed snapshot is never an incremental base.
    assert!(
        ds.latest_good_snapshot("scp", &GuestId::from("vm"))
            .await
            .unwrap()
            .is_none()
    );
    let mut snap = ds.begin_snapshot(spec("vm", 2)).await.unwrap();
    let err = snap
        .begin_volume(vspec("sys", size, StartFrom::Previous(s1.id.clone())))
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Refused);
    drop(snap);

    // A truncated index and a damaged blob are caught too.
    let s2 = backup(
        &ds,
        "vm",
        3,
        vspec("sys", size, StartFrom::Empty),
        &[Op::Data(0, vec![1; 100])],
    )
    .await
    .unwrap();
    let sdir = ds.root().join(&s2.id.0);
    let idx = sdir.join("sys.fidx");
    let bytes = raw_read(&ds, &idx);
    raw_write(&ds, &idx, &bytes[..bytes.len() - 1]);
    let err = ds
        .open_snapshot(&s2.id)
        .await
        .unwrap()
        .open_volume("sys", Layer::Merged)
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("sys.fidx"), "{err}");
    // A damaged manifest: the snapshot is not listed, and verify reports it.
    raw_write(
        &ds,
        &sdir.join("index.json"),
        b"{\"checksum\":\"0\",\"manifest\":{}}",
    );
    assert_eq!(ds.list_snapshots(None, None).await.unwrap().len(), 1);
    let rep = ds.verify(VerifyScope::Snapshot(s2.id.clone())).unwrap();
    assert!(
        rep.errors.iter().any(|e| e.contains("index.json")),
        "{:?}",
        rep.errors
    );
}

#[tokio::test]
async fn blob_damage_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let mut snap = ds.begin_snapshot(spec("vm", 1)).await.unwrap();
    snap.put_config(
        ConfigKind::Firewall,
        ConfigBlob {
            content_type: "text/plain".into(),
            data: b"allow all".to_vec(),
        },
    )
    .await
    .unwrap();
    let s = snap.commit(vec![]).await.unwrap();
    let blob = ds.root().join(&s.id.0).join("firewall.conf.blob");
    raw_write(&ds, &blob, b"allow none");
    let err = ds
        .open_snapshot(&s.id)
        .await
        .unwrap()
        .config(ConfigKind::Firewall)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("firewall.conf.blob"));
    assert!(!ds.verify(VerifyScope::All).unwrap().is_ok());
}

#[tokio::test]
async fn prune_protect_delete_and_gc() {
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let g = GuestId::from("vm");
    let mut ids = Vec::new();
    for i in 0..5 {
        let s = backup(
            &ds,
            "vm",
            1_700_000_000 + i * 86_400,
            vspec("sys", 2 * CS, StartFrom::Empty),
            &[Op::Data(0, noise(100 + i as u64, CS as usize))],
        )
        .await
        .unwrap();
        ids.push(s.id);
    }
    ds.protect(&ids[0], true).unwrap();
    let keep = KeepOptions {
        keep_last: Some(2),
        ..Default::default()
    };
    let plan = ds.prune("scp", &g, &keep, true).unwrap();
    assert_eq!(
        plan.iter().map(|p| p.1).collect::<Vec<_>>(),
        vec![true, false, false, true, true]
    );
    assert_eq!(
        ds.list_snapshots(None, None).await.unwrap().len(),
        5,
        "dry run deletes nothing"
    );
    // A snapshot being read cannot be deleted.
    let reader = ds.open_snapshot(&ids[1]).await.unwrap();
    assert_eq!(
        ds.delete_snapshot(&ids[1]).unwrap_err().kind(),
        ErrorKind::Refused
    );
    ds.prune("scp", &g, &keep, false).unwrap();
    let left: Vec<_> = ds
        .list_snapshots(None, None)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(
        left,
        vec![
            ids[0].clone(),
            ids[1].clone(),
            ids[3].clone(),
            ids[4].clone()
        ]
    );
    drop(reader);
    assert_eq!(
        ds.delete_snapshot(&ids[0]).unwrap_err().kind(),
        ErrorKind::Refused,
        "protected"
    );
    ds.delete_snapshot(&ids[1]).unwrap();
    assert_eq!(
        ds.delete_snapshot(&ids[1]).unwrap_err().kind(),
        ErrorKind::NotFound
    );

    // A grace period keeps young unreferenced chunks; without it they go.
    assert_eq!(ds.stats().unwrap().chunks, 5);
    let st = ds.gc(Duration::from_secs(3600)).unwrap();
    assert_eq!(st.removed_chunks, 0);
    let st = ds.gc(Duration::ZERO).unwrap();
    assert_eq!(st.removed_chunks, 2);
    assert_eq!(ds.stats().unwrap().chunks, 3);
    assert!(ds.verify(VerifyScope::All).unwrap().is_ok());
}

/// Object stores: a deletion holds a lease on the snapshot, and a reader
/// meeting it waits — for the manifest to go (then "does not exist"), for
/// the lease to be released, or for a crashed deleter's lease to lapse —
/// and never reports a listed snapshot missing because of a dead host.
/// (A local deletion's `flock` dies with its process: nothing to wait.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_wait_out_deletions_and_crashed_deleters() {
    use datastore::backend::{KeptLease, Lease};
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let Some(b) = ds.backend().cloned() else {
        return;
    };
    let data = noise(7, 3 * CS as usize);
    let mut ids = Vec::new();
    for t in 0..3 {
        let s = backup(
            &ds,
            "vm",
            1_700_000_000 + t,
            vspec("sys", 3 * CS, StartFrom::Empty),
            &[Op::Data(0, data.clone())],
        )
        .await
        .unwrap();
        ids.push(s.id);
    }
    let snap_dir = |id: &SnapshotId| ds.root().join(&id.0);
    let delete_key =
        |id: &SnapshotId| format!(".locks/shared/{}/delete", raw_key(&ds, &snap_dir(id)));
    let ttl = Duration::from_secs(2);

    // 1. A deleter that crashed after taking its lease: the snapshot stays
    //    listed and readable once the lease lapses.
    let crashed = Lease::acquire(b.clone(), &delete_key(&ids[0]), "delete", ttl).unwrap();
    drop(crashed); // not released: what a killed process leaves
    let t = std::time::Instant::now();
    assert_eq!(
        read_all(&ds, &ids[0], "sys", Layer::Merged).await.unwrap(),
        data
    );
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "it waited for the lapse"
    );
    ds.delete_snapshot(&ids[0]).unwrap();

    // 2. A live deletion that completes: the reader gets NotFound as soon
    //    as the manifest is gone, not after a lease lifetime.
    let live = KeptLease::acquire(b.clone(), &delete_key(&ids[1]), "delete", ttl).unwrap();
    let manifest = snap_dir(&ids[1]).join("index.json");
    let (ds2, m2) = (ds.clone(), manifest.clone());
    let deleter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        raw_remove(&ds2, &m2);
        drop(live);
    });
    let err = match ds.open_snapshot(&ids[1]).await {
        Err(e) => e,
        Ok(_) => panic!("a deleted snapshot opened"),
    };
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains(&ids[1].0), "{err}");
    deleter.join().unwrap();

    // 3. A live deletion that gives up (it saw this reader): the reader
    //    goes on as soon as the lease is released.
    let live = KeptLease::acquire(b.clone(), &delete_key(&ids[2]), "delete", ttl).unwrap();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(live);
    });
    assert_eq!(
        read_all(&ds, &ids[2], "sys", Layer::Merged).await.unwrap(),
        data
    );
    releaser.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_concurrent_with_backups_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let size = 32 * CS;
    let mut model = noise(1, size as usize);
    let mut prev = backup(
        &ds,
        "vm",
        0,
        vspec("sys", size, StartFrom::Empty),
        &[Op::Data(0, model.clone())],
    )
    .await
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = {
        let ds = ds.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                ds.gc(Duration::ZERO).unwrap();
                runs += 1;
            }
            runs
        })
    };
    for i in 1..30u64 {
        // Each backup rewrites a few chunks (some reverting to content an
        // earlier, deleted snapshot had) and deletes its predecessor.
        let o = (i * 5 % 30) * CS;
        let ops = vec![Op::Data(o, noise(i % 4, 2 * CS as usize + 3))];
        apply(&mut model, &ops);
        let s = backup(
            &ds,
            "vm",
            i as i64,
            vspec("sys", size, StartFrom::Previous(prev.id.clone())),
            &ops,
        )
        .await
        .unwrap();
        ds.delete_snapshot(&prev.id).unwrap();
        prev = s;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(gc.join().unwrap() > 0);
    assert_eq!(
        read_all(&ds, &prev.id, "sys", Layer::Merged).await.unwrap(),
        model
    );
    let rep = ds.verify(VerifyScope::All).unwrap();
    assert!(rep.is_ok(), "{rep:?}");
}

#[tokio::test]
async fn gc_spares_a_running_backup_and_its_base() {
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let size = 8 * CS;
    let mut model = noise(7, size as usize);
    let s1 = backup(
        &ds,
        "vm",
        1,
        vspec("sys", size, StartFrom::Empty),
        &[Op::Data(0, model.clone())],
    )
    .await
    .unwrap();
    let mut snap = ds.begin_snapshot(spec("vm", 2)).await.unwrap();
    let ops = vec![Op::Data(CS + 5, noise(8, 100))];
    apply(&mut model, &ops);
    write_volume(
        &mut snap,
        vspec("sys", size, StartFrom::Previous(s1.id.clone())),
        &ops,
    )
    .await
    .unwrap();
    // The incremental base cannot go while the backup runs.
    assert_eq!(
        ds.delete_snapshot(&s1.id).unwrap_err().kind(),
        ErrorKind::Refused
    );
    // A chunk that only the running backup references survives GC, and so
    // does its temp directory.
    let st = ds.gc(Duration::ZERO).unwrap();
    assert_eq!(st.removed_chunks, 0);
    assert_eq!(st.removed_temp_dirs, 0);
    let s2 = snap.commit(vec![]).await.unwrap();
    ds.delete_snapshot(&s1.id).unwrap();
    let st = ds.gc(Duration::ZERO).unwrap();
    assert_eq!(st.removed_chunks, 1, "only s1's version of chunk 1 goes");
    assert_eq!(
        read_all(&ds, &s2.id, "sys", Layer::Merged).await.unwrap(),
        model
    );
}

#[tokio::test]
async fn a_missing_base_chunk_fails_the_volume_not_silently() {
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let data = noise(4, 4 * CS as usize);
    let s1 = backup(
        &ds,
        "vm",
        1,
        vspec("sys", 4 * CS, StartFrom::Empty),
        &[Op::Data(0, data.clone())],
    )
    .await
    .unwrap();
    let d = ds.chunks().digest_of(&data[..CS as usize]);
    raw_remove(&ds, &ds.chunks().path(&d));
    let mut snap = ds.begin_snapshot(spec("vm", 2)).await.unwrap();
    let mut w = snap
        .begin_volume(vspec("sys", 4 * CS, StartFrom::Previous(s1.id)))
        .await
        .unwrap();
    // A partial write of chunk 0 needs the lost chunk to merge.
    w.write(10, vec![1; 10].into()).await.unwrap();
    w.write(2 * CS, vec![2; 10].into()).await.unwrap();
    let err = w.finish().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains(&d.to_hex()), "{err}");
    assert!(snap.commit(vec![]).await.is_err());
    assert_eq!(ds.list_snapshots(None, None).await.unwrap().len(), 1);
}

/// Everything the datastore creates is private to its owner (directories
/// 0700, files 0600), whatever the umask: backed-up disks are as secret as
/// the guests (issue 13, item 7).
#[cfg(unix)]
#[tokio::test]
async fn the_datastore_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    if on_s3() {
        // File modes are a local directory's; a bucket's access is its
        // policy's.
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ds");
    std::fs::create_dir(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ds = new_ds(dir.path()); // creates `<dir>/ds`, which exists (0755)
    backup(
        &ds,
        "vm1",
        1,
        vspec("disk0", 8 << 20, StartFrom::Empty),
        &[Op::Data(0, noise(1, 6 << 20))],
    )
    .await
    .unwrap();
    let mut seen = 0;
    let mut stack = vec![root.clone()];
    while let Some(p) = stack.pop() {
        let mode = std::fs::symlink_metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", p.display());
        seen += 1;
        if p.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    assert!(seen > 10, "only {seen} entries checked");
}

/// Chunks are named by the datastore's hash: BLAKE3 in a version 2
/// datastore (the default), SHA-256 in version 1, which earlier releases
/// read; each reopens with its own hash, and a config whose version and
/// hash disagree is refused.
#[tokio::test]
async fn chunk_names_follow_the_datastores_hash_and_version() {
    use datastore::{ChunkHash, Datastore, DatastoreOptions};
    let data = noise(41, 2 * CS as usize);
    let blake3_name = datastore::Digest(*blake3::hash(&data[..CS as usize]).as_bytes());
    let sha256_name = datastore::Digest::of(&data[..CS as usize]);
    for (hash, version, name, other) in [
        (ChunkHash::Blake3, 2, blake3_name, sha256_name),
        (ChunkHash::Sha256, 1, sha256_name, blake3_name),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ds");
        let options = DatastoreOptions {
            chunk_size: CS,
            chunk_hash: hash,
        };
        let ds = Datastore::create(&root, options).unwrap();
        let info = backup(
            &ds,
            "vm",
            1,
            vspec("sys", 2 * CS, StartFrom::Empty),
            &[Op::Data(0, data.clone())],
        )
        .await
        .unwrap();
        assert!(
            ds.chunks().path(&name).exists(),
            "{hash:?}: chunk by its name"
        );
        assert!(
            !ds.chunks().path(&other).exists(),
            "{hash:?}: not the other hash"
        );
        let cfg: serde_json::Value =
            datastore::manifest::load_sealed(&root.join(".datastore.json"), None).unwrap();
        assert_eq!(cfg["version"], version, "{cfg}");
        assert_eq!(cfg.get("chunk_hash").is_some(), version == 2, "{cfg}");

        let reopened = Datastore::open(&root).unwrap();
        assert_eq!(reopened.chunks().hash(), hash);
        let back = read_all(&reopened, &info.id, "sys", Layer::Merged)
            .await
            .unwrap();
        assert_eq!(back, data, "{hash:?}: bytes back");
        let report = reopened.verify(VerifyScope::All).unwrap();
        assert!(report.is_ok(), "{hash:?}: {report:?}");

        // Version and hash that disagree: refused, not misread.
        let mut bad = cfg.clone();
        if version == 2 {
            bad.as_object_mut().unwrap().remove("chunk_hash");
        } else {
            bad["chunk_hash"] = serde_json::json!("sha256");
        }
        datastore::manifest::store_sealed(&root.join(".datastore.json"), &bad, None).unwrap();
        let err = Datastore::open(&root).expect_err("refused");
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{}", err.report());
    }
}
