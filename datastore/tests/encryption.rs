//! Client-side encryption: nothing of a guest's data or configuration is
//! readable in an encrypted datastore's files, the right key is required
//! and checked, chunk names are keyed, and any altered chunk, index,
//! manifest or config is refused, never restored. (The rest of the suite
//! also runs against encrypted datastores: `VMBACKUP_TEST_ENCRYPTED=1`.)

use crate::common;

use std::path::{Path, PathBuf};

use common::*;
use datastore::{Crypt, Datastore, DatastoreOptions, Digest, MasterKey, VerifyScope};
use provider_api::*;

const MARKER: &[u8] = b"--guest-secret-7f3a9c--guest-secret-7f3a9c--guest-secret-7f3a9c--";
const CONFIG_SECRET: &str = "root-password-hunter2-in-guest-config";

fn options() -> DatastoreOptions {
    DatastoreOptions {
        chunk_size: CS,
        ..Default::default()
    }
}

/// A disk of noise with the marker at a chunk boundary and in the middle
/// of a chunk (zstd keeps noise and a short marker as literals: the plain
/// datastore shows it, which makes this test able to fail).
fn disk() -> Vec<u8> {
    let mut d = noise(5, 6 * CS as usize);
    for at in [CS as usize - 10, 3 * CS as usize + 100] {
        d[at..at + MARKER.len()].copy_from_slice(MARKER);
    }
    d
}

async fn backup_with_config(ds: &Datastore, time: i64, data: &[u8]) -> SnapshotInfo {
    let mut snap = ds.begin_snapshot(spec("vm-secret", time)).await.unwrap();
    snap.put_config(
        ConfigKind::Guest,
        ConfigBlob::json(&serde_json::json!({ "password": CONFIG_SECRET })),
    )
    .await
    .unwrap();
    write_volume(
        &mut snap,
        vspec("sys", data.len() as u64, StartFrom::Empty),
        &[Op::Data(0, data.to_vec())],
    )
    .await
    .unwrap();
    snap.commit(vec![]).await.unwrap()
}

fn files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            out.push(p);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Files of the datastore whose bytes contain `needle`.
fn leaking(root: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files(root)
        .into_iter()
        .filter(|p| contains(&std::fs::read(p).unwrap(), needle))
        .collect()
}

fn find(root: &Path, suffix: &str) -> PathBuf {
    files(root)
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with(suffix))
        .unwrap_or_else(|| panic!("no file ending in {suffix} under {}", root.display()))
}

#[tokio::test]
async fn nothing_of_the_guest_is_readable_in_an_encrypted_datastore() {
    let dir = tempfile::tempdir().unwrap();
    let data = disk();
    let plain = Datastore::create(dir.path().join("plain"), options()).unwrap();
    backup_with_config(&plain, 1, &data).await;
    assert!(
        !leaking(plain.root(), MARKER).is_empty(),
        "the plain store shows the data"
    );
    assert!(!leaking(plain.root(), CONFIG_SECRET.as_bytes()).is_empty());

    let key = MasterKey::generate();
    let enc = Datastore::create_with_key(dir.path().join("enc"), options(), Some(&key)).unwrap();
    let info = backup_with_config(&enc, 1, &data).await;
    assert_eq!(leaking(enc.root(), MARKER), Vec::<PathBuf>::new());
    assert_eq!(
        leaking(enc.root(), CONFIG_SECRET.as_bytes()),
        Vec::<PathBuf>::new()
    );
    // Nor the chunk names an unencrypted BLAKE3 store would use.
    let plain_name = blake3::hash(&data[..CS as usize]).to_hex().to_string();
    assert!(
        files(enc.root())
            .iter()
            .all(|p| !p.to_string_lossy().contains(&plain_name))
    );

    // The bytes come back, through a reopened handle with the key.
    let enc = Datastore::open_with_key(enc.root(), Some(&key)).unwrap();
    assert_eq!(
        read_all(&enc, &info.id, "sys", Layer::Merged)
            .await
            .unwrap(),
        data
    );
    let snap = enc.open_snapshot(&info.id).await.unwrap();
    let cfg = snap.config(ConfigKind::Guest).await.unwrap().unwrap();
    assert!(contains(&cfg.data, CONFIG_SECRET.as_bytes()));
    assert!(enc.verify(VerifyScope::All).unwrap().is_ok());

    // The manifest records the key; the config names it in clear.
    let mpath = find(enc.root(), "index.json");
    let crypt = Crypt::new(&key);
    let m: serde_json::Value = datastore::manifest::load_sealed(&mpath, Some(&crypt)).unwrap();
    assert_eq!(m["key_fingerprint"], key.fingerprint());
    let cfg: serde_json::Value =
        datastore::manifest::load_sealed(&enc.root().join(".datastore.json"), None).unwrap();
    assert_eq!(cfg["version"], datastore::DATASTORE_VERSION_ENCRYPTED);
    assert_eq!(cfg["encryption"]["key_fingerprint"], key.fingerprint());
    assert_eq!(
        Datastore::key_fingerprint_at(enc.root())
            .unwrap()
            .as_deref(),
        Some(key.fingerprint().as_str())
    );
}

