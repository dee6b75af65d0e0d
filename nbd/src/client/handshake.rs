//! Client side of the fixed newstyle handshake.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, ErrorKind, Result};
use crate::proto::*;

/// Largest option reply payload accepted from a server.
const MAX_OPT_REPLY: u32 = 1 << 20;
/// Most replies accepted for one option (LIST, META_CONTEXT).
const MAX_REPLIES: usize = 100_000;

/// What GO negotiated.
#[derive(Debug, Clone)]
pub(crate) struct Negotiated {
    pub size: u64,
    pub flags: u16,
    pub block_size: BlockSize,
    pub structured: bool,
    pub contexts: Vec<(u32, String)>,
}

pub(crate) struct OptReply {
    pub kind: u32,
    pub payload: Vec<u8>,
}

async fn read_array<const N: usize, S>(s: &mut S, what: &str) -> Result<[u8; N]>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let mut b = [0u8; N];
    s.read_exact(&mut b).await.map_err(|e| truncated(e, what))?;
    Ok(b)
}

fn truncated(e: std::io::Error, what: &str) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Error::protocol(format!(
            "handshake truncated: server closed the connection while sending {what}"
        ))
        .with_source(e)
    } else {
        Error::from(e)
    }
}

/// Read the server greeting, send the client flags. Returns whether the
/// server omits the zeroes after EXPORT_NAME.
pub(crate) async fn greeting<S>(s: &mut S) -> Result<bool>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let hello: [u8; 18] = read_array(s, "its greeting").await?;
    let magic = be64(&hello[0..8]);
    if magic != NBDMAGIC {
        return Err(Error::protocol(format!(
            "bad greeting magic {magic:#018x}, not an NBD server"
        )));
    }
    let m2 = be64(&hello[8..16]);
    if m2 == OLDSTYLE_MAGIC {
        return Err(Error::unsupported("server speaks the oldstyle handshake"));
    }
    if m2 != IHAVEOPT {
        return Err(Error::protocol(format!("bad newstyle magic {m2:#018x}")));
    }
    let flags = be16(&hello[16..18]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::unsupported("server does not speak fixed newstyle"));
    }
    let no_zeroes = flags & FLAG_NO_ZEROES != 0;
    let cflags = CLIENT_FIXED_NEWSTYLE | if no_zeroes { CLIENT_NO_ZEROES } else { 0 };
    s.write_all(&cflags.to_be_bytes()).await?;
    Ok(no_zeroes)
}

pub(crate) async fn send_option<S>(s: &mut S, opt: u32, data: &[u8]) -> Result<()>
where
    S: AsyncWrite + Unpin + ?Sized,
{
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await?;
    s.flush().await?;
    Ok(())
}

pub(crate) async fn read_option_reply<S>(s: &mut S, opt: u32) -> Result<OptReply>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let h: [u8; 20] = read_array(s, "an option reply").await?;
    let magic = be64(&h[0..8]);
    if magic != OPT_REPLY_MAGIC {
        return Err(Error::protocol(format!(
            "bad option reply magic {magic:#018x}"
        )));
    }
    let ropt = be32(&h[8..12]);
    if ropt != opt {
        return Err(Error::protocol(format!(
            "reply for option {ropt} while waiting for {}",
            option_name(opt)
        )));
    }
    let kind = be32(&h[12..16]);
    let len = be32(&h[16..20]);
    if len > MAX_OPT_REPLY {
        return Err(Error::protocol(format!(
            "option reply of {len} bytes to {} exceeds the limit {MAX_OPT_REPLY}",
            option_name(opt)
        )));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)
        .await
        .map_err(|e| truncated(e, "an option reply payload"))?;
    Ok(OptReply { kind, payload })
}

