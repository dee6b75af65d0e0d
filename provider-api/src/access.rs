//! Snapshot access: how a provider exposes one volume's frozen data to the
//! host during a backup, and how the host learns which parts changed.

use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::types::{BaseImageId, BitmapMode, Checkpoint, Extent, Volume};

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NbdAddress {
    /// TCP `host:port`.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// Unix socket path.
    Unix(PathBuf),
}

/// TLS settings of an NBD connection (NBDSSL). The server is always
/// verified against `ca_pem`; there is no unverified mode.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsSettings {
    /// PEM of the CA(s) that sign the server's certificate.
    pub ca_pem: Vec<u8>,
    /// Name to verify in the server's certificate.
    pub server_name: String,
    /// Optional client certificate (PEM).
    pub client_cert_pem: Option<Vec<u8>>,
    /// Key of the client certificate (PEM).
    pub client_key_pem: Option<Vec<u8>>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("TlsSettings")
            .field("server_name", &self.server_name)
            .field("client_cert", &self.client_cert_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// An NBD export giving a volume's snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NbdAccess {
    /// Server address.
    pub address: NbdAddress,
    /// Export name.
    pub export: String,
    /// TLS (NBDSSL) when set.
    pub tls: Option<TlsSettings>,
    /// Meta context with the dirty bitmap, e.g. `qemu:dirty-bitmap:cbt0`,
    /// when changes come from NBD block status instead of
    /// [`VolumeAccess::dirty`].
    pub dirty_bitmap_context: Option<String>,
}

impl NbdAccess {
    /// Export `export` at `address`, plain, no dirty bitmap.
    pub fn new(address: NbdAddress, export: impl Into<String>) -> Self {
        NbdAccess {
            address,
            export: export.into(),
            tls: None,
            dirty_bitmap_context: None,
        }
    }

    /// Over TLS (NBDSSL) with `tls`.
    pub fn with_tls(mut self, tls: Option<TlsSettings>) -> Self {
        self.tls = tls;
        self
    }

    /// With the dirty bitmap's meta context (`qemu:dirty-bitmap:NAME`).
    pub fn with_dirty_bitmap(mut self, context: Option<String>) -> Self {
        self.dirty_bitmap_context = context;
        self
    }

    /// `nbd://`, `nbds://` or `nbd+unix://` URI of the export (for qemu-img
    /// and logs; TLS credentials are not part of it).
    pub fn uri(&self) -> String {
        match (&self.address, self.tls.is_some()) {
            (NbdAddress::Tcp { host, port }, false) => {
                format!("nbd://{host}:{port}/{}", self.export)
            }
            (NbdAddress::Tcp { host, port }, true) => {
                format!("nbds://{host}:{port}/{}", self.export)
            }
            (NbdAddress::Unix(p), false) => {
                format!("nbd+unix:///{}?socket={}", self.export, p.display())
            }
            (NbdAddress::Unix(p), true) => {
                format!("nbds+unix:///{}?socket={}", self.export, p.display())
            }
        }
    }
}

/// A file (device node, hot-added disk, attached snapshot disk) giving a
/// volume's snapshot; read with positional reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FileAccess {
    /// Path readable by the host.
    pub path: PathBuf,
}

impl FileAccess {
    /// The file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileAccess { path: path.into() }
    }
}

/// How the host reads a volume's snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SnapshotAccess {
    /// Mechanism `nbd`.
    Nbd(NbdAccess),
    /// Mechanism `file-handle`.
    FileHandle(FileAccess),
}

/// Which parts of a volume changed since the previous checkpoint
/// (Proxmox: `next_dirty_region`). Regions come in ascending, non
/// overlapping order and lie inside the volume.
#[async_trait]
pub trait DirtyRegions: Send {
    /// The next dirty region, or `None` at the end.
    async fn next_dirty_region(&mut self) -> Result<Option<Extent>>;
}

/// Every byte dirty: yields exactly `(0, size)` once (nothing for an empty
/// volume). The host uses it whenever no bitmap applies.
#[derive(Debug, Clone)]
pub struct WholeVolume {
    size: u64,
    done: bool,
}

