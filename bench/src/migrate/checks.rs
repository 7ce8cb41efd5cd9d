//! The checks of a finished migration, each from a source the migration
//! code does not control: the VMMs' own reports, the daemons' listings and
//! the guest's progress counter.
//!
//! ```text
//!  completed ──▶ guest progress moves on the target ─▶ source VMM exits
//!               ─▶ memory hash at the pause == target's ─▶ page stamps good
//!  failed / cancelled ──▶ stayed on source: source VMM alive, source ferryd
//!               lists the VM running, its progress moves there, no pause
//!               left unresumed, and the target ferryd has no such VM
//! ```

use std::time::{Duration, Instant};

use anyhow::Result;

use super::report::{BenchResult, Check};
use super::testbed::{Testbed, VM_NAME};
use crate::procs::{self, read_json_lines, POLL};
use ferry_daemon::api::VmState;

/// How long the guest's counter may take to move (on the target after a
/// completion, on the source after a failure): it counts loop iterations,
/// thousands a second, so 3 s only catches a guest that does not run.
const PROGRESS_WAIT: Duration = Duration::from_secs(3);
/// How long the source VMM may take to exit after the hand-off: it hashes
/// guest memory at the pause (xxh3, well over 1 GiB/s even on a loaded core)
/// and finishes that before it quits; 10 s plus 1 s per GiB.
fn source_exit_wait(mem_bytes: u64) -> Duration {
    Duration::from_secs(10 + (mem_bytes >> 30))
}
/// How long the target ferryd may take to drop its record of an incoming
/// migration that failed: it learns of the failure from the source's abort
/// or closed connections, at once; 10 s covers a loaded 2-core machine.
const TARGET_RELEASE_WAIT: Duration = Duration::from_secs(10);

/// The guest's memory hash and progress at the pause, from the source VMM's
/// own report (the last "paused" event).
fn paused_event(tb: &Testbed) -> Result<Option<(String, Option<u64>)>> {
    let events = read_json_lines(&tb.report)?;
    Ok(events
        .iter()
        .rev()
        .find(|e| e["event"] == "paused")
        .map(|e| {
            let hash = e["mem_hash"].as_str().unwrap_or_default().to_owned();
            (hash, e["progress"].as_u64())
        }))
}

