//! The sender's cache of last-sent page versions, the base of every XOR delta.
//!
//! # Eviction
//!
//! Set-associative, [`WAYS`] ways per set, the set chosen by a multiplicative
//! hash of the page frame number so that neighbouring pages spread over sets.
//! Lookup compares 16 tags (two cache lines); there is no global list or map
//! to maintain. Within a set the victim is, in order:
//!
//! 1. an empty way;
//! 2. the least recently encoded page, if it is *dead*: not encoded for 1.25×
//!    the mean reuse distance seen on hits (measured in encode calls, a
//!    running mean over the last ~16 hits). It missed its turn in the round;
//! 3. otherwise the most recently encoded page.
//!
//! Why not plain LRU: a migration round walks the dirty pages in order, so a
//! hot set is accessed cyclically, which is LRU's worst case. In a set holding
//! more hot pages than ways, LRU evicts exactly the page needed next and hits
//! never; one cold page dirtied once evicts the next hot page, which on its
//! miss evicts the next, to the end of the round. When every entry is alive,
//! evicting the most recent one is what Belady's optimal policy does for a
//! cycle, and keeps `ways - 1` pages hitting. Rule 2 lets a changed hot set
//! replace the old one within a round, as LRU would. Direct-mapped (QEMU's
//! XBZRLE) loses both pages of any colliding pair.
//!
//! Hit rates of the hot pages, a hot set written every round in frame order
//! with 10% other pages, 1024-page cache, 16 ways (`hot_set_hit_rates` test:
//! `cargo test -p ferry-compress hot_set_hit_rates -- --nocapture`):
//!
//! ```text
//!                   steady hot set     new hot set, rounds 2-4
//! hot / capacity    this policy  LRU   this policy  LRU
//!            0.5           1.00  0.99         0.98  0.99
//!           0.75           0.96  0.78         0.87  0.68
//!              1           0.83  0.32         0.74  0.34
//!            1.5           0.58  0.01         0.53  0.00
//!              2           0.43  0.00         0.39  0.00
//! ```
//!
//! Memory: one zeroed allocation of the capacity plus 16 bytes of tag and
//! stamp per page, made on the first [`DeltaCache::encode`]. The kernel backs
//! zeroed pages only when written, so capacity the working set does not reach
//! costs nothing.

use std::fmt;
use std::ops::AddAssign;

use lz4_flex::block::{compress_into_with_table, get_maximum_output_size, CompressTable};
use serde::{Deserialize, Serialize};

use super::fingerprint::Fingerprints;
use super::{xor_decode, xor_encode};
use crate::{Codec, PAGE_SIZE, PAYLOAD_BYTES_MAX};

/// Ways per set. With ~0.75 of the capacity hot, the hot pages per set are
/// about Poisson(0.75 × ways): at 8 ways 15% of the sets overflow, at 16
/// ways 10%, and each overflowing set loses a smaller share of its pages.
/// Lookup cost grows with ways but stays far below the 4 KiB page scan.
const WAYS: usize = 16;

/// Shortest delta worth an LZ4 attempt. LZ4 cannot shorten a block below 13
/// bytes at all, and an attempt costs ~0.2 µs (8 KiB table reset plus the
/// pass), which a few saved bytes do not repay.
const LZ4_TRY_BYTES_MIN: usize = 64;

/// LZ4's bound for the largest delta: 4096 * 1.1 + 20 = 4525 bytes.
const LZ4_SCRATCH_BYTES: usize = get_maximum_output_size(PAYLOAD_BYTES_MAX);

/// The running mean of reuse distances weighs the newest hit 1/2^4 = 1/16.
const REUSE_MEAN_SHIFT: u32 = 4;

/// Golden-ratio multiplier: sequential frame numbers land on spread-out high
/// bits, which pick the set (Fibonacci hashing).
const SET_HASH: u64 = 0x9E37_79B9_7F4A_7C15;

