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

/// The S3 runs: `VMBACKUP_TEST_S3=http://127.0.0.1:PORT` (a moto server,
/// started by `scripts/test`) runs every datastore test against a
/// datastore on S3, one key prefix per datastore (from its would-be path,
/// so that a child process opening the same path finds the same one).
pub fn s3_endpoint() -> Option<String> {
    std::env::var("VMBACKUP_TEST_S3")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Whether this run's datastores are on S3.
pub fn on_s3() -> bool {
    s3_endpoint().is_some()
}

const S3_BUCKET: &str = "vmbackup-datastore-tests";

fn s3_backend(path: &std::path::Path) -> std::sync::Arc<dyn datastore::backend::Backend> {
    use std::io::{Read, Write};
    let endpoint = s3_endpoint().unwrap();
    let port: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();
    // Create the bucket (moto accepts an unsigned PUT; a second one is fine).
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(
        format!("PUT /{S3_BUCKET} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let _ = s.read_to_end(&mut Vec::new());
    let prefix = blake3::hash(path.as_os_str().as_encoded_bytes()).to_hex()[..20].to_string();
    std::sync::Arc::new(
        datastore::backend::S3Backend::new(&datastore::backend::S3Options {
            url: format!("s3://{S3_BUCKET}/{prefix}"),
            endpoint: Some(endpoint),
            region: Some("us-east-1".into()),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
            allow_http: true,
            ..Default::default()
        })
        .unwrap(),
    )
}

/// Test settings of an S3 datastore: short leases, no freshness window
/// (a GC right after a backup may remove what no snapshot names).
fn s3_settings(ds: Datastore) -> Datastore {
    ds.with_lease_ttl(std::time::Duration::from_secs(2))
        .with_object_grace(std::time::Duration::ZERO)
}

/// A new datastore at `path` (encrypted in the encrypted runs; on S3 in
/// the S3 runs).
pub fn create_ds(path: &std::path::Path, options: DatastoreOptions) -> Datastore {
    if on_s3() {
        return s3_settings(
            Datastore::create_on(s3_backend(path), options, test_key().as_ref()).unwrap(),
        );
    }
    Datastore::create_with_key(path, options, test_key().as_ref()).unwrap()
}

/// Open a datastore of this run.
pub fn open_ds(path: &std::path::Path) -> Datastore {
    if on_s3() {
        return s3_settings(Datastore::open_on(s3_backend(path), test_key().as_ref()).unwrap());
    }
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

/// The object key of a path `ds` reported (a chunk's path, or `root()`
/// joined with a relative path).
pub fn raw_key(ds: &Datastore, path: &std::path::Path) -> String {
    let p = path.to_string_lossy().into_owned();
    let loc = format!("{}/", ds.location());
    p.strip_prefix(&loc).unwrap_or(&p).to_owned()
}

/// Tampering and inspection below the datastore's API, on either storage.
pub fn raw_read(ds: &Datastore, path: &std::path::Path) -> Vec<u8> {
    match ds.backend() {
        Some(b) => b.get(&raw_key(ds, path), 1 << 30).unwrap().unwrap().0,
        None => std::fs::read(path).unwrap(),
    }
}

/// See [`raw_read`].
pub fn raw_write(ds: &Datastore, path: &std::path::Path, data: &[u8]) {
    match ds.backend() {
        Some(b) => {
            b.put(&raw_key(ds, path), Bytes::copy_from_slice(data))
                .unwrap();
        }
        None => std::fs::write(path, data).unwrap(),
    }
}

/// See [`raw_read`].
pub fn raw_remove(ds: &Datastore, path: &std::path::Path) {
    match ds.backend() {
        Some(b) => b.delete(&raw_key(ds, path)).unwrap(),
        None => std::fs::remove_file(path).unwrap(),
    }
}

/// Names directly under a directory, on either storage.
pub fn raw_names(ds: &Datastore, dir: &std::path::Path) -> Vec<String> {
    match ds.backend() {
        Some(b) => b.children(&format!("{}/", raw_key(ds, dir))).unwrap(),
        None => std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
    }
}

/// The path a test gives for the datastore of `dir` (child processes open
/// it by this path; on S3 it names the key prefix).
pub fn ds_path(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("ds")
}
