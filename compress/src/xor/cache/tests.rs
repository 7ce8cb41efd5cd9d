use super::*;
use crate::decode_delta;
use crate::testdata::{random_page, splitmix64, text_page};

const PAGES: usize = 64;

fn cache(pages: usize) -> DeltaCache {
    DeltaCache::new(pages * PAGE_SIZE)
}

fn encode(cache: &mut DeltaCache, pfn: u64, new: &[u8], limit: usize) -> (DeltaOutcome, Vec<u8>) {
    let mut out = Vec::new();
    let outcome = cache.encode(pfn, new, &mut out, limit);
    match outcome {
        DeltaOutcome::Delta { len, .. } => assert_eq!(len, out.len()),
        _ => assert!(out.is_empty()),
    }
    (outcome, out)
}

fn cached(cache: &DeltaCache, pfn: u64) -> Option<&[u8]> {
    let store = cache.store.as_ref()?;
    let first = cache.set_of(pfn) * cache.ways;
    let way = store.tags[first..first + cache.ways]
        .iter()
        .position(|&t| t == pfn + 1)?;
    let slot = first + way;
    Some(&store.pages[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE])
}

#[test]
fn capacity_rounds_to_whole_sets() {
    for (bytes, pages) in [
        (0, 0),
        (PAGE_SIZE - 1, 0),
        (PAGE_SIZE, 1),
        (15 * PAGE_SIZE + 7, 15),
        (20 * PAGE_SIZE, 16),
        (1000 * PAGE_SIZE, 992),
    ] {
        let c = DeltaCache::new(bytes);
        assert_eq!(c.capacity_bytes(), pages * PAGE_SIZE, "{bytes} bytes");
        assert_eq!(c.stats().cache_bytes, (pages * PAGE_SIZE) as u64);
        assert!(c.store.is_none(), "allocated before first encode");
    }
}

#[test]
fn disabled_cache_always_misses_and_allocates_nothing() {
    let mut c = cache(0);
    for _ in 0..3 {
        assert_eq!(
            encode(&mut c, 1, &vec![1; PAGE_SIZE], 4096).0,
            DeltaOutcome::Miss
        );
    }
    c.forget(1);
    c.clear();
    assert!(!c.contains(1));
    assert!(c.store.is_none());
    assert_eq!(c.stats().misses, 3);
}

#[test]
fn miss_then_hit_decodes_to_the_new_page() {
    let mut c = cache(PAGES);
    let mut state = 1;
    let old = text_page(&mut state);
    assert_eq!(encode(&mut c, 7, &old, 4096).0, DeltaOutcome::Miss);
    assert!(c.contains(7));
    let mut new = old.clone();
    new[100..140].copy_from_slice(&random_page(&mut state)[..40]);
    let (outcome, out) = encode(&mut c, 7, &new, 4096);
    assert!(matches!(outcome, DeltaOutcome::Delta { codec: Codec::Xor, len } if len < 50));
    let mut back = old.clone();
    decode_delta(Codec::Xor, &out, &mut back).unwrap();
    assert_eq!(back, new);
    assert_eq!(cached(&c, 7), Some(&new[..]));

    // Unchanged since: the empty delta.
    let (outcome, out) = encode(&mut c, 7, &new, 0);
    assert_eq!(
        outcome,
        DeltaOutcome::Delta {
            codec: Codec::Xor,
            len: 0
        }
    );
    assert!(out.is_empty());
    let s = c.stats();
    assert_eq!((s.hits, s.misses, s.pages, s.overflows), (2, 1, 2, 0));
    assert_eq!(s.bytes, out.len() as u64 + 42);
}

#[test]
fn compressible_delta_goes_lz4() {
    let mut c = cache(PAGES);
    let mut state = 2;
    let old = random_page(&mut state);
    encode(&mut c, 3, &old, 4096);
    let mut new = old.clone();
    new[500..2500].copy_from_slice(&text_page(&mut state)[..2000]);
    let (outcome, out) = encode(&mut c, 3, &new, 4096);
    let DeltaOutcome::Delta {
        codec: Codec::XorLz4,
        len,
    } = outcome
    else {
        panic!("{outcome:?}");
    };
    assert!(len < 1000, "{len}");
    let mut back = old;
    decode_delta(Codec::XorLz4, &out, &mut back).unwrap();
    assert_eq!(back, new);
}

