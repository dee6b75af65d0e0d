//! Unit tests of the disk model.

use super::*;

const MB: u64 = 1024 * 1024;

fn store() -> (tempfile::TempDir, DiskStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = DiskStore::open(dir.path()).expect("store");
    (dir, store)
}

#[test]
fn linked_disk_reads_through_and_snapshot_is_frozen() {
    let (_dir, store) = store();
    let base = store.create_image(4 * MB).unwrap();
    base.write(0, &Pattern::Text.generate(1, MB as usize))
        .unwrap();
    base.seal().unwrap();
    assert!(base.write(0, b"x").is_err());
    let disk = store.create_disk(8 * MB, Some(base.id())).unwrap();
    assert_eq!(
        disk.read(&View::Live, 0, 100).unwrap(),
        base.read(0, 100).unwrap()
    );

    // Partial write copies up the base block.
    disk.write(10, b"hello").unwrap();
    let head = disk.read(&View::Live, 0, 20).unwrap();
    assert_eq!(&head[10..15], b"hello");
    assert_eq!(&head[..10], &base.read(0, 10).unwrap()[..]);

    let before = disk.sha256(&View::Live).unwrap();
    disk.create_snapshot("s1", 1).unwrap();
    disk.write(0, &Pattern::Random.generate(2, 3 * BLOCK_SIZE as usize))
        .unwrap();
    disk.write(5 * MB, &Pattern::Random.generate(3, 100))
        .unwrap();
    let snap = View::Snapshot("s1".into());
    assert_eq!(disk.sha256(&snap).unwrap(), before);
    assert_ne!(disk.sha256(&View::Live).unwrap(), before);

    // CBT: blocks 0..3 and the block at 5 MiB changed since checkpoint 1.
    disk.create_snapshot("s2", 2).unwrap();
    let changed = disk.changed_since("s2", 1).unwrap();
    assert_eq!(changed.count(), 4);
    assert!(changed.get(0) && changed.get(2) && changed.get(5 * MB / BLOCK_SIZE));
    // Checkpoint 2 is newer than s1.
    assert!(disk.changed_since("s1", 2).is_err());

    // Allocation: overlay only vs with base.
    let own = disk.allocated_map(&snap, false).unwrap();
    assert_eq!(own.count(), 1);
    let all = disk.allocated_map(&snap, true).unwrap();
    assert_eq!(all.count(), MB / BLOCK_SIZE);

    // Revert brings s1's content back.
    disk.revert("s1").unwrap();
    assert_eq!(disk.sha256(&View::Live).unwrap(), before);
    // s2 still frozen at its own content.
    assert_ne!(disk.sha256(&View::Snapshot("s2".into())).unwrap(), before);
    disk.delete_snapshot("s1").unwrap();
    disk.delete_snapshot("s2").unwrap();
    assert!(disk.snapshot_ids().is_empty());

    // Base image cannot go while linked.
    assert!(store.delete_image(base.id()).is_err());
}

#[test]
fn state_survives_reopen() {
    let (dir, store) = store();
    let disk = store.create_disk(2 * MB, None).unwrap();
    disk.write(BLOCK_SIZE, &Pattern::Random.generate(9, 70_000))
        .unwrap();
    disk.create_snapshot("s", 7).unwrap();
    disk.write(BLOCK_SIZE, &[1u8; 10]).unwrap();
    let live = disk.sha256(&View::Live).unwrap();
    let snap = disk.sha256(&View::Snapshot("s".into())).unwrap();
    let id = disk.id().to_string();
    drop(disk);
    drop(store);
    let store = DiskStore::open(dir.path()).unwrap();
    let disk = store.disk(&id).unwrap();
    assert_eq!(disk.sha256(&View::Live).unwrap(), live);
    assert_eq!(disk.sha256(&View::Snapshot("s".into())).unwrap(), snap);
    assert_eq!(disk.snapshot_checkpoint("s").unwrap(), 7);
}

#[test]
fn reset_to_base_and_invalid_checkpoints() {
    let (_dir, store) = store();
    let base = store.create_image(MB).unwrap();
    base.write(0, &[7u8; 1000]).unwrap();
    base.seal().unwrap();
    let disk = store.create_disk(MB, Some(base.id())).unwrap();
    disk.write(0, &[1u8; 5000]).unwrap();
    disk.create_snapshot("a", 1).unwrap();
    disk.reset_to_base(None).unwrap();
    assert_eq!(disk.sha256(&View::Live).unwrap(), base.sha256().unwrap());
    disk.invalidate_checkpoints().unwrap();
    disk.create_snapshot("b", 2).unwrap();
    assert!(disk.changed_since("b", 1).is_err());
    assert!(disk.read(&View::Live, MB - 1, 2).is_err());
}

