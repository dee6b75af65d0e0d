//! The NBD server.
//!
//! A [`Server`] holds a registry of named exports ([`Export`] trait
//! objects) that can change while it runs, listens on any number of TCP
//! and Unix sockets, serves many connections at once (requests of one
//! connection run concurrently too), optionally offers or requires
//! STARTTLS, and shuts down gracefully: it stops accepting, lets every
//! connection finish its in-flight requests and then closes them.

mod conn;
mod export;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, watch};

use crate::error::{Error, Result};
pub use crate::proto::{BlockSize, Extent};
pub use crate::tls::TlsServerConfig;
pub use export::{Export, FileExport, MEMORY_BLOCK, MemoryExport};

/// Server settings.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// Offer STARTTLS with this certificate.
    pub tls: Option<TlsServerConfig>,
    /// Refuse everything but STARTTLS before TLS is up.
    pub tls_required: bool,
    /// Memory budget for in-flight request payloads per connection
    /// (default 128 MiB).
    pub max_in_flight_bytes: Option<usize>,
}

pub(crate) struct Inner {
    pub(crate) exports: RwLock<BTreeMap<String, Arc<dyn Export>>>,
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(crate) tls_required: bool,
    pub(crate) budget: usize,
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
        let (shutdown, _) = watch::channel(false);
        Ok(Server {
            inner: Arc::new(Inner {
                exports: RwLock::new(BTreeMap::new()),
                tls,
                tls_required: config.tls_required,
                budget: config
                    .max_in_flight_bytes
                    .unwrap_or(128 << 20)
                    .max(64 << 20),
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

    /// Stop accepting, let connections finish their in-flight requests,
    /// close them and wait until all are gone.
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
