//! `ferry-bench migrate`: one whole migration between two real ferryds, with
//! a link baseline and checks that do not trust the migration code.
//!
//! ```text
//!  scratch dir + key ─▶ [netns pair] ─▶ target ferryd ─▶ source ferryd
//!    ─▶ source ferry-vmm (--verify --report) ─▶ wait until the guest is warm
//!    ─▶ link blast (guest-size bytes, same path, same streams; not with --no-blast)
//!    ─▶ POST /migrations ─▶ poll until final
//!    ─▶ completed: memory hash, page stamps, guest progress, source stopped
//!       failed / cancelled: stayed on source (see [`checks`])
//! ```
//!
//! The link baseline is measured right before the migration, with the guest
//! already running its workload, by sending as many bytes as the guest has
//! memory over the same path and the same number of TCP streams. For a
//! dirtying guest the migration moves more than that; rates stay comparable
//! because both are bytes over time. With `--transport rdma` the blast is
//! still raw TCP over the same address (there is no raw-verbs baseline), and
//! the report names the RDMA devices: on a software emulation (soft-RoCE)
//! it says that the rates are not meaningful (see [`crate::rdma`]).

mod checks;
pub mod cpu;
pub mod disk;
pub mod policy;
pub mod report;
pub mod testbed;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

use crate::blast::BlastResult;
use crate::procs::{self, POLL};
use crate::ui::Ui;
use crate::workload::{warmup, Warmup, Workload};
use ferry_daemon::api::MigrateRequest;
pub use policy::Policy;
use report::{mib_s, round2, BenchResult, Checks, Link, Placements};
use testbed::{Programs, Testbed, VM_NAME};

/// Cap on streams; matches the blast's cap.
const STREAMS_MAX: u32 = crate::blast::STREAMS_MAX;
/// Period of migration status polls: 5 per second is smooth for a person
/// and nothing for the daemon.
const STATUS_POLL: Duration = Duration::from_millis(200);
/// After a cancel (timeout or Ctrl-C), how long to wait for a final status.
const CANCEL_WAIT: Duration = Duration::from_secs(30);
/// Idle guests have nothing to warm: a short settle after registration.
const IDLE_SETTLE: Duration = Duration::from_secs(1);
/// With --time-max-s, ferry-bench's own cancel (--timeout-s) waits at least
/// this long past the engine's limit, so the engine gives up first.
const TIME_MAX_GRACE_S: u64 = 30;

/// Transports ferry-bench can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// TCP, N data streams plus a control stream.
    Tcp,
    /// The same TCP, driven by io_uring on both ferryds.
    Uring,
    /// RDMA verbs on both ferryds: needs an RDMA device that holds
    /// --listen-ip.
    Rdma,
}

impl Transport {
    /// The name ferryd takes.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Uring => "uring",
            Transport::Rdma => "rdma",
        }
    }
}

/// `--mem-mib`: a size ferry-vmm's memory layout accepts.
pub fn parse_mem_mib(s: &str) -> Result<u64, String> {
    let mib: u64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number of MiB"))?;
    let bytes = mib.checked_mul(1 << 20).ok_or("too large")?;
    ferry_vmm::layout::Layout::new(bytes).map_err(|e| e.to_string())?;
    Ok(mib)
}

