//! The result of one `ferry-bench migrate`: one JSON object, or a table.

use std::fmt;

use serde::Serialize;

/// One independent check of the migrated VM.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Check {
    /// Whether it passed.
    pub ok: bool,
    /// What was compared, in words.
    pub detail: String,
}

impl Check {
    /// A passed or failed check.
    pub fn new(ok: bool, detail: impl Into<String>) -> Self {
        Check {
            ok,
            detail: detail.into(),
        }
    }

    /// A check that could not run.
    pub fn not_run(why: &str) -> Self {
        Check {
            ok: false,
            detail: format!("not run: {why}"),
        }
    }
}

/// The checks that do not trust the migration code: four for a completed
/// migration, one (`stayed_on_source`) for one that failed or was cancelled.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Checks {
    /// The source VMM's hash of guest memory at the pause equals the target
    /// VMM's hash of what it received.
    pub mem_hash: Check,
    /// The target VMM checked the guest's page stamps: some pages, none bad.
    pub page_stamps: Check,
    /// The guest's progress counter on the target moved past its value at
    /// the pause soon after completion: the guest really runs there.
    pub guest_progress: Check,
    /// The source VMM exited and the source ferryd no longer runs the VM.
    pub source_stopped: Check,
    /// Only for a migration that did not complete: the source VMM still
    /// runs, the source ferryd lists the VM as running and its progress
    /// counter moves there, no pause is left unresumed, and the target
    /// ferryd has no such VM. The four checks above are then not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stayed_on_source: Option<Check>,
    /// With a disk, a completed migration: the target's image equals the
    /// source's (raw: the VMMs' disk hashes; ext4: e2fsck and every file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_image: Option<Check>,
    /// With guest disk writes: the target VMM checked the guest's block
    /// stamps: some blocks, none bad.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_stamps: Option<Check>,
    /// With a disk, a migration that did not complete: the target left no
    /// image behind (and the source image was never opened for writing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_removed: Option<Check>,
}

impl Checks {
    /// All checks that apply passed.
    pub fn all_ok(&self) -> bool {
        self.list().iter().all(|(_, c)| c.ok)
    }

    /// The checks that apply, with their table labels: `stayed_on_source`
    /// alone when it is set, else the four of a completed migration.
    pub fn list(&self) -> Vec<(&'static str, &Check)> {
        let mut l = match &self.stayed_on_source {
            Some(c) => vec![("stayed on source", c)],
            None => vec![
                ("memory hash", &self.mem_hash),
                ("page stamps", &self.page_stamps),
                ("guest progress", &self.guest_progress),
                ("source stopped", &self.source_stopped),
            ],
        };
        for (label, c) in [
            ("disk image", &self.disk_image),
            ("block stamps", &self.block_stamps),
            ("disk removed", &self.disk_removed),
        ] {
            if let Some(c) = c {
                l.push((label, c));
            }
        }
        l
    }

    /// The checks of a migration that did not complete (`why` says how it
    /// ended): the four of a completion not run, `stayed` in their place.
    pub fn stayed(stayed: Check, why: &str) -> Self {
        Checks {
            stayed_on_source: Some(stayed),
            ..Checks::none(why)
        }
    }

    /// Every check failed with the same reason.
    pub fn none(why: &str) -> Self {
        Checks {
            mem_hash: Check::not_run(why),
            page_stamps: Check::not_run(why),
            guest_progress: Check::not_run(why),
            source_stopped: Check::not_run(why),
            stayed_on_source: None,
            disk_image: None,
            block_stamps: None,
            disk_removed: None,
        }
    }
}

/// The link baseline measured in the same run.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Link {
    /// Bytes blasted (the guest's memory size).
    pub bytes: u64,
    /// Streams used (the migration's stream count).
    pub streams: u32,
    /// Blast time.
    pub ms: u64,
}

