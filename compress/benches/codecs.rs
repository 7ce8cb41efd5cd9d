//! Criterion benches of the per-page kernels, reported in bytes per second.
//!
//! Run: `cargo bench -p ferry-compress --bench codecs` (add a filter such as
//! `-- xor` for one family).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry_compress::{
    decode, decode_delta, is_zero, is_zero_guest, xor_encode, Codec, DeltaCache, DeltaOutcome,
    EncoderConfig, PageEncoder, PAGE_SIZE, PAYLOAD_BYTES_MAX,
};
use vm_memory::VolatileSlice;

#[path = "../src/testdata.rs"]
mod testdata;

/// Pages per batch: 256 pages = 1 MiB, so the branch predictor cannot learn a
/// single page and the numbers include L2/L3 misses like a real page walk.
const BATCH_PAGES: usize = 256;
const BATCH_BYTES: u64 = (BATCH_PAGES * PAGE_SIZE) as u64;

fn pages(make: fn(&mut u64) -> Vec<u8>) -> Vec<Vec<u8>> {
    let mut state = 42;
    (0..BATCH_PAGES).map(|_| make(&mut state)).collect()
}

fn zero_pages(_: &mut u64) -> Vec<u8> {
    vec![0; PAGE_SIZE]
}

/// Zero but for the last byte: the worst case of a non-zero page.
fn last_byte_pages(_: &mut u64) -> Vec<u8> {
    let mut page = vec![0; PAGE_SIZE];
    page[PAGE_SIZE - 1] = 1;
    page
}

fn bench_is_zero(c: &mut Criterion) {
    let mut g = c.benchmark_group("is_zero");
    g.throughput(Throughput::Bytes(BATCH_BYTES));
    for (name, make) in [
        ("zero", zero_pages as fn(&mut u64) -> Vec<u8>),
        ("nonzero_last_byte", last_byte_pages),
        ("random", testdata::random_page),
    ] {
        let mut batch = pages(make);
        g.bench_function(name, |b| {
            b.iter(|| batch.iter().filter(|p| is_zero(black_box(p))).count())
        });
        g.bench_function(format!("guest_{name}"), |b| {
            b.iter(|| {
                batch
                    .iter_mut()
                    .map(|p| is_zero_guest(&VolatileSlice::from(black_box(&mut p[..]))))
                    .filter(|&zero| zero)
                    .count()
            })
        });
    }
    g.finish();
}

fn bench_compress(c: &mut Criterion) {
    let mut g = c.benchmark_group("compress");
    g.throughput(Throughput::Bytes(BATCH_BYTES));
    let mut mixed = pages(testdata::text_page);
    let mut state = 7;
    for (i, page) in mixed.iter_mut().enumerate() {
        // Half the pages random, in no pattern the backoff could follow.
        if testdata::splitmix64(&mut state) & 1 == 0 && i > 0 {
            *page = testdata::random_page(&mut state);
        }
    }
    let batches = [
        ("text", pages(testdata::text_page)),
        ("random", pages(testdata::random_page)),
        ("mixed", mixed),
    ];
    for (name, batch) in &batches {
        for probe in [false, true] {
            // Every page compressed: the cost of compress() alone.
            let cfg = EncoderConfig {
                probe,
                ..Default::default()
            };
            let mut enc = PageEncoder::new(cfg);
            let mut out = Vec::with_capacity(PAGE_SIZE);
            let id = format!("{name}/probe_{probe}");
            g.bench_function(&id, |b| {
                b.iter(|| {
                    batch
                        .iter()
                        .filter(|p| enc.compress(black_box(p), &mut out) == Codec::Lz4)
                        .count()
                })
            });
            // As the engine drives it: should_try() gates compress().
            let mut enc = PageEncoder::new(cfg);
            g.bench_function(format!("{id}/adaptive"), |b| {
                b.iter(|| {
                    batch
                        .iter()
                        .filter(|p| {
                            enc.should_try() && enc.compress(black_box(p), &mut out) == Codec::Lz4
                        })
                        .count()
                })
            });
        }
    }
    g.finish();
}

fn bench_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Bytes(BATCH_BYTES));
    let mut enc = PageEncoder::default();
    let lz4: Vec<Vec<u8>> = pages(testdata::text_page)
        .iter()
        .map(|p| {
            let mut out = Vec::new();
            assert_eq!(enc.compress(p, &mut out), Codec::Lz4);
            out
        })
        .collect();
    let raw = pages(testdata::random_page);
    let mut out = vec![0u8; PAGE_SIZE];
    for (name, codec, payloads) in [("lz4_text", Codec::Lz4, &lz4), ("raw", Codec::Raw, &raw)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                for p in payloads {
                    decode(codec, black_box(p), &mut out).unwrap();
                }
            })
        });
    }
    g.bench_function("zero", |b| {
        b.iter(|| {
            for _ in 0..BATCH_PAGES {
                decode(Codec::Zero, black_box(&[]), &mut out).unwrap();
            }
        })
    });
    g.finish();
}

