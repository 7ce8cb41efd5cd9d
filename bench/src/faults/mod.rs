//! `ferry-bench faults`: a fault-injection campaign with real processes.
//!
//! Each case starts a fresh ferryd pair (the target on 127.0.0.2, so that
//! nftables can cut its link without touching anything else) and a
//! ferry-vmm guest, starts a migration, and injects one fault at a random
//! moment of one phase:
//!
//! - phases: `precopy` (pre-copy rounds under a bandwidth cap),
//!   `switchover` (the guest is paused on the source and PREPARE/COMMIT
//!   are under way), `postcopy` (the guest runs on the target while its
//!   memory follows);
//! - faults: kill -9 of the source ferryd (started again 300 ms later on
//!   the same state directory and sockets, as a service manager would),
//!   the source VMM, the target ferryd (started again 1 s later the same
//!   way, on the address it listened on), the target VMM (not started
//!   again); the link cut both ways (nft drop) for 1 s
//!   (`cut-short`) or 12 s (`cut-long`: past the I/O timeout and the
//!   post-copy grace of 6 s).
//!
//! Then it waits for things to settle and checks, by witnesses outside the
//! migration code (the daemons' VM lists and the guest's progress counter,
//! the processes, the VMMs' own memory checks):
//!
//! - **one copy**: the VM runs on exactly one side, never both (a
//!   violation of this is a failed campaign whatever else happened);
//! - **intact**: where memory moved, the receiving VMM's stamp check of
//!   every page passed (the target's at restore or when post-copy ended;
//!   the source's when it took the VM back from a checkpoint);
//! - **progress**: a VM taken back resumes from a checkpoint no earlier
//!   than the switch;
//! - **no hang**: both sides' migrations end within 90 s.
//!
//! A case *survives* when all four hold. One fault cannot be survived by
//! design, and the table says so rather than hiding it: killing the source
//! VMM before the pause destroys the only copy of the vCPU state (as any
//! VMM crash does, migration or not).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_daemon::api::{MigrateRequest, VmInfo};
use ferry_daemon::vms::VmState;
use ferry_engine::{Snapshot, Status};
use serde::{Deserialize, Serialize};

use crate::migrate::testbed::{Programs, Testbed, VM_NAME};
use crate::procs;
use crate::ui::Ui;

/// Options of `ferry-bench faults`.
#[derive(Debug, clap::Args)]
pub struct FaultsArgs {
    /// Cases to run.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub cases: u32,
    /// Seed of the choice of cases (default: random; printed, so a run can
    /// be repeated).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(16..=4096))]
    pub mem_mib: u64,
    /// Only these faults (comma list; default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub faults: Vec<Fault>,
    /// Only these phases (comma list; default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub phases: Vec<Phase>,
    /// Exit non-zero when any case did not survive (default: only when a
    /// case broke an invariant: two live copies, a hang, bad memory).
    #[arg(long)]
    pub strict: bool,
    /// Write faults.json into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Where ferryd and ferry-vmm are (default: next to ferry-bench).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

/// A fault to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// kill -9 of the source ferryd.
    KillSrcFerryd,
    /// kill -9 of the source VMM.
    KillSrcVmm,
    /// kill -9 of the target ferryd.
    KillDstFerryd,
    /// kill -9 of the target VMM.
    KillDstVmm,
    /// The link dropped both ways for 1 s.
    CutShort,
    /// The link dropped both ways for 12 s.
    CutLong,
}

impl Fault {
    const ALL: [Fault; 6] = [
        Fault::KillSrcFerryd,
        Fault::KillSrcVmm,
        Fault::KillDstFerryd,
        Fault::KillDstVmm,
        Fault::CutShort,
        Fault::CutLong,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::KillSrcFerryd => "kill-src-ferryd",
            Fault::KillSrcVmm => "kill-src-vmm",
            Fault::KillDstFerryd => "kill-dst-ferryd",
            Fault::KillDstVmm => "kill-dst-vmm",
            Fault::CutShort => "cut-short",
            Fault::CutLong => "cut-long",
        }
    }
}

/// When to inject it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// During pre-copy rounds.
    Precopy,
    /// While the source is paused and PREPARE/COMMIT are under way.
    Switchover,
    /// While the guest runs on the target and its memory follows.
    Postcopy,
}

