//! A cheap guess whether LZ4 is worth running on a page.
//!
//! LZ4 on a page of random bytes costs about as much as on a compressible one
//! and saves nothing. The probe looks at 256 sampled bytes (16 runs of 16
//! bytes, one every 256 bytes) and counts distinct byte values, the first test
//! of the Linux btrfs compression heuristic. Uniformly random bytes give
//! 256 * (1 - (255/256)^256) ≈ 162 distinct values (standard deviation ≈ 5);
//! text, code, pointers and sparse data give far fewer. Above
//! [`DISTINCT_BYTES_MAX`] the page is called incompressible.
//!
//! Blind spot: a page made of one high-entropy block repeated (LZ4 compresses
//! it, the histogram looks random). Such pages are rare in guest memory and
//! cost only their compression, never correctness.

use crate::PAGE_SIZE;

/// Bytes per sampled run; 16 so each run is one unaligned 128-bit load.
const RUN_BYTES: usize = 16;
/// Distance between sampled runs: 4096 / 256 = 16 runs = 256 sampled bytes.
const RUN_STRIDE: usize = 256;
/// Distinct sampled byte values above which a page is called incompressible:
/// 4 standard deviations below the random mean of ≈ 162, so random pages are
/// caught almost always, and data using over half of all byte values in a
/// 256-byte sample rarely compresses to 7/8 anyway.
const DISTINCT_BYTES_MAX: u32 = 140;

/// Whether `page` looks incompressible. Cost: 256 byte loads and table updates.
pub(crate) fn looks_incompressible(page: &[u8]) -> bool {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    // Stores only in the loop (no read-modify-write chain through `seen`), and
    // one vectorised sum at the end.
    let mut seen = [0u8; 256];
    for run in page.chunks_exact(RUN_STRIDE) {
        for &byte in &run[..RUN_BYTES] {
            seen[usize::from(byte)] = 1;
        }
    }
    let distinct: u32 = seen.iter().map(|&s| u32::from(s)).sum();
    distinct > DISTINCT_BYTES_MAX
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_pages_look_incompressible() {
        let mut state = 7u64;
        for _ in 0..1000 {
            let page = crate::testdata::random_page(&mut state);
            assert!(looks_incompressible(&page));
        }
    }

    #[test]
    fn text_and_sparse_pages_look_compressible() {
        let mut state = 7u64;
        for _ in 0..100 {
            assert!(!looks_incompressible(&crate::testdata::text_page(
                &mut state
            )));
        }
        let mut sparse = vec![0u8; PAGE_SIZE];
        sparse[100] = 1;
        assert!(!looks_incompressible(&sparse));
    }
}
