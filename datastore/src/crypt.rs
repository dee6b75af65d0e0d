//! Client-side encryption of a datastore: chunk names, chunk bodies and
//! every metadata file, under keys derived from one [`MasterKey`].
//!
//! ## Keys
//!
//! Four 256-bit subkeys are derived from the master key with BLAKE3's key
//! derivation (each under its own context string), so no two uses share a
//! key:
//!
//! | subkey | use |
//! |--------|-----|
//! | chunk id | chunk names: keyed BLAKE3 of the plaintext (a PRF: equal plaintext in datastores with different keys gets unrelated names, and a name reveals nothing about its content without the key) |
//! | chunk | per-chunk AES-256-GCM keys: keyed BLAKE3 of the chunk's name |
//! | metadata | per-file AES-256-GCM keys: keyed BLAKE3 of a random 16-byte salt |
//! | config | the datastore config's authentication tag (keyed BLAKE3) |
//!
//! ## Why a key per chunk and per file
//!
//! AES-GCM with random 96-bit nonces is safe for about 2³² messages per
//! key. A chunk's key is derived from its name, and a name stands for one
//! plaintext, so each key ever encrypts one plaintext (two hosts storing
//! the same new chunk at once encrypt the same bytes, with different
//! nonces); a metadata file's key comes from a fresh 128-bit salt. No
//! key comes near the bound, however large the datastore grows.
//!
//! ## What is bound to what
//!
//! - A chunk's associated data is its header (magic, encoding, plaintext
//!   length) and its name, and its key is derived from its name: a chunk
//!   file copied under another name, or with its header edited, fails
//!   authentication. After decryption (and decompression) the keyed
//!   BLAKE3 of the plaintext must equal the name again.
//! - A metadata file's associated data is its magic and its file name
//!   (`index.json`, `sys.fidx`, `guest.conf.blob`, …): a manifest cannot be
//!   passed off as a blob or a verify state. Manifests list each index and
//!   blob with the SHA-256 of its stored bytes, so those cannot be swapped
//!   between snapshots either.
//! - The config (`.datastore.json`) is not secret (format, chunk size, the
//!   key's fingerprint, which a reader needs before it can choose a key),
//!   so it is authenticated, not encrypted.
//!
//! Someone with write access to the storage can still delete files, or
//! put back an older snapshot directory whole (rollback); they cannot
//! change what any snapshot restores, nor make a restore return bytes
//! that were not backed up under this key. The all-zero chunk is never
//! stored (its reserved name is in the encrypted index), and chunk files'
//! sizes show roughly how compressible each chunk was, as in every
//! deduplicating store with per-chunk compression.
//!
//! ## Cipher
//!
//! AES-256-GCM from `ring` (already built for rustls): 5.1 GB/s per core
//! on this project's machines (AES-NI, VAES), against 0.83 GB/s for
//! RustCrypto's `aes-gcm` and 0.68 GB/s for its XChaCha20-Poly1305
//! (4 MiB buffers, release builds, measured side by side). A backup hashes
//! and compresses every byte at about 1 GB/s per core already; the
//! RustCrypto ciphers would have added more than half of that again.

use std::fmt;
use std::path::Path;

use provider_api::{Error, ErrorKind, Result};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::chunk::Digest;
use crate::key::MasterKey;
use crate::util::{corrupt, to_hex};

/// Magic number of an encrypted metadata file (never changes).
pub const FILE_MAGIC: [u8; 8] = *b"VBDSENC1";
const SALT_LEN: usize = 16;
/// Bytes an encrypted metadata file adds to its plaintext.
pub const FILE_OVERHEAD: usize = FILE_MAGIC.len() + SALT_LEN + NONCE_LEN + TAG_LEN;
/// Bytes encryption adds to a chunk's stored bytes (nonce and tag).
pub const CHUNK_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
const TAG_LEN: usize = 16;

/// The cipher name recorded in a datastore's config.
pub const CIPHER: &str = "aes-256-gcm";
/// The chunk naming recorded in an encrypted datastore's config.
pub const CHUNK_ID: &str = "blake3-keyed";

const CTX_CHUNK_ID: &str = "vmbackup 2026-12-01 datastore chunk id";
const CTX_CHUNK: &str = "vmbackup 2026-12-01 datastore chunk encryption";
const CTX_META: &str = "vmbackup 2026-12-01 datastore metadata encryption";
const CTX_CONFIG: &str = "vmbackup 2026-12-01 datastore config authentication";

/// The keys of an encrypted datastore. `Debug` shows only the
/// fingerprint.
#[derive(Clone)]
pub struct Crypt {
    chunk_id: [u8; 32],
    chunk: [u8; 32],
    meta: [u8; 32],
    config: [u8; 32],
    fingerprint: String,
}

impl fmt::Debug for Crypt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Crypt({})", self.fingerprint)
    }
}

