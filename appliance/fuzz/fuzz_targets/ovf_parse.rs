//! Any bytes as an OVF descriptor: an error or a descriptor, never a
//! panic, and a descriptor's guest conversion never panics either.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = appliance::ovf::parse(data) {
        let _ = d.guest("fuzz");
    }
});
