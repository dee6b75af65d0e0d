//! Serving [`crate::exports`] over NBD with the workspace `nbd` crate.
//!
//! [`NbdDiskExport`] adapts a [`DiskExport`] to [`nbd::server::Export`]
//! (disk I/O runs on the blocking pool); [`NbdPublisher`] mirrors the export
//! registry into the NBD server's export table.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use nbd::error::errno;
use nbd::server::{Export, Extent, Server};

use crate::error::Error;
use crate::exports::{DiskExport, ExportListener};

/// A [`DiskExport`] as an NBD export.
#[derive(Debug)]
pub struct NbdDiskExport(pub Arc<DiskExport>);

fn to_nbd(e: Error) -> nbd::Error {
    match &e {
        Error::Invalid(m) => nbd::Error::server(errno::EINVAL, m.clone()),
        Error::Conflict(m) if m.contains("read-only") => {
            nbd::Error::server(errno::EPERM, m.clone())
        }
        Error::Conflict(m) => nbd::Error::server(errno::ESHUTDOWN, m.clone()),
        Error::Injected(m) if m.starts_with("disconnect") => {
            nbd::Error::server(errno::ESHUTDOWN, m.clone())
        }
        _ => nbd::Error::server(errno::EIO, e.to_string()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> nbd::Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(to_nbd),
        Err(e) => Err(nbd::Error::server(errno::EIO, e.to_string())),
    }
}

#[async_trait]
impl Export for NbdDiskExport {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_only(&self) -> bool {
        self.0.read_only()
    }

    fn multi_conn(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, len: u32) -> nbd::Result<Bytes> {
        let e = self.0.clone();
        blocking(move || e.read(offset, u64::from(len)).map(Bytes::from)).await
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> nbd::Result<()> {
        let e = self.0.clone();
        blocking(move || e.write(offset, &data)).await
    }

    fn meta_contexts(&self) -> Vec<String> {
        self.0.meta_contexts()
    }

    async fn block_status(&self, context: &str, offset: u64, len: u32) -> nbd::Result<Vec<Extent>> {
        let e = self.0.clone();
        let context = context.to_string();
        let runs = blocking(move || e.block_status(&context, offset, u64::from(len))).await?;
        let mut pos = offset;
        Ok(runs
            .into_iter()
            .map(|r| {
                let x = Extent {
                    offset: pos,
                    length: r.length,
                    flags: r.flags,
                };
                pos += r.length;
                x
            })
            .collect())
    }
}

/// Keeps an NBD server's export table equal to the export registry.
#[derive(Debug, Clone)]
pub struct NbdPublisher(pub Server);

impl ExportListener for NbdPublisher {
    fn added(&self, export: Arc<DiskExport>) {
        let name = export.name().to_string();
        self.0.add_export(name, Arc::new(NbdDiskExport(export)));
    }

    fn removed(&self, name: &str) {
        self.0.remove_export(name);
    }
}