impl WholeVolume {
    /// For a volume of `size` bytes.
    pub fn new(size: u64) -> Self {
        WholeVolume { size, done: false }
    }
}

#[async_trait]
impl DirtyRegions for WholeVolume {
    async fn next_dirty_region(&mut self) -> Result<Option<Extent>> {
        if self.done || self.size == 0 {
            return Ok(None);
        }
        self.done = true;
        Ok(Some(Extent::new(0, self.size)))
    }
}

/// Dirty regions known in advance (SCP changed areas, oVirt dirty extents).
#[derive(Debug, Clone)]
pub struct RegionList {
    regions: std::vec::IntoIter<Extent>,
}

impl RegionList {
    /// From regions in ascending order.
    pub fn new(regions: Vec<Extent>) -> Self {
        RegionList {
            regions: regions.into_iter(),
        }
    }
}

#[async_trait]
impl DirtyRegions for RegionList {
    async fn next_dirty_region(&mut self) -> Result<Option<Extent>> {
        Ok(self.regions.next())
    }
}

/// Where the changed regions of a volume come from.
#[non_exhaustive]
pub enum DirtySource {
    /// Everything (full read; holes are still skipped through allocation
    /// information where the access offers it).
    All,
    /// The NBD export's meta context
    /// [`NbdAccess::dirty_bitmap_context`].
    NbdBitmap,
    /// An iterator the provider supplies.
    Regions(Box<dyn DirtyRegions>),
}

impl fmt::Debug for DirtySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtySource::All => f.write_str("All"),
            DirtySource::NbdBitmap => f.write_str("NbdBitmap"),
            DirtySource::Regions(_) => f.write_str("Regions(..)"),
        }
    }
}

/// What data an access holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum AccessScope {
    /// Every byte of the volume reads as the snapshot holds it.
    #[default]
    Whole,
    /// Only the dirty regions hold the snapshot's data (a staging file of
    /// changed extents, say); everything else reads as garbage or zeroes.
    /// The host then reads nothing outside the dirty regions: when it needs
    /// a full read (bitmap mode `New`/`None`) it fails the volume instead
    /// of storing what the access does not hold.
    DirtyOnly,
}

/// One volume's snapshot as the provider exposes it from `backup_vm`.
#[derive(Debug)]
#[non_exhaustive]
pub struct VolumeAccess {
    /// The volume.
    pub volume: Volume,
    /// How to read it.
    pub access: SnapshotAccess,
    /// The bitmap mode actually used: the provider may turn `Use` into
    /// `New` when change tracking was lost (with a warning in
    /// [`VmBackup::warnings`]); the host turns anything into `None` for
    /// volumes the incremental answer left out.
    pub bitmap_mode: BitmapMode,
    /// Changed regions (only read when `bitmap_mode` is `Use`).
    pub dirty: DirtySource,
    /// Checkpoint to store with this snapshot so that the next backup can
    /// ask for the changes since it.
    pub checkpoint: Option<Checkpoint>,
    /// For a volume on a shared base image (linked clone): the base layer.
    /// The volume's own `access` then gives the overlay only.
    pub base: Option<BaseLayer>,
    /// What data `access` holds.
    pub scope: AccessScope,
}

impl VolumeAccess {
    /// `volume` read through `access` in full: bitmap mode `None`, every
    /// region dirty, no checkpoint, no base layer, whole scope.
    pub fn new(volume: Volume, access: SnapshotAccess) -> Self {
        VolumeAccess {
            volume,
            access,
            bitmap_mode: BitmapMode::None,
            dirty: DirtySource::All,
            checkpoint: None,
            base: None,
            scope: AccessScope::Whole,
        }
    }

    /// With bitmap mode `mode`.
    pub fn bitmap_mode(mut self, mode: BitmapMode) -> Self {
        self.bitmap_mode = mode;
        self
    }

    /// With changed regions from `dirty`.
    pub fn dirty(mut self, dirty: DirtySource) -> Self {
        self.dirty = dirty;
        self
    }

