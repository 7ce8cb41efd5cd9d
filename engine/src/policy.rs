//! Convergence policies: when pre-copy stops iterating, which dirty pages a
//! round sends, and when to slow the guest down.
//!
//! A policy is pure decision logic. After every round the engine measures
//! the round ([`RoundStats`], plus a dirty count per memory fragment) and asks
//! [`Policy::decide`] what to do; the policy never touches memory, sockets or
//! the VM, so it is unit-tested on recorded traces.
//!
//! ```text
//!  round r sent ──▶ sync dirty log: D_r ──▶ pending = held ∪ D_r
//!     ──▶ decide(stats, fragments) ──▶ Iterate { defer hot pages? freeze fragments?
//!                                                throttle? }  ─▶ round r+1 sends
//!                                                                 pending minus held
//!                                    ──▶ StopAndCopy ─▶ pause, send all pending + D_final
//!                                    ──▶ GiveUp ─▶ the VM keeps running on the source
//! ```
//!
//! The policies (`--policy`):
//!
//! - `baseline`: QEMU's rule. Stop when the estimated downtime (pending pages
//!   at the measured transfer rate) fits `downtime_ms`; else iterate until
//!   `rounds_max` or `time_max`, then give up.
//! - `mp` (memory pattern): classify the guest from the last rounds. It is
//!   *memory-intensive* once its dirty rate reaches [`INTENSIVE_DIRTY_RATIO`]
//!   of the transfer rate, or the pending set stopped shrinking for
//!   [`STALL_ROUNDS`] rounds. Iterating a memory-intensive guest only moves
//!   the same pages again, so stop-and-copy as soon as the estimate fits
//!   `downtime_max_ms`: a bounded extra downtime instead of never converging.
//! - `hot-defer`: a page dirtied at two consecutive syncs is hot; it is held
//!   back (sent in the final round) until a sync finds it clean again.
//! - `fragment`: memory is split into fragments ([`FRAGMENT_PAGES`]). A
//!   fragment whose dirty count stopped shrinking has converged to its
//!   working set: it stops iterating (its pages wait for the final round)
//!   until its dirty count halves. Hot fragments alone decide the end.
//! - `auto-converge`: once the guest is memory-intensive and the estimate is
//!   over the budget, throttle its vCPUs through the VMM, stepwise like QEMU's
//!   cpu-throttle (first [`THROTTLE_FIRST`]%, then +[`THROTTLE_STEP`] per
//!   round, at most [`THROTTLE_MAX`]%); stop when the estimate fits the budget.
//! - `adaptive` (default): hot-defer and fragments choose the pages, where
//!   the held pages are a small part of memory and fit in half the
//!   downtime cap ([`HOLD_SHARE_MAX`]); `mp`'s early stop within
//!   `downtime_max_ms` when the guest is memory-intensive; throttling only
//!   when that estimate is still over `downtime_max_ms` (the other measures
//!   were not enough), straight to the level the measured dirty rate calls
//!   for ([`THROTTLE_TARGET`]) rather than stepwise.
//!
//! Every policy gives up at `rounds_max` or `time_max`, leaving the VM
//! running on the source.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Pages per fragment: 8 MiB, a multiple of the streams' 2 MiB ownership
/// chunk.
pub const FRAGMENT_PAGES: u64 = 2048;
/// Dirty rate over transfer rate at which a guest counts as memory-intensive.
pub const INTENSIVE_DIRTY_RATIO: f64 = 0.8;
/// Rounds without the pending set shrinking by [`SHRINK_FACTOR`] after which
/// a guest counts as memory-intensive.
pub const STALL_ROUNDS: u32 = 2;
/// A count "shrinks" when it falls below this fraction of the previous one.
pub const SHRINK_FACTOR: f64 = 0.9;
/// A guest whose pending set, shrinking at the pace of its last round,
/// needs more than this many further rounds to fit the budget counts as
/// memory-intensive: it converges, but so slowly that iterating costs
/// several times the downtime it saves (each round sends a pending set as
/// large as the downtime it would have cost).
pub const CONVERGE_ROUNDS_MAX: f64 = 3.0;
/// First throttle step, percent of vCPU time taken away.
pub const THROTTLE_FIRST: u8 = 20;
/// Each further step.
pub const THROTTLE_STEP: u8 = 10;
/// The most a guest is throttled.
pub const THROTTLE_MAX: u8 = 99;
/// Stop-and-copy above the plain budget only when the estimate is within this
/// fraction of `downtime_max_ms`: the estimate is a forecast, the cap is a
/// promise.
pub const DOWNTIME_MAX_MARGIN: f64 = 0.75;

