//! The incremental data path: each disk's image transfer served as an
//! NBD export on a loopback server, read from the image server on demand.
//!
//! The API model offers no NBD access to an image transfer, only its image
//! server URL (imageio: ranged `GET`, `GET …/extents?context=zero|dirty`).
//! Rather than staging the disk, the provider runs one
//! [`provider_kit::http_export::LoopbackNbd`] (an NBD server on
//! `127.0.0.1`, any free port) per backup and
//! adds one [`ImageioExport`] per disk:
//!
//! - `read(offset, len)` is one ranged `GET` on the transfer URL
//!   ([`Client::image_range`], retried like every image server read);
//! - `base:allocation` answers from `extents?context=zero` (zero and hole
//!   flags), `qemu:dirty-bitmap:<checkpoint>` from `extents?context=dirty`;
//!   both lists are fetched once per disk, checked to cover the disk
//!   without gaps or overlaps, and kept (they are small: one entry per
//!   run, not per block).
//!
//! The host's data mover then reads these exports exactly as it reads
//! qemu-nbd: only the dirty extents on an incremental, holes and zero
//! extents skipped on a full read. Memory is bounded by the NBD server's
//! in-flight budgets (32 MiB of payloads per connection, 128 MiB in
//! total) whatever the disk size; nothing is written to disk.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use nbd::proto::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use nbd::server::Export;
use provider_api::{Error, ErrorKind, Result};

use crate::client::Client;

/// The meta context of allocation information.
pub const ALLOCATION: &str = "base:allocation";

/// One disk of an image transfer as an NBD export (read-only).
pub struct ImageioExport {
    client: Arc<Client>,
    url: String,
    device: String,
    size: u64,
    allocation: Option<Vec<nbd::Extent>>,
    dirty: Option<(String, Vec<nbd::Extent>)>,
}

impl std::fmt::Debug for ImageioExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageioExport")
            .field("device", &self.device)
            .field("size", &self.size)
            .field("allocation", &self.allocation.as_ref().map(Vec::len))
            .field("dirty", &self.dirty.as_ref().map(|(c, l)| (c, l.len())))
            .finish_non_exhaustive()
    }
}

impl ImageioExport {
    /// Disk `device` of `size` bytes at the image server `url` (the
    /// transfer URL; the ticket in it is the credential); `allocation`
    /// and `dirty` as [`extents`] returns them for this disk, `dirty`
    /// under the meta context name it carries.
    pub fn new(
        client: Arc<Client>,
        url: &str,
        device: &str,
        size: u64,
        allocation: Option<Vec<nbd::Extent>>,
        dirty: Option<(String, Vec<nbd::Extent>)>,
    ) -> Self {
        ImageioExport {
            client,
            url: url.to_string(),
            device: device.to_string(),
            size,
            allocation,
            dirty,
        }
    }
}

/// The part of `list` (covering the whole disk) in `[offset, offset+len)`.
fn window(list: &[nbd::Extent], offset: u64, len: u64) -> Vec<nbd::Extent> {
    let end = offset.saturating_add(len);
    let first = list.partition_point(|e| e.end() <= offset);
    let mut out = Vec::new();
    for e in &list[first..] {
        if e.offset >= end {
            break;
        }
        let start = e.offset.max(offset);
        let stop = e.end().min(end);
        out.push(nbd::Extent {
            offset: start,
            length: stop - start,
            flags: e.flags,
        });
    }
    out
}

#[async_trait]
impl Export for ImageioExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn multi_conn(&self) -> bool {
        // A backup's transfer is a point-in-time image: every connection
        // sees the same bytes.
        true
    }

    async fn read(&self, offset: u64, len: u32) -> nbd::Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.client
            .image_range(&self.url, offset, len as u64)
            .await
            .map_err(|e| {
                let msg = format!(
                    "disk {}: reading {len} bytes at offset {offset} from the image server failed: {}",
                    self.device,
                    e.report()
                );
                tracing::warn!(device = %self.device, offset, "{msg}");
                nbd::Error::server(nbd::error::errno::EIO, msg)
            })
    }

    fn meta_contexts(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.allocation.is_some() {
            v.push(ALLOCATION.to_owned());
        }
        if let Some((context, _)) = &self.dirty {
            v.push(context.clone());
        }
        v
    }

    async fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u32,
    ) -> nbd::Result<Vec<nbd::Extent>> {
        let list = match (&self.allocation, &self.dirty) {
            (Some(a), _) if context == ALLOCATION => a,
            (_, Some((c, d))) if c == context => d,
            _ => return Err(nbd::Error::unsupported(format!("meta context {context:?}"))),
        };
        Ok(window(list, offset, len as u64))
    }
}

