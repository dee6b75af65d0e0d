//! The server's bounds: in-flight budgets, cancellation when a client goes
//! away, bounded shutdown and I/O timeouts. Exports here count (or block)
//! their reads so that the tests see what the server asks of them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nbd::client::{Address, Client, ConnectOptions};
use nbd::server::{Export, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Run a test body, failing (instead of hanging) after `secs`.
async fn bounded(secs: u64, body: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(secs), body)
        .await
        .expect("test did not finish in time");
}

/// Wait until `cond` holds, failing after `limit`.
async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A current and a highest value (bytes or reads in flight).
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl Gauge {
    fn now(&self) -> usize {
        self.now.load(Ordering::SeqCst)
    }
    fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

/// Adds to gauges while alive: export futures hold one, so the gauges
/// count futures the server has not dropped yet.
struct Held(Vec<(Arc<Gauge>, usize)>);

impl Held {
    fn new(gauges: &[(&Arc<Gauge>, usize)]) -> Self {
        for (g, n) in gauges {
            let v = g.now.fetch_add(*n, Ordering::SeqCst) + n;
            g.max.fetch_max(v, Ordering::SeqCst);
        }
        Held(gauges.iter().map(|(g, n)| (Arc::clone(g), *n)).collect())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for (g, n) in &self.0 {
            g.now.fetch_sub(*n, Ordering::SeqCst);
        }
    }
}

/// Reads at or past `hang_from` never complete; earlier ones return
/// `0x5a` bytes at once. `live` counts read futures not yet dropped,
/// `reads` all reads asked for.
struct HangingExport {
    size: u64,
    hang_from: u64,
    data: Bytes,
    live: Arc<Gauge>,
    reads: AtomicUsize,
}

impl HangingExport {
    fn new(size: u64, hang_from: u64) -> Self {
        HangingExport {
            size,
            hang_from,
            data: Bytes::from(vec![0x5a; 32 * MIB as usize]),
            live: Arc::default(),
            reads: AtomicUsize::new(0),
        }
    }
}

#[async_trait::async_trait]
impl Export for HangingExport {
    fn size(&self) -> u64 {
        self.size
    }
    async fn read(&self, offset: u64, len: u32) -> nbd::Result<Bytes> {
        let _held = Held::new(&[(&self.live, 1)]);
        self.reads.fetch_add(1, Ordering::SeqCst);
        if offset >= self.hang_from {
            std::future::pending::<()>().await;
        }
        Ok(self.data.slice(..len as usize))
    }
}

/// Reads block until the gate opens; gauges count reads and bytes in
/// flight, for this export (one client each) and for all together.
struct GatedExport {
    index: u8,
    gate: watch::Receiver<bool>,
    reads: Arc<Gauge>,
    bytes: Arc<Gauge>,
    all_bytes: Arc<Gauge>,
}

impl GatedExport {
    fn new(index: u8, gate: watch::Receiver<bool>, all_bytes: Arc<Gauge>) -> Self {
        GatedExport {
            index,
            gate,
            reads: Arc::default(),
            bytes: Arc::default(),
            all_bytes,
        }
    }
}

/// The byte of export `index` at `offset`: one value per 4 MiB.
fn pattern(index: u8, offset: u64) -> u8 {
    ((offset >> 22) as u8).wrapping_add(index.wrapping_mul(64))
}

#[async_trait::async_trait]
impl Export for GatedExport {
    fn size(&self) -> u64 {
        1 << 30
    }
    async fn read(&self, offset: u64, len: u32) -> nbd::Result<Bytes> {
        let n = len as usize;
        let _held = Held::new(&[(&self.reads, 1), (&self.bytes, n), (&self.all_bytes, n)]);
        let _ = self.gate.clone().wait_for(|open| *open).await;
        Ok(Bytes::from(vec![pattern(self.index, offset); n]))
    }
}

async fn listen(server: &Server) -> SocketAddr {
    server
        .listen_tcp("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// A raw client after the handshake (`NBD_OPT_GO`, simple replies).
async fn raw_connect(addr: SocketAddr, export: &str) -> TcpStream {
    raw_handshake(TcpStream::connect(addr).await.unwrap(), export).await
}

/// Like [`raw_connect`], with a small receive buffer (no autotuning).
async fn raw_connect_small_buffer(addr: SocketAddr, export: &str) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(64 * 1024).unwrap();
    raw_handshake(sock.connect(addr).await.unwrap(), export).await
}

async fn raw_handshake(mut s: TcpStream, export: &str) -> TcpStream {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).await.unwrap();
    s.write_all(&3u32.to_be_bytes()).await.unwrap(); // fixed newstyle, no zeroes
    let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes()); // GO
    opt.extend_from_slice(&(6 + export.len() as u32).to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
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
            return s;
        }
        assert_eq!(kind, 3, "INFO expected");
    }
}

