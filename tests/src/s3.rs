//! A real S3 server for tests: moto's server (`python -m moto.server`,
//! pinned in `tests/python/requirements.txt`) on a loopback port, and a
//! TCP proxy in front of it that injects faults per connection: 503
//! SlowDown and 500 InternalError answers, and connection resets after the
//! request was sent.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datastore::backend::S3Options;

/// A moto server, killed on drop.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port below Linux's ephemeral range (32768-60999): the servers
/// of the tests running beside this one in the process listen on port 0
/// and could take an ephemeral port between this check and moto's bind.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 1200) * 10 + 5;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20000 + ((start + n) % 12000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Moto {
    /// Start moto (`None`: skipped outside CI without the Python
    /// environment). With `check_credentials`, moto checks access keys
    /// against its (empty) IAM, so every request is refused as
    /// InvalidAccessKeyId.
    pub fn start(check_credentials: bool) -> Option<Moto> {
        let python = crate::python::interpreter()?;
        let port = free_port();
        let mut cmd = Command::new(python);
        cmd.args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if check_credentials {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", "0");
        }
        let child = cmd.spawn().expect("starting moto's server");
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
        };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "moto's server did not listen on port {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(moto)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Create a bucket (moto accepts an unsigned PUT).
    pub fn create_bucket(&self, name: &str) {
        let status = raw_request(
            self.port,
            &format!(
                "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        );
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "creating bucket {name}: {status}"
        );
    }

    /// Options reaching `s3://bucket/prefix` on this server (any
    /// credentials, plain HTTP, quick retries).
    pub fn options(&self, bucket: &str, prefix: &str) -> S3Options {
        options_at(&self.endpoint, bucket, prefix)
    }
}

/// Options for `s3://bucket/prefix` at `endpoint`.
pub fn options_at(endpoint: &str, bucket: &str, prefix: &str) -> S3Options {
    S3Options {
        url: match prefix.is_empty() {
            true => format!("s3://{bucket}"),
            false => format!("s3://{bucket}/{prefix}"),
        },
        endpoint: Some(endpoint.to_owned()),
        region: Some("us-east-1".into()),
        access_key_id: Some("AKIAIOSFODNN7EXAMPLE".into()),
        secret_access_key: Some("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into()),
        allow_http: true,
        max_retries: Some(5),
        retry_timeout: Some(Duration::from_secs(30)),
        ..S3Options::default()
    }
}

/// Send one raw HTTP request; the status line of the answer.
fn raw_request(port: u16, request: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to moto");
    s.write_all(request.as_bytes()).expect("sending");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_owned()
}

/// What the proxy does with one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward it.
    Pass,
    /// Read the request, answer 503 SlowDown.
    SlowDown,
    /// Read the request, answer 500 InternalError.
    InternalError,
    /// Read the request, then reset the connection (no answer).
    Reset,
    /// Forward the request, wait for the server's answer, then reset the
    /// connection instead of passing the answer on: the request took
    /// effect, the client does not know.
    LoseAnswer,
}

/// A fault-injecting TCP proxy to a server; faults are taken in order, one
/// per connection, then connections pass. Stops with the process.
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    faults: Arc<Mutex<VecDeque<Fault>>>,
    connections: Arc<AtomicUsize>,
}

impl FaultProxy {
    /// A proxy to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let faults: Arc<Mutex<VecDeque<Fault>>> = Arc::default();
        let connections: Arc<AtomicUsize> = Arc::default();
        let (f, n) = (faults.clone(), connections.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                n.fetch_add(1, Ordering::SeqCst);
                let fault = f.lock().unwrap().pop_front().unwrap_or(Fault::Pass);
                std::thread::spawn(move || serve(conn, upstream, fault));
            }
        });
        FaultProxy {
            endpoint: format!("http://127.0.0.1:{port}"),
            faults,
            connections,
        }
    }

    /// Queue faults for the next connections.
    pub fn inject(&self, faults: &[Fault]) {
        self.faults.lock().unwrap().extend(faults.iter().copied());
    }

    /// Faults queued and not yet used.
    pub fn pending(&self) -> usize {
        self.faults.lock().unwrap().len()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Read one request (head and a Content-Length body) from `conn`; its
/// bytes.
fn read_request(conn: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    let head_end = loop {
        let n = conn.read(&mut byte).unwrap_or(0);
        if n == 0 {
            return buf;
        }
        buf.extend_from_slice(&byte[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() - head_end < len {
        let n = conn.read(&mut byte).unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&byte[..n]);
    }
    buf
}

fn serve(mut conn: TcpStream, upstream: u16, fault: Fault) {
    match fault {
        Fault::Pass => {
            let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                return;
            };
            let (mut a, mut b) = (conn.try_clone().unwrap(), up.try_clone().unwrap());
            let t = std::thread::spawn(move || {
                let _ = std::io::copy(&mut a, &mut b);
                let _ = b.shutdown(std::net::Shutdown::Write);
            });
            let (mut up, mut conn2) = (up, conn);
            let _ = std::io::copy(&mut up, &mut conn2);
            let _ = conn2.shutdown(std::net::Shutdown::Write);
            let _ = t.join();
        }
        Fault::SlowDown | Fault::InternalError => {
            read_request(&mut conn);
            let (status, code) = match fault {
                Fault::SlowDown => ("503 Slow Down", "SlowDown"),
                _ => ("500 Internal Server Error", "InternalError"),
            };
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected</Message></Error>"
            );
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
        Fault::Reset => {
            read_request(&mut conn);
            let _ = socket_linger_zero(&conn);
        }
        Fault::LoseAnswer => {
            let request = read_request(&mut conn);
            if let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) {
                let _ = up.write_all(&request);
                let mut answer = [0u8; 512];
                let _ = up.read(&mut answer);
            }
            let _ = socket_linger_zero(&conn);
        }
    }
}

/// Close with SO_LINGER 0: the peer gets a reset, not an orderly close.
fn socket_linger_zero(conn: &TcpStream) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(conn);
    sock.set_linger(Some(Duration::ZERO))
}
