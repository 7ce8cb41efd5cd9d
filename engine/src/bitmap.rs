//! Page bitmaps: the dirty log (one bit per page, u64 words, page-index
//! order, as KVM and the link protocol lay it out) and an atomic variant for
//! state several receive threads update.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A plain bitmap over pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// All clear.
    pub fn new(pages: u64) -> Self {
        DirtyBitmap {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// All set (the bulk round).
    pub fn full(pages: u64) -> Self {
        let mut b = Self::new(pages);
        b.words.iter_mut().for_each(|w| *w = !0);
        b.trim();
        b
    }

    fn trim(&mut self) {
        let tail = self.pages % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The words, to be filled by a dirty-log sync. Bits past `pages` are
    /// cleared again by [`Self::count`] and [`Self::runs`] users via `trim`.
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// Sets page `i`.
    pub fn set(&mut self, i: u64) {
        assert!(i < self.pages, "page {i} out of range");
        self.words[(i / 64) as usize] |= 1 << (i % 64);
    }

    /// Sets pages `first..first + count`.
    pub fn set_range(&mut self, first: u64, count: u64) {
        assert!(
            first + count <= self.pages,
            "pages {first}+{count} out of range"
        );
        let mut i = first;
        let end = first + count;
        while i < end {
            if i.is_multiple_of(64) && end - i >= 64 {
                self.words[(i / 64) as usize] = !0;
                i += 64;
            } else {
                self.set(i);
                i += 1;
            }
        }
    }

    /// Whether page `i` is set.
    pub fn get(&self, i: u64) -> bool {
        i < self.pages && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Number of set pages (ignoring stray bits past the end).
    pub fn count(&mut self) -> u64 {
        self.trim();
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Clears everything.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// `self |= other`.
    pub fn or_with(&mut self, other: &DirtyBitmap) {
        self.zip_with(other, |a, b| a | b);
    }

    /// `self &= other`.
    pub fn and_with(&mut self, other: &DirtyBitmap) {
        self.zip_with(other, |a, b| a & b);
    }

    /// `self &= !other`.
    pub fn and_not(&mut self, other: &DirtyBitmap) {
        self.zip_with(other, |a, b| a & !b);
    }

    /// `self = a & b`.
    pub fn set_and(&mut self, a: &DirtyBitmap, b: &DirtyBitmap) {
        assert!(
            a.pages == self.pages && b.pages == self.pages,
            "bitmap sizes differ"
        );
        for ((w, x), y) in self.words.iter_mut().zip(&a.words).zip(&b.words) {
            *w = x & y;
        }
        self.trim();
    }

    /// Copies `other` into `self`.
    pub fn copy_from(&mut self, other: &DirtyBitmap) {
        assert_eq!(self.pages, other.pages, "bitmap sizes differ");
        self.words.copy_from_slice(&other.words);
    }

    /// Set pages per block of `block_pages` (a multiple of 64), in order.
    pub fn count_blocks(&mut self, block_pages: u64) -> Vec<u64> {
        assert!(
            block_pages > 0 && block_pages.is_multiple_of(64),
            "blocks are whole words"
        );
        self.trim();
        self.words
            .chunks((block_pages / 64) as usize)
            .map(|c| c.iter().map(|w| w.count_ones() as u64).sum())
            .collect()
    }

    /// Sets every page of the blocks of `block_pages` (a multiple of 64)
    /// whose flag is true.
    pub fn set_blocks(&mut self, block_pages: u64, flags: &[bool]) {
        assert!(
            block_pages > 0 && block_pages.is_multiple_of(64),
            "blocks are whole words"
        );
        for (c, &on) in self
            .words
            .chunks_mut((block_pages / 64) as usize)
            .zip(flags)
        {
            if on {
                c.iter_mut().for_each(|w| *w = !0);
            }
        }
        self.trim();
    }

    fn zip_with(&mut self, other: &DirtyBitmap, f: impl Fn(u64, u64) -> u64) {
        assert_eq!(self.pages, other.pages, "bitmap sizes differ");
        for (w, &o) in self.words.iter_mut().zip(&other.words) {
            *w = f(*w, o);
        }
        self.trim();
    }

    /// Clears pages `first..first + count`.
    pub fn clear_range(&mut self, first: u64, count: u64) {
        let end = (first + count).min(self.pages);
        let mut i = first;
        while i < end {
            if i.is_multiple_of(64) && end - i >= 64 {
                self.words[(i / 64) as usize] = 0;
                i += 64;
            } else {
                self.words[(i / 64) as usize] &= !(1 << (i % 64));
                i += 1;
            }
        }
    }

    /// Runs of pages in `first..first + count` whose bit is clear, as
    /// (first, count), ascending.
    pub fn runs_within(&self, first: u64, count: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let end = (first + count).min(self.pages);
        let mut i = first;
        std::iter::from_fn(move || {
            while i < end && self.get(i) {
                i += 1;
            }
            if i >= end {
                return None;
            }
            let start = i;
            while i < end && !self.get(i) {
                i += 1;
            }
            Some((start, i - start))
        })
    }

    /// Runs of set pages within `first..first + count`, ascending.
    pub fn runs_set_within(&self, first: u64, count: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let end = (first + count).min(self.pages);
        let mut i = first;
        std::iter::from_fn(move || {
            while i < end && !self.get(i) {
                i += 1;
            }
            if i >= end {
                return None;
            }
            let start = i;
            while i < end && self.get(i) {
                i += 1;
            }
            Some((start, i - start))
        })
    }

    /// Runs of consecutive set pages as (first, count), ascending.
    pub fn runs(&mut self) -> Runs<'_> {
        self.trim();
        Runs {
            words: &self.words,
            next: 0,
            pages: self.pages,
        }
    }
}

/// Iterator over runs of set bits.
#[derive(Debug)]
pub struct Runs<'a> {
    words: &'a [u64],
    next: u64,
    pages: u64,
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.find_bit(true)?;
        self.next = start;
        let end = self.find_bit(false).unwrap_or(self.pages);
        self.next = end;
        Some((start, end - start))
    }
}

impl Runs<'_> {
    /// First page >= self.next whose bit equals `set`.
    fn find_bit(&self, set: bool) -> Option<u64> {
        let mut i = self.next;
        while i < self.pages {
            let w = self.words[(i / 64) as usize];
            let w = if set { w } else { !w };
            let masked = w >> (i % 64);
            if masked != 0 {
                let found = i + masked.trailing_zeros() as u64;
                return (found < self.pages).then_some(found);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }
}

/// A bitmap several threads set and clear concurrently.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl AtomicBitmap {
    /// All clear.
    pub fn new(pages: u64) -> Self {
        AtomicBitmap {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Sets page `i`; returns whether it was set before.
    pub fn set(&self, i: u64) -> bool {
        assert!(i < self.pages, "page {i} out of range");
        let bit = 1 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(bit, Relaxed) & bit != 0
    }

    /// Clears page `i`.
    pub fn clear(&self, i: u64) {
        assert!(i < self.pages, "page {i} out of range");
        self.words[(i / 64) as usize].fetch_and(!(1 << (i % 64)), Relaxed);
    }

    /// Whether page `i` is set.
    pub fn get(&self, i: u64) -> bool {
        i < self.pages && self.words[(i / 64) as usize].load(Relaxed) & (1 << (i % 64)) != 0
    }

    /// Number of set pages.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Relaxed).count_ones() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn runs_match_a_naive_scan(bits in proptest::collection::vec(any::<bool>(), 0..300)) {
            let mut b = DirtyBitmap::new(bits.len() as u64);
            for (i, &s) in bits.iter().enumerate() {
                if s { b.set(i as u64); }
            }
            let mut want = Vec::new();
            let mut i = 0;
            while i < bits.len() {
                if bits[i] {
                    let s = i;
                    while i < bits.len() && bits[i] { i += 1; }
                    want.push((s as u64, (i - s) as u64));
                } else { i += 1; }
            }
            prop_assert_eq!(b.runs().collect::<Vec<_>>(), want.clone());
            let mut c = DirtyBitmap::new(bits.len() as u64);
            for &(f, n) in &want { c.set_range(f, n); }
            prop_assert_eq!(c.runs().collect::<Vec<_>>(), want);
            prop_assert_eq!(b.count(), bits.iter().filter(|&&x| x).count() as u64);
        }
    }

    proptest! {
        #[test]
        fn set_ops_match_a_naive_model(
            bits in proptest::collection::vec((any::<bool>(), any::<bool>()), 0..400),
            flags in proptest::collection::vec(any::<bool>(), 7),
        ) {
            let n = bits.len() as u64;
            let (mut a, mut b) = (DirtyBitmap::new(n), DirtyBitmap::new(n));
            for (i, &(x, y)) in bits.iter().enumerate() {
                if x { a.set(i as u64); }
                if y { b.set(i as u64); }
            }
            let mut or = a.clone();
            or.or_with(&b);
            let mut and2 = a.clone();
            and2.and_with(&b);
            let mut andn = a.clone();
            andn.and_not(&b);
            let mut and = DirtyBitmap::new(n);
            and.set_and(&a, &b);
            for (i, &(x, y)) in bits.iter().enumerate() {
                let i = i as u64;
                prop_assert_eq!(or.get(i), x || y);
                prop_assert_eq!(andn.get(i), x && !y);
                prop_assert_eq!(and.get(i), x && y);
                prop_assert_eq!(and2.get(i), x && y);
            }
            let blocks = a.count_blocks(64);
            prop_assert_eq!(blocks.len() as u64, n.div_ceil(64));
            for (k, &c) in blocks.iter().enumerate() {
                let want = bits.iter().skip(k * 64).take(64).filter(|p| p.0).count() as u64;
                prop_assert_eq!(c, want);
            }
            let lo = n / 3;
            let within: Vec<(u64, u64)> = a.runs_within(lo, n - lo).collect();
            let mut covered = vec![false; n as usize];
            for &(f, c) in &within {
                prop_assert!(f >= lo && f + c <= n && c > 0);
                for i in f..f + c { covered[i as usize] = true; }
            }
            for i in 0..n {
                prop_assert_eq!(covered[i as usize], i >= lo && !a.get(i), "page {}", i);
            }
            let mut sb = DirtyBitmap::new(n);
            sb.set_blocks(64, &flags);
            for i in 0..n {
                prop_assert_eq!(sb.get(i), flags.get((i / 64) as usize).copied().unwrap_or(false));
            }
            prop_assert_eq!(sb.count(), (0..n).filter(|&i| flags.get((i / 64) as usize) == Some(&true)).count() as u64);
        }
    }

    #[test]
    fn full_covers_exactly_the_pages() {
        let mut b = DirtyBitmap::full(130);
        assert_eq!(b.count(), 130);
        assert_eq!(b.runs().collect::<Vec<_>>(), vec![(0, 130)]);
        b.words_mut()[2] = !0; // stray bits past the end from a sync
        assert_eq!(b.count(), 130);
        let a = AtomicBitmap::new(70);
        assert!(!a.set(69));
        assert!(a.set(69));
        a.clear(69);
        assert_eq!(a.count(), 0);
    }
}
