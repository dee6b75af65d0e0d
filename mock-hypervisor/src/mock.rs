//! Starting and stopping the mock: [`MockHypervisor::start`] binds the HTTP
//! server (platform APIs + admin API) and the NBD server and returns a
//! [`RunningMock`] with its [`Endpoints`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::error::{Error, Result};
use crate::hypervisor::{Hypervisor, NbdEndpoint};
use crate::nbd_export::NbdPublisher;
use crate::ovirt::{OvirtConfig, OvirtPlatform};
use crate::platform::Platform;
use crate::scp::{ScpConfig, ScpPlatform};
use crate::zstack::{ZStackConfig, ZStackPlatform};

/// Initial content to create on an empty state directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seed {
    /// Two linked SCP VMs on one base image and one full VM with a data
    /// disk, with realistic data (see [`crate::seed`]).
    Demo,
}

/// How to start the mock.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Where state lives (survives restarts).
    pub state_dir: PathBuf,
    /// HTTP listen address (`127.0.0.1:0` picks a port).
    pub listen: SocketAddr,
    /// NBD listen address (default: the HTTP address's IP, any port).
    pub nbd_listen: Option<SocketAddr>,
    /// Directory of TLS material for NBDSSL (generated when empty).
    pub tls_dir: Option<PathBuf>,
    /// Refuse NBD clients that do not start TLS.
    pub nbd_tls_required: bool,
    /// Content to create when the state directory is new.
    pub seed: Option<Seed>,
    /// SCP settings.
    pub scp: ScpConfig,
    /// ZStack settings.
    pub zstack: ZStackConfig,
    /// oVirt settings.
    pub ovirt: OvirtConfig,
}

impl MockConfig {
    /// Defaults: localhost, any ports, no TLS, no seed, SCP 6.11.3.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        MockConfig {
            state_dir: state_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            nbd_listen: None,
            tls_dir: None,
            nbd_tls_required: false,
            seed: None,
            scp: ScpConfig::default(),
            zstack: ZStackConfig::default(),
            ovirt: OvirtConfig::default(),
        }
    }
}

/// Where everything listens; printed as one JSON line by the binary.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoints {
    /// Base URL of the HTTP server (all platform APIs share it).
    pub http_url: String,
    /// Base URL of the admin API (`<http_url>/admin`).
    pub admin_url: String,
    /// NBD server.
    pub nbd: NbdEndpoint,
    /// `host:port` of the NBD server.
    pub nbd_address: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// One entry per platform (`"scp": {"base_url", "username", ...}`).
    #[serde(flatten)]
    pub platforms: BTreeMap<String, Value>,
}

impl Endpoints {
    /// Base URL of the SCP API.
    pub fn scp_url(&self) -> &str {
        self.platforms
            .get("scp")
            .and_then(|v| v.get("base_url"))
            .and_then(Value::as_str)
            .unwrap_or(&self.http_url)
    }
}

/// Entry point.
#[derive(Debug)]
pub struct MockHypervisor;

/// A started mock; dropping it without [`RunningMock::shutdown`] stops the
/// servers abruptly.
#[derive(Debug)]
pub struct RunningMock {
    endpoints: Endpoints,
    hv: Arc<Hypervisor>,
    scp: Arc<ScpPlatform>,
    zstack: Arc<ZStackPlatform>,
    ovirt: Arc<OvirtPlatform>,
    nbd: nbd::server::Server,
    stop: watch::Sender<bool>,
    http: Option<JoinHandle<()>>,
    https: Option<JoinHandle<()>>,
    ticker: JoinHandle<()>,
}

async fn fallback(uri: Uri) -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        axum::Json(
            json!({"code": 40400, "message": format!("no such API: {}", uri.path()), "data": null}),
        ),
    )
}