/// The four checks of a completed migration, each from a source the migration code does not control.
/// Order matters: the guest's progress is checked first (it must move
/// within seconds of completion), then the source VMM's exit, and only then
/// its report, whose pause hash may be written just before it quits.
pub(super) fn check_completed(
    tb: &mut Testbed,
    snap: &ferry_engine::Snapshot,
    r: &mut BenchResult,
) -> Result<()> {
    let verify = snap.verify.clone().unwrap_or_default();

    // Page stamps: the guest stamps every page it writes; the target VMM
    // checked them before running the VM.
    r.pages_checked = verify.pages_checked;
    r.pages_bad = verify.pages_bad;
    r.checks.page_stamps = Check::new(
        verify.checked && verify.pages_checked > 0 && verify.pages_bad == 0,
        if verify.checked {
            format!(
                "{} pages checked, {} bad",
                verify.pages_checked, verify.pages_bad
            )
        } else {
            "the target VMM did not verify".to_string()
        },
    );

    // Guest progress: the guest runs on the target, so its counter moves past
    // its value at the pause. The baseline is the engine's; it is replaced by
    // the source VMM's own figure below when its report has one.
    let base = snap.guest_progress_at_pause;
    let start = Instant::now();
    let (progress_after, target_state) = loop {
        let now = tb.tgt.api.vm(VM_NAME)?;
        let progress = now.as_ref().and_then(|v| v.progress);
        if progress.is_some_and(|p| p > base) || start.elapsed() > PROGRESS_WAIT {
            break (progress, now.map(|v| v.state));
        }
        procs::sleep(POLL)?;
    };
    let progress_ms = start.elapsed().as_millis();

    // Source stopped: the source VMM exited cleanly after the hand-off and
    // the source ferryd no longer runs the VM.
    let wait = source_exit_wait(r.mem_bytes);
    let exit = tb.vmm_mut()?.wait_timeout(wait)?;
    let listed = tb.src.api.vm(VM_NAME)?;
    let still_running = listed.as_ref().is_some_and(|v| v.state == VmState::Running);
    let listing = match &listed {
        None => "the source ferryd no longer lists it".to_string(),
        Some(v) => format!("the source ferryd lists it as {}", state_name(v.state)),
    };
    r.checks.source_stopped = match exit {
        None => Check::new(
            false,
            format!(
                "ferry-vmm still runs {} s after completion; {listing}",
                wait.as_secs()
            ),
        ),
        Some(st) => Check::new(
            st.success() && !still_running,
            format!("ferry-vmm exited ({st}); {listing}"),
        ),
    };

    // Memory hash: the source VMM hashed all guest memory at the pause; the
    // target VMM hashed what it received, before running it.
    let paused = paused_event(tb)?;
    r.source_mem_hash = paused.as_ref().map(|p| p.0.clone()).unwrap_or_default();
    r.target_mem_hash = verify.mem_hash.clone();
    r.checks.mem_hash = match &paused {
        // Post-copy: the guest ran on the target before its memory was all
        // there, so memory at the end is not memory at the pause; the
        // stamps (checked once every page arrived) carry the check.
        Some(_) if snap.postcopy.is_some() && verify.checked => Check::new(
            true,
            "not comparable after post-copy (the guest ran before its memory was all there); \
             page stamps checked after the last page arrived",
        ),
        None => Check::new(false, "the source VMM reported no pause"),
        Some(_) if !verify.checked => Check::new(false, "the target VMM did not verify"),
        Some((src, _)) if src.is_empty() || verify.mem_hash.is_empty() => Check::new(
            false,
            format!(
                "a hash is missing (source {src:?}, target {:?})",
                verify.mem_hash
            ),
        ),
        Some((src, _)) if src.eq_ignore_ascii_case(&verify.mem_hash) => {
            Check::new(true, format!("source == target == {}", short(src)))
        }
        Some((src, _)) => Check::new(
            false,
            format!(
                "source {} != target {}",
                short(src),
                short(&verify.mem_hash)
            ),
        ),
    };

    // Now judge the progress against the source VMM's own pause figure.
    let base = paused.as_ref().and_then(|p| p.1).unwrap_or(base);
    r.progress_at_pause = base;
    r.progress_after = progress_after.unwrap_or(0);
    r.checks.guest_progress = match (progress_after, target_state) {
        (Some(p), _) if p > base => Check::new(
            true,
            format!("{base} at the pause, {p} on the target {progress_ms} ms later"),
        ),
        (_, None) => Check::new(false, format!("the target ferryd does not list {VM_NAME}")),
        (p, Some(st)) => Check::new(
            false,
            format!(
                "{base} at the pause, {} on the target ({}) after {} s",
                p.map_or("no figure".to_string(), |p| p.to_string()),
                state_name(st),
                PROGRESS_WAIT.as_secs()
            ),
        ),
    };
    Ok(())
}

/// The disk checks of a completed migration: the target's image against the
/// source's, and the guest's block stamps.
pub(super) fn check_disk(
    tb: &Testbed,
    snap: &ferry_engine::Snapshot,
    image: &super::disk::Image,
    guest_writes: bool,
    r: &mut BenchResult,
) -> Result<()> {
    let verify = snap.verify.clone().unwrap_or_default();
    let target = tb.target_disk_dir().join(format!("{VM_NAME}.img"));
    let d = r.disk.get_or_insert_with(Default::default);
    d.blocks_checked = verify.blocks_checked;
    d.blocks_bad = verify.blocks_bad;
    d.target_allocated_bytes = super::disk::allocated_bytes(&target).unwrap_or(0);
    r.checks.disk_image = Some(if !target.exists() {
        Check::new(false, format!("no image at {}", target.display()))
    } else if image.fs.is_some() {
        super::disk::check_ext4(image, &target)
    } else {
        let events = read_json_lines(&tb.report)?;
        let src = events
            .iter()
            .rev()
            .find(|e| e["event"] == "paused")
            .and_then(|e| e["disk_hash"].as_str().map(str::to_owned))
            .unwrap_or_default();
        match (src.as_str(), verify.disk_hash.as_str()) {
            ("", _) | (_, "") => Check::new(
                false,
                format!(
                    "a disk hash is missing (source {src:?}, target {:?})",
                    verify.disk_hash
                ),
            ),
            (a, b) if a.eq_ignore_ascii_case(b) => {
                Check::new(true, format!("source == target == {}", short(a)))
            }
            (a, b) => Check::new(false, format!("source {} != target {}", short(a), short(b))),
        }
    });
    if guest_writes {
        r.checks.block_stamps = Some(Check::new(
            verify.checked && verify.blocks_checked > 0 && verify.blocks_bad == 0,
            format!(
                "{} blocks checked, {} bad",
                verify.blocks_checked, verify.blocks_bad
            ),
        ));
    }
    Ok(())
}