    /// With `checkpoint` to store.
    pub fn checkpoint(mut self, checkpoint: Option<Checkpoint>) -> Self {
        self.checkpoint = checkpoint;
        self
    }

    /// On the base layer `base`.
    pub fn base(mut self, base: Option<BaseLayer>) -> Self {
        self.base = base;
        self
    }

    /// With scope `scope`.
    pub fn scope(mut self, scope: AccessScope) -> Self {
        self.scope = scope;
        self
    }
}

/// A shared base image under a volume.
#[derive(Debug)]
#[non_exhaustive]
pub struct BaseLayer {
    /// The platform's base-image id.
    pub id: BaseImageId,
    /// Size in bytes.
    pub size: u64,
    /// Access to the base image's data; `None` when the provider skipped
    /// reading it because the target already holds it (see
    /// [`crate::target::BaseImageCatalog`]) or because this is an
    /// incremental backup.
    pub access: Option<(SnapshotAccess, DirtySource)>,
}

impl BaseLayer {
    /// Base image `id` of `size` bytes, readable through `access` (`None`
    /// when the target holds it already or the backup is incremental).
    pub fn new(id: BaseImageId, size: u64, access: Option<(SnapshotAccess, DirtySource)>) -> Self {
        BaseLayer { id, size, access }
    }
}

/// What `backup_vm` exposes for one VM.
#[derive(Debug)]
#[non_exhaustive]
pub struct VmBackup {
    /// The guest configuration.
    pub guest_config: crate::types::ConfigBlob,
    /// The firewall configuration, if the platform has one.
    pub firewall_config: Option<crate::types::ConfigBlob>,
    /// Opaque metadata the provider wants back at restore.
    pub metadata: crate::types::PlatformMetadata,
    /// Every volume to back up.
    pub volumes: Vec<VolumeAccess>,
    /// Warnings stored with the snapshot (fallback to full, skipped disks).
    pub warnings: Vec<String>,
    /// The guest described platform-neutrally (CPUs, memory, firmware,
    /// disks with their bus, NICs), stored beside the platform's own
    /// configuration so that the snapshot restores onto other platforms.
    pub spec: Option<crate::GuestSpec>,
}

impl VmBackup {
    /// `volumes` with `guest_config`; no firewall configuration, null
    /// metadata, no warnings.
    pub fn new(guest_config: crate::types::ConfigBlob, volumes: Vec<VolumeAccess>) -> Self {
        VmBackup {
            guest_config,
            firewall_config: None,
            metadata: serde_json::Value::Null,
            volumes,
            warnings: Vec::new(),
            spec: None,
        }
    }

    /// With the platform-neutral description of the guest.
    pub fn spec(mut self, spec: crate::GuestSpec) -> Self {
        self.spec = Some(spec);
        self
    }

    /// With `firewall_config`.
    pub fn firewall_config(mut self, config: Option<crate::types::ConfigBlob>) -> Self {
        self.firewall_config = config;
        self
    }

    /// With `metadata` for restore.
    pub fn metadata(mut self, metadata: crate::types::PlatformMetadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// With `warnings`.
    pub fn warnings(mut self, warnings: Vec<String>) -> Self {
        self.warnings = warnings;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn whole_volume_yields_once() {
        let mut w = WholeVolume::new(10);
        assert_eq!(
            w.next_dirty_region().await.unwrap(),
            Some(Extent::new(0, 10))
        );
        assert_eq!(w.next_dirty_region().await.unwrap(), None);
        assert_eq!(WholeVolume::new(0).next_dirty_region().await.unwrap(), None);
    }

    #[test]
    fn uris() {
        let mut a = NbdAccess::new(
            NbdAddress::Tcp {
                host: "127.0.0.1".into(),
                port: 10809,
            },
            "disk0",
        );
        assert_eq!(a.uri(), "nbd://127.0.0.1:10809/disk0");
        a.address = NbdAddress::Unix("/run/x.sock".into());
        assert_eq!(a.uri(), "nbd+unix:///disk0?socket=/run/x.sock");
    }
}