impl MockHypervisor {
    /// Opens the state directory, seeds it if asked and it is new, and
    /// starts the HTTP and NBD servers.
    pub async fn start(config: MockConfig) -> Result<RunningMock> {
        let hv = Arc::new(Hypervisor::open(&config.state_dir)?);
        let scp = ScpPlatform::open(hv.clone(), &config.state_dir, config.scp.clone())?;
        let zstack = ZStackPlatform::open(hv.clone(), &config.state_dir, config.zstack.clone())?;
        let ovirt = OvirtPlatform::open(hv.clone(), &config.state_dir, config.ovirt.clone())?;
        let platforms: Vec<Arc<dyn Platform>> = vec![scp.clone(), zstack.clone(), ovirt.clone()];

        let ip = config.listen.ip();
        let tls = match &config.tls_dir {
            Some(dir) => Some(crate::tls::ensure(dir, &[ip.to_string()])?),
            None => None,
        };
        if config.nbd_tls_required && tls.is_none() {
            return Err(Error::Invalid(
                "requiring NBD TLS needs a TLS directory".into(),
            ));
        }
        let nbd = nbd::server::Server::new(nbd::server::ServerConfig {
            tls: tls.as_ref().map(|t| nbd::server::TlsServerConfig {
                cert_pem: t.cert_pem.clone(),
                key_pem: t.key_pem.clone(),
                client_ca_pem: None,
            }),
            tls_required: config.nbd_tls_required,
            ..Default::default()
        })
        .map_err(|e| Error::Tls(e.to_string()))?;
        let nbd_addr = nbd
            .listen_tcp(config.nbd_listen.unwrap_or(SocketAddr::new(ip, 0)))
            .await
            .map_err(|e| Error::io("nbd listener")(std::io::Error::other(e.to_string())))?;
        *crate::disk::write_lock(&hv.nbd) = NbdEndpoint {
            host: nbd_addr.ip().to_string(),
            port: nbd_addr.port(),
            tls: tls.is_some(),
            tls_required: config.nbd_tls_required,
            ca_cert: tls.as_ref().map(|t| t.ca_cert.clone()),
        };
        hv.exports.set_listener(Arc::new(NbdPublisher(nbd.clone())));

        if config.seed == Some(Seed::Demo) {
            crate::seed::demo(&scp).await?;
            crate::zstack::seed::demo(&zstack).await?;
            crate::ovirt::seed::demo(&ovirt).await?;
        }

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(Error::io("http listener"))?;
        let addr = listener.local_addr().map_err(Error::io("http listener"))?;
        let http_url = format!("http://{addr}");
        let endpoints_doc = Arc::new(RwLock::new(Value::Null));
        let mut app = Router::new();
        for p in &platforms {
            app = app.merge(p.clone().api_router());
        }
        app = app
            .merge(admin::router(AdminState {
                hv: hv.clone(),
                platforms: platforms.clone(),
                endpoints: endpoints_doc.clone(),
            }))
            .fallback(fallback);

        // oVirt engines serve HTTPS only: a second listener with the
        // mock CA's certificate (see crate::ovirt::https).
        let (stop, mut stop_rx) = watch::channel(false);
        let https = if config.ovirt.https {
            let dir = config
                .tls_dir
                .clone()
                .unwrap_or_else(|| config.state_dir.join("tls"));
            let material = crate::tls::ensure(&dir, &[ip.to_string()])?;
            let (addr, task) = crate::ovirt::https::serve(
                SocketAddr::new(ip, 0),
                &material,
                app.clone(),
                stop.subscribe(),
            )
            .await?;
            ovirt.set_https(crate::ovirt::HttpsEndpoint {
                base: format!("https://{addr}"),
                ca_file: material.ca_cert.clone(),
            });
            Some(task)
        } else {
            None
        };
        let endpoints = Endpoints {
            admin_url: format!("{http_url}/admin"),
            nbd: hv.nbd_endpoint(),
            nbd_address: nbd_addr.to_string(),
            state_dir: config.state_dir.clone(),
            platforms: platforms
                .iter()
                .map(|p| (p.name().to_string(), p.endpoint(&http_url)))
                .collect(),
            http_url,
        };
        *crate::disk::write_lock(&endpoints_doc) =
            serde_json::to_value(&endpoints).unwrap_or_default();

        let http = tokio::spawn(async move {
            let r = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = r {
                tracing::warn!("HTTP server failed: {e}");
            }
        });
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                for p in &platforms {
                    p.tick();
                }
            }
        });
        Ok(RunningMock {
            endpoints,
            hv,
            scp,
            zstack,
            ovirt,
            nbd,
            stop,
            http: Some(http),
            https,
            ticker,
        })
    }
}

impl RunningMock {
    /// Where everything listens.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Shared resources (disk store, exports and counters, faults).
    pub fn hypervisor(&self) -> &Arc<Hypervisor> {
        &self.hv
    }

    /// The SCP platform.
    pub fn scp(&self) -> &Arc<ScpPlatform> {
        &self.scp
    }

    /// The ZStack platform.
    pub fn zstack(&self) -> &Arc<ZStackPlatform> {
        &self.zstack
    }

    /// The oVirt platform.
    pub fn ovirt(&self) -> &Arc<OvirtPlatform> {
        &self.ovirt
    }

    /// Stops accepting, lets requests in flight finish (2 s at most), and
    /// stops the NBD server. State is already on disk.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        self.ticker.abort();
        if let Some(h) = self.http.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
        }
        if let Some(h) = self.https.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.nbd.shutdown()).await;
    }
}

impl Drop for RunningMock {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.ticker.abort();
        if let Some(h) = self.http.take() {
            h.abort();
        }
        if let Some(h) = self.https.take() {
            h.abort();
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let nbd = self.nbd.clone();
            rt.spawn(async move { nbd.shutdown().await });
        }
    }
}