/// After a migration that did not complete: the target kept no image.
pub(super) fn check_disk_removed(tb: &Testbed) -> Check {
    let dir = tb.target_disk_dir();
    let left: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if left.is_empty() {
        Check::new(true, format!("nothing left in {}", dir.display()))
    } else {
        Check::new(
            false,
            format!("left behind in {}: {}", dir.display(), left.join(", ")),
        )
    }
}

/// A VM state as the API spells it.
fn state_name(s: VmState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{s:?}"))
}

/// The first 16 hex digits of a hash, for the table.
fn short(h: &str) -> &str {
    h.get(..16).unwrap_or(h)
}

/// The check of a migration that did not complete: the VM must still run on
/// the source, untouched by the attempt, and nowhere else.
///
/// Four facts, each from outside the engine: the source VMM process still
/// runs; the source ferryd lists the VM as running and its live progress
/// counter (read from the VMM through ferryd) moves; every pause in the
/// source VMM's report was followed by a resume; and the target ferryd does
/// not list the VM (it dropped its incoming record).
pub(super) fn check_stayed(tb: &mut Testbed) -> Result<Check> {
    let mut bad: Vec<String> = Vec::new();
    let mut good: Vec<String> = Vec::new();

    match tb.vmm_mut()?.try_wait()? {
        Some(st) => bad.push(format!("the source ferry-vmm exited ({st})")),
        None => good.push("the source ferry-vmm runs".into()),
    }

    match source_progress(tb)? {
        SourceProgress::Moving { from, to, ms } => good.push(format!(
            "the source ferryd lists {VM_NAME} running, progress {from} -> {to} in {ms} ms"
        )),
        SourceProgress::Stuck { state, from, to } => bad.push(format!(
            "the source ferryd lists {VM_NAME} as {}, progress {} -> {} in {} s",
            state_name(state),
            from.map_or("none".to_string(), |p| p.to_string()),
            to.map_or("none".to_string(), |p| p.to_string()),
            PROGRESS_WAIT.as_secs()
        )),
        SourceProgress::Gone => bad.push(format!("the source ferryd no longer lists {VM_NAME}")),
    }

    let events = read_json_lines(&tb.report)?;
    let count = |name: &str| events.iter().filter(|e| e["event"] == name).count();
    let (paused, resumed) = (count("paused"), count("resumed"));
    if paused > resumed {
        bad.push(format!(
            "the source VMM reports {paused} pauses but {resumed} resumes"
        ));
    } else if paused > 0 {
        good.push(format!("paused and resumed {paused} times"));
    }

    let start = Instant::now();
    let target = loop {
        let listed = tb.tgt.api.vm(VM_NAME)?;
        if listed.is_none() || start.elapsed() > TARGET_RELEASE_WAIT {
            break listed;
        }
        procs::sleep(POLL)?;
    };
    match target {
        None => good.push(format!("the target ferryd has no {VM_NAME}")),
        Some(v) => bad.push(format!(
            "the target ferryd lists {VM_NAME} as {} {} s after the end",
            state_name(v.state),
            TARGET_RELEASE_WAIT.as_secs()
        )),
    }

    Ok(if bad.is_empty() {
        Check::new(true, good.join("; "))
    } else {
        Check::new(false, bad.join("; "))
    })
}

/// What the source ferryd shows of the VM's progress over a few seconds.
#[derive(Debug)]
enum SourceProgress {
    /// Listed as running; the counter moved from `from` to `to` in `ms`.
    Moving { from: u64, to: u64, ms: u128 },
    /// Listed, but not running or its counter did not move.
    Stuck {
        state: VmState,
        from: Option<u64>,
        to: Option<u64>,
    },
    /// Not listed.
    Gone,
}

/// Samples the source VM's live progress until it moves past its first
/// figure or [`PROGRESS_WAIT`] passes. The figure is null while ferryd
/// talks to the VMM, so a null sample is only skipped.
fn source_progress(tb: &Testbed) -> Result<SourceProgress> {
    let start = Instant::now();
    let mut first: Option<u64> = None;
    loop {
        let Some(vm) = tb.src.api.vm(VM_NAME)? else {
            return Ok(SourceProgress::Gone);
        };
        let running = vm.state == VmState::Running;
        match (first, vm.progress) {
            (Some(from), Some(to)) if running && to > from => {
                return Ok(SourceProgress::Moving {
                    from,
                    to,
                    ms: start.elapsed().as_millis(),
                })
            }
            (None, Some(p)) => first = Some(p),
            _ => {}
        }
        if start.elapsed() > PROGRESS_WAIT {
            return Ok(SourceProgress::Stuck {
                state: vm.state,
                from: first,
                to: vm.progress,
            });
        }
        procs::sleep(POLL)?;
    }
}
