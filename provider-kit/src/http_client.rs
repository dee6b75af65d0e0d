//! The REST providers' HTTP client, built one way: timeouts, the
//! platform's CA as the only trusted root when one is configured, and a
//! user agent that names this library (platforms log it; an operator can
//! tell our calls from the UI's).
//!
//! Secrets never reach the client's configuration: credentials go in
//! request headers per call, and the client's `Debug` (reqwest's) shows
//! neither headers nor bodies.

use std::path::Path;
use std::time::Duration;

use provider_api::{Error, ErrorKind, Result};

/// The user agent of every provider's calls: `vmbackup/<version>`.
pub const USER_AGENT: &str = concat!("vmbackup/", env!("CARGO_PKG_VERSION"));

/// How to build a platform's HTTP client.
#[derive(Debug, Clone, Copy)]
pub struct HttpClientOptions<'a> {
    /// The platform, for errors ("the oVirt engine CA …").
    pub platform: &'a str,
    /// Longest time to connect.
    pub connect_timeout: Duration,
    /// Longest time for a whole call (`None`: no limit, for long
    /// downloads that use `read_timeout`).
    pub timeout: Option<Duration>,
    /// Longest wait for the next bytes of an answer.
    pub read_timeout: Option<Duration>,
    /// A PEM file of the CA(s) that sign the platform's certificates; when
    /// set they are the only roots trusted, otherwise the built-in web
    /// roots are.
    pub tls_ca: Option<&'a Path>,
}

impl<'a> HttpClientOptions<'a> {
    /// Options for `platform`: 10 s to connect, no other limit, built-in
    /// roots.
    pub fn new(platform: &'a str) -> Self {
        HttpClientOptions {
            platform,
            connect_timeout: Duration::from_secs(10),
            timeout: None,
            read_timeout: None,
            tls_ca: None,
        }
    }
}

/// Build the client; an unreadable or empty CA file is an error naming it.
pub fn http_client(options: &HttpClientOptions<'_>) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(options.connect_timeout);
    if let Some(t) = options.timeout {
        builder = builder.timeout(t);
    }
    if let Some(t) = options.read_timeout {
        builder = builder.read_timeout(t);
    }
    if let Some(ca) = options.tls_ca {
        let what = format!("the {} CA {}", options.platform, ca.display());
        let pem = std::fs::read(ca)
            .map_err(|e| Error::invalid(format!("reading {what}")).with_source(e))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| Error::invalid(format!("{what} is not PEM")).with_source(e))?;
        if certs.is_empty() {
            return Err(Error::invalid(format!("{what} holds no certificate")));
        }
        builder = builder.tls_built_in_root_certs(false);
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    builder.build().map_err(|e| {
        Error::new(
            ErrorKind::Other,
            format!("building the {} HTTP client", options.platform),
        )
        .with_source(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-connection-at-a-time HTTPS server answering 200 "ok"; sends
    /// each request's head on the channel.
    async fn https_server(
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let certs = rustls_pemfile::certs(&mut &cert_pem[..])
            .collect::<std::result::Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut &key_pem[..])
            .unwrap()
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = tls.shutdown().await;
            }
        });
        (port, rx)
    }

    #[tokio::test]
    async fn the_platform_ca_is_the_only_root_and_calls_say_who_we_are() {
        let dir = tempfile::tempdir().unwrap();
        let tls = mock_hypervisor::tls::ensure(dir.path(), &["127.0.0.1".into()]).unwrap();
        let (port, mut heads) = https_server(&tls.cert_pem, &tls.key_pem).await;
        let url = format!("https://127.0.0.1:{port}/api");

        let mut options = HttpClientOptions::new("test platform");
        options.tls_ca = Some(&tls.ca_cert);
        options.timeout = Some(Duration::from_secs(20));
        let client = http_client(&options).unwrap();
        let answer = client.get(&url).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.text().await.unwrap(), "ok");
        let head = heads.recv().await.unwrap().to_ascii_lowercase();
        assert!(head.contains("user-agent: vmbackup/"), "{head}");

        // Without the CA the self-signed platform is refused.
        let plain = http_client(&HttpClientOptions::new("test platform")).unwrap();
        let e = plain.get(&url).send().await.unwrap_err();
        assert!(e.is_connect() || e.is_request(), "{e:?}");
    }

    #[test]
    fn a_bad_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let mut options = HttpClientOptions::new("ZStack");
        options.tls_ca = Some(&missing);
        let e = http_client(&options).unwrap_err().to_string();
        assert!(
            e.contains("reading the ZStack CA") && e.contains("nope.pem"),
            "{e}"
        );

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        options.tls_ca = Some(&empty);
        let e = http_client(&options).unwrap_err().to_string();
        assert!(
            e.contains("holds no certificate") || e.contains("is not PEM"),
            "{e}"
        );
        assert!(e.contains("empty.pem"), "{e}");
    }
}