#[tokio::test]
async fn the_right_key_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let root = dir.path().join("enc");
    Datastore::create_with_key(&root, options(), Some(&key)).unwrap();
    let fp = key.fingerprint();

    let err = Datastore::open(&root).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(
        err.to_string()
            .contains(&format!("encrypted with key {fp}")),
        "{err}"
    );

    let other = MasterKey::generate();
    let err = Datastore::open_with_key(&root, Some(&other)).unwrap_err();
    assert!(
        err.to_string().contains(&other.fingerprint()) && err.to_string().contains(&fp),
        "{err}"
    );

    let plain = dir.path().join("plain");
    Datastore::create(&plain, options()).unwrap();
    let err = Datastore::open_with_key(&plain, Some(&key)).unwrap_err();
    assert!(err.to_string().contains("is not encrypted"), "{err}");
    assert_eq!(Datastore::key_fingerprint_at(&plain).unwrap(), None);

    // SHA-256 naming and encryption do not mix.
    let err = Datastore::create_with_key(
        dir.path().join("sha"),
        DatastoreOptions {
            chunk_size: CS,
            chunk_hash: datastore::ChunkHash::Sha256,
        },
        Some(&key),
    )
    .unwrap_err();
    assert!(err.to_string().contains("keyed BLAKE3"), "{err}");
}

#[tokio::test]
async fn chunk_names_are_keyed() {
    let dir = tempfile::tempdir().unwrap();
    let data = disk();
    let (k1, k2) = (MasterKey::generate(), MasterKey::generate());
    let a = Datastore::create_with_key(dir.path().join("a"), options(), Some(&k1)).unwrap();
    let b = Datastore::create_with_key(dir.path().join("b"), options(), Some(&k2)).unwrap();
    backup_with_config(&a, 1, &data).await;
    backup_with_config(&b, 1, &data).await;
    let names = |ds: &Datastore| -> std::collections::BTreeSet<String> {
        files(&ds.root().join(".chunks"))
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    let (na, nb) = (names(&a), names(&b));
    assert_eq!(na.len(), 6);
    assert!(
        na.is_disjoint(&nb),
        "equal data under two keys shares no chunk name"
    );
    // The same key names the same data the same way (dedup inside a key).
    let a2 = Datastore::create_with_key(dir.path().join("a2"), options(), Some(&k1)).unwrap();
    backup_with_config(&a2, 1, &data).await;
    assert_eq!(names(&a2), na);
}

/// Flip one byte of `path` at `at` (from the end when negative).
fn flip(path: &Path, at: isize) {
    let mut b = std::fs::read(path).unwrap();
    let i = if at < 0 {
        b.len() - (-at) as usize
    } else {
        at as usize
    };
    b[i] ^= 0x01;
    std::fs::write(path, b).unwrap();
}

/// Recompute a chunk file's CRC after tampering, so that only the
/// cipher's tag can catch it.
fn fix_crc(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..20]);
    h.update(&b[24..]);
    let crc = h.finalize().to_le_bytes();
    b[20..24].copy_from_slice(&crc);
    std::fs::write(path, b).unwrap();
}

