//! The fixed index: one digest per chunk of a volume.
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0 | 8 | magic `VBDSFIX1` |
//! | 8 | 4 | format version (LE u32, 1) |
//! | 12 | 4 | log2 of the chunk size (LE u32, 12..=26) |
//! | 16 | 8 | volume size in bytes (LE u64) |
//! | 24 | 8 | chunk count (LE u64, = ceil(size / chunk size)) |
//! | 32 | 32 | reserved, zero |
//! | 64 | 32 × count | SHA-256 of each chunk's plaintext; all-zero = a chunk of zeroes |
//! | end | 32 | SHA-256 of everything before it (the index checksum) |
//!
//! The last chunk may be shorter than the chunk size (its digest is of its
//! real length). The count is checked against the size and the file length
//! before anything is allocated.

use std::path::Path;

use provider_api::Result;

use crate::chunk::Digest;
use crate::crypt::{Crypt, FILE_OVERHEAD, open_opt};
use crate::storage::Storage;
use crate::util::{corrupt, sha256_hex};

/// Magic number of an index file (never changes).
pub const INDEX_MAGIC: [u8; 8] = *b"VBDSFIX1";
/// Index format version.
pub const INDEX_VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
/// Smallest and largest chunk size exponents.
pub const MIN_CHUNK_LOG2: u32 = 12;
/// See [`MIN_CHUNK_LOG2`].
pub const MAX_CHUNK_LOG2: u32 = 26;
/// Largest volume an index may describe (1 PiB).
pub const MAX_VOLUME_SIZE: u64 = 1 << 50;

/// A volume's chunk digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedIndex {
    /// Volume size.
    pub size: u64,
    /// Chunk size (a power of two).
    pub chunk_size: u64,
    /// One digest per chunk.
    pub digests: Vec<Digest>,
}

/// Number of chunks of a volume.
pub fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    size.div_ceil(chunk_size)
}

impl FixedIndex {
    /// An index of zeroes.
    pub fn zeroed(size: u64, chunk_size: u64) -> Self {
        FixedIndex {
            size,
            chunk_size,
            digests: vec![Digest::ZERO; chunk_count(size, chunk_size) as usize],
        }
    }

    /// Length of chunk `i`.
    pub fn chunk_len(&self, i: usize) -> u64 {
        let start = i as u64 * self.chunk_size;
        self.chunk_size.min(self.size.saturating_sub(start))
    }

    /// The file bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 32 * self.digests.len() + 32);
        out.extend_from_slice(&INDEX_MAGIC);
        out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.trailing_zeros().to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(self.digests.len() as u64).to_le_bytes());
        out.extend_from_slice(&[0; 32]);
        for d in &self.digests {
            out.extend_from_slice(&d.0);
        }
        use sha2::Digest as _;
        let sum: [u8; 32] = sha2::Sha256::digest(&out).into();
        out.extend_from_slice(&sum);
        out
    }

    /// Parse and check file bytes (`path` names the file in errors).
    pub fn decode(buf: &[u8], path: &Path) -> Result<Self> {
        let bad = |why: String| corrupt(format!("index {} is damaged: {why}", path.display()));
        if buf.len() < HEADER_LEN + 32 {
            return Err(bad("shorter than its header".into()));
        }
        if buf[..8] != INDEX_MAGIC {
            return Err(bad("bad magic".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().unwrap_or_default());
        let version = u32_at(8);
        if version != INDEX_VERSION {
            return Err(bad(format!("unknown version {version}")));
        }
        let log2 = u32_at(12);
        if !(MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(&log2) {
            return Err(bad(format!("chunk size 2^{log2} out of range")));
        }
        let chunk_size = 1u64 << log2;
        let size = u64_at(16);
        if size > MAX_VOLUME_SIZE {
            return Err(bad(format!("volume size {size} out of range")));
        }
        let count = u64_at(24);
        if count != chunk_count(size, chunk_size) {
            return Err(bad(format!(
                "chunk count {count} does not match size {size}"
            )));
        }
        let expect = HEADER_LEN as u64 + 32 * count + 32;
        if buf.len() as u64 != expect {
            return Err(bad(format!("{} bytes, expected {expect}", buf.len())));
        }
        let body = &buf[..buf.len() - 32];
        use sha2::Digest as _;
        let sum: [u8; 32] = sha2::Sha256::digest(body).into();
        if sum[..] != buf[buf.len() - 32..] {
            return Err(bad("checksum mismatch".into()));
        }
        let digests = body[HEADER_LEN..]
            .chunks_exact(32)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                Digest(d)
            })
            .collect();
        Ok(FixedIndex {
            size,
            chunk_size,
            digests,
        })
    }

    /// Read and check an index file; when `expect_sha256` is given, the
    /// file's SHA-256 (as recorded in a manifest) must match. An encrypted
    /// datastore's index is decrypted with `crypt`.
    pub fn load(path: &Path, expect_sha256: Option<&str>, crypt: Option<&Crypt>) -> Result<Self> {
        FixedIndex::read(&Storage::Local, path, expect_sha256, crypt)
    }

    /// [`FixedIndex::load`] from a datastore's storage.
    pub(crate) fn read(
        st: &Storage,
        path: &Path,
        expect_sha256: Option<&str>,
        crypt: Option<&Crypt>,
    ) -> Result<Self> {
        let buf = st.read(
            path,
            HEADER_LEN as u64
                + 32 * (MAX_VOLUME_SIZE >> MIN_CHUNK_LOG2)
                + 32
                + FILE_OVERHEAD as u64,
        )?;
        if let Some(expect) = expect_sha256 {
            let got = sha256_hex(&buf);
            if got != expect {
                return Err(corrupt(format!(
                    "index {} is damaged: sha256 {got} differs from the manifest's {expect}",
                    path.display()
                )));
            }
        }
        FixedIndex::decode(&open_opt(crypt, path, buf)?, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let mut idx = FixedIndex::zeroed(10_000, 4096);
        assert_eq!(idx.digests.len(), 3);
        assert_eq!(idx.chunk_len(2), 10_000 - 8192);
        idx.digests[1] = Digest::of(b"x");
        let enc = idx.encode();
        let p = Path::new("t.fidx");
        assert_eq!(FixedIndex::decode(&enc, p).unwrap(), idx);
        for pos in 0..enc.len() {
            let mut bad = enc.clone();
            bad[pos] ^= 1;
            assert!(FixedIndex::decode(&bad, p).is_err(), "flip at {pos}");
        }
        for len in [0, 10, 64, enc.len() - 1] {
            assert!(FixedIndex::decode(&enc[..len], p).is_err());
        }
        // A huge count in the header is refused without allocating.
        let mut bad = enc.clone();
        bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(
            FixedIndex::decode(&bad, p)
                .unwrap_err()
                .to_string()
                .contains("t.fidx")
        );
    }
}
