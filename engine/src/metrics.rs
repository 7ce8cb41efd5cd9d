//! Migration metrics: one context per migration, like QEMU's query-migrate.
//!
//! The engine updates a [`Metrics`] as it goes; daemons and the CLI read
//! [`Metrics::snapshot`] at any time. Counters are atomics so the data path
//! updates them without locks; the rest sits behind a mutex touched once per
//! round.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Connecting, handshaking, sending the spec.
    #[default]
    Setup,
    /// Copying memory while the guest runs.
    Active,
    /// The guest is paused; final pages and state are moving.
    Switchover,
    /// PREPARE sent, waiting for PREPARED / sending COMMIT.
    Committing,
    /// Post-copy: the VM runs on the target; the pages it lacks still move.
    Postcopy,
    /// Done: the VM runs on the target.
    Completed,
    /// Failed before COMMIT: the VM runs on the source.
    Failed,
    /// Cancelled by the user before COMMIT: the VM runs on the source.
    Cancelled,
    /// COMMIT was sent but never acknowledged: the outcome is for the target to
    /// tell; the source keeps the VM paused until it knows.
    Unknown,
}

impl Status {
    /// True once the migration can change no more.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }
}

/// A point-in-time copy of a migration's numbers (the JSON of `ferry status`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Migration id.
    pub id: String,
    /// VM name.
    pub vm: String,
    /// "source" or "target".
    pub role: String,
    /// Peer address.
    pub peer: String,
    /// Where it is.
    pub status: Status,
    /// The error, for failed migrations.
    pub error: Option<String>,
    /// Transport name.
    pub transport: String,
    /// Data streams.
    pub streams: u32,
    /// "precopy", "postcopy" or "hybrid" (as asked; `postcopy` below says
    /// whether a hybrid migration switched).
    pub mode: String,
    /// Convergence policy.
    pub policy: String,
    /// Guest RAM.
    pub mem_bytes: u64,
    /// Time since the start (final once completed), excluding the target
    /// VMM's verification pass (`verify_ms`), which only test runs make.
    pub total_time_ms: u64,
    /// Connect + handshake + spec exchange.
    pub setup_time_ms: u64,
    /// Guest paused to guest running on the target (excluding the oracle's
    /// verification pass, reported as `verify_ms`).
    pub downtime_ms: u64,
    /// Target VMM's verification time, excluded from downtime.
    pub verify_ms: u64,
    /// Downtime the policy expected when it chose to stop.
    pub expected_downtime_ms: u64,
    /// Rounds done (the bulk round is 1).
    pub iterations: u32,
    /// Bytes on the wire (headers included).
    pub transferred_bytes: u64,
    /// Guest bytes moved (pages sent x page size).
    pub guest_bytes: u64,
    /// Pages sent as zero pages (no payload).
    pub pages_zero: u64,
    /// Pages sent lz4-compressed.
    pub pages_compressed: u64,
    /// Payload bytes of the compressed pages.
    pub compressed_bytes: u64,
    /// Pages sent raw.
    pub pages_raw: u64,
    /// Pages still dirty at the last sync.
    pub remaining_pages: u64,
    /// Dirty rate at the last round, pages/s.
    pub dirty_pages_rate: u64,
    /// Wire throughput so far, MiB/s.
    pub throughput_mib_s: f64,
    /// Source: per data stream, the last frame the target acknowledged as
    /// applied to guest memory (updated every round).
    pub acked_seq: Vec<u64>,
    /// Hand-off epoch (source: recorded; target: running with).
    pub epoch: u64,
    /// Progress counter of the guest at the pause.
    pub guest_progress_at_pause: u64,
    /// The target VMM's check of the memory it received.
    pub verify: Option<crate::link::VerifyReport>,
    /// One line per round: what the policy saw and decided.
    pub rounds: Vec<RoundLog>,
    /// Downtime the policy may spend to force convergence.
    #[serde(default)]
    pub downtime_max_ms: u64,
    /// vCPU throttle the policy asked of the VMM, percent (0 = none).
    #[serde(default)]
    pub throttle_pct: u8,
    /// Pages sent again (the target already had a copy), and below their
    /// bytes on the wire: what XOR-delta shrinks.
    #[serde(default)]
    pub resent_pages: u64,
    /// Payload bytes of the re-sent pages (plus their 16-byte table entries).
    #[serde(default)]
    pub resent_bytes: u64,
    /// Pages the bulk round skipped because the guest had already rewritten
    /// them (they went once, in a later round).
    #[serde(default)]
    pub bulk_skipped: u64,
    /// The XOR-delta cache (source side). Its counters cover memory pages
    /// and disk blocks alike (one cache serves both); `disk.blocks_xor`
    /// says how many of `xor.pages` were disk blocks.
    #[serde(default)]
    pub xor: XorStats,
    /// The disk, when the VM has one that moves with it (memory counters
    /// above count memory only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskStats>,
    /// Which CPUs each pipeline stage runs on, and why (empty until the
    /// pipeline starts).
    #[serde(default, skip_serializing_if = "crate::numa::Placement::is_empty")]
    pub placement: crate::numa::Placement,
    /// Post-copy numbers, once the migration switched to post-copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<crate::postcopy::PostcopyStats>,
}

