//! CPU time the two ferryds spend on one migration, from `/proc`.
//!
//! What is counted, per daemon: user + system time of the ferryd process
//! (all of its threads, including threads that exit during the migration:
//! `/proc/<pid>/stat` fields 14 and 15 fold those in) from just before
//! ferry-bench sends `POST /migrations` to the status poll that sees the
//! migration final (polled every 200 ms; the daemons are idle by then
//! apart from answering those polls).
//!
//! What is not counted: the VMMs (separate processes: the source VMM is
//! ferry-bench's child, the target VMM the target ferryd's, unreaped while it
//! runs), the link blast, the warm-up, and on the target the refill of the
//! memory reserve. The target refills its reserve in a thread named
//! `ferry-reserve` that starts when the incoming migration is over, and
//! pre-faulting a reserve as large as the guest costs over 0.3 CPU s per GiB
//! here, more than receiving. A sampler thread lists the target's threads
//! every [`SAMPLE`] (reading a new thread's name on two samples, since a
//! thread names itself just after it starts); when a new `ferry-reserve`
//! thread appears, the target's measurement ends there, less that thread's
//! own time so far. A refill that
//! starts and ends within one sampling period (a guest of a few MiB) is
//! counted; it costs less than one period of CPU.
//!
//! Resolution: the kernel reports these times in clock ticks (10 ms at the
//! usual USER_HZ of 100), so a figure is good to about one tick per reading.
//!
//! ```text
//!  before: ticks(src), ticks(tgt), tgt's thread ids
//!    ── POST /migrations ── poll ... poll (final) ──▶ after: ticks(src)
//!    sampler, every 10 ms: a new tgt thread named ferry-reserve?
//!      yes ─▶ after(tgt) = ticks(tgt) - ticks(that thread); stop sampling
//!  at the end, if none appeared ─▶ after(tgt) = ticks(tgt)
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

/// Period of the target sampler: one clock tick at USER_HZ 100, so the cut
/// is as fine as the counters. Listing a ferryd's ~20 threads costs tens of
/// microseconds: under 0.5% of one CPU.
pub const SAMPLE: Duration = Duration::from_millis(10);
/// The name ferry-engine gives the thread that refills the memory reserve.
const RESERVE_THREAD: &str = "ferry-reserve";
/// The name the kernel gives the daemon (its executable's, cut to 15 bytes).
const DAEMON_COMM: &str = "ferryd";
const GIB: f64 = (1u64 << 30) as f64;

/// CPU the ferryds spent on the migration (see the module docs for what
/// is counted).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct CpuUse {
    /// Source ferryd, user + system, ms.
    pub source_ms: u64,
    /// Target ferryd, user + system, ms, without the reserve refill.
    pub target_ms: u64,
    /// The target's reserve refill left out of `target_ms`, ms (0 when no
    /// refill was seen).
    pub target_refill_ms: u64,
    /// `source_ms` in s per GiB of guest memory moved (`guest_bytes`);
    /// `None` when nothing was moved.
    pub source_s_per_gib: Option<f64>,
    /// `target_ms` in s per GiB of guest memory moved.
    pub target_s_per_gib: Option<f64>,
    /// One clock tick, the counters' resolution, ms.
    pub tick_ms: f64,
}

impl CpuUse {
    /// Fills the per-GiB figures from the guest bytes moved.
    pub fn per_gib(mut self, guest_bytes: u64) -> Self {
        let per = |ms: u64| {
            (guest_bytes > 0).then(|| {
                (ms as f64 / 1000.0 / (guest_bytes as f64 / GIB) * 1000.0).round() / 1000.0
            })
        };
        self.source_s_per_gib = per(self.source_ms);
        self.target_s_per_gib = per(self.target_ms);
        self
    }
}

/// One line of `/proc/<pid>/stat` (or `/proc/<pid>/task/<tid>/stat`): the
/// command name and utime + stime in clock ticks.
fn parse_stat(text: &str) -> Option<(&str, u64)> {
    // The name is in parentheses and may hold spaces and parentheses itself:
    // it ends at the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?;
    // Fields after the name start at field 3 (state); utime is field 14,
    // stime 15 (proc(5)).
    let mut rest = text.get(close + 1..)?.split_ascii_whitespace().skip(11);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some((comm, utime.checked_add(stime)?))
}

fn read_stat(path: &str) -> Result<(String, u64)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    let (comm, ticks) = parse_stat(&text).ok_or_else(|| anyhow!("{path}: unexpected format"))?;
    Ok((comm.to_string(), ticks))
}