/// Where each side's pipeline stages ran: the NUMA placement the source
/// and the target ferryd chose (their status snapshots' `placement`).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Placements {
    /// The source side (empty: the engine did not report one).
    pub source: ferry_engine::numa::Placement,
    /// The target side (empty: the target ferryd could not be asked).
    pub target: ferry_engine::numa::Placement,
}

/// Everything `ferry-bench migrate` reports.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct BenchResult {
    /// The migration's final status ("completed", "failed", "cancelled").
    pub status: String,
    /// The migration's error, when it did not complete.
    pub error: Option<String>,
    /// The migration's id on the source ferryd.
    pub migration_id: String,
    /// The guest workload.
    pub workload: String,
    /// "loopback" or "netns" (two namespaces joined by a veth pair).
    pub path: String,
    /// The IP address the target ferryd listened on (--listen-ip, or the
    /// target namespace's address).
    pub listen_ip: String,
    /// Transport as the engine reports it.
    pub transport: String,
    /// Data streams.
    pub streams: u32,
    /// "precopy", ...
    pub mode: String,
    /// Convergence policy.
    pub policy: String,
    /// Guest RAM.
    pub mem_bytes: u64,
    /// Start of the migration to completion.
    pub total_time_ms: u64,
    /// Connect + handshake.
    pub setup_time_ms: u64,
    /// Guest paused to running on the target.
    pub downtime_ms: u64,
    /// The downtime the policy expected.
    pub expected_downtime_ms: u64,
    /// The target VMM's verification time (excluded from downtime).
    pub verify_ms: u64,
    /// Rounds (the bulk round is 1).
    pub iterations: u32,
    /// Bytes on the wire.
    pub transferred_bytes: u64,
    /// Guest bytes moved (pages sent x page size).
    pub guest_bytes: u64,
    /// Zero pages.
    pub pages_zero: u64,
    /// lz4 pages.
    pub pages_compressed: u64,
    /// Their payload bytes.
    pub compressed_bytes: u64,
    /// Raw pages.
    pub pages_raw: u64,
    /// Downtime the policy was allowed to spend to force convergence.
    pub downtime_max_ms: u64,
    /// vCPU throttle the policy asked of the VMM at the end, percent.
    pub throttle_pct: u8,
    /// Pages sent again (the target already had a copy).
    pub resent_pages: u64,
    /// Their payload and table bytes on the wire.
    pub resent_bytes: u64,
    /// Pages the bulk round skipped because the guest had rewritten them.
    pub bulk_skipped: u64,
    /// The XOR-delta cache's counters.
    pub xor: ferry_engine::metrics::XorStats,
    /// Wire bytes / total time, MiB/s.
    pub throughput_mib_s: f64,
    /// Guest memory bytes / total time, MiB/s.
    pub effective_mib_s: f64,
    /// Raw TCP over the same path with the same streams, memory to memory
    /// (buffers as large as the guest on both sides), MiB/s.
    pub link_mib_s: f64,
    /// The same blast from and into one reused 256 KiB buffer (cache-hot on
    /// loopback: the path's peak, not a memory-to-memory rate), MiB/s.
    pub link_hot_mib_s: f64,
    /// Pre-faulted memory the target ferryd kept for the VM (0 = none), MiB.
    pub target_reserve_mib: u64,
    /// Every pre-copy round: pages, time, rate and the policy's decision.
    pub rounds: Vec<ferry_engine::metrics::RoundLog>,
    /// throughput_mib_s / link_mib_s.
    pub link_ratio: f64,
    /// The link blast.
    pub link: Link,
    /// CPU the two ferryds spent on the migration (not the VMMs, the blast,
    /// the warm-up or the target's reserve refill; see `migrate::cpu`);
    /// `None` when /proc could not be read.
    pub cpu: Option<super::cpu::CpuUse>,
    /// The migration completed: the VM runs on the target.
    pub completed: bool,
    /// The checks that apply passed: completed with all four checks, or
    /// did not complete and the VM stayed on the source.
    pub verified: bool,
    /// The checks.
    pub checks: Checks,
    /// The source VMM's memory hash at the pause.
    pub source_mem_hash: String,
    /// The target VMM's memory hash before it ran.
    pub target_mem_hash: String,
    /// Pages whose stamps the target VMM checked.
    pub pages_checked: u64,
    /// Pages that failed that check.
    pub pages_bad: u64,
    /// The guest's progress counter at the pause, as the source VMM reported it.
    pub progress_at_pause: u64,
    /// The counter on the target after completion.
    pub progress_after: u64,
    /// Requested downtime budget.
    pub downtime_budget_ms: Option<u64>,
    /// Requested bandwidth cap.
    pub bandwidth_mib_s: Option<u64>,
    /// Requested convergence policy (`policy` is what the engine ran).
    pub requested_policy: Option<crate::migrate::Policy>,
    /// Requested forced-convergence downtime cap.
    pub requested_downtime_max_ms: Option<u64>,
    /// Requested XOR-delta cache size, MiB (0 = off).
    pub xor_cache_mib: Option<u64>,
    /// Requested limit on the migration's time.
    pub time_max_s: Option<u64>,
    /// Requested limit on pre-copy rounds.
    pub rounds_max: Option<u32>,
    /// The disk, when the run had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<super::disk::DiskResult>,
    /// Which CPUs each pipeline stage ran on, on both sides, and why.
    pub placement: Placements,
    /// Post-copy figures (the target's faults and latencies), when the
    /// migration switched to post-copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<ferry_engine::postcopy::PostcopyStats>,
    /// Post-copy: total time / the time the measured raw link needs to
    /// carry all of guest memory once. (Against ferry's own push of all
    /// memory, pre-copy's bulk round, see `ferry-bench postcopy-ratio`.)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy_time_ratio: Option<f64>,
    /// With `--transport rdma`: the RDMA devices and whether they are a
    /// software emulation, on which the rates are not meaningful.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdma: Option<crate::rdma::RdmaNote>,
}

