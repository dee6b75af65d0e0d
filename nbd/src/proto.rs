//! Wire format of the NBD protocol (fixed newstyle handshake, simple and
//! structured replies): constants and pure encoders/decoders.
//!
//! Everything here works on byte slices and checks every field; nothing
//! here panics on hostile input (the fuzz target and the proptest in
//! `fuzzing` feed it arbitrary bytes).

use bytes::{BufMut, BytesMut};

use crate::error::{Error, Result};

/// "NBDMAGIC"
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of the oldstyle handshake (unsupported).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of option replies.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Server handshake flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Server handshake flag: no 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flags.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no zeroes.
pub const CLIENT_NO_ZEROES: u32 = 2;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort the handshake.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Query an export.
pub const OPT_INFO: u32 = 6;
/// Query and select an export.
pub const OPT_GO: u32 = 7;
/// Negotiate structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List meta contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select meta contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// An export (reply to LIST).
pub const REP_SERVER: u32 = 2;
/// Information about an export (reply to INFO/GO).
pub const REP_INFO: u32 = 3;
/// A meta context.
pub const REP_META_CONTEXT: u32 = 4;
/// Error bit of option replies.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Unsupported option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Invalid option.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Platform does not support it.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// TLS required.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Unknown export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Client must request block sizes.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Option payload too big.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Info types.
pub const INFO_EXPORT: u16 = 0;
/// Export name.
pub const INFO_NAME: u16 = 1;
/// Export description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1;
/// Read-only export.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// FLUSH supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// FUA supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Rotational media.
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// TRIM supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// WRITE_ZEROES supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// DF supported.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Multiple connections see one consistent export.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim.
pub const CMD_TRIM: u16 = 4;
/// Cache (prefetch).
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1;
/// Do not punch a hole for WRITE_ZEROES.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Do not fragment a read.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Only one extent wanted.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Fast zero.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: last chunk.
pub const REPLY_FLAG_DONE: u16 = 1;
/// Chunk types.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data chunk.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Hole chunk.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status chunk.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Error bit of chunk types.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Error chunk.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
/// Error chunk with offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

/// base:allocation flag: unallocated.
pub const STATE_HOLE: u32 = 1;
/// base:allocation flag: reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// qemu:dirty-bitmap flag: dirty.
pub const STATE_DIRTY: u32 = 1;

/// Default maximum payload when the server does not say (spec: 32 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload either side accepts.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Largest non-data reply chunk payload the client accepts.
pub const MAX_CHUNK_LEN: u32 = 16 << 20;
/// Largest error message kept from a peer.
pub const MAX_ERROR_MSG: usize = 4096;

/// Name of a command, for errors and logs.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "UNKNOWN",
    }
}

/// Name of an option, for errors and logs.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        _ => "UNKNOWN",
    }
}

/// Name of an option error reply.
pub fn rep_err_name(rep: u32) -> &'static str {
    match rep {
        REP_ERR_UNSUP => "ERR_UNSUP",
        REP_ERR_POLICY => "ERR_POLICY",
        REP_ERR_INVALID => "ERR_INVALID",
        REP_ERR_PLATFORM => "ERR_PLATFORM",
        REP_ERR_TLS_REQD => "ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "ERR_TOO_BIG",
        _ => "ERR_?",
    }
}

/// Block size constraints of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Minimum block size (requests should be aligned to it).
    pub min: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Maximum payload of one request.
    pub max: u32,
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize {
            min: 1,
            preferred: 4096,
            max: DEFAULT_MAX_PAYLOAD,
        }
    }
}

