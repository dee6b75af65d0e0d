//! A restore never writes outside its target, whatever the archive holds
//! or the target already contains; a walk reports entries that vanish or
//! change under it as warnings and goes on.

use std::path::Path;
use std::sync::Mutex;

use filetree::{IdMap, RestoreOptions, WalkOptions, backup_tree, restore_tree};
use provider_api::*;

/// An archive in memory (entries and one data stream).
#[derive(Default)]
struct Mem {
    entries: Vec<FileEntry>,
    data: Vec<u8>,
}

impl Mem {
    fn dir(mut self, p: &[u8]) -> Self {
        let mut e = FileEntry::new(p.to_vec(), FileKind::Dir);
        e.mode = 0o755;
        self.entries.push(e);
        self
    }
    fn file(mut self, p: &[u8], content: &[u8]) -> Self {
        let mut e = FileEntry::new(p.to_vec(), FileKind::File);
        e.mode = 0o644;
        e.size = content.len() as u64;
        e.data_offset = self.data.len() as u64;
        self.data.extend_from_slice(content);
        self.entries.push(e);
        self
    }
    fn link(mut self, p: &[u8], kind: FileKind, target: &[u8]) -> Self {
        let mut e = FileEntry::new(p.to_vec(), kind);
        e.mode = 0o777;
        e.link = target.to_vec();
        self.entries.push(e);
        self
    }
}

impl FileArchiveReader for Mem {
    fn len(&self) -> u64 {
        self.entries.len() as u64
    }
    fn entries(&self) -> Result<Box<dyn Iterator<Item = Result<FileEntry>> + Send + '_>> {
        Ok(Box::new(self.entries.iter().cloned().map(Ok)))
    }
    fn read(&self, e: &FileEntry, offset: u64, len: usize) -> Result<Vec<u8>> {
        let s = (e.data_offset + offset) as usize;
        Ok(self.data[s..s + len].to_vec())
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn hostile_archives_write_nothing_outside_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"untouched").unwrap();
    let out = outside.to_str().unwrap().as_bytes().to_vec();
    let cases: Vec<(&str, Mem)> = vec![
        (
            "a file under a symlink to outside",
            Mem::default()
                .dir(b"")
                .link(b"a", FileKind::Symlink, &out)
                .file(b"a/pwned", b"x"),
        ),
        (
            "a relative symlink climbing out",
            Mem::default()
                .dir(b"")
                .link(b"up", FileKind::Symlink, b"../outside")
                .file(b"up/pwned", b"x"),
        ),
        (
            "a path with ..",
            Mem::default().dir(b"").file(b"../outside/pwned", b"x"),
        ),
        (
            "an absolute path",
            Mem::default().dir(b"").file(b"/tmp/pwned", b"x"),
        ),
        (
            "a hard link to a file outside",
            Mem::default()
                .dir(b"")
                .link(b"h", FileKind::Hardlink, b"../outside/keep"),
        ),
        (
            "a hard link through a symlink",
            Mem::default()
                .dir(b"")
                .link(b"s", FileKind::Symlink, &out)
                .link(b"h", FileKind::Hardlink, b"s/keep"),
        ),
        (
            "a NUL in a name",
            Mem::default().dir(b"").file(b"a\0b", b"x"),
        ),
    ];
    for (i, (what, archive)) in cases.into_iter().enumerate() {
        let target = tmp.path().join(format!("t{i}"));
        let err = restore_tree(&archive, &target, &RestoreOptions::default()).expect_err(what);
        assert!(
            matches!(err.kind(), ErrorKind::Refused | ErrorKind::Corrupt),
            "{what}: {err}"
        );
        assert_eq!(listing(&outside), vec!["keep"], "{what}: {err}");
        assert_eq!(
            std::fs::read(outside.join("keep")).unwrap(),
            b"untouched",
            "{what}"
        );
        assert_eq!(
            std::fs::metadata(outside.join("keep")).unwrap().len(),
            9,
            "{what}"
        );
    }
    assert!(!Path::new("/tmp/pwned").exists());
}

#[test]
fn symlinks_already_in_the_target_are_replaced_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let target = tmp.path().join("target");
    std::fs::create_dir(&target).unwrap();
    // The target holds symlinks where the archive has a directory and a
    // file: both must be replaced inside the target.
    std::os::unix::fs::symlink(&outside, target.join("d")).unwrap();
    std::os::unix::fs::symlink(outside.join("f"), target.join("f")).unwrap();
    let archive = Mem::default()
        .dir(b"")
        .dir(b"d")
        .file(b"d/inner", b"in")
        .file(b"f", b"file");
    restore_tree(&archive, &target, &RestoreOptions::default()).unwrap();
    assert!(listing(&outside).is_empty(), "{:?}", listing(&outside));
    assert!(
        std::fs::symlink_metadata(target.join("d"))
            .unwrap()
            .is_dir()
    );
    assert_eq!(std::fs::read(target.join("d/inner")).unwrap(), b"in");
    assert_eq!(std::fs::read(target.join("f")).unwrap(), b"file");
}

