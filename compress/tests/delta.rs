//! Property tests of the XOR delta codec and the delta cache against naive
//! oracles: the encoder against a byte-by-byte reference encoder, the strict
//! decoder against a byte-by-byte reference decoder on valid and mutated
//! deltas, and the cache against a model of the receiver's memory.

use std::collections::HashMap;

use ferry_compress::{
    decode_delta, xor_decode, xor_encode, Codec, DeltaCache, DeltaOutcome, PAGE_SIZE,
    PAYLOAD_BYTES_MAX,
};
use proptest::prelude::*;

#[path = "../src/testdata.rs"]
mod testdata;

/// Gaps of fewer unchanged bytes than this are sent inside a run.
const GAP_BYTES_MIN: usize = 3;

fn uleb(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let byte = (value & 0x7F) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// The reference encoder: group the changed bytes into runs whose inner gaps
/// are shorter than GAP_BYTES_MIN, one record per run.
fn oracle_encode(old: &[u8], new: &[u8], limit: usize) -> Option<Vec<u8>> {
    let changed: Vec<usize> = (0..PAGE_SIZE).filter(|&i| old[i] != new[i]).collect();
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &i in &changed {
        match runs.last_mut() {
            Some((_, end)) if i - *end < GAP_BYTES_MIN => *end = i + 1,
            _ => runs.push((i, i + 1)),
        }
    }
    let mut delta = Vec::new();
    let mut pos = 0;
    for (start, end) in runs {
        uleb(&mut delta, start - pos);
        uleb(&mut delta, end - start);
        delta.extend_from_slice(&new[start..end]);
        pos = end;
    }
    (delta.len() <= limit.min(PAYLOAD_BYTES_MAX)).then_some(delta)
}

/// Reads a ULEB128 of any length; `None` if truncated. Returns the value
/// (saturated) and the bytes read.
fn read_uleb(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate() {
        if i < 9 {
            value |= u64::from(b & 0x7F) << (7 * i);
        } else {
            value = u64::MAX;
        }
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// The reference decoder, rule by rule from the module doc.
fn oracle_decode(delta: &[u8], base: &[u8]) -> Option<Vec<u8>> {
    if delta.len() > PAYLOAD_BYTES_MAX {
        return None;
    }
    let mut page = base.to_vec();
    let (mut i, mut pos, mut first) = (0, 0u64, true);
    while i < delta.len() {
        let mut fields = [0u64; 2];
        for field in &mut fields {
            let (value, n) = read_uleb(&delta[i..])?;
            let overlong = n > 1 && delta[i + n - 1] == 0;
            if n > 2 || overlong {
                return None;
            }
            *field = value;
            i += n;
        }
        let [skip, len] = fields;
        if len == 0 || (skip == 0 && !first) {
            return None;
        }
        let start = pos + skip;
        if start + len > PAGE_SIZE as u64 || i + len as usize > delta.len() {
            return None;
        }
        for k in 0..len as usize {
            page[start as usize + k] = delta[i + k];
        }
        i += len as usize;
        pos = start + len;
        first = false;
    }
    Some(page)
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut bytes = testdata::random_page(&mut state);
    bytes.truncate(len);
    bytes
}

/// One record, valid or not: fields near the edges of the rules (0, the
/// varint width change, the page size, the varint limit), sometimes spelled
/// with a redundant zero byte, sometimes missing changed bytes.
fn record() -> impl Strategy<Value = Vec<u8>> {
    let field = || {
        prop_oneof![
            6 => 0..4usize,
            2 => 120..136usize,
            1 => 4090..4100usize,
            1 => Just(16383usize),
            1 => Just(16384usize),
        ]
    };
    let overlong = prop::bool::weighted(0.1);
    let missing = prop_oneof![8 => Just(0usize), 1 => 1..3usize];
    (field(), field(), overlong, any::<u64>(), missing).prop_map(
        |(skip, len, overlong, seed, missing)| {
            let mut record = Vec::new();
            uleb(&mut record, skip);
            if overlong {
                *record.last_mut().unwrap() |= 0x80;
                record.push(0);
            }
            uleb(&mut record, len);
            record.extend(random_bytes(
                seed,
                len.min(PAGE_SIZE + 8).saturating_sub(missing),
            ));
            record
        },
    )
}

/// Base pages: zero, text-like, random.
fn base_page() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(vec![0u8; PAGE_SIZE]),
        any::<u64>().prop_map(|mut seed| testdata::text_page(&mut seed)),
        any::<u64>().prop_map(|mut seed| testdata::random_page(&mut seed)),
    ]
}

/// How a page changes between two sends.
#[derive(Clone, Debug)]
enum Change {
    None,
    /// A few bytes set (possibly to their old value).
    Bytes(Vec<(usize, u8)>),
    /// Runs of random bytes: (start, len, seed).
    Runs(Vec<(usize, usize, u64)>),
    /// Every byte flipped.
    All,
    /// One byte in every `n`, a worst case for run merging.
    Stride(usize),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        Just(Change::None),
        prop::collection::vec((0..PAGE_SIZE, any::<u8>()), 1..16).prop_map(Change::Bytes),
        prop::collection::vec((0..PAGE_SIZE, 1..600usize, any::<u64>()), 1..6)
            .prop_map(Change::Runs),
        Just(Change::All),
        (1..8usize).prop_map(Change::Stride),
    ]
}