#[test]
fn resize_grows_in_place_and_keeps_the_base_image_link() {
    let (_dir, store) = store();
    let base = store.create_image(MB).unwrap();
    base.write(0, &Pattern::Text.generate(4, MB as usize))
        .unwrap();
    base.seal().unwrap();
    // Not a multiple of the block size: the old last block is short.
    let old = 2 * MB + 4096;
    let disk = store.create_disk(old, Some(base.id())).unwrap();
    disk.write(old - 3, b"end").unwrap();
    let before = disk.read(&View::Live, 0, old).unwrap();

    assert!(disk.resize(old - 1).is_err(), "shrinking is refused");
    disk.resize(old).unwrap(); // same size: nothing to do
    let new = 5 * MB;
    disk.resize(new).unwrap();
    assert_eq!(disk.size(), new);
    assert_eq!(disk.view_size(&View::Live).unwrap(), new);
    assert_eq!(disk.base_image().unwrap().id(), base.id());
    assert_eq!(store.disks_using(base.id()), vec![disk.id().to_string()]);
    let live = disk.read(&View::Live, 0, new).unwrap();
    assert_eq!(&live[..old as usize], &before[..]);
    assert!(live[old as usize..].iter().all(|b| *b == 0));
    // Base-image blocks still read through and are not copied up.
    assert_eq!(&live[..100], &base.read(0, 100).unwrap()[..]);
    assert_eq!(disk.allocated_map(&View::Live, false).unwrap().count(), 1);
    assert_eq!(
        disk.allocated_map(&View::Live, true).unwrap().count(),
        MB / BLOCK_SIZE + 1
    );
    // The whole new size is writable, the short block's tail included.
    disk.write(old, b"grown").unwrap();
    disk.write(new - 1, b"z").unwrap();
    assert!(disk.write(new, b"!").is_err());
    let live = disk.read(&View::Live, 0, new).unwrap();
    assert_eq!(&live[old as usize - 3..old as usize + 5], b"endgrown");
    assert_eq!(live[new as usize - 1], b'z');
    assert!(crate::disk::check_size(0).is_err());
    assert!(disk.resize(super::MAX_DISK_SIZE + 1).is_err());
}

#[test]
fn resize_keeps_snapshots_at_their_size_and_the_tail_is_not_dirty() {
    let (_dir, store) = store();
    let old = 2 * MB + 4096;
    let disk = store.create_disk(old, None).unwrap();
    disk.write(0, &Pattern::Random.generate(1, 3 * BLOCK_SIZE as usize))
        .unwrap();
    // The short last block holds data: preserving it after the disk grew
    // must keep only the snapshot's part of it.
    disk.write(old - 4096, &[9u8; 4096]).unwrap();
    disk.create_snapshot("before", 1).unwrap();
    let frozen = disk.sha256(&View::Snapshot("before".into())).unwrap();
    let cps = disk.checkpoints();
    assert_eq!(cps[&1].size, old);

    let new = 4 * MB;
    disk.resize(new).unwrap();
    let before = View::Snapshot("before".into());
    assert_eq!(disk.view_size(&before).unwrap(), old);
    // Writes across the old end, in the grown tail and at the start.
    disk.write(old - 10, &[7u8; 20]).unwrap();
    disk.write(3 * MB, b"tail").unwrap();
    disk.write(0, b"head").unwrap();
    assert_eq!(disk.sha256(&before).unwrap(), frozen);
    assert!(disk.read(&before, old - 1, 2).is_err());
    assert_eq!(disk.read(&before, old - 1, 1).unwrap(), [9]);
    assert_eq!(disk.allocated_map(&before, true).unwrap().blocks(), 33);
    assert!(
        disk.revert("before").is_err(),
        "a revert would shrink the disk"
    );

    disk.create_snapshot("after", 2).unwrap();
    let after = View::Snapshot("after".into());
    assert_eq!(disk.view_size(&after).unwrap(), new);
    assert_eq!(disk.checkpoints()[&2].size, new);
    // Dirty since checkpoint 1: the blocks written, over the new size; the
    // grown tail is not dirty except where the guest wrote.
    let changed = disk.changed_since("after", 1).unwrap();
    assert!(changed.fits(new));
    let old_last = (old - 1) / BLOCK_SIZE;
    let mut expected = vec![0, old_last, 3 * MB / BLOCK_SIZE];
    expected.sort();
    let got: Vec<u64> = (0..changed.blocks()).filter(|b| changed.get(*b)).collect();
    assert_eq!(got, expected);
    // The snapshot taken before the resize still answers over its size.
    let earlier = disk.changed_since("before", 1).unwrap();
    assert!(earlier.fits(old));
    assert_eq!(earlier.count(), 0);
    let live = disk.read(&View::Live, 0, new).unwrap();
    assert_eq!(disk.read(&after, 0, new).unwrap(), live);
    disk.delete_snapshot("before").unwrap();
    disk.delete_snapshot("after").unwrap();
}