/// The policies, as named on the command line and in the API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// QEMU-like: stop when the estimate fits the budget, else iterate.
    Baseline,
    /// Memory pattern: stop early, within `downtime_max_ms`, once the guest
    /// is memory-intensive.
    Mp,
    /// Hold pages dirtied in two consecutive rounds for the final round.
    HotDefer,
    /// Stop iterating fragments whose dirty set converged.
    Fragment,
    /// Throttle the vCPUs stepwise.
    AutoConverge,
    /// All of the above, each where it pays.
    #[default]
    Adaptive,
}

impl PolicyKind {
    /// Every policy, in the order the experiment lists them.
    pub const ALL: [PolicyKind; 6] = [
        PolicyKind::Baseline,
        PolicyKind::Mp,
        PolicyKind::HotDefer,
        PolicyKind::Fragment,
        PolicyKind::AutoConverge,
        PolicyKind::Adaptive,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Baseline => "baseline",
            PolicyKind::Mp => "mp",
            PolicyKind::HotDefer => "hot-defer",
            PolicyKind::Fragment => "fragment",
            PolicyKind::AutoConverge => "auto-converge",
            PolicyKind::Adaptive => "adaptive",
        }
    }

    fn defers_hot(self) -> bool {
        matches!(self, PolicyKind::HotDefer | PolicyKind::Adaptive)
    }
    fn freezes_fragments(self) -> bool {
        matches!(self, PolicyKind::Fragment | PolicyKind::Adaptive)
    }
    fn stops_early(self) -> bool {
        matches!(self, PolicyKind::Mp | PolicyKind::Adaptive)
    }
    fn throttles(self) -> bool {
        matches!(self, PolicyKind::AutoConverge | PolicyKind::Adaptive)
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PolicyKind::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = PolicyKind::ALL.iter().map(|p| p.name()).collect();
                format!("unknown policy {s:?}: expected one of {}", names.join(", "))
            })
    }
}

/// The limits a policy decides within.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The downtime budget: every policy stops when the estimate fits it.
    pub downtime_ms: u64,
    /// The most downtime `mp` / `adaptive` spend to force convergence.
    pub downtime_max_ms: u64,
    /// Give up after this many rounds.
    pub rounds_max: u32,
    /// Give up after this long (pre-copy time).
    pub time_max_ms: u64,
}

/// What one round did and what the sync after it found; the engine measures
/// these, the policy only reads them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RoundStats {
    /// Round number, 1 = the bulk round.
    pub round: u32,
    /// Pre-copy time so far, at the end of this round's sync.
    pub elapsed_ms: u64,
    /// This round's duration.
    pub round_ms: u64,
    /// Pages the round sent.
    pub sent_pages: u64,
    /// Transfer rate to forecast with, pages/s (the engine smooths it over
    /// rounds large enough to measure; see `RateMeter`).
    pub rate_pages_s: f64,
    /// Pages the sync after the round found dirty: D_r.
    pub dirty_pages: u64,
    /// Of those, pages also dirty at the previous sync: D_r ∩ D_(r-1).
    pub hot_pages: u64,
    /// Everything a stop-and-copy now would send: D_r ∪ held pages.
    pub pending_pages: u64,
    /// The throttle the round ran under, percent.
    pub throttle_pct: u8,
    /// Pages of guest memory.
    pub mem_pages: u64,
}