/// MiB/s of `bytes` over `ms`; 0 when no time passed.
pub fn mib_s(bytes: u64, ms: u64) -> f64 {
    if ms == 0 {
        return 0.0;
    }
    bytes as f64 / (1024.0 * 1024.0) / (ms as f64 / 1000.0)
}

/// Rounds to two decimals, so the JSON does not carry float noise.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

impl fmt::Display for BenchResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: u64 = 1 << 20;
        writeln!(
            f,
            "ferry-bench migrate: {} MiB {} guest, {} x{} streams over {}{} ({} / {})",
            self.mem_bytes / MIB,
            self.workload,
            self.transport,
            self.streams,
            self.path,
            if self.path == "loopback" && !self.listen_ip.is_empty() {
                format!(" {}", self.listen_ip)
            } else {
                String::new()
            },
            self.mode,
            self.policy
        )?;
        writeln!(f, "  status          {}", self.status)?;
        if let Some(e) = &self.error {
            writeln!(f, "  error           {e}")?;
        }
        writeln!(
            f,
            "  total time      {} ms (setup {} ms; excludes the target VMM's {} ms verification pass)",
            self.total_time_ms, self.setup_time_ms, self.verify_ms
        )?;
        write!(
            f,
            "  downtime        {} ms (policy expected {} ms",
            self.downtime_ms, self.expected_downtime_ms
        )?;
        if self.downtime_max_ms > 0 {
            write!(
                f,
                "; may spend up to {} ms to converge",
                self.downtime_max_ms
            )?;
        }
        writeln!(f, ")")?;
        writeln!(f, "  rounds          {}", self.iterations)?;
        if self.throttle_pct > 0 {
            writeln!(f, "  throttle        {}% of the vCPUs", self.throttle_pct)?;
        }
        writeln!(
            f,
            "  transferred     {:.1} MiB on the wire for {:.1} MiB of guest pages",
            self.transferred_bytes as f64 / MIB as f64,
            self.guest_bytes as f64 / MIB as f64
        )?;
        writeln!(
            f,
            "  pages           {} zero, {} lz4 ({} KiB), {} raw",
            self.pages_zero,
            self.pages_compressed,
            self.compressed_bytes >> 10,
            self.pages_raw
        )?;
        if self.resent_pages > 0 || self.resent_bytes > 0 {
            writeln!(
                f,
                "  resent          {} pages the target already had a copy of ({:.1} MiB on the wire)",
                self.resent_pages,
                self.resent_bytes as f64 / MIB as f64
            )?;
        }
        if self.bulk_skipped > 0 {
            writeln!(
                f,
                "  bulk skipped    {} pages the guest rewrote before their turn (sent once, later)",
                self.bulk_skipped
            )?;
        }
        let x = &self.xor;
        if *x != ferry_engine::metrics::XorStats::default() {
            writeln!(
                f,
                "  xor-delta       {} pages ({} KiB) from a {} MiB cache: {} hits, {} misses \
                 ({} patched from fingerprints, {} KiB), {} overflows, {} evictions",
                x.pages,
                x.bytes >> 10,
                x.cache_bytes / MIB,
                x.cache_hits,
                x.cache_misses,
                x.patches,
                x.patch_bytes >> 10,
                x.overflows,
                x.evictions
            )?;
        }
        if let Some(p) = &self.postcopy {
            writeln!(
                f,
                "  post-copy       after round {}: {} stale pages moved in {} ms: {} on demand, {} pushed, {} duplicates dropped",
                p.switch_after_round,
                p.stale_pages,
                p.duration_ms,
                p.demand_pages,
                p.background_pages,
                p.duplicate_pages
            )?;
            writeln!(
                f,
                "  faults          {} waited for the network (p50 {} us, p99 {} us, mean {} us, max {} us), {} first touches of present pages",
                p.faults,
                p.fault_latency_p50_us,
                p.fault_latency_p99_us,
                p.fault_latency_mean_us,
                p.fault_latency_max_us,
                p.faults_present
            )?;
            let hist: Vec<String> = p
                .fault_latency_hist
                .iter()
                .enumerate()
                .filter(|(_, &n)| n > 0)
                .map(|(i, n)| format!("{}us:{n}", 1u64 << i))
                .collect();
            if !hist.is_empty() {
                writeln!(f, "  latency dist    {}", hist.join(" "))?;
            }
            if p.reconnects > 0 {
                writeln!(
                    f,
                    "  reconnects      {} (the connection broke and post-copy resumed)",
                    p.reconnects
                )?;
            }
            if p.checkpoints > 0 {
                writeln!(
                    f,
                    "  checkpoints     {} sent back ({} pages); guest paused {} us mean, {} us max each",
                    p.checkpoints,
                    p.checkpoint_pages,
                    p.checkpoint_pause_mean_us,
                    p.checkpoint_pause_max_us
                )?;
            }
            if let Some(r) = self.postcopy_time_ratio {
                writeln!(
                    f,
                    "  vs link         total time = {r:.2}x the time the link needs to carry all guest memory once"
                )?;
            }
        }
        if let Some(d) = &self.disk {
            writeln!(
                f,
                "  disk            {} MiB image ({}{}), {:.1} MiB allocated; bulk by {}: {} of {} allocated blocks",
                d.bytes / MIB,
                d.fs,
                if d.fs_aware { ", fs-aware" } else { "" },
                d.source_allocated_bytes as f64 / MIB as f64,
                d.selection,
                d.bulk_blocks,
                d.allocated_blocks
            )?;
            writeln!(
                f,
                "  disk blocks     {} sent ({} zero, {} lz4, {} raw, {} xor-delta), {} in dirty rounds, {} re-sent; \
                 {:.1} MiB on the wire = {:.3}x (allocated + dirty-round blocks){}",
                d.blocks,
                d.blocks_zero,
                d.blocks_lz4,
                d.blocks_raw,
                d.blocks_xor,
                d.dirty_round_blocks,
                d.resent_blocks,
                d.wire_bytes as f64 / MIB as f64,
                d.wire_ratio,
                if d.direct_io { ", O_DIRECT" } else { "" }
            )?;
            writeln!(
                f,
                "  target image    {:.1} MiB allocated; {} blocks stamped by the guest checked, {} bad",
                d.target_allocated_bytes as f64 / MIB as f64,
                d.blocks_checked,
                d.blocks_bad
            )?;
        }
        writeln!(
            f,
            "  throughput      {:.1} MiB/s on the wire, {:.1} MiB/s of guest memory",
            self.throughput_mib_s, self.effective_mib_s
        )?;
        if self.link.bytes == 0 {
            writeln!(f, "  link            not measured (--no-blast)")?;
        } else {
            writeln!(
                f,
                "  link            {:.1} MiB/s raw TCP x{}, memory to memory ({} MiB in {} ms); migration at {:.0}% of it",
                self.link_mib_s,
                self.link.streams,
                self.link.bytes / MIB,
                self.link.ms,
                self.link_ratio * 100.0
            )?;
            writeln!(
                f,
                "  link (hot)      {:.1} MiB/s through one reused 256 KiB buffer",
                self.link_hot_mib_s
            )?;
        }
        if let Some(r) = &self.rdma {
            writeln!(
                f,
                "  rdma            {}{}",
                if r.software_emulation { "NOTE: " } else { "" },
                r.note
            )?;
        }
        writeln!(f, "  placement       source: {}", self.placement.source)?;
        writeln!(f, "                  target: {}", self.placement.target)?;
        if let Some(c) = &self.cpu {
            let per = |v: Option<f64>| v.map_or(String::new(), |v| format!(", {v:.3} s/GiB"));
            writeln!(
                f,
                "  ferryd cpu      source {} ms{}, target {} ms{} (user + system; not the VMMs{})",
                c.source_ms,
                per(c.source_s_per_gib),
                c.target_ms,
                per(c.target_s_per_gib),
                if c.target_refill_ms > 0 {
                    format!(
                        ", not the target's {} ms reserve refill",
                        c.target_refill_ms
                    )
                } else {
                    String::new()
                }
            )?;
        }
        writeln!(f, "  checks")?;
        for (label, c) in self.checks.list() {
            writeln!(
                f,
                "    {:6} {label:<15} {}",
                if c.ok { "[ok]" } else { "[FAIL]" },
                c.detail
            )?;
        }
        write!(
            f,
            "  verified        {}",
            match (self.verified, self.completed) {
                (true, true) => "yes",
                (true, false) => "yes (did not complete; the VM stayed on the source)",
                (false, _) => "NO",
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_rounding() {
        assert_eq!(mib_s(1 << 30, 1000), 1024.0);
        assert_eq!(mib_s(5, 0), 0.0);
        assert_eq!(round2(1.23456), 1.23);
    }

    #[test]
    fn json_has_the_documented_fields() {
        let r = BenchResult {
            checks: Checks::none("test"),
            ..BenchResult::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        for k in [
            "status",
            "transport",
            "streams",
            "mode",
            "policy",
            "mem_bytes",
            "total_time_ms",
            "setup_time_ms",
            "downtime_ms",
            "transferred_bytes",
            "pages_zero",
            "pages_compressed",
            "compressed_bytes",
            "pages_raw",
            "iterations",
            "throughput_mib_s",
            "effective_mib_s",
            "link_mib_s",
            "link_ratio",
            "cpu",
            "completed",
            "verified",
            "downtime_max_ms",
            "throttle_pct",
            "resent_pages",
            "resent_bytes",
            "bulk_skipped",
            "xor",
            "listen_ip",
            "placement",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        for k in [
            "mem_hash",
            "page_stamps",
            "guest_progress",
            "source_stopped",
        ] {
            assert_eq!(v["checks"][k]["ok"], false, "{k}");
        }
        assert!(!r.checks.all_ok());
        let table = r.to_string();
        assert!(table.contains("[FAIL] memory hash"), "{table}");
        assert!(table.ends_with("verified        NO"), "{table}");
        assert!(v["checks"].get("stayed_on_source").is_none());
        assert!(v.get("rdma").is_none(), "only rdma runs have it");
        assert!(
            table.contains("placement       source: not planned\n"),
            "{table}"
        );
        // New metrics stay out of the table while they read 0.
        for absent in ["throttle", "resent", "xor-delta", "may spend"] {
            assert!(!table.contains(absent), "{absent} in {table}");
        }
    }

    #[test]
    fn not_completed_run_is_judged_by_stayed_on_source() {
        let mut r = BenchResult {
            status: "failed".into(),
            checks: Checks::stayed(
                Check::new(true, "still there"),
                "the migration ended failed",
            ),
            ..BenchResult::default()
        };
        r.verified = r.checks.all_ok();
        assert!(r.verified && !r.completed);
        let labels: Vec<_> = r.checks.list().iter().map(|(l, _)| *l).collect();
        assert_eq!(labels, ["stayed on source"]);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["checks"]["stayed_on_source"]["ok"], true);
        assert_eq!(v["checks"]["mem_hash"]["ok"], false);
        let table = r.to_string();
        assert!(
            table.contains("[ok]   stayed on source still there"),
            "{table}"
        );
        assert!(!table.contains("memory hash"), "{table}");
        assert!(table.ends_with("the VM stayed on the source)"), "{table}");
        r.checks.stayed_on_source = Some(Check::new(false, "gone"));
        assert!(!r.checks.all_ok());
    }

    #[test]
    fn rdma_runs_say_whether_rates_mean_anything() {
        let r = BenchResult {
            transport: "rdma".into(),
            path: "loopback".into(),
            listen_ip: "10.77.0.1".into(),
            rdma: Some(crate::rdma::RdmaNote::from_devices(
                &[crate::rdma::Device {
                    name: "rxe0".into(),
                    software: true,
                    netdevs: vec!["d0".into()],
                }],
                Some("d0"),
            )),
            ..BenchResult::default()
        };
        let table = r.to_string();
        assert!(table.contains("over loopback 10.77.0.1 ("), "{table}");
        assert!(
            table.contains("  rdma            NOTE: rxe0 is software emulation"),
            "{table}"
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["rdma"]["software_emulation"], true);
        assert_eq!(v["rdma"]["devices"][0], "rxe0");
    }

    #[test]
    fn new_metrics_show_when_set() {
        let r = BenchResult {
            downtime_max_ms: 2000,
            throttle_pct: 30,
            resent_pages: 10,
            resent_bytes: 3 << 20,
            bulk_skipped: 7,
            xor: ferry_engine::metrics::XorStats {
                cache_bytes: 16 << 20,
                pages: 5,
                cache_hits: 6,
                ..Default::default()
            },
            cpu: Some(
                crate::migrate::cpu::CpuUse {
                    source_ms: 300,
                    target_ms: 200,
                    target_refill_ms: 40,
                    tick_ms: 10.0,
                    ..Default::default()
                }
                .per_gib(2 << 30),
            ),
            ..BenchResult::default()
        };
        let table = r.to_string();
        for s in [
            "may spend up to 2000 ms",
            "throttle        30%",
            "resent          10 pages the target already had a copy of (3.0 MiB",
            "bulk skipped    7 pages",
            "xor-delta       5 pages (0 KiB) from a 16 MiB cache: 6 hits",
            "not measured (--no-blast)",
            "ferryd cpu      source 300 ms, 0.150 s/GiB, target 200 ms, 0.100 s/GiB \
             (user + system; not the VMMs, not the target's 40 ms reserve refill)",
        ] {
            assert!(table.contains(s), "{s} not in {table}");
        }
    }
}
