//! Throughput benchmark against real peers (not a test).
//!
//! ```text
//! cargo run --release -p nbd --example bench -- [SIZE_MIB] [RUNS]
//! ```
//!
//! Makes an incompressible raw file of SIZE_MIB (default 2048) in a temp
//! dir (page cache warm), then measures, median of RUNS (default 3):
//!
//! 1. `nbdcopy nbd://qemu-nbd null:` vs this crate's client reading the
//!    same qemu-nbd export into a null sink (1 and 4 connections;
//!    BENCH_WORKERS readers, default 16, of BENCH_CHUNK_KIB, default 1024);
//! 2. `nbdcopy` from this crate's server (FileExport) vs from qemu-nbd.
//!
//! Needs qemu-nbd and nbdcopy on PATH.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark program: a failed step ends the run"
)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nbd::client::{Address, Client, ConnectOptions};
use nbd::server::{FileExport, Server, ServerConfig};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One pass over the export with BENCH_WORKERS readers of BENCH_CHUNK_KIB each; with
/// `reuse` every worker passes its buffer back in (no allocation per read).
async fn client_pass(port: u16, conns: usize, size: u64, reuse: bool) -> f64 {
    let t = Instant::now();
    let opts = ConnectOptions::new(
        Address::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
        "big",
    )
    .connections(conns);
    let c = Client::connect(&opts).await.unwrap();
    let chunk_len = chunk();
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..workers())
        .map(|_| {
            let (c, next) = (c.clone(), next.clone());
            tokio::spawn(async move {
                let mut sink = 0u64;
                let mut buf = BytesMut::new();
                loop {
                    let off = next.fetch_add(chunk_len, Ordering::Relaxed);
                    if off >= size {
                        return sink;
                    }
                    let n = chunk_len.min(size - off) as usize;
                    if reuse {
                        buf = c.read_with_buffer(off, n, buf).await.unwrap();
                        sink = sink.wrapping_add(buf[0] as u64);
                    } else {
                        let b = c.read(off, n).await.unwrap();
                        sink = sink.wrapping_add(b[0] as u64);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        std::hint::black_box(w.await.unwrap());
    }
    c.disconnect().await.unwrap();
    t.elapsed().as_secs_f64()
}

fn time_once(args: &[&str]) -> f64 {
    let t = Instant::now();
    let st = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{args:?} failed");
    t.elapsed().as_secs_f64()
}

/// Request size (env BENCH_CHUNK_KIB, default 1024).
fn chunk() -> u64 {
    std::env::var("BENCH_CHUNK_KIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024u64)
        << 10
}

/// Concurrent readers (env BENCH_WORKERS, default 16).
fn workers() -> usize {
    std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}

fn wait_port(port: u16) {
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("port {port} never opened");
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args.get(1).map_or(2048, |s| s.parse().expect("SIZE_MIB"));
    let runs: usize = args.get(2).map_or(3, |s| s.parse().expect("RUNS"));
    let size = mib << 20;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.raw");
    {
        use std::io::Write;
        let mut f =
            std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&file).unwrap());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for c in buf.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&buf).unwrap();
        }
    }
    let mb = mib as f64;
    println!("size {mib} MiB, median of {runs} runs");

    let qport = free_port();
    let _q = Kill(
        Command::new("qemu-nbd")
            .args([
                "-t",
                "-r",
                "-e",
                "8",
                "-b",
                "127.0.0.1",
                "-p",
                &qport.to_string(),
                "-x",
                "big",
                "-f",
                "raw",
            ])
            .arg(&file)
            .spawn()
            .expect("qemu-nbd"),
    );
    wait_port(qport);
    let quri = format!("nbd://127.0.0.1:{qport}/big");
    let server = Server::new(ServerConfig::default()).unwrap();
    server.add_export("big", Arc::new(FileExport::open(&file).unwrap()));
    let addr = server
        .listen_tcp("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let ouri = format!("nbd://127.0.0.1:{}/big", addr.port());

    // interleave the runs so that noise from other processes hits all alike
    let mut t = vec![Vec::new(); 5];
    for _ in 0..runs {
        let q = quri.clone();
        t[0].push(
            tokio::task::spawn_blocking(move || time_once(&["nbdcopy", &q, "null:"]))
                .await
                .unwrap(),
        );
        t[1].push(client_pass(qport, 1, size, true).await);
        t[2].push(client_pass(qport, 1, size, false).await);
        t[3].push(client_pass(qport, 4, size, true).await);
        let o = ouri.clone();
        t[4].push(
            tokio::task::spawn_blocking(move || time_once(&["nbdcopy", &o, "null:"]))
                .await
                .unwrap(),
        );
    }
    server.shutdown().await;
    let m: Vec<f64> = t.into_iter().map(median).collect();
    let (t_nbdcopy_q, t_ours_1, t_ours_alloc, t_ours_4, t_nbdcopy_o) =
        (m[0], m[1], m[2], m[3], m[4]);
    println!("| path | seconds | MiB/s | ratio |");
    println!("|---|---|---|---|");
    let row =
        |n: &str, t: f64, base: f64| println!("| {n} | {t:.3} | {:.0} | {:.2} |", mb / t, base / t);
    let k = chunk() >> 10;
    let w = workers();
    row(
        "nbdcopy qemu-nbd -> null: (reference)",
        t_nbdcopy_q,
        t_nbdcopy_q,
    );
    row(
        &format!("nbd client qemu-nbd -> null, 1 conn, {w} x {k} KiB, reused buffers"),
        t_ours_1,
        t_nbdcopy_q,
    );
    row(
        &format!("nbd client qemu-nbd -> null, 1 conn, {w} x {k} KiB, Client::read"),
        t_ours_alloc,
        t_nbdcopy_q,
    );
    row(
        &format!("nbd client qemu-nbd -> null, 4 conns, {w} x {k} KiB, reused buffers"),
        t_ours_4,
        t_nbdcopy_q,
    );
    row(
        "nbdcopy from nbd::server (FileExport) -> null:",
        t_nbdcopy_o,
        t_nbdcopy_q,
    );
}