/// New versions of `old` shaped like the writes of ferry's test guest: a
/// 64-byte header and one 256-byte slot at a random 256-byte boundary, filled
/// with random bytes (~300 bytes changed, a few by chance unchanged).
fn slot_writes(old: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut state = 9;
    old.iter()
        .map(|page| {
            let mut new = page.clone();
            let noise = testdata::random_page(&mut state);
            let slot = 256 * (1 + testdata::splitmix64(&mut state) as usize % 15);
            new[..64].copy_from_slice(&noise[..64]);
            new[slot..slot + 256].copy_from_slice(&noise[64..320]);
            new
        })
        .collect()
}

fn bench_xor(c: &mut Criterion) {
    let old = pages(testdata::text_page);
    let cases = [
        ("slot_300B", slot_writes(&old)),
        ("unchanged", old.clone()),
        ("full_overflow", pages(testdata::random_page)),
    ];
    let mut g = c.benchmark_group("xor_encode");
    g.throughput(Throughput::Bytes(BATCH_BYTES));
    let mut out = Vec::with_capacity(PAYLOAD_BYTES_MAX);
    for (name, new) in &cases {
        g.bench_function(*name, |b| {
            b.iter(|| {
                let mut bytes = 0;
                for (o, n) in old.iter().zip(new) {
                    out.clear();
                    bytes += xor_encode(black_box(o), black_box(n), &mut out, PAYLOAD_BYTES_MAX)
                        .unwrap_or(PAGE_SIZE);
                }
                bytes
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("xor_decode");
    g.throughput(Throughput::Bytes(BATCH_BYTES));
    for (name, new) in &cases[..2] {
        let deltas: Vec<Vec<u8>> = old
            .iter()
            .zip(new)
            .map(|(o, n)| {
                let mut delta = Vec::new();
                xor_encode(o, n, &mut delta, PAYLOAD_BYTES_MAX).expect("fits");
                delta
            })
            .collect();
        // Applying a delta again to its result changes nothing, so the pages
        // can be reused across iterations.
        let mut pages = old.clone();
        g.bench_function(*name, |b| {
            b.iter(|| {
                for (page, delta) in pages.iter_mut().zip(&deltas) {
                    decode_delta(Codec::Xor, black_box(delta), page).unwrap();
                }
            })
        });
    }
    g.finish();

    // The whole sender step, alternating versions so that every encode sees
    // ~300 changed bytes: on a hit (lookup, delta, LZ4 attempt, cache
    // update), and on a miss patched from fingerprints (hash 16 chunks,
    // compare, copy out the changed ones; no page copies kept).
    let mut g = c.benchmark_group("xor_cache");
    g.throughput(Throughput::Bytes(BATCH_BYTES));
    let new = slot_writes(&old);
    let versions = [&new, &old];
    let mut cache = DeltaCache::new(2 * BATCH_PAGES * PAGE_SIZE);
    let mut patcher = DeltaCache::new(0).with_fingerprints(BATCH_PAGES as u64);
    for (pfn, page) in old.iter().enumerate() {
        cache.encode(pfn as u64, page, &mut out, PAYLOAD_BYTES_MAX);
        patcher.fingerprint(pfn as u64, page);
    }
    for (name, sender) in [
        ("encode_slot_300B", &mut cache),
        ("patch_slot_300B", &mut patcher),
    ] {
        let mut turn = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                turn ^= 1;
                for (pfn, page) in versions[turn].iter().enumerate() {
                    out.clear();
                    let outcome =
                        sender.encode(pfn as u64, black_box(page), &mut out, PAYLOAD_BYTES_MAX);
                    debug_assert!(matches!(outcome, DeltaOutcome::Delta { .. }));
                }
            })
        });
        let stats = sender.stats();
        eprintln!(
            "xor_cache/{name}: {stats:?}, mean payload {} bytes",
            stats.bytes / stats.pages.max(1)
        );
    }
    g.finish();
    assert_eq!(
        cache.stats().misses,
        BATCH_PAGES as u64,
        "{:?}",
        cache.stats()
    );
}

criterion_group!(
    benches,
    bench_is_zero,
    bench_compress,
    bench_decode,
    bench_xor
);
criterion_main!(benches);