impl RoundStats {
    /// The guest's dirty rate over the round, pages/s.
    pub fn dirty_rate(&self) -> f64 {
        self.dirty_pages as f64 / (self.round_ms.max(1) as f64 / 1000.0)
    }
    /// Forecast downtime of a stop now: pending pages at the transfer rate,
    /// plus the fixed cost of a switchover.
    pub fn estimate_ms(&self) -> u64 {
        let rate = self.rate_pages_s.max(1.0);
        (self.pending_pages as f64 / rate * 1000.0).ceil() as u64 + SWITCHOVER_OVERHEAD_MS
    }
}

/// Further rounds the pending set of `s` needs to fit `budget_ms`, if it
/// keeps shrinking by the ratio it shrank from `prev` pages (infinite if it
/// did not shrink; 0 if it fits).
fn rounds_to_fit(prev: u64, s: &RoundStats, budget_ms: u64) -> f64 {
    let est = s.estimate_ms();
    if est <= budget_ms {
        return 0.0;
    }
    let ratio = s.pending_pages as f64 / prev.max(1) as f64;
    let send_ms = est.saturating_sub(SWITCHOVER_OVERHEAD_MS).max(1) as f64;
    let fit_ms = budget_ms.saturating_sub(SWITCHOVER_OVERHEAD_MS).max(1) as f64;
    if ratio >= 1.0 {
        return f64::INFINITY;
    }
    if ratio <= 0.0 {
        return 1.0;
    }
    (fit_ms / send_ms).ln() / ratio.ln()
}

/// The throttle that brings the guest's dirty rate to [`THROTTLE_TARGET`]
/// of the transfer rate, from the rate measured under the current throttle
/// (which scales it by (100 - p) / 100).
fn needed_throttle(s: &RoundStats) -> u8 {
    let running = (100 - u32::from(s.throttle_pct.min(THROTTLE_MAX))) as f64 / 100.0;
    let unthrottled = s.dirty_rate() / running;
    if unthrottled <= 0.0 {
        return 0;
    }
    let keep = (THROTTLE_TARGET * s.rate_pages_s / unthrottled).clamp(0.0, 1.0);
    ((1.0 - keep) * 100.0).ceil().min(THROTTLE_MAX as f64) as u8
}

/// Adaptive throttles towards a dirty rate of this fraction of the
/// transfer rate, where pre-copy converges quickly.
pub const THROTTLE_TARGET: f64 = 0.5;

/// The most of guest memory adaptive holds back.
pub const HOLD_SHARE_MAX: f64 = 0.25;

/// Fixed cost of a switchover besides moving pages: pause, state, PREPARE,
/// COMMIT, resume (measured at 2-5 ms on loopback).
pub const SWITCHOVER_OVERHEAD_MS: u64 = 5;

/// What happens next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Another round.
    Iterate,
    /// Pause the guest and send everything pending.
    StopAndCopy,
    /// Give up: stop logging, the VM keeps running on the source.
    GiveUp,
}

/// A policy's answer after one round.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Iterate, stop, or give up.
    pub action: Action,
    /// Next round: hold back pages dirty at both of the last two syncs.
    pub defer_hot: bool,
    /// Next round: hold back the pages of these fragments (indexes).
    pub frozen: Vec<bool>,
    /// vCPU throttle to apply now, percent (0 = none).
    pub throttle_pct: u8,
    /// The downtime the engine forecast for a stop now.
    pub estimate_ms: u64,
    /// How the policy sees the guest: "converging" or "memory-intensive".
    pub class: &'static str,
    /// One line for the log and `ferry status`.
    pub reason: String,
}

