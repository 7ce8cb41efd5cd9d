//! CRC32C over guest memory.
//!
//! Guest memory is read through volatile copies into a small stack buffer
//! (L1-resident), and the hardware-accelerated `crc32c` crate runs over that
//! buffer: no `&[u8]` over memory a guest may be writing.

use vm_memory::VolatileSlice;

/// Bytes copied per step: 1 KiB stays in L1 and amortises the call overhead.
const STEP_BYTES: usize = 1024;

/// CRC32C of `mem`, which a running guest may write concurrently (then the
/// CRC simply matches no consistent version, and the protocol treats the page
/// as torn; see the target's suspect set).
pub fn crc32c_guest(mem: &VolatileSlice<'_>) -> u32 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_plain_crc() {
        let mut page: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
        let want = crc32c::crc32c(&page);
        let v = VolatileSlice::from(page.as_mut_slice());
        assert_eq!(crc32c_guest(&v), want);
    }
}
