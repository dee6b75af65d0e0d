//! A layer: one sparse raw file of the virtual size plus a block allocation
//! bitmap. Base images, overlays and snapshot copy-on-write stores are layers.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::BLOCK_SIZE;
use super::bitmap::BlockBitmap;
use crate::error::{Error, Result};

/// Raw file plus allocation map. Not synchronised: its owner locks.
#[derive(Debug)]
pub struct Layer {
    path: PathBuf,
    file: File,
    size: u64,
    allocated: BlockBitmap,
}

impl Layer {
    /// Creates (or truncates) a sparse file of `size` bytes.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(Error::io(path))?;
        file.set_len(size).map_err(Error::io(path))?;
        Ok(Layer {
            path: path.to_path_buf(),
            file,
            size,
            allocated: BlockBitmap::for_size(size),
        })
    }

    /// Opens an existing file with its persisted allocation map.
    pub fn open(path: &Path, size: u64, allocated: BlockBitmap) -> Result<Self> {
        if !allocated.fits(size) {
            return Err(Error::Invalid(format!(
                "allocation map of {} does not match its size",
                path.display()
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(Error::io(path))?;
        let len = file.metadata().map_err(Error::io(path))?.len();
        if len < size {
            file.set_len(size).map_err(Error::io(path))?;
        }
        Ok(Layer {
            path: path.to_path_buf(),
            file,
            size,
            allocated,
        })
    }

    /// Grows the layer to `size` bytes: the file is extended (the new part
    /// is a hole) and the allocation map gains clear blocks. The old last
    /// block, if it was short, becomes a full block whose new bytes read
    /// as zeroes. Refused for a smaller size.
    pub fn grow(&mut self, size: u64) -> Result<()> {
        if size < self.size {
            return Err(Error::Invalid(format!(
                "{} cannot shrink from {} to {size} bytes",
                self.path.display(),
                self.size
            )));
        }
        let len = self.file.metadata().map_err(Error::io(&self.path))?.len();
        if len < size {
            self.file.set_len(size).map_err(Error::io(&self.path))?;
        }
        self.size = size;
        self.allocated.grow(size);
        Ok(())
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Path of the data file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Allocation map.
    pub fn allocated(&self) -> &BlockBitmap {
        &self.allocated
    }

    /// Whether block `b` holds data in this layer.
    pub fn is_allocated(&self, b: u64) -> bool {
        self.allocated.get(b)
    }

    /// Length of block `b` (the last block may be short).
    pub fn block_len(&self, b: u64) -> usize {
        block_len(self.size, b)
    }

    /// Reads block `b` into `buf` (of `block_len(b)` bytes).
    pub fn read_block(&self, b: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, b * BLOCK_SIZE)
            .map_err(Error::io(&self.path))
    }

    /// Writes block `b` from `buf` and marks it allocated.
    pub fn write_block(&mut self, b: u64, buf: &[u8]) -> Result<()> {
        self.file
            .write_all_at(buf, b * BLOCK_SIZE)
            .map_err(Error::io(&self.path))?;
        self.allocated.put(b, true);
        Ok(())
    }

    /// Drops block `b` (reads through to the layer below afterwards).
    pub fn discard_block(&mut self, b: u64) -> Result<()> {
        if self.allocated.get(b) {
            let zero = vec![0u8; self.block_len(b)];
            self.file
                .write_all_at(&zero, b * BLOCK_SIZE)
                .map_err(Error::io(&self.path))?;
            self.allocated.put(b, false);
        }
        Ok(())
    }
}

/// Length of block `b` of a disk of `size` bytes.
pub fn block_len(size: u64, b: u64) -> usize {
    let start = b * BLOCK_SIZE;
    (size.saturating_sub(start)).min(BLOCK_SIZE) as usize
}
