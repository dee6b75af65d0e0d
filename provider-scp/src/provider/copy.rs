//! The provider's own data path for a base image restore: the host's
//! restore source (an NBD URI) is read with the `nbd` crate's client and
//! written to the base image opened through the restored VM's system disk
//! (an NBD export, or the hot-added device). Memory is bounded (one
//! [`CHUNK`] at a time), ranges the source reports as zero
//! (`base:allocation`) or that read as zeroes are skipped: the freshly
//! created base image reads as zeroes already.

use std::path::PathBuf;

use nbd::client::{Address, Client, ConnectOptions, TlsClientConfig};
use nbd::uri::NbdUri;
use provider_api::{Error, ErrorKind, NbdAccess, NbdAddress, Result};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

/// Largest piece read and written at once.
pub(super) const CHUNK: usize = 4 << 20;
/// Largest range asked about in one block-status query.
const WINDOW: u64 = 256 << 20;
const ALLOCATION: &str = "base:allocation";

/// Where the base image's data goes.
pub(super) enum Destination {
    /// An NBD export of the VM's system disk opened with the base-image flag.
    Nbd(NbdAccess),
    /// The hot-added base image device (or file) on this proxy.
    File(PathBuf),
}

fn data_path(what: impl Into<String>, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(ErrorKind::DataPath, what.into()).with_source(e)
}

/// Connect options for an export the platform handed out.
pub(super) fn connect_options(access: &NbdAccess) -> ConnectOptions {
    let address = match &access.address {
        NbdAddress::Tcp { host, port } => Address::Tcp {
            host: host.clone(),
            port: *port,
        },
        NbdAddress::Unix(p) => Address::Unix(p.clone()),
    };
    let mut o = ConnectOptions::new(address, access.export.clone());
    if let Some(t) = &access.tls {
        // The CA stays in memory: no certificate file is written.
        o = o.tls(TlsClientConfig {
            ca_pem: t.ca_pem.clone(),
            client_cert_pem: t.client_cert_pem.clone(),
            client_key_pem: t.client_key_pem.clone(),
            server_name: t.server_name.clone(),
        });
    }
    o
}

enum Writer {
    Nbd(Client),
    File(tokio::fs::File),
}

impl Writer {
    async fn open(dest: &Destination) -> Result<Self> {
        match dest {
            Destination::Nbd(access) => Client::connect(&connect_options(access))
                .await
                .map(Writer::Nbd)
                .map_err(|e| {
                    let kind = match e.kind() {
                        nbd::ErrorKind::Tls(_) | nbd::ErrorKind::TlsRequired => ErrorKind::Refused,
                        _ => ErrorKind::DataPath,
                    };
                    Error::new(
                        kind,
                        format!("connecting to the base image export {}", access.uri()),
                    )
                    .with_source(e)
                }),
            Destination::File(path) => tokio::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .await
                .map(Writer::File)
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Io,
                        format!("opening the hot-added base image {}", path.display()),
                    )
                    .with_source(e)
                }),
        }
    }

    async fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        match self {
            Writer::Nbd(c) => c
                .write(offset, data)
                .await
                .map_err(|e| data_path("writing the base image", e).offset(offset)),
            Writer::File(f) => {
                f.seek(std::io::SeekFrom::Start(offset)).await?;
                f.write_all(data)
                    .await
                    .map_err(|e| data_path("writing the base image", e).offset(offset))
            }
        }
    }

    async fn finish(self) -> Result<()> {
        match self {
            Writer::Nbd(c) => {
                if c.can_flush() {
                    c.flush()
                        .await
                        .map_err(|e| data_path("flushing the base image", e))?;
                }
                c.disconnect()
                    .await
                    .map_err(|e| data_path("closing the base image export", e))
            }
            Writer::File(f) => f.sync_all().await.map_err(|e| {
                Error::new(ErrorKind::Io, "syncing the hot-added base image").with_source(e)
            }),
        }
    }
}

/// What [`copy_source`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Copied {
    /// Bytes written.
    pub written: u64,
    /// Bytes skipped as zero.
    pub skipped: u64,
}

