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

/// Spawn `cmd` (a server such as qemu-nbd) and wait until the unix socket
/// `sock` accepts connections: the socket file appears at `bind`, before
/// `listen`, so its existence is not enough. Killed on drop.
#[allow(dead_code, reason = "not every test binary uses every helper")]
pub fn spawn_listening(cmd: &mut Command, sock: &std::path::Path) -> Killed {
    let mut child = Killed(
        cmd.stdin(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")),
    );
    let t0 = std::time::Instant::now();
    loop {
        if std::os::unix::net::UnixStream::connect(sock).is_ok() {
            return child;
        }
        if let Ok(Some(st)) = child.0.try_wait() {
            panic!("{cmd:?} exited early: {st}");
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(15),
            "{cmd:?} never listened on {}",
            sock.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