/// The extents of an imageio answer (`(start, length, flags)`, an answer
/// to `call`) as NBD extents covering exactly `[0, size)`: clipped to
/// `size`, neighbours with the same flags merged. The answer must cover
/// the disk in order without gaps or overlaps: a region it left out must
/// never be taken for "unchanged" or "zero".
pub fn extents(call: &str, list: &[(u64, u64, u32)], size: u64) -> Result<Vec<nbd::Extent>> {
    let bad = |msg: String| {
        Error::new(ErrorKind::Platform, format!("unexpected answer: {msg}")).api_call(call)
    };
    let mut pos = 0u64;
    let mut out: Vec<nbd::Extent> = Vec::new();
    for &(start, length, flags) in list {
        if pos >= size {
            break;
        }
        if start != pos {
            return Err(bad(format!(
                "the extents jump from offset {pos} to {start}: every byte must be covered"
            )));
        }
        let length = length.min(size - start);
        if length == 0 {
            return Err(bad(format!("an empty extent at offset {start}")));
        }
        pos = start + length;
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += length,
            _ => out.push(nbd::Extent {
                offset: start,
                length,
                flags,
            }),
        }
    }
    if pos < size {
        return Err(bad(format!(
            "the extents end at offset {pos}, the disk at {size}"
        )));
    }
    Ok(out)
}

/// `base:allocation` flags of an imageio zero extent.
pub fn allocation_flags(zero: bool, hole: bool) -> u32 {
    (if zero { STATE_ZERO } else { 0 }) | (if hole { STATE_HOLE } else { 0 })
}

/// `qemu:dirty-bitmap` flags of an imageio dirty extent.
pub fn dirty_flags(dirty: bool) -> u32 {
    if dirty { STATE_DIRTY } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64, flags: u32) -> nbd::Extent {
        nbd::Extent {
            offset,
            length,
            flags,
        }
    }

    #[test]
    fn extents_must_cover_the_disk() {
        let c = |list: &[(u64, u64, u32)], size| extents("GET x", list, size);
        assert_eq!(
            c(&[(0, 4, 1), (4, 4, 1), (8, 8, 0), (16, 8, 1)], 20).unwrap(),
            vec![ext(0, 8, 1), ext(8, 8, 0), ext(16, 4, 1)]
        );
        assert_eq!(c(&[(0, 20, 0)], 20).unwrap(), vec![ext(0, 20, 0)]);
        // A gap, an overlap, a short answer, no answer: errors, never
        // "nothing changed".
        for bad in [
            &[(0, 4, 1), (8, 12, 0)][..],
            &[(0, 8, 0), (4, 16, 1)][..],
            &[(0, 8, 0)][..],
            &[][..],
            &[(0, 0, 1), (0, 20, 1)][..],
        ] {
            let e = c(bad, 20).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Platform);
            assert!(e.to_string().contains("GET x"), "{e}");
        }
    }

    #[test]
    fn windows_clip_to_the_request() {
        let list = vec![ext(0, 8, 1), ext(8, 8, 0), ext(16, 4, 1)];
        assert_eq!(window(&list, 0, 20), list);
        assert_eq!(window(&list, 6, 4), vec![ext(6, 2, 1), ext(8, 2, 0)]);
        assert_eq!(window(&list, 16, 4), vec![ext(16, 4, 1)]);
        assert_eq!(window(&list, 9, 1), vec![ext(9, 1, 0)]);
    }
}