#[test]
fn restore_of_one_path_takes_hard_link_content_from_outside_the_selection() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = Mem::default()
        .dir(b"")
        .dir(b"a")
        .file(b"a/first", b"shared content")
        .dir(b"b")
        .link(b"b/second", FileKind::Hardlink, b"a/first")
        .file(b"b/own", b"own");
    let target = tmp.path().join("t");
    let rep = restore_tree(
        &archive,
        &target,
        &RestoreOptions {
            only: Some(b"b".to_vec()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(listing(&target), vec!["b"]);
    assert_eq!(
        std::fs::read(target.join("b/second")).unwrap(),
        b"shared content"
    );
    assert_eq!(std::fs::read(target.join("b/own")).unwrap(), b"own");
    assert_eq!(rep.entries, 3);
    let err = restore_tree(
        &archive,
        &tmp.path().join("t2"),
        &RestoreOptions {
            only: Some(b"nope".to_vec()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("nope"), "{err}");
}

/// A writer that changes the tree while the walk is under way.
struct Meddler<'a> {
    inner: Mem,
    root: &'a Path,
    owed: u64,
    log: Mutex<Vec<String>>,
}

impl FileArchiveWriter for Meddler<'_> {
    fn previous(&mut self, _path: &[u8]) -> Result<Option<FileEntry>> {
        Ok(None)
    }
    fn add(&mut self, mut entry: FileEntry) -> Result<()> {
        match &entry.path[..] {
            // Listed already: "b" vanishes before it is reached.
            b"v/a" => std::fs::remove_file(self.root.join("v/b")).unwrap(),
            // Grows after its size was taken, before it is read.
            b"v/c" => {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(self.root.join("v/c"))
                    .unwrap();
                f.write_all(b" and more").unwrap();
            }
            _ => {}
        }
        self.log.lock().unwrap().push(entry.display_path());
        entry.data_offset = self.inner.data.len() as u64;
        self.owed = entry.stored_len();
        self.inner.entries.push(entry);
        Ok(())
    }
    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.owed -= data.len() as u64;
        self.inner.data.extend_from_slice(data);
        Ok(())
    }
    fn reuse(&mut self, _entry: FileEntry, _previous: &FileEntry) -> Result<()> {
        unreachable!()
    }
    fn finish(self: Box<Self>) -> Result<ArchiveStats> {
        Ok(ArchiveStats::default())
    }
}

#[test]
fn entries_that_vanish_or_change_during_the_walk_are_warnings() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    std::fs::create_dir_all(root.join("v")).unwrap();
    for (n, c) in [("a", "a"), ("b", "b"), ("c", "c"), ("d", "d")] {
        std::fs::write(root.join("v").join(n), c).unwrap();
    }
    let mut m = Meddler {
        inner: Mem::default(),
        root: &root,
        owed: 0,
        log: Mutex::new(Vec::new()),
    };
    let warnings = backup_tree(&root, &mut m, &WalkOptions::default()).unwrap();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0].contains("v/b") && warnings[0].contains("vanished"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].contains("v/c") && warnings[1].contains("changed"),
        "{warnings:?}"
    );
    assert_eq!(*m.log.lock().unwrap(), vec![".", "v", "v/a", "v/c", "v/d"]);
    assert_eq!(m.owed, 0);
    // What was stored restores: "c" as it was when its size was taken.
    let out = tmp.path().join("out");
    restore_tree(&m.inner, &out, &RestoreOptions::default()).unwrap();
    assert_eq!(std::fs::read(out.join("v/c")).unwrap(), b"c");
    assert_eq!(std::fs::read(out.join("v/d")).unwrap(), b"d");
}

#[test]
fn unprivileged_container_ids_are_stored_shifted_and_restored_back() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipping: chown needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ct");
    std::fs::create_dir_all(root.join("home")).unwrap();
    std::fs::write(root.join("home/user-file"), b"x").unwrap();
    std::fs::write(root.join("stray"), b"y").unwrap();
    let own = |p: &Path, id: u32| {
        rustix::fs::chown(
            p,
            Some(rustix::fs::Uid::from_raw(id)),
            Some(rustix::fs::Gid::from_raw(id)),
        )
        .unwrap()
    };
    own(&root, 100_000);
    own(&root.join("home"), 100_000);
    own(&root.join("home/user-file"), 101_000);
    own(&root.join("stray"), 5); // outside the map
    let map = IdMap {
        host_base: 100_000,
        count: 65_536,
    };
    let mut m = Meddler {
        inner: Mem::default(),
        root: &root,
        owed: 0,
        log: Mutex::new(Vec::new()),
    };
    let warnings = backup_tree(
        &root,
        &mut m,
        &WalkOptions {
            id_map: Some(map),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("stray") && warnings[0].contains("outside"),
        "{warnings:?}"
    );
    let ids: Vec<(String, u32)> = m
        .inner
        .entries
        .iter()
        .map(|e| (e.display_path(), e.uid))
        .collect();
    assert_eq!(
        ids,
        vec![
            (".".into(), 0),
            ("home".into(), 0),
            ("home/user-file".into(), 1000),
            ("stray".into(), 65534)
        ]
    );
    let out = tmp.path().join("out");
    restore_tree(
        &m.inner,
        &out,
        &RestoreOptions {
            id_map: Some(map),
            ..Default::default()
        },
    )
    .unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(out.join("home/user-file")).unwrap().uid(),
        101_000
    );
    assert_eq!(std::fs::metadata(&out).unwrap().uid(), 100_000);
    assert_eq!(std::fs::metadata(out.join("stray")).unwrap().uid(), 165_534);
}
