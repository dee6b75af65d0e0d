//! Fuzz target: `nbd::fuzzing::parsers` on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd::fuzzing::parsers(data);
});