#[test]
fn resized_disk_and_snapshots_survive_reopen() {
    let (dir, store) = store();
    let base = store.create_image(MB).unwrap();
    base.write(0, &[3u8; 5000]).unwrap();
    base.seal().unwrap();
    let disk = store.create_disk(MB + 512, Some(base.id())).unwrap();
    disk.write(MB, &[5u8; 512]).unwrap();
    disk.create_snapshot("s", 1).unwrap();
    disk.resize(3 * MB).unwrap();
    disk.write(MB + 256, &[6u8; 1024]).unwrap();
    disk.write(2 * MB, &[8u8; 10]).unwrap();
    let live = disk.sha256(&View::Live).unwrap();
    let snap = disk.sha256(&View::Snapshot("s".into())).unwrap();
    let id = disk.id().to_string();
    drop(disk);
    drop(store);
    let store = DiskStore::open(dir.path()).unwrap();
    let disk = store.disk(&id).unwrap();
    assert_eq!(disk.size(), 3 * MB);
    assert_eq!(disk.base_image().unwrap().id(), base.id());
    assert_eq!(
        disk.view_size(&View::Snapshot("s".into())).unwrap(),
        MB + 512
    );
    assert_eq!(disk.sha256(&View::Live).unwrap(), live);
    assert_eq!(disk.sha256(&View::Snapshot("s".into())).unwrap(), snap);
    assert_eq!(disk.checkpoints()[&1].size, MB + 512);
    // Still growable and writable after the reopen.
    disk.resize(4 * MB).unwrap();
    disk.write(4 * MB - 1, b"x").unwrap();
    drop(disk);
    drop(store);
    let store = DiskStore::open(dir.path()).unwrap();
    let disk = store.disk(&id).unwrap();
    assert_eq!(disk.read(&View::Live, 4 * MB - 1, 1).unwrap(), b"x");
    assert_eq!(disk.read(&View::Live, 2 * MB, 10).unwrap(), [8u8; 10]);
}

#[test]
fn exports_and_materialised_files_follow_the_view_size() {
    use crate::exports::{ExportRegistry, ExportTarget};
    use crate::faults::FaultRegistry;
    use std::sync::Arc;

    let (dir, store) = store();
    let disk = store.create_disk(MB, None).unwrap();
    disk.write(0, &[1u8; 100]).unwrap();
    disk.create_snapshot("s", 1).unwrap();
    let exports = ExportRegistry::new(Arc::new(FaultRegistry::default()));
    let live = exports
        .add(
            "live",
            "test",
            ExportTarget::Disk {
                disk: disk.clone(),
                view: View::Live,
                include_base: true,
            },
            true,
        )
        .unwrap();
    let snap = exports
        .add(
            "snap",
            "test",
            ExportTarget::Disk {
                disk: disk.clone(),
                view: View::Snapshot("s".into()),
                include_base: true,
            },
            false,
        )
        .unwrap();
    disk.resize(2 * MB).unwrap();
    assert_eq!(live.size(), 2 * MB);
    assert_eq!(snap.size(), MB);
    live.write(2 * MB - 4, b"tail").unwrap();
    assert_eq!(live.read(2 * MB - 4, 4).unwrap(), b"tail");
    assert!(snap.read(MB - 1, 2).is_err());
    let extents = snap
        .block_status(crate::exports::BASE_ALLOCATION, 0, 4 * MB)
        .unwrap();
    assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), MB);
    let path = dir.path().join("snap.raw");
    transfer::materialize(
        transfer::Source::Disk(&disk, &View::Snapshot("s".into())),
        &path,
    )
    .unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), MB);
    let path = dir.path().join("live.raw");
    transfer::materialize(transfer::Source::Disk(&disk, &View::Live), &path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * MB);
}