#[test]
fn lz4_can_rescue_a_delta_over_the_limit() {
    let mut c = cache(PAGES);
    let old = vec![0; PAGE_SIZE];
    encode(&mut c, 3, &old, 4096);
    let mut new = old.clone();
    new[..2000].fill(0xAB);
    assert!(matches!(
        encode(&mut c, 3, &new, 100).0,
        DeltaOutcome::Delta { codec: Codec::XorLz4, len } if len <= 100
    ));
}

#[test]
fn overflow_still_caches_the_new_page() {
    let mut c = cache(PAGES);
    let mut state = 3;
    let old = random_page(&mut state);
    encode(&mut c, 9, &old, 4096);
    let new = random_page(&mut state);
    assert_eq!(encode(&mut c, 9, &new, 4096).0, DeltaOutcome::Overflow);
    assert_eq!(cached(&c, 9), Some(&new[..]));

    // A delta of incompressible bytes just over the limit overflows too.
    let mut next = new.clone();
    next[..300].copy_from_slice(&random_page(&mut state)[..300]);
    assert_eq!(encode(&mut c, 9, &next, 302).0, DeltaOutcome::Overflow);
    assert_eq!(cached(&c, 9), Some(&next[..]));
    let mut last = next.clone();
    last[..300].copy_from_slice(&random_page(&mut state)[..300]);
    assert!(matches!(
        encode(&mut c, 9, &last, 303).0,
        DeltaOutcome::Delta { len: 303, .. }
    ));
    let s = c.stats();
    assert_eq!((s.hits, s.pages, s.overflows), (3, 1, 2));
}

#[test]
fn forget_and_clear_make_misses() {
    let mut c = cache(PAGES);
    let page = vec![1; PAGE_SIZE];
    for pfn in 0..10 {
        encode(&mut c, pfn, &page, 4096);
    }
    c.forget(4);
    c.forget(1000); // not cached: nothing happens
    assert!(!c.contains(4) && c.contains(5));
    assert_eq!(encode(&mut c, 4, &page, 4096).0, DeltaOutcome::Miss);
    assert!(matches!(
        encode(&mut c, 5, &page, 4096).0,
        DeltaOutcome::Delta { .. }
    ));
    c.clear();
    for pfn in 0..10 {
        assert!(!c.contains(pfn));
        assert_eq!(encode(&mut c, pfn, &page, 4096).0, DeltaOutcome::Miss);
    }
    assert_eq!(c.stats().evictions, 0);
}

#[test]
fn full_set_evicts() {
    let mut c = cache(WAYS);
    let page = vec![1; PAGE_SIZE];
    for pfn in 0..WAYS as u64 + 3 {
        encode(&mut c, pfn, &page, 4096);
    }
    assert_eq!(c.stats().evictions, 3);
    let held = (0..WAYS as u64 + 3).filter(|&p| c.contains(p)).count();
    assert_eq!(held, WAYS);
}

#[test]
fn victim_prefers_empty_then_dead_lru_then_mru() {
    let tags = [5, 0, 7, 8];
    let stamps = [10, 0, 30, 20];
    assert_eq!(victim(&tags, &stamps, 40, 100), 1);
    let tags = [5, 6, 7, 8];
    assert_eq!(
        victim(&tags, &[10, 40, 30, 20], 41, 100),
        1,
        "all alive: MRU"
    );
    assert_eq!(victim(&tags, &[10, 40, 30, 20], 41, 31), 0, "LRU dead");
    assert_eq!(victim(&tags, &[10, 40, 30, 20], 41, 0), 0, "plain LRU");
}

#[test]
fn reuse_mean_follows_distances() {
    let mut mean16 = 0;
    mean16 = reuse_mean(mean16, 100);
    assert_eq!(mean16, 1600);
    for _ in 0..200 {
        mean16 = reuse_mean(mean16, 1000);
    }
    assert!(
        (mean16 >> REUSE_MEAN_SHIFT).abs_diff(1000) <= 16,
        "{mean16}"
    );
}

/// Hit rate of hot pages per round: `hot` pages written each round, in frame
/// order with `cold` fresh pages, like a migration round over the dirty log.
fn hot_set_rates(
    c: &mut DeltaCache,
    hot: &[u64],
    cold: usize,
    rounds: usize,
    state: &mut u64,
) -> Vec<f64> {
    let page = vec![1; PAGE_SIZE];
    let mut out = Vec::new();
    (0..rounds)
        .map(|_| {
            let mut dirty: Vec<(u64, bool)> = hot.iter().map(|&p| (p, true)).collect();
            dirty.extend((0..cold).map(|_| (splitmix64(state) >> 20, false)));
            dirty.sort_unstable();
            let mut hits = 0;
            for (pfn, is_hot) in dirty {
                out.clear();
                let outcome = c.encode(pfn, &page, &mut out, 4096);
                hits += usize::from(is_hot && outcome != DeltaOutcome::Miss);
            }
            hits as f64 / hot.len() as f64
        })
        .collect()
}

