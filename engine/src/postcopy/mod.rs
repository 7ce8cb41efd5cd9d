//! Post-copy: the VM runs on the target before all of its memory is there.
//!
//! ```text
//!  source (guest paused, memory frozen)                 target (guest running)
//!  ── Stale bitmap, State, PREPARE{postcopy} ─────────▶ VMM: restore, userfaultfd over its
//!                                                       mapping (minor + missing), unmap all
//!  ◀──────────────────────────────────────── PREPARED   present pages: mapped in the background
//!  ── COMMIT ─────────────────────────────────────────▶ VMM runs; vCPU touches a stale page:
//!                                                       the kernel parks it, ferryd reads the fault
//!  demand thread ◀── Request{page} ── priority stream ── fault thread
//!  guest memory ── Pages (raw/zero) ── priority stream ─▶ priority receiver: claim, write through
//!                                                       ferryd's mapping, UFFDIO_CONTINUE (wakes it)
//!  background push (pipeline, data streams): stale     ─▶ data receivers: claim, write, CONTINUE
//!  pages from the last fault on, round k+1, PUSH_DONE      (a page already claimed is dropped)
//!  ◀───────────────────────────── POSTCOPY_DONE ──────── every page present; VMM closes the uffd
//!  hand-off: the source VMM quits
//! ```
//!
//! The target VMM keeps guest memory in the memfd ferryd writes through its
//! own mapping; the VMM's mapping is registered with a userfaultfd in minor
//! mode, so a page the guest touches first is mapped only once ferryd has
//! written all of it and said so with `UFFDIO_CONTINUE`. ferryd never needs
//! `UFFDIO_COPY`, and the receive paths stay the pre-copy ones (raw pages
//! land straight in guest memory).
//!
//! Every page moves at most once after the switch: the page states give each
//! page to the first receiver that claims it (priority or background); any
//! later copy of it is read off the wire and dropped. A page the guest has
//! been given is never written by ferryd again, so no late copy can
//! overwrite what the guest wrote since.

