//! Shared by the CLI's integration tests.

use std::process::Command;

/// Whether the external `tool` (qemu-img, nbdcopy, ...) is installed.
/// Outside CI a missing tool skips the test; with `CI` set it fails it
/// (`scripts/test` installs them).
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
