//! The NBD server.
//!
//! A [`Server`] holds a registry of named exports ([`Export`] trait
//! objects) that can change while it runs, listens on any number of TCP
//! and Unix sockets, serves many connections at once (requests of one
//! connection run concurrently too) and optionally offers or requires
//! STARTTLS.
//!
//! ## Bounds
//!
//! Nothing a client sends makes the server hold unbounded memory or work
//! (the limits are [`ServerConfig`] fields):
//!
//! * A connection reads at most [`ServerConfig::max_in_flight_requests`]
//!   requests ahead; further requests stay in the socket until one is
//!   answered.
//! * Every request is charged its payload length (READ and WRITE; other
//!   commands are charged one byte) against two budgets: its
//!   connection's [`ServerConfig::max_in_flight_bytes`] and the
//!   server-wide [`ServerConfig::max_total_in_flight_bytes`], in that
//!   order. The charge is held from before the export is called (before a
//!   WRITE payload is read) until the reply has been handed to the
//!   socket, so replies waiting for a slow reader count too. A request
//!   larger than a budget is charged the whole budget: it waits until it
//!   is alone and then runs. Payload memory in flight is therefore at
//!   most `max(budget, one request)` per budget; requests are at most
//!   32 MiB (the maximum block size announced).
//!
//! ## Cancellation
//!
//! When a client goes away (end of file or an error on its socket, a
//! protocol violation, or a reply that cannot be written) the
//! connection's in-flight requests are aborted: their export futures are
//! dropped, nothing keeps working for a client that is gone. After
//! `NBD_CMD_DISC` the protocol asks the server to finish in-flight
//! requests: they get [`ServerConfig::shutdown_grace`] to finish and be
//! answered, then the rest is aborted.
//!
//! ## Timeouts
//!
//! With [`ServerConfig::io_timeout`] set, a handshake that does not
//! complete in time, a WRITE payload that does not arrive in time, and a
//! reply write that makes no progress in time (a client that stopped
//! reading) end the connection. A client idle between requests is never
//! timed out: idle NBD clients are legitimate.
//!
//! ## Shutdown
//!
//! [`Server::shutdown`] stops accepting at once and closes connections
//! still in the handshake; connections in the transmission phase stop
//! reading requests and get [`ServerConfig::shutdown_grace`] to finish
//! the requests in flight and write their replies. What is left is then
//! aborted and every connection closed, so shutdown returns within about
//! the grace even when an export never answers.

mod conn;
mod export;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, Semaphore, watch};

use crate::error::{Error, Result};
pub use crate::proto::{BlockSize, Extent};
pub use crate::tls::TlsServerConfig;
pub use export::{Export, FileExport, MEMORY_BLOCK, MemoryExport};

