//! Directory trees through the command line: `backup --dir` (full, then
//! incremental), `ls`, `restore` of the tree as a directory and through
//! the tar mechanism, `restore-file` of one file and one directory, each
//! compared with the tree as it was (content, modes, times, links); a
//! failed restore leaves nothing behind; VM snapshots point to the
//! file-level recipe.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use crate::common;
use common::{run, text, vmbackup};

fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} succeeded: {}", text(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Kind, mode, mtime, size, content or link target.
type Desc = (char, u32, (i64, i64), u64, Vec<u8>);

/// Relative path → its description.
fn snapshot_of(root: &Path) -> BTreeMap<String, Desc> {
    let mut out = BTreeMap::new();
    let mut stack = vec![std::path::PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = root.join(&rel);
        let m = std::fs::symlink_metadata(&full).unwrap();
        let (kind, body) = if m.is_dir() {
            for e in std::fs::read_dir(&full).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
            ('d', Vec::new())
        } else if m.file_type().is_symlink() {
            (
                'l',
                std::fs::read_link(&full)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes(),
            )
        } else {
            ('-', std::fs::read(&full).unwrap())
        };
        let mode = if kind == 'l' { 0 } else { m.mode() & 0o7777 };
        let mtime = if kind == 'd' {
            (0, 0)
        } else {
            (m.mtime(), m.mtime_nsec())
        };
        out.insert(
            rel.to_string_lossy().into_owned(),
            (
                kind,
                mode,
                mtime,
                if kind == '-' { m.len() } else { 0 },
                body,
            ),
        );
    }
    out
}

fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("etc/app")).unwrap();
    std::fs::create_dir_all(root.join("var/log")).unwrap();
    std::fs::write(root.join("etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
    std::fs::write(root.join("etc/app/app.conf"), b"level=debug\n").unwrap();
    std::fs::set_permissions(
        root.join("etc/app/app.conf"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(root.join("var/log/big.log"), &big).unwrap();
    std::os::unix::fs::symlink("../etc/hosts", root.join("var/hosts-link")).unwrap();
    for i in 0..300 {
        std::fs::write(
            root.join(format!("var/log/small-{i:03}")),
            format!("line {i}\n"),
        )
        .unwrap();
    }
}

#[test]
fn trees_back_up_list_and_restore_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("rootfs");
    let ds = tmp.path().join("ds");
    make_tree(&tree);
    let before = snapshot_of(&tree);

    let out = run(vmbackup()
        .arg("--json")
        .args(["backup", "-d"])
        .arg(&ds)
        .arg("--dir")
        .arg(&tree)
        .args(["--id", "web"]));
    assert!(out.contains("web"), "{out}");
    // Incremental: a change, an addition.
    std::fs::write(tree.join("etc/hosts"), b"10.0.0.1 web\n").unwrap();
    std::fs::write(tree.join("var/new"), b"added").unwrap();
    run(vmbackup()
        .args(["backup", "-d"])
        .arg(&ds)
        .arg("--dir")
        .arg(&tree)
        .args(["--id", "web"]));
    let after = snapshot_of(&tree);

    let list: serde_json::Value =
        serde_json::from_str(&run(vmbackup().arg("--json").args(["list", "-d"]).arg(&ds))).unwrap();
    let ids: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "{list}");
    assert!(ids.iter().all(|i| i.starts_with("dir/web/")), "{ids:?}");

    // ls: direct entries, recursive, a file, a missing path.
    let ls = run(vmbackup()
        .args(["ls", "-d"])
        .arg(&ds)
        .args([&ids[1], "etc"]));
    assert!(ls.contains("etc/hosts") && ls.contains("etc/app"), "{ls}");
    assert!(!ls.contains("app.conf"), "not recursive: {ls}");
    let ls = run(vmbackup()
        .args(["ls", "-r", "-d"])
        .arg(&ds)
        .args([&ids[1], "/etc/"]));
    assert!(
        ls.contains("-0600") && ls.contains("etc/app/app.conf"),
        "{ls}"
    );
    let ls = run(vmbackup()
        .args(["ls", "-d"])
        .arg(&ds)
        .args([&ids[1], "var/hosts-link"]));
    assert!(ls.contains("-> ../etc/hosts"), "{ls}");
    let err = fails(
        vmbackup()
            .args(["ls", "-d"])
            .arg(&ds)
            .args([&ids[1], "nope"]),
    );
    assert!(err.contains("has no nope"), "{err}");

    // The whole tree, both mechanisms, each snapshot as it was.
    for (i, (id, want)) in [(&ids[0], &before), (&ids[1], &after)]
        .into_iter()
        .enumerate()
    {
        for tar in [false, true] {
            let name = format!("r{i}{}", if tar { "-tar" } else { "" });
            let mut cmd = vmbackup();
            cmd.args(["restore", "-d"])
                .arg(&ds)
                .arg(id)
                .arg("--to")
                .arg(tmp.path().join("out"))
                .args(["--name", &name]);
            if tar {
                cmd.arg("--tar");
            }
            run(&mut cmd);
            let got = snapshot_of(&tmp.path().join("out").join(&name));
            assert!(
                got == *want,
                "{id} via {}",
                if tar { "tar" } else { "directory" }
            );
        }
    }
    // The tar file is gone; a second restore under a taken name is refused
    // and leaves the first one alone.
    let names: Vec<String> = std::fs::read_dir(tmp.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    let err = fails(
        vmbackup()
            .args(["restore", "-d"])
            .arg(&ds)
            .arg(&ids[1])
            .arg("--to")
            .arg(tmp.path().join("out"))
            .args(["--name", "r1"]),
    );
    assert!(err.contains("already exists"), "{err}");
    assert!(snapshot_of(&tmp.path().join("out/r1")) == after);

    // One file, one directory.
    let files = tmp.path().join("files");
    run(vmbackup()
        .args(["restore-file", "-d"])
        .arg(&ds)
        .args([&ids[0], "etc/hosts", "--to"])
        .arg(&files));
    assert_eq!(
        std::fs::read(files.join("hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    run(vmbackup()
        .args(["restore-file", "-d"])
        .arg(&ds)
        .args([&ids[1], "var/log", "--to"])
        .arg(&files));
    let got = snapshot_of(&files.join("log"));
    let want: BTreeMap<_, _> = after
        .iter()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix("var/log")?;
            Some((rest.trim_start_matches('/').to_owned(), v.clone()))
        })
        .collect();
    assert!(got == want);
    let err = fails(
        vmbackup()
            .args(["restore-file", "-d"])
            .arg(&ds)
            .args([&ids[1], "../etc", "--to"])
            .arg(&files),
    );
    assert!(err.contains("refused"), "{err}");
}