/// Options of `ferry-bench migrate`.
#[derive(Clone, Debug, Args)]
pub struct MigrateArgs {
    /// Guest memory in MiB (a multiple of 2, at least 4, within ferry-vmm's limit).
    #[arg(long, value_parser = parse_mem_mib)]
    pub mem_mib: u64,
    /// Guest workload: `idle`, `fill`, `mixed`, or `dirty:<MiB/s>[:hot=<pct>][:fill]`.
    #[arg(long)]
    pub workload: Workload,
    /// Transport between the two ferryds.
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: Transport,
    /// IP address the two ferryds' data listeners (and the link blast)
    /// bind, each on a free port. For `--transport rdma`, an address of
    /// the RDMA device (10.77.0.1 in scripts/rxe-vm.sh's guest). Not with
    /// --netns, which has its own addresses.
    #[arg(long, value_name = "IP", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST),
          conflicts_with = "netns")]
    pub listen_ip: IpAddr,
    /// Data streams.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=STREAMS_MAX as i64))]
    pub streams: u32,
    /// Downtime budget for the switchover (default: ferryd's).
    #[arg(long)]
    pub downtime_ms: Option<u64>,
    /// Cap on the migration's bandwidth (default: none).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub bandwidth_mib_s: Option<u64>,
    /// Convergence policy (default: ferryd's, `adaptive`).
    #[arg(long, value_enum)]
    pub policy: Option<Policy>,
    /// precopy, postcopy or hybrid (pre-copy rounds, then post-copy when
    /// they do not converge).
    #[arg(long, default_value = "precopy")]
    pub mode: ferry_engine::Mode,
    /// Post-copy: the target's checkpoint interval, ms; 0: none (default:
    /// ferryd's, 1000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub checkpoint_ms: Option<u64>,
    /// Downtime a policy may spend to force convergence of a guest that
    /// dirties faster than the link carries, ms (default: ferryd's).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub downtime_max_ms: Option<u64>,
    /// XOR-delta cache of last-sent pages in MiB; 0 turns XOR-delta off
    /// (default: ferryd's).
    #[arg(long)]
    pub xor_cache_mib: Option<u64>,
    /// The engine gives up (the VM stays on the source) after this many
    /// seconds (default: ferryd's).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub time_max_s: Option<u64>,
    /// The engine gives up after this many pre-copy rounds (default: ferryd's).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds_max: Option<u32>,
    /// Skip the link blast (link figures and link_ratio then read 0): saves
    /// two guest-sized transfers when --bandwidth-mib-s caps the migration
    /// anyway.
    #[arg(long)]
    pub no_blast: bool,
    /// For dirty workloads: seconds of dirtying before the measurement.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_s: f64,
    /// Run each ferryd in its own network namespace, joined by a veth pair (root only).
    #[arg(long)]
    pub netns: bool,
    /// Do not keep pre-faulted memory on the target ferryd (`--reserve-mib`);
    /// the migration then pays first-touch page faults on the target.
    #[arg(long)]
    pub no_reserve: bool,
    /// With --netns: shape the veth pair to this rate with tc tbf
    /// (also spelled --link-mib-s).
    #[arg(long, alias = "link-mib-s", requires = "netns", value_parser = clap::value_parser!(u64).range(1..))]
    pub link_rate_mib_s: Option<u64>,
    /// Cancel the migration after this many seconds (with --time-max-s, at
    /// least that plus 30 s, so the engine gives up first).
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// Print exactly one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Keep the scratch directory with the daemons' and VMM's logs.
    #[arg(long)]
    pub keep_logs: bool,
    /// Where ferryd and ferry-vmm are (default: next to ferry-bench).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Give the VM a disk: a sparse raw image of this many GiB made in the
    /// run (decimals allowed: 0.25 is 256 MiB), migrated with its memory.
    #[arg(long, value_parser = parse_gib)]
    pub disk_gib: Option<f64>,
    /// Bytes of data written into the image before the run, GiB (raw: in
    /// 4 MiB extents spread over it; ext4: as files, half of them deleted).
    #[arg(long, requires = "disk_gib", value_parser = parse_gib, default_value_t = 0.0)]
    pub disk_used_gib: f64,
    /// Put a file system in the image (mkfs.ext4 -d, then delete every
    /// other file so the file system frees blocks the image keeps).
    #[arg(long, value_enum, requires = "disk_gib")]
    pub disk_fs: Option<disk::DiskFs>,
    /// Bulk phase: only the blocks the image's ext4 file system uses.
    #[arg(long, requires = "disk_gib")]
    pub disk_fs_aware: bool,
    /// The guest writes stamped disk blocks at this rate during the run,
    /// MiB/s (adds `+disk:<rate>` to its workload).
    #[arg(long, requires = "disk_gib", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub disk_write_mib_s: Option<u32>,
}

/// `--disk-gib`: a positive size in GiB, a whole number of MiB.
fn parse_gib(s: &str) -> Result<f64, String> {
    let g: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of GiB"))?;
    if !(0.0..=1024.0).contains(&g) || (g * 1024.0).fract() != 0.0 {
        return Err(format!("{s}: must be 0 to 1024 GiB in whole MiB"));
    }
    Ok(g)
}

