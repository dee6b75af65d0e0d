//! The real platform clients (Python, from PyPI, pinned in
//! `tests/python/requirements.txt`) that check the mock hypervisor: the
//! interpreter of the virtual environment `scripts/pyenv` creates, and a
//! runner for the contract scripts in `tests/python/`.

use std::path::PathBuf;
use std::process::Command;

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The environment's interpreter (`$VMBACKUP_PYTHON`, else
/// `target/pyenv/bin/python`). `None` (the test skips) when it is missing
/// outside CI; with `CI` set a missing environment fails the test.
pub fn interpreter() -> Option<PathBuf> {
    let path = std::env::var_os("VMBACKUP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/pyenv/bin/python"));
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing: run scripts/pyenv (CI is set, so the real clients are required)",
        path.display()
    );
    eprintln!("skipping: no Python environment (run scripts/pyenv)");
    None
}

/// Run `tests/python/<script>` with `args` and `env`; panics with its
/// output when it fails. Returns its stdout.
pub fn run_script(script: &str, args: &[&str], env: &[(&str, &str)]) -> Option<String> {
    let python = interpreter()?;
    let out = Command::new(python)
        .arg(workspace().join("tests/python").join(script))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("starting python");
    assert!(
        out.status.success(),
        "{script} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a contract script of `tests/python/` (see [`run_script`]) on a
/// blocking thread with `vars` as its environment, and reads the number
/// of client calls it made from its last line (`calls=N ...`). Returns
/// the whole output and that number; panics when the script fails or
/// prints no count.
pub async fn run_contract(
    script: &'static str,
    vars: Vec<(&'static str, String)>,
) -> (String, u64) {
    let out = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_script(script, &[], &env)
    })
    .await
    .expect("contract script")
    .expect("python environment");
    let last = out.lines().last().unwrap_or_default();
    let calls: u64 = last
        .strip_prefix("calls=")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no call count in:\n{out}"));
    (out, calls)
}
