//! Any bytes as an OVA: an error or members that lie inside the archive
//! and are plain names, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    if let Ok(members) = appliance::ova::members(std::io::Cursor::new(data), len) {
        for m in members {
            assert!(m.offset + m.size <= len);
            assert!(!m.name.is_empty() && !m.name.contains('/') && m.name != "..");
        }
    }
});