fn gib_bytes(g: f64) -> u64 {
    (g * 1024.0) as u64 * (1 << 20)
}

/// Runs one migration benchmark. `Ok` carries the result whether or not the
/// migration completed and verified; `Err` means the run itself broke.
pub fn run(args: &MigrateArgs, ui: &mut Ui) -> Result<BenchResult> {
    if !(0.0..=3600.0).contains(&args.warmup_s) {
        bail!(
            "--warmup-s must be between 0 and 3600, not {}",
            args.warmup_s
        );
    }
    // A transport this machine cannot run fails here in one line, not as
    // a ferryd that died at start-up with its log tail.
    if let Some(why) = crate::compare::transport::machine_reason(args.transport) {
        bail!(
            "--transport {} cannot run here: {why}",
            args.transport.name()
        );
    }
    let programs = Programs::find(args.bin_dir.as_deref())?;
    let reserve = (!args.no_reserve).then_some(args.mem_mib);
    let mut tb = Testbed::start(
        programs,
        args.netns,
        args.link_rate_mib_s,
        reserve,
        args.transport.name(),
        args.listen_ip,
        ui,
    )?;
    if args.keep_logs {
        tb.keep_logs();
    }
    let r = run_on(&mut tb, args, ui);
    if r.as_ref().map_or(true, |r| !r.verified) && !args.keep_logs {
        ui.step("rerun with --keep-logs to keep the daemons' and VMM's logs");
    }
    r
}

