//! Copying between the disk model and plain raw files: what a hot-added disk
//! looks like to the backup proxy (a sparse raw file under the state dir),
//! and how writes into such a file come back into the disk on hot-remove.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::bitmap::blocks_for;
use super::layer::block_len;
use super::{BLOCK_SIZE, BaseImage, View, VirtualDisk};
use crate::error::{Error, Result};

/// Source of a materialised file.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// A view of a disk (with the base image's content read through).
    Disk(&'a VirtualDisk, &'a View),
    /// A base image.
    Image(&'a BaseImage),
}

impl Source<'_> {
    /// Size of the source (a snapshot keeps the size it was taken at).
    fn size(&self) -> Result<u64> {
        match self {
            Source::Disk(d, v) => d.view_size(v),
            Source::Image(i) => Ok(i.size()),
        }
    }

    fn allocated(&self) -> Result<super::BlockBitmap> {
        match self {
            Source::Disk(d, v) => d.allocated_map(v, true),
            Source::Image(i) => Ok(i.allocated_map()),
        }
    }

    fn read(&self, offset: u64, length: u64) -> Result<Vec<u8>> {
        match self {
            Source::Disk(d, v) => d.read(v, offset, length),
            Source::Image(i) => i.read(offset, length),
        }
    }
}

/// Writes `source` into a new sparse raw file at `path` (holes stay holes).
pub fn materialize(source: Source<'_>, path: &Path) -> Result<()> {
    let size = source.size()?;
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(Error::io(path))?;
    file.set_len(size).map_err(Error::io(path))?;
    let allocated = source.allocated()?;
    for b in 0..blocks_for(size) {
        if allocated.get(b) {
            let data = source.read(b * BLOCK_SIZE, block_len(size, b) as u64)?;
            file.write_all_at(&data, b * BLOCK_SIZE)
                .map_err(Error::io(path))?;
        }
    }
    Ok(())
}

/// Target of an import.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// The live content of a disk (only differing blocks are written, so a
    /// linked disk stays thin).
    Disk(&'a VirtualDisk),
    /// An unsealed base image (non-zero blocks are written).
    Image(&'a BaseImage),
}

/// Copies the raw file at `path` into `target`; returns bytes written.
pub fn import(path: &Path, target: Target<'_>) -> Result<u64> {
    let mut file = File::open(path).map_err(Error::io(path))?;
    let size = match target {
        Target::Disk(d) => d.size(),
        Target::Image(i) => i.size(),
    };
    let mut written = 0;
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for b in 0..blocks_for(size) {
        let n = block_len(size, b);
        let got = read_full(&mut file, &mut buf[..n]).map_err(Error::io(path))?;
        buf[got..n].fill(0);
        let offset = b * BLOCK_SIZE;
        match target {
            Target::Disk(d) => {
                if d.read(&View::Live, offset, n as u64)? != buf[..n] {
                    d.write(offset, &buf[..n])?;
                    written += n as u64;
                }
            }
            Target::Image(i) => {
                if buf[..n].iter().any(|x| *x != 0) || i.is_allocated(b) {
                    i.write(offset, &buf[..n])?;
                    written += n as u64;
                }
            }
        }
    }
    Ok(written)
}

fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}