impl Phase {
    const ALL: [Phase; 3] = [Phase::Precopy, Phase::Switchover, Phase::Postcopy];

    fn name(self) -> &'static str {
        match self {
            Phase::Precopy => "precopy",
            Phase::Switchover => "switchover",
            Phase::Postcopy => "postcopy",
        }
    }
}

/// Post-copy grace of the campaign's migrations, seconds.
const GRACE_S: u64 = 6;
/// Their checkpoint interval, ms.
const CHECKPOINT_MS: u64 = 250;
/// How long after its kill the source ferryd is started again.
const SOURCE_RESTART_AFTER: Duration = Duration::from_millis(300);
/// How long a killed target ferryd stays down.
const TARGET_RESTART_AFTER: Duration = Duration::from_millis(1000);
/// How long a case may take to settle after its fault.
const SETTLE_MAX: Duration = Duration::from_secs(90);
/// The guest's workload: it dirties memory all the time.
const WORKLOAD: &str = "dirty:32";

/// One case and what came of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaseResult {
    /// Its number.
    pub case: u32,
    /// The fault.
    pub fault: Fault,
    /// The phase it was aimed at.
    pub phase: Phase,
    /// The source migration's status when the fault hit.
    pub status_at_fault: String,
    /// Milliseconds into the phase.
    pub at_ms: u64,
    /// Where the VM runs afterwards: `source`, `target`, `both`, `none`.
    pub runs_on: String,
    /// The memory checks that apply passed.
    pub intact: bool,
    /// A VM taken back resumed no earlier than the switch.
    pub progress_ok: bool,
    /// Both sides' migrations ended in time.
    pub settled: bool,
    /// All of the above, with the VM on exactly one side.
    pub survived: bool,
    /// The fault destroyed the VM itself, as it would without a migration:
    /// the source VMM was killed before the hand-off, and its vCPU state
    /// with it.
    #[serde(default)]
    pub unsurvivable: bool,
    /// From the fault to the VM running again somewhere and both
    /// migrations ended, ms.
    pub recovery_ms: u64,
    /// The source migration's final status and error.
    pub source: String,
    /// The target migration's final status and error.
    pub target: String,
    /// What the harness noticed (why a case did not survive).
    pub notes: Vec<String>,
}

impl CaseResult {
    /// Whether the case broke an invariant (not merely lost the VM).
    pub fn violated(&self) -> bool {
        self.runs_on == "both" || !self.settled || !self.intact || !self.progress_ok
    }
}

/// A whole campaign.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Campaign {
    /// The seed (repeat with `--seed`).
    pub seed: u64,
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// Every case.
    pub cases: Vec<CaseResult>,
}

impl Campaign {
    /// Whether no case broke an invariant (and, with `strict`, every case
    /// survived).
    pub fn ok(&self, strict: bool) -> bool {
        self.cases
            .iter()
            .all(|c| !c.violated() && (!strict || c.survived))
    }

    /// The table: per fault and phase, cases, survived, recovery time.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "ferry-bench faults: {} cases, seed {}, {} MiB guest ({WORKLOAD}), grace {GRACE_S} s, \
             checkpoints every {CHECKPOINT_MS} ms",
            self.cases.len(),
            self.seed,
            self.mem_mib
        );
        let _ = writeln!(
            out,
            "{:<16} {:<11} {:>5} {:>8} {:>14}  where the VM ended (source/target/none/both)",
            "fault", "phase", "cases", "survived", "recovery ms"
        );
        for f in Fault::ALL {
            for p in Phase::ALL {
                let cs: Vec<&CaseResult> = self
                    .cases
                    .iter()
                    .filter(|c| c.fault == f && c.phase == p)
                    .collect();
                if cs.is_empty() {
                    continue;
                }
                let survived = cs.iter().filter(|c| c.survived).count();
                let mut rec: Vec<u64> = cs
                    .iter()
                    .filter(|c| c.survived)
                    .map(|c| c.recovery_ms)
                    .collect();
                rec.sort_unstable();
                let recovery = match (rec.first(), rec.last()) {
                    (Some(a), Some(b)) => format!("{} ({a}-{b})", rec[rec.len() / 2]),
                    _ => "-".into(),
                };
                let count = |w: &str| cs.iter().filter(|c| c.runs_on == w).count();
                let _ = writeln!(
                    out,
                    "{:<16} {:<11} {:>5} {:>8} {:>14}  {}/{}/{}/{}",
                    f.name(),
                    p.name(),
                    cs.len(),
                    survived,
                    recovery,
                    count("source"),
                    count("target"),
                    count("none"),
                    count("both")
                );
            }
        }
        let survived = self.cases.iter().filter(|c| c.survived).count();
        let violated = self.cases.iter().filter(|c| c.violated()).count();
        let lost_anyway = self.cases.iter().filter(|c| c.unsurvivable).count();
        let _ = writeln!(
            out,
            "survived {survived} of {} ({survived} of {} that a migration can survive; {lost_anyway} \
             killed the source VMM before the hand-off, which loses the VM with or without one); \
             invariants broken in {violated}",
            self.cases.len(),
            self.cases.len() - lost_anyway
        );
        for c in self.cases.iter().filter(|c| !c.survived) {
            let _ = writeln!(
                out,
                "  case {} {} {}: runs on {}; {}",
                c.case,
                c.fault.name(),
                c.phase.name(),
                c.runs_on,
                c.notes.join("; ")
            );
        }
        out
    }
}

