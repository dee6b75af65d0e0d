//! HTTPS for the oVirt emulation: an engine serves its API, SSO and image
//! server over HTTPS only, with certificates of its own CA. The mock binds
//! a second listener, with the server certificate [`crate::tls::ensure`]
//! generates (or finds) in the TLS directory, and serves the same router
//! there; requests that come over it carry the [`super::OverTls`]
//! extension, so the oVirt routes can refuse plain HTTP.
//!
//! TLS handshakes run in their own tasks (a slow or failing client never
//! holds up the accept loop); completed connections reach `axum::serve`
//! through a channel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::error::{Error, Result};
use crate::tls::TlsMaterial;

/// A listener handing out TLS connections whose handshake completed.
struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop ended (shutdown): never hand out another.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

fn server_config(tls: &TlsMaterial) -> Result<Arc<rustls::ServerConfig>> {
    let bad = |e: String| Error::Tls(e);
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("server certificate: {e}")))?;
    let key =
        PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(|e| bad(format!("server key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Binds `listen` and serves `app` over TLS until `stop` turns true.
/// Returns the bound address and the server task.
pub async fn serve(
    listen: SocketAddr,
    tls: &TlsMaterial,
    app: Router,
    mut stop: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let acceptor = TlsAcceptor::from(server_config(tls)?);
    let tcp = TcpListener::bind(listen)
        .await
        .map_err(Error::io("https listener"))?;
    let addr = tcp.local_addr().map_err(Error::io("https listener"))?;
    let (tx, rx) = mpsc::channel(64);
    let mut stop_accept = stop.clone();
    let accept = tokio::spawn(async move {
        loop {
            let (sock, peer) = tokio::select! {
                r = tcp.accept() => match r {
                    Ok(c) => c,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                _ = async { let _ = stop_accept.wait_for(|s| *s).await; } => return,
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let hs = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(sock));
                match hs.await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send((stream, peer)).await;
                    }
                    Ok(Err(e)) => tracing::debug!("TLS handshake with {peer} failed: {e}"),
                    Err(_) => tracing::debug!("TLS handshake with {peer} timed out"),
                }
            });
        }
    });
    let app = app.layer(axum::Extension(super::OverTls));
    let server = tokio::spawn(async move {
        let r = axum::serve(TlsListener { rx, addr }, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        accept.abort();
        if let Err(e) = r {
            tracing::warn!("HTTPS server failed: {e}");
        }
    });
    Ok((addr, server))
}