/// Copy the restore source at `source` (an NBD URI from the host) into
/// `dest`, at most `size` bytes.
pub(super) async fn copy_source(source: &str, size: u64, dest: &Destination) -> Result<Copied> {
    let uri = NbdUri::parse(source)
        .map_err(|e| Error::invalid(format!("restore source {source:?}")).with_source(e))?;
    let opts = ConnectOptions::from_uri(&uri, None)
        .map_err(|e| data_path(format!("restore source {source}"), e))?
        .meta_context(ALLOCATION);
    let src = Client::connect(&opts)
        .await
        .map_err(|e| data_path(format!("connecting to the restore source {source}"), e))?;
    let has_allocation = src.meta_contexts().iter().any(|c| c == ALLOCATION);
    let end = src.size().min(size);
    let mut writer = Writer::open(dest).await?;
    let mut copied = Copied::default();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0;
    while off < end {
        let len = (end - off).min(WINDOW);
        let extents = if has_allocation {
            src.block_status(off, len, ALLOCATION)
                .await
                .map_err(|e| data_path("block status of the restore source", e).offset(off))?
                .into_iter()
                .map(|e| (e.offset, e.length, e.is_zero()))
                .collect()
        } else {
            vec![(off, len, false)]
        };
        let mut at = off;
        for (start, length, zero) in extents {
            if start != at || length == 0 {
                break;
            }
            let stop = (start + length).min(end);
            if zero {
                copied.skipped += stop - start;
            } else {
                let mut pos = start;
                while pos < stop {
                    let n = ((stop - pos) as usize).min(CHUNK);
                    let piece = &mut buf[..n];
                    src.read_into(pos, piece)
                        .await
                        .map_err(|e| data_path("reading the restore source", e).offset(pos))?;
                    if piece.iter().all(|b| *b == 0) {
                        copied.skipped += n as u64;
                    } else {
                        writer.write(pos, piece).await?;
                        copied.written += n as u64;
                    }
                    pos += n as u64;
                }
            }
            at = stop;
            if at >= end {
                break;
            }
        }
        if at == off {
            return Err(Error::new(
                ErrorKind::DataPath,
                "the restore source answered a block status without progress",
            )
            .offset(off));
        }
        off = at;
    }
    writer.finish().await?;
    let _ = src.disconnect().await;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use nbd::server::{MemoryExport, Server, ServerConfig};
    use sha2::{Digest, Sha256};

    use super::*;

    /// Data lands byte for byte; holes and allocated zeroes are skipped,
    /// not written.
    #[tokio::test]
    async fn copies_data_and_skips_zero_ranges() {
        const MIB: usize = 1 << 20;
        let size = 24 * MIB;
        let server = Server::new(ServerConfig::default()).unwrap();
        let disk = MemoryExport::new(size as u64);
        let mut expected = vec![0u8; size];
        for (at, len, byte) in [
            (0, MIB, 0x11u8),
            (5 * MIB + 4096, 3 * MIB, 0x22),
            (20 * MIB, MIB, 0),
        ] {
            disk.fill(at as u64, &vec![byte; len]).unwrap();
            expected[at..at + len].fill(byte);
        }
        server.add_export("base", Arc::new(disk));
        let addr = server
            .listen_tcp("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let dir = std::env::temp_dir().join(format!("scp-copy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("base.raw");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(size as u64)
            .unwrap();
        let copied = copy_source(
            &format!("nbd://{addr}/base"),
            size as u64,
            &Destination::File(file.clone()),
        )
        .await
        .unwrap();
        let got = std::fs::read(&file).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        server.shutdown().await;
        assert_eq!(
            format!("{:x}", Sha256::digest(&got)),
            format!("{:x}", Sha256::digest(&expected))
        );
        assert!(copied.written >= (4 * MIB) as u64, "{copied:?}");
        assert!(copied.written <= (4 * MIB + 2 * CHUNK) as u64, "{copied:?}");
        assert_eq!(copied.written + copied.skipped, size as u64, "{copied:?}");
    }
}