/// A policy with its state across rounds (classification history, throttle
/// level, frozen fragments).
#[derive(Clone, Debug)]
pub struct Policy {
    kind: PolicyKind,
    limits: Limits,
    /// Pending pages at the previous decision.
    prev_pending: Option<u64>,
    /// Consecutive rounds the pending set did not shrink.
    stalled: u32,
    intensive: bool,
    throttle: u8,
    /// Per fragment: its dirty count at the previous sync.
    frag_prev: Vec<u64>,
    /// Per fragment: the dirty count it was frozen at (None: iterating).
    frag_frozen_at: Vec<Option<u64>>,
}

impl Policy {
    /// A fresh policy for a guest of `fragments` fragments.
    pub fn new(kind: PolicyKind, limits: Limits, fragments: usize) -> Self {
        Policy {
            kind,
            limits,
            prev_pending: None,
            stalled: 0,
            intensive: false,
            throttle: 0,
            frag_prev: vec![0; fragments],
            frag_frozen_at: vec![None; fragments],
        }
    }

    /// Which policy this is.
    pub fn kind(&self) -> PolicyKind {
        self.kind
    }

    /// Decides after round `s`; `frag_dirty[f]` is fragment f's count in
    /// D_r (the engine passes one entry per fragment).
    pub fn decide(&mut self, s: &RoundStats, frag_dirty: &[u64]) -> Decision {
        let est = s.estimate_ms();
        self.classify(s);
        let frozen = self.update_fragments(s, frag_dirty);
        let over_rounds = s.round >= self.limits.rounds_max;
        let over_time = s.elapsed_ms >= self.limits.time_max_ms;
        let class = if self.intensive {
            "memory-intensive"
        } else {
            "converging"
        };
        let mut d = Decision {
            action: Action::Iterate,
            defer_hot: self.kind.defers_hot() && s.round >= 2,
            frozen,
            throttle_pct: self.throttle,
            estimate_ms: est,
            class,
            reason: String::new(),
        };
        let budget = self.limits.downtime_ms;
        let cap = self.limits.downtime_max_ms.max(budget);
        let cap_margin = (cap as f64 * DOWNTIME_MAX_MARGIN) as u64;
        if self.kind == PolicyKind::Adaptive {
            self.guard_holds(s, frag_dirty, cap_margin, &mut d);
        }
        if est <= budget {
            d.action = Action::StopAndCopy;
            d.reason = format!(
                "stop-and-copy: {} pages in ~{est} ms fit the {budget} ms budget",
                s.pending_pages
            );
            return d;
        }
        if self.kind.stops_early() && self.intensive && est <= cap_margin {
            d.action = Action::StopAndCopy;
            d.reason = format!(
                "stop-and-copy (memory-intensive): {} pages in ~{est} ms, within {cap_margin} ms of the {cap} ms cap",
                s.pending_pages
            );
            return d;
        }
        if over_rounds || over_time {
            d.action = Action::GiveUp;
            d.reason = format!(
                "give up: ~{est} ms still over the {budget} ms budget after {} rounds and {} ms",
                s.round, s.elapsed_ms
            );
            return d;
        }
        // Throttle: auto-converge whenever the guest is memory-intensive;
        // adaptive only when even the early stop does not fit.
        let needs_throttle = self.intensive
            && match self.kind {
                PolicyKind::AutoConverge => true,
                PolicyKind::Adaptive => est > cap_margin,
                _ => false,
            };
        if self.kind.throttles() && needs_throttle && self.throttle < THROTTLE_MAX {
            let step = if self.throttle == 0 {
                THROTTLE_FIRST
            } else {
                self.throttle
                    .saturating_add(THROTTLE_STEP)
                    .min(THROTTLE_MAX)
            };
            // Adaptive goes straight to the throttle the measurements call
            // for (the stepwise ramp is auto-converge's, as in QEMU).
            let needed = if self.kind == PolicyKind::Adaptive {
                needed_throttle(s)
            } else {
                0
            };
            self.throttle = step.max(needed);
            d.throttle_pct = self.throttle;
            d.reason = format!(
                "iterate, throttle the guest to {}%: ~{est} ms over the budget, dirtying {:.0} pages/s against {:.0} sent",
                self.throttle,
                s.dirty_rate(),
                s.rate_pages_s
            );
            return d;
        }
        let held = d.frozen.iter().filter(|&&f| f).count();
        d.reason = format!("iterate ({class}): ~{est} ms over the {budget} ms budget");
        if d.defer_hot && s.hot_pages > 0 {
            d.reason += &format!(", {} hot pages held", s.hot_pages);
        }
        if held > 0 {
            d.reason += &format!(", {held} fragments frozen");
        }
        d
    }

