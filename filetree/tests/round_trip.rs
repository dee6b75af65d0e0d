//! Directory trees through a real datastore and back: every file type,
//! non-UTF-8 names, sparse and large files, hard links, xattrs and ACLs,
//! owners and nanosecond times; restored as a directory and as a tar that
//! GNU tar extracts; incrementals that read only changed files; hostile
//! archives and targets that must not make a restore write outside.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datastore::{Datastore, DatastoreOptions};
use filetree::{RestoreOptions, WalkOptions, backup_tree, restore_tree, write_tar};
use provider_api::*;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let t = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: sec,
            tv_nsec: nsec as _,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: sec,
            tv_nsec: nsec as _,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &t,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// A POSIX ACL (`system.posix_acl_access`) granting user 1000 read.
fn acl_blob() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX),
        (0x02, 4, 1000),
        (0x04, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 4, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// A tree of `dirs × per_dir` small entries plus one of every special
/// kind; returns the number of entries.
fn make_tree(root: &Path, dirs: usize, per_dir: usize, seed: u64) -> usize {
    let mut rng = Rng(seed | 1);
    std::fs::create_dir_all(root).unwrap();
    let mut n = 1;
    for d in 0..dirs {
        let dir = root.join(format!("d{d:03}")).join(format!("sub{}", d % 7));
        std::fs::create_dir_all(&dir).unwrap();
        n += if d < 7 { 2 } else { 1 };
        for f in 0..per_dir {
            let p = dir.join(format!("f{f:04}.txt"));
            let len = match rng.below(100) {
                0 => 64 << 10,
                1..=10 => rng.below(16 << 10) as usize,
                11..=15 => 0,
                _ => rng.below(600) as usize,
            };
            std::fs::write(&p, rng.bytes(len)).unwrap();
            if f % 50 == 0 {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
            }
            set_mtime(
                &p,
                1_600_000_000 + rng.below(1 << 20) as i64,
                rng.below(1_000_000_000) as i64,
            );
            n += 1;
        }
    }
    let sp = root.join("special");
    std::fs::create_dir(&sp).unwrap();
    n += 1;
    // Names that are not UTF-8, and odd ones.
    for name in [
        &b"caf\xe9"[..],
        b"\xff\xfe",
        b"new\nline",
        b" lead space",
        b"-dash",
        b"a:b%c",
    ] {
        std::fs::write(sp.join(OsStr::from_bytes(name)), name).unwrap();
        n += 1;
    }
    // Large and sparse files; a file exactly one chunk and one past it.
    std::fs::write(sp.join("large.bin"), rng.bytes(9 << 20)).unwrap();
    std::fs::write(sp.join("chunk.bin"), rng.bytes(4 << 20)).unwrap();
    std::fs::write(sp.join("chunk1.bin"), rng.bytes((4 << 20) + 1)).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(sp.join("sparse.img")).unwrap();
        f.set_len(48 << 20).unwrap();
        f.write_all_at(&rng.bytes(70_000), 0).unwrap();
        f.write_all_at(&rng.bytes(5000), 30 << 20).unwrap();
        f.write_all_at(b"last", (48 << 20) - 4).unwrap();
        let g = std::fs::File::create(sp.join("hole-only.img")).unwrap();
        g.set_len(16 << 20).unwrap();
    }
    n += 5;
    // Hard links (three names, one outside this directory), symlinks.
    std::fs::write(sp.join("linked"), b"one inode, three names").unwrap();
    std::fs::hard_link(sp.join("linked"), sp.join("linked2")).unwrap();
    std::fs::hard_link(sp.join("linked"), root.join("d000/linked3")).unwrap();
    std::os::unix::fs::symlink("linked", sp.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", sp.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../../nowhere", sp.join("dangling")).unwrap();
    std::os::unix::fs::symlink(OsStr::from_bytes(b"\xff-target"), sp.join("odd-link")).unwrap();
    n += 7;
    // Devices, FIFO, socket.
    let mk = |name: &str, ft, dev| {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            sp.join(name),
            ft,
            rustix::fs::Mode::from_raw_mode(0o640),
            dev,
        )
        .unwrap()
    };
    mk(
        "null",
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::makedev(1, 3),
    );
    mk(
        "blk",
        rustix::fs::FileType::BlockDevice,
        rustix::fs::makedev(7, 200),
    );
    mk("fifo", rustix::fs::FileType::Fifo, 0);
    let _l = std::os::unix::net::UnixListener::bind(sp.join("sock")).unwrap();
    n += 4;
    // Modes, owners, xattrs, an ACL, a read-only directory with content.
    std::fs::write(sp.join("setuid"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(sp.join("setuid"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    let ro = sp.join("readonly");
    std::fs::create_dir(&ro).unwrap();
    std::fs::write(ro.join("inside"), b"x").unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let sticky = sp.join("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    n += 4;
    let xa = sp.join("xattrs");
    std::fs::write(&xa, b"attributes").unwrap();
    rustix::fs::setxattr(
        &xa,
        "user.comment",
        b"hello",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::setxattr(
        &xa,
        "user.bin",
        &[0, 255, 10],
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::setxattr(
        &xa,
        "system.posix_acl_access",
        &acl_blob(),
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::setxattr(
        &sticky,
        "user.dir",
        b"on a directory",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    n += 1;
    if is_root() {
        for (name, uid, gid) in [
            ("linked", 1000, 1000),
            ("xattrs", 100_005, 100_007),
            ("setuid", 0, 5),
        ] {
            rustix::fs::chownat(
                rustix::fs::CWD,
                sp.join(name),
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .unwrap();
        }
        std::fs::set_permissions(sp.join("setuid"), std::fs::Permissions::from_mode(0o4755))
            .unwrap();
        rustix::fs::chownat(
            rustix::fs::CWD,
            sp.join("rel-link"),
            Some(rustix::fs::Uid::from_raw(33)),
            Some(rustix::fs::Gid::from_raw(33)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }
    set_mtime(&sp.join("rel-link"), 1_500_000_000, 123);
    set_mtime(&ro, 1_400_000_000, 999_999_999);
    n
}

#[derive(Debug, PartialEq, Eq)]
struct Desc {
    kind: &'static str,
    mode: u32,
    owner: Option<(u32, u32)>,
    mtime: Option<(i64, i64)>,
    size: u64,
    content: Option<blake3::Hash>,
    link: Option<Vec<u8>>,
    rdev: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The first path (in order) of its hard link group.
    group: Option<Vec<u8>>,
    sparse: bool,
}

struct Cmp {
    owners: bool,
    dir_mtimes: bool,
    sockets: bool,
    sparse: bool,
}

fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(p, &mut names[..]).unwrap();
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let mut v = vec![0u8; 4096];
        let len = rustix::fs::lgetxattr(p, OsStr::from_bytes(name), &mut v[..]).unwrap();
        out.push((name.to_vec(), v[..len].to_vec()));
    }
    out.sort();
    out
}

/// Every entry's metadata and content, by relative path.
fn describe(root: &Path, c: &Cmp) -> BTreeMap<Vec<u8>, Desc> {
    let mut out = BTreeMap::new();
    let mut groups: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    let mut all = Vec::new();
    while let Some(rel) = stack.pop() {
        let full = root.join(&rel);
        let m = std::fs::symlink_metadata(&full).unwrap();
        all.push((rel.clone(), m.clone()));
        if m.is_dir() {
            for e in std::fs::read_dir(&full).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
    }
    all.sort_by(|a, b| a.0.as_os_str().as_bytes().cmp(b.0.as_os_str().as_bytes()));
    for (rel, m) in all {
        let full = root.join(&rel);
        let ft = m.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "socket"
        };
        if kind == "socket" && !c.sockets {
            continue;
        }
        let key = rel.as_os_str().as_bytes().to_vec();
        let group = (ft.is_file() && m.nlink() > 1)
            .then(|| groups.entry(m.ino()).or_insert_with(|| key.clone()).clone());
        out.insert(
            key,
            Desc {
                kind,
                mode: if ft.is_symlink() {
                    0
                } else {
                    m.mode() & 0o7777
                },
                owner: c.owners.then_some((m.uid(), m.gid())),
                mtime: (!ft.is_dir() || c.dir_mtimes).then_some((m.mtime(), m.mtime_nsec())),
                size: if ft.is_file() { m.len() } else { 0 },
                content: ft.is_file().then(|| {
                    let mut h = blake3::Hasher::new();
                    h.update_reader(std::fs::File::open(&full).unwrap())
                        .unwrap();
                    h.finalize()
                }),
                link: ft.is_symlink().then(|| {
                    std::fs::read_link(&full)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec()
                }),
                rdev: m.rdev(),
                xattrs: if ft.is_symlink() {
                    Vec::new()
                } else {
                    xattrs(&full)
                },
                group,
                sparse: c.sparse && ft.is_file() && m.blocks() * 512 < m.len() / 2,
            },
        );
    }
    out
}

fn assert_same(a: &BTreeMap<Vec<u8>, Desc>, b: &BTreeMap<Vec<u8>, Desc>) {
    let mut diffs = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => diffs.push(format!("missing {}", String::from_utf8_lossy(k))),
            Some(w) if w != v => {
                diffs.push(format!("{}: {v:?} vs {w:?}", String::from_utf8_lossy(k)))
            }
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        diffs.push(format!("extra {}", String::from_utf8_lossy(k)));
    }
    assert!(
        diffs.is_empty(),
        "{} differences, first: {:#?}",
        diffs.len(),
        &diffs[..diffs.len().min(5)]
    );
}

fn datastore(dir: &Path) -> Datastore {
    Datastore::create(
        dir,
        DatastoreOptions {
            chunk_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Back the tree up as archive `root` of a new snapshot at `time`.
async fn backup(
    ds: &Datastore,
    tree: &Path,
    time: i64,
    previous: Option<&SnapshotId>,
) -> (SnapshotInfo, ArchiveStats, Vec<String>) {
    let mut snap = ds
        .begin_snapshot(SnapshotSpec {
            platform: "dir".into(),
            guest: GuestId::from("tree"),
            archive: ArchiveName::new("t").unwrap(),
            time,
        })
        .await
        .unwrap();
    let mut w = snap.begin_file_archive("root", previous).await.unwrap();
    let tree = tree.to_path_buf();
    let (stats, warnings) = tokio::task::spawn_blocking(move || {
        let warnings = backup_tree(&tree, &mut *w, &WalkOptions::default()).unwrap();
        (w.finish().unwrap(), warnings)
    })
    .await
    .unwrap();
    let info = snap.commit(warnings.clone()).await.unwrap();
    (info, stats, warnings)
}

async fn open(ds: &Datastore, id: &SnapshotId) -> Arc<dyn FileArchiveReader> {
    ds.open_snapshot(id)
        .await
        .unwrap()
        .open_file_archive("root")
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_tree_round_trips_as_directory_and_tar_and_incrementals_read_only_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    make_tree(&tree, 200, 250, 42);
    let ds = datastore(&tmp.path().join("ds"));
    let (info, stats, warnings) = backup(&ds, &tree, 1_000, None).await;
    assert!(warnings.is_empty(), "{warnings:?}");
    // As a directory: everything, metadata included.
    let full = Cmp {
        owners: is_root(),
        dir_mtimes: true,
        sockets: true,
        sparse: true,
    };
    let want = describe(&tree, &full);
    assert!(want.len() >= 50_000, "{}", want.len());
    assert_eq!(stats.entries as usize, want.len());
    assert_eq!(stats.files_reused, 0);
    let out = tmp.path().join("restored");
    let r = open(&ds, &info.id).await;
    let o = out.clone();
    let rep =
        tokio::task::spawn_blocking(move || restore_tree(&*r, &o, &RestoreOptions::default()))
            .await
            .unwrap()
            .unwrap();
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
    assert_same(&want, &describe(&out, &full));

    // As a tar, extracted by GNU tar (a peer, not our reader).
    let r = open(&ds, &info.id).await;
    let tar_path = tmp.path().join("t.tar");
    let tp = tar_path.clone();
    let w = tokio::task::spawn_blocking(move || {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tp).unwrap());
        write_tar(&*r, &mut f, None).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(w.len(), 1, "the socket is left out: {w:?}");
    let xt = tmp.path().join("from-tar");
    std::fs::create_dir(&xt).unwrap();
    let st = std::process::Command::new("tar")
        .args([
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
            "--same-owner",
            "-xpf",
        ])
        .arg(&tar_path)
        .arg("-C")
        .arg(&xt)
        .status()
        .unwrap();
    assert!(st.success());
    let tar_cmp = Cmp {
        owners: is_root(),
        // GNU tar sets directory times only when it can, and not sockets.
        dir_mtimes: true,
        sockets: false,
        sparse: false,
    };
    assert_same(&describe(&tree, &tar_cmp), &describe(&xt, &tar_cmp));

    // 1 % of the files change (content and mtime), one is added, one removed.
    let mut rng = Rng(7);
    let mut changed = 0;
    for d in 0..200 {
        for f in 0..250 {
            if rng.below(100) == 0 {
                let p = tree.join(format!("d{d:03}/sub{}/f{f:04}.txt", d % 7));
                std::fs::write(&p, rng.bytes(300)).unwrap();
                changed += 1;
            }
        }
    }
    std::fs::write(tree.join("d001/new-file"), b"new").unwrap();
    std::fs::remove_file(tree.join("d002/sub2/f0001.txt")).unwrap();
    let (info2, stats2, _) = backup(&ds, &tree, 2_000, Some(&info.id)).await;
    assert_eq!(
        stats2.files_read,
        changed + 1,
        "only changed and new files are read"
    );
    assert!(stats2.files_reused > 49_000, "{stats2:?}");
    let big = 9 << 20;
    assert!(
        stats2.bytes_read < big,
        "unchanged large files are not read: {stats2:?}"
    );
    let out2 = tmp.path().join("restored2");
    let r = open(&ds, &info2.id).await;
    let o = out2.clone();
    tokio::task::spawn_blocking(move || restore_tree(&*r, &o, &RestoreOptions::default()).unwrap())
        .await
        .unwrap();
    assert_same(&describe(&tree, &full), &describe(&out2, &full));

    // The first snapshot still restores as it was, after a GC.
    ds.gc(std::time::Duration::ZERO).unwrap();
    assert!(ds.verify(datastore::VerifyScope::All).unwrap().is_ok());
    let out3 = tmp.path().join("restored3");
    let r = open(&ds, &info.id).await;
    let o = out3.clone();
    tokio::task::spawn_blocking(move || restore_tree(&*r, &o, &RestoreOptions::default()).unwrap())
        .await
        .unwrap();
    assert_same(&want, &describe(&out3, &full));
}