impl BlockSize {
    /// Validate constraints as the spec demands (min a power of two up to
    /// 64 KiB, preferred a power of two at least min, max a multiple of min
    /// or `u32::MAX`).
    pub fn validate(&self) -> Result<()> {
        let ok = self.min.is_power_of_two()
            && self.min <= 64 * 1024
            && self.preferred.is_power_of_two()
            && self.preferred >= self.min
            && (self.max == u32::MAX
                || (self.max >= self.min && self.max.is_multiple_of(self.min)));
        if ok {
            Ok(())
        } else {
            Err(Error::protocol(format!(
                "invalid block size constraints min {} preferred {} max {}",
                self.min, self.preferred, self.max
            )))
        }
    }
}

/// One extent of a block status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Start of the extent.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Context-specific flags (base:allocation: 1 hole, 2 zero;
    /// qemu:dirty-bitmap: 1 dirty; qemu:allocation-depth: the depth).
    pub flags: u32,
}

impl Extent {
    /// base:allocation: the extent is unallocated.
    pub fn is_hole(&self) -> bool {
        self.flags & STATE_HOLE != 0
    }
    /// base:allocation: the extent reads as zeroes.
    pub fn is_zero(&self) -> bool {
        self.flags & STATE_ZERO != 0
    }
    /// qemu:dirty-bitmap: the extent changed.
    pub fn is_dirty(&self) -> bool {
        self.flags & STATE_DIRTY != 0
    }
    /// End offset (exclusive).
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Merge adjacent extents with equal flags (in place).
pub fn coalesce(extents: &mut Vec<Extent>) {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents.drain(..) {
        match out.last_mut() {
            Some(last) if last.end() == e.offset && last.flags == e.flags => {
                last.length += e.length
            }
            _ => out.push(e),
        }
    }
    *extents = out;
}

/// A request header (28 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub command: u16,
    /// Cookie echoed by the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub length: u32,
}

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;

impl Request {
    /// Encode.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decode and check the magic.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request> {
        let magic = be32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(Error::protocol(format!("bad request magic {magic:#010x}")));
        }
        Ok(Request {
            flags: be16(&b[4..6]),
            command: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: be32(&b[24..28]),
        })
    }
}

/// Header of a structured reply chunk (20 bytes with the magic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Flags (DONE).
    pub flags: u16,
    /// Chunk type.
    pub kind: u16,
    /// Cookie.
    pub cookie: u64,
    /// Payload length.
    pub length: u32,
}

impl ChunkHeader {
    /// Encode with the magic.
    pub fn encode(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }
    /// Decode the 16 bytes after the magic.
    pub fn decode_after_magic(b: &[u8; 16]) -> ChunkHeader {
        ChunkHeader {
            flags: be16(&b[0..2]),
            kind: be16(&b[2..4]),
            cookie: be64(&b[4..12]),
            length: be32(&b[12..16]),
        }
    }
}

/// Encode a simple reply.
pub fn simple_reply(errno: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A parsed error chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    /// Errno.
    pub errno: u32,
    /// Message (lossy UTF-8, truncated).
    pub message: String,
    /// Offset for ERROR_OFFSET.
    pub offset: Option<u64>,
}

/// Parse the payload of an error chunk (`with_offset` for ERROR_OFFSET).
pub fn parse_error_chunk(p: &[u8], with_offset: bool) -> Result<ErrorChunk> {
    if p.len() < 6 {
        return Err(Error::protocol(format!(
            "error chunk of {} bytes is too short",
            p.len()
        )));
    }
    let errno = be32(&p[0..4]);
    let mlen = be16(&p[4..6]) as usize;
    let need = 6 + mlen + if with_offset { 8 } else { 0 };
    if p.len() != need {
        return Err(Error::protocol(format!(
            "error chunk length {} does not match its message length {mlen}",
            p.len()
        )));
    }
    if errno == 0 {
        return Err(Error::protocol("error chunk with errno 0"));
    }
    let msg = &p[6..6 + mlen.min(MAX_ERROR_MSG)];
    let offset = with_offset.then(|| be64(&p[6 + mlen..]));
    Ok(ErrorChunk {
        errno,
        message: String::from_utf8_lossy(msg).into_owned(),
        offset,
    })
}

