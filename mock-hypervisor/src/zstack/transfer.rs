//! Image data in and out of the ZStack backup storage: the export download
//! URL (plain HTTP with `Range`), AddImage fetches from `http(s)://` URLs
//! (as a backup storage host does: from the network, so the URL must name
//! an address that host reaches; `nbd://` is refused), and template
//! creation from a volume or snapshot.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use md5::{Digest, Md5};

use super::{ZStackPlatform, ZsFaultKind};
use crate::disk::bitmap::blocks_for;
use crate::disk::{BLOCK_SIZE, BaseImage, View, VirtualDisk};
use crate::error::Result;
use crate::hypervisor::Hypervisor;

const CHUNK: u64 = 1 << 20;

/// A URL without its query string or user info (for error texts).
pub fn redact(url: &str) -> String {
    let no_query = url.split(['?', '#']).next().unwrap_or("");
    match no_query.split_once("://") {
        Some((scheme, rest)) => {
            let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
            format!("{scheme}://{rest}")
        }
        None => no_query.to_string(),
    }
}

fn parse_range(h: &HeaderMap, size: u64) -> std::result::Result<Option<(u64, u64)>, ()> {
    let Some(v) = h.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let spec = v.trim().strip_prefix("bytes=").ok_or(())?;
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        (size.saturating_sub(n), size)
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            size
        } else {
            b.parse::<u64>()
                .map_err(|_| ())?
                .saturating_add(1)
                .min(size)
        };
        (start, end)
    };
    if start >= end || start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// `GET /zstack/imagestore/export/{imageUuid}/{file}`: the exported image
/// (raw), with `Range: bytes=a-b` support (206). No session needed: the URL
/// is the capability, as on the ImageStore backup storage.
pub async fn download_export(
    State(zs): State<Arc<ZStackPlatform>>,
    Path((image_uuid, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/zstack/imagestore/export/{image_uuid}/{file}");
    let data_id = zs.inv.read(|d| {
        let e = d.exports.get(&image_uuid).filter(|e| e.path == path)?;
        let _ = &e.format;
        d.images.get(&image_uuid).map(|i| i.data_id.clone())
    });
    // The image store's web server, not the API: a plain 404 / 500.
    let Some(data_id) = data_id else {
        return (StatusCode::NOT_FOUND, format!("{path} not found")).into_response();
    };
    let image = match zs.hv.store.image(&data_id) {
        Ok(i) => i,
        Err(e) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, format!("{path}: {e}")).into_response();
        }
    };
    let size = image.size();
    let (status, start, end) = match parse_range(&headers, size) {
        Ok(None) => (StatusCode::OK, 0, size),
        Ok(Some((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Err(()) => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response();
        }
    };
    let break_after = zs
        .take_fault(ZsFaultKind::ExportBreak, "")
        .map(|f| f.after_bytes);
    let corrupt = zs
        .peek_fault(ZsFaultKind::ExportCorrupt)
        .map(|f| f.after_bytes);
    let stream = futures::stream::unfold((start, 0u64), move |(pos, served)| {
        let image = image.clone();
        async move {
            if pos >= end {
                return None;
            }
            if let Some(limit) = break_after
                && served >= limit
            {
                return Some((
                    Err(std::io::Error::other("injected export break")),
                    (end, served),
                ));
            }
            let mut n = CHUNK.min(end - pos);
            if let Some(limit) = break_after {
                n = n.min(limit - served);
            }
            let r = tokio::task::spawn_blocking(move || image.read(pos, n)).await;
            match r {
                Ok(Ok(mut data)) => {
                    if let Some(at) = corrupt
                        && (pos..pos + n).contains(&at)
                    {
                        data[(at - pos) as usize] ^= 0xff;
                    }
                    Some((Ok(bytes::Bytes::from(data)), (pos + n, served + n)))
                }
                Ok(Err(e)) => Some((Err(std::io::Error::other(e.to_string())), (end, served))),
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), (end, served))),
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, "bytes".parse().expect("static"));
    h.insert(header::CONTENT_LENGTH, (end - start).into());
    h.insert(
        header::CONTENT_TYPE,
        "application/octet-stream".parse().expect("static"),
    );
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = format!("bytes {start}-{}/{size}", end - 1).parse()
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    resp
}

/// Writes `data` at `offset` of `image`, skipping all-zero 64 KiB blocks
/// (the image stays sparse). `offset` is block aligned.
fn write_sparse(image: &BaseImage, offset: u64, data: &[u8]) -> Result<()> {
    for (i, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
        if block.iter().any(|b| *b != 0) {
            image.write(offset + i as u64 * BLOCK_SIZE, block)?;
        }
    }
    Ok(())
}

/// An error with its causes (`a: b: c`).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(&format!(": {c}"));
        cur = c.source();
    }
    out
}