fn mean(rates: &[f64]) -> f64 {
    rates.iter().sum::<f64>() / rates.len() as f64
}

/// The numbers in the module doc; asserts the policy beats LRU where LRU is
/// weak and matches it where it is strong.
#[test]
fn hot_set_hit_rates() {
    const CAPACITY: usize = 1024;
    println!("                  steady hot set     new hot set, rounds 2-4");
    println!("hot / capacity    this policy  LRU   this policy  LRU");
    for fraction in [0.5, 0.75, 1.0, 1.5, 2.0] {
        let n = (CAPACITY as f64 * fraction) as usize;
        let mut rates = [0.0; 4];
        for (k, adaptive) in [true, false].into_iter().enumerate() {
            let mut c = cache(CAPACITY);
            c.adaptive = adaptive;
            let mut state = 11;
            let hot: Vec<u64> = (0..n).map(|_| splitmix64(&mut state) >> 20).collect();
            let warm = hot_set_rates(&mut c, &hot, n / 10, 12, &mut state);
            rates[k] = mean(&warm[3..]);
            let hot: Vec<u64> = (0..n).map(|_| splitmix64(&mut state) >> 20).collect();
            let changed = hot_set_rates(&mut c, &hot, n / 10, 4, &mut state);
            rates[2 + k] = mean(&changed[1..]);
        }
        println!(
            "{fraction:>14}    {:>11.2}  {:.2}  {:>11.2}  {:.2}",
            rates[0], rates[1], rates[2], rates[3]
        );
        assert!(rates[0] >= rates[1] - 0.02, "{fraction}: {rates:?}");
        assert!(rates[2] >= rates[3] - 0.05, "{fraction}: {rates:?}");
        if fraction <= 0.5 {
            assert!(rates[0] > 0.95 && rates[2] > 0.9, "{fraction}: {rates:?}");
        } else {
            assert!(rates[0] > rates[1] + 0.15, "{fraction}: {rates:?}");
        }
    }
}

#[test]
fn remembered_pages_are_hits_later_and_count_as_neither() {
    let mut c = cache(PAGES);
    let mut state = 5;
    let first = text_page(&mut state);
    c.remember(9, &first);
    assert!(c.contains(9));
    assert_eq!(cached(&c, 9), Some(&first[..]));
    let s = c.stats();
    assert_eq!((s.hits, s.misses), (0, 0));
    let mut next = first.clone();
    next[7] ^= 0xff;
    let (outcome, out) = encode(&mut c, 9, &next, 4096);
    assert!(matches!(outcome, DeltaOutcome::Delta { .. }));
    let mut back = first.clone();
    decode_delta(Codec::Xor, &out, &mut back).unwrap();
    assert_eq!(back, next);
    // Remembering again replaces the version; a disabled cache ignores it.
    c.remember(9, &first);
    assert_eq!(cached(&c, 9), Some(&first[..]));
    let mut off = cache(0);
    off.remember(9, &first);
    assert!(!off.contains(9));
}

/// A receiver: applies what the sender's outcome says it sent.
fn receive(page: &mut [u8], outcome: DeltaOutcome, out: &[u8], new: &[u8]) {
    match outcome {
        DeltaOutcome::Delta { codec, .. } => decode_delta(codec, out, page).unwrap(),
        DeltaOutcome::Miss | DeltaOutcome::Overflow => page.copy_from_slice(new),
    }
}

