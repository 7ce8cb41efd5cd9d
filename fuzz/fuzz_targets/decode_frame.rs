//! Feeds arbitrary bytes to the frame parser: header checks, CRCs, the page
//! table and every page codec. It must return an error, never panic or
//! allocate by what the input claims.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferry_engine::wire::parse::parse_frame(data, 1 << 20);
});