fn request(command: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
    v.extend_from_slice(&0u16.to_be_bytes());
    v.extend_from_slice(&command.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// Send READs of `len` bytes at `offsets` (cookie = index).
async fn send_reads(s: &mut TcpStream, offsets: impl IntoIterator<Item = u64>, len: u32) {
    let mut batch = Vec::new();
    for (i, off) in offsets.into_iter().enumerate() {
        batch.extend_from_slice(&request(0, i as u64, off, len));
    }
    s.write_all(&batch).await.unwrap();
}

/// (a) A client that queues reads and drops its socket: the server drops
/// the export's read futures (also of requests still waiting for
/// admission) and the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_aborts_in_flight_reads() {
    bounded(20, async {
        let server = Server::new(ServerConfig::default()).unwrap();
        let export = Arc::new(HangingExport::new(GIB, 0));
        server.add_export("disk", export.clone());
        let addr = listen(&server).await;
        let mut s = raw_connect(addr, "disk").await;
        // 48 reads of 1 MiB: 32 fit the default budget of 32 MiB, 16 wait
        send_reads(&mut s, (0..48).map(|i| i * MIB), MIB as u32).await;
        eventually("budget full", Duration::from_secs(5), || {
            export.live.now() == 32
        })
        .await;
        assert_eq!(server.connections(), 1);
        drop(s);
        eventually(
            "read futures dropped after the client left",
            Duration::from_secs(2),
            || export.live.now() == 0 && server.connections() == 0,
        )
        .await;
        assert_eq!(export.live.max(), 32, "per-connection budget");
        server.shutdown().await;
    })
    .await;
}

/// (b) Shutdown returns although an export never answers, closing
/// connections in the transmission phase and in the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_when_an_export_never_answers() {
    bounded(20, async {
        let server = Server::new(ServerConfig::default()).unwrap();
        let export = Arc::new(HangingExport::new(GIB, 0));
        server.add_export("disk", export.clone());
        let addr = listen(&server).await;
        let mut s = raw_connect(addr, "disk").await;
        send_reads(&mut s, (0..8).map(|i| i * MIB), MIB as u32).await;
        eventually("reads started", Duration::from_secs(5), || {
            export.live.now() == 8
        })
        .await;
        // a second client stays in the handshake
        let mut greeted = TcpStream::connect(addr).await.unwrap();
        let mut hello = [0u8; 18];
        greeted.read_exact(&mut hello).await.unwrap();
        assert_eq!(server.connections(), 2);

        tokio::time::timeout(Duration::from_secs(2), server.shutdown())
            .await
            .expect("shutdown did not return within 2 s");
        assert_eq!(server.connections(), 0);
        assert_eq!(export.live.now(), 0, "read futures were not dropped");
        // both clients see their connection closed, without replies
        for c in [&mut s, &mut greeted] {
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest).await;
            assert!(rest.is_empty());
        }
    })
    .await;
}

