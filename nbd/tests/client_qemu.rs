//! Client against qemu-nbd: reads, block status, TLS.

use crate::common;

use std::process::Command;

use common::*;
use nbd::ErrorKind;
use nbd::client::{Address, Client, ConnectOptions, TlsClientConfig};

const MIB: u64 = 1 << 20;

/// base.qcow2 (64 MiB, 0x11 in the first 8 MiB) <- vm.qcow2 overlay with
/// a dirty bitmap cbt0 recording two writes.
fn make_images(dir: &std::path::Path) {
    sh(
        "qemu-img create -q -f qcow2 base.qcow2 64M
         qemu-io -c 'write -q -P 0x11 0 8M' base.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 vm.qcow2
         qemu-img bitmap --add --enable --granularity 64K vm.qcow2 cbt0
         qemu-io -c 'write -q -P 0x22 1M 2M' -c 'write -q -P 0x33 40M 512K' -c 'write -q -z 50M 1M' vm.qcow2 >/dev/null
         qemu-img convert -f qcow2 -O raw vm.qcow2 ref.raw",
        dir,
    );
}

fn qemu_nbd(dir: &std::path::Path, extra: &[&str]) -> Peer {
    let port = free_port();
    let mut c = Command::new("qemu-nbd");
    c.current_dir(dir)
        .args([
            "-t",
            "-r",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-x",
            "vm",
            "-f",
            "qcow2",
        ])
        .args(["-e", "8", "--bitmap", "cbt0", "-A"])
        .args(extra)
        .arg("vm.qcow2");
    spawn_tcp(c, port)
}

