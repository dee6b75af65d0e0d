//! Fuzz target: `nbd::fuzzing::client_handshake` on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd::fuzzing::client_handshake(data);
});
