//! Criterion bench of the per-page CRC32C over guest memory, in bytes per
//! second: the folded (AVX-512 VPCLMULQDQ) kernel where the CPU has it, the
//! `crc32c` crate's three-lane SSE4.2 kernel for comparison.
//!
//! Run: `cargo bench -p ferry-engine --bench crc`.
//!
//! `hot` checksums the same 256 KiB (a frame's pages, in cache); `cold`
//! walks 1 GiB page by page, so every page comes from DRAM, as the source's
//! bulk round reads guest memory.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry_engine::wire::crc::crc32c_guest;
use vm_memory::VolatileSlice;

const PAGE: usize = 4096;

/// Page-aligned bytes with incompressible content.
fn buffer(bytes: usize) -> Vec<u8> {
    // Over-allocate by a page and start at the first aligned page.
    let mut v = vec![0u8; bytes + PAGE];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    v
}

fn aligned(v: &mut [u8], bytes: usize) -> &mut [u8] {
    let off = v.as_ptr().align_offset(PAGE);
    &mut v[off..off + bytes]
}

fn bench(c: &mut Criterion, name: &str, bytes: usize) {
    let mut storage = buffer(bytes);
    let mem = aligned(&mut storage, bytes);
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("folded (crc32c_guest)", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for page in mem.chunks_mut(PAGE) {
                acc ^= crc32c_guest(&VolatileSlice::from(page));
            }
            black_box(acc)
        })
    });
    g.bench_function("sse4.2 (crc32c crate)", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for page in mem.chunks(PAGE) {
                acc ^= crc32c::crc32c(page);
            }
            black_box(acc)
        })
    });
    g.finish();
}

fn crc(c: &mut Criterion) {
    bench(c, "crc_hot_256k", 256 << 10);
    bench(c, "crc_cold_1g", 1 << 30);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = crc
}
criterion_main!(benches);