/// What [`DeltaCache::encode`] did with a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaOutcome {
    /// The page was cached: a delta against the cached version, `len` bytes
    /// (0 if the page is unchanged), was appended to `out`. `codec` is
    /// [`Codec::Xor`] or [`Codec::XorLz4`].
    Delta {
        /// How the payload is encoded.
        codec: Codec,
        /// Bytes appended to `out`.
        len: usize,
    },
    /// The page was not cached (now it is) and had no fingerprints that
    /// made a patch that fits; `out` is unchanged.
    Miss,
    /// The page was cached, but neither the delta nor its LZ4 fits the
    /// limit; `out` is unchanged.
    Overflow,
}

/// Counters of one [`DeltaCache`], QEMU XBZRLE style; add them up across
/// encoders with `+=`.
///
/// `hits + patches = pages + overflows`, and `hits + misses` is the number
/// of [`DeltaCache::encode`] calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaStats {
    /// Pages encoded as a delta ([`DeltaOutcome::Delta`]).
    pub pages: u64,
    /// Delta payload bytes produced, after LZ4 where used.
    pub bytes: u64,
    /// Encodes that found the page cached.
    pub hits: u64,
    /// Encodes that did not find the page cached.
    pub misses: u64,
    /// Misses encoded as a patch from the page's fingerprints (counted in
    /// `pages` and `bytes` too).
    #[serde(default)]
    pub patches: u64,
    /// Their payload bytes.
    #[serde(default)]
    pub patch_bytes: u64,
    /// Hits whose delta did not fit the limit.
    pub overflows: u64,
    /// Cached pages replaced by another page.
    pub evictions: u64,
    /// Capacity in bytes, whole pages.
    pub cache_bytes: u64,
}

impl AddAssign for DeltaStats {
    fn add_assign(&mut self, other: Self) {
        self.pages += other.pages;
        self.bytes += other.bytes;
        self.hits += other.hits;
        self.misses += other.misses;
        self.patches += other.patches;
        self.patch_bytes += other.patch_bytes;
        self.overflows += other.overflows;
        self.evictions += other.evictions;
        self.cache_bytes += other.cache_bytes;
    }
}

/// The last version of each page sent, up to a capacity, kept by the sender
/// to encode the next version of the page as a delta ([`DeltaCache::encode`]).
///
/// Owned by one encoder thread; no locks. Ferry pins every page to one
/// encoder, so each encoder has its own cache and no page is in two.
///
/// # Invariant
///
/// For every page it holds, the cache holds exactly what the receiver holds.
/// After every [`encode`](Self::encode) of a page, whatever the outcome, the
/// cache holds `new` for it, so the caller must then send content equal to
/// `new` (the delta, or LZ4 or raw of `new`), and the receiver must apply
/// deltas of a page in the order they were encoded. A page sent without
/// `encode` must be [`forget`](Self::forget)-ed, and everything after a send
/// that may not arrive must be [`clear`](Self::clear)-ed. `new` must be a
/// private copy, not guest memory the guest may change while it is read.
///
/// Pages need not all go through the cache: QEMU's XBZRLE skips it in the
/// first, bulk round, whose pages would mostly evict each other. A page never
/// encoded is simply not cached.
pub struct DeltaCache {
    sets: usize,
    ways: usize,
    /// Allocated on the first encode.
    store: Option<Store>,
    /// Encode calls so far; the time of the stamps.
    clock: u64,
    /// 16 × the running mean of the reuse distance of hits; 0 before the
    /// first hit.
    reuse_mean16: u64,
    /// Rule 2 of the eviction policy; off only in tests, to compare with LRU.
    adaptive: bool,
    /// The second base, for pages not cached (see [`with_fingerprints`]).
    /// Exact for every page not cached; for a cached page it may be stale
    /// (never used while the copy is there) and is rewritten from the copy
    /// when it is evicted.
    ///
    /// [`with_fingerprints`]: DeltaCache::with_fingerprints
    fingerprints: Option<Fingerprints>,
    stats: DeltaStats,
}

