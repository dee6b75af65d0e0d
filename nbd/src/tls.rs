//! TLS (x509) configuration for STARTTLS, on rustls with the ring provider.
//!
//! The client always verifies the server against the given CA: there is no
//! "unverified" mode. The server can require client certificates.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::error::{Error, Result};

/// Client side TLS settings (PEM encoded).
#[derive(Clone)]
pub struct TlsClientConfig {
    /// CA certificate(s) the server certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// Optional client certificate chain.
    pub client_cert_pem: Option<Vec<u8>>,
    /// Private key of the client certificate.
    pub client_key_pem: Option<Vec<u8>>,
    /// Name the server certificate must be valid for; empty: the host of
    /// the address.
    pub server_name: String,
}

impl std::fmt::Debug for TlsClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClientConfig")
            .field("client_cert", &self.client_cert_pem.is_some())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsClientConfig {
    /// Load from a directory laid out like qemu's and libnbd's
    /// (`ca-cert.pem`, optional `client-cert.pem` and `client-key.pem`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let read = |n: &str| std::fs::read(dir.join(n));
        let ca_pem = read("ca-cert.pem").map_err(|e| {
            Error::tls(format!("cannot read {}", dir.join("ca-cert.pem").display())).with_source(e)
        })?;
        let cert = read("client-cert.pem").ok();
        let key = read("client-key.pem").ok();
        Ok(TlsClientConfig {
            ca_pem,
            client_cert_pem: cert.as_ref().and(key.as_ref()).and(cert.clone()),
            client_key_pem: cert.and(key),
            server_name: String::new(),
        })
    }

    pub(crate) fn build(&self) -> Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        let cas = parse_certs(&self.ca_pem, "CA")?;
        for c in cas {
            roots
                .add(c)
                .map_err(|e| Error::tls("CA certificate rejected").with_source(e))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::tls("protocol versions").with_source(e))?
        .with_root_certificates(roots);
        let cfg = match (&self.client_cert_pem, &self.client_key_pem) {
            (Some(c), Some(k)) => builder
                .with_client_auth_cert(parse_certs(c, "client")?, parse_key(k)?)
                .map_err(|e| Error::tls("client certificate rejected").with_source(e))?,
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(Error::tls(
                    "client certificate and key must be given together",
                ));
            }
        };
        Ok(Arc::new(cfg))
    }

    pub(crate) fn server_name(&self, host: &str) -> Result<ServerName<'static>> {
        let n = if self.server_name.is_empty() {
            host
        } else {
            &self.server_name
        };
        ServerName::try_from(n.to_owned())
            .map_err(|e| Error::tls(format!("invalid TLS server name {n:?}")).with_source(e))
    }
}

/// Server side TLS settings (PEM encoded).
#[derive(Clone)]
pub struct TlsServerConfig {
    /// Server certificate chain.
    pub cert_pem: Vec<u8>,
    /// Server private key.
    pub key_pem: Vec<u8>,
    /// If set, clients must present a certificate signed by this CA.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServerConfig")
            .field("verify_clients", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl TlsServerConfig {
    pub(crate) fn build(&self) -> Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::tls("protocol versions").with_source(e))?;
        let builder = match &self.client_ca_pem {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in parse_certs(ca, "client CA")? {
                    roots
                        .add(c)
                        .map_err(|e| Error::tls("client CA certificate rejected").with_source(e))?;
                }
                let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| Error::tls("client verifier").with_source(e))?;
                builder.with_client_cert_verifier(v)
            }
            None => builder.with_no_client_auth(),
        };
        let cfg = builder
            .with_single_cert(
                parse_certs(&self.cert_pem, "server")?,
                parse_key(&self.key_pem)?,
            )
            .map_err(|e| Error::tls("server certificate rejected").with_source(e))?;
        Ok(Arc::new(cfg))
    }
}

fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::tls(format!("bad {what} certificate PEM")).with_source(e))?;
    if certs.is_empty() {
        return Err(Error::tls(format!("no {what} certificate in PEM")));
    }
    Ok(certs)
}

fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| Error::tls("bad private key PEM").with_source(e))?
        .ok_or_else(|| Error::tls("no private key in PEM"))
}