fn run_on(tb: &mut Testbed, args: &MigrateArgs, ui: &mut Ui) -> Result<BenchResult> {
    let mut workload = args.workload.to_string();
    let mut vmm_args = Vec::new();
    let image = match args.disk_gib {
        None => None,
        Some(g) => {
            let (bytes, used) = (gib_bytes(g), gib_bytes(args.disk_used_gib));
            ui.step(&format!(
                "making a {} MiB disk image with {} MiB of data{}",
                bytes >> 20,
                used >> 20,
                if args.disk_fs.is_some() {
                    " (ext4)"
                } else {
                    ""
                }
            ));
            let image = disk::make_image(
                tb.dir.path(),
                bytes,
                used,
                args.disk_fs,
                args.disk_write_mib_s.is_some(),
            )?;
            vmm_args.push("--disk".to_string());
            vmm_args.push(image.path.display().to_string());
            if let Some(r) = args.disk_write_mib_s {
                workload = format!("{workload}+disk:{r}");
                vmm_args.push("--disk-write-from-mib".into());
                vmm_args.push(image.write_from_mib.to_string());
            }
            Some(image)
        }
    };
    let source_allocated = match &image {
        Some(i) => disk::allocated_bytes(&i.path)?,
        None => 0,
    };
    tb.start_vmm(args.mem_mib, &workload, &vmm_args, ui)?;
    warm_up(tb, args, ui)?;

    let mem_bytes = args.mem_mib << 20;
    let (blast, hot) = if args.no_blast {
        (no_blast(), no_blast())
    } else {
        ui.step(&format!(
            "measuring the link: {} MiB of raw TCP over {} streams",
            args.mem_mib, args.streams
        ));
        let blast = tb.blast(mem_bytes, args.streams, crate::blast::Mode::Memory)?;
        let hot = tb.blast(mem_bytes, args.streams, crate::blast::Mode::Hot)?;
        ui.step(&format!(
            "link: {:.0} MiB/s memory to memory ({:.0} MiB/s cache-hot)",
            blast.mib_s, hot.mib_s
        ));
        (blast, hot)
    };
    tb.ensure_running()?;
    if !args.no_reserve {
        tb.wait_target_reserve(ui)?;
    }

    let req = MigrateRequest {
        vm: VM_NAME.into(),
        to: tb.tgt.listen.to_string(),
        streams: Some(args.streams),
        downtime_ms: args.downtime_ms,
        bandwidth_mib_s: args.bandwidth_mib_s,
        rounds_max: args.rounds_max,
        time_max_s: args.time_max_s,
        policy: args.policy.map(|p| p.name().to_string()),
        mode: Some(args.mode.name().into()),
        postcopy_grace_s: None,
        checkpoint_ms: args.checkpoint_ms,
        downtime_max_ms: args.downtime_max_ms,
        xor_cache_mib: args.xor_cache_mib,
        disk_fs_aware: args.disk_fs_aware,
        transport: Some(args.transport.name().into()),
        placement: None,
    };
    // CPU accounting covers the migration only (see `cpu`); a failure to
    // read /proc costs the figures, not the run.
    let meter = cpu::Meter::start(tb.src.pid(), tb.tgt.pid())
        .inspect_err(|e| ui.step(&format!("no CPU figures: {e:#}")))
        .ok();
    let id = tb.src.api.start_migration(&req)?;
    ui.step(&format!("migration {id}: {VM_NAME} to {}", req.to));
    let snap = follow(tb, &id, args, ui)?;
    let cpu_use = meter.and_then(|m| {
        m.finish()
            .inspect_err(|e| ui.step(&format!("no CPU figures: {e:#}")))
            .ok()
    });
    // The target ferryd shows the migration under the same id; its
    // placement is the target side's. Not having it costs the figure only.
    let target_snap = tb
        .tgt
        .api
        .migration(&id)
        .inspect_err(|e| ui.step(&format!("no target placement: {e:#}")))
        .unwrap_or_default();
    let target_placement = target_snap.placement.clone();
    // Post-copy: the faults and their latencies are the target's figures;
    // the switch point is the source's.
    let postcopy = target_snap.postcopy.clone().map(|mut t| {
        if let Some(s) = &snap.postcopy {
            t.switch_after_round = s.switch_after_round;
            t.reconnects = s.reconnects;
        }
        t
    });

    let mut r = BenchResult {
        status: status_name(snap.status),
        error: snap.error.clone(),
        migration_id: id,
        workload,
        path: if args.netns { "netns" } else { "loopback" }.into(),
        listen_ip: tb.tgt.listen.ip().to_string(),
        transport: if snap.transport.is_empty() {
            args.transport.name().into()
        } else {
            snap.transport.clone()
        },
        streams: snap.streams,
        mode: snap.mode.clone(),
        policy: snap.policy.clone(),
        mem_bytes: if snap.mem_bytes > 0 {
            snap.mem_bytes
        } else {
            mem_bytes
        },
        total_time_ms: snap.total_time_ms,
        setup_time_ms: snap.setup_time_ms,
        downtime_ms: snap.downtime_ms,
        expected_downtime_ms: snap.expected_downtime_ms,
        verify_ms: snap.verify_ms,
        iterations: snap.iterations,
        transferred_bytes: snap.transferred_bytes,
        guest_bytes: snap.guest_bytes,
        pages_zero: snap.pages_zero,
        pages_compressed: snap.pages_compressed,
        compressed_bytes: snap.compressed_bytes,
        pages_raw: snap.pages_raw,
        downtime_max_ms: snap.downtime_max_ms,
        throttle_pct: snap.throttle_pct,
        resent_pages: snap.resent_pages,
        bulk_skipped: snap.bulk_skipped,
        resent_bytes: snap.resent_bytes,
        xor: snap.xor,
        link_mib_s: round2(blast.mib_s),
        link_hot_mib_s: round2(hot.mib_s),
        rounds: snap.rounds.clone(),
        target_reserve_mib: if args.no_reserve { 0 } else { args.mem_mib },
        link: Link {
            bytes: blast.bytes,
            streams: blast.streams,
            ms: blast.ms,
        },
        downtime_budget_ms: args.downtime_ms,
        bandwidth_mib_s: args.bandwidth_mib_s,
        requested_policy: args.policy,
        requested_downtime_max_ms: args.downtime_max_ms,
        xor_cache_mib: args.xor_cache_mib,
        time_max_s: args.time_max_s,
        rounds_max: args.rounds_max,
        placement: Placements {
            source: snap.placement.clone(),
            target: target_placement,
        },
        postcopy,
        rdma: (args.transport == Transport::Rdma)
            .then(|| crate::rdma::RdmaNote::probe(tb.tgt.listen.ip())),
        ..BenchResult::default()
    };
    // Rates from the raw counters, not the engine's own rate field.
    r.throughput_mib_s = round2(mib_s(r.transferred_bytes, r.total_time_ms));
    r.effective_mib_s = round2(mib_s(r.mem_bytes, r.total_time_ms));
    r.cpu = cpu_use.map(|c| c.per_gib(r.guest_bytes));
    r.link_ratio = if blast.mib_s > 0.0 {
        round2(mib_s(r.transferred_bytes, r.total_time_ms) / blast.mib_s)
    } else {
        0.0
    };
    if r.postcopy.is_some() && blast.mib_s > 0.0 {
        // The time the measured link needs for all of guest memory, once.
        let push_ms = r.mem_bytes as f64 / (1 << 20) as f64 / blast.mib_s * 1000.0;
        r.postcopy_time_ratio = Some(round2(r.total_time_ms as f64 / push_ms));
    }

    if let (Some(image), Some(d)) = (&image, &snap.disk) {
        let dirty_round_blocks: u64 = snap
            .rounds
            .iter()
            .filter(|x| x.round >= 2)
            .map(|x| x.disk_blocks)
            .sum();
        let basis = (d.allocated_blocks + dirty_round_blocks) * 4096;
        r.disk = Some(disk::DiskResult {
            bytes: d.bytes,
            fs: image.fs.map_or("none".to_string(), |_| "ext4".to_string()),
            fs_aware: args.disk_fs_aware,
            selection: d.selection.clone(),
            source_allocated_bytes: source_allocated,
            deleted_bytes: image.deleted_bytes,
            allocated_blocks: d.allocated_blocks,
            bulk_blocks: d.bulk_blocks,
            dirty_round_blocks,
            wire_bytes: d.wire_bytes,
            wire_ratio: if basis > 0 {
                (d.wire_bytes as f64 / basis as f64 * 1000.0).round() / 1000.0
            } else {
                0.0
            },
            blocks: d.blocks,
            blocks_zero: d.blocks_zero,
            blocks_lz4: d.blocks_lz4,
            blocks_raw: d.blocks_raw,
            blocks_xor: d.blocks_xor,
            resent_blocks: d.resent_blocks,
            guest_write_mib_s: args.disk_write_mib_s,
            direct_io: d.direct_io,
            ..Default::default()
        });
    }
    r.completed = snap.status == ferry_engine::Status::Completed;
    if r.completed {
        checks::check_completed(tb, &snap, &mut r)?;
        if let Some(image) = &image {
            checks::check_disk(tb, &snap, image, args.disk_write_mib_s.is_some(), &mut r)?;
        }
    } else if procs::interrupted() {
        r.checks = Checks::none("interrupted");
    } else {
        ui.step(&format!(
            "the migration ended {}: checking that {VM_NAME} stayed on the source",
            r.status
        ));
        let stayed = checks::check_stayed(tb)?;
        r.checks = Checks::stayed(stayed, &format!("the migration ended {}", r.status));
        if image.is_some() {
            r.checks.disk_removed = Some(checks::check_disk_removed(tb));
        }
    }
    r.verified = r.checks.all_ok();
    Ok(r)
}

