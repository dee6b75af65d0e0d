//! Golden tests of the CLI's user-visible output: `list`, `show`, `verify`,
//! `prune --dry-run` and errors for bad input, piped and in a terminal.
//!
//! Each case's expected output is `cli/tests/golden/<case>.txt`: the command
//! lines, exit codes, stdout and stderr of the piped runs, with volatile
//! parts (the temporary directory) replaced by placeholders such as `<DIR>`.
//!
//! After an intended change of the output, rewrite the files with
//!
//! ```text
//! UPDATE_GOLDEN=1 cargo test -p cli --test golden
//! ```
//!
//! and review the diff: these files are the CLI's contract with its users.
//!
//! The terminal run of every command goes through a pseudo-terminal
//! (`script -qec CMD /dev/null`, util-linux): with `NO_COLOR=1` its output
//! must equal the piped output exactly (no escape codes); without it, it
//! must equal the piped output once ANSI escape sequences are stripped (a
//! terminal may get colour, nothing else). Without `script` the terminal
//! half is skipped, unless `CI` is set, which makes it a failure.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bytes::Bytes;
use datastore::{Datastore, DatastoreOptions};
use provider_api::{
    ArchiveName, BitmapMode, ConfigBlob, ConfigKind, GuestId, SnapshotSpec, StartFrom, Target,
    Volume, VolumeFormat, VolumeSpec,
};

const T1: i64 = 1_700_000_000; // 2023-11-14T22:13:20Z
const T2: i64 = T1 + 86_400;

/// A datastore with two snapshots of guest `vm1` (platform nbd, the
/// default of `prune`): the first with one 1 MiB disk, the second with two
/// disks, a guest configuration and a warning.
fn fixture(dir: &Path) -> PathBuf {
    let store = dir.join("store");
    let ds = Datastore::create(
        &store,
        DatastoreOptions {
            chunk_size: 65536,
            ..Default::default()
        },
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for (time, disks, warnings) in [
            (T1, 1, vec![]),
            (
                T2,
                2,
                vec!["guest agent not running: file systems not frozen".to_owned()],
            ),
        ] {
            let mut snap = ds
                .begin_snapshot(SnapshotSpec {
                    platform: "nbd".into(),
                    guest: GuestId::from("vm1"),
                    archive: ArchiveName::new("vm/vm1".to_owned()).unwrap(),
                    time,
                })
                .await
                .unwrap();
            for d in 0..disks {
                let size = 1 << 20;
                let mut w = snap
                    .begin_volume(VolumeSpec {
                        volume: Volume {
                            device: format!("vd{}", (b'a' + d) as char),
                            size,
                            format: VolumeFormat::Raw,
                        },
                        start_from: StartFrom::Empty,
                        base: None,
                        bitmap_mode: BitmapMode::None,
                        checkpoint: None,
                    })
                    .await
                    .unwrap();
                let data: Vec<u8> = (0..200_000u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> (24 - u32::from(d))) as u8)
                    .collect();
                w.write(0, Bytes::from(data)).await.unwrap();
                w.write_zeroes(200_000, size - 200_000).await.unwrap();
                w.finish().await.unwrap();
            }
            if disks == 2 {
                snap.put_config(
                    ConfigKind::Guest,
                    ConfigBlob {
                        content_type: "application/json".into(),
                        data: br#"{"name":"vm1","cpus":2}"#.to_vec(),
                    },
                )
                .await
                .unwrap();
            }
            snap.commit(warnings).await.unwrap();
        }
    });
    store
}

const SNAP1: &str = "nbd/vm1/2023-11-14T22:13:20Z";

/// One case: the commands run in order on a fresh datastore. `{store}`
/// stands for the datastore's path, `{dir}` for the temporary directory.
const CASES: &[(&str, &[&[&str]])] = &[
    ("list", &[&["list", "-d", "{store}"]]),
    ("list_guest", &[&["list", "-d", "{store}", "--id", "vm1"]]),
    ("show", &[&["show", "-d", "{store}", SNAP1]]),
    (
        "show_second",
        &[&["show", "-d", "{store}", "nbd/vm1/2023-11-15T22:13:20Z"]],
    ),
    (
        "verify",
        &[&["verify", "-d", "{store}"], &["list", "-d", "{store}"]],
    ),
    ("verify_one", &[&["verify", "-d", "{store}", SNAP1]]),
    (
        "prune_dry_run",
        &[
            &[
                "prune",
                "-d",
                "{store}",
                "--id",
                "vm1",
                "--keep-last",
                "1",
                "--dry-run",
            ],
            // Nothing was removed.
            &["list", "-d", "{store}"],
        ],
    ),
    (
        "err_show_unknown_snapshot",
        &[&["show", "-d", "{store}", "nbd/vm1/2000-01-01T00:00:00Z"]],
    ),
    (
        "err_show_malformed_snapshot",
        &[&["show", "-d", "{store}", "no-such-snapshot"]],
    ),
    (
        "err_verify_unknown_snapshot",
        &[&["verify", "-d", "{store}", "nbd/vm1/2000-01-01T00:00:00Z"]],
    ),
    (
        "err_list_unknown_guest",
        &[&["list", "-d", "{store}", "--id", "nosuchguest"]],
    ),
    (
        "err_prune_unknown_guest",
        &[&[
            "prune",
            "-d",
            "{store}",
            "--id",
            "nosuchguest",
            "--keep-last",
            "1",
            "--dry-run",
        ]],
    ),
    (
        "err_missing_datastore",
        &[
            &["list", "-d", "{dir}/nope"],
            &["show", "-d", "{dir}/nope", SNAP1],
        ],
    ),
    (
        "err_bad_flag_value",
        &[
            &[
                "prune",
                "-d",
                "{store}",
                "--id",
                "vm1",
                "--keep-last",
                "0",
                "--dry-run",
            ],
            &[
                "prune",
                "-d",
                "{store}",
                "--id",
                "vm1",
                "--keep-last",
                "many",
                "--dry-run",
            ],
        ],
    ),
    (
        "err_prune_without_retention",
        &[&["prune", "-d", "{store}", "--id", "vm1", "--dry-run"]],
    ),
    ("err_no_datastore_given", &[&["list"]]),
];