/// utime + stime of process `pid`, all threads, in ticks.
fn process_ticks(pid: u32) -> Result<u64> {
    Ok(read_stat(&format!("/proc/{pid}/stat"))?.1)
}

/// The ids of `pid`'s live threads.
fn thread_ids(pid: u32) -> Result<Vec<u32>> {
    let dir = format!("/proc/{pid}/task");
    let mut ids = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
        let e = e.with_context(|| format!("cannot list {dir}"))?;
        if let Some(id) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// Clock ticks per second (USER_HZ).
fn ticks_per_s() -> Result<u64> {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => Ok(t as u64),
        other => bail!("sysconf(_SC_CLK_TCK) gave {other:?}"),
    }
}

/// Where the target's measurement ended.
#[derive(Clone, Copy, Debug, PartialEq)]
struct TargetEnd {
    /// The process's ticks at the cut.
    process: u64,
    /// The refill thread's ticks at the cut (left out).
    refill: u64,
}

/// Samples of a new thread after which its name is taken as final: a
/// thread names itself right after it starts (Rust's `Builder::name` does it
/// on the new thread), so until then it shows its creator's name.
const NAME_SAMPLES: u8 = 2;

/// Samples `pid` until `stop`, returning the cut at the first new refill
/// thread, if one appeared. `known` are the threads alive at the start.
fn sample_target(pid: u32, mut known: HashSet<u32>, stop: &AtomicBool) -> Option<TargetEnd> {
    // New threads whose name may still change, and how often they were seen.
    let mut naming: HashMap<u32, u8> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        // A read error means the daemon is gone; the run reports that.
        let ids = thread_ids(pid).ok()?;
        naming.retain(|tid, _| ids.contains(tid));
        for tid in ids {
            if known.contains(&tid) {
                continue;
            }
            let path = format!("/proc/{pid}/task/{tid}/stat");
            // A thread may exit between the listing and this read.
            let Ok((comm, refill)) = read_stat(&path) else {
                continue;
            };
            if comm == RESERVE_THREAD {
                // The thread's ticks first, the process's after. The kernel
                // scales a thread's and a thread group's times separately, so
                // the two may disagree by a tick or so; the sum saturates.
                let process = process_ticks(pid).ok()?;
                return Some(TargetEnd { process, refill });
            }
            let seen = naming.entry(tid).or_insert(0);
            *seen += 1;
            if *seen >= NAME_SAMPLES {
                naming.remove(&tid);
                known.insert(tid);
            }
        }
        std::thread::sleep(SAMPLE);
    }
    None
}

/// A measurement in progress; [`Meter::finish`] ends it.
#[derive(Debug)]
pub struct Meter {
    source_pid: u32,
    target_pid: u32,
    source_before: u64,
    target_before: u64,
    stop: Arc<AtomicBool>,
    /// `None` once joined.
    sampler: Option<JoinHandle<Option<TargetEnd>>>,
    tick_ms: f64,
}

impl Drop for Meter {
    /// A run that broke off never calls `finish`: stop the sampler anyway.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Meter {
    /// Takes the "before" readings of both ferryds and starts the target
    /// sampler. Fails if either pid is not a ferryd (under `ip netns exec`
    /// the child becomes ferryd by exec, keeping its pid).
    pub fn start(source_pid: u32, target_pid: u32) -> Result<Self> {
        for pid in [source_pid, target_pid] {
            let (comm, _) = read_stat(&format!("/proc/{pid}/stat"))?;
            if comm != DAEMON_COMM {
                bail!("process {pid} is {comm:?}, not {DAEMON_COMM}");
            }
        }
        let tick_ms = 1000.0 / ticks_per_s()? as f64;
        let known: HashSet<u32> = thread_ids(target_pid)?.into_iter().collect();
        let source_before = process_ticks(source_pid)?;
        let target_before = process_ticks(target_pid)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sampler = std::thread::Builder::new()
            .name("cpu-sampler".into())
            .spawn(move || sample_target(target_pid, known, &flag))
            .context("cannot start the CPU sampler thread")?;
        Ok(Meter {
            source_pid,
            target_pid,
            source_before,
            target_before,
            stop,
            sampler: Some(sampler),
            tick_ms,
        })
    }

