//! Entry points for fuzzing the parsers of untrusted bytes (used by
//! `nbd/fuzz` and by the bounded property tests below). Not a stable API.
#![allow(
    clippy::expect_used,
    reason = "fuzzing entry points: a runtime that cannot start is a broken fuzz run"
)]

use crate::proto;

fn run<F: std::future::Future<Output = ()>>(f: F) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Client handshake (greeting, STRUCTURED_REPLY, SET_META_CONTEXT, GO)
/// against arbitrary server bytes.
pub fn client_handshake(data: &[u8]) {
    run(crate::client::fuzz_handshake(data))
}

/// Client reply reader (simple and structured replies) against arbitrary
/// bytes with four requests in flight; the first byte picks structured.
pub fn client_replies(data: &[u8]) {
    run(crate::client::fuzz_replies(data))
}

/// Server handshake and request parser against arbitrary client bytes.
pub fn server(data: &[u8]) {
    run(crate::server::fuzz_server(data))
}

/// The pure parsers of `proto`.
pub fn parsers(data: &[u8]) {
    let _ = proto::parse_info(data);
    let _ = proto::parse_meta_context(data);
    let _ = proto::parse_rep_server(data);
    let _ = proto::parse_error_chunk(data, false);
    let _ = proto::parse_error_chunk(data, true);
    if let Ok((_, d)) = proto::parse_block_status(data) {
        let _ = proto::descriptors_to_extents(4096, 1 << 20, 1 << 21, &d);
    }
    if let Ok(h) =
        <[u8; proto::REQUEST_LEN]>::try_from(data.get(..proto::REQUEST_LEN).unwrap_or_default())
    {
        let _ = proto::Request::decode(&h);
    }
    let _ = crate::uri::NbdUri::parse(&String::from_utf8_lossy(data));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::*;
    use proptest::prelude::*;

    /// Frames with valid magics and random fields, so the parsers get
    /// past the first check.
    fn frames() -> impl Strategy<Value = Vec<u8>> {
        let frame = (
            0u8..4,
            any::<u16>(),
            0u16..8,
            0u64..5,
            0u32..80,
            prop::collection::vec(any::<u8>(), 0..80),
        )
            .prop_map(|(k, flags, t, cookie, len, mut pay)| {
                let kind = [0, 1, 2, 5, 0x8001, 0x8002, 3, 0x8003][t as usize];
                let mut v = match k {
                    0 => simple_reply((len % 3) * 5, cookie).to_vec(),
                    1 | 2 => ChunkHeader {
                        flags: flags & 1,
                        kind,
                        cookie,
                        length: len,
                    }
                    .encode()
                    .to_vec(),
                    _ => Request {
                        flags,
                        command: t,
                        cookie,
                        offset: (len as u64) << 12,
                        length: len,
                    }
                    .encode()
                    .to_vec(),
                };
                pay.truncate(len as usize);
                v.extend(pay);
                v
            });
        prop::collection::vec(frame, 0..6).prop_map(|f| f.concat())
    }

    fn greeting_then(tail: Vec<u8>) -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&3u16.to_be_bytes());
        v.extend(tail);
        v
    }

    fn opt_replies() -> impl Strategy<Value = Vec<u8>> {
        let rep = (
            0usize..4,
            0u32..5,
            prop::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(o, t, pay)| {
                let opt = [OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT, OPT_GO, OPT_LIST][o];
                let kind = [
                    REP_ACK,
                    REP_INFO,
                    REP_META_CONTEXT,
                    REP_ERR_UNSUP,
                    REP_ERR_TLS_REQD,
                ][t as usize];
                let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
                v.extend_from_slice(&opt.to_be_bytes());
                v.extend_from_slice(&kind.to_be_bytes());
                v.extend_from_slice(&(pay.len() as u32).to_be_bytes());
                v.extend(pay);
                v
            });
        prop::collection::vec(rep, 0..8).prop_map(|r| greeting_then(r.concat()))
    }

    fn client_options() -> impl Strategy<Value = Vec<u8>> {
        let opt = (
            1u32..12,
            prop::collection::vec(any::<u8>(), 0..40),
            any::<bool>(),
        )
            .prop_map(|(o, pay, real)| {
                let mut pay = pay;
                if real && (o == OPT_GO || o == OPT_INFO) {
                    pay = vec![0, 0, 0, 2, b'v', b'm', 0, 1, 0, 3];
                }
                let mut v = IHAVEOPT.to_be_bytes().to_vec();
                v.extend_from_slice(&o.to_be_bytes());
                v.extend_from_slice(&(pay.len() as u32).to_be_bytes());
                v.extend(pay);
                v
            });
        (prop::collection::vec(opt, 0..6), frames()).prop_map(|(o, f)| {
            let mut v = 3u32.to_be_bytes().to_vec();
            v.extend(o.concat());
            v.extend(f);
            v
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn parsers_never_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
            parsers(&data);
            client_handshake(&data);
            client_replies(&data);
            server(&data);
        }

        #[test]
        fn reply_frames_never_panic(structured in any::<bool>(), data in frames()) {
            let mut v = vec![structured as u8];
            v.extend(data);
            client_replies(&v);
        }

        #[test]
        fn handshake_replies_never_panic(data in opt_replies()) {
            client_handshake(&data);
        }

        #[test]
        fn server_options_never_panic(data in client_options()) {
            server(&data);
        }
    }
}
