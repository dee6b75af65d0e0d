//! Encryption keys: a random 256-bit master key kept in a key file,
//! wrapped by a passphrase. [`crate::crypt`] derives the keys that
//! encrypt a datastore from it.
//!
//! Key file (JSON, written 0600 with temp file, fsync, link; never replaced):
//!
//! ```json
//! {"version":1,"kdf":{"algorithm":"argon2id","memory_kib":65536,"iterations":3,"lanes":1,"salt":"<16 bytes hex>"},
//!  "cipher":"chacha20-poly1305","nonce":"<12 bytes hex>","wrapped_key":"<48 bytes hex>",
//!  "fingerprint":"<16 bytes hex>","created":"2026-12-01T06:00:00Z"}
//! ```
//!
//! - The passphrase goes through Argon2id (RFC 9106; 64 MiB, 3 passes:
//!   about a quarter second here) with a random salt into a
//!   key-encryption key, which seals the master key with
//!   ChaCha20-Poly1305. Everything else in the file (KDF parameters,
//!   fingerprint, creation time) is the AEAD's associated data: a file
//!   whose parameters were lowered or whose fingerprint was swapped does
//!   not open, the same as a wrong passphrase, and the error says both.
//! - The fingerprint is BLAKE3's key derivation of the master key under
//!   its own context, truncated to 16 bytes: it names the key (the
//!   datastore config and every manifest record it) without revealing anything usable about it.
//! - `export_master` prints the master key as hex, the recovery copy a
//!   user keeps offline; `import_master` wraps such a copy under a new
//!   passphrase.

use std::fmt;
use std::path::Path;

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{Aead, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use provider_api::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

use crate::util::{from_hex, to_hex as hex};

const FINGERPRINT_CONTEXT: &str = "vmbackup 2026-12-01 master key fingerprint";
const KEY_FILE_VERSION: u32 = 1;

/// The Argon2id cost of new key files.
const MEMORY_KIB: u32 = 64 * 1024;
const ITERATIONS: u32 = 3;
const LANES: u32 = 1;
/// Key files asking for less than this are refused (a file lowered to
/// make brute force cheap must not open quietly).
const MIN_MEMORY_KIB: u32 = 8 * 1024;

/// A 256-bit master key. `Debug` shows only its fingerprint.
#[derive(Clone, PartialEq, Eq)]
pub struct MasterKey([u8; 32]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.fingerprint())
    }
}

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> MasterKey {
        let mut k = [0u8; 32];
        OsRng.fill_bytes(&mut k);
        MasterKey(k)
    }

    /// The key's public name (32 hex digits).
    pub fn fingerprint(&self) -> String {
        let d = blake3::derive_key(FINGERPRINT_CONTEXT, &self.0);
        hex(&d[..16])
    }

    /// The key's bytes (for deriving subkeys).
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The recovery copy: the key as 64 hex digits.
    pub fn export_master(&self) -> String {
        hex(&self.0)
    }

    /// A key from its recovery copy.
    pub fn import_master(text: &str) -> Result<MasterKey> {
        from_hex::<32>(text.trim())
            .map(MasterKey)
            .ok_or_else(|| Error::invalid("a master key is 64 hex digits"))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Kdf {
    algorithm: String,
    memory_kib: u32,
    iterations: u32,
    lanes: u32,
    salt: String,
}

/// The key file's contents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    version: u32,
    kdf: Kdf,
    cipher: String,
    nonce: String,
    wrapped_key: String,
    /// The master key's fingerprint.
    pub fingerprint: String,
    /// When the file was written (RFC 3339, UTC).
    pub created: String,
}