#[test]
fn fingerprints_patch_the_changed_chunks_of_an_uncached_page() {
    // No content capacity: every encode misses the cache.
    let mut c = cache(0).with_fingerprints(16);
    assert!(c.enabled());
    let mut state = 11;
    let first = random_page(&mut state);
    // Unknown page: a miss, which records it.
    let (outcome, _) = encode(&mut c, 3, &first, 4096);
    assert_eq!(outcome, DeltaOutcome::Miss);
    assert!(c.contains(3));
    // Two bytes in chunk 0, one in chunk 9: chunks 0 and 9 go whole.
    let mut next = first.clone();
    next[1] ^= 1;
    next[200] ^= 1;
    next[9 * 256 + 17] ^= 1;
    let (outcome, out) = encode(&mut c, 3, &next, 4096);
    assert_eq!(
        outcome,
        DeltaOutcome::Delta {
            codec: Codec::Xor,
            len: 2 * 256 + 1 + 2 + 2 + 2
        }
    );
    let mut back = first.clone();
    receive(&mut back, outcome, &out, &next);
    assert_eq!(back, next);
    let s = c.stats();
    assert_eq!((s.hits, s.misses, s.patches, s.pages), (0, 2, 1, 1));
    assert_eq!(s.patch_bytes, out.len() as u64);
    // Unchanged: the empty patch.
    let (outcome, out) = encode(&mut c, 3, &next, 4096);
    assert_eq!(
        outcome,
        DeltaOutcome::Delta {
            codec: Codec::Xor,
            len: 0
        }
    );
    assert!(out.is_empty());
    // All changed: over the limit, a miss that still records the page.
    let other = random_page(&mut state);
    assert_eq!(encode(&mut c, 3, &other, 4096).0, DeltaOutcome::Miss);
    let mut last = other.clone();
    last[4095] ^= 0x80;
    let (outcome, out) = encode(&mut c, 3, &last, 4096);
    let mut back = other.clone();
    receive(&mut back, outcome, &out, &last);
    assert_eq!(back, last);
    assert_eq!(out.len(), 2 + 2 + 256);
    // Pages past the table have none; forget and clear drop them.
    assert_eq!(encode(&mut c, 16, &first, 4096).0, DeltaOutcome::Miss);
    assert_eq!(encode(&mut c, 16, &next, 4096).0, DeltaOutcome::Miss);
    c.forget(3);
    assert!(!c.contains(3));
    c.fingerprint(4, &first);
    assert!(c.contains(4));
    c.clear();
    assert!(!c.contains(4));
    // Without fingerprints, fingerprint() does nothing.
    let mut plain = cache(0);
    plain.fingerprint(4, &first);
    assert!(!plain.contains(4) && !plain.enabled());
}

#[test]
fn fingerprints_take_a_thirty_second_of_memory() {
    assert_eq!(DeltaCache::fingerprint_bytes(64), 64 * 128 + 8);
    assert_eq!(super::super::fingerprint::BYTES_PER_PAGE * 32, PAGE_SIZE);
}

proptest::proptest! {
    /// Any mix of cache hits, fingerprint patches, misses, forgets and
    /// clears keeps a receiver that applies what it is sent equal to the
    /// sender's page, and the counters add up.
    #[test]
    fn sender_and_receiver_agree_with_fingerprints(
        capacity in 0usize..24,
        steps in proptest::collection::vec((0u64..40, 0u8..6, proptest::num::u16::ANY, 0u64..1000), 1..200),
    ) {
        let pages = 32u64;
        let mut c = cache(capacity).with_fingerprints(pages);
        let mut state = 99;
        let mut sender: Vec<Vec<u8>> = (0..40).map(|_| random_page(&mut state)).collect();
        let mut receiver: Vec<Option<Vec<u8>>> = vec![None; 40];
        let mut calls = 0;
        for (pfn, action, at, seed) in steps {
            let p = pfn as usize;
            match action {
                // Change a few bytes, or a whole text page, then send.
                0..=3 => {
                    let mut s = seed;
                    if action == 3 {
                        sender[p] = text_page(&mut s);
                    } else {
                        for k in 0..=action as usize {
                            let i = (at as usize + k * 1031) % PAGE_SIZE;
                            sender[p][i] = sender[p][i].wrapping_add(1 + (s % 255) as u8);
                        }
                    }
                    let new = sender[p].clone();
                    let known = c.contains(pfn);
                    let (outcome, out) = encode(&mut c, pfn, &new, 2048);
                    calls += 1;
                    if receiver[p].is_none() {
                        // The receiver has nothing: no delta can be made.
                        proptest::prop_assert!(!known);
                        let delta = matches!(outcome, DeltaOutcome::Delta { .. });
                        proptest::prop_assert!(!delta);
                        receiver[p] = Some(new.clone());
                    } else {
                        let r = receiver[p].as_mut().unwrap();
                        receive(r, outcome, &out, &new);
                    }
                    proptest::prop_assert_eq!(receiver[p].as_ref().unwrap(), &new);
                }
                // Sent by another path: the cache must forget it.
                4 => {
                    c.forget(pfn);
                    receiver[p] = Some(sender[p].clone());
                }
                _ => {
                    if seed % 10 == 0 {
                        c.clear();
                    }
                }
            }
        }
        let s = c.stats();
        proptest::prop_assert_eq!(s.hits + s.misses, calls);
        proptest::prop_assert_eq!(s.hits + s.patches, s.pages + s.overflows);
        proptest::prop_assert!(s.patch_bytes <= s.bytes);
    }
}