/// A small xorshift generator: the campaign must replay from its seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Runs the campaign.
pub fn run(args: &FaultsArgs, ui: &mut Ui) -> Result<Campaign> {
    if !nft_usable() {
        bail!("`ferry-bench faults` needs nftables (apt install nftables) and root to cut links");
    }
    let programs = Programs::find(args.bin_dir.as_deref())?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let faults = if args.faults.is_empty() {
        Fault::ALL.to_vec()
    } else {
        args.faults.clone()
    };
    let phases = if args.phases.is_empty() {
        Phase::ALL.to_vec()
    } else {
        args.phases.clone()
    };
    let mut rng = Rng::new(seed);
    let mut campaign = Campaign {
        seed,
        mem_mib: args.mem_mib,
        cases: Vec::new(),
    };
    ui.step(&format!("{} cases, seed {seed}", args.cases));
    for case in 0..args.cases {
        procs::check_interrupted()?;
        // Every (fault, phase) pair in turn, in an order the seed shuffles.
        let pairs = faults.len() * phases.len();
        let k = case as usize % pairs;
        let offset = rng.below(pairs as u64) as usize;
        let pick = if case as usize / pairs == 0 && args.cases as usize >= pairs {
            k
        } else {
            (k + offset) % pairs
        };
        let fault = faults[pick / phases.len()];
        let phase = phases[pick % phases.len()];
        let delay = Duration::from_millis(rng.below(1500));
        ui.step(&format!(
            "case {case}: {} in {} (+{} ms)",
            fault.name(),
            phase.name(),
            delay.as_millis()
        ));
        let r = run_case(&programs, args.mem_mib, case, fault, phase, delay, ui)
            .with_context(|| format!("case {case} ({} in {})", fault.name(), phase.name()))?;
        ui.step(&format!(
            "case {case}: VM on {}, {}{}",
            r.runs_on,
            if r.survived {
                "survived"
            } else {
                "NOT survived"
            },
            if r.notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.notes.join("; "))
            }
        ));
        campaign.cases.push(r);
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("faults.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&campaign)?)
            .with_context(|| format!("writing {}", path.display()))?;
        ui.step(&format!("wrote {}", path.display()));
    }
    Ok(campaign)
}