/// Default [`ServerConfig::max_in_flight_bytes`]: 32 MiB.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 32 << 20;
/// Default [`ServerConfig::max_total_in_flight_bytes`]: 128 MiB.
pub const DEFAULT_MAX_TOTAL_IN_FLIGHT_BYTES: usize = 128 << 20;
/// Default [`ServerConfig::max_in_flight_requests`]: 64.
pub const DEFAULT_MAX_IN_FLIGHT_REQUESTS: usize = 64;
/// Default [`ServerConfig::io_timeout`]: 120 s.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(120);
/// Default [`ServerConfig::shutdown_grace`]: 500 ms.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// Server settings. Build with `..Default::default()` so that new fields
/// keep their defaults; see the [module docs](self) for how the limits
/// work together.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Offer STARTTLS with this certificate (default: none).
    pub tls: Option<TlsServerConfig>,
    /// Refuse everything but STARTTLS before TLS is up (default: false).
    pub tls_required: bool,
    /// Payload bytes one connection may have in flight, from admission
    /// until the reply is written (default 32 MiB, must be > 0). A single
    /// request larger than this is still served, alone.
    pub max_in_flight_bytes: usize,
    /// Payload bytes all connections together may have in flight
    /// (default 128 MiB, must be > 0). A single request larger than this
    /// is still served, alone.
    pub max_total_in_flight_bytes: usize,
    /// Requests one connection may have read but not yet answered
    /// (default 64, must be > 0); further requests wait in the socket.
    pub max_in_flight_requests: usize,
    /// Limit for the handshake, for a WRITE payload to arrive once its
    /// header did, and for a reply write to make progress (default
    /// 120 s); when it passes, the connection ends. `None`: no limit. A
    /// client idle between requests is never timed out.
    pub io_timeout: Option<Duration>,
    /// How long in-flight requests may still run and be answered after
    /// `NBD_CMD_DISC` or [`Server::shutdown`] before they are aborted
    /// (default 500 ms).
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tls: None,
            tls_required: false,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            max_total_in_flight_bytes: DEFAULT_MAX_TOTAL_IN_FLIGHT_BYTES,
            max_in_flight_requests: DEFAULT_MAX_IN_FLIGHT_REQUESTS,
            io_timeout: Some(DEFAULT_IO_TIMEOUT),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// The limits of [`ServerConfig`], checked, as the connections use them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Payload budget of one connection, in bytes.
    pub(crate) conn_bytes: usize,
    /// Payload budget of all connections together, in bytes.
    pub(crate) total_bytes: usize,
    /// Requests one connection may have in flight.
    pub(crate) requests: usize,
    pub(crate) io_timeout: Option<Duration>,
    pub(crate) shutdown_grace: Duration,
}

impl Limits {
    /// Check the limits of `config`: counts must be positive; they are
    /// capped at what a semaphore can hold.
    fn new(config: &ServerConfig) -> Result<Limits> {
        let positive = |value: usize, name: &str| {
            if value == 0 {
                Err(Error::invalid(format!("{name} must be greater than 0")))
            } else {
                Ok(value.min(Semaphore::MAX_PERMITS))
            }
        };
        Ok(Limits {
            conn_bytes: positive(config.max_in_flight_bytes, "max_in_flight_bytes")?,
            total_bytes: positive(
                config.max_total_in_flight_bytes,
                "max_total_in_flight_bytes",
            )?,
            requests: positive(config.max_in_flight_requests, "max_in_flight_requests")?,
            io_timeout: config.io_timeout,
            shutdown_grace: config.shutdown_grace,
        })
    }
}

pub(crate) struct Inner {
    pub(crate) exports: RwLock<BTreeMap<String, Arc<dyn Export>>>,
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(crate) tls_required: bool,
    pub(crate) limits: Limits,
    /// The payload budget shared by all connections, in bytes.
    pub(crate) total_bytes: Arc<Semaphore>,
    shutdown: watch::Sender<bool>,
    active: AtomicUsize,
    idle: Notify,
}

impl Inner {
    pub(crate) fn export(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }
    pub(crate) fn names(&self) -> Vec<String> {
        self.exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

/// An NBD server (cheap to clone).
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.inner.names())
            .field("connections", &self.connections())
            .finish()
    }
}