/// Turn an error reply into an error.
pub(crate) fn option_error(opt: u32, r: &OptReply) -> Error {
    let msg =
        String::from_utf8_lossy(&r.payload[..r.payload.len().min(MAX_ERROR_MSG)]).into_owned();
    let detail = if msg.is_empty() {
        String::new()
    } else {
        format!(": {msg}")
    };
    match r.kind {
        REP_ERR_TLS_REQD => Error::new(ErrorKind::TlsRequired),
        REP_ERR_UNKNOWN => Error::new(ErrorKind::ExportNotFound),
        REP_ERR_UNSUP | REP_ERR_POLICY | REP_ERR_PLATFORM | REP_ERR_SHUTDOWN => {
            Error::unsupported(format!(
                "server answered {} with {}{detail}",
                option_name(opt),
                rep_err_name(r.kind)
            ))
        }
        k if k & REP_FLAG_ERROR != 0 => Error::protocol(format!(
            "server answered {} with {} ({k:#x}){detail}",
            option_name(opt),
            rep_err_name(k)
        )),
        k => Error::protocol(format!("unexpected reply type {k} to {}", option_name(opt))),
    }
}

/// NBD_OPT_STARTTLS; on return the caller upgrades the stream.
pub(crate) async fn starttls<S>(s: &mut S) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    send_option(s, OPT_STARTTLS, &[]).await?;
    let r = read_option_reply(s, OPT_STARTTLS).await?;
    match r.kind {
        REP_ACK => Ok(()),
        _ => Err(Error::tls(format!(
            "server refused STARTTLS ({}); not falling back to plaintext",
            option_error(OPT_STARTTLS, &r)
        ))),
    }
}

fn name_payload(export: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + export.len());
    b.extend_from_slice(&(export.len() as u32).to_be_bytes());
    b.extend_from_slice(export.as_bytes());
    b
}

fn meta_payload(export: &str, queries: &[String]) -> Vec<u8> {
    let mut b = name_payload(export);
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

/// Negotiate structured replies (if asked), meta contexts and GO.
pub(crate) async fn negotiate<S>(
    s: &mut S,
    export: &str,
    want_structured: bool,
    contexts: &[String],
    no_zeroes: bool,
) -> Result<Negotiated>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    if export.len() > 4096 || contexts.iter().any(|c| c.len() > 4096) {
        return Err(Error::invalid(
            "export and meta context names are limited to 4096 bytes",
        ));
    }
    let mut structured = false;
    if want_structured {
        send_option(s, OPT_STRUCTURED_REPLY, &[]).await?;
        let r = read_option_reply(s, OPT_STRUCTURED_REPLY).await?;
        match r.kind {
            REP_ACK => structured = true,
            REP_ERR_TLS_REQD => return Err(Error::new(ErrorKind::TlsRequired)),
            k if k & REP_FLAG_ERROR != 0 => {}
            _ => return Err(option_error(OPT_STRUCTURED_REPLY, &r)),
        }
    }
    let mut granted = Vec::new();
    if structured && !contexts.is_empty() {
        send_option(s, OPT_SET_META_CONTEXT, &meta_payload(export, contexts)).await?;
        for _ in 0..MAX_REPLIES {
            let r = read_option_reply(s, OPT_SET_META_CONTEXT).await?;
            match r.kind {
                REP_META_CONTEXT => {
                    let (id, name) = parse_meta_context(&r.payload)?;
                    if !contexts.contains(&name) {
                        return Err(Error::protocol(format!(
                            "server selected meta context {name:?} that was not asked for"
                        )));
                    }
                    if granted.iter().any(|(i, _)| *i == id) {
                        return Err(Error::protocol(format!("meta context id {id} given twice")));
                    }
                    granted.push((id, name));
                }
                REP_ACK => break,
                REP_ERR_TLS_REQD => return Err(Error::new(ErrorKind::TlsRequired)),
                REP_ERR_UNKNOWN => return Err(Error::new(ErrorKind::ExportNotFound)),
                k if k & REP_FLAG_ERROR != 0 => break,
                _ => return Err(option_error(OPT_SET_META_CONTEXT, &r)),
            }
        }
    }
    // GO with a request for block sizes.
    let mut p = name_payload(export);
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &p).await?;
    let mut export_info = None;
    let mut block_size = BlockSize::default();
    for _ in 0..MAX_REPLIES {
        let r = read_option_reply(s, OPT_GO).await?;
        match r.kind {
            REP_INFO => match parse_info(&r.payload)? {
                Info::Export { size, flags } => export_info = Some((size, flags)),
                Info::BlockSize(bs) => block_size = bs,
                Info::Other(_) => {}
            },
            REP_ACK => {
                let (size, flags) = export_info
                    .ok_or_else(|| Error::protocol("server finished GO without INFO_EXPORT"))?;
                if size > i64::MAX as u64 {
                    return Err(Error::protocol(format!("export size {size} is too large")));
                }
                return Ok(Negotiated {
                    size,
                    flags,
                    block_size,
                    structured,
                    contexts: granted,
                });
            }
            REP_ERR_UNSUP => {
                return export_name_fallback(s, export, no_zeroes, structured, granted).await;
            }
            _ => return Err(option_error(OPT_GO, &r)),
        }
    }
    Err(Error::protocol("too many replies to GO"))
}

