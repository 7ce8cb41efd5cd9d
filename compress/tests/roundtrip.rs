//! Property tests against naive oracles: every page survives compress → decode,
//! `is_zero` agrees with `iter().all`, and `decode` never panics on peer input.

use ferry_compress::{
    decode, is_zero, is_zero_guest, Codec, EncoderConfig, PageEncoder, PAGE_SIZE,
};
use proptest::prelude::*;
use vm_memory::VolatileSlice;

#[path = "../src/testdata.rs"]
mod testdata;

/// Pages of every kind the engine sees: zero with a few bytes set, repetitive,
/// text-like, random, and arbitrary mixtures of runs.
fn page() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec((0..PAGE_SIZE, any::<u8>()), 0..8).prop_map(|sets| {
            let mut page = vec![0u8; PAGE_SIZE];
            for (i, b) in sets {
                page[i] = b;
            }
            page
        }),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(|unit| unit
            .iter()
            .copied()
            .cycle()
            .take(PAGE_SIZE)
            .collect()),
        any::<u64>().prop_map(|mut seed| testdata::text_page(&mut seed)),
        any::<u64>().prop_map(|mut seed| testdata::random_page(&mut seed)),
        prop::collection::vec((any::<u8>(), 1..512usize, any::<bool>()), 1..64).prop_map(|runs| {
            let mut page = Vec::with_capacity(PAGE_SIZE);
            let mut state = 0u64;
            for (b, len, random) in runs.into_iter().cycle() {
                for _ in 0..len {
                    let byte = if random {
                        testdata::splitmix64(&mut state) as u8
                    } else {
                        b
                    };
                    page.push(byte);
                }
                if page.len() >= PAGE_SIZE {
                    break;
                }
            }
            page.truncate(PAGE_SIZE);
            page
        }),
        prop::collection::vec(any::<u8>(), PAGE_SIZE),
    ]
}

/// What the engine does with a page; decoding its output must give the page back.
fn encode(enc: &mut PageEncoder, page: &[u8], out: &mut Vec<u8>) -> (Codec, Vec<u8>) {
    if is_zero(page) {
        (Codec::Zero, Vec::new())
    } else if enc.should_try() && enc.compress(page, out) == Codec::Lz4 {
        (Codec::Lz4, out.clone())
    } else {
        (Codec::Raw, page.to_vec())
    }
}

proptest! {
    #[test]
    fn pages_round_trip(pages in prop::collection::vec(page(), 1..16), probe in any::<bool>()) {
        let mut enc = PageEncoder::new(EncoderConfig { probe, ..Default::default() });
        let mut out = Vec::new();
        let mut back = vec![0u8; PAGE_SIZE];
        for page in &pages {
            let (codec, payload) = encode(&mut enc, page, &mut out);
            if codec == Codec::Lz4 {
                prop_assert!(payload.len() <= EncoderConfig::default().lz4_bytes_max);
            }
            decode(codec, &payload, &mut back).unwrap();
            prop_assert_eq!(&back, page);
        }
        let stats = enc.stats();
        prop_assert!(stats.hits <= stats.attempts);
        prop_assert!(stats.probe_rejects <= stats.attempts - stats.hits);
    }

    #[test]
    fn compress_always_round_trips_when_lz4(page in page()) {
        let mut enc = PageEncoder::new(EncoderConfig { probe: false, ..Default::default() });
        let mut out = Vec::new();
        if enc.compress(&page, &mut out) == Codec::Lz4 {
            let mut back = vec![0u8; PAGE_SIZE];
            decode(Codec::Lz4, &out, &mut back).unwrap();
            prop_assert_eq!(back, page);
        }
    }

    #[test]
    fn is_zero_matches_naive(mut page in page(), start in 0..16usize, cut in 0..16usize) {
        let end = page.len() - cut;
        let naive = page[start..end].iter().all(|&b| b == 0);
        prop_assert_eq!(is_zero(&page[start..end]), naive);
        prop_assert_eq!(is_zero_guest(&VolatileSlice::from(&mut page[start..end])), naive);
    }

    #[test]
    fn decode_never_panics(
        id in any::<u8>(),
        payload in prop::collection::vec(any::<u8>(), 0..PAGE_SIZE + 64),
    ) {
        let mut out = vec![0u8; PAGE_SIZE];
        if let Ok(codec) = Codec::try_from(id) {
            let _ = decode(codec, &payload, &mut out);
        }
    }

    #[test]
    fn decode_of_mutated_lz4_never_panics(
        mut seed in any::<u64>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut payload = lz4_flex::block::compress(&testdata::text_page(&mut seed));
        for (at, b) in flips {
            let i = at.index(payload.len());
            payload[i] = b;
        }
        let mut out = vec![0u8; PAGE_SIZE];
        let _ = decode(Codec::Lz4, &payload, &mut out);
    }
}
