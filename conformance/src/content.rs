//! Data the kit writes into guests, byte comparison with a precise
//! description of the first difference, and byte-range arithmetic.

use sha2::{Digest, Sha256};

/// 1 MiB: the kit writes whole volumes in pieces of this size.
pub(crate) const MIB: u64 = 1 << 20;

/// The engine's piece size and the datastore's default chunk: guest writes
/// straddle multiples of it.
pub(crate) const CHUNK: u64 = 4 << 20;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `len` bytes of the pattern `seed` as they lie at `offset` of a volume:
/// each byte depends on the seed and its absolute offset, so that data
/// written at the wrong place, or a volume's data in another volume,
/// never compares equal.
pub(crate) fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let end = offset + len as u64;
    let mut pos = offset;
    let key = splitmix64(seed);
    while pos < end {
        let word = splitmix64(key ^ (pos / 8)).to_le_bytes();
        let from = (pos % 8) as usize;
        let n = ((8 - from) as u64).min(end - pos) as usize;
        out.extend_from_slice(&word[from..from + n]);
        pos += n as u64;
    }
    out
}

/// A content difference: where it starts and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Difference {
    /// The first differing byte (or the shorter length when one side is a
    /// prefix of the other).
    pub offset: u64,
    /// A description: the bytes, how many differ, where, sizes, digests.
    pub text: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn short_digest(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    hex(&d[..8])
}

/// `None` when `found` equals `expected`; otherwise the first differing
/// offset and a description naming both sides.
pub(crate) fn compare(expected: &[u8], found: &[u8]) -> Option<Difference> {
    if expected == found {
        return None;
    }
    let common = expected.len().min(found.len());
    let first = first_difference(&expected[..common], &found[..common]);
    let Some(first) = first else {
        // One is a prefix of the other.
        return Some(Difference {
            offset: common as u64,
            text: format!(
                "size differs: expected {} bytes, found {} (the first {common} bytes are equal)",
                expected.len(),
                found.len()
            ),
        });
    };
    let mut count = 0u64;
    let mut last = first;
    let mut found_zero = true;
    for i in first..common {
        if expected[i] != found[i] {
            count += 1;
            last = i;
            found_zero &= found[i] == 0;
        }
    }
    let window = |d: &[u8]| hex(&d[first..(first + 16).min(common)]);
    let mut text = format!(
        "first differing byte at offset {first}: expected {} found {} (16 bytes from there: expected {} found {}); \
         {count} bytes differ between offsets {first} and {last}",
        format_args!("{:#04x}", expected[first]),
        format_args!("{:#04x}", found[first]),
        window(expected),
        window(found),
    );
    if found_zero {
        text.push_str(", where only zeroes were found");
    }
    if expected.len() != found.len() {
        text.push_str(&format!(
            "; size differs too: expected {} bytes, found {}",
            expected.len(),
            found.len()
        ));
    }
    text.push_str(&format!(
        "; sha256 expected {}…, found {}…",
        short_digest(expected),
        short_digest(found)
    ));
    Some(Difference {
        offset: first as u64,
        text,
    })
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    const BLOCK: usize = 4096;
    let mut pos = 0;
    while pos < a.len() {
        let end = (pos + BLOCK).min(a.len());
        if a[pos..end] != b[pos..end] {
            return (pos..end).find(|i| a[*i] != b[*i]);
        }
        pos = end;
    }
    None
}

/// A half-open byte range `start..end`.
pub(crate) type Span = (u64, u64);

/// `ranges` (`(offset, length)`) expanded outward to multiples of
/// `granularity`, clipped to `size`, sorted and merged.
pub(crate) fn expand(ranges: &[(u64, u64)], granularity: u64, size: u64) -> Vec<Span> {
    let g = granularity.max(1);
    let mut spans: Vec<Span> = ranges
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|(off, len)| {
            let start = off / g * g;
            let end = (off + len).div_ceil(g).saturating_mul(g).min(size);
            (start, end)
        })
        .collect();
    merge(&mut spans)
}

/// Sort and merge overlapping or adjacent spans.
pub(crate) fn merge(spans: &mut [Span]) -> Vec<Span> {
    spans.sort_unstable();
    let mut out: Vec<Span> = Vec::new();
    for &(s, e) in spans.iter() {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The first part of `span` not inside `allowed` (merged, sorted).
pub(crate) fn first_outside(span: Span, allowed: &[Span]) -> Option<Span> {
    let (mut pos, end) = span;
    for &(s, e) in allowed {
        if e <= pos {
            continue;
        }
        if s > pos {
            return Some((pos, s.min(end)));
        }
        pos = e;
        if pos >= end {
            return None;
        }
    }
    (pos < end).then_some((pos, end))
}

/// Human size.
pub(crate) fn size_text(bytes: u64) -> String {
    if bytes >= MIB {
        format!("{:.2} MiB", bytes as f64 / MIB as f64)
    } else if bytes >= 1024 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

/// The spans as text, at most `max` of them.
pub(crate) fn spans_text(spans: &[Span], max: usize) -> String {
    let mut parts: Vec<String> = spans
        .iter()
        .take(max)
        .map(|(s, e)| format!("{s}..{e}"))
        .collect();
    if spans.len() > max {
        parts.push(format!("… ({} more)", spans.len() - max));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_depends_on_offset_and_seed_only() {
        let whole = pattern(7, 0, 100);
        assert_eq!(pattern(7, 13, 50), whole[13..63]);
        assert_ne!(pattern(8, 0, 100), whole);
        assert_eq!(pattern(7, 5, 0), Vec::<u8>::new());
    }

    #[test]
    fn compare_names_the_first_difference() {
        let a = pattern(1, 0, 10_000);
        assert_eq!(compare(&a, &a), None);
        let mut b = a.clone();
        b[5000..5100].fill(0);
        let d = compare(&a, &b).unwrap();
        assert_eq!(
            d.offset,
            5000 + a[5000..].iter().position(|x| *x != 0).unwrap() as u64
        );
        assert!(d.text.contains("only zeroes"), "{}", d.text);
        let d = compare(&a, &a[..4096]).unwrap();
        assert_eq!(d.offset, 4096);
        assert!(d.text.contains("size differs"), "{}", d.text);
    }

    #[test]
    fn spans() {
        let e = expand(&[(0, 1), (100, 10), (9999, 1)], 64, 10_000);
        assert_eq!(e, vec![(0, 128), (9984, 10_000)]);
        assert_eq!(first_outside((0, 50), &e), None);
        assert_eq!(first_outside((100, 200), &e), Some((128, 200)));
        assert_eq!(first_outside((200, 300), &e), Some((200, 300)));
        assert_eq!(first_outside((9990, 10_000), &e), None);
        assert_eq!(first_outside((0, 10_000), &[]), Some((0, 10_000)));
    }
}
