//! A lock-free dirty bitmap: one bit per 4 KiB unit (a disk block, or a
//! guest page the VMM itself wrote), set by the vCPU thread after a write
//! completed and taken (returned and cleared) by the link thread.
//!
//! The order is what makes it a dirty log: a writer sets the bit only after
//! its write returned, and [`AtomicBitmap::take`] clears a word with one
//! atomic swap. A write that completed before the swap is in the returned
//! bits, so the reader's copy, made after `take` returns, sees its data; a
//! write that completes after the swap sets its bit for the next `take`.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bits in u64 words, bit `i % 64` of word `i / 64` for unit `i`.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    bits: u64,
}

impl AtomicBitmap {
    /// An all-clear bitmap of `bits` bits.
    pub fn new(bits: u64) -> Self {
        let words = usize::try_from(bits.div_ceil(64)).expect("bitmap fits the address space");
        AtomicBitmap {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            bits,
        }
    }

    /// Bits of the map.
    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// u64 words of the map (`bits` rounded up to 64).
    pub fn words(&self) -> usize {
        self.words.len()
    }

    /// Sets bit `i`.
    pub fn set(&self, i: u64) {
        assert!(i < self.bits, "bit {i} of a {}-bit map", self.bits);
        self.words[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::SeqCst);
    }

    /// Sets the bits of units `first..first + count`.
    pub fn set_range(&self, first: u64, count: u64) {
        for i in first..first + count {
            self.set(i);
        }
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        assert!(i < self.bits, "bit {i} of a {}-bit map", self.bits);
        self.words[(i / 64) as usize].load(Ordering::SeqCst) >> (i % 64) & 1 == 1
    }

    /// Returns the bits and clears them, word by word.
    pub fn take(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.swap(0, Ordering::SeqCst))
            .collect()
    }

    /// ORs the bits into `out` (at least [`Self::words`] long) and clears them.
    pub fn take_into(&self, out: &mut [u64]) {
        assert!(out.len() >= self.words.len(), "bitmap too short");
        for (o, w) in out.iter_mut().zip(&self.words) {
            *o |= w.swap(0, Ordering::SeqCst);
        }
    }

    /// ORs the bits into `out` without clearing them.
    pub fn peek_into(&self, out: &mut [u64]) {
        assert!(out.len() >= self.words.len(), "bitmap too short");
        for (o, w) in out.iter_mut().zip(&self.words) {
            *o |= w.load(Ordering::SeqCst);
        }
    }

    /// Clears every bit.
    pub fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::SeqCst);
        }
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::SeqCst).count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_take_and_clear() {
        let b = AtomicBitmap::new(130);
        assert_eq!((b.bits(), b.words()), (130, 3));
        b.set(0);
        b.set(64);
        b.set(129);
        b.set(129);
        assert!(b.get(64) && !b.get(65));
        assert_eq!(b.count(), 3);
        let mut peek = vec![0u64; 3];
        b.peek_into(&mut peek);
        assert_eq!(peek, [1, 1, 1 << 1]);
        assert_eq!(b.take(), [1, 1, 1 << 1]);
        assert_eq!(b.take(), [0, 0, 0], "take clears");
        b.set_range(62, 4);
        let mut out = vec![1u64 << 3, 0, 0];
        b.take_into(&mut out);
        assert_eq!(out, [3 << 62 | 1 << 3, 3, 0]);
        b.set(5);
        b.clear();
        assert_eq!(b.count(), 0);
    }

    #[test]
    #[should_panic(expected = "bit 130 of a 130-bit map")]
    fn out_of_range_is_a_bug() {
        AtomicBitmap::new(130).set(130);
    }

    #[test]
    fn concurrent_sets_are_never_lost() {
        let b = std::sync::Arc::new(AtomicBitmap::new(4096));
        let writer = {
            let b = b.clone();
            std::thread::spawn(move || {
                for i in 0..4096 {
                    b.set(i);
                }
            })
        };
        let mut seen = vec![0u64; b.words()];
        while !writer.is_finished() {
            b.take_into(&mut seen);
        }
        writer.join().unwrap();
        b.take_into(&mut seen);
        assert!(seen.iter().all(|&w| w == u64::MAX));
    }
}
