//! Base images: shared, read-only layers under linked disks.
//!
//! A base image is writable only while it is being created (restore writes
//! its data); [`BaseImage::seal`] makes it immutable, which is what lets
//! linked disks and snapshots read it without copying.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::bitmap::{BlockBitmap, Run, runs};
use super::layer::{Layer, block_len};
use super::{BLOCK_SIZE, read_lock, write_lock};
use crate::error::{Error, Result};
use crate::persist;

/// Persisted form (`images/<id>/meta.json`).
#[derive(Debug, Serialize, Deserialize)]
struct ImageMeta {
    id: String,
    size: u64,
    sealed: bool,
    allocated: BlockBitmap,
}

#[derive(Debug)]
struct ImageState {
    layer: Layer,
    sealed: bool,
}

/// A base image on disk: `images/<id>/data.raw` and `images/<id>/meta.json`.
#[derive(Debug)]
pub struct BaseImage {
    id: String,
    dir: PathBuf,
    size: u64,
    state: RwLock<ImageState>,
}

impl BaseImage {
    /// Creates an empty, unsealed image in `dir`.
    pub fn create(dir: &Path, id: &str, size: u64) -> Result<Self> {
        super::check_size(size)?;
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let layer = Layer::create(&dir.join("data.raw"), size)?;
        let image = BaseImage {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            size,
            state: RwLock::new(ImageState {
                layer,
                sealed: false,
            }),
        };
        image.save(&read_lock(&image.state))?;
        Ok(image)
    }

    /// Opens an image persisted in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let meta_path = dir.join("meta.json");
        let meta: ImageMeta = persist::load_json(&meta_path)?
            .ok_or_else(|| Error::not_found("image metadata", meta_path.display().to_string()))?;
        let layer = Layer::open(&dir.join("data.raw"), meta.size, meta.allocated)?;
        Ok(BaseImage {
            id: meta.id,
            dir: dir.to_path_buf(),
            size: meta.size,
            state: RwLock::new(ImageState {
                layer,
                sealed: meta.sealed,
            }),
        })
    }

    fn save(&self, st: &ImageState) -> Result<()> {
        persist::save_json(
            &self.dir.join("meta.json"),
            &ImageMeta {
                id: self.id.clone(),
                size: self.size,
                sealed: st.sealed,
                allocated: st.layer.allocated().clone(),
            },
        )
    }

    /// Identifier.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the image is immutable.
    pub fn is_sealed(&self) -> bool {
        read_lock(&self.state).sealed
    }

    /// Makes the image immutable.
    pub fn seal(&self) -> Result<()> {
        let mut st = write_lock(&self.state);
        st.sealed = true;
        self.save(&st)
    }

    /// Whether block `b` holds data.
    pub fn is_allocated(&self, b: u64) -> bool {
        read_lock(&self.state).layer.is_allocated(b)
    }

    /// Allocation map of the whole image.
    pub fn allocated_map(&self) -> BlockBitmap {
        read_lock(&self.state).layer.allocated().clone()
    }

    /// Allocation runs over a byte range.
    pub fn allocation(&self, offset: u64, length: u64) -> Vec<Run> {
        let st = read_lock(&self.state);
        runs(self.size, offset, length, |b| st.layer.is_allocated(b))
    }

    /// Reads block `b` into `buf`, which may be longer than the image's
    /// block (a linked disk larger than its base): the excess is zeroed.
    pub fn read_block_padded(&self, b: u64, buf: &mut [u8]) -> Result<()> {
        let st = read_lock(&self.state);
        let n = block_len(self.size, b).min(buf.len());
        if n > 0 && st.layer.is_allocated(b) {
            st.layer.read_block(b, &mut buf[..n])?;
        } else {
            buf[..n].fill(0);
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// Reads `length` bytes at `offset`.
    pub fn read(&self, offset: u64, length: u64) -> Result<Vec<u8>> {
        check_range(self.size, offset, length)?;
        let mut out = vec![0u8; length as usize];
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        let mut pos = offset;
        while pos < offset + length {
            let b = pos / BLOCK_SIZE;
            let n = block_len(self.size, b);
            self.read_block_padded(b, &mut block[..n])?;
            let in_block = (pos - b * BLOCK_SIZE) as usize;
            let take = (n - in_block).min((offset + length - pos) as usize);
            let at = (pos - offset) as usize;
            out[at..at + take].copy_from_slice(&block[in_block..in_block + take]);
            pos += take as u64;
        }
        Ok(out)
    }

    /// Writes `data` at `offset`; refused once sealed.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(self.size, offset, data.len() as u64)?;
        let mut st = write_lock(&self.state);
        if st.sealed {
            return Err(Error::Conflict(format!(
                "base image {} is read-only",
                self.id
            )));
        }
        let end = offset + data.len() as u64;
        let mut pos = offset;
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        while pos < end {
            let b = pos / BLOCK_SIZE;
            let n = block_len(self.size, b);
            let in_block = (pos - b * BLOCK_SIZE) as usize;
            let take = (n - in_block).min((end - pos) as usize);
            if take < n {
                if st.layer.is_allocated(b) {
                    st.layer.read_block(b, &mut block[..n])?;
                } else {
                    block[..n].fill(0);
                }
            }
            let at = (pos - offset) as usize;
            block[in_block..in_block + take].copy_from_slice(&data[at..at + take]);
            st.layer.write_block(b, &block[..n])?;
            pos += take as u64;
        }
        self.save(&st)
    }

    /// SHA-256 of the full image content.
    pub fn sha256(&self) -> Result<String> {
        let mut h = Sha256::new();
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        for b in 0..super::bitmap::blocks_for(self.size) {
            let n = block_len(self.size, b);
            self.read_block_padded(b, &mut block[..n])?;
            h.update(&block[..n]);
        }
        Ok(super::hex(&h.finalize()))
    }
}

/// Checks that `[offset, offset+length)` lies within a disk of `size` bytes.
pub fn check_range(size: u64, offset: u64, length: u64) -> Result<()> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::Invalid(format!(
            "range {offset}+{length} is beyond the end of the disk ({size} bytes)"
        ))),
    }
}