/// One case, from fresh daemons to the verdict.
fn run_case(
    programs: &Programs,
    mem_mib: u64,
    case: u32,
    fault: Fault,
    phase: Phase,
    delay: Duration,
    ui: &Ui,
) -> Result<CaseResult> {
    let target_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut tb = Testbed::start(programs.clone(), false, None, None, "tcp", target_ip, ui)?;
    tb.start_vmm(mem_mib, WORKLOAD, &[], ui)?;
    procs::sleep(Duration::from_millis(500))?;
    let (mode, bandwidth) = match phase {
        Phase::Precopy => ("precopy", 16),
        // Unlimited: the last round is short, the switchover comes fast.
        Phase::Switchover => ("precopy", 0),
        Phase::Postcopy => ("postcopy", 8),
    };
    let req = MigrateRequest {
        vm: VM_NAME.into(),
        to: tb.tgt.listen.to_string(),
        streams: Some(2),
        bandwidth_mib_s: (bandwidth > 0).then_some(bandwidth),
        mode: Some(mode.into()),
        postcopy_grace_s: Some(GRACE_S),
        checkpoint_ms: Some(CHECKPOINT_MS),
        transport: Some("tcp".into()),
        ..MigrateRequest::default()
    };
    let id = tb.src.api.start_migration(&req)?;
    let mut notes = Vec::new();
    // Aim at the phase.
    let phase_start = Instant::now();
    let at_phase = wait_phase(&tb, &id, phase, delay)?;
    let Some(snap) = at_phase else {
        notes.push("the migration ended before the phase came".into());
        return Ok(missed(case, fault, phase, &tb, &id, notes));
    };
    let at_ms = phase_start.elapsed().as_millis() as u64;
    let switch_progress = snap.guest_progress_at_pause;
    // Inject.
    let t0 = Instant::now();
    let mut dst_alive = true;
    let mut restarted = false;
    let mut cut: Option<(Nft, Instant, Duration)> = None;
    match fault {
        Fault::KillSrcFerryd => {
            // Killed, then started again like a service manager would: the
            // VMM registers its VM with the new ferryd, which finishes what
            // the old one handed off.
            kill9(tb.src.pid() as i32);
            procs::sleep(SOURCE_RESTART_AFTER)?;
            tb.restart_source()?;
            restarted = true;
        }
        Fault::KillSrcVmm => kill9(tb.vmm_mut()?.pid() as i32),
        Fault::KillDstFerryd => {
            // Started again as a service manager would: it settles what
            // its predecessor died in from its records and the VMMs that
            // register again.
            kill9(tb.tgt.pid() as i32);
            procs::sleep(TARGET_RESTART_AFTER)?;
            if let Err(e) = tb.restart_target() {
                notes.push(format!("the target ferryd did not start again: {e:#}"));
                dst_alive = false;
            }
        }
        Fault::KillDstVmm => {
            // The VMMs the target ferryd spawned (not ferryd itself, whose
            // command line names the same socket).
            let ferryd = tb.tgt.pid() as i32;
            let pids: Vec<i32> = procs_with(&tb.tgt.link_socket().display().to_string())
                .into_iter()
                .filter(|&p| p != ferryd)
                .collect();
            if pids.is_empty() {
                notes.push("no target VMM to kill (not started yet)".into());
            }
            for p in pids {
                kill9(p);
            }
        }
        Fault::CutShort | Fault::CutLong => {
            let d = if fault == Fault::CutShort {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(12)
            };
            cut = Some((
                Nft::partition(&tb.tgt.listen.to_string(), tb.dir.path())?,
                t0,
                d,
            ));
        }
    }
    // Settle: both migrations final (or the VM committed and running).
    let mut settled_at = None;
    let mut last_src: Option<Snapshot> = None;
    let mut last_dst: Option<Snapshot> = None;
    while t0.elapsed() < SETTLE_MAX {
        procs::check_interrupted()?;
        if cut.as_ref().is_some_and(|(_, at, d)| at.elapsed() >= *d) {
            cut = None; // the rule goes
        }
        last_src = tb.src.api.migration(&id).ok();
        if dst_alive {
            last_dst = tb.tgt.api.migration(&id).ok();
        }
        // A restarted source ferryd knows the migration only when it had to
        // finish it; otherwise it is done once the VM is registered again.
        let src_back = restarted
            && last_src.is_none()
            && tb
                .src
                .api
                .vm(VM_NAME)
                .is_ok_and(|v| v.is_some_and(|v| v.state == VmState::Running));
        let src_done = src_back || last_src.as_ref().is_some_and(ended);
        let dst_done = !dst_alive || last_dst.as_ref().is_none_or(ended);
        if cut.is_none() && src_done && dst_done {
            settled_at = Some(t0.elapsed());
            break;
        }
        procs::sleep(Duration::from_millis(50))?;
    }
    drop(cut);
    let settled = settled_at.is_some();
    if !settled {
        notes.push(format!("not settled within {} s", SETTLE_MAX.as_secs()));
    }
    // Where does it run? Give a resumed guest a moment to show progress.
    procs::sleep(Duration::from_millis(300))?;
    let on_src = runs_on(&tb.src.api, true);
    let on_dst = runs_on(&tb.tgt.api, dst_alive);
    let runs = match (on_src, on_dst) {
        (true, true) => "both",
        (true, false) => "source",
        (false, true) => "target",
        (false, false) => "none",
    };
    // Memory: where it moved, the receiving side's own check.
    let mut intact = true;
    let mut progress_ok = true;
    let events = procs::read_json_lines(&tb.report).unwrap_or_default();
    let rolled = events.iter().rev().find(|v| v["event"] == "rolled_back");
    if on_dst {
        match last_dst.as_ref().and_then(|s| s.verify.clone()) {
            Some(v) if v.checked && v.pages_bad == 0 && v.pages_checked > 0 => {}
            Some(v) => {
                intact = false;
                notes.push(format!("target memory check: {v:?}"));
            }
            None => notes.push("no memory check from the target".into()),
        }
    }
    if on_src {
        if let Some(r) = rolled {
            let v = &r["verify"];
            if !(v["checked"] == true && v["pages_bad"] == 0) {
                intact = false;
                notes.push(format!("source memory check after the take-back: {v}"));
            }
            let p = r["progress"].as_u64().unwrap_or(0);
            if p < switch_progress {
                progress_ok = false;
                notes.push(format!(
                    "taken back to progress {p}, before the switch at {switch_progress}"
                ));
            }
        }
    }
    if runs == "both" {
        notes.push("the VM runs on BOTH sides".into());
    }
    // The source VMM killed before the hand-off (the migration failed, so
    // the VM was still the source's): its vCPU state died with it.
    let unsurvivable = runs == "none"
        && fault == Fault::KillSrcVmm
        && last_src
            .as_ref()
            .is_some_and(|s| s.status == Status::Failed);
    if runs == "none" {
        notes.push(if unsurvivable {
            "the source VMM died before the hand-off with the only vCPU state (unsurvivable)".into()
        } else {
            "the VM runs nowhere".into()
        });
    }
    let describe = |s: &Option<Snapshot>, alive: bool| match (s, alive) {
        (_, false) => "killed".to_string(),
        (Some(s), _) => format!(
            "{:?}{}",
            s.status,
            s.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ),
        (None, _) => "-".into(),
    };
    let survived = runs != "both" && runs != "none" && settled && intact && progress_ok;
    let r = CaseResult {
        case,
        fault,
        phase,
        status_at_fault: format!("{:?}", snap.status),
        at_ms,
        runs_on: runs.into(),
        intact,
        progress_ok,
        settled,
        survived,
        unsurvivable,
        recovery_ms: settled_at.map_or(0, |d| d.as_millis() as u64),
        source: describe(&last_src, true),
        target: describe(&last_dst, dst_alive),
        notes,
    };
    if !r.survived || std::env::var_os("FERRY_BENCH_KEEP").is_some() {
        ui.step(&format!(
            "case {case}: logs kept in {}",
            tb.dir.path().display()
        ));
        tb.keep_logs();
    }
    Ok(r)
}

