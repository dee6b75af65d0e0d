//! Property tests: random writes and incremental snapshots read back equal
//! to a model disk; parsers never panic on hostile bytes.

use crate::common;

use std::path::Path;

use common::*;
use datastore::Digest;
use datastore::chunk::decode_chunk;
use datastore::index::FixedIndex;
use proptest::prelude::*;
use provider_api::*;

/// (gap, length, kind, seed) steps turned into ascending ops.
fn ops_from(size: u64, steps: &[(u64, u64, u8, u64)]) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut off = 0;
    for (gap, len, kind, seed) in steps {
        off += gap;
        if off >= size {
            break;
        }
        let len = (*len).min(size - off);
        ops.push(match kind {
            0 => Op::Data(off, noise(*seed, len as usize)),
            1 => Op::Zero(off, len),
            2 => Op::Data(off, vec![0; len as usize]),
            _ => Op::Data(off, vec![*seed as u8 | 1; len as usize]),
        });
        off += len;
    }
    ops
}

fn steps() -> impl Strategy<Value = Vec<(u64, u64, u8, u64)>> {
    prop::collection::vec((0..3 * CS, 1..3 * CS, 0u8..4, any::<u64>()), 0..12)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn incremental_snapshots_read_back_as_the_model(
        snaps in prop::collection::vec((1..24 * CS, steps()), 1..5),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let ds = new_ds(dir.path());
            let mut model: Vec<u8> = Vec::new();
            let mut prev: Option<SnapshotId> = None;
            let mut saved = Vec::new();
            for (i, (size, steps)) in snaps.iter().enumerate() {
                model.resize(*size as usize, 0);
                let ops = ops_from(*size, steps);
                apply(&mut model, &ops);
                let start = prev.clone().map_or(StartFrom::Empty, StartFrom::Previous);
                let info = backup(&ds, "vm", i as i64, vspec("sys", *size, start), &ops).await.unwrap();
                prev = Some(info.id.clone());
                saved.push((info.id, model.clone()));
            }
            for (id, m) in &saved {
                let got = read_all(&ds, id, "sys", Layer::Merged).await.unwrap();
                prop_assert_eq!(&got, m);
                let r = ds.open_snapshot(id).await.unwrap().open_volume("sys", Layer::Merged).await.unwrap();
                for reg in r.regions(0, r.size()).await.unwrap() {
                    if reg.kind == RegionKind::Zero {
                        let s = reg.extent.offset as usize;
                        prop_assert!(m[s..s + reg.extent.length as usize].iter().all(|b| *b == 0));
                    }
                }
            }
            prop_assert!(ds.verify(datastore::VerifyScope::All).unwrap().is_ok());
            Ok(())
        })?;
    }

    #[test]
    fn hostile_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600), flip in any::<usize>()) {
        let p = Path::new("x");
        let _ = FixedIndex::decode(&bytes, p);
        let _ = decode_chunk(&bytes, &Digest::ZERO, datastore::ChunkHash::Blake3, None, 1 << 20, p);
        let crypt = datastore::crypt::Crypt::new(&datastore::key::MasterKey::generate());
        let _ = decode_chunk(&bytes, &Digest::ZERO, datastore::ChunkHash::Blake3, Some(&crypt), 1 << 20, p);
        let _ = crypt.open_file(p, &bytes);
        let _ = datastore::manifest::unseal::<serde_json::Value>(&bytes, p);
        // A valid header with a damaged body is refused.
        let idx = FixedIndex { size: 5 * CS, chunk_size: CS, digests: vec![Digest::of(&bytes); 5] };
        let mut enc = idx.encode();
        let i = flip % enc.len();
        enc[i] ^= 0x80;
        prop_assert!(FixedIndex::decode(&enc, p).is_err());
    }
}