/// Encode an error chunk payload.
pub fn encode_error_chunk(errno: u32, msg: &str, offset: Option<u64>) -> BytesMut {
    let m = &msg.as_bytes()[..msg.len().min(MAX_ERROR_MSG)];
    let mut b = BytesMut::with_capacity(6 + m.len() + 8);
    b.put_u32(errno);
    b.put_u16(m.len() as u16);
    b.put_slice(m);
    if let Some(o) = offset {
        b.put_u64(o);
    }
    b
}

/// Parse a BLOCK_STATUS chunk payload: the context id and descriptors
/// `(length, flags)`.
pub fn parse_block_status(p: &[u8]) -> Result<(u32, Vec<(u32, u32)>)> {
    if p.len() < 12 || !(p.len() - 4).is_multiple_of(8) {
        return Err(Error::protocol(format!(
            "block status chunk of {} bytes is not 4 + 8*n (n >= 1)",
            p.len()
        )));
    }
    let id = be32(&p[0..4]);
    let descs = p[4..]
        .chunks_exact(8)
        .map(|d| (be32(&d[0..4]), be32(&d[4..8])))
        .collect();
    Ok((id, descs))
}

/// Turn block status descriptors into extents starting at `offset`,
/// checking them against the request `[offset, offset+req_len)` and the
/// export size. The last extent may reach past the request (the spec
/// allows it); it is clipped. Nothing may reach past the export.
pub fn descriptors_to_extents(
    offset: u64,
    req_len: u64,
    size: u64,
    descs: &[(u32, u32)],
) -> Result<Vec<Extent>> {
    let end = offset + req_len;
    let mut pos = offset;
    let mut out = Vec::with_capacity(descs.len());
    for (i, &(len, flags)) in descs.iter().enumerate() {
        if len == 0 {
            return Err(Error::protocol(format!(
                "block status extent {i} has length 0"
            )));
        }
        if pos >= end {
            return Err(Error::protocol(format!(
                "block status extent {i} starts at {pos}, past the requested end {end}"
            )));
        }
        let e_end = pos + len as u64;
        if e_end > size {
            return Err(Error::protocol(format!(
                "block status extent {pos}+{len} runs past the export end {size}"
            )));
        }
        let clipped = e_end.min(end) - pos;
        out.push(Extent {
            offset: pos,
            length: clipped,
            flags,
        });
        pos = e_end;
    }
    Ok(out)
}

/// Parse the payload of an INFO_BLOCK_SIZE / INFO_EXPORT reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// INFO_EXPORT: size and transmission flags.
    Export {
        /// Size.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// INFO_BLOCK_SIZE.
    BlockSize(BlockSize),
    /// Something else (name, description, unknown): ignored.
    Other(u16),
}

/// Parse an NBD_REP_INFO payload.
pub fn parse_info(p: &[u8]) -> Result<Info> {
    if p.len() < 2 {
        return Err(Error::protocol("NBD_REP_INFO shorter than 2 bytes"));
    }
    let t = be16(&p[0..2]);
    match t {
        INFO_EXPORT => {
            if p.len() != 12 {
                return Err(Error::protocol(format!(
                    "INFO_EXPORT of {} bytes, want 12",
                    p.len()
                )));
            }
            Ok(Info::Export {
                size: be64(&p[2..10]),
                flags: be16(&p[10..12]),
            })
        }
        INFO_BLOCK_SIZE => {
            if p.len() != 14 {
                return Err(Error::protocol(format!(
                    "INFO_BLOCK_SIZE of {} bytes, want 14",
                    p.len()
                )));
            }
            let bs = BlockSize {
                min: be32(&p[2..6]),
                preferred: be32(&p[6..10]),
                max: be32(&p[10..14]),
            };
            bs.validate()?;
            Ok(Info::BlockSize(bs))
        }
        t => Ok(Info::Other(t)),
    }
}