/// The link figures of a run without a blast: all zero.
fn no_blast() -> BlastResult {
    BlastResult {
        mode: crate::blast::Mode::Memory,
        bytes: 0,
        streams: 0,
        ms: 0,
        mib_s: 0.0,
    }
}

fn status_name(s: ferry_engine::Status) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{s:?}").to_lowercase())
}

/// Waits until the guest is warm: its phase says its first pass is done
/// (plus `--warmup-s` of dirtying), or a short settle for an idle guest.
fn warm_up(tb: &mut Testbed, args: &MigrateArgs, ui: &mut Ui) -> Result<()> {
    let (phase, extra) = match warmup(args.workload) {
        Warmup::Settle => {
            procs::sleep(IDLE_SETTLE)?;
            return tb.ensure_running();
        }
        Warmup::Phase(p) => (p, Duration::ZERO),
        Warmup::PhaseThenDelay(p) => (p, Duration::from_secs_f64(args.warmup_s)),
    };
    // The first pass writes all of memory; 32 MiB/s is far below any
    // machine's memory bandwidth, so this only catches a stuck guest.
    let timeout = Duration::from_secs(60 + args.mem_mib / 32);
    let start = Instant::now();
    let mut last = String::new();
    loop {
        tb.ensure_running()?;
        // The phase is null while ferryd is busy with the VMM: ask again.
        let now = tb.source_vm()?.phase.unwrap_or_default();
        if now == phase {
            break;
        }
        if now != last && !now.is_empty() {
            ui.live(&format!("guest phase: {now} (waiting for {phase})"));
            last = now;
        }
        if start.elapsed() > timeout {
            ui.end_live();
            bail!(
                "the guest did not reach phase {phase:?} within {} s (it is in {last:?})",
                timeout.as_secs()
            );
        }
        procs::sleep(POLL)?;
    }
    ui.end_live();
    ui.step(&format!(
        "guest warm (phase {phase}) after {:.1} s",
        start.elapsed().as_secs_f64()
    ));
    if !extra.is_zero() {
        procs::sleep(extra)?;
        tb.ensure_running()?;
    }
    Ok(())
}

