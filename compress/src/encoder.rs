//! Page encoding, the send side: the compress-or-not decision and LZ4.

use std::fmt;
use std::num::NonZeroU32;

use lz4_flex::block::{compress_into_with_table, get_maximum_output_size, CompressTable};

use crate::{probe, Codec, LZ4_BYTES_MAX_DEFAULT, PAGE_SIZE, PAYLOAD_BYTES_MAX};

/// Scratch space LZ4 needs to compress one page whatever its content:
/// 4096 * 1.1 + 20 = 4525 bytes.
const LZ4_SCRATCH_BYTES: usize = get_maximum_output_size(PAGE_SIZE);

/// Default cap of the backoff interval. After a run of misses only one page in
/// 64 is tried, so an incompressible guest costs 1/64 of an LZ4 pass per page
/// (≈ 1/64 of ~1 µs), and a guest that turns compressible again is noticed
/// within 64 pages (256 KiB).
const BACKOFF_PAGES_MAX_DEFAULT: NonZeroU32 = NonZeroU32::new(64).unwrap();

/// Consecutive misses before the backoff starts. Doubling from the first miss
/// loses most compressible pages in memory where compressible and random pages
/// alternate: with half the pages compressible at random, backoff from the
/// first miss tries only 24% of the compressible pages, from the 8th miss 98%
/// (a run of 8 misses happens once in 2^8 tries), while a fully incompressible
/// guest still settles at one try in 64 pages after 8 + 6 misses.
const BACKOFF_MISSES_MIN: u32 = 8;

/// Tuning of a [`PageEncoder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncoderConfig {
    /// Largest LZ4 payload [`PageEncoder::compress`] returns; a page that does
    /// not compress to this goes raw. At most [`PAYLOAD_BYTES_MAX`].
    /// Default [`LZ4_BYTES_MAX_DEFAULT`] (7/8 of a page).
    pub lz4_bytes_max: usize,
    /// Cap of the backoff interval: after each miss the interval between tried
    /// pages doubles up to this; a hit resets it to 1. 1 disables backoff.
    pub backoff_pages_max: NonZeroU32,
    /// After a miss, run a sampled byte-histogram probe before LZ4 and send
    /// pages that look random raw without compressing them (see `probe.rs`).
    pub probe: bool,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            lz4_bytes_max: LZ4_BYTES_MAX_DEFAULT,
            backoff_pages_max: BACKOFF_PAGES_MAX_DEFAULT,
            probe: true,
        }
    }
}

/// Counters of one [`PageEncoder`]; add them up across workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncoderStats {
    /// Calls to [`PageEncoder::compress`].
    pub attempts: u64,
    /// Attempts that returned [`Codec::Lz4`].
    pub hits: u64,
    /// Attempts the probe answered without running LZ4 (all sent raw).
    pub probe_rejects: u64,
    /// Calls to [`PageEncoder::should_try`] that answered no.
    pub skipped: u64,
}

/// Per-worker compression state: the adaptive backoff, LZ4's hash table and
/// scratch buffer. Not shared; one per sending thread.
pub struct PageEncoder {
    cfg: EncoderConfig,
    /// Pages between tries right now: 1 after a hit, doubling per miss to the cap.
    interval_pages: u32,
    /// Pages still to skip before the next try.
    skip_pages: u32,
    /// Misses since the last hit, saturating.
    misses: u32,
    table: CompressTable,
    scratch: Box<[u8; LZ4_SCRATCH_BYTES]>,
    stats: EncoderStats,
}

impl Default for PageEncoder {
    fn default() -> Self {
        Self::new(EncoderConfig::default())
    }
}