struct ActiveGuard(Arc<Inner>);
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Server {
    /// A server without exports.
    pub fn new(config: ServerConfig) -> Result<Server> {
        if config.tls_required && config.tls.is_none() {
            return Err(Error::invalid("tls_required needs a TLS configuration"));
        }
        let tls = match &config.tls {
            Some(t) => Some(tokio_rustls::TlsAcceptor::from(t.build()?)),
            None => None,
        };
        let limits = Limits::new(&config)?;
        let (shutdown, _) = watch::channel(false);
        Ok(Server {
            inner: Arc::new(Inner {
                exports: RwLock::new(BTreeMap::new()),
                tls,
                tls_required: config.tls_required,
                limits,
                total_bytes: Arc::new(Semaphore::new(limits.total_bytes)),
                shutdown,
                active: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        })
    }

    /// Add (or replace) an export; returns the one it replaced.
    pub fn add_export(
        &self,
        name: impl Into<String>,
        export: Arc<dyn Export>,
    ) -> Option<Arc<dyn Export>> {
        self.inner
            .exports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.into(), export)
    }

    /// Remove an export: new clients cannot select it; connections that
    /// already use it keep it until they close.
    pub fn remove_export(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.inner
            .exports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
    }

    /// Names of the current exports.
    pub fn export_names(&self) -> Vec<String> {
        self.inner.names()
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        self.inner.active.load(Ordering::SeqCst)
    }

    /// Listen on a TCP address (port 0 picks one) and return the bound
    /// address. Accepting runs in the background until [`Server::shutdown`].
    pub async fn listen_tcp(&self, addr: SocketAddr) -> Result<SocketAddr> {
        let l = TcpListener::bind(addr).await?;
        let bound = l.local_addr()?;
        let this = self.clone();
        let mut stop = self.inner.shutdown.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped(&mut stop) => break,
                    r = l.accept() => match r {
                        Ok((s, _)) => {
                            let _ = s.set_nodelay(true);
                            this.spawn_conn(conn::Raw::Tcp(s));
                        }
                        Err(e) => {
                            tracing::warn!("NBD accept failed: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        });
        Ok(bound)
    }

    /// Listen on a Unix socket at `path`.
    pub async fn listen_unix(&self, path: &Path) -> Result<()> {
        let l = UnixListener::bind(path)?;
        let this = self.clone();
        let mut stop = self.inner.shutdown.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped(&mut stop) => break,
                    r = l.accept() => match r {
                        Ok((s, _)) => this.spawn_conn(conn::Raw::Unix(s)),
                        Err(e) => {
                            tracing::warn!("NBD accept failed: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        });
        Ok(())
    }

    /// Serve one already-connected stream to its end (no STARTTLS on
    /// such streams).
    pub async fn serve_stream<S>(&self, stream: S) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.inner.active.fetch_add(1, Ordering::SeqCst);
        let _g = ActiveGuard(self.inner.clone());
        conn::serve(
            self.inner.clone(),
            conn::Raw::Other(Box::new(stream)),
            self.inner.shutdown.subscribe(),
        )
        .await
    }

    fn spawn_conn(&self, raw: conn::Raw) {
        self.inner.active.fetch_add(1, Ordering::SeqCst);
        let guard = ActiveGuard(self.inner.clone());
        let inner = self.inner.clone();
        let stop = self.inner.shutdown.subscribe();
        tokio::spawn(async move {
            let _g = guard;
            if let Err(e) = conn::serve(inner, raw, stop).await {
                tracing::debug!("NBD connection ended: {e}");
            }
        });
    }

    /// Shut down: stop accepting at once, close connections still in the
    /// handshake, give in-flight requests [`ServerConfig::shutdown_grace`]
    /// to finish and be answered, abort the rest, close every connection
    /// and return once all are gone (within about the grace, even when an
    /// export never answers).
    pub async fn shutdown(&self) {
        let _ = self.inner.shutdown.send(true);
        loop {
            let notified = self.inner.idle.notified();
            if self.inner.active.load(Ordering::SeqCst) == 0 {
                break;
            }
            notified.await;
        }
    }
}

/// Resolves once shutdown was asked for.
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Run the server handshake and request parser against arbitrary client
/// bytes (fuzzing).
#[cfg(any(test, feature = "fuzzing"))]
#[allow(clippy::expect_used, reason = "the default configuration is valid")]
pub(crate) async fn fuzz_server(data: &[u8]) {
    let server = Server::new(ServerConfig::default()).expect("config");
    server.add_export("", Arc::new(MemoryExport::new(1 << 20)));
    server.add_export(
        "vm",
        Arc::new(MemoryExport::new(1 << 20).with_dirty_bitmap("cbt0")),
    );
    let io = tokio::io::join(std::io::Cursor::new(data.to_vec()), tokio::io::sink());
    let _ = server.serve_stream(io).await;
}
