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