/// What moved of the VM's disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStats {
    /// Size of the image.
    pub bytes: u64,
    /// How the bulk phase chose its blocks: "extents", "ext4", or
    /// `extents (<why ext4 was not used>)`.
    pub selection: String,
    /// Blocks the image has allocated (SEEK_DATA extents).
    pub allocated_blocks: u64,
    /// Blocks the bulk phase queued (allocated, or used by the file system).
    pub bulk_blocks: u64,
    /// Block entries sent or received (all rounds).
    pub blocks: u64,
    /// Of them: zero blocks (no payload; a hole on the target).
    pub blocks_zero: u64,
    /// lz4-compressed blocks.
    pub blocks_lz4: u64,
    /// Raw blocks.
    pub blocks_raw: u64,
    /// XOR-delta blocks.
    pub blocks_xor: u64,
    /// Blocks sent again (the target had an older copy).
    pub resent_blocks: u64,
    /// Bytes on the wire for the disk: frame headers, tables, payloads.
    pub wire_bytes: u64,
    /// Disk blocks dirty at the last sync.
    pub remaining_blocks: u64,
    /// Whether the image is read / written with O_DIRECT.
    pub direct_io: bool,
}

/// XOR-delta counters, like QEMU's xbzrle section of query-migrate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XorStats {
    /// Cache size in bytes (0 = XOR-delta off).
    pub cache_bytes: u64,
    /// Pages sent as deltas.
    pub pages: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Re-sent pages found in the cache.
    pub cache_hits: u64,
    /// Re-sent pages not in the cache (sent as a patch, lz4 or raw, then
    /// cached).
    pub cache_misses: u64,
    /// Misses sent as a patch of their changed 256-byte chunks, found by
    /// the chunk fingerprints of the version the target holds (counted in
    /// `pages` and `bytes` too).
    #[serde(default)]
    pub patches: u64,
    /// Their payload bytes.
    #[serde(default)]
    pub patch_bytes: u64,
    /// Hits whose delta did not pay (sent lz4 or raw).
    pub overflows: u64,
    /// Pages evicted from the cache.
    pub evictions: u64,
}

/// What one pre-copy round did and why the policy went on or stopped.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundLog {
    /// Round number (1 = bulk).
    pub round: u32,
    /// Pages sent in the round.
    pub pages: u64,
    /// Round duration.
    pub ms: u64,
    /// Pages dirty at the sync after the round.
    pub dirty_after: u64,
    /// Measured rate, MiB/s.
    pub rate_mib_s: f64,
    /// The policy's decision.
    pub decision: String,
    /// Dirty rate measured over the round, pages/s.
    #[serde(default)]
    pub dirty_rate: u64,
    /// Dirty pages held back for a later round (hot pages, converged
    /// fragments).
    #[serde(default)]
    pub deferred: u64,
    /// vCPU throttle during the round, percent.
    #[serde(default)]
    pub throttle_pct: u8,
    /// Pre-copy time at the end of the round, ms.
    #[serde(default)]
    pub elapsed_ms: u64,
    /// Pages dirty at this sync and the previous one.
    #[serde(default)]
    pub hot: u64,
    /// Pages a stop-and-copy would have sent: dirty plus held back.
    #[serde(default)]
    pub pending: u64,
    /// Transfer rate the forecast used, pages/s.
    #[serde(default)]
    pub rate_pages_s: u64,
    /// The downtime forecast for a stop after this round, ms.
    #[serde(default)]
    pub estimate_ms: u64,
    /// The policy's view of the guest ("converging", "memory-intensive").
    #[serde(default)]
    pub class: String,
    /// Of `pages`: disk blocks (a VM with a disk counts blocks and pages
    /// together in every field above; the policy sees both).
    #[serde(default)]
    pub disk_blocks: u64,
}

