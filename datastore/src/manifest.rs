//! Snapshot and base-image manifests, blobs, verify state.
//!
//! A manifest file is JSON of the form
//! `{"checksum":"<sha256 hex of the manifest text>","manifest":{...}}`: the
//! checksum covers the exact bytes of the `manifest` value, so truncation
//! and tampering are caught.

use std::path::Path;

use provider_api::{
    ArchiveName, BaseImageId, BitmapMode, Checkpoint, GuestId, Result, StoredVolume, Volume,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::crypt::{Crypt, FILE_OVERHEAD, open_opt, seal_opt};
use crate::storage::Storage;
use crate::util::{corrupt, sha256_hex};

/// Format name in every manifest (never changes).
pub const SNAPSHOT_FORMAT: &str = "vmbackup-datastore-snapshot";
/// Format name of a base image manifest (never changes).
pub const BASE_IMAGE_FORMAT: &str = "vmbackup-datastore-base-image";
/// Manifest format version.
pub const MANIFEST_VERSION: u32 = 1;
/// Manifest version of snapshots with file archives.
pub const MANIFEST_VERSION_ARCHIVES: u32 = 2;
/// Largest manifest accepted.
pub const MAX_MANIFEST_LEN: u64 = 16 << 20;
/// Largest blob accepted.
pub const MAX_BLOB_LEN: u64 = 64 << 20;

/// A file of the snapshot with its size and checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// File name in the snapshot directory.
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
}

/// One volume in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestVolume {
    /// The volume.
    pub volume: Volume,
    /// Linked base image.
    pub base: Option<BaseImageId>,
    /// Bitmap mode.
    pub bitmap_mode: BitmapMode,
    /// Checkpoint.
    pub checkpoint: Option<Checkpoint>,
    /// Its fixed index.
    pub index: FileRef,
}

impl ManifestVolume {
    /// As the contract lists it.
    pub fn stored(&self) -> StoredVolume {
        StoredVolume {
            volume: self.volume.clone(),
            base: self.base.clone(),
            bitmap_mode: self.bitmap_mode,
            checkpoint: self.checkpoint.clone(),
        }
    }
}

/// A configuration or metadata blob in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestBlob {
    /// `guest`, `firewall` or `metadata`.
    pub kind: String,
    /// Media type.
    pub content_type: String,
    /// The file.
    #[serde(flatten)]
    pub file: FileRef,
}

/// A snapshot's manifest (`index.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`SNAPSHOT_FORMAT`].
    pub format: String,
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// Provider name.
    pub platform: String,
    /// Guest.
    pub guest: GuestId,
    /// Archive name.
    pub archive: ArchiveName,
    /// Backup time.
    pub time: i64,
    /// Chunk size of every index.
    pub chunk_size: u64,
    /// Volumes.
    pub volumes: Vec<ManifestVolume>,
    /// Blobs.
    pub blobs: Vec<ManifestBlob>,
    /// File archives (directory trees): only in manifests of version 2,
    /// which older versions refuse to read (and so never collect the
    /// chunks of).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub archives: Vec<crate::archive::ManifestArchive>,
    /// Warnings.
    pub warnings: Vec<String>,
    /// Fingerprint of the key the snapshot is encrypted with (encrypted
    /// datastores only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_fingerprint: Option<String>,
}

/// A base image's manifest (`manifest.json` next to `image.fidx`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseImageManifest {
    /// [`BASE_IMAGE_FORMAT`].
    pub format: String,
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// Platform.
    pub platform: String,
    /// The platform's id.
    pub id: BaseImageId,
    /// Chunk size.
    pub chunk_size: u64,
    /// The index.
    pub index: FileRef,
    /// When stored.
    pub time: i64,
    /// Fingerprint of the key the base image is encrypted with (encrypted
    /// datastores only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_fingerprint: Option<String>,
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    checksum: String,
    manifest: &'a RawValue,
}

#[derive(Deserialize)]
struct EnvelopeIn<'a> {
    checksum: String,
    #[serde(borrow)]
    manifest: &'a RawValue,
}

/// Serialize `value` with its checksum.
pub fn seal<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let text = serde_json::to_string(value)
        .map_err(|e| provider_api::Error::other("serializing a manifest failed").with_source(e))?;
    let raw = RawValue::from_string(text)
        .map_err(|e| provider_api::Error::other("serializing a manifest failed").with_source(e))?;
    let env = EnvelopeOut {
        checksum: sha256_hex(raw.get().as_bytes()),
        manifest: &raw,
    };
    let mut out = serde_json::to_vec(&env)
        .map_err(|e| provider_api::Error::other("serializing a manifest failed").with_source(e))?;
    out.push(b'\n');
    Ok(out)
}

/// Parse and check a sealed file's bytes.
pub fn unseal<T: for<'de> Deserialize<'de>>(buf: &[u8], path: &Path) -> Result<T> {
    let bad = |why: &str| corrupt(format!("manifest {} is damaged: {why}", path.display()));
    let env: EnvelopeIn<'_> = serde_json::from_slice(buf).map_err(|_| bad("not valid JSON"))?;
    if sha256_hex(env.manifest.get().as_bytes()) != env.checksum {
        return Err(bad("checksum mismatch"));
    }
    serde_json::from_str(env.manifest.get()).map_err(|_| bad("unexpected content"))
}

