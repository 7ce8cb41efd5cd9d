//! CRC32C over guest memory, without a `&[u8]` over it and without a copy.
//!
//! A 4 KiB page is split into three lanes of 170, 170 and 172 u64 words,
//! read with volatile loads and fed to the SSE4.2 `crc32` instruction in one
//! interleaved loop (the instruction has a latency of 3 cycles and a
//! throughput of 1, so three independent lanes keep it busy), then the lanes
//! are joined with precomputed "shift by N zero bytes" tables:
//!
//! ```text
//!  reg(A || B) = shift_|B|(reg(A)) XOR reg_from_0(B)    (CRC registers are linear)
//! ```
//!
//! Other lengths, and CPUs without SSE4.2, copy through a 1 KiB stack buffer
//! into the `crc32c` crate. Either way a page a running guest writes
//! concurrently just yields a CRC that matches no consistent version (the
//! protocol treats it as a torn page; see the target's suspect set).

use std::sync::OnceLock;

use ferry_compress::PAGE_SIZE;
use vm_memory::VolatileSlice;

/// Bytes copied per step on the fallback path: 1 KiB stays in L1.
const STEP_BYTES: usize = 1024;
/// Words per lane: 170 + 170 + 172 = 512 words = 4096 bytes.
const LANE_WORDS: [usize; 3] = [170, 170, 172];

/// CRC32C of `mem`, which a running guest may write concurrently.
pub fn crc32c_guest(mem: &VolatileSlice<'_>) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if mem.len() == PAGE_SIZE && std::arch::is_x86_feature_detected!("sse4.2") {
        let guard = mem.ptr_guard();
        let ptr = guard.as_ptr();
        if (ptr as usize).is_multiple_of(8) {
            // SAFETY: `ptr` points at `PAGE_SIZE` bytes of live guest memory
            // (the slice's length, checked above), 8-byte aligned (checked),
            // kept mapped by `guard` for the duration of the call; the CPU
            // supports SSE4.2 (checked).
            return unsafe { page_sse42(ptr.cast::<u64>()) };
        }
    }
    crc32c_copying(mem)
}

/// Asks the CPU to start loading `mem` into the cache (a hint: it reads
/// nothing architecturally, so a racing guest write is no concern). The
/// hardware prefetchers stop at 4 KiB page boundaries; prefetching the next
/// page while the current one is checksummed hides that DRAM latency.
pub fn prefetch(mem: &VolatileSlice<'_>) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let guard = mem.ptr_guard();
        let base = guard.as_ptr();
        for off in (0..mem.len()).step_by(64) {
            // SAFETY: `off < len`, so the address lies inside the live
            // mapping `guard` keeps; a prefetch never faults or writes.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.add(off).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = mem;
}

fn crc32c_copying(mem: &VolatileSlice<'_>) -> u32 {
    let mut buf = [0u8; STEP_BYTES];
    let mut crc = 0u32;
    let mut off = 0;
    while off < mem.len() {
        let n = (mem.len() - off).min(STEP_BYTES);
        let part = mem.subslice(off, n).expect("range inside the slice");
        part.copy_to(&mut buf[..n]);
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        off += n;
    }
    crc
}

/// Tables that multiply a CRC register by x^(8n) mod P for one fixed n:
/// `shift(reg) = T[0][b0] ^ T[1][b1] ^ T[2][b2] ^ T[3][b3]`.
struct Shift([[u32; 256]; 4]);

impl Shift {
    #[cfg(target_arch = "x86_64")]
    fn apply(&self, reg: u32) -> u32 {
        let b = reg.to_le_bytes();
        self.0[0][b[0] as usize]
            ^ self.0[1][b[1] as usize]
            ^ self.0[2][b[2] as usize]
            ^ self.0[3][b[3] as usize]
    }

    /// Builds the tables for `bytes` zero bytes from the bit-serial
    /// definition of the CRC (no dependency on the instruction we check).
    fn new(bytes: usize) -> Self {
        // The image of each single-bit register after `bytes` zero bytes.
        let basis: Vec<u32> = (0..32)
            .map(|bit| {
                let mut reg = 1u32 << bit;
                for _ in 0..bytes * 8 {
                    reg = if reg & 1 != 0 {
                        (reg >> 1) ^ 0x82F6_3B78
                    } else {
                        reg >> 1
                    };
                }
                reg
            })
            .collect();
        let mut t = [[0u32; 256]; 4];
        for (k, table) in t.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                *slot = (0..8)
                    .filter(|i| v & (1 << i) != 0)
                    .fold(0, |acc, i| acc ^ basis[8 * k + i]);
            }
        }
        Shift(t)
    }
}

fn shifts() -> &'static [Shift; 2] {
    static SHIFTS: OnceLock<[Shift; 2]> = OnceLock::new();
    SHIFTS.get_or_init(|| [Shift::new(LANE_WORDS[1] * 8), Shift::new(LANE_WORDS[2] * 8)])
}

/// # Safety
///
/// `words` must point at 512 readable, 8-byte aligned u64s that stay mapped
/// for the call, and the CPU must support SSE4.2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn page_sse42(words: *const u64) -> u32 {
    use std::arch::x86_64::_mm_crc32_u64;
    let [l0, l1, l2] = LANE_WORDS;
    let (mut c0, mut c1, mut c2) = (!0u64, 0u64, 0u64);
    for i in 0..l0 {
        // SAFETY: i < 170, so each index is below 512 (the caller's bound);
        // volatile reads never form a reference to guest memory.
        let (w0, w1, w2) = unsafe {
            (
                words.add(i).read_volatile(),
                words.add(l0 + i).read_volatile(),
                words.add(l0 + l1 + i).read_volatile(),
            )
        };
        c0 = _mm_crc32_u64(c0, w0);
        c1 = _mm_crc32_u64(c1, w1);
        c2 = _mm_crc32_u64(c2, w2);
    }
    for i in l0..l2 {
        // SAFETY: l0 + l1 + i < 170 + 170 + 172 = 512.
        c2 = _mm_crc32_u64(c2, unsafe { words.add(l0 + l1 + i).read_volatile() });
    }
    let [s1, s2] = shifts();
    let reg = s1.apply(c0 as u32) ^ c1 as u32;
    let reg = s2.apply(reg) ^ c2 as u32;
    !reg
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matches_the_plain_crc_for_other_lengths() {
        let mut page: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
        let want = crc32c::crc32c(&page);
        let v = VolatileSlice::from(page.as_mut_slice());
        assert_eq!(crc32c_guest(&v), want);
    }

    #[repr(align(4096))]
    struct Page([u8; PAGE_SIZE]);

    proptest! {
        #[test]
        fn page_path_matches_the_crc32c_crate(seed in any::<u64>(), sparse in any::<bool>()) {
            let mut p = Page([0u8; PAGE_SIZE]);
            let mut x = seed | 1;
            for (i, b) in p.0.iter_mut().enumerate() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = if sparse && i % 97 != 0 { 0 } else { x as u8 };
            }
            let want = crc32c::crc32c(&p.0);
            let v = VolatileSlice::from(&mut p.0[..]);
            prop_assert_eq!(crc32c_guest(&v), want);
            prop_assert_eq!(crc32c_copying(&v), want);
        }
    }
}