/// Live metrics of one migration.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    /// Wire bytes sent or received.
    pub wire_bytes: AtomicU64,
    /// Zero pages.
    pub pages_zero: AtomicU64,
    /// lz4 pages.
    pub pages_compressed: AtomicU64,
    /// lz4 payload bytes.
    pub compressed_bytes: AtomicU64,
    /// Raw pages.
    pub pages_raw: AtomicU64,
    /// XOR-delta counters, summed over the encoders.
    pub xor: XorCounters,
    /// Pages sent again (the target had an older copy).
    pub resent_pages: AtomicU64,
    /// Their payload and table bytes.
    pub resent_bytes: AtomicU64,
    /// Disk counters (zero without a disk).
    pub disk: DiskCounters,
    snap: Mutex<Snapshot>,
}

/// The atomic side of [`DiskStats`].
#[derive(Debug, Default)]
pub struct DiskCounters {
    /// Block entries.
    pub blocks: AtomicU64,
    /// Zero blocks.
    pub zero: AtomicU64,
    /// lz4 blocks.
    pub lz4: AtomicU64,
    /// Raw blocks.
    pub raw: AtomicU64,
    /// XOR-delta blocks.
    pub xor: AtomicU64,
    /// Blocks sent again.
    pub resent: AtomicU64,
    /// Wire bytes of `Blocks` frames.
    pub wire_bytes: AtomicU64,
}

/// The atomic side of [`XorStats`].
#[derive(Debug, Default)]
pub struct XorCounters {
    /// Pages sent as deltas.
    pub pages: AtomicU64,
    /// Their payload bytes.
    pub bytes: AtomicU64,
    /// Cache hits.
    pub cache_hits: AtomicU64,
    /// Cache misses.
    pub cache_misses: AtomicU64,
    /// Misses sent as fingerprint patches.
    pub patches: AtomicU64,
    /// Their payload bytes.
    pub patch_bytes: AtomicU64,
    /// Deltas that did not pay.
    pub overflows: AtomicU64,
    /// Evictions.
    pub evictions: AtomicU64,
}

impl Metrics {
    /// A new context; the clock starts now.
    pub fn new(id: &str, vm: &str, role: &str, peer: &str) -> Self {
        Metrics {
            started: Instant::now(),
            wire_bytes: AtomicU64::new(0),
            pages_zero: AtomicU64::new(0),
            pages_compressed: AtomicU64::new(0),
            compressed_bytes: AtomicU64::new(0),
            pages_raw: AtomicU64::new(0),
            xor: XorCounters::default(),
            resent_pages: AtomicU64::new(0),
            resent_bytes: AtomicU64::new(0),
            disk: DiskCounters::default(),
            snap: Mutex::new(Snapshot {
                id: id.into(),
                vm: vm.into(),
                role: role.into(),
                peer: peer.into(),
                mode: "precopy".into(),
                policy: "-".into(),
                ..Snapshot::default()
            }),
        }
    }