/// Parse the payload of a META_CONTEXT reply: id and name.
pub fn parse_meta_context(p: &[u8]) -> Result<(u32, String)> {
    if p.len() < 5 {
        return Err(Error::protocol("META_CONTEXT reply shorter than 5 bytes"));
    }
    let id = be32(&p[0..4]);
    let name = std::str::from_utf8(&p[4..])
        .map_err(|_| Error::protocol("META_CONTEXT name is not UTF-8"))?;
    Ok((id, name.to_owned()))
}

/// Parse the payload of an NBD_REP_SERVER reply: the export name.
pub fn parse_rep_server(p: &[u8]) -> Result<(String, String)> {
    if p.len() < 4 {
        return Err(Error::protocol("NBD_REP_SERVER shorter than 4 bytes"));
    }
    let n = be32(&p[0..4]) as usize;
    if n > p.len() - 4 {
        return Err(Error::protocol(format!(
            "NBD_REP_SERVER name length {n} exceeds the reply"
        )));
    }
    let name = String::from_utf8_lossy(&p[4..4 + n]).into_owned();
    let desc = String::from_utf8_lossy(&p[4 + n..]).into_owned();
    Ok((name, desc))
}

/// A cursor over an option payload that fails with a protocol error
/// instead of panicking.
pub struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    /// New cursor; `what` names the message in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, what }
    }
    /// Take `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() {
            return Err(Error::protocol(format!(
                "{} truncated: {} bytes wanted, {} left",
                self.what,
                n,
                self.buf.len()
            )));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    /// Take a u16.
    pub fn u16(&mut self) -> Result<u16> {
        self.take(2).map(be16)
    }
    /// Take a u32.
    pub fn u32(&mut self) -> Result<u32> {
        self.take(4).map(be32)
    }
    /// Take a u32 length and then a UTF-8 string of that length.
    pub fn string32(&mut self) -> Result<String> {
        let n = self.u32()? as usize;
        let s = self.take(n)?;
        std::str::from_utf8(s)
            .map(str::to_owned)
            .map_err(|_| Error::protocol(format!("{}: string is not UTF-8", self.what)))
    }
    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
}

/// Big-endian u16 from the first 2 bytes.
pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
/// Big-endian u32 from the first 4 bytes.
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
/// Big-endian u64 from the first 8 bytes.
pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 7,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        let mut bad = r.encode();
        bad[0] = 0;
        assert!(
            Request::decode(&bad)
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
    }

    #[test]
    fn extents_checked() {
        let e = descriptors_to_extents(0, 100, 1000, &[(50, 0), (100, 3)]).unwrap();
        assert_eq!(
            e[1],
            Extent {
                offset: 50,
                length: 50,
                flags: 3
            }
        );
        assert!(descriptors_to_extents(0, 100, 1000, &[(0, 0)]).is_err());
        assert!(descriptors_to_extents(0, 100, 120, &[(200, 0)]).is_err());
        assert!(descriptors_to_extents(0, 100, 1000, &[(100, 0), (1, 0)]).is_err());
    }

    #[test]
    fn error_chunk_roundtrip() {
        let p = encode_error_chunk(5, "bad sector", Some(512));
        let c = parse_error_chunk(&p, true).unwrap();
        assert_eq!(
            (c.errno, c.message.as_str(), c.offset),
            (5, "bad sector", Some(512))
        );
        assert!(parse_error_chunk(&p[..7], true).is_err());
    }

    #[test]
    fn block_size_validation() {
        assert!(
            BlockSize {
                min: 512,
                preferred: 4096,
                max: 1 << 25
            }
            .validate()
            .is_ok()
        );
        assert!(
            BlockSize {
                min: 3,
                preferred: 4096,
                max: 1 << 25
            }
            .validate()
            .is_err()
        );
        assert!(
            BlockSize {
                min: 4096,
                preferred: 512,
                max: 1 << 25
            }
            .validate()
            .is_err()
        );
    }
}