    /// Takes the "after" readings (call it once the migration is final).
    /// The per-GiB figures are left for [`CpuUse::per_gib`].
    pub fn finish(mut self) -> Result<CpuUse> {
        let source_after = process_ticks(self.source_pid)?;
        self.stop.store(true, Ordering::Relaxed);
        let end = self
            .sampler
            .take()
            .context("the CPU sampler was already joined")?
            .join()
            .map_err(|_| anyhow!("the CPU sampler thread panicked"))?;
        let end = match end {
            Some(e) => e,
            None => TargetEnd {
                process: process_ticks(self.target_pid)?,
                refill: 0,
            },
        };
        Ok(account(
            (self.source_before, source_after),
            (self.target_before, end),
            self.tick_ms,
        ))
    }
}

/// The figures from tick readings.
fn account(source: (u64, u64), target: (u64, TargetEnd), tick_ms: f64) -> CpuUse {
    let ms = |ticks: u64| (ticks as f64 * tick_ms).round() as u64;
    let (s0, s1) = source;
    let (t0, end) = target;
    // Counters only grow; a smaller "after" would be a bug of ours.
    debug_assert!(s1 >= s0 && end.process >= t0);
    CpuUse {
        source_ms: ms(s1.saturating_sub(s0)),
        target_ms: ms(end.process.saturating_sub(t0).saturating_sub(end.refill)),
        target_refill_ms: ms(end.refill),
        tick_ms,
        ..CpuUse::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_lines_with_awkward_names() {
        // proc(5): pid (comm) state ppid pgrp session tty tpgid flags minflt
        // cminflt majflt cmajflt utime stime ...
        let line = "4242 (ferryd) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 9 0";
        assert_eq!(parse_stat(line), Some(("ferryd", 42)));
        let odd = "7 (a) b (c) R 1 7 7 0 -1 0 0 0 0 0 1 2 0 0";
        assert_eq!(parse_stat(odd), Some(("a) b (c", 3)));
        for bad in [
            "",
            "1 ferryd S",
            "1 (x) S 1 2 3",
            "1 (x) S 1 1 1 0 -1 0 0 0 0 0 z 1",
        ] {
            assert_eq!(parse_stat(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        // Burn a little CPU so the counters cannot both read 0.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(30) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        let (comm, ticks) = read_stat(&format!("/proc/{me}/stat")).unwrap();
        assert!(!comm.is_empty());
        assert!(ticks > 0);
        assert!(thread_ids(me).unwrap().contains(&me));
        assert!(ticks_per_s().unwrap() >= 1);
        // Not a ferryd: refused.
        let e = Meter::start(me, me).unwrap_err().to_string();
        assert!(e.contains("not ferryd"), "{e}");
    }

    #[test]
    fn sampler_cuts_at_a_new_reserve_thread() {
        let me = std::process::id();
        let known: HashSet<u32> = thread_ids(me).unwrap().into_iter().collect();
        let stop = Arc::new(AtomicBool::new(false));
        // A failing test must not hang: give up after 10 s.
        let flag = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(10));
            flag.store(true, Ordering::Relaxed);
        });
        let spin = std::thread::Builder::new()
            .name(RESERVE_THREAD.into())
            .spawn(|| {
                let t = std::time::Instant::now();
                while t.elapsed() < Duration::from_millis(300) {
                    std::hint::spin_loop();
                }
            })
            .unwrap();
        let end = sample_target(me, known, &stop).expect("the thread was not seen");
        // Separately scaled kernel counters: allow a few ticks of disagreement.
        assert!(end.process + 5 >= end.refill, "{end:?}");
        spin.join().unwrap();
        // Stopped before anything appears: no cut.
        let known: HashSet<u32> = thread_ids(me).unwrap().into_iter().collect();
        let stopped = AtomicBool::new(true);
        assert_eq!(sample_target(me, known, &stopped), None);
    }

    #[test]
    fn accounts_ticks_and_per_gib() {
        let c = account(
            (100, 160),
            (
                50,
                TargetEnd {
                    process: 90,
                    refill: 3,
                },
            ),
            10.0,
        );
        assert_eq!(
            (c.source_ms, c.target_ms, c.target_refill_ms),
            (600, 370, 30)
        );
        let c = c.per_gib(2 << 30);
        assert_eq!(c.source_s_per_gib, Some(0.3));
        assert_eq!(c.target_s_per_gib, Some(0.185));
        let none = c.per_gib(0);
        assert_eq!((none.source_s_per_gib, none.target_s_per_gib), (None, None));
    }
}