/// The cache's memory. Way `w` of set `s` is slot `s * ways + w`.
struct Store {
    /// Frame number + 1 of the page in each slot; 0 = empty.
    tags: Box<[u64]>,
    /// Clock at the slot's last encode.
    stamps: Box<[u64]>,
    /// The cached page versions, slot after slot.
    pages: Box<[u8]>,
    lz4_table: CompressTable,
    lz4_scratch: Box<[u8; LZ4_SCRATCH_BYTES]>,
}

impl Store {
    fn new(slots: usize) -> Self {
        // `vec![0; n]` allocates zeroed memory (calloc), which the kernel
        // maps lazily: slots never written cost no memory.
        Self {
            tags: vec![0; slots].into_boxed_slice(),
            stamps: vec![0; slots].into_boxed_slice(),
            pages: vec![0; slots * PAGE_SIZE].into_boxed_slice(),
            lz4_table: CompressTable::small(),
            lz4_scratch: Box::new([0; LZ4_SCRATCH_BYTES]),
        }
    }

    fn page_mut(&mut self, slot: usize) -> &mut [u8] {
        &mut self.pages[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE]
    }
}

impl fmt::Debug for DeltaCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeltaCache")
            .field("sets", &self.sets)
            .field("ways", &self.ways)
            .field("allocated", &self.store.is_some())
            .field("clock", &self.clock)
            .field("reuse_mean", &(self.reuse_mean16 >> REUSE_MEAN_SHIFT))
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl DeltaCache {
    /// Creates a cache of `capacity_bytes` rounded down to whole sets of 16
    /// pages (below 16 pages: to whole pages, one set); less than a page
    /// disables it: every encode is then a miss. Allocates nothing until the
    /// first [`encode`](Self::encode).
    pub fn new(capacity_bytes: usize) -> Self {
        let pages = capacity_bytes / PAGE_SIZE;
        let ways = pages.min(WAYS);
        let sets = pages.checked_div(ways).unwrap_or(0);
        Self {
            sets,
            ways,
            store: None,
            clock: 0,
            reuse_mean16: 0,
            adaptive: true,
            fingerprints: None,
            stats: DeltaStats {
                cache_bytes: (sets * ways * PAGE_SIZE) as u64,
                ..Default::default()
            },
        }
    }

    /// Also keeps the chunk fingerprints of pages `0..pages` (see
    /// [`fingerprint`](super::fingerprint)), so that a page not cached is
    /// still encoded as a patch of its changed chunks; they take up to
    /// [`fingerprint_bytes`](Self::fingerprint_bytes)`(pages)` besides the
    /// capacity. Pages at or above `pages` have none.
    pub fn with_fingerprints(mut self, pages: u64) -> Self {
        self.fingerprints = (pages > 0).then(|| Fingerprints::new(pages));
        self
    }

    /// Memory the fingerprints of `pages` pages take at most.
    pub fn fingerprint_bytes(pages: u64) -> u64 {
        Fingerprints::bytes_for(pages)
    }

    /// Capacity in bytes, after rounding.
    pub fn capacity_bytes(&self) -> usize {
        self.sets * self.ways * PAGE_SIZE
    }

    /// Whether the cache can ever produce a delta: it has capacity or keeps
    /// fingerprints.
    pub fn enabled(&self) -> bool {
        self.sets > 0 || self.fingerprints.is_some()
    }

    /// Encodes page `pfn`, whose new content is `new`, against its cached
    /// version, and caches `new` for it in every case.
    ///
    /// On a hit, appends the delta to `out` as [`Codec::Xor`], or as
    /// [`Codec::XorLz4`] when LZ4 makes it shorter, if that fits `limit`
    /// bytes (and [`PAYLOAD_BYTES_MAX`]); else returns
    /// [`DeltaOutcome::Overflow`]. On a miss (evicting another page if the
    /// set is full), a page with fingerprints is encoded the same way as a
    /// patch of its changed chunks if that fits; else returns
    /// [`DeltaOutcome::Miss`]. `out` is changed only by
    /// [`DeltaOutcome::Delta`]. See the type's invariant for what the caller
    /// must send. Does not allocate after the first call, unless `out` must
    /// grow.
    ///
    /// # Panics
    ///
    /// If `new` is not exactly [`PAGE_SIZE`] bytes, or `pfn` is `u64::MAX`
    /// (no page has that frame number).
    pub fn encode(
        &mut self,
        pfn: u64,
        new: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> DeltaOutcome {
        assert_eq!(new.len(), PAGE_SIZE, "encode input must be one page");
        assert_ne!(pfn, u64::MAX, "frame number out of range");
        if self.sets == 0 {
            self.stats.misses += 1;
            return self.patch(pfn, new, out, limit);
        }
        self.clock += 1;
        let now = self.clock;
        let first = self.set_of(pfn) * self.ways;
        let dead_age = self.dead_age();
        let store = self
            .store
            .get_or_insert_with(|| Store::new(self.sets * self.ways));
        let ways = first..first + self.ways;
        let tag = pfn + 1;
        let Some(way) = store.tags[ways.clone()].iter().position(|&t| t == tag) else {
            let way = victim(
                &store.tags[ways.clone()],
                &store.stamps[ways],
                now,
                dead_age,
            );
            let slot = first + way;
            evict(store, slot, &mut self.fingerprints, &mut self.stats);
            store.tags[slot] = tag;
            store.stamps[slot] = now;
            store.page_mut(slot).copy_from_slice(new);
            self.stats.misses += 1;
            return self.patch(pfn, new, out, limit);
        };
        let slot = first + way;
        let reuse = now - store.stamps[slot];
        store.stamps[slot] = now;
        self.reuse_mean16 = reuse_mean(self.reuse_mean16, reuse);
        self.stats.hits += 1;
        match delta(store, slot, new, out, limit) {
            Some((codec, len)) => {
                self.stats.pages += 1;
                self.stats.bytes += len as u64;
                DeltaOutcome::Delta { codec, len }
            }
            None => {
                self.stats.overflows += 1;
                DeltaOutcome::Overflow
            }
        }
    }

    /// Records the fingerprints of `page` as the version the receiver now
    /// holds of `pfn` (a page not cached), sent whole (raw or lz4) rather
    /// than through [`encode`](Self::encode), without caching its content: a
    /// first send where the content would cost too much. No-op without
    /// fingerprints.
    ///
    /// # Panics
    ///
    /// As [`encode`](Self::encode).
    pub fn fingerprint(&mut self, pfn: u64, page: &[u8]) {
        assert_eq!(page.len(), PAGE_SIZE, "fingerprint takes one page");
        if let Some(f) = &mut self.fingerprints {
            f.record(pfn, page);
        }
    }

    /// Caches `page` as the version the receiver now holds of `pfn`, when it
    /// was sent whole (raw or lz4) rather than through
    /// [`encode`](Self::encode): a first send, which is neither a hit nor a
    /// miss. Evicts like a miss when the set is full. Without capacity, only
    /// its fingerprints are kept (if any).
    ///
    /// # Panics
    ///
    /// As [`encode`](Self::encode).
    pub fn remember(&mut self, pfn: u64, page: &[u8]) {
        assert_eq!(page.len(), PAGE_SIZE, "remember takes one page");
        assert_ne!(pfn, u64::MAX, "frame number out of range");
        if self.sets == 0 {
            self.fingerprint(pfn, page);
            return;
        }
        self.clock += 1;
        let now = self.clock;
        let first = self.set_of(pfn) * self.ways;
        let dead_age = self.dead_age();
        let store = self
            .store
            .get_or_insert_with(|| Store::new(self.sets * self.ways));
        let ways = first..first + self.ways;
        let tag = pfn + 1;
        let way = match store.tags[ways.clone()].iter().position(|&t| t == tag) {
            Some(way) => way,
            None => {
                let way = victim(
                    &store.tags[ways.clone()],
                    &store.stamps[ways],
                    now,
                    dead_age,
                );
                evict(store, first + way, &mut self.fingerprints, &mut self.stats);
                way
            }
        };
        let slot = first + way;
        store.tags[slot] = tag;
        store.stamps[slot] = now;
        store.page_mut(slot).copy_from_slice(page);
    }

    /// Drops page `pfn` from the cache, if there. Call it when the page was
    /// sent by a path that did not go through [`encode`](Self::encode), so
    /// the receiver no longer holds the cached version.
    pub fn forget(&mut self, pfn: u64) {
        if let Some(f) = &mut self.fingerprints {
            f.forget(pfn);
        }
        if self.sets == 0 || pfn == u64::MAX {
            return;
        }
        let first = self.set_of(pfn) * self.ways;
        let Some(store) = &mut self.store else { return };
        let ways = first..first + self.ways;
        if let Some(way) = store.tags[ways].iter().position(|&t| t == pfn + 1) {
            store.tags[first + way] = 0;
            store.stamps[first + way] = 0;
        }
    }

    /// Whether the next [`encode`](Self::encode) of page `pfn` has a base:
    /// the page is cached (a hit) or has fingerprints (a patch).
    pub fn contains(&self, pfn: u64) -> bool {
        if self.fingerprints.as_ref().is_some_and(|f| f.contains(pfn)) {
            return true;
        }
        if self.sets == 0 || pfn == u64::MAX {
            return false;
        }
        let first = self.set_of(pfn) * self.ways;
        self.store
            .as_ref()
            .is_some_and(|store| store.tags[first..first + self.ways].contains(&(pfn + 1)))
    }

    /// Drops every page, e.g. when the receiver's memory is no longer known.
    /// Keeps the memory and the counters.
    pub fn clear(&mut self) {
        if let Some(store) = &mut self.store {
            store.tags.fill(0);
            store.stamps.fill(0);
        }
        if let Some(f) = &mut self.fingerprints {
            f.clear();
        }
    }

    /// Counters since creation.
    pub fn stats(&self) -> DeltaStats {
        self.stats
    }

    /// The fingerprint tier of a miss: a patch of `pfn`'s changed chunks,
    /// LZ4'd when that is shorter, if the page has fingerprints and the
    /// patch fits `limit`. Records `new`'s fingerprints either way.
    fn patch(&mut self, pfn: u64, new: &[u8], out: &mut Vec<u8>, limit: usize) -> DeltaOutcome {
        let Some(f) = &mut self.fingerprints else {
            return DeltaOutcome::Miss;
        };
        let start = out.len();
        // Up to the payload cap, not `limit`: LZ4 may bring it under.
        let Some(len) = f.patch(pfn, new, out, PAYLOAD_BYTES_MAX) else {
            return DeltaOutcome::Miss;
        };
        let store = self
            .store
            .get_or_insert_with(|| Store::new(self.sets * self.ways));
        match smaller(store, out, start, len, limit) {
            Some((codec, len)) => {
                self.stats.pages += 1;
                self.stats.bytes += len as u64;
                self.stats.patches += 1;
                self.stats.patch_bytes += len as u64;
                DeltaOutcome::Delta { codec, len }
            }
            None => DeltaOutcome::Miss,
        }
    }

    fn set_of(&self, pfn: u64) -> usize {
        // Multiply-shift maps the hash onto 0..sets without a division.
        let hash = pfn.wrapping_mul(SET_HASH);
        let set = ((u128::from(hash) * self.sets as u128) >> 64) as usize;
        debug_assert!(set < self.sets);
        set
    }

    /// Age (in encode calls) at which a page that was not encoded again is
    /// dead: 1.25 × the mean reuse distance; never before the first hit.
    fn dead_age(&self) -> u64 {
        match (self.adaptive, self.reuse_mean16) {
            (false, _) => 0,
            (true, 0) => u64::MAX,
            // mean16 / 16 * 5 / 4
            (true, mean16) => mean16.saturating_mul(5) >> (REUSE_MEAN_SHIFT + 2),
        }
    }
}

/// The running mean of reuse distances (×16) after a hit at `distance`.
fn reuse_mean(mean16: u64, distance: u64) -> u64 {
    debug_assert!(distance >= 1);
    if mean16 == 0 {
        distance.saturating_mul(1 << REUSE_MEAN_SHIFT)
    } else {
        (mean16 - (mean16 >> REUSE_MEAN_SHIFT)).saturating_add(distance)
    }
}

/// Counts the eviction of the page in `slot`, if any, and keeps its
/// fingerprints: its copy is exactly what the receiver holds, so the page
/// can still go as a patch. (A cached page's fingerprints are computed only
/// here, not on every hit.)
fn evict(
    store: &mut Store,
    slot: usize,
    fingerprints: &mut Option<Fingerprints>,
    stats: &mut DeltaStats,
) {
    let tag = store.tags[slot];
    if tag == 0 {
        return;
    }
    stats.evictions += 1;
    if let Some(f) = fingerprints {
        f.record(tag - 1, store.page_mut(slot));
    }
}

/// The way to replace in a set (see the module doc): an empty one, else the
/// least recent if dead, else the most recent.
fn victim(tags: &[u64], stamps: &[u64], now: u64, dead_age: u64) -> usize {
    if let Some(way) = tags.iter().position(|&t| t == 0) {
        return way;
    }
    let by_stamp = |&(_, &a): &(usize, &u64), &(_, &b): &(usize, &u64)| a.cmp(&b);
    let lru = stamps
        .iter()
        .enumerate()
        .min_by(by_stamp)
        .map_or(0, |(w, _)| w);
    let mru = stamps
        .iter()
        .enumerate()
        .max_by(by_stamp)
        .map_or(0, |(w, _)| w);
    if now - stamps[lru] >= dead_age {
        lru
    } else {
        mru
    }
}

/// Encodes `new` against the page in `slot` and appends the payload to `out`;
/// returns its codec and length, or `None` if it does not fit `limit` (`out`
/// unchanged). Leaves `new` in the slot either way.
fn delta(
    store: &mut Store,
    slot: usize,
    new: &[u8],
    out: &mut Vec<u8>,
    limit: usize,
) -> Option<(Codec, usize)> {
    let start = out.len();
    // Encode up to the payload cap, not `limit`: LZ4 may bring a delta longer
    // than `limit` under it.
    let Some(len) = xor_encode(store.page_mut(slot), new, out, PAYLOAD_BYTES_MAX) else {
        store.page_mut(slot).copy_from_slice(new);
        return None;
    };
    // Bring the cached version up to date by copying the changed runs only.
    let applied = xor_decode(&out[start..], store.page_mut(slot));
    debug_assert!(applied.is_ok(), "own delta rejected: {applied:?}");
    if applied.is_err() {
        store.page_mut(slot).copy_from_slice(new);
    }
    debug_assert!(store.page_mut(slot) == new);
    smaller(store, out, start, len, limit)
}

/// Keeps the delta of `len` bytes at `out[start..]`, or replaces it with its
/// LZ4 when that is shorter; returns the codec and length, or `None` (with
/// `out` truncated to `start`) if the result does not fit `limit`.
fn smaller(
    store: &mut Store,
    out: &mut Vec<u8>,
    start: usize,
    len: usize,
    limit: usize,
) -> Option<(Codec, usize)> {
    let mut best = (Codec::Xor, len);
    if len >= LZ4_TRY_BYTES_MIN {
        let compressed = compress_into_with_table(
            &out[start..],
            &mut store.lz4_scratch[..],
            &mut store.lz4_table,
        );
        // The scratch is sized by LZ4's own bound; an error is a miss.
        if let Some(lz4_len) = compressed.ok().filter(|&n| n < len) {
            best = (Codec::XorLz4, lz4_len);
        }
    }
    let (codec, len) = best;
    if len > limit {
        out.truncate(start);
        return None;
    }
    if codec == Codec::XorLz4 {
        out.truncate(start);
        out.extend_from_slice(&store.lz4_scratch[..len]);
    }
    Some((codec, len))
}

#[cfg(test)]
mod tests;