/// Polls the migration until it is final; cancels it on timeout or Ctrl-C.
fn follow(
    tb: &mut Testbed,
    id: &str,
    args: &MigrateArgs,
    ui: &mut Ui,
) -> Result<ferry_engine::Snapshot> {
    let start = Instant::now();
    let timeout = Duration::from_secs(
        args.time_max_s
            .map_or(args.timeout_s, |t| args.timeout_s.max(t + TIME_MAX_GRACE_S)),
    );
    let mut cancelled_at: Option<Instant> = None;
    loop {
        let snap = tb.src.api.migration(id);
        let snap = match snap {
            Ok(s) => s,
            Err(e) => {
                ui.end_live();
                // A dead daemon explains itself better than a refused connection.
                tb.src.ensure_running()?;
                return Err(e);
            }
        };
        if snap.status.is_final() {
            ui.end_live();
            return Ok(snap);
        }
        ui.live(&progress_line(&snap));
        let interrupted = procs::interrupted();
        if cancelled_at.is_none() && (interrupted || start.elapsed() > timeout) {
            ui.end_live();
            ui.step(if interrupted {
                "interrupted: cancelling the migration"
            } else {
                "timed out: cancelling the migration"
            });
            if let Err(e) = tb.src.api.cancel(id) {
                ui.step(&format!("cancel failed: {e:#}"));
            }
            cancelled_at = Some(Instant::now());
        }
        if let Some(t) = cancelled_at {
            if t.elapsed() > CANCEL_WAIT {
                bail!(
                    "migration {id} did not stop within {} s of its cancel",
                    CANCEL_WAIT.as_secs()
                );
            }
        }
        std::thread::sleep(STATUS_POLL);
    }
}

