//! How many block writes the guest may have made by now.
//!
//! `disk:R` means `R * 256` block writes per second of time the vCPU may
//! run. At every exit the VMM adds the time since the previous exit at that
//! rate and writes the total into `CB_DISK_DUE`; the guest writes blocks
//! while its `CB_DISK_WRITTEN` is below it. Time parked (paused, not yet
//! run) and throttle sleeps do not count, so a guest throttled at p% writes
//! (100 - p)% of the rate, like its memory. Debt beyond what the longest
//! planned wait explains (the memory pacing's sleep of one batch, plus
//! [`DISK_PACING_SLACK`]) is forgotten rather than repaid in a burst.
//!
//! The clock comes in: [`DiskPacer`] does no I/O and reads no time itself.

use std::time::{Duration, Instant};

use crate::abi;

/// Debt forgiven beyond this much time at the rate (plus the planned wait).
pub const DISK_PACING_SLACK: Duration = Duration::from_millis(20);
const NANOS_PER_S: u128 = 1_000_000_000;

/// The disk pacing state of one vCPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskPacer {
    blocks_per_s: Option<u64>,
    /// Debt allowed beyond the planned waits.
    slack: Duration,
    /// Writes due since boot, in 1e-9 blocks.
    due: u128,
    /// Where the last accrual ended (None: parked).
    clock: Option<Instant>,
}

impl DiskPacer {
    /// A pacer at `blocks_per_s` (None: no disk workload) whose longest
    /// planned wait between exits is `planned_wait`.
    pub fn new(blocks_per_s: Option<u64>, planned_wait: Duration) -> Self {
        DiskPacer {
            blocks_per_s,
            slack: DISK_PACING_SLACK + planned_wait,
            due: 0,
            clock: None,
        }
    }

    /// Whether there is a disk workload to pace.
    pub fn active(&self) -> bool {
        self.blocks_per_s.is_some()
    }

    /// The vCPU (re)starts at `now` with `written` writes done: time parked
    /// did not count, and nothing is due below what was written (a restored
    /// guest brings its own count).
    pub fn start(&mut self, now: Instant, written: u64) {
        self.clock = Some(now);
        self.due = self.due.max(u128::from(written) * NANOS_PER_S);
    }

    /// The vCPU parks: until [`Self::start`], time does not count.
    pub fn stop(&mut self) {
        self.clock = None;
    }

    /// A throttle sleep of `sleep` starts now: it will not count.
    pub fn skip(&mut self, sleep: Duration) {
        if let Some(c) = &mut self.clock {
            *c += sleep;
        }
    }

    /// At an exit at `now` with `written` writes done: the writes due since
    /// boot (None without a disk workload).
    pub fn at_exit(&mut self, now: Instant, written: u64) -> Option<u64> {
        let rate = u128::from(self.blocks_per_s?);
        let clock = self.clock.get_or_insert(now);
        // A clock ahead of now: a throttle sleep cut short; nothing accrues.
        let ran = now.saturating_duration_since(*clock);
        *clock = now.max(*clock);
        self.due += ran.as_nanos() * rate;
        let written = u128::from(written) * NANOS_PER_S;
        let slack =
            (self.slack.as_nanos() * rate).max(u128::from(abi::DISK_BATCH_MAX) * NANOS_PER_S);
        self.due = self.due.clamp(written, written + slack);
        Some((self.due / NANOS_PER_S) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn accrues_at_the_rate_from_the_start() {
        let t0 = Instant::now();
        let mut p = DiskPacer::new(Some(5120), Duration::ZERO);
        assert!(p.active());
        p.start(t0, 0);
        assert_eq!(p.at_exit(t0, 0), Some(0));
        assert_eq!(p.at_exit(t0 + 10 * MS, 0), Some(51));
        // The guest keeps up: 1 s at 5120/s.
        let mut written = 0;
        for ms in (20..=1000).step_by(10) {
            written = p.at_exit(t0 + ms * MS, written).unwrap();
        }
        assert_eq!(written, 5120);
        assert_eq!(DiskPacer::new(None, MS).at_exit(t0, 0), None);
    }

    #[test]
    fn parked_time_and_throttle_sleeps_do_not_count() {
        let t0 = Instant::now();
        let mut p = DiskPacer::new(Some(1000), Duration::ZERO);
        p.start(t0, 0);
        assert_eq!(p.at_exit(t0 + 10 * MS, 0), Some(10));
        p.stop();
        // Parked for a second; restarted.
        p.start(t0 + 1010 * MS, 10);
        assert_eq!(p.at_exit(t0 + 1015 * MS, 10), Some(15));
        // A 100 ms throttle sleep from 1015 ms on.
        p.skip(100 * MS);
        assert_eq!(p.at_exit(t0 + 1115 * MS, 15), Some(15));
        assert_eq!(p.at_exit(t0 + 1120 * MS, 15), Some(20));
        // A sleep cut short by a pause: the clock is ahead; nothing accrues.
        p.skip(500 * MS);
        assert_eq!(p.at_exit(t0 + 1130 * MS, 20), Some(20));
    }

    #[test]
    fn debt_is_bounded_by_the_slack_and_the_planned_wait() {
        let t0 = Instant::now();
        // 100 ms of planned wait (a slow dirty batch) + 20 ms of slack.
        let mut p = DiskPacer::new(Some(1000), 100 * MS);
        p.start(t0, 0);
        assert_eq!(p.at_exit(t0 + 100 * MS, 0), Some(100), "one planned wait");
        // A guest that wrote nothing for 10 s owes at most 120 ms of writes.
        assert_eq!(p.at_exit(t0 + 10 * 1000 * MS, 0), Some(120));
        // At least one batch may always be owed, at very low rates.
        let mut slow = DiskPacer::new(Some(1), Duration::ZERO);
        slow.start(t0, 0);
        assert_eq!(
            slow.at_exit(t0 + 1000 * 1000 * MS, 0),
            Some(abi::DISK_BATCH_MAX)
        );
    }

    #[test]
    fn a_restored_guest_starts_from_its_own_count() {
        let t0 = Instant::now();
        let mut p = DiskPacer::new(Some(1000), Duration::ZERO);
        p.start(t0, 123_456);
        assert_eq!(p.at_exit(t0, 123_456), Some(123_456));
        assert_eq!(p.at_exit(t0 + 2 * MS, 123_456), Some(123_458));
    }
}
