//! Helpers for interop tests: real peers as child processes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether `tool` is installed. Missing tools fail the test under CI=...,
/// and skip it (with a note) otherwise.
pub fn require(tools: &[&str]) -> bool {
    for tool in tools {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            if std::env::var_os("CI").is_some() {
                panic!("{tool} is required when CI is set but is not installed");
            }
            eprintln!("SKIP: {tool} not installed");
            return false;
        }
    }
    true
}

/// A free TCP port on 127.0.0.1, never one this process handed out
/// before, and below Linux's ephemeral range (32768-60999): the tests of
/// this binary run in parallel and its own servers listen on port 0, so a
/// port from that range could be taken by one of them between this check
/// and the peer's bind (a client then talked to the wrong server: resets
/// seen in CI).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Spread concurrent test processes apart.
    let start = (std::process::id() % 1200) * 10;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20000 + ((start + n) % 12000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A child process killed on drop.
pub struct Peer {
    child: Child,
    pub port: u16,
    pub name: String,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawn `cmd` and wait until 127.0.0.1:port accepts connections.
pub fn spawn_tcp(mut cmd: Command, port: u16) -> Peer {
    let name = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let mut peer = Peer { child, port, name };
    let t0 = Instant::now();
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return peer;
        }
        if let Ok(Some(st)) = peer.child.try_wait() {
            panic!("{} exited early: {st}", peer.name);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{} never listened",
            peer.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawn `cmd` and wait until the unix socket `sock` accepts connections
/// (the socket file appears at `bind`, before `listen`: its existence is
/// not enough).
pub fn spawn_unix(mut cmd: Command, sock: &Path) -> Peer {
    let name = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let mut peer = Peer {
        child,
        port: 0,
        name,
    };
    let t0 = Instant::now();
    loop {
        if std::os::unix::net::UnixStream::connect(sock).is_ok() {
            return peer;
        }
        if let Ok(Some(st)) = peer.child.try_wait() {
            panic!("{} exited early: {st}", peer.name);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{} never listened",
            peer.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run a command to completion, panicking with its stderr on failure.
pub fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn sh(script: &str, dir: &Path) -> Vec<u8> {
    run(Command::new("bash")
        .arg("-euc")
        .arg(script)
        .current_dir(dir))
}

/// `nbdinfo --json --map[=ctx] URI` as (offset, length, type), merged.
pub fn nbdinfo_map(uri: &str, ctx: Option<&str>) -> Vec<(u64, u64, u32)> {
    let map = match ctx {
        Some(c) => format!("--map={c}"),
        None => "--map".to_owned(),
    };
    let out = run(Command::new("nbdinfo").args(["--json", &map, uri]));
    let v: serde_json::Value = serde_json::from_slice(&out).expect("nbdinfo json");
    let mut res: Vec<(u64, u64, u32)> = Vec::new();
    for e in v.as_array().expect("array") {
        let o = e["offset"].as_u64().unwrap();
        let l = e["length"].as_u64().unwrap();
        let t = e["type"].as_u64().unwrap() as u32;
        merge_push(&mut res, (o, l, t));
    }
    res
}

pub fn merge_push(v: &mut Vec<(u64, u64, u32)>, e: (u64, u64, u32)) {
    if let Some(last) = v.last_mut()
        && last.0 + last.1 == e.0
        && last.2 == e.2
    {
        last.1 += e.1;
        return;
    }
    v.push(e);
}

/// Test PKI made with rcgen: CA, server cert for localhost/127.0.0.1,
/// client cert, written in qemu's layout under `dir`/server and
/// `dir`/client, plus a wrong CA in `dir`/wrong-ca.
pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
    pub wrong_ca_pem: String,
}

pub fn make_pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Test NBD CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let srv_key = KeyPair::generate().unwrap();
    let mut sp =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    sp.distinguished_name.push(DnType::CommonName, "localhost");
    sp.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let srv_cert = sp.signed_by(&srv_key, &issuer).unwrap();

    let cl_key = KeyPair::generate().unwrap();
    let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
    cp.distinguished_name
        .push(DnType::CommonName, "backup-client");
    cp.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cl_cert = cp.signed_by(&cl_key, &issuer).unwrap();

    let wrong_key = KeyPair::generate().unwrap();
    let mut wp = CertificateParams::new(Vec::<String>::new()).unwrap();
    wp.distinguished_name.push(DnType::CommonName, "Other CA");
    wp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let wrong = wp.self_signed(&wrong_key).unwrap();

    let pki = Pki {
        dir: dir.to_path_buf(),
        ca_pem: ca_cert.pem(),
        server_cert_pem: srv_cert.pem(),
        server_key_pem: srv_key.serialize_pem(),
        client_cert_pem: cl_cert.pem(),
        client_key_pem: cl_key.serialize_pem(),
        wrong_ca_pem: wrong.pem(),
    };
    for (sub, files) in [
        (
            "server",
            vec![
                ("ca-cert.pem", &pki.ca_pem),
                ("server-cert.pem", &pki.server_cert_pem),
                ("server-key.pem", &pki.server_key_pem),
            ],
        ),
        (
            "client",
            vec![
                ("ca-cert.pem", &pki.ca_pem),
                ("client-cert.pem", &pki.client_cert_pem),
                ("client-key.pem", &pki.client_key_pem),
            ],
        ),
        ("wrong-ca", vec![("ca-cert.pem", &pki.wrong_ca_pem)]),
    ] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        for (n, c) in files {
            std::fs::write(dir.join(sub).join(n), c).unwrap();
        }
    }
    pki
}