fn kek(kdf: &Kdf, passphrase: &str) -> Result<[u8; 32]> {
    if kdf.algorithm != "argon2id" {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("unknown key derivation {:?}", kdf.algorithm),
        ));
    }
    if kdf.memory_kib < MIN_MEMORY_KIB {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "the key file asks for {} KiB of Argon2 memory, less than the {MIN_MEMORY_KIB} KiB \
                 this release accepts",
                kdf.memory_kib
            ),
        ));
    }
    let salt = from_hex::<16>(&kdf.salt).ok_or_else(|| {
        Error::new(
            ErrorKind::Corrupt,
            "the key file's salt is not 16 hex bytes",
        )
    })?;
    let params = Params::new(kdf.memory_kib, kdf.iterations, kdf.lanes, Some(32))
        .map_err(|e| Error::new(ErrorKind::Corrupt, format!("Argon2 parameters: {e}")))?;
    let mut out = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase.as_bytes(), &salt, &mut out)
        .map_err(|e| Error::new(ErrorKind::Other, format!("Argon2: {e}")))?;
    Ok(out)
}

impl KeyFile {
    /// The associated data: every field but the sealed key and its nonce.
    fn aad(&self) -> Vec<u8> {
        let mut c = self.clone();
        c.nonce.clear();
        c.wrapped_key.clear();
        serde_json::to_vec(&c).unwrap_or_default()
    }