fn opts(port: u16) -> ConnectOptions {
    ConnectOptions::new(
        Address::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
        "vm",
    )
    .meta_context("base:allocation")
    .meta_context("qemu:dirty-bitmap:cbt0")
    .meta_context("qemu:allocation-depth")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_block_status_match_qemu() {
    if !require(&["qemu-nbd", "qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make_images(dir.path());
    let peer = qemu_nbd(dir.path(), &[]);
    let reference = std::fs::read(dir.path().join("ref.raw")).unwrap();

    let client = Client::connect(&opts(peer.port).connections(2))
        .await
        .unwrap();
    assert_eq!(client.size(), 64 * MIB);
    assert!(client.can_multi_conn());
    assert_eq!(client.connection_count(), 2);
    assert!(client.structured_replies());
    assert!(client.is_read_only());
    assert_eq!(client.meta_contexts().len(), 3);
    let bs = client.block_size();
    assert!(bs.min >= 1 && bs.max >= bs.min, "{bs:?}");

    // whole disk in one call: split at the max block size, many in flight
    let all = client.read(0, reference.len()).await.unwrap();
    assert!(
        all == reference[..],
        "whole-disk read differs from qemu-img's view"
    );
    // unaligned small reads across layer boundaries
    for (off, len) in [
        (MIB - 3, 7usize),
        (3 * MIB - 100, 300),
        (40 * MIB + 511, 1),
        (64 * MIB - 5, 5),
    ] {
        let b = client.read(off, len).await.unwrap();
        assert_eq!(
            &b[..],
            &reference[off as usize..off as usize + len],
            "read {off}+{len}"
        );
    }
    let mut buf = vec![0u8; 4096];
    client.read_into(MIB, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0x22));

    // base:allocation and dirty bitmap equal nbdinfo's view
    let uri = format!("nbd://127.0.0.1:{}/vm", peer.port);
    for ctx in [
        "base:allocation",
        "qemu:dirty-bitmap:cbt0",
        "qemu:allocation-depth",
    ] {
        let ours: Vec<_> = client
            .block_status(0, client.size(), ctx)
            .await
            .unwrap()
            .iter()
            .map(|e| (e.offset, e.length, e.flags))
            .collect();
        let theirs = nbdinfo_map(&uri, (ctx != "base:allocation").then_some(ctx));
        assert_eq!(ours, theirs, "{ctx}");
    }
    let dirty = client
        .block_status(0, client.size(), "qemu:dirty-bitmap:cbt0")
        .await
        .unwrap();
    let d: Vec<_> = dirty
        .iter()
        .filter(|e| e.is_dirty())
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(
        d,
        vec![(MIB, 2 * MIB), (40 * MIB, MIB / 2), (50 * MIB, MIB)]
    );
    // a sub-range is clipped exactly
    let part = client
        .block_status(MIB + 4096, 4096, "base:allocation")
        .await
        .unwrap();
    assert_eq!(part.len(), 1);
    assert_eq!((part[0].offset, part[0].length), (MIB + 4096, 4096));

    // errors name what was wrong
    let e = client.read(64 * MIB - 1, 2).await.unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::OutOfRange { .. }), "{e}");
    let e = client
        .block_status(0, 4096, "qemu:dirty-bitmap:nope")
        .await
        .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::Unsupported(_)), "{e}");
    let e = client.write(0, b"x").await.unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");

    // listing
    let listed = nbd::client::list_exports(&opts(peer.port)).await.unwrap();
    assert_eq!(
        listed.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["vm"]
    );
    let ctxs = nbd::client::list_meta_contexts(&opts(peer.port), &["qemu:dirty-bitmap:"])
        .await
        .unwrap();
    assert_eq!(ctxs, ["qemu:dirty-bitmap:cbt0"]);
    let e = Client::connect(&ConnectOptions::new(
        Address::Tcp {
            host: "127.0.0.1".into(),
            port: peer.port,
        },
        "missing",
    ))
    .await
    .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::ExportNotFound), "{e}");
    client.disconnect().await.unwrap();
    assert!(client.read(0, 1).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_and_uri() {
    if !require(&["qemu-nbd", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    sh(
        "qemu-img create -q -f raw d.raw 4M && printf 'hello' | dd of=d.raw conv=notrunc status=none",
        dir.path(),
    );
    let sock = dir.path().join("n.sock");
    let mut cmd = Command::new("qemu-nbd");
    cmd.current_dir(dir.path()).args([
        "-t",
        "-k",
        sock.to_str().unwrap(),
        "-x",
        "d",
        "-f",
        "raw",
        "d.raw",
    ]);
    let _peer = spawn_unix(cmd, &sock);
    let c = Client::connect_uri(&format!("nbd+unix:///d?socket={}", sock.display()))
        .await
        .unwrap();
    assert_eq!(&c.read(0, 5).await.unwrap()[..], b"hello");
    c.write(4096, b"world").await.unwrap();
    c.flush().await.unwrap();
    c.write_zeroes(0, 4096, true).await.unwrap();
    c.trim(MIB, MIB).await.unwrap();
    assert_eq!(&c.read(4096, 5).await.unwrap()[..], b"world");
    assert!(c.read(0, 5).await.unwrap().iter().all(|&b| b == 0));
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_cert_and_wrong_ca() {
    if !require(&["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make_images(dir.path());
    let pki = make_pki(&dir.path().join("pki"));
    let obj = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=on",
        dir.path().join("pki/server").display()
    );
    let peer = qemu_nbd(dir.path(), &["--object", &obj, "--tls-creds", "tls0"]);
    let reference = std::fs::read(dir.path().join("ref.raw")).unwrap();
    let tls = TlsClientConfig {
        ca_pem: pki.ca_pem.clone().into_bytes(),
        client_cert_pem: Some(pki.client_cert_pem.clone().into_bytes()),
        client_key_pem: Some(pki.client_key_pem.clone().into_bytes()),
        server_name: "localhost".into(),
    };
    let c = Client::connect(&opts(peer.port).tls(tls.clone()))
        .await
        .unwrap();
    let b = c.read(0, 16 * MIB as usize).await.unwrap();
    assert!(b[..] == reference[..16 * MIB as usize]);
    let ext = c
        .block_status(0, c.size(), "qemu:dirty-bitmap:cbt0")
        .await
        .unwrap();
    assert!(ext.iter().any(|e| e.is_dirty()));
    // nbds:// URI with a certificate directory
    let c2 = Client::connect_uri(&format!(
        "nbds://127.0.0.1:{}/vm?tls-certificates={}",
        peer.port,
        dir.path().join("pki/client").display()
    ))
    .await
    .unwrap();
    assert_eq!(c2.size(), 64 * MIB);

    // plaintext against a TLS-only server: a clear error
    let e = Client::connect(&opts(peer.port)).await.unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::TlsRequired), "{e}");
    assert!(e.to_string().contains("server requires TLS"));
    // wrong CA: refused
    let mut wrong = tls.clone();
    wrong.ca_pem = pki.wrong_ca_pem.clone().into_bytes();
    let e = Client::connect(&opts(peer.port).tls(wrong))
        .await
        .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::Tls(_)), "{e}");
    // no client certificate while the server verifies peers: refused
    let mut anon = tls.clone();
    anon.client_cert_pem = None;
    anon.client_key_pem = None;
    let e = Client::connect(&opts(peer.port).tls(anon))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("requires a client certificate"),
        "{e}"
    );
    // nbds:// without a CA is refused before connecting
    let e = Client::connect_uri(&format!("nbds://127.0.0.1:{}/vm", peer.port))
        .await
        .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::Tls(_)), "{e}");
}
