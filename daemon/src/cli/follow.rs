//! Following a migration to its end: a progress bar on a terminal, plain
//! lines otherwise, or only the final snapshot as JSON.

use std::time::Duration;

use ferry_engine::{Snapshot, Status, PAGE_SIZE};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{print_json, Fail, EXIT_FAILED, EXIT_UNKNOWN};
use crate::client::Client;
use crate::migrations::status_name;

/// How often the migration is polled: smooth enough for a bar, one tiny
/// request per 100 ms for ferryd.
const POLL: Duration = Duration::from_millis(100);

/// How to show progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// An indicatif bar (stdout is a terminal).
    Bar,
    /// One line per round or status change.
    Lines,
    /// Nothing until the end, then the snapshot as JSON.
    Json,
}

/// True when the migration will change no more (COMMIT-unknown included:
/// ferryd cannot resolve it by itself).
pub fn is_terminal(s: Status) -> bool {
    s.is_final() || s == Status::Unknown
}

/// Polls migration `id` until it ends; returns the exit code.
pub fn follow(client: &Client, id: &str, mode: Mode) -> Result<u8, Fail> {
    let path = format!("/api/v1/migrations/{id}");
    let bar = (mode == Mode::Bar).then(new_bar);
    let mut last: Option<(Status, u32)> = None;
    let snap = loop {
        let snap: Snapshot = client.get(&path)?;
        let key = (snap.status, snap.iterations);
        match (&bar, mode) {
            (Some(bar), _) => draw(bar, &snap),
            (None, Mode::Lines) if last != Some(key) => println!("{}", line(&snap)),
            _ => {}
        }
        last = Some(key);
        if is_terminal(snap.status) {
            break snap;
        }
        std::thread::sleep(POLL);
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match mode {
        Mode::Json => print_json(&snap),
        Mode::Bar | Mode::Lines => {
            if snap.status == Status::Completed {
                println!("{}", summary(&snap));
            }
        }
    }
    let error = snap.error.as_deref().unwrap_or("no reason given");
    match snap.status {
        Status::Completed => Ok(0),
        // The error says which: "commit outcome unknown: ..." or
        // "post-copy broke off: ...".
        Status::Unknown => Err(Fail::new(EXIT_UNKNOWN, format!("migration {id}: {error}"))),
        Status::Cancelled => Err(Fail::new(
            EXIT_FAILED,
            format!(
                "migration {id} was cancelled; {} keeps running here",
                snap.vm
            ),
        )),
        _ => Err(Fail::new(
            EXIT_FAILED,
            format!("migration {id} failed: {error}"),
        )),
    }
}

fn new_bar() -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stdout());
    let style = ProgressStyle::with_template("{prefix:>11} [{bar:30}] {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Guest bytes moved: memory pages, and disk blocks for a VM with a disk.
fn moved_bytes(s: &Snapshot) -> u64 {
    s.guest_bytes + s.disk.as_ref().map_or(0, |d| d.blocks * PAGE_SIZE as u64)
}

/// What the bulk round moves: all of memory, and the disk's bulk blocks.
fn bulk_bytes(s: &Snapshot) -> u64 {
    s.mem_bytes
        + s.disk
            .as_ref()
            .map_or(0, |d| d.bulk_blocks * PAGE_SIZE as u64)
}

fn draw(bar: &ProgressBar, s: &Snapshot) {
    let left = remaining_bytes(s);
    bar.set_length(moved_bytes(s) + left);
    bar.set_position(moved_bytes(s));
    bar.set_prefix(status_name(s.status));
    bar.set_message(format!(
        "{} · {} of {} · {:.0} MiB/s · ETA {}",
        round(s),
        mib(moved_bytes(s)),
        mib(bulk_bytes(s)),
        guest_rate_mib_s(s),
        eta(s, left)
    ));
}

/// "round N" for the round in progress (`iterations` counts finished ones;
/// the switchover is the last round), "N rounds" once they are over.
fn round(s: &Snapshot) -> String {
    match s.status {
        Status::Setup => "round 0".into(),
        Status::Active | Status::Switchover => format!("round {}", s.iterations + 1),
        Status::Postcopy => "post-copy".into(),
        _ => format!("{} rounds", s.iterations),
    }
}

/// Guest bytes still to send: the rest of the bulk round while it runs
/// (`iterations` counts finished rounds), then the pages (and disk blocks)
/// dirty at the last sync.
fn remaining_bytes(s: &Snapshot) -> u64 {
    if s.iterations == 0 {
        bulk_bytes(s).saturating_sub(moved_bytes(s))
    } else {
        s.remaining_pages * PAGE_SIZE as u64
    }
}

/// Guest bytes moved per second so far: what the ETA divides by (the wire
/// rate is lower whenever pages compress).
fn guest_rate_mib_s(s: &Snapshot) -> f64 {
    let secs = s.total_time_ms.max(1) as f64 / 1000.0;
    moved_bytes(s) as f64 / (1024.0 * 1024.0) / secs
}

fn eta(s: &Snapshot, left: u64) -> String {
    let rate = guest_rate_mib_s(s);
    if rate < 0.01 {
        return "-".into();
    }
    format!("{:.1}s", left as f64 / (rate * 1024.0 * 1024.0))
}

/// One plain progress line.
pub fn line(s: &Snapshot) -> String {
    let disk = s.disk.as_ref().map_or(String::new(), |d| {
        format!(
            " (disk: {} of {} sent, {} blocks dirty)",
            mib(d.blocks * PAGE_SIZE as u64),
            mib(d.bulk_blocks * PAGE_SIZE as u64),
            d.remaining_blocks
        )
    });
    format!(
        "{:>7.1}s {} {}: {} of {} sent ({:.0} MiB/s), {} on the wire ({:.0} MiB/s), {} pages dirty{disk}",
        s.total_time_ms as f64 / 1000.0,
        status_name(s.status),
        round(s),
        mib(moved_bytes(s)),
        mib(bulk_bytes(s)),
        guest_rate_mib_s(s),
        mib(s.transferred_bytes),
        s.throughput_mib_s,
        s.remaining_pages
    )
}

/// The closing line of a completed migration.
pub fn summary(s: &Snapshot) -> String {
    format!(
        "migration {} completed: {} now runs on {} (epoch {}); total {} ms, downtime {} ms, {} rounds, {} on the wire",
        s.id,
        s.vm,
        s.peer,
        s.epoch,
        s.total_time_ms,
        s.downtime_ms,
        s.iterations,
        mib(s.transferred_bytes)
    )
}

/// Bytes as MiB with one decimal below 10 MiB.
pub fn mib(bytes: u64) -> String {
    let m = bytes as f64 / (1024.0 * 1024.0);
    if m < 10.0 {
        format!("{m:.1} MiB")
    } else {
        format!("{m:.0} MiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_engine::metrics::DiskStats;

    fn snap() -> Snapshot {
        Snapshot {
            status: Status::Active,
            mem_bytes: 256 << 20,
            guest_bytes: 64 << 20,
            total_time_ms: 1000,
            ..Snapshot::default()
        }
    }

    #[test]
    fn progress_counts_memory_alone_without_a_disk() {
        let s = snap();
        assert_eq!(moved_bytes(&s), 64 << 20);
        assert_eq!(remaining_bytes(&s), 192 << 20);
        let l = line(&s);
        assert!(l.contains("64 MiB of 256 MiB sent"), "{l}");
        assert!(!l.contains("disk"), "{l}");
    }

    #[test]
    fn progress_counts_disk_blocks_with_memory() {
        let mut s = snap();
        s.disk = Some(DiskStats {
            bulk_blocks: 256 * 256,
            blocks: 64 * 256,
            remaining_blocks: 7,
            ..DiskStats::default()
        });
        // 64 MiB of memory and 64 MiB of disk moved, of 256 + 256.
        assert_eq!(moved_bytes(&s), 128 << 20);
        assert_eq!(remaining_bytes(&s), 384 << 20);
        let l = line(&s);
        assert!(l.contains("128 MiB of 512 MiB sent"), "{l}");
        assert!(
            l.contains("(disk: 64 MiB of 256 MiB sent, 7 blocks dirty)"),
            "{l}"
        );
    }
}
