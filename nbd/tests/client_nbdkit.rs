//! Client against nbdkit with fault and latency injection.

use crate::common;

use std::process::Command;

use common::*;
use nbd::ErrorKind;
use nbd::client::{Address, Client, ConnectOptions};

fn nbdkit(args: &[&str]) -> Peer {
    let port = free_port();
    let mut c = Command::new("nbdkit");
    c.args(["-f", "-i", "127.0.0.1", "-p", &port.to_string()])
        .args(args);
    spawn_tcp(c, port)
}

/// Connects to the nbdkit peer on `port`. An I/O error during the
/// handshake (a reset) is retried, up to 5 times 200 ms apart and each
/// printed: two clean CI runs saw nbdkit reset the first connection after
/// its start (never reproduced locally, under load or not, in 100 runs);
/// these tests are about what happens after the handshake, which the
/// qemu-nbd and own-server tests check without retries.
async fn connect(port: u16) -> Client {
    let mut tries = 0;
    loop {
        match Client::connect(&opts(port)).await {
            Ok(c) => return c,
            Err(e) if tries < 5 && matches!(e.kind(), ErrorKind::Io) => {
                tries += 1;
                eprintln!("connecting to nbdkit on port {port} (try {tries}): {e:?}; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("connecting to nbdkit on port {port}: {e:?}"),
        }
    }
}

fn opts(port: u16) -> ConnectOptions {
    ConnectOptions::new(
        Address::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
        "",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_names_offset_and_connection_survives() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("fail");
    let trig = format!("error-pread-file={}", trigger.display());
    let peer = nbdkit(&[
        "--filter=error",
        "pattern",
        "64M",
        "error-pread=EIO",
        "error-pread-rate=1",
        &trig,
    ]);
    let c = connect(peer.port).await;
    let first = c.read(4096, 8).await.unwrap();

    std::fs::write(&trigger, b"").unwrap();
    let off = 12_345 * 4096;
    let e = c.read(off, 4096).await.unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::Server { errno: 5, .. }),
        "{e}"
    );
    assert_eq!(e.offset(), Some(off));
    assert!(e.to_string().contains(&format!("offset {off}")), "{e}");
    assert!(e.to_string().contains("EIO"), "{e}");
    assert!(!e.is_retryable());

    std::fs::remove_file(&trigger).unwrap();
    // same connection, next request works
    assert_eq!(c.read(4096, 8).await.unwrap(), first);

    // random failures: every request completes, some fail, none hangs
    drop(peer);
    let peer = nbdkit(&[
        "--filter=error",
        "pattern",
        "64M",
        "error-pread=EIO",
        "error-pread-rate=0.5",
    ]);
    let c = connect(peer.port).await;
    let futs = (0..64u64).map(|i| {
        let c = c.clone();
        async move { c.read(i * 65536, 65536).await }
    });
    let results = futures::future::join_all(futs).await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert!(failed > 0 && failed < 64, "{failed} of 64 failed");
    for (i, r) in results.iter().enumerate() {
        if let Err(e) = r {
            assert_eq!(e.offset(), Some(i as u64 * 65536), "{e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_keeps_many_reads_in_flight() {
    if !require(&["nbdkit"]) {
        return;
    }
    let peer = nbdkit(&[
        "--threads=32",
        "--filter=delay",
        "memory",
        "64M",
        "rdelay=200ms",
    ]);
    let c = connect(peer.port).await;
    let futs = (0..32u64).map(|i| {
        let c = c.clone();
        async move { c.read(i * 4096, 4096).await }
    });
    for r in futures::future::join_all(futs).await {
        assert!(r.unwrap().iter().all(|&b| b == 0));
    }
    let n = c.max_in_flight();
    assert!(n >= 24, "only {n} requests were in flight at once");
}