/// Fetches `url` into a new sealed disk-store image; returns it and the md5
/// of its content. On failure nothing is left behind.
pub async fn fetch_into_image(
    zs: &ZStackPlatform,
    url: &str,
) -> std::result::Result<(Arc<BaseImage>, String), String> {
    let store = &zs.hv.store;
    let mut created: Option<Arc<BaseImage>> = None;
    let r = async {
        let mut md5 = Md5::new();
        {
            let resp = reqwest::get(url)
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| format!("HTTP GET: {}", chain(&e.without_url())))?;
            let size = resp
                .content_length()
                .ok_or("the server sent no Content-Length")?;
            let image = store.create_image(size).map_err(|e| e.to_string())?;
            created = Some(image.clone());
            let mut pos = 0u64;
            let mut buf: Vec<u8> = Vec::with_capacity(CHUNK as usize);
            let mut resp = resp;
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| format!("HTTP body at {pos}: {}", chain(&e.without_url())))?
            {
                md5.update(&chunk);
                buf.extend_from_slice(&chunk);
                if buf.len() as u64 >= CHUNK {
                    let whole = buf.len() - buf.len() % BLOCK_SIZE as usize;
                    write_sparse(&image, pos, &buf[..whole]).map_err(|e| e.to_string())?;
                    pos += whole as u64;
                    buf.drain(..whole);
                }
            }
            if pos + buf.len() as u64 != size {
                return Err(format!(
                    "HTTP body has {} bytes, Content-Length {size}",
                    pos + buf.len() as u64
                ));
            }
            write_sparse(&image, pos, &buf).map_err(|e| e.to_string())?;
            image.seal().map_err(|e| e.to_string())?;
            Ok((image, crate::disk::hex(&md5.finalize())))
        }
    }
    .await;
    if r.is_err()
        && let Some(img) = created
    {
        let _ = store.delete_image(img.id());
    }
    r
}

/// Copies a view of a disk (base image read through) into a new sealed
/// disk-store image; returns it and the md5 of its content.
pub fn copy_disk_to_image(
    hv: &Hypervisor,
    disk: &VirtualDisk,
    view: &View,
) -> Result<(Arc<BaseImage>, String)> {
    let size = disk.size();
    let image = hv.store.create_image(size)?;
    let r = (|| {
        let allocated = disk.allocated_map(view, true)?;
        let mut md5 = Md5::new();
        let zero = vec![0u8; BLOCK_SIZE as usize];
        for b in 0..blocks_for(size) {
            let off = b * BLOCK_SIZE;
            let n = BLOCK_SIZE.min(size - off);
            if allocated.get(b) {
                let data = disk.read(view, off, n)?;
                md5.update(&data);
                if data.iter().any(|x| *x != 0) {
                    image.write(off, &data)?;
                }
            } else {
                md5.update(&zero[..n as usize]);
            }
        }
        image.seal()?;
        Ok(crate::disk::hex(&md5.finalize()))
    })();
    match r {
        Ok(md5) => Ok((image, md5)),
        Err(e) => {
            let _ = hv.store.delete_image(image.id());
            Err(e)
        }
    }
}

/// md5 of a disk-store image's content.
pub fn image_md5(image: &BaseImage) -> Result<String> {
    let size = image.size();
    let mut md5 = Md5::new();
    let mut pos = 0;
    while pos < size {
        let n = CHUNK.min(size - pos);
        md5.update(image.read(pos, n)?);
        pos += n;
    }
    Ok(crate::disk::hex(&md5.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str, size: u64) -> std::result::Result<Option<(u64, u64)>, ()> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, v.parse().unwrap());
        parse_range(&h, size)
    }

    #[test]
    fn export_ranges_are_parsed_like_http_servers_do() {
        assert_eq!(parse_range(&HeaderMap::new(), 100), Ok(None));
        assert_eq!(range("bytes=0-9", 100), Ok(Some((0, 10))));
        assert_eq!(range("bytes=90-", 100), Ok(Some((90, 100))));
        // An end past the size is clipped; a suffix is the last n bytes.
        assert_eq!(range("bytes=50-1000", 100), Ok(Some((50, 100))));
        assert_eq!(range("bytes=-10", 100), Ok(Some((90, 100))));
        // Unsatisfiable or malformed: 416.
        assert_eq!(range("bytes=100-", 100), Err(()));
        assert_eq!(range("bytes=9-3", 100), Err(()));
        assert_eq!(range("items=0-1", 100), Err(()));
        assert_eq!(range("bytes=a-b", 100), Err(()));
    }
}
