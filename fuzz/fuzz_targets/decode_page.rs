//! Feeds arbitrary bytes to `ferry_compress::decode`: the first byte is the
//! codec id, the rest the payload. Decoding must never panic, and a page it
//! accepts must be exactly what the codec's rules allow.

#![no_main]

use ferry_compress::{decode, Codec, PAGE_SIZE, PAYLOAD_BYTES_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&id, payload)) = data.split_first() else {
        return;
    };
    let Ok(codec) = Codec::try_from(id) else {
        return;
    };
    let mut out = [0u8; PAGE_SIZE];
    if decode(codec, payload, &mut out).is_ok() {
        match codec {
            Codec::Zero => assert!(payload.is_empty() && out.iter().all(|&b| b == 0)),
            Codec::Raw => assert_eq!(&out[..], payload),
            Codec::Lz4 => assert!(payload.len() <= PAYLOAD_BYTES_MAX),
            Codec::Xor | Codec::XorLz4 => panic!("decode accepted delta codec {codec:?}"),
        }
    }
});