impl fmt::Debug for PageEncoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageEncoder")
            .field("cfg", &self.cfg)
            .field("interval_pages", &self.interval_pages)
            .field("skip_pages", &self.skip_pages)
            .field("misses", &self.misses)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl PageEncoder {
    /// Creates an encoder with tuning `cfg`.
    ///
    /// # Panics
    ///
    /// If `cfg.lz4_bytes_max` exceeds [`PAYLOAD_BYTES_MAX`]: the peer's decoder
    /// would reject such payloads.
    pub fn new(cfg: EncoderConfig) -> Self {
        assert!(
            cfg.lz4_bytes_max <= PAYLOAD_BYTES_MAX,
            "lz4_bytes_max {} exceeds PAYLOAD_BYTES_MAX {PAYLOAD_BYTES_MAX}",
            cfg.lz4_bytes_max
        );
        Self {
            cfg,
            interval_pages: 1,
            skip_pages: 0,
            misses: 0,
            table: CompressTable::small(),
            scratch: Box::new([0; LZ4_SCRATCH_BYTES]),
            stats: EncoderStats::default(),
        }
    }

    /// Whether compression is worth trying for the next non-zero page; ask
    /// before copying the page out of guest memory. Cheap: a counter.
    ///
    /// Every page is tried until 8 consecutive misses; after `8 + n` misses only
    /// every `min(2^(n+1), backoff_pages_max)`-th page is tried. A hit goes back
    /// to trying every page.
    pub fn should_try(&mut self) -> bool {
        if self.skip_pages == 0 {
            return true;
        }
        self.skip_pages -= 1;
        self.stats.skipped += 1;
        false
    }

    /// Compresses a staged (private) page into `out`, which is cleared first.
    ///
    /// Returns [`Codec::Lz4`] with the payload in `out` when it is at most
    /// `lz4_bytes_max` bytes, else [`Codec::Raw`]: `out` is then unspecified
    /// and the caller sends the page itself. Records the outcome for
    /// [`should_try`](Self::should_try). Does not allocate once `out` has
    /// grown to `lz4_bytes_max`.
    ///
    /// # Panics
    ///
    /// If `page` is not exactly [`PAGE_SIZE`] bytes.
    pub fn compress(&mut self, page: &[u8], out: &mut Vec<u8>) -> Codec {
        assert_eq!(page.len(), PAGE_SIZE, "compress input must be one page");
        out.clear();
        self.stats.attempts += 1;
        // The probe costs ~1/10 of an LZ4 pass; run it only after a miss, so a
        // compressible stretch of memory pays nothing for it.
        if self.cfg.probe && self.misses > 0 && probe::looks_incompressible(page) {
            self.stats.probe_rejects += 1;
            self.record(false);
            return Codec::Raw;
        }
        let compressed = compress_into_with_table(page, &mut self.scratch[..], &mut self.table);
        // The scratch is sized by lz4_flex's own bound, so compression cannot
        // run out of space; treat an error as a miss rather than trusting that.
        match compressed {
            Ok(len) if len <= self.cfg.lz4_bytes_max => {
                out.extend_from_slice(&self.scratch[..len]);
                self.stats.hits += 1;
                self.record(true);
                Codec::Lz4
            }
            _ => {
                self.record(false);
                Codec::Raw
            }
        }
    }

    /// Counters since creation.
    pub fn stats(&self) -> EncoderStats {
        self.stats
    }

    fn record(&mut self, hit: bool) {
        if hit {
            self.misses = 0;
            self.interval_pages = 1;
        } else {
            self.misses = self.misses.saturating_add(1);
            if self.misses >= BACKOFF_MISSES_MIN {
                self.interval_pages = self
                    .interval_pages
                    .saturating_mul(2)
                    .min(self.cfg.backoff_pages_max.get());
            }
        }
        self.skip_pages = self.interval_pages - 1;
        debug_assert!(self.interval_pages >= 1);
        debug_assert!(self.interval_pages <= self.cfg.backoff_pages_max.get());
        debug_assert!(self.misses >= BACKOFF_MISSES_MIN || self.interval_pages == 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::{random_page, text_page};

    #[test]
    fn text_compresses_to_about_a_fifth() {
        let mut enc = PageEncoder::default();
        let mut out = Vec::new();
        let mut state = 1;
        let page = text_page(&mut state);
        assert_eq!(enc.compress(&page, &mut out), Codec::Lz4);
        assert!(out.len() < PAGE_SIZE / 4, "{} bytes", out.len());
        let mut back = vec![0; PAGE_SIZE];
        crate::decode(Codec::Lz4, &out, &mut back).unwrap();
        assert_eq!(back, page);
    }

    #[test]
    fn random_goes_raw_with_and_without_probe() {
        for probe in [true, false] {
            let mut enc = PageEncoder::new(EncoderConfig {
                probe,
                ..Default::default()
            });
            let mut out = Vec::new();
            let mut state = 1;
            for _ in 0..2 {
                assert_eq!(enc.compress(&random_page(&mut state), &mut out), Codec::Raw);
            }
            // The first miss ran LZ4, the second only the probe.
            assert_eq!(enc.stats().probe_rejects, u64::from(probe));
        }
    }

    #[test]
    fn threshold_is_respected() {
        let mut state = 1;
        let page = text_page(&mut state);
        let len = lz4_flex::block::compress(&page).len();
        for (max, want) in [(len, Codec::Lz4), (len - 1, Codec::Raw)] {
            let mut enc = PageEncoder::new(EncoderConfig {
                lz4_bytes_max: max,
                ..Default::default()
            });
            assert_eq!(enc.compress(&page, &mut Vec::new()), want, "max {max}");
        }
    }

    #[test]
    #[should_panic(expected = "exceeds PAYLOAD_BYTES_MAX")]
    fn threshold_above_payload_cap_is_a_bug() {
        PageEncoder::new(EncoderConfig {
            lz4_bytes_max: PAYLOAD_BYTES_MAX + 1,
            ..Default::default()
        });
    }

    /// Runs `pages` through should_try/compress like the engine; returns the
    /// pattern of tries.
    fn drive(enc: &mut PageEncoder, pages: &[Vec<u8>]) -> Vec<bool> {
        let mut out = Vec::new();
        pages
            .iter()
            .map(|page| {
                let tried = enc.should_try();
                if tried {
                    enc.compress(page, &mut out);
                }
                tried
            })
            .collect()
    }

    #[test]
    fn backoff_doubles_to_cap_and_resets_on_hit() {
        let cfg = EncoderConfig {
            backoff_pages_max: NonZeroU32::new(8).unwrap(),
            ..Default::default()
        };
        let mut enc = PageEncoder::new(cfg);
        let mut state = 1;
        let random: Vec<_> = (0..40).map(|_| random_page(&mut state)).collect();
        let tried = drive(&mut enc, &random);
        let tried_at: Vec<_> = (0..tried.len()).filter(|&i| tried[i]).collect();
        // Every page until the 8th miss, then intervals 2, 4, 8, 8, ...
        assert_eq!(tried_at, [0, 1, 2, 3, 4, 5, 6, 7, 9, 13, 21, 29, 37]);
        let stats = enc.stats();
        assert_eq!((stats.attempts, stats.hits, stats.skipped), (13, 0, 27));

        // Skip out the current interval, then one hit brings back every page.
        while !enc.should_try() {}
        enc.compress(&text_page(&mut state), &mut Vec::new());
        let text: Vec<_> = (0..10).map(|_| text_page(&mut state)).collect();
        assert!(drive(&mut enc, &text).iter().all(|&t| t));
    }

    #[test]
    fn backoff_of_one_tries_every_page() {
        let cfg = EncoderConfig {
            backoff_pages_max: NonZeroU32::MIN,
            ..Default::default()
        };
        let mut enc = PageEncoder::new(cfg);
        let mut state = 1;
        let random: Vec<_> = (0..10).map(|_| random_page(&mut state)).collect();
        assert!(drive(&mut enc, &random).iter().all(|&t| t));
    }
}