    /// Adaptive holds pages back only where that pays: the held set must be
    /// a small part of guest memory (else the "hot set" is all of memory,
    /// and holding it just alternates empty and full rounds) and must fit
    /// in half the downtime cap, since it all goes in the final round.
    fn guard_holds(&self, s: &RoundStats, frag_dirty: &[u64], cap_ms: u64, d: &mut Decision) {
        let rate = s.rate_pages_s.max(1.0);
        let fits = |pages: u64| {
            pages as f64 <= HOLD_SHARE_MAX * s.mem_pages as f64
                && (pages as f64 / rate * 1000.0) as u64 <= cap_ms / 2
        };
        if d.defer_hot && !fits(s.hot_pages) {
            d.defer_hot = false;
        }
        let frozen: u64 = frag_dirty
            .iter()
            .zip(&d.frozen)
            .filter(|(_, &f)| f)
            .map(|(&n, _)| n)
            .sum();
        let hot = if d.defer_hot { s.hot_pages } else { 0 };
        if frozen > 0 && !fits(frozen + hot) {
            d.frozen.iter_mut().for_each(|f| *f = false);
        }
    }

    fn classify(&mut self, s: &RoundStats) {
        // The bulk round's "dirty set" is a different thing (all of memory);
        // the pattern shows from the first dirty round on.
        let mut slow = false;
        if let Some(prev) = self.prev_pending.filter(|_| s.round >= 2) {
            if (s.pending_pages as f64) < prev as f64 * SHRINK_FACTOR {
                self.stalled = 0;
            } else {
                self.stalled += 1;
            }
            slow = rounds_to_fit(prev, s, self.limits.downtime_ms) > CONVERGE_ROUNDS_MAX;
        }
        self.prev_pending = Some(s.pending_pages);
        let fast_dirtier = s.round >= 2
            && s.rate_pages_s > 0.0
            && s.dirty_rate() >= INTENSIVE_DIRTY_RATIO * s.rate_pages_s;
        // Once intensive, it stays so: throttling lowers the measured rate,
        // which is the remedy working, not the guest changing.
        if fast_dirtier || slow || self.stalled >= STALL_ROUNDS {
            self.intensive = true;
        }
    }

    fn update_fragments(&mut self, s: &RoundStats, frag_dirty: &[u64]) -> Vec<bool> {
        let n = self.frag_prev.len();
        if !self.kind.freezes_fragments() || frag_dirty.len() != n {
            return vec![false; n];
        }
        if s.round >= 2 {
            for (f, &now) in frag_dirty.iter().enumerate() {
                match self.frag_frozen_at[f] {
                    None => {
                        let prev = self.frag_prev[f];
                        // Converged: still dirty, and not shrinking.
                        if now > 0 && now as f64 >= prev as f64 * SHRINK_FACTOR && prev > 0 {
                            self.frag_frozen_at[f] = Some(now);
                        }
                    }
                    Some(at) => {
                        // Cooled down: iterate it again.
                        if now * 2 <= at {
                            self.frag_frozen_at[f] = None;
                        }
                    }
                }
            }
        }
        self.frag_prev.copy_from_slice(frag_dirty);
        self.frag_frozen_at.iter().map(Option::is_some).collect()
    }
}

#[cfg(test)]
mod tests;