fn apply(change: &Change, page: &mut [u8]) {
    match change {
        Change::None => {}
        Change::Bytes(sets) => sets.iter().for_each(|&(i, b)| page[i] = b),
        Change::Runs(runs) => {
            for &(start, len, seed) in runs {
                let end = (start + len).min(PAGE_SIZE);
                page[start..end].copy_from_slice(&random_bytes(seed, end - start));
            }
        }
        Change::All => page.iter_mut().for_each(|b| *b = !*b),
        Change::Stride(n) => page.iter_mut().step_by(*n).for_each(|b| *b ^= 0x5A),
    }
}

proptest! {
    #[test]
    fn encode_matches_oracle_and_round_trips(
        old in base_page(),
        change in change(),
        limit in prop_oneof![Just(usize::MAX), 0..PAGE_SIZE + 16],
        prefix in prop::collection::vec(any::<u8>(), 0..4),
    ) {
        let mut new = old.clone();
        apply(&change, &mut new);
        let mut out = prefix.clone();
        let got = xor_encode(&old, &new, &mut out, limit);
        let want = oracle_encode(&old, &new, limit);
        prop_assert_eq!(&out[..prefix.len()], &prefix[..]);
        match want {
            Some(delta) => {
                prop_assert_eq!(got, Some(delta.len()));
                prop_assert_eq!(&out[prefix.len()..], &delta[..]);
                let mut back = old.clone();
                xor_decode(&delta, &mut back).unwrap();
                prop_assert_eq!(back, new);
            }
            None => {
                prop_assert_eq!(got, None);
                prop_assert_eq!(out.len(), prefix.len());
            }
        }
    }

    #[test]
    fn decoder_matches_oracle_on_mutated_deltas(
        old in base_page(),
        change in change(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<Option<prop::sample::Index>>(),
        tail in prop::collection::vec(any::<u8>(), 0..4),
    ) {
        let mut new = old.clone();
        apply(&change, &mut new);
        let mut delta = oracle_encode(&old, &new, usize::MAX).unwrap_or_default();
        if !delta.is_empty() {
            for (at, b) in flips {
                let i = at.index(delta.len());
                delta[i] = b;
            }
            if let Some(cut) = cut {
                delta.truncate(cut.index(delta.len()));
            }
        }
        delta.extend_from_slice(&tail);
        let mut page = old.clone();
        match (xor_decode(&delta, &mut page), oracle_decode(&delta, &old)) {
            (Ok(()), Some(want)) => prop_assert_eq!(page, want),
            (Err(_), None) => prop_assert_eq!(page, old, "page written on error"),
            (got, want) => prop_assert!(false, "decoder {:?}, oracle {:?}", got, want.is_some()),
        }
    }

    #[test]
    fn decoder_matches_oracle_on_arbitrary_records(
        records in prop::collection::vec(record(), 0..6),
        fill in any::<u8>(),
    ) {
        let delta = records.concat();
        let base = vec![fill; PAGE_SIZE];
        let mut page = base.clone();
        match (xor_decode(&delta, &mut page), oracle_decode(&delta, &base)) {
            (Ok(()), Some(want)) => prop_assert_eq!(page, want),
            (Err(_), None) => prop_assert_eq!(page, base, "page written on error"),
            (got, want) => prop_assert!(false, "decoder {:?}, oracle {:?}", got, want.is_some()),
        }
    }

    #[test]
    fn decoder_matches_oracle_on_arbitrary_bytes(
        delta in prop::collection::vec(any::<u8>(), 0..64),
        fill in any::<u8>(),
    ) {
        let base = vec![fill; PAGE_SIZE];
        let mut page = base.clone();
        let got = xor_decode(&delta, &mut page);
        prop_assert_eq!(got.is_ok(), oracle_decode(&delta, &base).is_some());
        let mut lz4 = base.clone();
        let _ = decode_delta(Codec::XorLz4, &delta, &mut lz4);
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// The page changes and goes through the cache.
    Encode {
        pfn: u64,
        change: Change,
        limit: usize,
    },
    /// The page changes and is sent some other way.
    Forget { pfn: u64, change: Change },
    /// The receiver's memory is lost track of.
    Clear,
}

/// A few hot pages, encoded again and again, and more that evict each other.
fn pfn() -> impl Strategy<Value = u64> {
    prop_oneof![0..4u64, 0..48u64]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (pfn(), change(), prop_oneof![Just(PAGE_SIZE), 0..PAGE_SIZE])
            .prop_map(|(pfn, change, limit)| Op::Encode { pfn, change, limit }),
        1 => (pfn(), change()).prop_map(|(pfn, change)| Op::Forget { pfn, change }),
        1 => Just(Op::Clear),
    ]
}

proptest! {
    /// Whatever the sequence, a delta applied to what the receiver holds
    /// gives exactly the page the sender encoded.
    #[test]
    fn cache_mirrors_the_receiver(
        capacity_pages in prop::sample::select(vec![0usize, 1, 5, 16, 32, 64]),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut cache = DeltaCache::new(capacity_pages * PAGE_SIZE);
        let mut source: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut receiver: HashMap<u64, Vec<u8>> = HashMap::new();
        let (mut encodes, mut delta_bytes) = (0, 0);
        let mut out = Vec::new();
        for op in ops {
            match op {
                Op::Encode { pfn, change, limit } => {
                    let page = source
                        .entry(pfn)
                        .or_insert_with(|| random_bytes(pfn, PAGE_SIZE));
                    apply(&change, page);
                    out.clear();
                    encodes += 1;
                    match cache.encode(pfn, page, &mut out, limit) {
                        DeltaOutcome::Delta { codec, len } => {
                            prop_assert!(codec.is_delta());
                            prop_assert_eq!(len, out.len());
                            prop_assert!(len <= limit.min(PAYLOAD_BYTES_MAX));
                            delta_bytes += len as u64;
                            let held = receiver.get_mut(&pfn);
                            prop_assert!(held.is_some(), "hit for a page never sent");
                            let held = held.unwrap();
                            decode_delta(codec, &out, held).unwrap();
                            prop_assert_eq!(&held[..], &page[..]);
                        }
                        DeltaOutcome::Miss | DeltaOutcome::Overflow => {
                            prop_assert!(out.is_empty());
                            receiver.insert(pfn, page.clone());
                        }
                    }
                    prop_assert!(capacity_pages == 0 || cache.contains(pfn));
                }
                Op::Forget { pfn, change } => {
                    let page = source
                        .entry(pfn)
                        .or_insert_with(|| random_bytes(pfn, PAGE_SIZE));
                    apply(&change, page);
                    receiver.insert(pfn, page.clone());
                    cache.forget(pfn);
                    prop_assert!(!cache.contains(pfn));
                }
                Op::Clear => {
                    for page in receiver.values_mut() {
                        page.fill(0xEE);
                    }
                    cache.clear();
                }
            }
        }
        let s = cache.stats();
        prop_assert_eq!(s.hits + s.misses, encodes);
        prop_assert_eq!(s.hits, s.pages + s.overflows);
        prop_assert_eq!(s.bytes, delta_bytes);
        prop_assert_eq!(s.cache_bytes, cache.capacity_bytes() as u64);
    }
}

/// A hot set that fits the cache hits on every round after the first.
#[test]
fn hot_set_that_fits_hits_after_warm_up() {
    let mut cache = DeltaCache::new(256 * PAGE_SIZE);
    let mut state = 5;
    let hot: Vec<u64> = (0..128)
        .map(|_| testdata::splitmix64(&mut state) >> 24)
        .collect();
    let mut pages: HashMap<u64, Vec<u8>> = hot
        .iter()
        .map(|&p| (p, random_bytes(p, PAGE_SIZE)))
        .collect();
    let mut out = Vec::new();
    for round in 0..6 {
        let mut hits = 0;
        for &pfn in &hot {
            let page = pages.get_mut(&pfn).unwrap();
            page[round * 64..round * 64 + 300].fill(round as u8);
            out.clear();
            if let DeltaOutcome::Delta { .. } = cache.encode(pfn, page, &mut out, PAGE_SIZE) {
                hits += 1;
            }
        }
        assert_eq!(
            hits,
            if round == 0 { 0 } else { hot.len() },
            "round {round}"
        );
    }
    let s = cache.stats();
    assert_eq!(
        (s.misses, s.evictions, s.overflows),
        (hot.len() as u64, 0, 0)
    );
    // ~300 changed bytes a page: deltas of a few hundred bytes or less.
    assert!(s.bytes / s.pages < 400, "{s:?}");
}