    /// Milliseconds since the start.
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Changes the non-counter fields.
    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        let mut s = self.snap.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }

    /// Current status.
    pub fn status(&self) -> Status {
        self.snap.lock().unwrap_or_else(|p| p.into_inner()).status
    }

    /// A copy of everything, with counters and times filled in.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = self.snap.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !s.status.is_final() {
            s.total_time_ms = self.elapsed_ms();
        }
        s.transferred_bytes = self.wire_bytes.load(Relaxed);
        s.pages_zero = self.pages_zero.load(Relaxed);
        s.pages_compressed = self.pages_compressed.load(Relaxed);
        s.compressed_bytes = self.compressed_bytes.load(Relaxed);
        s.pages_raw = self.pages_raw.load(Relaxed);
        s.resent_pages = self.resent_pages.load(Relaxed);
        s.resent_bytes = self.resent_bytes.load(Relaxed);
        let x = &self.xor;
        s.xor = XorStats {
            cache_bytes: s.xor.cache_bytes,
            pages: x.pages.load(Relaxed),
            bytes: x.bytes.load(Relaxed),
            cache_hits: x.cache_hits.load(Relaxed),
            cache_misses: x.cache_misses.load(Relaxed),
            patches: x.patches.load(Relaxed),
            patch_bytes: x.patch_bytes.load(Relaxed),
            overflows: x.overflows.load(Relaxed),
            evictions: x.evictions.load(Relaxed),
        };
        let disk_xor = self.disk.xor.load(Relaxed);
        if let Some(d) = s.disk.as_mut() {
            let c = &self.disk;
            d.blocks = c.blocks.load(Relaxed);
            d.blocks_zero = c.zero.load(Relaxed);
            d.blocks_lz4 = c.lz4.load(Relaxed);
            d.blocks_raw = c.raw.load(Relaxed);
            d.blocks_xor = disk_xor;
            d.resent_blocks = c.resent.load(Relaxed);
            d.wire_bytes = c.wire_bytes.load(Relaxed);
        }
        s.guest_bytes = (s.pages_zero + s.pages_compressed + s.pages_raw + s.xor.pages)
            .saturating_sub(disk_xor)
            * crate::PAGE_SIZE as u64;
        let secs = s.total_time_ms.max(1) as f64 / 1000.0;
        s.throughput_mib_s = s.transferred_bytes as f64 / (1024.0 * 1024.0) / secs;
        s
    }

    /// Marks the migration final: freezes the total time.
    pub fn finish(&self, status: Status, error: Option<String>) {
        let total = self.elapsed_ms();
        self.update(|s| {
            s.status = status;
            s.error = error;
            s.total_time_ms = total;
        });
    }
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "migration {} ({} of {}, peer {})",
            self.id, self.role, self.vm, self.peer
        )?;
        let status = serde_json::to_value(self.status).ok();
        let status = status.as_ref().and_then(|v| v.as_str()).unwrap_or("?");
        writeln!(f, "  status:            {status}")?;
        if let Some(e) = &self.error {
            writeln!(f, "  error:             {e}")?;
        }
        writeln!(
            f,
            "  transport:         {} x{} streams, {} / {}",
            self.transport, self.streams, self.mode, self.policy
        )?;
        writeln!(
            f,
            "  total time:        {} ms (setup {} ms)",
            self.total_time_ms, self.setup_time_ms
        )?;
        writeln!(
            f,
            "  downtime:          {} ms (expected {} ms)",
            self.downtime_ms, self.expected_downtime_ms
        )?;
        writeln!(f, "  rounds:            {}", self.iterations)?;
        writeln!(f, "  guest memory:      {} MiB", self.mem_bytes >> 20)?;
        writeln!(
            f,
            "  transferred:       {} MiB ({:.0} MiB/s)",
            self.transferred_bytes >> 20,
            self.throughput_mib_s
        )?;
        writeln!(
            f,
            "  pages:             {} zero, {} compressed ({} KiB), {} raw",
            self.pages_zero,
            self.pages_compressed,
            self.compressed_bytes >> 10,
            self.pages_raw
        )?;
        if self.xor.cache_bytes > 0 {
            let x = &self.xor;
            writeln!(
                f,
                "  xor-delta:         {} pages ({} KiB), cache {} MiB: {} hits, {} misses \
                 ({} patched from fingerprints), {} overflows",
                x.pages,
                x.bytes >> 10,
                x.cache_bytes >> 20,
                x.cache_hits,
                x.cache_misses,
                x.patches,
                x.overflows
            )?;
        }
        if self.resent_pages > 0 {
            writeln!(
                f,
                "  re-sent:           {} pages in {} KiB",
                self.resent_pages,
                self.resent_bytes >> 10
            )?;
        }
        if let Some(d) = &self.disk {
            writeln!(
                f,
                "  disk:              {} MiB, bulk {} of {} allocated blocks ({}{})",
                d.bytes >> 20,
                d.bulk_blocks,
                d.allocated_blocks,
                d.selection,
                if d.direct_io { ", O_DIRECT" } else { "" }
            )?;
            writeln!(
                f,
                "  disk blocks:       {} sent in {} MiB: {} zero, {} compressed, {} raw, {} xor-delta; {} re-sent, {} remaining",
                d.blocks,
                d.wire_bytes >> 20,
                d.blocks_zero,
                d.blocks_lz4,
                d.blocks_raw,
                d.blocks_xor,
                d.resent_blocks,
                d.remaining_blocks
            )?;
        }
        if !self.placement.is_empty() {
            writeln!(f, "  placement:         {}", self.placement)?;
        }
        if self.throttle_pct > 0 {
            writeln!(f, "  guest throttle:    {}%", self.throttle_pct)?;
        }
        write!(
            f,
            "  remaining:         {} pages, dirty rate {} pages/s",
            self.remaining_pages, self.dirty_pages_rate
        )?;
        if !self.rounds.is_empty() {
            write!(f, "\n  rounds (policy {}):", self.policy)?;
            for r in &self.rounds {
                write!(
                    f,
                    "\n    {:>3}  {:>9} pages {:>6} ms  dirty {:>8}  held {:>8}  {}",
                    r.round, r.pages, r.ms, r.dirty_after, r.deferred, r.decision
                )?;
            }
        }
        Ok(())
    }
}