/// (c) Four clients each queue 64 reads of 4 MiB: the export never has
/// more than the server-wide budget, nor one connection more than its
/// own, in flight; once released, every reply arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_bound_bytes_in_flight_per_connection_and_in_total() {
    const CONN: usize = 8 << 20;
    const TOTAL: usize = 16 << 20;
    const READ: usize = 4 << 20;
    bounded(60, async {
        let server = Server::new(ServerConfig {
            max_in_flight_bytes: CONN,
            max_total_in_flight_bytes: TOTAL,
            ..Default::default()
        })
        .unwrap();
        let (open, gate) = watch::channel(false);
        let all_bytes = Arc::new(Gauge::default());
        let exports: Vec<_> = (0..4u8)
            .map(|i| {
                let e = Arc::new(GatedExport::new(i, gate.clone(), all_bytes.clone()));
                server.add_export(format!("d{i}"), e.clone());
                e
            })
            .collect();
        let addr = listen(&server).await;
        let mut clients = Vec::new();
        for i in 0..4u8 {
            let opts = ConnectOptions::new(Address::tcp(addr), format!("d{i}"))
                .max_request_size(READ as u32);
            let c = Client::connect(&opts).await.unwrap();
            clients.push(tokio::spawn(async move {
                let reads = (0..64u64).map(|k| {
                    let c = c.clone();
                    async move { (k, c.read(k * READ as u64, READ).await) }
                });
                for (k, r) in futures::future::join_all(reads).await {
                    let data = r.unwrap();
                    let want = pattern(i, k * READ as u64);
                    assert_eq!(data.len(), READ);
                    assert!(data.iter().all(|&b| b == want), "client {i} read {k}");
                }
            }));
        }
        eventually("total budget used", Duration::from_secs(10), || {
            all_bytes.now() == TOTAL
        })
        .await;
        // give the server a chance to overshoot
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(all_bytes.now(), TOTAL);
        open.send(true).unwrap();
        for c in clients {
            c.await.unwrap();
        }
        assert!(all_bytes.max() <= TOTAL, "{} in total", all_bytes.max());
        for (i, e) in exports.iter().enumerate() {
            assert!(e.bytes.max() <= CONN, "{} on connection {i}", e.bytes.max());
            assert_eq!(e.reads.now(), 0);
        }
        server.shutdown().await;
    })
    .await;
}

/// A connection reads no more than `max_in_flight_requests` requests
/// ahead, however small they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_slots_bound_requests_in_flight() {
    bounded(20, async {
        let server = Server::new(ServerConfig {
            max_in_flight_requests: 4,
            ..Default::default()
        })
        .unwrap();
        let (open, gate) = watch::channel(false);
        let export = Arc::new(GatedExport::new(0, gate, Arc::default()));
        server.add_export("disk", export.clone());
        let addr = listen(&server).await;
        let mut s = raw_connect(addr, "disk").await;
        send_reads(&mut s, (0..16).map(|i| i * 4096), 4096).await;
        eventually("slots used", Duration::from_secs(5), || {
            export.reads.now() == 4
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        open.send(true).unwrap();
        for _ in 0..16 {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).await.unwrap();
            assert_eq!(&h[4..8], &[0; 4], "error reply");
            let mut data = vec![0u8; 4096];
            s.read_exact(&mut data).await.unwrap();
        }
        assert_eq!(export.reads.max(), 4);
        server.shutdown().await;
    })
    .await;
}

/// (d) A client that sends reads and never reads the replies: once the
/// socket is full and a write makes no progress for `io_timeout`, the
/// connection ends and the export's pending reads are dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_is_dropped_after_io_timeout() {
    bounded(20, async {
        let server = Server::new(ServerConfig {
            io_timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        })
        .unwrap();
        // reads from 1 GiB on never return
        let export = Arc::new(HangingExport::new(2 * GIB, GIB));
        server.add_export("disk", export.clone());
        let addr = listen(&server).await;
        let mut s = raw_connect(addr, "disk").await;
        send_reads(&mut s, [GIB, GIB + 4096], 4096).await;
        eventually("hanging reads started", Duration::from_secs(5), || {
            export.live.now() == 2
        })
        .await;
        // 256 MiB of replies: far more than the socket buffers hold
        send_reads(&mut s, (0..64).map(|i| i * 4 * MIB), 4 * MIB as u32).await;
        eventually(
            "connection dropped and export work released",
            Duration::from_secs(5),
            || export.live.now() == 0 && server.connections() == 0,
        )
        .await;
        drop(s);
        server.shutdown().await;
    })
    .await;
}

