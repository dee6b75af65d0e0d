//! Serving stored volumes over NBD: restore sources for providers that
//! pull (`qemu-img convert nbd://...`) and instant restore.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use nbd::proto::{STATE_HOLE, STATE_ZERO};
use nbd::server::{Export, Server, ServerConfig};
use provider_api::{Error, ErrorKind, RegionKind, Result, VolumeReader};

use crate::mover::SourceExposer;

const ALLOCATION: &str = "base:allocation";

/// A stored volume as a read-only NBD export with `base:allocation`
/// (zero regions are reported as holes, so copies stay sparse).
pub struct VolumeExport {
    reader: Arc<dyn VolumeReader>,
}

impl VolumeExport {
    /// Export `reader`.
    pub fn new(reader: Arc<dyn VolumeReader>) -> Self {
        VolumeExport { reader }
    }
}

fn to_nbd(e: Error) -> nbd::Error {
    nbd::Error::from(std::io::Error::other(e.report()))
}

#[async_trait]
impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    fn multi_conn(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, len: u32) -> nbd::Result<Bytes> {
        self.reader
            .read_at(offset, len as u64)
            .await
            .map_err(to_nbd)
    }

    fn meta_contexts(&self) -> Vec<String> {
        vec![ALLOCATION.to_owned()]
    }

    async fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u32,
    ) -> nbd::Result<Vec<nbd::Extent>> {
        if context != ALLOCATION {
            return Err(nbd::Error::unsupported(format!("meta context {context:?}")));
        }
        let regions = self
            .reader
            .regions(offset, len as u64)
            .await
            .map_err(to_nbd)?;
        Ok(regions
            .into_iter()
            .map(|r| nbd::Extent {
                offset: r.extent.offset,
                length: r.extent.length,
                flags: match r.kind {
                    RegionKind::Zero => STATE_HOLE | STATE_ZERO,
                    RegionKind::Data | RegionKind::Inherited => 0,
                },
            })
            .collect())
    }
}

/// Exposes stored volumes on an NBD server listening on loopback.
pub struct NbdExposer {
    server: Server,
    address: SocketAddr,
    next: AtomicU64,
}

impl NbdExposer {
    /// Start a server on `address` (use port 0 for any free port).
    pub async fn start(address: SocketAddr) -> Result<Self> {
        let server = Server::new(ServerConfig::default())
            .map_err(|e| Error::new(ErrorKind::Io, "starting the NBD server").with_source(e))?;
        let address = server.listen_tcp(address).await.map_err(|e| {
            Error::new(ErrorKind::Io, format!("listening for NBD on {address}")).with_source(e)
        })?;
        Ok(NbdExposer {
            server,
            address,
            next: AtomicU64::new(0),
        })
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The server (to add exports by hand, or shut down).
    pub fn server(&self) -> &Server {
        &self.server
    }
}

struct Withdraw {
    server: Server,
    name: String,
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        self.server.remove_export(&self.name);
    }
}

#[async_trait]
impl SourceExposer for NbdExposer {
    async fn expose(
        &self,
        name: &str,
        reader: Arc<dyn VolumeReader>,
    ) -> Result<(String, Box<dyn Send + Sync>)> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let export = format!("restore-{n}-{safe}");
        self.server
            .add_export(export.clone(), Arc::new(VolumeExport::new(reader)));
        let uri = format!("nbd://{}/{export}", self.address);
        Ok((
            uri,
            Box::new(Withdraw {
                server: self.server.clone(),
                name: export,
            }),
        ))
    }
}