/// Environment variables that change the CLI's output: removed for every run.
const SETTINGS_ENV: [&str; 6] = [
    "VMBACKUP_DATASTORE",
    "VMBACKUP_CONFIG",
    "VMBACKUP_LOG",
    "NO_COLOR",
    "CLICOLOR",
    "CLICOLOR_FORCE",
];

/// The binary with a clean environment for its settings.
fn vmbackup() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmbackup"));
    for var in SETTINGS_ENV {
        c.env_remove(var);
    }
    c.stdin(Stdio::null());
    c
}

/// Replace the known volatile values by placeholders.
fn normalise(text: &str, dir: &Path) -> String {
    text.replace(&*dir.to_string_lossy(), "<DIR>")
}

/// Remove ANSI CSI (`ESC [ ... final`) and OSC-less two-byte escapes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Run `args` under a pseudo-terminal; returns (exit code, output with
/// `\r\n` turned into `\n`).
fn run_in_terminal(args: &[String], no_color: bool) -> (Option<i32>, String) {
    let cmd = std::iter::once(env!("CARGO_BIN_EXE_vmbackup").to_owned())
        .chain(args.iter().cloned())
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    let mut c = Command::new("script");
    c.args(["-qec", &cmd, "/dev/null"]);
    for var in SETTINGS_ENV {
        c.env_remove(var);
    }
    if no_color {
        c.env("NO_COLOR", "1");
    }
    c.env("COLUMNS", "100").env("TERM", "xterm");
    let out = c.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.stderr.is_empty(),
        "script: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n"),
    )
}

/// Runs one case; returns its normalised transcript.
fn run_case(name: &str, commands: &[&[&str]], terminal: bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let store = fixture(&dir);
    let mut transcript = String::new();
    for command in commands {
        let args: Vec<String> = command
            .iter()
            .map(|a| {
                a.replace("{store}", &store.to_string_lossy())
                    .replace("{dir}", &dir.to_string_lossy())
            })
            .collect();
        let out = vmbackup().args(&args).output().unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        for (what, text) in [("stdout", &stdout), ("stderr", &stderr)] {
            assert!(
                !text.contains('\x1b'),
                "{name}: piped {what} has escape codes: {text:?}"
            );
        }
        if terminal {
            // One stream at a time, so that the terminal's interleaving of
            // the two is the piped order.
            assert!(
                stdout.is_empty() || stderr.is_empty(),
                "{name}: writes both stdout and stderr; compare them apart"
            );
            let piped = format!("{stdout}{stderr}");
            let (code, plain) = run_in_terminal(&args, true);
            assert_eq!(code, out.status.code(), "{name}: exit code in a terminal");
            assert!(
                !plain.contains('\x1b'),
                "{name}: escape codes in a terminal with NO_COLOR=1: {plain:?}"
            );
            assert_eq!(plain, piped, "{name}: terminal (NO_COLOR=1) vs piped");
            let (code, coloured) = run_in_terminal(&args, false);
            assert_eq!(code, out.status.code(), "{name}: exit code in a terminal");
            assert_eq!(
                strip_ansi(&coloured),
                piped,
                "{name}: terminal output, escape codes stripped, vs piped"
            );
        }
        let line = std::iter::once("vmbackup".to_owned())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        transcript.push_str(&format!("$ {line}\n"));
        transcript.push_str(&format!(
            "exit {}\n",
            out.status
                .code()
                .map_or("by a signal".to_owned(), |c| c.to_string())
        ));
        for (what, text) in [("stdout", &stdout), ("stderr", &stderr)] {
            if !text.is_empty() {
                transcript.push_str(&format!("--- {what}\n{text}"));
                if !text.ends_with('\n') {
                    transcript.push_str("\n[no newline at the end]\n");
                }
            }
        }
        transcript.push('\n');
    }
    normalise(&transcript, &dir)
}

/// A readable mismatch: the first differing line, then both texts.
fn mismatch(name: &str, expected: &str, actual: &str) -> String {
    let exp: Vec<&str> = expected.lines().collect();
    let act: Vec<&str> = actual.lines().collect();
    let n = exp.iter().zip(&act).take_while(|(e, a)| e == a).count();
    format!(
        "golden/{name}.txt differs at line {}:\n  expected: {:?}\n  actual:   {:?}\n\
         --- expected\n{expected}--- actual\n{actual}---\n\
         (UPDATE_GOLDEN=1 cargo test -p cli --test golden rewrites the files)\n",
        n + 1,
        exp.get(n).copied().unwrap_or("<end of file>"),
        act.get(n).copied().unwrap_or("<end of output>"),
    )
}

#[test]
fn cli_output_matches_the_golden_files() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| !v.is_empty() && v != "0");
    let terminal = common::have("script");
    let mut failures = Vec::new();
    for (name, commands) in CASES {
        let actual = run_case(name, commands, terminal);
        let path = golden.join(format!("{name}.txt"));
        if update {
            std::fs::create_dir_all(&golden).unwrap();
            std::fs::write(&path, &actual).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(expected) if expected == actual => {}
            Ok(expected) => failures.push(mismatch(name, &expected, &actual)),
            Err(e) => failures.push(format!(
                "golden/{name}.txt: {e} (UPDATE_GOLDEN=1 creates it)\n--- actual\n{actual}"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