/// A case whose phase never came (the migration was too quick for it).
fn missed(
    case: u32,
    fault: Fault,
    phase: Phase,
    tb: &Testbed,
    id: &str,
    notes: Vec<String>,
) -> CaseResult {
    let s = tb.src.api.migration(id).ok();
    CaseResult {
        case,
        fault,
        phase,
        status_at_fault: s.map(|s| format!("{:?}", s.status)).unwrap_or_default(),
        at_ms: 0,
        runs_on: "missed".into(),
        intact: true,
        progress_ok: true,
        settled: true,
        survived: false,
        unsurvivable: false,
        recovery_ms: 0,
        source: String::new(),
        target: String::new(),
        notes,
    }
}

/// Waits for `phase` of migration `id`, then `delay` into it (post-copy
/// and pre-copy; the switchover is hit as soon as it is seen). `None` if
/// the migration ended first.
fn wait_phase(tb: &Testbed, id: &str, phase: Phase, delay: Duration) -> Result<Option<Snapshot>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut entered: Option<Instant> = None;
    loop {
        let s = tb.src.api.migration(id)?;
        let inside = match phase {
            Phase::Precopy => s.status == Status::Active && s.guest_bytes > 0,
            Phase::Switchover => matches!(s.status, Status::Switchover | Status::Committing),
            Phase::Postcopy => s.status == Status::Postcopy,
        };
        if inside {
            let at = *entered.get_or_insert_with(Instant::now);
            if phase == Phase::Switchover || at.elapsed() >= delay {
                return Ok(Some(s));
            }
        } else if entered.is_some() || s.status.is_final() || s.status == Status::Unknown {
            return Ok(None);
        }
        if Instant::now() > deadline {
            bail!(
                "migration {id} never reached {}: {:?}",
                phase.name(),
                s.status
            );
        }
        let poll = if phase == Phase::Switchover { 1 } else { 20 };
        std::thread::sleep(Duration::from_millis(poll));
    }
}

