//! Helpers shared by the integration tests.
#![allow(dead_code)]

use bytes::Bytes;
use datastore::{Datastore, DatastoreOptions, MasterKey};
use provider_api::*;

pub const CS: u64 = 4096;

/// The key of the encrypted runs: `VMBACKUP_TEST_ENCRYPTED=1` runs every
/// datastore test against an encrypted datastore (`scripts/test` runs the
/// suite both ways).
pub fn test_key() -> Option<MasterKey> {
    match std::env::var("VMBACKUP_TEST_ENCRYPTED").as_deref() {
        Ok("1") => Some(
            MasterKey::import_master(
                "8e3c1f0a2b4d6e8f00112233445566778899aabbccddeeff0123456789abcdef",
            )
            .unwrap(),
        ),
        _ => None,
    }
}

/// Whether this run's datastores are encrypted.
pub fn encrypted() -> bool {
    test_key().is_some()
}

/// A new datastore in `<dir>/ds` (encrypted in the encrypted runs).
pub fn new_ds(dir: &std::path::Path) -> Datastore {
    create_ds(
        &dir.join("ds"),
        DatastoreOptions {
            chunk_size: CS,
            ..Default::default()
        },
    )
}

/// A new datastore at `path` (encrypted in the encrypted runs).
pub fn create_ds(path: &std::path::Path, options: DatastoreOptions) -> Datastore {
    Datastore::create_with_key(path, options, test_key().as_ref()).unwrap()
}

/// Open a datastore of this run.
pub fn open_ds(path: &std::path::Path) -> Datastore {
    Datastore::open_with_key(path, test_key().as_ref()).unwrap()
}

pub fn spec(guest: &str, time: i64) -> SnapshotSpec {
    SnapshotSpec {
        platform: "scp".into(),
        guest: GuestId::from(guest),
        archive: ArchiveName::new(format!(
            "vm/{}",
            guest.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        ))
        .unwrap(),
        time,
    }
}

pub fn vspec(device: &str, size: u64, start_from: StartFrom) -> VolumeSpec {
    VolumeSpec {
        volume: Volume {
            device: device.into(),
            size,
            format: VolumeFormat::Raw,
        },
        start_from,
        base: None,
        bitmap_mode: BitmapMode::None,
        checkpoint: None,
    }
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A write to apply: data or zeroes.
#[derive(Debug, Clone)]
pub enum Op {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

/// Write one volume with `ops` (ascending) and return its stats.
pub async fn write_volume(
    snap: &mut Box<dyn SnapshotWriter>,
    spec: VolumeSpec,
    ops: &[Op],
) -> Result<VolumeStats> {
    let mut w = snap.begin_volume(spec).await?;
    for op in ops {
        match op {
            Op::Data(o, d) => w.write(*o, Bytes::from(d.clone())).await?,
            Op::Zero(o, l) => w.write_zeroes(*o, *l).await?,
        }
    }
    w.finish().await
}

pub fn apply(model: &mut [u8], ops: &[Op]) {
    for op in ops {
        match op {
            Op::Data(o, d) => model[*o as usize..*o as usize + d.len()].copy_from_slice(d),
            Op::Zero(o, l) => model[*o as usize..(*o + *l) as usize].fill(0),
        }
    }
}

pub async fn read_all(
    ds: &Datastore,
    id: &SnapshotId,
    device: &str,
    layer: Layer,
) -> Result<Vec<u8>> {
    let r = ds
        .open_snapshot(id)
        .await?
        .open_volume(device, layer)
        .await?;
    let size = r.size();
    let mut out = Vec::new();
    let mut off = 0;
    // Odd-sized reads to cross chunk boundaries.
    while off < size {
        let n = (size - off).min(10_000);
        out.extend_from_slice(&r.read_at(off, n).await?);
        off += n;
    }
    Ok(out)
}

/// One snapshot with one volume.
pub async fn backup(
    ds: &Datastore,
    guest: &str,
    time: i64,
    vs: VolumeSpec,
    ops: &[Op],
) -> Result<SnapshotInfo> {
    let mut snap = ds.begin_snapshot(spec(guest, time)).await?;
    write_volume(&mut snap, vs, ops).await?;
    snap.commit(vec![]).await
}