#[tokio::test]
async fn altered_files_are_refused_never_restored() {
    let dir = tempfile::tempdir().unwrap();
    let data = disk();
    let key = MasterKey::generate();
    let fresh = |name: &str| {
        Datastore::create_with_key(dir.path().join(name), options(), Some(&key)).unwrap()
    };
    let digest_at = |ds: &Datastore, i: usize| -> Digest {
        ds.chunks()
            .digest_of(&data[i * CS as usize..(i + 1) * CS as usize])
    };

    // A chunk's ciphertext altered (CRC made to match): the read fails
    // Corrupt, naming the chunk, and verify reports it.
    let ds = fresh("chunk");
    let info = backup_with_config(&ds, 1, &data).await;
    let d = digest_at(&ds, 2);
    let p = ds.chunks().path(&d);
    flip(&p, 40);
    fix_crc(&p);
    ds.set_chunk_cache_bytes(0);
    let err = read_all(&ds, &info.id, "sys", Layer::Merged)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains(&d.to_hex()), "{err}");
    assert!(err.to_string().contains("does not authenticate"), "{err}");
    let report = ds.verify(VerifyScope::All).unwrap();
    assert!(!report.is_ok());

    // One chunk file copied over another's name: refused.
    let ds = fresh("swap");
    let info = backup_with_config(&ds, 1, &data).await;
    let (d1, d4) = (digest_at(&ds, 1), digest_at(&ds, 4));
    std::fs::copy(ds.chunks().path(&d1), ds.chunks().path(&d4)).unwrap();
    let err = read_all(&ds, &info.id, "sys", Layer::Merged)
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&d4.to_hex()), "{err}");

    // The index: open refuses it (the manifest's checksum or the tag).
    let ds = fresh("index");
    let info = backup_with_config(&ds, 1, &data).await;
    flip(&find(ds.root(), "sys.fidx"), -3);
    let snap = ds.open_snapshot(&info.id).await.unwrap();
    let err = snap.open_volume("sys", Layer::Merged).await.err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{}", err.report());

    // The manifest: the snapshot cannot be opened, and is not listed.
    let ds = fresh("manifest");
    let info = backup_with_config(&ds, 1, &data).await;
    flip(&find(ds.root(), "index.json"), 60);
    let err = ds.open_snapshot(&info.id).await.err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{}", err.report());
    assert!(err.to_string().contains("does not authenticate"), "{err}");
    assert!(ds.list_snapshots(None, None).await.unwrap().is_empty());

    // A manifest put in place unencrypted (say, from a plain datastore
    // with a matching layout): refused, not trusted.
    let ds = fresh("foreign");
    let info = backup_with_config(&ds, 1, &data).await;
    let plain = Datastore::create(dir.path().join("plain"), options()).unwrap();
    backup_with_config(&plain, 1, &data).await;
    std::fs::copy(
        find(plain.root(), "index.json"),
        find(ds.root(), "index.json"),
    )
    .unwrap();
    let err = ds.open_snapshot(&info.id).await.err().unwrap();
    assert!(err.to_string().contains("not encrypted"), "{err}");

    // The config: its chunk size changed in clear text: refused.
    let ds = fresh("config");
    let cpath = ds.root().join(".datastore.json");
    let mut cfg: serde_json::Value = datastore::manifest::load_sealed(&cpath, None).unwrap();
    cfg["chunk_size"] = serde_json::json!(2 * CS);
    datastore::manifest::store_sealed(&cpath, &cfg, None).unwrap();
    let err = Datastore::open_with_key(ds.root(), Some(&key)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("altered"), "{err}");
}
