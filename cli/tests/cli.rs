//! Command-line surface: help texts, the mock subcommand, and errors for
//! bad input.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn vmbackup() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmbackup"))
}

const SUBCOMMANDS: [&str; 14] = [
    "demo",
    "init",
    "backup",
    "list",
    "show",
    "restore",
    "serve",
    "verify",
    "prune",
    "gc",
    "mock",
    "completions",
    "man",
    "key",
];

#[test]
fn every_subcommand_has_help() {
    let top = vmbackup().arg("--help").output().unwrap();
    assert!(top.status.success());
    let text = String::from_utf8_lossy(&top.stdout);
    for sub in SUBCOMMANDS {
        assert!(text.contains(sub), "--help lists {sub}");
        let out = vmbackup().args([sub, "--help"]).output().unwrap();
        assert!(out.status.success(), "{sub} --help");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Usage: vmbackup"), "{help}");
        // Every option has a description, on its line or the next.
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            if !t.starts_with('-') {
                continue;
            }
            let same_line = t.split("  ").filter(|p| !p.trim().is_empty()).count() >= 2;
            let next = lines.get(i + 1).map(|l| l.trim_start()).unwrap_or("");
            let next_line = !next.is_empty() && !next.starts_with('-');
            assert!(same_line || next_line, "{sub}: {line}");
        }
    }
}

#[test]
fn bad_usage_exits_2_and_missing_datastore_names_it() {
    let out = vmbackup().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let out = vmbackup()
        .args(["list", "-d"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&*missing.to_string_lossy()), "{err}");
}

#[test]
fn mock_subcommand_prints_its_endpoints_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = vmbackup()
        .args(["mock", "--seed-demo", "--state-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(
        v["admin_url"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:")
    );
    assert!(v["scp"]["base_url"].is_string(), "{v}");
}

/// Settings that would hang, do nothing or destroy data are refused with
/// exit 2 and a one-line reason, before anything runs (issue 13, items 1
/// and 5).
#[test]
fn settings_that_destroy_data_or_hang_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let refused = |args: &[&str]| {
        let out = vmbackup().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        err
    };
    let s = store.to_str().unwrap();
    let nbd = [
        "backup",
        "-d",
        s,
        "--nbd",
        "nbd://127.0.0.1:1/x",
        "--id",
        "a",
    ];
    let err = refused(&[&nbd[..], &["--bwlimit", "0"]].concat());
    assert!(err.contains("--bwlimit"), "{err}");
    let err = refused(&[&nbd[..], &["--parallel", "0"]].concat());
    assert!(err.contains("--parallel"), "{err}");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, b"not used").unwrap();
    let err = refused(&[&nbd[..], &["--tls-ca", ca.to_str().unwrap()]].concat());
    assert!(err.contains("nbds://"), "{err}");
    assert!(!store.exists(), "a refused backup created the datastore");
    for rule in [
        "--keep-last",
        "--keep-hourly",
        "--keep-daily",
        "--keep-weekly",
        "--keep-monthly",
        "--keep-yearly",
    ] {
        let err = refused(&["prune", "-d", s, "--id", "a", rule, "0"]);
        assert!(err.contains(rule), "{err}");
    }
    let err = refused(&["prune", "-d", s, "--id", "a"]);
    assert!(err.contains("--keep-none"), "{err}");
    let err = refused(&[
        "prune",
        "-d",
        s,
        "--id",
        "a",
        "--keep-none",
        "--keep-last",
        "1",
    ]);
    assert!(err.contains("--keep-none"), "{err}");
}

