//! Resources shared by every emulated platform: the disk store, the export
//! registry, the fault registry and where the NBD server listens.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::disk::DiskStore;
use crate::error::{Error, Result};
use crate::exports::ExportRegistry;
use crate::faults::FaultRegistry;

/// How clients reach the NBD server.
#[derive(Debug, Clone, Serialize, Default)]
pub struct NbdEndpoint {
    /// Host (IP address) to connect to.
    pub host: String,
    /// TCP port (0 when no NBD server runs).
    pub port: u16,
    /// Whether the server offers TLS (NBDSSL).
    pub tls: bool,
    /// Whether the server refuses clients that do not start TLS.
    pub tls_required: bool,
    /// CA certificate (PEM) that signs the server certificate.
    pub ca_cert: Option<PathBuf>,
}

/// The emulated hypervisor's shared resources.
#[derive(Debug)]
pub struct Hypervisor {
    state_dir: PathBuf,
    /// Base images and disks.
    pub store: DiskStore,
    /// Faults armed through the admin API.
    pub faults: Arc<FaultRegistry>,
    /// NBD exports and their counters.
    pub exports: ExportRegistry,
    /// NBD listener address, set once the server is bound.
    pub nbd: std::sync::RwLock<NbdEndpoint>,
}

impl Hypervisor {
    /// Opens the state directory (creating it when missing).
    pub fn open(state_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(state_dir).map_err(Error::io(state_dir))?;
        let hotadd = state_dir.join("hotadd");
        std::fs::create_dir_all(&hotadd).map_err(Error::io(&hotadd))?;
        let faults = Arc::new(FaultRegistry::default());
        Ok(Hypervisor {
            state_dir: state_dir.to_path_buf(),
            store: DiskStore::open(state_dir)?,
            exports: ExportRegistry::new(faults.clone()),
            faults,
            nbd: std::sync::RwLock::new(NbdEndpoint::default()),
        })
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Directory of hot-added disk files (`<state-dir>/hotadd`).
    pub fn hotadd_dir(&self) -> PathBuf {
        self.state_dir.join("hotadd")
    }

    /// Current NBD endpoint.
    pub fn nbd_endpoint(&self) -> NbdEndpoint {
        crate::disk::read_lock(&self.nbd).clone()
    }
}