/// Replies waiting for a client that does not read count against the
/// connection's budget until written: the export is not asked for more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_replies_count_against_the_budget() {
    bounded(20, async {
        let server = Server::new(ServerConfig {
            max_in_flight_bytes: 16 << 20,
            io_timeout: None,
            ..Default::default()
        })
        .unwrap();
        let export = Arc::new(HangingExport::new(GIB, GIB));
        server.add_export("disk", export.clone());
        let addr = listen(&server).await;
        let mut s = raw_connect_small_buffer(addr, "disk").await;
        send_reads(&mut s, (0..64).map(|i| i * 4 * MIB), 4 * MIB as u32).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // 4 reads fill the budget; allow 16 MiB more that the sockets
        // absorbed (the server's send buffer, our receive buffer)
        let reads = export.reads.load(Ordering::SeqCst);
        assert!(
            reads <= 4 + 4,
            "{reads} reads of 4 MiB for a client that reads nothing"
        );
        drop(s);
        server.shutdown().await;
    })
    .await;
}

/// `io_timeout` ends a handshake that stalls, but never a client idle
/// between requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_timeout_ends_stalled_handshakes_not_idle_clients() {
    bounded(20, async {
        let server = Server::new(ServerConfig {
            io_timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        })
        .unwrap();
        server.add_export("disk", Arc::new(HangingExport::new(GIB, GIB)));
        let addr = listen(&server).await;
        let idle = Client::connect(&ConnectOptions::new(Address::tcp(addr), "disk"))
            .await
            .unwrap();
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        let mut hello = [0u8; 18];
        stalled.read_exact(&mut hello).await.unwrap();
        let t0 = Instant::now();
        let mut rest = Vec::new();
        let _ = stalled.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
        assert!(
            t0.elapsed() >= Duration::from_millis(250),
            "closed too early"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(&idle.read(0, 4096).await.unwrap()[..], &[0x5a; 4096][..]);
        assert_eq!(server.connections(), 1);
        server.shutdown().await;
    })
    .await;
}

/// After `NBD_CMD_DISC` in-flight requests are still answered when they
/// finish within the shutdown grace; ones that do not are aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disc_finishes_in_flight_requests_within_the_grace() {
    bounded(20, async {
        let server = Server::new(ServerConfig {
            shutdown_grace: Duration::from_millis(300),
            ..Default::default()
        })
        .unwrap();
        let (open, gate) = watch::channel(false);
        let gated = Arc::new(GatedExport::new(1, gate, Arc::default()));
        let hanging = Arc::new(HangingExport::new(GIB, 0));
        server.add_export("gated", gated.clone());
        server.add_export("hanging", hanging.clone());
        let addr = listen(&server).await;

        // answered: released 50 ms after DISC
        let mut s = raw_connect(addr, "gated").await;
        send_reads(&mut s, [0, 4 * MIB], 4096).await;
        eventually("reads started", Duration::from_secs(5), || {
            gated.reads.now() == 2
        })
        .await;
        s.write_all(&request(2, 99, 0, 0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        open.send(true).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest.len(), 2 * (16 + 4096), "both replies, then the end");

        // aborted: never finish, the connection closes after the grace
        let mut s = raw_connect(addr, "hanging").await;
        send_reads(&mut s, [0, MIB], 4096).await;
        eventually("reads started", Duration::from_secs(5), || {
            hanging.live.now() == 2
        })
        .await;
        s.write_all(&request(2, 99, 0, 0)).await.unwrap();
        let t0 = Instant::now();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
        assert!(
            t0.elapsed() >= Duration::from_millis(250),
            "grace not given"
        );
        eventually("read futures dropped", Duration::from_secs(2), || {
            hanging.live.now() == 0 && server.connections() == 0
        })
        .await;
        server.shutdown().await;
    })
    .await;
}
