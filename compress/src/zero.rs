//! Zero-page detection, the check every dirty page goes through.
//!
//! This module holds the crate's only `unsafe`: volatile reads of guest memory.

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// Bytes OR-ed together before each early-exit test. Small enough that a
/// non-zero page usually exits after one block, large enough that the test
/// branch costs little against the loads (32 u64 words = 4 AVX2 / 16 SSE2 ORs).
const BLOCK_BYTES: usize = 256;

/// Words read from guest memory between early-exit tests in [`is_zero_guest`].
const GUEST_BLOCK_WORDS: usize = 16;

/// Whether every byte of `page` is zero. Works on any length; word-wise and
/// vectorisable, exits at the first non-zero 256-byte block.
pub fn is_zero(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(BLOCK_BYTES);
    // A byte-wise OR over a fixed-size block is the form LLVM turns into
    // unrolled vector ORs; one test per block keeps the exit cheap.
    if blocks.any(|block| block.iter().fold(0u8, |acc, &b| acc | b) != 0) {
        return false;
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Whether every byte of `page` is zero, reading guest memory that a running
/// guest may write concurrently.
///
/// Only volatile reads (u64 words where aligned, bytes at unaligned edges); no
/// `&[u8]` to guest memory is ever formed, because the guest may change it under
/// us. Exits at the first non-zero word. The answer describes the page at some
/// instant during the scan; the caller must re-check a page copied later (the
/// dirty log catches any write made after this scan).
pub fn is_zero_guest<B: BitmapSlice>(page: &VolatileSlice<'_, B>) -> bool {
    let guard = page.ptr_guard();
    let base = guard.as_ptr();
    let len = guard.len();
    let head = base.align_offset(8).min(len);
    let words = (len - head) / 8;
    let tail = len - head - words * 8;

    // SAFETY: `page` guarantees `[base, base + len)` is mapped and readable for as
    // long as `guard` lives; both callers below pass `from + count <= len`. Volatile
    // reads are the rust-vmm convention for memory the guest may write concurrently.
    let bytes_zero = |from: usize, count: usize| unsafe {
        (from..from + count).all(|i| core::ptr::read_volatile(base.add(i)) == 0)
    };
    if !bytes_zero(0, head) {
        return false;
    }

    // SAFETY: `base + head` is in bounds (head <= len) and 8-byte aligned by the
    // choice of `head` (or `head == len` and `words == 0`).
    let word_base = unsafe { base.add(head) }.cast::<u64>();
    let mut word = 0;
    while word < words {
        let end = (word + GUEST_BLOCK_WORDS).min(words);
        let mut acc = 0u64;
        for i in word..end {
            // SAFETY: `i < words`, so the word lies within `[base + head, base + len)`;
            // it is aligned because `word_base` is; read volatile as above.
            acc |= unsafe { core::ptr::read_volatile(word_base.add(i)) };
        }
        if acc != 0 {
            return false;
        }
        word = end;
    }
    bytes_zero(head + words * 8, tail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;

    fn guest(bytes: &mut [u8]) -> VolatileSlice<'_> {
        VolatileSlice::from(bytes)
    }

    #[test]
    fn zero_page_is_zero() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        assert!(is_zero_guest(&guest(&mut page)));
    }

    #[test]
    fn any_single_non_zero_byte_is_found() {
        let mut page = vec![0u8; PAGE_SIZE];
        for i in 0..PAGE_SIZE {
            page[i] = 0x80;
            assert!(!is_zero(&page), "byte {i}");
            assert!(!is_zero_guest(&guest(&mut page)), "byte {i}");
            page[i] = 0;
        }
    }

    #[test]
    fn unaligned_and_odd_lengths() {
        let mut buf = [0u8; 3 * 64 + 5];
        for start in 0..9 {
            for end in start..buf.len() {
                assert!(is_zero(&buf[start..end]));
                assert!(is_zero_guest(&guest(&mut buf[start..end])));
                if end > start {
                    buf[end - 1] = 1;
                    assert!(!is_zero(&buf[start..end]));
                    assert!(!is_zero_guest(&guest(&mut buf[start..end])));
                    buf[end - 1] = 0;
                }
            }
        }
    }
}