/// Whether a migration has ended on this side.
fn ended(s: &Snapshot) -> bool {
    s.status.is_final() || s.status == Status::Unknown
}

/// Whether the daemon lists the VM as running with its counter moving.
fn runs_on(api: &crate::api::Client, alive: bool) -> bool {
    if !alive {
        return false;
    }
    let progress = |v: Option<VmInfo>| {
        v.filter(|v| v.state == VmState::Running)
            .and_then(|v| v.progress)
    };
    let Some(a) = api.vm(VM_NAME).ok().and_then(progress) else {
        return false;
    };
    std::thread::sleep(Duration::from_millis(400));
    api.vm(VM_NAME)
        .ok()
        .and_then(progress)
        .is_some_and(|b| b > a)
}

fn kill9(pid: i32) {
    // SAFETY: kill(2) with a pid this campaign started; no memory passed.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Live processes whose command line contains `needle`.
fn procs_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmd).contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// Whether nft can install rules here.
fn nft_usable() -> bool {
    let dir = std::env::temp_dir();
    Nft::partition("127.0.0.2:9", &dir).is_ok()
}

/// An nftables table that drops TCP to and from one address and port;
/// deleted on drop.
struct Nft(String);

impl Nft {
    fn partition(addr: &str, dir: &Path) -> Result<Self> {
        let (ip, port) = addr.rsplit_once(':').context("no port")?;
        let name = format!("ferry_bench_{}_{}", std::process::id(), port);
        let rules = format!(
            "table inet {name} {{\n chain input {{\n  type filter hook input priority -100; \
             policy accept;\n  ip daddr {ip} tcp dport {port} drop\n  ip saddr {ip} tcp sport \
             {port} drop\n }}\n}}\n"
        );
        let file = dir.join(format!("{name}.nft"));
        std::fs::write(&file, rules)?;
        let o = Command::new("nft")
            .arg("-f")
            .arg(&file)
            .stdin(Stdio::null())
            .output()
            .context("cannot run nft")?;
        let _ = std::fs::remove_file(&file);
        if !o.status.success() {
            bail!(
                "nft -f failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(Nft(name))
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_cases() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<u64> = (0..8).map(|_| a.below(18)).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.below(18)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&x| x < 18));
    }

    #[test]
    fn the_table_counts_by_fault_and_phase() {
        let case = |fault, phase, runs_on: &str, survived| CaseResult {
            case: 0,
            fault,
            phase,
            status_at_fault: "Postcopy".into(),
            at_ms: 1,
            runs_on: runs_on.into(),
            intact: true,
            progress_ok: true,
            settled: true,
            survived,
            unsurvivable: false,
            recovery_ms: 1200,
            source: String::new(),
            target: String::new(),
            notes: vec![],
        };
        let c = Campaign {
            seed: 1,
            mem_mib: 128,
            cases: vec![
                case(Fault::KillDstVmm, Phase::Postcopy, "source", true),
                case(Fault::KillDstVmm, Phase::Postcopy, "source", true),
                case(Fault::KillSrcVmm, Phase::Precopy, "none", false),
            ],
        };
        let mut c = c;
        c.cases[2].unsurvivable = true;
        let t = c.table();
        assert!(t.contains("kill-dst-vmm"), "{t}");
        assert!(
            t.contains("survived 2 of 3 (2 of 2 that a migration can survive; 1 killed"),
            "{t}"
        );
        assert!(c.ok(false), "losing a VM is not a broken invariant");
        assert!(!c.ok(true));
        let mut both = c.clone();
        both.cases[2].runs_on = "both".into();
        assert!(!both.ok(false), "two live copies always fail the campaign");
    }
}