    /// Seal `key` under `passphrase` (fresh salt and nonce).
    pub fn seal(key: &MasterKey, passphrase: &str) -> Result<KeyFile> {
        if passphrase.is_empty() {
            return Err(Error::invalid("an empty passphrase protects nothing"));
        }
        let mut salt = [0u8; 16];
        OsRng.fill_bytes(&mut salt);
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        let mut file = KeyFile {
            version: KEY_FILE_VERSION,
            kdf: Kdf {
                algorithm: "argon2id".into(),
                memory_kib: MEMORY_KIB,
                iterations: ITERATIONS,
                lanes: LANES,
                salt: hex(&salt),
            },
            cipher: "chacha20-poly1305".into(),
            nonce: String::new(),
            wrapped_key: String::new(),
            fingerprint: key.fingerprint(),
            created: crate::util::rfc3339(crate::util::now_secs()),
        };
        let kek = kek(&file.kdf, passphrase)?;
        let aad = file.aad();
        let sealed = ChaCha20Poly1305::new(Key::from_slice(&kek))
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &key.0,
                    aad: &aad,
                },
            )
            .map_err(|_| Error::other("sealing the master key failed"))?;
        file.nonce = hex(&nonce);
        file.wrapped_key = hex(&sealed);
        Ok(file)
    }

    /// The master key, if `passphrase` is right and the file unaltered.
    pub fn open(&self, passphrase: &str) -> Result<MasterKey> {
        if self.version != KEY_FILE_VERSION || self.cipher != "chacha20-poly1305" {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "key file version {} with cipher {:?} is not one this release reads",
                    self.version, self.cipher
                ),
            ));
        }
        let kek = kek(&self.kdf, passphrase)?;
        let nonce = from_hex::<12>(&self.nonce)
            .ok_or_else(|| Error::new(ErrorKind::Corrupt, "the key file's nonce is damaged"))?;
        let sealed = from_hex::<48>(&self.wrapped_key).ok_or_else(|| {
            Error::new(ErrorKind::Corrupt, "the key file's wrapped key is damaged")
        })?;
        let plain = ChaCha20Poly1305::new(Key::from_slice(&kek))
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &sealed,
                    aad: &self.aad(),
                },
            )
            .map_err(|_| {
                Error::new(
                    ErrorKind::InvalidInput,
                    "wrong passphrase for this key file (or the file was altered)",
                )
            })?;
        let key = <[u8; 32]>::try_from(plain.as_slice())
            .map(MasterKey)
            .map_err(|_| Error::new(ErrorKind::Corrupt, "the key file's key is not 32 bytes"))?;
        if key.fingerprint() != self.fingerprint {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "the key file's fingerprint does not match its key",
            ));
        }
        Ok(key)
    }

    /// Read a key file.
    pub fn load(path: &Path) -> Result<KeyFile> {
        let text = std::fs::read(path).map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("reading key file {}", path.display()),
            )
            .with_source(e)
        })?;
        serde_json::from_slice(&text).map_err(|e| {
            Error::new(
                ErrorKind::Corrupt,
                format!("{} is not a key file: {e}", path.display()),
            )
        })
    }

    /// Write the key file (0600): a temp file, fsynced, then hard-linked
    /// to `path`, which fails atomically when `path` exists (two
    /// concurrent creations cannot overwrite each other), then the
    /// directory fsynced.
    pub fn store_new(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        let exists = || {
            Error::invalid(format!(
                "{} exists: a key file is never overwritten (its key may protect backups)",
                path.display()
            ))
        };
        if path.exists() {
            return Err(exists());
        }
        let data = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::other("encoding the key file").with_source(e))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let tmp = dir.join(format!(".key.tmp-{}", crate::util::unique_suffix()));
        let written = (|| {
            let mut f = crate::util::create_private(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            std::fs::hard_link(&tmp, path)
        })();
        let _ = std::fs::remove_file(&tmp);
        match written {
            Ok(()) => crate::util::sync_dir(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(exists()),
            Err(e) => Err(crate::util::io_err("writing key file", path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_opens_with_its_passphrase_only_and_tampering_is_detected() {
        let key = MasterKey::generate();
        let file = KeyFile::seal(&key, "correct horse").unwrap();
        assert_eq!(file.fingerprint, key.fingerprint());
        assert_eq!(file.fingerprint.len(), 32);
        assert!(!format!("{key:?}").contains(&key.export_master()));
        assert_eq!(file.open("correct horse").unwrap(), key);

        let e = file.open("wrong horse").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("wrong passphrase"), "{e}");

        // Lowered costs, a swapped fingerprint, a flipped byte: none opens.
        let mut weaker = file.clone();
        weaker.kdf.iterations = 1;
        assert!(weaker.open("correct horse").is_err());
        let mut cheap = file.clone();
        cheap.kdf.memory_kib = 1024;
        assert!(
            cheap
                .open("correct horse")
                .unwrap_err()
                .to_string()
                .contains("KiB")
        );
        let mut other = file.clone();
        other.fingerprint = MasterKey::generate().fingerprint();
        assert!(other.open("correct horse").is_err());
        let mut flipped = file.clone();
        let mut w = from_hex::<48>(&flipped.wrapped_key).unwrap();
        w[0] ^= 1;
        flipped.wrapped_key = hex(&w);
        assert!(flipped.open("correct horse").is_err());

        assert!(KeyFile::seal(&key, "").is_err());
    }

    #[test]
    fn key_files_round_trip_on_disk_and_are_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        let key = MasterKey::generate();
        KeyFile::seal(&key, "pw").unwrap().store_new(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(KeyFile::load(&path).unwrap().open("pw").unwrap(), key);
        let e = KeyFile::seal(&key, "pw")
            .unwrap()
            .store_new(&path)
            .unwrap_err();
        assert!(e.to_string().contains("never overwritten"), "{e}");

        // The recovery copy re-wraps under a new passphrase.
        let again = MasterKey::import_master(&key.export_master()).unwrap();
        assert_eq!(again, key);
        let rewrapped = KeyFile::seal(&again, "new").unwrap();
        assert_eq!(rewrapped.fingerprint, key.fingerprint());
        assert!(MasterKey::import_master("abc").is_err());

        // Creations racing for one path: exactly one wins, none replaces it.
        let race = dir.path().join("race.json");
        let sealed: Vec<(MasterKey, KeyFile)> = (0..8)
            .map(|_| {
                let k = MasterKey::generate();
                let f = KeyFile::seal(&k, "pw").unwrap();
                (k, f)
            })
            .collect();
        let wins: Vec<usize> = std::thread::scope(|s| {
            let handles: Vec<_> = sealed
                .iter()
                .enumerate()
                .map(|(i, (_, f))| {
                    let race = &race;
                    s.spawn(move || f.store_new(race).is_ok().then_some(i))
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(wins.len(), 1, "{wins:?}");
        assert_eq!(
            KeyFile::load(&race).unwrap().open("pw").unwrap(),
            sealed[wins[0]].0
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        std::fs::write(dir.path().join("junk.json"), "{}").unwrap();
        let e = KeyFile::load(&dir.path().join("junk.json")).unwrap_err();
        assert!(e.to_string().contains("is not a key file"), "{e}");
    }
}