/// `prune` of a guest the datastore has no snapshot of says so and fails.
#[test]
fn prune_and_list_of_an_unknown_guest_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    datastore::Datastore::create(&store, datastore::DatastoreOptions::default()).unwrap();
    let out = vmbackup()
        .args(["prune", "-d"])
        .arg(&store)
        .args(["--id", "nosuchguest", "--keep-last", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nosuchguest"), "{err}");
    let out = vmbackup()
        .args(["list", "-d"])
        .arg(&store)
        .args(["--id", "nosuchguest"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no snapshots of guest nosuchguest"), "{err}");
    // Without a guest filter an empty datastore is simply empty.
    let out = vmbackup()
        .args(["list", "-d"])
        .arg(&store)
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// `gc` reports sizes in binary units, not raw byte counts.
#[test]
fn gc_reports_sizes_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    datastore::Datastore::create(&store, datastore::DatastoreOptions::default()).unwrap();
    let out = vmbackup().args(["gc", "-d"]).arg(&store).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.trim(), "removed 0 chunks (0 B), kept 0 chunks (0 B)");
}

/// A directory that is not a datastore is named as such, not as a missing
/// internal file.
#[test]
fn a_directory_that_is_not_a_datastore_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("photo.jpg"), b"x").unwrap();
    let out = vmbackup()
        .args(["list", "-d"])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is not a datastore"), "{err}");
    assert!(!err.contains("os error"), "{err}");
}

#[test]
fn bash_completions_parse_and_know_every_command_and_option() {
    let out = vmbackup().args(["completions", "bash"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = String::from_utf8(out.stdout).unwrap();
    for sub in SUBCOMMANDS {
        assert!(script.contains(sub), "completion of {sub}");
    }
    for opt in ["--keep-last", "--datastore", "--bitmap", "--json"] {
        assert!(script.contains(opt), "completion of {opt}");
    }
    // bash itself accepts the script and defines the completion.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vmbackup.bash");
    std::fs::write(&path, &script).unwrap();
    let check = Command::new("bash")
        .arg("-c")
        .arg("source \"$1\" && complete -p vmbackup")
        .arg("-")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("vmbackup"));

    let bad = vmbackup()
        .args(["completions", "cmd.exe"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bash"));
}

#[test]
fn manual_pages_cover_every_command() {
    let out = vmbackup().arg("man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.contains(".TH vmbackup 1"), "{page}");
    for sub in SUBCOMMANDS {
        assert!(page.contains(sub), "vmbackup(1) names {sub}");
    }
    let dir = tempfile::tempdir().unwrap();
    let pages = dir.path().join("man1");
    let out = vmbackup()
        .args(["man", "--dir"])
        .arg(&pages)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for sub in SUBCOMMANDS {
        let p = pages.join(format!("vmbackup-{sub}.1"));
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(text.contains(".TH vmbackup-"), "{text}");
    }
    let prune = std::fs::read_to_string(pages.join("vmbackup-prune.1")).unwrap();
    assert!(prune.contains("keep\\-last"), "{prune}");
}

#[test]
fn key_files_are_created_checked_and_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.json");
    let run = |args: &[&str], pass: &str, stdin: &str| {
        let mut c = vmbackup()
            .args(args)
            .arg("--file")
            .arg(&key)
            .env("VMBACKUP_PASSPHRASE", pass)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = c.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, created, err) = run(&["key", "create"], "s3cret", "");
    assert_eq!(code, Some(0), "{err}");
    let fingerprint = created
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    assert_eq!(fingerprint.len(), 32, "{created}");

    let (code, shown, _) = run(&["key", "show"], "s3cret", "");
    assert_eq!(code, Some(0));
    assert!(shown.contains(&fingerprint), "{shown}");
    let (code, _, err) = run(&["key", "show"], "wrong", "");
    assert_eq!(code, Some(1));
    assert!(err.contains("wrong passphrase"), "{err}");
    let (code, _, err) = run(&["key", "create"], "s3cret", "");
    assert_eq!(code, Some(1));
    assert!(err.contains("never overwritten"), "{err}");

    // The recovery copy brings the same key back under a new passphrase.
    let (code, master, _) = run(&["key", "export-master"], "s3cret", "");
    assert_eq!(code, Some(0));
    assert_eq!(master.trim().len(), 64);
    std::fs::remove_file(&key).unwrap();
    let (code, imported, err) = run(&["key", "import-master"], "new pass", &master);
    assert_eq!(code, Some(0), "{err}");
    assert!(imported.contains(&fingerprint), "{imported}");
    let (code, _, _) = run(&["key", "show"], "new pass", "");
    assert_eq!(code, Some(0));
}
