//! Shared by the CLI's integration tests.

use std::process::Command;

/// Whether the external `tool` (qemu-img, nbdcopy, ...) is installed.
/// Outside CI a missing tool skips the test; with `CI` set it fails it
/// (`scripts/test` installs them).
#[allow(dead_code, reason = "not every test binary uses every helper")]
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is required when CI is set (install qemu-utils and libnbd-bin, or run scripts/test)"
        );
        eprintln!("skipping: {tool} not installed");
    }
    found
}

/// The binary under test, without the environment that would point it at
/// a datastore or key of the machine running the tests.
#[allow(dead_code, reason = "not every test binary uses every helper")]
pub fn vmbackup() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmbackup"));
    for var in [
        "VMBACKUP_KEYFILE",
        "VMBACKUP_PASSPHRASE",
        "VMBACKUP_DATASTORE",
    ] {
        c.env_remove(var);
    }
    c
}

/// Exit code and both outputs, for assertion messages.
#[allow(dead_code, reason = "not every test binary uses every helper")]
pub fn text(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run `cmd`; it must succeed; its stdout.
#[allow(dead_code, reason = "not every test binary uses every helper")]
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawning the command");
    assert!(out.status.success(), "{cmd:?} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A child process killed (and reaped) on drop.
#[allow(dead_code, reason = "not every test binary uses every helper")]
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