fn aead_key(key: &[u8; 32]) -> Result<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| Error::other("AES-256-GCM refused a 32-byte key"))
}

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| Error::other("the system's random number generator failed"))?;
    Ok(out)
}

impl Crypt {
    /// The subkeys of `master`.
    pub fn new(master: &MasterKey) -> Crypt {
        let m = master.bytes();
        Crypt {
            chunk_id: blake3::derive_key(CTX_CHUNK_ID, m),
            chunk: blake3::derive_key(CTX_CHUNK, m),
            meta: blake3::derive_key(CTX_META, m),
            config: blake3::derive_key(CTX_CONFIG, m),
            fingerprint: master.fingerprint(),
        }
    }

    /// The master key's fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// A chunk's name: keyed BLAKE3 of its plaintext.
    pub fn chunk_id(&self, data: &[u8]) -> Digest {
        Digest(*blake3::keyed_hash(&self.chunk_id, data).as_bytes())
    }

    /// The authentication tag of a config's bytes (hex).
    pub(crate) fn config_tag(&self, bytes: &[u8]) -> String {
        to_hex(blake3::keyed_hash(&self.config, bytes).as_bytes())
    }

    fn chunk_key(&self, digest: &Digest) -> Result<LessSafeKey> {
        aead_key(blake3::keyed_hash(&self.chunk, &digest.0).as_bytes())
    }

    /// Encrypt a chunk's stored bytes: `nonce ‖ ciphertext ‖ tag`, the
    /// associated data being `header` (the fields before the lengths) and
    /// the chunk's name.
    pub(crate) fn seal_chunk(
        &self,
        digest: &Digest,
        header: &[u8],
        body: &[u8],
    ) -> Result<Vec<u8>> {
        let nonce: [u8; NONCE_LEN] = random()?;
        let mut out = Vec::with_capacity(body.len() + CHUNK_OVERHEAD);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(body);
        let aad = [header, &digest.0].concat();
        let tag = self
            .chunk_key(digest)?
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut out[NONCE_LEN..],
            )
            .map_err(|_| Error::other(format!("encrypting chunk {digest} failed")))?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypt in place what [`Crypt::seal_chunk`] made, found at
    /// `buf[from..]`: on success `buf` holds just the plaintext (one pass:
    /// decrypted and moved to the front together). `false` when it does
    /// not authenticate (wrong key, damage, tampering, a renamed chunk);
    /// `buf` is then garbage.
    pub(crate) fn open_chunk(
        &self,
        digest: &Digest,
        header: &[u8],
        buf: &mut Vec<u8>,
        from: usize,
    ) -> bool {
        if buf.len() < from + CHUNK_OVERHEAD {
            return false;
        }
        let Ok(nonce) = <[u8; NONCE_LEN]>::try_from(&buf[from..from + NONCE_LEN]) else {
            return false;
        };
        let Ok(key) = self.chunk_key(digest) else {
            return false;
        };
        let aad = [header, &digest.0].concat();
        let len = match key.open_within(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad),
            &mut buf[..],
            from + NONCE_LEN..,
        ) {
            Ok(plain) => plain.len(),
            Err(_) => return false,
        };
        buf.truncate(len);
        true
    }

    fn file_aad(path: &Path) -> Vec<u8> {
        let name = path
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or_default();
        [&FILE_MAGIC[..], name].concat()
    }

    /// Encrypt a metadata file's contents for `path` (only its file name
    /// counts): `VBDSENC1 ‖ salt ‖ nonce ‖ ciphertext ‖ tag`.
    pub fn seal_file(&self, path: &Path, plain: &[u8]) -> Result<Vec<u8>> {
        let salt: [u8; SALT_LEN] = random()?;
        let nonce: [u8; NONCE_LEN] = random()?;
        let key = aead_key(blake3::keyed_hash(&self.meta, &salt).as_bytes())?;
        let mut out = Vec::with_capacity(plain.len() + FILE_OVERHEAD);
        out.extend_from_slice(&FILE_MAGIC);
        out.extend_from_slice(&salt);
        out.extend_from_slice(&nonce);
        let at = out.len();
        out.extend_from_slice(plain);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::file_aad(path)),
                &mut out[at..],
            )
            .map_err(|_| Error::other(format!("encrypting {} failed", path.display())))?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypt what [`Crypt::seal_file`] made for a file of this name.
    pub fn open_file(&self, path: &Path, sealed: &[u8]) -> Result<Vec<u8>> {
        if !is_sealed_file(sealed) {
            return Err(corrupt(format!(
                "{} is not encrypted, in a datastore whose files all are: refusing it",
                path.display()
            )));
        }
        if sealed.len() < FILE_OVERHEAD {
            return Err(corrupt(format!("{} is damaged: truncated", path.display())));
        }
        let salt = &sealed[8..8 + SALT_LEN];
        let nonce = <[u8; NONCE_LEN]>::try_from(&sealed[8 + SALT_LEN..8 + SALT_LEN + NONCE_LEN])
            .map_err(|_| corrupt(format!("{} is damaged: truncated", path.display())))?;
        let key = aead_key(blake3::keyed_hash(&self.meta, salt).as_bytes())?;
        let mut buf = sealed[8 + SALT_LEN + NONCE_LEN..].to_vec();
        let len = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::file_aad(path)),
                &mut buf,
            )
            .map_err(|_| {
                Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "{} does not authenticate under key {}: damaged, altered or moved",
                        path.display(),
                        self.fingerprint
                    ),
                )
            })?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

