//! Per-block bitmaps and their conversion to byte ranges.

use serde::{Deserialize, Serialize};

use super::BLOCK_SIZE;

/// One bit per [`BLOCK_SIZE`] block of a disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockBitmap {
    blocks: u64,
    words: Vec<u64>,
}

/// A byte range of a disk whose blocks all share one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Whether the blocks of the range are set (allocated, dirty, ...).
    pub set: bool,
}

/// Number of blocks covering `size` bytes.
pub fn blocks_for(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE)
}

impl BlockBitmap {
    /// An all-clear bitmap covering `size` bytes.
    pub fn for_size(size: u64) -> Self {
        let blocks = blocks_for(size);
        BlockBitmap {
            blocks,
            words: vec![0; blocks.div_ceil(64) as usize],
        }
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether block `b` is set (out of range reads as clear).
    pub fn get(&self, b: u64) -> bool {
        self.words
            .get((b / 64) as usize)
            .is_some_and(|w| w & (1 << (b % 64)) != 0)
    }

    /// Sets or clears block `b` (out of range is ignored).
    pub fn put(&mut self, b: u64, value: bool) {
        if let Some(w) = self.words.get_mut((b / 64) as usize) {
            if value {
                *w |= 1 << (b % 64);
            } else {
                *w &= !(1 << (b % 64));
            }
        }
    }

    /// Number of set blocks.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether the bitmap has the right length for a disk of `size` bytes.
    pub fn fits(&self, size: u64) -> bool {
        self.blocks == blocks_for(size) && self.words.len() as u64 == self.blocks.div_ceil(64)
    }

    /// Grows the bitmap to cover `size` bytes; the new blocks are clear.
    /// A smaller `size` leaves the bitmap as it is (bitmaps never shrink).
    pub fn grow(&mut self, size: u64) {
        let blocks = blocks_for(size);
        if blocks <= self.blocks {
            return;
        }
        // Bits past the old end (in its last word) may have been set by an
        // out-of-range `put`: clear them before they become blocks.
        for b in self.blocks..(self.words.len() as u64 * 64) {
            self.put(b, false);
        }
        self.words.resize(blocks.div_ceil(64) as usize, 0);
        self.blocks = blocks;
    }

    /// Builds a bitmap of `size` bytes from a block predicate.
    pub fn from_fn(size: u64, mut f: impl FnMut(u64) -> bool) -> Self {
        let mut map = BlockBitmap::for_size(size);
        for b in 0..map.blocks {
            if f(b) {
                map.put(b, true);
            }
        }
        map
    }
}

/// Splits `[offset, offset+length)` of a disk of `size` bytes into runs of
/// equal block state, clipped to the range and to the disk.
pub fn runs(size: u64, offset: u64, length: u64, mut state: impl FnMut(u64) -> bool) -> Vec<Run> {
    let end = offset.saturating_add(length).min(size);
    let mut out: Vec<Run> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let b = pos / BLOCK_SIZE;
        let block_end = ((b + 1) * BLOCK_SIZE).min(end);
        let set = state(b);
        match out.last_mut() {
            Some(last) if last.set == set => last.length += block_end - pos,
            _ => out.push(Run {
                offset: pos,
                length: block_end - pos,
                set,
            }),
        }
        pos = block_end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_set_get_count() {
        let mut m = BlockBitmap::for_size(BLOCK_SIZE * 130 + 1);
        assert_eq!(m.blocks(), 131);
        m.put(0, true);
        m.put(130, true);
        m.put(500, true);
        assert!(m.get(0) && m.get(130) && !m.get(1) && !m.get(500));
        assert_eq!(m.count(), 2);
        m.put(0, false);
        assert_eq!(m.count(), 1);
    }

    #[test]
    fn grow_keeps_bits_and_clears_the_tail() {
        let mut m = BlockBitmap::for_size(BLOCK_SIZE * 3);
        m.put(2, true);
        m.put(5, true); // beyond the end, inside the last word
        m.grow(BLOCK_SIZE * 200 + 1);
        assert!(m.fits(BLOCK_SIZE * 200 + 1));
        assert_eq!(m.blocks(), 201);
        assert!(m.get(2) && !m.get(5) && !m.get(200));
        assert_eq!(m.count(), 1);
        m.grow(BLOCK_SIZE);
        assert_eq!(m.blocks(), 201, "bitmaps never shrink");
    }

    #[test]
    fn runs_merge_and_clip() {
        let size = BLOCK_SIZE * 4;
        let r = runs(size, 10, size, |b| b == 1 || b == 2);
        assert_eq!(
            r,
            vec![
                Run {
                    offset: 10,
                    length: BLOCK_SIZE - 10,
                    set: false
                },
                Run {
                    offset: BLOCK_SIZE,
                    length: 2 * BLOCK_SIZE,
                    set: true
                },
                Run {
                    offset: 3 * BLOCK_SIZE,
                    length: BLOCK_SIZE,
                    set: false
                },
            ]
        );
        assert!(runs(size, size, 10, |_| true).is_empty());
    }
}
