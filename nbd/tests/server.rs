//! Server against our client and against real clients (qemu-img, nbdcopy,
//! nbdinfo).

use crate::common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use nbd::ErrorKind;
use nbd::client::{Address, Client, ConnectOptions, TlsClientConfig};
use nbd::server::{Export, MemoryExport, Server, ServerConfig, TlsServerConfig};

const MIB: u64 = 1 << 20;

/// 64 MiB, data at 1 MiB (2 MiB of 0x5a), 10 MiB (64 KiB of a counter),
/// and the last 64 KiB; everything else is a hole.
fn disk() -> MemoryExport {
    let d = MemoryExport::new(64 * MIB).with_dirty_bitmap("cbt0");
    d.fill(MIB, &vec![0x5a; 2 * MIB as usize]).unwrap();
    let counter: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    d.fill(10 * MIB, &counter).unwrap();
    d.fill(64 * MIB - 65536, &[0xee; 65536]).unwrap();
    d
}

async fn content(e: &dyn Export) -> Vec<u8> {
    let mut v = Vec::new();
    let mut off = 0;
    while off < e.size() {
        let n = (e.size() - off).min(8 * MIB) as u32;
        v.extend_from_slice(&e.read(off, n).await.unwrap());
        off += n as u64;
    }
    v
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_client_roundtrip() {
    let server = Server::new(ServerConfig::default()).unwrap();
    let export = Arc::new(disk());
    server.add_export("disk", export.clone());
    let addr = server
        .listen_tcp("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let opts = ConnectOptions::new(Address::tcp(addr), "disk")
        .meta_context("base:allocation")
        .meta_context("qemu:dirty-bitmap:cbt0");
    let c = Client::connect(&opts.clone().connections(3)).await.unwrap();
    assert_eq!(c.connection_count(), 3);
    assert!(c.can_multi_conn() && c.structured_replies() && !c.is_read_only());
    let want = content(export.as_ref()).await;
    assert!(c.read(0, want.len()).await.unwrap() == want[..]);

    let ext = c
        .block_status(0, c.size(), "base:allocation")
        .await
        .unwrap();
    let data: Vec<_> = ext
        .iter()
        .filter(|e| !e.is_hole())
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(
        data,
        vec![(MIB, 2 * MIB), (10 * MIB, 65536), (64 * MIB - 65536, 65536)]
    );

    export.clear_dirty();
    c.write(5 * MIB, &[7u8; 8192]).await.unwrap();
    c.write_zeroes(MIB, 65536, false).await.unwrap();
    c.trim(10 * MIB, 65536).await.unwrap();
    c.flush().await.unwrap();
    assert!(c.read(5 * MIB, 8192).await.unwrap().iter().all(|&b| b == 7));
    assert!(c.read(MIB, 65536).await.unwrap().iter().all(|&b| b == 0));
    let dirty: Vec<_> = c
        .block_status(0, c.size(), "qemu:dirty-bitmap:cbt0")
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.is_dirty())
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(
        dirty,
        vec![(MIB, 65536), (5 * MIB, 65536), (10 * MIB, 65536)]
    );

    // a write larger than the maximum block size is split
    let big: Vec<u8> = (0..40 * MIB as usize).map(|i| (i / 4096) as u8).collect();
    c.write(20 * MIB, &big).await.unwrap();
    assert!(c.read(20 * MIB, big.len()).await.unwrap() == big[..]);

    // many tasks at once on one client
    let futs = (0..64u64).map(|i| {
        let c = c.clone();
        async move { c.read(i * MIB, 4096).await.map(|b| b.len()) }
    });
    for r in futures::future::join_all(futs).await {
        assert_eq!(r.unwrap(), 4096);
    }

    // a request past the end, sent raw, is refused by the server
    let e = c.read(64 * MIB, 1).await.unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::OutOfRange { .. }), "{e}");

    // exports come and go while the server runs
    server.add_export("snap", Arc::new(MemoryExport::new(MIB).read_only()));
    let listed: Vec<_> = nbd::client::list_exports(&opts)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(listed, ["disk", "snap"]);
    let s = Client::connect(&ConnectOptions::new(Address::tcp(addr), "snap"))
        .await
        .unwrap();
    assert!(s.is_read_only());
    let e = s.write(0, b"x").await.unwrap_err();
    assert!(e.to_string().contains("read-only"));
    server.remove_export("snap");
    let e = Client::connect(&ConnectOptions::new(Address::tcp(addr), "snap"))
        .await
        .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::ExportNotFound), "{e}");
    // the open connection keeps its export
    assert_eq!(s.read(0, 10).await.unwrap().len(), 10);
    let ctx = nbd::client::list_meta_contexts(&opts, &[]).await.unwrap();
    assert_eq!(ctx, ["base:allocation", "qemu:dirty-bitmap:cbt0"]);

    // graceful shutdown: in-flight requests finish, then connections close
    let inflight: Vec<_> = (0..16u64)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.read(i * 4 * MIB, 4 * MIB as usize).await })
        })
        .collect();
    tokio::task::yield_now().await;
    server.shutdown().await;
    assert_eq!(server.connections(), 0);
    for t in inflight {
        if let Err(e) = t.await.unwrap() {
            assert!(e.is_retryable(), "{e}");
        }
    }
    assert!(c.read(0, 1).await.is_err());
    assert!(tokio::net::TcpStream::connect(addr).await.is_err() || server.connections() == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_and_tls_required() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(&dir.path().join("pki"));
    let server = Server::new(ServerConfig {
        tls: Some(TlsServerConfig {
            cert_pem: pki.server_cert_pem.clone().into_bytes(),
            key_pem: pki.server_key_pem.clone().into_bytes(),
            client_ca_pem: Some(pki.ca_pem.clone().into_bytes()),
        }),
        tls_required: true,
        ..Default::default()
    })
    .unwrap();
    server.add_export("", Arc::new(disk()));
    let sock = dir.path().join("nbd.sock");
    server.listen_unix(&sock).await.unwrap();
    let addr = Address::Unix(sock.clone());
    let e = Client::connect(&ConnectOptions::new(addr.clone(), ""))
        .await
        .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::TlsRequired), "{e}");
    let e = nbd::client::list_exports(&ConnectOptions::new(addr.clone(), ""))
        .await
        .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::TlsRequired), "{e}");
    let tls = TlsClientConfig {
        ca_pem: pki.ca_pem.clone().into_bytes(),
        client_cert_pem: Some(pki.client_cert_pem.clone().into_bytes()),
        client_key_pem: Some(pki.client_key_pem.clone().into_bytes()),
        server_name: "localhost".into(),
    };
    let c = Client::connect(
        &ConnectOptions::new(addr.clone(), "")
            .tls(tls.clone())
            .meta_context("base:allocation"),
    )
    .await
    .unwrap();
    assert_eq!(&c.read(MIB, 4).await.unwrap()[..], &[0x5a; 4]);
    assert_eq!(
        c.block_status(0, MIB, "base:allocation")
            .await
            .unwrap()
            .len(),
        1
    );
    let mut wrong = tls.clone();
    wrong.ca_pem = pki.wrong_ca_pem.clone().into_bytes();
    let e = Client::connect(&ConnectOptions::new(addr.clone(), "").tls(wrong))
        .await
        .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::Tls(_)), "{e}");
    let mut anon = tls;
    anon.client_cert_pem = None;
    anon.client_key_pem = None;
    assert!(
        Client::connect(&ConnectOptions::new(addr, "").tls(anon))
            .await
            .is_err()
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_copy_and_map() {
    if !require(&["qemu-img", "nbdcopy", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::new(ServerConfig::default()).unwrap();
    let export = Arc::new(disk());
    server.add_export("disk", export.clone());
    let target = Arc::new(MemoryExport::new(64 * MIB));
    server.add_export("target", target.clone());
    let addr = server
        .listen_tcp("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let uri = format!("nbd://127.0.0.1:{}/disk", addr.port());
    let want = content(export.as_ref()).await;

    let (d, u) = (dir.path().to_owned(), uri.clone());
    blocking(move || {
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", &u, "-O", "raw"])
            .arg(d.join("qemu.raw")));
        run(Command::new("nbdcopy").arg(&u).arg(d.join("nbdcopy.raw")));
    })
    .await;
    assert!(
        std::fs::read(dir.path().join("qemu.raw")).unwrap() == want,
        "qemu-img convert differs"
    );
    assert!(
        std::fs::read(dir.path().join("nbdcopy.raw")).unwrap() == want,
        "nbdcopy differs"
    );

    // nbdinfo --map shows exactly the holes the export reports
    let u = uri.clone();
    let map = blocking(move || nbdinfo_map(&u, None)).await;
    let mut ours = Vec::new();
    for e in export
        .block_status("base:allocation", 0, 64 * MIB as u32)
        .await
        .unwrap()
    {
        merge_push(&mut ours, (e.offset, e.length, e.flags));
    }
    assert_eq!(map, ours);
    export
        .write(5 * MIB, bytes::Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    let u = uri.clone();
    let dmap = blocking(move || nbdinfo_map(&u, Some("qemu:dirty-bitmap:cbt0"))).await;
    let dirty: Vec<_> = dmap.iter().filter(|e| e.2 == 1).collect();
    assert_eq!(dirty, [&(5 * MIB, 65536, 1)], "{dmap:?}");

    // restore direction: nbdcopy writes into our server
    let t = format!("nbd://127.0.0.1:{}/target", addr.port());
    let src = dir.path().join("qemu.raw");
    blocking(move || run(Command::new("nbdcopy").arg(&src).arg(&t))).await;
    assert!(
        content(target.as_ref()).await == want,
        "nbdcopy into the server differs"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_as_tls_client() {
    if !require(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(&dir.path().join("pki"));
    let server = Server::new(ServerConfig {
        tls: Some(TlsServerConfig {
            cert_pem: pki.server_cert_pem.clone().into_bytes(),
            key_pem: pki.server_key_pem.clone().into_bytes(),
            client_ca_pem: Some(pki.ca_pem.clone().into_bytes()),
        }),
        tls_required: true,
        ..Default::default()
    })
    .unwrap();
    let export = Arc::new(disk());
    server.add_export("disk", export.clone());
    let addr = server
        .listen_tcp("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let want = content(export.as_ref()).await;
    let d = dir.path().to_owned();
    blocking(move || {
        run(Command::new("qemu-img")
            .arg("convert")
            .arg("--object")
            .arg(format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", d.join("pki/client").display()))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=disk,tls-creds=tls0",
                addr.port()
            ))
            .args(["-O", "raw"])
            .arg(d.join("out.raw")));
        // plaintext qemu-img is refused
        let out = Command::new("qemu-img")
            .args(["info", &format!("nbd://127.0.0.1:{}/disk", addr.port())])
            .output()
            .unwrap();
        assert!(!out.status.success());
    })
    .await;
    assert!(std::fs::read(dir.path().join("out.raw")).unwrap() == want);
    server.shutdown().await;
}

/// A raw client sends what our client never would: the server answers
/// with errors naming the problem, and stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_requests_past_the_end_and_bad_commands() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::new(ServerConfig::default()).unwrap();
    server.add_export("disk", Arc::new(MemoryExport::new(MIB).read_only()));
    let addr = server
        .listen_tcp("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).await.unwrap();
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    // GO "disk", no info requests, no structured replies
    let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&10u32.to_be_bytes());
    opt.extend_from_slice(&4u32.to_be_bytes());
    opt.extend_from_slice(b"disk");
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).await.unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await.unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut p = vec![0u8; len as usize];
        s.read_exact(&mut p).await.unwrap();
        if kind == 1 {
            break;
        }
        assert_eq!(kind, 3, "INFO expected");
    }
    let req = |cmd: u16, cookie: u64, off: u64, len: u32| {
        let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
        v.extend_from_slice(&0u16.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&off.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    };
    let reply = async |s: &mut tokio::net::TcpStream| {
        let mut r = [0u8; 16];
        s.read_exact(&mut r).await.unwrap();
        (
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
        )
    };
    s.write_all(&req(0, 7, MIB, 4096)).await.unwrap(); // READ past the end
    assert_eq!(reply(&mut s).await, (22, 7));
    s.write_all(&req(0, 8, u64::MAX - 10, 4096)).await.unwrap(); // offset overflow
    assert_eq!(reply(&mut s).await, (22, 8));
    s.write_all(&req(4, 9, 0, 4096)).await.unwrap(); // TRIM on read-only
    assert_eq!(reply(&mut s).await, (1, 9));
    s.write_all(&req(42, 10, 0, 1)).await.unwrap(); // unknown command
    assert_eq!(reply(&mut s).await, (22, 10));
    s.write_all(&req(7, 11, 0, 4096)).await.unwrap(); // BLOCK_STATUS without contexts
    assert_eq!(reply(&mut s).await, (22, 11));
    s.write_all(&req(0, 12, 0, 64 << 20)).await.unwrap(); // READ larger than max
    assert_eq!(reply(&mut s).await, (22, 12));
    s.write_all(&req(0, 13, 4096, 8)).await.unwrap(); // still in sync
    assert_eq!(reply(&mut s).await, (0, 13));
    let mut data = [1u8; 8];
    s.read_exact(&mut data).await.unwrap();
    assert_eq!(data, [0; 8]);
    // bad magic ends the connection
    s.write_all(&[0u8; 28]).await.unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
    server.shutdown().await;
}
