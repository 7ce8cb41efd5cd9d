//! Comparison kernels of the XOR encoder: where the next changed byte is, and
//! where a changed run ends. Safe code written so LLVM vectorises it (SSE2 on
//! every x86-64, NEON on aarch64); no `unsafe`, no runtime feature detection.

use crate::PAGE_SIZE;

/// Bytes compared per early-exit test while skipping unchanged bytes: 64 bytes
/// are 4 SSE2 (2 AVX2) XOR+OR pairs and one test, so the branch costs little
/// against the loads, and a change is located within one cache line.
const BLOCK_BYTES: usize = 64;

/// Unchanged bytes that end a changed run; shorter gaps are sent as part of
/// the run. Splitting a run at a gap of `g` unchanged bytes adds a record
/// header of at least 2 bytes (two 1-byte varints) and saves `g` bytes, so
/// splitting gaps of 1 or 2 bytes never pays, and merging them also means
/// fewer records to decode. At `g = 3` a split saves at least a byte.
pub(super) const GAP_BYTES_MIN: usize = 3;

const WORD_BYTES: usize = 8;
const ONES: u64 = u64::from_le_bytes([0x01; WORD_BYTES]);
const HIGHS: u64 = u64::from_le_bytes([0x80; WORD_BYTES]);

/// The little-endian u64 at `at`: byte `at` is the low byte, so
/// `trailing_zeros / 8` of an XOR of two words is the first differing byte.
#[inline(always)]
fn word(s: &[u8], at: usize) -> u64 {
    let mut w = [0u8; WORD_BYTES];
    w.copy_from_slice(&s[at..at + WORD_BYTES]);
    u64::from_le_bytes(w)
}

/// Whether any byte of `x` is zero. The classic bit trick: it can set a high
/// bit spuriously only above a byte that really is zero, so as a yes/no
/// answer it is exact.
#[inline(always)]
fn has_zero_byte(x: u64) -> bool {
    x.wrapping_sub(ONES) & !x & HIGHS != 0
}

#[inline(always)]
fn block_equal(a: &[u8; BLOCK_BYTES], b: &[u8; BLOCK_BYTES]) -> bool {
    // A byte-wise fold over a fixed-size block is the form LLVM unrolls into
    // vector XORs and ORs with one test at the end.
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Offset of the first byte at or after `from` where `old` and `new` differ.
pub(super) fn next_diff(old: &[u8], new: &[u8], from: usize) -> Option<usize> {
    debug_assert_eq!(old.len(), new.len());
    let (old, new) = (&old[from..], &new[from..]);
    let (old_blocks, _) = old.as_chunks::<BLOCK_BYTES>();
    let (new_blocks, _) = new.as_chunks::<BLOCK_BYTES>();
    let equal_blocks = old_blocks
        .iter()
        .zip(new_blocks)
        .take_while(|(a, b)| block_equal(a, b))
        .count();
    // Either inside the first differing block or in the sub-block tail.
    let mut i = equal_blocks * BLOCK_BYTES;
    while i + WORD_BYTES <= old.len() {
        let x = word(old, i) ^ word(new, i);
        if x != 0 {
            return Some(from + i + x.trailing_zeros() as usize / 8);
        }
        i += WORD_BYTES;
    }
    (i..old.len()).find(|&j| old[j] != new[j]).map(|j| from + j)
}

/// End (exclusive) of the changed run that starts at `start`, where
/// `old[start] != new[start]`: the first changed byte not followed by another
/// within [`GAP_BYTES_MIN`] bytes, plus one. Unchanged bytes at the page end
/// are not part of the run.
///
/// Scans no further than `bound` (at most [`PAGE_SIZE`]): returns `None` if
/// the run has not ended by `bound < PAGE_SIZE`, which guarantees the run is
/// longer than `bound - start - GAP_BYTES_MIN` bytes.
pub(super) fn run_end(old: &[u8], new: &[u8], start: usize, bound: usize) -> Option<usize> {
    debug_assert!(old.len() == PAGE_SIZE && new.len() == PAGE_SIZE);
    debug_assert!(start < bound && bound <= PAGE_SIZE);
    debug_assert_ne!(old[start], new[start]);
    let mut i = start + 1;
    // Unchanged bytes just before `i`.
    let mut gap = 0;
    while i < bound {
        // Fast path through a changed stretch: 8 changed bytes at a time.
        if gap == 0 && i + WORD_BYTES <= bound && !has_zero_byte(word(old, i) ^ word(new, i)) {
            i += WORD_BYTES;
            continue;
        }
        if old[i] == new[i] {
            gap += 1;
            if gap == GAP_BYTES_MIN {
                return Some(i + 1 - GAP_BYTES_MIN);
            }
        } else {
            gap = 0;
        }
        i += 1;
    }
    (bound == PAGE_SIZE).then_some(PAGE_SIZE - gap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn has_zero_byte_is_exact() {
        for pos in 0..8 {
            for other in [0x01u8, 0x7F, 0x80, 0xFF] {
                let mut bytes = [other; 8];
                assert!(!has_zero_byte(u64::from_le_bytes(bytes)));
                bytes[pos] = 0;
                assert!(has_zero_byte(u64::from_le_bytes(bytes)), "{bytes:?}");
            }
        }
        // The trick's spurious bits appear only above a real zero byte.
        assert!(has_zero_byte(0x0100));
        assert!(!has_zero_byte(0x0101_0101_0101_0101));
    }

    #[test]
    fn next_diff_finds_every_position() {
        let old = vec![7u8; PAGE_SIZE];
        assert_eq!(next_diff(&old, &old, 0), None);
        for at in [0, 1, 7, 8, 63, 64, 65, 1000, PAGE_SIZE - 9, PAGE_SIZE - 1] {
            let mut new = old.clone();
            new[at] = 8;
            for from in [0, at.saturating_sub(1), at] {
                assert_eq!(next_diff(&old, &new, from), Some(at), "at {at} from {from}");
            }
            assert_eq!(next_diff(&old, &new, at + 1), None);
        }
    }

    #[test]
    fn run_end_merges_short_gaps_and_drops_trailing_equal_bytes() {
        let old = vec![0u8; PAGE_SIZE];
        let mut new = old.clone();
        new[10..20].fill(1);
        new[22] = 1; // gap of 2: merged
        new[26] = 1; // gap of 3: ends the run
        assert_eq!(run_end(&old, &new, 10, PAGE_SIZE), Some(23));
        assert_eq!(run_end(&old, &new, 26, PAGE_SIZE), Some(27));
        new[PAGE_SIZE - 3] = 1; // unchanged 2 bytes at the page end
        assert_eq!(
            run_end(&old, &new, PAGE_SIZE - 3, PAGE_SIZE),
            Some(PAGE_SIZE - 2)
        );
        new.fill(1);
        assert_eq!(run_end(&old, &new, 0, PAGE_SIZE), Some(PAGE_SIZE));
        assert_eq!(run_end(&old, &new, 0, 100), None);
    }
}