async fn export_name_fallback<S>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
    structured: bool,
    contexts: Vec<(u32, String)>,
) -> Result<Negotiated>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    send_option(s, OPT_EXPORT_NAME, export.as_bytes()).await?;
    let b: [u8; 10] = read_array(s, "the EXPORT_NAME reply").await.map_err(|e| {
        if matches!(e.kind(), ErrorKind::Protocol(_)) {
            Error::new(ErrorKind::ExportNotFound)
        } else {
            e
        }
    })?;
    if !no_zeroes {
        let _: [u8; 124] = read_array(s, "the EXPORT_NAME padding").await?;
    }
    Ok(Negotiated {
        size: be64(&b[0..8]),
        flags: be16(&b[8..10]),
        block_size: BlockSize::default(),
        structured,
        contexts,
    })
}

/// NBD_OPT_LIST: names and descriptions.
pub(crate) async fn list_exports<S>(s: &mut S) -> Result<Vec<(String, String)>>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    send_option(s, OPT_LIST, &[]).await?;
    let mut out = Vec::new();
    for _ in 0..MAX_REPLIES {
        let r = read_option_reply(s, OPT_LIST).await?;
        match r.kind {
            REP_SERVER => out.push(parse_rep_server(&r.payload)?),
            REP_ACK => return Ok(out),
            _ => return Err(option_error(OPT_LIST, &r)),
        }
    }
    Err(Error::protocol("too many replies to LIST"))
}

/// NBD_OPT_LIST_META_CONTEXT (needs structured replies first).
pub(crate) async fn list_meta_contexts<S>(
    s: &mut S,
    export: &str,
    queries: &[String],
) -> Result<Vec<String>>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    send_option(s, OPT_STRUCTURED_REPLY, &[]).await?;
    let r = read_option_reply(s, OPT_STRUCTURED_REPLY).await?;
    if r.kind != REP_ACK {
        return Err(option_error(OPT_STRUCTURED_REPLY, &r));
    }
    send_option(s, OPT_LIST_META_CONTEXT, &meta_payload(export, queries)).await?;
    let mut out = Vec::new();
    for _ in 0..MAX_REPLIES {
        let r = read_option_reply(s, OPT_LIST_META_CONTEXT).await?;
        match r.kind {
            REP_META_CONTEXT => out.push(parse_meta_context(&r.payload)?.1),
            REP_ACK => return Ok(out),
            _ => return Err(option_error(OPT_LIST_META_CONTEXT, &r)),
        }
    }
    Err(Error::protocol("too many replies to LIST_META_CONTEXT"))
}

/// NBD_OPT_ABORT, best effort.
pub(crate) async fn abort<S>(s: &mut S)
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    if send_option(s, OPT_ABORT, &[]).await.is_ok() {
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            read_option_reply(s, OPT_ABORT),
        )
        .await;
    }
    let _ = s.shutdown().await;
}