/// Whether `bytes` start like an encrypted metadata file.
pub fn is_sealed_file(bytes: &[u8]) -> bool {
    bytes.starts_with(&FILE_MAGIC)
}

/// Encrypt a metadata file's bytes when the datastore is encrypted.
pub(crate) fn seal_opt(crypt: Option<&Crypt>, path: &Path, plain: Vec<u8>) -> Result<Vec<u8>> {
    match crypt {
        Some(c) => c.seal_file(path, &plain),
        None => Ok(plain),
    }
}

/// Decrypt a metadata file's bytes when the datastore is encrypted; an
/// unencrypted datastore refuses encrypted files with a clear error.
pub(crate) fn open_opt(crypt: Option<&Crypt>, path: &Path, bytes: Vec<u8>) -> Result<Vec<u8>> {
    match crypt {
        Some(c) => c.open_file(path, &bytes),
        None if is_sealed_file(&bytes) => Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "{} is encrypted but the datastore was opened without a key",
                path.display()
            ),
        )),
        None => Ok(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_and_bind_their_name_and_key() {
        let c = Crypt::new(&MasterKey::generate());
        let p = Path::new("/x/index.json");
        let sealed = c.seal_file(p, b"{\"a\":1}").unwrap();
        assert_eq!(sealed.len(), 7 + FILE_OVERHEAD);
        assert_eq!(
            c.open_file(Path::new("/y/index.json"), &sealed).unwrap(),
            b"{\"a\":1}"
        );
        // Two seals of one text differ (fresh salt and nonce).
        assert_ne!(c.seal_file(p, b"{\"a\":1}").unwrap(), sealed);
        // Another name, another key, any flipped bit: refused.
        let err = c
            .open_file(Path::new("/x/verify.json"), &sealed)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.to_string().contains("verify.json"), "{err}");
        let other = Crypt::new(&MasterKey::generate());
        assert!(other.open_file(p, &sealed).is_err());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(c.open_file(p, &bad).is_err(), "flip at {i}");
        }
        for len in [0, 8, FILE_OVERHEAD - 1, sealed.len() - 1] {
            assert!(c.open_file(p, &sealed[..len]).is_err(), "length {len}");
        }
        // Plain bytes are refused with a key, sealed ones without.
        assert!(
            c.open_file(p, b"{\"a\":1}")
                .unwrap_err()
                .to_string()
                .contains("not encrypted")
        );
        assert!(
            open_opt(None, p, sealed)
                .unwrap_err()
                .to_string()
                .contains("without a key")
        );
    }

    #[test]
    fn chunk_ids_are_keyed_and_chunks_bound_to_their_name() {
        let (k1, k2) = (MasterKey::generate(), MasterKey::generate());
        let (c1, c2) = (Crypt::new(&k1), Crypt::new(&k2));
        let data = vec![9u8; 5000];
        let (d1, d2) = (c1.chunk_id(&data), c2.chunk_id(&data));
        assert_ne!(d1, d2);
        assert_ne!(d1.0, *blake3::hash(&data).as_bytes());
        assert_eq!(Crypt::new(&k1).chunk_id(&data), d1);
        let sealed = c1.seal_chunk(&d1, b"head", &data).unwrap();
        assert_eq!(sealed.len(), data.len() + CHUNK_OVERHEAD);
        let open = |c: &Crypt, d: &Digest, head: &[u8], bytes: &[u8]| {
            // Behind 3 bytes of something else, as behind a chunk header.
            let mut buf = [&b"hdr"[..], bytes].concat();
            c.open_chunk(d, head, &mut buf, 3).then_some(buf)
        };
        assert_eq!(open(&c1, &d1, b"head", &sealed).unwrap(), data);
        assert!(open(&c1, &d2, b"head", &sealed).is_none());
        assert!(open(&c1, &d1, b"hea_", &sealed).is_none());
        assert!(open(&c2, &d1, b"head", &sealed).is_none());
        let mut bad = sealed.clone();
        bad[100] ^= 4;
        assert!(open(&c1, &d1, b"head", &bad).is_none());
        assert!(open(&c1, &d1, b"head", &sealed[..10]).is_none());
    }
}