fn progress_line(s: &ferry_engine::Snapshot) -> String {
    format!(
        "{:?}: round {}, {} MiB sent ({:.0} MiB/s), {} pages left, {:.1} s",
        s.status,
        s.iterations,
        s.transferred_bytes >> 20,
        s.throughput_mib_s,
        s.remaining_pages,
        s.total_time_ms as f64 / 1000.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        m: MigrateArgs,
    }

    fn parse(args: &[&str]) -> Result<MigrateArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("ferry-bench").chain(args.iter().copied())).map(|c| c.m)
    }

    #[test]
    fn defaults_and_full_set() {
        let a = parse(&["--mem-mib", "256", "--workload", "idle"]).unwrap();
        assert_eq!(
            (a.mem_mib, a.streams, a.transport),
            (256, 4, Transport::Tcp)
        );
        assert_eq!(
            (a.downtime_ms, a.bandwidth_mib_s, a.warmup_s),
            (None, None, 2.0)
        );
        assert!(!a.netns && !a.json && !a.keep_logs && !a.no_blast);
        assert_eq!(a.listen_ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        let a = parse(&[
            "--mem-mib",
            "64",
            "--workload",
            "mixed",
            "--transport",
            "rdma",
            "--listen-ip",
            "10.77.0.1",
        ])
        .unwrap();
        assert_eq!(a.transport, Transport::Rdma);
        assert_eq!(a.listen_ip, "10.77.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            (
                a.policy,
                a.downtime_max_ms,
                a.xor_cache_mib,
                a.time_max_s,
                a.rounds_max
            ),
            (None, None, None, None, None)
        );
        let a = parse(&[
            "--mem-mib",
            "1024",
            "--workload",
            "dirty:50:hot=10",
            "--transport",
            "tcp",
            "--streams",
            "8",
            "--downtime-ms",
            "300",
            "--bandwidth-mib-s",
            "500",
            "--warmup-s",
            "0.5",
            "--netns",
            "--link-rate-mib-s",
            "200",
            "--json",
            "--keep-logs",
            "--policy",
            "auto-converge",
            "--downtime-max-ms",
            "1500",
            "--xor-cache-mib",
            "0",
            "--time-max-s",
            "20",
            "--rounds-max",
            "5",
            "--no-blast",
        ])
        .unwrap();
        assert_eq!(
            (
                a.policy,
                a.downtime_max_ms,
                a.xor_cache_mib,
                a.time_max_s,
                a.rounds_max
            ),
            (
                Some(Policy::AutoConverge),
                Some(1500),
                Some(0),
                Some(20),
                Some(5)
            )
        );
        assert!(a.no_blast);
        assert_eq!(
            a.workload,
            Workload::Dirty {
                mib_per_s: 50,
                hot_pct: 10,
                fill: false
            }
        );
        assert_eq!(
            (a.streams, a.downtime_ms, a.bandwidth_mib_s),
            (8, Some(300), Some(500))
        );
        assert_eq!(
            (a.netns, a.link_rate_mib_s, a.json, a.keep_logs),
            (true, Some(200), true, true)
        );
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            &["--workload", "idle"][..],
            &["--mem-mib", "256"],
            &["--mem-mib", "0", "--workload", "idle"],
            &["--mem-mib", "3", "--workload", "idle"],
            &["--mem-mib", "256", "--workload", "spin"],
            &["--mem-mib", "256", "--workload", "idle", "--streams", "0"],
            &["--mem-mib", "256", "--workload", "idle", "--streams", "65"],
            &[
                "--mem-mib",
                "256",
                "--workload",
                "idle",
                "--transport",
                "carrier-pigeon",
            ],
            &[
                "--mem-mib",
                "256",
                "--workload",
                "idle",
                "--link-rate-mib-s",
                "100",
            ],
            &[
                "--mem-mib",
                "256",
                "--workload",
                "idle",
                "--listen-ip",
                "10.77.0",
            ],
            // --netns brings its own addresses.
            &[
                "--mem-mib",
                "256",
                "--workload",
                "idle",
                "--netns",
                "--listen-ip",
                "10.77.0.1",
            ],
            &[
                "--mem-mib",
                "256",
                "--workload",
                "idle",
                "--bandwidth-mib-s",
                "0",
            ],
            &[
                "--mem-mib",
                "256",
                "--workload",
                "idle",
                "--policy",
                "fastest",
            ],
            &[
                "--mem-mib",
                "256",
                "--workload",
                "idle",
                "--time-max-s",
                "0",
            ],
            &[
                "--mem-mib",
                "256",
                "--workload",
                "idle",
                "--rounds-max",
                "0",
            ],
            &[
                "--mem-mib",
                "256",
                "--workload",
                "idle",
                "--downtime-max-ms",
                "0",
            ],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn progress_line_reads() {
        let s = ferry_engine::Snapshot {
            status: ferry_engine::Status::Active,
            iterations: 2,
            transferred_bytes: 300 << 20,
            throughput_mib_s: 150.0,
            remaining_pages: 1234,
            total_time_ms: 2000,
            ..Default::default()
        };
        assert_eq!(
            progress_line(&s),
            "Active: round 2, 300 MiB sent (150 MiB/s), 1234 pages left, 2.0 s"
        );
        assert_eq!(status_name(ferry_engine::Status::Completed), "completed");
    }
}
