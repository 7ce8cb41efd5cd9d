//! Feeds arbitrary bytes to `ferry_compress::decode_delta`: the first byte is
//! the codec id, the second picks the base page, the rest is the payload.
//! Decoding must never panic, must leave the page as it was on error, and a
//! page it produces must survive a round trip through the encoder: the delta
//! `xor_encode` makes from the base to it decodes back to it.

#![no_main]

use ferry_compress::{decode_delta, xor_decode, xor_encode, Codec, PAGE_SIZE, PAYLOAD_BYTES_MAX};
use libfuzzer_sys::fuzz_target;

/// Zero, all-ones, a byte ramp, or a pseudo-random page from the seed.
fn base_page(seed: u8) -> Vec<u8> {
    let mut state = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..PAGE_SIZE)
        .map(|i| match seed % 4 {
            0 => 0,
            1 => 0xFF,
            2 => i as u8,
            _ => {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            }
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let [id, seed, payload @ ..] = data else {
        return;
    };
    let Ok(codec) = Codec::try_from(*id) else {
        return;
    };
    let base = base_page(*seed);
    let mut page = base.clone();
    if decode_delta(codec, payload, &mut page).is_err() {
        assert!(page == base, "page written on error");
        return;
    }
    assert!(codec.is_delta(), "decode_delta accepted {codec:?}");
    assert!(payload.len() <= PAYLOAD_BYTES_MAX);
    let changed = base.iter().zip(&page).filter(|(a, b)| a != b).count();
    if codec == Codec::Xor {
        assert!(
            changed <= payload.len(),
            "{changed} bytes changed by {} bytes",
            payload.len()
        );
    }
    let mut delta = Vec::new();
    if xor_encode(&base, &page, &mut delta, PAYLOAD_BYTES_MAX).is_some() {
        let mut again = base.clone();
        xor_decode(&delta, &mut again).expect("own delta decodes");
        assert!(again == page, "re-encoded delta differs");
    }
});