/// Read a sealed manifest file (decrypting it with `crypt`, which an
/// encrypted datastore's files require).
pub fn load_sealed<T: for<'de> Deserialize<'de>>(path: &Path, crypt: Option<&Crypt>) -> Result<T> {
    read_sealed(&Storage::Local, path, crypt)
}

/// Write a sealed manifest atomically (encrypted with `crypt` if given).
pub fn store_sealed<T: Serialize>(path: &Path, value: &T, crypt: Option<&Crypt>) -> Result<()> {
    write_sealed(&Storage::Local, path, value, crypt)
}

/// [`load_sealed`] from a datastore's storage.
pub(crate) fn read_sealed<T: for<'de> Deserialize<'de>>(
    st: &Storage,
    path: &Path,
    crypt: Option<&Crypt>,
) -> Result<T> {
    let buf = st.read(path, MAX_MANIFEST_LEN + FILE_OVERHEAD as u64)?;
    unseal(&open_opt(crypt, path, buf)?, path)
}

/// [`store_sealed`] to a datastore's storage.
pub(crate) fn write_sealed<T: Serialize>(
    st: &Storage,
    path: &Path,
    value: &T,
    crypt: Option<&Crypt>,
) -> Result<()> {
    st.write_atomic(path, seal_opt(crypt, path, seal(value)?)?)
}

/// Check that a manifest names the key it was decrypted with (or none in
/// an unencrypted datastore).
pub fn check_key(recorded: Option<&str>, crypt: Option<&Crypt>, path: &Path) -> Result<()> {
    let expected = crypt.map(Crypt::fingerprint);
    if recorded != expected {
        return Err(corrupt(format!(
            "manifest {} records key {}, but the datastore's is {}",
            path.display(),
            recorded.unwrap_or("none"),
            expected.unwrap_or("none")
        )));
    }
    Ok(())
}

/// Check a snapshot manifest's own fields.
pub fn check_manifest(m: &Manifest, path: &Path, crypt: Option<&Crypt>) -> Result<()> {
    check_key(m.key_fingerprint.as_deref(), crypt, path)?;
    let version_ok = match m.version {
        MANIFEST_VERSION => m.archives.is_empty(),
        MANIFEST_VERSION_ARCHIVES => true,
        _ => false,
    };
    if m.format != SNAPSHOT_FORMAT || !version_ok {
        return Err(corrupt(format!(
            "manifest {} has format {:?} version {}, expected {SNAPSHOT_FORMAT:?} version {MANIFEST_VERSION}",
            path.display(),
            m.format,
            m.version
        )));
    }
    Ok(())
}

/// Read a blob, check it against its manifest entry (size and SHA-256 of
/// the stored bytes) and decrypt it with `crypt` if given.
pub fn load_blob(dir: &Path, file: &FileRef, crypt: Option<&Crypt>) -> Result<Vec<u8>> {
    read_blob(&Storage::Local, dir, file, crypt)
}

/// [`load_blob`] from a datastore's storage.
pub(crate) fn read_blob(
    st: &Storage,
    dir: &Path,
    file: &FileRef,
    crypt: Option<&Crypt>,
) -> Result<Vec<u8>> {
    let path = dir.join(&file.file);
    if file.size > MAX_BLOB_LEN + FILE_OVERHEAD as u64 {
        return Err(corrupt(format!(
            "blob {} is listed with {} bytes, more than the limit",
            path.display(),
            file.size
        )));
    }
    let data = st.read(&path, file.size)?;
    let sum = sha256_hex(&data);
    if data.len() as u64 != file.size || sum != file.sha256 {
        return Err(corrupt(format!(
            "blob {} (sha256 {}) is damaged: found {} bytes with sha256 {sum}",
            path.display(),
            file.sha256,
            data.len()
        )));
    }
    open_opt(crypt, &path, data)
}

/// Outcome of the last verification, stored as `verify.json` next to the
/// manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyState {
    /// `ok` or `failed`.
    pub state: String,
    /// When verified.
    pub time: i64,
    /// What was found damaged.
    pub errors: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_round_trip_and_damage() {
        let v = VerifyState {
            state: "ok".into(),
            time: 5,
            errors: vec!["a\"b".into()],
        };
        let buf = seal(&v).unwrap();
        let p = Path::new("index.json");
        assert_eq!(unseal::<VerifyState>(&buf, p).unwrap(), v);
        for len in [0, 1, buf.len() / 2, buf.len() - 3] {
            assert!(unseal::<VerifyState>(&buf[..len], p).is_err());
        }
        let text = String::from_utf8(buf).unwrap().replace("\"ok\"", "\"no\"");
        let err = unseal::<VerifyState>(text.as_bytes(), p).unwrap_err();
        assert!(err.to_string().contains("index.json"));
    }
}