pub(crate) mod checkpoint;
pub(crate) mod source;
pub(crate) mod target;

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Raises the calling thread's scheduling priority (nice -10): the demand
/// path's threads (fault reader, priority receiver, demand server) wake for
/// each fault while the background push keeps every core busy, and a vCPU
/// waits for them. Without the privilege (CAP_SYS_NICE) it stays as it is.
///
/// Measured on 2 cores (docs/benchmarks.md, *Post-copy*): nice -10 gives a
/// 20 us median and 110-460 us p99 in most runs; SCHED_FIFO made the p99
/// steadier (170-210 us) but the median 75 us and the whole post-copy 15%
/// longer, so it is not used.
pub(crate) fn raise_priority() {
    // SAFETY: setpriority on the calling thread; no memory is passed.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -10) };
    if rc != 0 {
        tracing::debug!(
            "post-copy: cannot raise a demand thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Per-page state on the target during post-copy, three bitmaps:
/// `claimed` (a receiver took the page, or it was current at the switch),
/// `present` (its bytes are in memory: the guest may have it), and
/// `faulted` (a guest access waits for it).
pub(crate) struct PageStates {
    pages: u64,
    claimed: Vec<AtomicU64>,
    present: Vec<AtomicU64>,
    faulted: Vec<AtomicU64>,
    requested: Vec<AtomicU64>,
    present_count: AtomicU64,
}

fn bit(i: u64) -> (usize, u64) {
    ((i / 64) as usize, 1u64 << (i % 64))
}

impl PageStates {
    /// Every page is missing except those not set in `stale` (u64 words).
    pub(crate) fn new(pages: u64, stale: &[u64]) -> Self {
        let words = pages.div_ceil(64) as usize;
        assert_eq!(stale.len(), words, "stale bitmap size");
        let mut count = 0;
        let current: Vec<AtomicU64> = (0..words)
            .map(|w| {
                let valid = if w + 1 == words && !pages.is_multiple_of(64) {
                    (1u64 << (pages % 64)) - 1
                } else {
                    !0
                };
                let have = !stale[w] & valid;
                count += have.count_ones() as u64;
                AtomicU64::new(have)
            })
            .collect();
        let zeros = || (0..words).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        PageStates {
            pages,
            claimed: current
                .iter()
                .map(|a| AtomicU64::new(a.load(Ordering::Relaxed)))
                .collect(),
            present: current,
            faulted: zeros(),
            requested: zeros(),
            present_count: AtomicU64::new(count),
        }
    }

    /// Takes `page` for writing; false when another copy already took it.
    pub(crate) fn claim(&self, page: u64) -> bool {
        let (w, b) = bit(page);
        self.claimed[w].fetch_or(b, Ordering::AcqRel) & b == 0
    }

    /// Gives a claimed page back (its copy failed its check): the next
    /// request fetches it again.
    pub(crate) fn release(&self, page: u64) {
        let (w, b) = bit(page);
        self.requested[w].fetch_and(!b, Ordering::AcqRel);
        self.claimed[w].fetch_and(!b, Ordering::AcqRel);
    }

    /// Marks a claimed page as written. Returns false if it already was.
    pub(crate) fn set_present(&self, page: u64) -> bool {
        let (w, b) = bit(page);
        let fresh = self.present[w].fetch_or(b, Ordering::SeqCst) & b == 0;
        if fresh {
            self.present_count.fetch_add(1, Ordering::AcqRel);
        }
        fresh
    }

    pub(crate) fn is_present(&self, page: u64) -> bool {
        let (w, b) = bit(page);
        self.present[w].load(Ordering::SeqCst) & b != 0
    }

    /// Notes that the guest waits for `page`.
    pub(crate) fn set_faulted(&self, page: u64) {
        let (w, b) = bit(page);
        self.faulted[w].fetch_or(b, Ordering::SeqCst);
    }

    /// Clears and returns the faulted mark.
    pub(crate) fn take_faulted(&self, page: u64) -> bool {
        let (w, b) = bit(page);
        self.faulted[w].load(Ordering::SeqCst) & b != 0
            && self.faulted[w].fetch_and(!b, Ordering::SeqCst) & b != 0
    }

    /// Marks `page` as requested; false if it already was.
    pub(crate) fn mark_requested(&self, page: u64) -> bool {
        let (w, b) = bit(page);
        self.requested[w].fetch_or(b, Ordering::AcqRel) & b == 0
    }

    /// After a connection broke: pages claimed but not written (their copy
    /// was cut off) and requests in flight are forgotten, so that the next
    /// connection fetches them again. Call with every receiver stopped.
    pub(crate) fn forget_unfinished(&self) {
        for ((c, r), p) in self.claimed.iter().zip(&self.requested).zip(&self.present) {
            let have = p.load(Ordering::SeqCst);
            c.fetch_and(have, Ordering::AcqRel);
            r.fetch_and(have, Ordering::AcqRel);
        }
    }

    /// The pages not present, as u64 words (bits past the last page clear).
    pub(crate) fn missing_words(&self) -> Vec<u64> {
        let words = self.present.len();
        self.present
            .iter()
            .enumerate()
            .map(|(w, p)| {
                let valid = if w + 1 == words && !self.pages.is_multiple_of(64) {
                    (1u64 << (self.pages % 64)) - 1
                } else {
                    !0
                };
                !p.load(Ordering::SeqCst) & valid
            })
            .collect()
    }

    /// Forgets that `page` was requested (the request could not be sent).
    pub(crate) fn unmark_requested(&self, page: u64) {
        let (w, b) = bit(page);
        self.requested[w].fetch_and(!b, Ordering::AcqRel);
    }

    pub(crate) fn present_count(&self) -> u64 {
        self.present_count.load(Ordering::Acquire)
    }

    pub(crate) fn complete(&self) -> bool {
        self.present_count() == self.pages
    }

    /// Runs of present pages (for mapping them ahead of the guest).
    pub(crate) fn present_runs(&self) -> Vec<(u64, u64)> {
        runs_of(&self.present, self.pages, true)
    }

    /// Pages no receiver has claimed yet (nothing is on its way for them).
    pub(crate) fn unclaimed(&self) -> Vec<(u64, u64)> {
        runs_of(&self.claimed, self.pages, false)
    }
}

fn runs_of(words: &[AtomicU64], pages: u64, want: bool) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut start: Option<u64> = None;
    for (wi, w) in words.iter().enumerate() {
        let v = w.load(Ordering::Acquire);
        let v = if want { v } else { !v };
        let base = wi as u64 * 64;
        // Whole words that neither start nor end a run.
        if (start.is_none() && v == 0) || (start.is_some() && v == !0 && base + 64 <= pages) {
            continue;
        }
        for b in 0..64 {
            let i = base + b;
            if i >= pages {
                break;
            }
            let set = v & (1 << b) != 0;
            match (set, start) {
                (true, None) => start = Some(i),
                (false, Some(s)) => {
                    out.push((s, i - s));
                    start = None;
                }
                _ => {}
            }
        }
    }
    if let Some(s) = start {
        out.push((s, pages - s));
    }
    out
}

/// Demand-fault latencies: exact percentiles from every sample (one u32
/// per fault), and a log2 histogram like QEMU's `postcopy-latency-dist`.
#[derive(Default)]
pub(crate) struct Latencies {
    samples_us: Vec<u32>,
    hist: Vec<u64>,
}

impl Latencies {
    pub(crate) fn add(&mut self, us: u64) {
        self.samples_us.push(us.min(u32::MAX as u64) as u32);
        let b = (64 - us.max(1).leading_zeros() - 1) as usize;
        if self.hist.len() <= b {
            self.hist.resize(b + 1, 0);
        }
        self.hist[b] += 1;
    }

    pub(crate) fn fill(&self, s: &mut PostcopyStats) {
        let mut v = self.samples_us.clone();
        v.sort_unstable();
        let pct = |p: f64| -> u64 {
            if v.is_empty() {
                return 0;
            }
            let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
            v[i] as u64
        };
        s.fault_latency_p50_us = pct(0.50);
        s.fault_latency_p99_us = pct(0.99);
        s.fault_latency_max_us = v.last().copied().unwrap_or(0) as u64;
        s.fault_latency_mean_us = if v.is_empty() {
            0
        } else {
            v.iter().map(|&x| x as u64).sum::<u64>() / v.len() as u64
        };
        s.fault_latency_hist = self.hist.clone();
    }
}

/// Post-copy numbers of one migration (`postcopy` in `ferry status`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PostcopyStats {
    /// Pages whose target copy was not current at the switch (they moved
    /// after it).
    pub stale_pages: u64,
    /// Guest faults on pages that were not there yet (each waited for a
    /// request to the source). Target side.
    pub faults: u64,
    /// First touches of pages that were there but not yet mapped (answered
    /// at once). Target side.
    pub faults_present: u64,
    /// Demand-fault latency, from reading the fault to the page mapped:
    /// median, 99th percentile, mean and maximum, microseconds.
    pub fault_latency_p50_us: u64,
    /// 99th percentile.
    pub fault_latency_p99_us: u64,
    /// Mean.
    pub fault_latency_mean_us: u64,
    /// Maximum.
    pub fault_latency_max_us: u64,
    /// Bucket i counts faults with latency in [2^i, 2^(i+1)) microseconds.
    pub fault_latency_hist: Vec<u64>,
    /// Pages that arrived on the priority stream (demand) and were used.
    pub demand_pages: u64,
    /// Pages that arrived by the background push and were used.
    pub background_pages: u64,
    /// Copies dropped because the page had already arrived the other way.
    pub duplicate_pages: u64,
    /// Pages requested on the priority stream (target) / served (source).
    pub requested_pages: u64,
    /// From the guest running on the target to every page present, ms.
    pub duration_ms: u64,
    /// The pre-copy round after which the migration switched (0: none ran).
    pub switch_after_round: u32,
    /// Times the connection broke and post-copy resumed on a new one.
    #[serde(default)]
    pub reconnects: u32,
    /// Checkpoints the target sent back and the source applied (target:
    /// acknowledged).
    #[serde(default)]
    pub checkpoints: u64,
    /// Pages in them.
    #[serde(default)]
    pub checkpoint_pages: u64,
    /// Target: the longest guest pause a checkpoint took, microseconds.
    #[serde(default)]
    pub checkpoint_pause_max_us: u64,
    /// Target: the mean checkpoint pause, microseconds.
    #[serde(default)]
    pub checkpoint_pause_mean_us: u64,
    /// Source: the target was lost and the VM runs here again, from this
    /// checkpoint (0: from the switch, before any checkpoint).
    #[serde(default)]
    pub taken_back_from: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::source::{Demand, PushOrder, PUSH_STEP};
    use super::*;
    use crate::bitmap::DirtyBitmap;

    #[test]
    fn pages_not_stale_start_present_and_claimed() {
        // 130 pages: two full words and two bits of a third.
        let stale = [0b1010u64, !0, 0b01];
        let s = PageStates::new(130, &stale);
        assert_eq!(s.present_count(), 130 - 2 - 64 - 1);
        assert!(s.is_present(0) && !s.is_present(1) && !s.is_present(3));
        assert!(!s.claim(0), "a current page is never claimed again");
        assert!(s.claim(1), "the first copy of a stale page claims it");
        assert!(!s.claim(1), "a second copy does not");
        assert!(s.set_present(1) && !s.set_present(1));
        assert_eq!(
            s.unclaimed(),
            vec![(3, 1), (64, 65)],
            "page 129 is current; bits past it are not pages"
        );
        s.release(3); // unclaimed anyway
        assert!(s.claim(3));
        s.release(3);
        assert!(s.claim(3), "a released page can be claimed again");
        assert!(!s.complete());
    }

    #[test]
    fn faulted_marks_are_taken_once() {
        let s = PageStates::new(64, &[!0]);
        s.set_faulted(5);
        assert!(s.take_faulted(5));
        assert!(!s.take_faulted(5));
        assert!(s.mark_requested(5) && !s.mark_requested(5));
    }

    #[test]
    fn runs_cover_words_and_ends() {
        let words: Vec<AtomicU64> = [!0u64, !0, 0, 1 << 63]
            .iter()
            .map(|&w| AtomicU64::new(w))
            .collect();
        assert_eq!(runs_of(&words, 256, true), vec![(0, 128), (255, 1)]);
        assert_eq!(runs_of(&words, 256, false), vec![(128, 127)]);
        assert_eq!(runs_of(&words, 200, true), vec![(0, 128)]);
    }

    #[test]
    fn latencies_give_percentiles_and_a_log2_histogram() {
        let mut l = Latencies::default();
        for us in 1..=100 {
            l.add(us);
        }
        let mut s = PostcopyStats::default();
        l.fill(&mut s);
        assert_eq!(s.fault_latency_p50_us, 50);
        assert_eq!(s.fault_latency_p99_us, 99);
        assert_eq!(s.fault_latency_max_us, 100);
        // [1,2) [2,4) [4,8) ... [64,128)
        assert_eq!(s.fault_latency_hist, vec![1, 2, 4, 8, 16, 32, 37]);
    }

    fn demand(pages: u64) -> Demand {
        Demand::new(pages)
    }

    #[test]
    fn push_visits_every_page_once_from_the_latest_fault() {
        let pages = 4 * PUSH_STEP + 10;
        let mut todo = DirtyBitmap::new(pages);
        todo.set_range(0, pages);
        let d = demand(pages);
        let mut order = PushOrder::new(todo);
        // The first step starts at 0; then a fault in step 3 moves the
        // push there; pages served on demand are skipped.
        let (back, first) = order.next(&d).unwrap();
        assert!(!back);
        assert_eq!(first, vec![(0, PUSH_STEP)]);
        d.served.set(3 * PUSH_STEP + 1);
        d.hint(3 * PUSH_STEP + 1);
        let (back, at_fault) = order.next(&d).unwrap();
        assert!(!back, "forward jump keeps frames ascending");
        assert_eq!(
            at_fault,
            vec![(3 * PUSH_STEP, 1), (3 * PUSH_STEP + 2, PUSH_STEP - 2)]
        );
        let mut seen = PUSH_STEP * 2 - 1;
        let mut backs = 0;
        while let Some((back, runs)) = order.next(&d) {
            backs += usize::from(back);
            seen += runs.iter().map(|r| r.1).sum::<u64>();
        }
        assert_eq!(seen, pages - 1, "every page but the served one, once");
        assert_eq!(backs, 1, "one wrap-around");
    }
}
