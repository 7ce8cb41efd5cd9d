//! Criterion benches of the per-page kernels, reported in bytes per second.
//!
//! Run: `cargo bench -p ferry-compress --bench codecs`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry_compress::{
    decode, is_zero, is_zero_guest, Codec, EncoderConfig, PageEncoder, PAGE_SIZE,
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

criterion_group!(benches, bench_is_zero, bench_compress, bench_decode);
criterion_main!(benches);
