//! The source side of a migration: pre-copy rounds and the switchover.
//!
//! ```text
//!  Setup ──▶ Active (bulk round, dirty rounds) ──▶ Switchover (paused: final
//!  round, state) ──▶ Committing (PREPARE ▶ PREPARED, hand-off recorded,
//!  COMMIT ▶ COMMITTED) ──▶ Completed
//!      any failure or cancel before COMMIT is sent ──▶ Failed / Cancelled,
//!      the VM resumed here;   COMMIT sent, no answer ──▶ Unknown (VM stays paused)
//! ```

pub mod journal;
pub mod pipeline;
mod recover;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver};
use ferry_transport::{Conn, Transport};

use self::journal::{HandOff, Journal};
use self::pipeline::{DiskInput, Pipeline, Throttle};
pub use self::recover::recover_out;
use crate::bitmap::DirtyBitmap;
use crate::link::VmSpec;
use crate::metrics::{RoundLog, Status};
use crate::policy::{Action, Limits, Policy, PolicyKind, RoundStats, FRAGMENT_PAGES};
use crate::wire::handshake::{self, Hello};
use crate::wire::{self, ControlMsg, FrameKind, Mode, StreamTotals, WireError};
use crate::{Cancel, GuestMem, Key, Metrics, MigrationError, SourceVm, VmState, PAGE_SIZE};

/// Settings of an outgoing migration.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Data streams (TCP connections) besides the control stream.
    pub streams: NonZeroU32,
    /// Downtime budget: stop-and-copy once the estimate fits.
    pub downtime_ms: u64,
    /// Cap on the send rate; `None` sends as fast as the link goes.
    pub bandwidth_mib_s: Option<u64>,
    /// Give up (VM stays on the source) after this many rounds.
    pub rounds_max: u32,
    /// Give up after this long.
    pub time_max: Duration,
    /// Deadline for connecting and the handshake.
    pub connect_timeout: Duration,
    /// A peer silent for this long is dead.
    pub io_timeout: Duration,
    /// Session id; the target files the migration under its hex. `None`
    /// picks one at random. Callers that show ids to users pass their own so
    /// both hosts show the same id.
    pub session: Option<[u8; 16]>,
    /// Convergence policy.
    pub policy: PolicyKind,
    /// Downtime `mp` / `adaptive` may spend to force convergence of a guest
    /// that dirties memory faster than the link carries it.
    pub downtime_max_ms: u64,
    /// XOR-delta cache size in bytes; `Some(0)` turns XOR-delta off, `None`
    /// picks [`xor_cache_default`].
    pub xor_cache_bytes: Option<u64>,
    /// The VM's disk, moved with its memory (the spec must describe it).
    pub disk: Option<DiskSource>,
    /// Which CPUs the encoders and senders run on ([`crate::numa`]).
    pub placement: crate::numa::PlacementPolicy,
    /// Pre-copy, post-copy, or pre-copy rounds then post-copy.
    pub mode: Mode,
    /// How long a post-copy keeps reconnecting to a target it lost (from
    /// the last word it heard) before it takes the VM back from the last
    /// checkpoint. The target stops its guest for good after half of it
    /// without a committed checkpoint, so the two never both run.
    pub postcopy_grace: Duration,
    /// Post-copy: how often the target sends back a checkpoint (the pages
    /// its guest wrote and its vCPU state), bounding the guest time a
    /// take-back loses. Zero: no checkpoints, and a lost target loses the
    /// VM (the source keeps it paused).
    pub checkpoint_interval: Duration,
    /// How long the target may take to answer SPEC (it creates and pre-faults
    /// guest memory and starts its VMM: about 1 s per 4 GiB here) or PREPARE
    /// (it restores the VMM, which may verify memory in test runs).
    /// Default 120 s.
    pub slow_step_timeout: Duration,
    /// A restarted source asking a silent target how a pre-copy switch
    /// ended ([`recover_out`]) gives up after this (the VM stays paused).
    /// Default 10 minutes.
    pub inquiry_max: Duration,
    /// Where hand-offs and checkpoints are recorded for a restarted daemon
    /// ([`journal`]); `None`: nothing is, and a source that dies after
    /// pausing the VM leaves it to the operator.
    pub journal: Option<Arc<dyn Journal>>,
}

/// A disk that moves with the VM: a raw image the VMM keeps writing while
/// ferry reads it, learning what changed from [`SourceVm::sync_disk_log`].
#[derive(Clone, Debug)]
pub struct DiskSource {
    /// The image. ferry reads it through a descriptor of its own (O_DIRECT
    /// where the file system allows it) and never writes it.
    pub file: Arc<std::fs::File>,
    /// Bulk phase: only the blocks an ext4 file system in the image marks
    /// used (intersected with the allocated extents); anything else falls
    /// back to the allocated extents, with the reason logged and reported.
    pub fs_aware: bool,
}

/// The XOR-delta cache for a guest of `mem_bytes`: an eighth of it, at least
/// 16 MiB (or the whole guest when smaller), like QEMU's xbzrle cache sized
/// for the working set rather than all of memory.
pub fn xor_cache_default(mem_bytes: u64) -> u64 {
    (mem_bytes / 8).max(16 << 20).min(mem_bytes)
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            streams: NonZeroU32::new(4).expect("4 is not zero"),
            downtime_ms: 300,
            bandwidth_mib_s: None,
            rounds_max: 30,
            time_max: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
            session: None,
            policy: PolicyKind::default(),
            downtime_max_ms: 2000,
            xor_cache_bytes: None,
            disk: None,
            placement: crate::numa::PlacementPolicy::Auto,
            mode: Mode::Precopy,
            postcopy_grace: Duration::from_secs(60),
            checkpoint_interval: Duration::from_secs(1),
            journal: None,
            slow_step_timeout: Duration::from_secs(120),
            inquiry_max: Duration::from_secs(600),
        }
    }
}

/// A committed migration.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The epoch the VM now runs with on the target.
    pub epoch: u64,
}

/// How often the bulk round looks at the dirty log (without clearing it) to
/// skip pages the guest has rewritten since logging started: often enough to
/// catch a hot page before its turn, rarely enough that the look (an ioctl
/// and a bitmap of 1/32768 of guest memory over the link) costs nothing.
const PEEK_EVERY: Duration = Duration::from_millis(20);
/// Pages the bulk round queues between two looks at the dirty log: 1 MiB.
const PEEK_STEP_PAGES: u64 = 256;

/// Dirty rounds last at least this long, so that the dirty rate and the
/// dirty set a round measures mean something even when a policy holds most
/// pages back and the round has little to send.
const ROUND_MIN: Duration = Duration::from_millis(50);

/// Migrates the VM to `to`. On `Ok` the VM runs on the target and
/// [`SourceVm::hand_off`] was called. On any error but
/// [`MigrationError::CommitUnknown`], the VM runs here (resumed if it was
/// paused) and nothing was lost.
#[allow(clippy::too_many_arguments)]
pub fn migrate_out(
    transport: &dyn Transport,
    to: &str,
    key: &Key,
    spec: &VmSpec,
    epoch: u64,
    mem: Arc<GuestMem>,
    vm: &mut dyn SourceVm,
    cfg: &SourceConfig,
    metrics: Arc<Metrics>,
    cancel: &Cancel,
) -> Result<Outcome, MigrationError> {
    if spec.name.len() > handshake::VM_NAME_BYTES_MAX {
        return Err(MigrationError::Invalid(format!(
            "VM name over {} bytes",
            handshake::VM_NAME_BYTES_MAX
        )));
    }
    let streams = u16::try_from(cfg.streams.get())
        .ok()
        .filter(|&s| s <= wire::STREAMS_MAX)
        .ok_or_else(|| {
            MigrationError::Invalid(format!("streams must be 1..={}", wire::STREAMS_MAX))
        })?;
    let disk_blocks = match (&spec.disk, &cfg.disk) {
        (None, None) => 0,
        (Some(d), Some(src)) => {
            d.validate().map_err(MigrationError::Invalid)?;
            let len = src
                .file
                .metadata()
                .map_err(|e| MigrationError::Invalid(format!("cannot stat the disk image: {e}")))?
                .len();
            if len != d.bytes {
                return Err(MigrationError::Invalid(format!(
                    "the disk image has {len} bytes, the spec says {}",
                    d.bytes
                )));
            }
            d.blocks()
        }
        (Some(_), None) => {
            return Err(MigrationError::Invalid(
                "the spec has a disk but no disk image was given".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(MigrationError::Invalid(
                "a disk image was given but the spec has no disk".into(),
            ))
        }
    };
    if disk_blocks > 0 && cfg.mode.may_postcopy() {
        return Err(MigrationError::Invalid(format!(
            "mode {} cannot move a disk yet (a guest cannot fault on disk blocks); use precopy",
            cfg.mode
        )));
    }
    metrics.update(|s| {
        s.status = Status::Setup;
        s.mode = cfg.mode.name().into();
        s.transport = transport.name().into();
        s.policy = cfg.policy.name().into();
        s.downtime_max_ms = cfg.downtime_max_ms.max(cfg.downtime_ms);
        s.streams = streams as u32;
        s.mem_bytes = mem.bytes();
        s.epoch = epoch;
        if let Some(d) = &spec.disk {
            s.disk = Some(crate::metrics::DiskStats {
                bytes: d.bytes,
                ..Default::default()
            });
        }
    });
    let session: [u8; 16] = cfg.session.unwrap_or_else(crate::key::random_bytes);
    let checkpoints = cfg.mode.may_postcopy().then(|| {
        Arc::new(crate::postcopy::checkpoint::SourceCheckpoints::new(
            mem.clone(),
            metrics.clone(),
            cfg.journal.clone().map(|j| (j, hex(&session))),
        ))
    });
    let mut m = Migration::new(cfg, &metrics, cancel, mem, streams, session, checkpoints);
    m.disk_blocks = disk_blocks;
    m.rollback_ok = vm.can_rollback();
    let result = m.run(transport, to, key, spec, epoch, vm);
    match result {
        Ok(outcome) => Ok(outcome),
        Err(e) => {
            m.fail(vm, &e);
            record_failure(&metrics, &e);
            Err(e)
        }
    }
}

/// Ends `metrics` as failure `e` says: `unknown` (not final: the VM is
/// paused, its fate with the target), `cancelled` or `failed`.
fn record_failure(metrics: &Metrics, e: &MigrationError) {
    match e {
        MigrationError::CommitUnknown(_) | MigrationError::PostcopyBroken(_) => {
            metrics.update(|s| {
                s.status = Status::Unknown;
                s.error = Some(e.to_string());
            });
        }
        MigrationError::Cancelled => metrics.finish(Status::Cancelled, Some(e.to_string())),
        _ => metrics.finish(Status::Failed, Some(e.to_string())),
    }
}

/// What the control reader thread forwards.
enum Event {
    Control(ControlMsg),
    /// A resumed post-copy: the pages the target still lacks (u64 words).
    Stale(Vec<u8>),
    /// The target said ABORT: it holds no running VM.
    Aborted(String),
    /// Post-copy: the target's guest is stopped for good (FENCED).
    Fenced(String),
    /// The control stream failed.
    Failed(String),
    /// The target closed the control stream cleanly (at a frame boundary).
    Closed,
}

struct Migration<'a> {
    /// Blocks of the disk (0: no disk).
    disk_blocks: u64,
    cfg: &'a SourceConfig,
    metrics: Arc<Metrics>,
    cancel: &'a Cancel,
    mem: Arc<GuestMem>,
    streams: u16,
    /// The session, also the migration's id.
    session: [u8; 16],
    /// The hand-off as recorded in the journal.
    hand_off: Mutex<Option<HandOff>>,
    /// Post-copy: RELEASED went out (see [`HandOff::released`]).
    released: bool,
    control: Option<Control>,
    /// Post-copy with checkpoints: what the target sent back.
    checkpoints: Option<Arc<crate::postcopy::checkpoint::SourceCheckpoints>>,
    /// The VM can be rolled back to a checkpoint.
    rollback_ok: bool,
    /// While resuming a post-copy: no connect waits past this.
    connect_deadline: Option<Instant>,

    events: Option<Receiver<Event>>,
    pipeline: Option<Pipeline>,
    paused: bool,
    logging: bool,
    commit_sent: bool,
    /// The vCPU throttle in force (0 = none).
    throttle_pct: u8,
    /// The VM answered a throttle request with `Unsupported`.
    throttle_unsupported: bool,
    /// Per stream: the last frame the target acknowledged as applied.
    acked: Arc<Vec<AtomicU64>>,
    /// Index of disk block 0 in the round loop's index space.
    disk_base: u64,
    /// Disk blocks the last round queued.
    last_disk_sent: u64,
    /// The priority stream (post-copy's demand pages), when the mode may
    /// switch to post-copy.
    priority: Option<Box<dyn Conn>>,
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Control(_) => "a control message",
            Event::Stale(_) => "a stale bitmap",
            Event::Aborted(_) => "ABORT",
            Event::Fenced(_) => "FENCED",
            Event::Failed(_) => "a failure",
            Event::Closed => "the end of the control stream",
        }
    }
}

/// How post-copy over one connection ended, short of completing.
enum PushEnd {
    /// The connection broke; a new one may resume.
    Broke(String),
    /// Nothing can go on.
    Fatal(String),
    /// The target's guest is stopped for good (FENCED).
    Fenced(String),
    /// The migration has ended on the target (a RESUME after this side's
    /// daemon restarted learns it).
    Concluded(wire::Conclusion),
}

impl PushEnd {
    fn message(&self) -> String {
        match self {
            PushEnd::Broke(e) | PushEnd::Fatal(e) | PushEnd::Fenced(e) => e.clone(),
            PushEnd::Concluded(c) => format!("the migration ended on the target: {c:?}"),
        }
    }
}

/// Where [`Migration::serve_postcopy`] starts.
struct Serve<'a> {
    /// Pages that were stale at the switch (the target never lacks others).
    pending: &'a DirtyBitmap,
    /// The demand server of the current connection, if there is one.
    server: Option<crate::postcopy::source::DemandServer>,
    round: u32,
    /// The epoch the target runs the VM with.
    epoch: u64,
    take_back: bool,
    /// The state at the switch (a take-back before any checkpoint resumes it).
    state: &'a VmState,
    /// The connection is broken already: reconnect first.
    broke: Option<String>,
    /// Pre-copy rounds before the switch.
    switch_after: u32,
    running_at: Instant,
    wire_bytes: Arc<AtomicU64>,
}

/// What a control stream closed by the target reads as.
const CLOSED: &str = "the target closed the control stream";

/// A session id in hex, as both hosts show it.
fn hex(session: &[u8; 16]) -> String {
    session.iter().map(|b| format!("{b:02x}")).collect()
}

/// What reconnecting needs.
struct Reconnect<'a> {
    transport: &'a dyn Transport,
    to: &'a str,
    key: &'a Key,
    vm: &'a str,
    /// The id of the session being resumed.
    session: [u8; 16],
}

/// How pre-copy ends.
enum Switch {
    /// Stop-and-copy with the forecast downtime.
    StopAndCopy(u64),
    /// Post-copy after this many rounds.
    Postcopy,
}

/// `hybrid` switches to post-copy after at most this many pre-copy rounds.
const HYBRID_ROUNDS_MAX: u32 = 5;

impl<'a> Migration<'a> {
    fn new(
        cfg: &'a SourceConfig,
        metrics: &Arc<Metrics>,
        cancel: &'a Cancel,
        mem: Arc<GuestMem>,
        streams: u16,
        session: [u8; 16],
        checkpoints: Option<Arc<crate::postcopy::checkpoint::SourceCheckpoints>>,
    ) -> Self {
        Migration {
            disk_blocks: 0,
            cfg,
            metrics: metrics.clone(),
            cancel,
            checkpoints,
            mem,
            streams,
            session,
            hand_off: Mutex::new(None),
            released: false,
            control: None,
            rollback_ok: false,
            connect_deadline: None,
            events: None,
            pipeline: None,
            paused: false,
            logging: false,
            commit_sent: false,
            throttle_pct: 0,
            throttle_unsupported: false,
            acked: Arc::default(),
            disk_base: 0,
            last_disk_sent: 0,
            priority: None,
        }
    }

    fn run(
        &mut self,
        transport: &dyn Transport,
        to: &str,
        key: &Key,
        spec: &VmSpec,
        epoch: u64,
        vm: &mut dyn SourceVm,
    ) -> Result<Outcome, MigrationError> {
        let session = self.session;
        let mut data = Vec::with_capacity(self.streams as usize);
        let control = self.connect(transport, to, key, &session, 0, &spec.name)?;
        for i in 1..=self.streams {
            data.push(self.connect(transport, to, key, &session, i, &spec.name)?);
        }
        if self.cfg.mode.may_postcopy() {
            let p = self.streams + 1;
            self.priority = Some(self.connect(transport, to, key, &session, p, &spec.name)?);
        }
        self.check_cancel()?;
        // The reader thread owns receiving from here on; waits below poll its
        // channel, so a cancel is seen within 50 ms whatever the target does.
        let setup_err = |source| MigrationError::Transport {
            phase: "setup",
            source,
        };
        self.start_control_reader(control).map_err(setup_err)?;
        // SPEC: the target creates memory and starts its VMM.
        self.send_control(&ControlMsg::Spec {
            spec: spec.clone(),
            epoch,
            mode: self.cfg.mode,
        })
        .map_err(|source| MigrationError::Protocol {
            phase: "sending the spec",
            source,
        })?;
        match self.wait_control("waiting for the target", self.cfg.slow_step_timeout)? {
            ControlMsg::SpecAck => {}
            other => {
                return Err(unexpected(
                    "waiting for the target",
                    Incoming::Control(other),
                ))
            }
        }
        let setup_ms = self.metrics.elapsed_ms();
        self.metrics.update(|s| {
            s.setup_time_ms = setup_ms;
            s.status = Status::Active;
        });

        vm.start_dirty_log()?;
        self.logging = true;
        let xor_bytes = self
            .cfg
            .xor_cache_bytes
            .unwrap_or_else(|| xor_cache_default(self.mem.bytes()))
            .min(self.mem.bytes());
        self.metrics.update(|s| s.xor.cache_bytes = xor_bytes);
        let throttle = self.cfg.bandwidth_mib_s.map(|b| Arc::new(Throttle::new(b)));
        // One index space for the round loop and the policy: memory pages,
        // then (from a word boundary, so each side syncs whole words) disk
        // blocks.
        let mem_pages = self.mem.pages();
        let base = mem_pages.div_ceil(64) * 64;
        let total = if self.disk_blocks > 0 {
            base + self.disk_blocks
        } else {
            mem_pages
        };
        self.disk_base = base;
        let disk_input = self.cfg.disk.as_ref().map(|d| DiskInput {
            file: d.file.clone(),
            blocks: self.disk_blocks,
            base,
        });
        self.pipeline = Some(
            Pipeline::start(
                self.mem.clone(),
                data,
                self.metrics.clone(),
                throttle,
                xor_bytes,
                disk_input,
                &self.cfg.placement,
            )
            .map_err(|source| MigrationError::Transport {
                phase: "starting streams",
                source,
            })?,
        );

        // Pre-copy: the bulk round sends everything, then dirty rounds. The
        // bulk round sends the pages with memory behind them in the memfd.
        // Holes are zero, and so is every page of the target's fresh memory:
        // they cost nothing (a hole written from now on is in the dirty log).
        let started = Instant::now();
        let pages = total;
        let mut send = DirtyBitmap::new(pages);
        let mut data_pages = 0;
        for (first, count) in self.mem.data_runs() {
            send.set_range(first, count);
            data_pages += count;
        }
        self.metrics
            .pages_zero
            .fetch_add(mem_pages - data_pages, Ordering::Relaxed);
        if let Some(d) = &self.cfg.disk {
            // Blocks written from here on are in the disk log, so reading
            // the allocation after logging started misses nothing.
            //
            // A VMM that writes through the page cache leaves dirty pages
            // behind; an O_DIRECT read must write back the dirty pages in its
            // range first, one read at a time. Flushing the backlog once here
            // (one fdatasync) spares the bulk phase most of that.
            let t = Instant::now();
            if let Err(e) = d.file.sync_data() {
                tracing::warn!("disk: fdatasync before the bulk phase failed: {e}");
            }
            tracing::info!("disk: flushed the image's dirty pages in {:?}", t.elapsed());
            let sel = crate::disk::select_bulk(&d.file, self.disk_blocks, d.fs_aware)
                .map_err(|e| MigrationError::Invalid(format!("reading the disk image: {e}")))?;
            for &(first, count) in &sel.runs {
                send.set_range(base + first, count);
            }
            tracing::info!(
                allocated = sel.allocated_blocks,
                bulk = sel.bulk_blocks,
                "disk: bulk phase by {}",
                sel.selection
            );
            self.metrics.update(|s| {
                if let Some(ds) = s.disk.as_mut() {
                    ds.selection = sel.selection.clone();
                    ds.allocated_blocks = sel.allocated_blocks;
                    ds.bulk_blocks = sel.bulk_blocks;
                }
            });
        }
        let limits = Limits {
            downtime_ms: self.cfg.downtime_ms,
            downtime_max_ms: self.cfg.downtime_max_ms.max(self.cfg.downtime_ms),
            rounds_max: self.cfg.rounds_max,
            time_max_ms: self.cfg.time_max.as_millis() as u64,
        };
        let fragments = pages.div_ceil(FRAGMENT_PAGES) as usize;
        let mut policy = Policy::new(self.cfg.policy, limits, fragments);
        // D_r (this sync), D_(r-1), pages held back, and everything pending.
        let mut dirty = DirtyBitmap::new(pages);
        let mut prev_dirty = DirtyBitmap::new(pages);
        let mut held = DirtyBitmap::new(pages);
        let mut pending = DirtyBitmap::new(pages);
        let mut scratch = DirtyBitmap::new(pages);
        let mut rate = RateMeter::default();
        let mut round = 0u32;
        let switch = loop {
            if self.cfg.mode == Mode::Postcopy {
                // Straight to the switch: every page with data is stale.
                pending.copy_from(&send);
                break Switch::Postcopy;
            }
            round += 1;
            let t = Instant::now();
            // The throttle this round ran under.
            let throttle_pct = self.throttle_pct;
            let peek = (round == 1).then_some(&mut *vm);
            let sent = self.send_round(&mut send, round, peek)?;
            rate.add(sent, t.elapsed());

            if round >= 2 {
                self.wait_round_min(t)?;
            }
            let round_time = t.elapsed();
            dirty.clear();
            self.sync_logs(vm, &mut dirty)?;
            let dirty_pages = dirty.count();
            scratch.set_and(&dirty, &prev_dirty);
            let hot_pages = scratch.count();
            pending.copy_from(&held);
            pending.or_with(&dirty);
            let stats = RoundStats {
                round,
                elapsed_ms: started.elapsed().as_millis() as u64,
                round_ms: round_time.as_millis() as u64,
                sent_pages: sent,
                rate_pages_s: rate.pages_s(),
                dirty_pages,
                hot_pages,
                pending_pages: pending.count(),
                throttle_pct,
                mem_pages: pages,
            };
            let d = policy.decide(&stats, &dirty.count_blocks(FRAGMENT_PAGES));
            // Next round's pages: pending minus what the policy holds back.
            held.clear();
            if d.action == Action::Iterate {
                if d.defer_hot {
                    held.copy_from(&scratch);
                }
                held.set_blocks(FRAGMENT_PAGES, &d.frozen);
                held.and_with(&pending);
            }
            let deferred = held.count();
            let remaining_blocks = if self.disk_blocks > 0 {
                pending
                    .runs_set_within(self.disk_base, self.disk_blocks)
                    .map(|(_, c)| c)
                    .sum()
            } else {
                0
            };
            tracing::info!(
                round,
                sent,
                ms = stats.round_ms,
                dirty = dirty_pages,
                hot = hot_pages,
                pending = stats.pending_pages,
                deferred,
                est_ms = d.estimate_ms,
                "{}",
                d.reason
            );
            let acked: Vec<u64> = self
                .acked
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .collect();
            self.metrics.update(|s| {
                s.acked_seq = acked;
                s.iterations = round;
                s.remaining_pages = stats.pending_pages;
                if let Some(ds) = s.disk.as_mut() {
                    ds.remaining_blocks = remaining_blocks;
                }
                s.dirty_pages_rate = stats.dirty_rate() as u64;
                s.expected_downtime_ms = d.estimate_ms;
                s.rounds.push(RoundLog {
                    round,
                    pages: sent,
                    ms: stats.round_ms,
                    dirty_after: dirty_pages,
                    rate_mib_s: sent as f64 * PAGE_SIZE as f64
                        / 1048576.0
                        / round_time.as_secs_f64().max(1e-6),
                    decision: d.reason.clone(),
                    dirty_rate: stats.dirty_rate() as u64,
                    deferred,
                    throttle_pct,
                    elapsed_ms: stats.elapsed_ms,
                    hot: hot_pages,
                    pending: stats.pending_pages,
                    rate_pages_s: stats.rate_pages_s as u64,
                    estimate_ms: d.estimate_ms,
                    class: d.class.into(),
                    disk_blocks: self.last_disk_sent,
                });
            });
            // Hybrid: a stop within the downtime budget is a stop-and-copy;
            // anything else pre-copy would do next (spend extra downtime,
            // throttle the guest, go on iterating past the round cap, give
            // up) is worse than post-copy's few milliseconds.
            let in_budget =
                d.action == Action::StopAndCopy && d.estimate_ms <= self.cfg.downtime_ms;
            if self.cfg.mode == Mode::Hybrid
                && !in_budget
                && (d.action != Action::Iterate
                    || d.class == "memory-intensive"
                    || d.throttle_pct > 0
                    || round >= HYBRID_ROUNDS_MAX)
            {
                tracing::info!(
                    round,
                    pending = stats.pending_pages,
                    "switching to post-copy"
                );
                break Switch::Postcopy;
            }
            match d.action {
                Action::StopAndCopy => break Switch::StopAndCopy(d.estimate_ms),
                Action::GiveUp => {
                    return Err(MigrationError::NotConverged(format!(
                        "after {round} rounds and {} ms, {} pending pages would need ~{} ms of downtime (budget {} ms, policy {})",
                        stats.elapsed_ms,
                        stats.pending_pages,
                        d.estimate_ms,
                        self.cfg.downtime_ms,
                        self.cfg.policy
                    )))
                }
                Action::Iterate => {}
            }
            if d.throttle_pct != self.throttle_pct {
                self.set_throttle(vm, d.throttle_pct)?;
            }
            send.copy_from(&pending);
            send.and_not(&held);
            std::mem::swap(&mut prev_dirty, &mut dirty);
            self.check_cancel()?;
        };

        let r = Reconnect {
            transport,
            to,
            key,
            vm: &spec.name,
            session,
        };
        let expected_ms = match switch {
            Switch::StopAndCopy(ms) => ms,
            Switch::Postcopy => {
                return self.postcopy(vm, &mut pending, &mut dirty, round, epoch, &r);
            }
        };
        // Switchover: pause, final round, state, PREPARE.
        self.check_cancel()?;
        self.metrics.update(|s| {
            s.status = Status::Switchover;
            s.expected_downtime_ms = expected_ms;
        });
        let paused_at = Instant::now();
        let state = vm.pause()?;
        self.paused = true;
        dirty.clear();
        self.sync_logs(vm, &mut dirty)?;
        pending.or_with(&dirty);
        round += 1;
        let final_pages = pending.count();
        self.send_round(&mut pending, round, None)?;
        if self.throttle_pct != 0 {
            // Paused anyway; the target's VMM starts unthrottled.
            self.set_throttle(vm, 0)?;
        }
        let totals = self.finish_pipeline();
        self.metrics.update(|s| {
            s.iterations = round;
            s.remaining_pages = 0;
            s.guest_progress_at_pause = state.progress;
            s.rounds.push(RoundLog {
                round,
                pages: final_pages,
                disk_blocks: self.last_disk_sent,
                ms: paused_at.elapsed().as_millis() as u64,
                dirty_after: 0,
                rate_mib_s: 0.0,
                decision: "final round (guest paused)".into(),
                ..RoundLog::default()
            });
        });
        self.send_state_and_prepare(&state, totals, false)?;
        self.metrics.update(|s| s.status = Status::Committing);
        let verify = match self.wait_control("waiting for PREPARED", self.cfg.slow_step_timeout)? {
            ControlMsg::Prepared { verify, .. } => verify,
            ControlMsg::Abort { reason } => return Err(MigrationError::PeerAborted(reason)),
            other => return Err(unexpected("waiting for PREPARED", Incoming::Control(other))),
        };
        self.check_cancel()?;

        // The point of no return: record the hand-off, then COMMIT.
        let new_epoch = epoch + 1;
        self.record_hand_off(&r, new_epoch, false, false)?;
        self.metrics.update(|s| s.epoch = new_epoch);
        tracing::info!(epoch = new_epoch, "hand-off recorded; sending COMMIT");
        if let Err(e) = self.commit(new_epoch) {
            let MigrationError::CommitUnknown(why) = e else {
                return Err(e);
            };
            // The target may run the VM or not: ask it (on new connections,
            // as a restarted ferryd would) until it says, or for
            // `inquiry_max`; the VM stays paused here meanwhile.
            tracing::warn!("COMMIT in doubt ({why}); asking the target how it ended");
            let mut ignored = 0;
            self.stop_connection(&mut ignored);
            let answered = self.inquire(vm, &r, new_epoch);
            if answered.is_ok() {
                let downtime_ms = paused_at.elapsed().as_millis() as u64;
                self.metrics.update(|s| s.downtime_ms = downtime_ms);
            }
            return answered;
        }
        let downtime_ms = (paused_at.elapsed().as_millis() as u64).saturating_sub(verify.verify_ms);
        self.paused = false;
        self.logging = false;
        let verify_ms = verify.verify_ms;
        self.metrics.update(|s| {
            s.downtime_ms = downtime_ms;
            s.verify_ms = verify_ms;
            s.verify = Some(verify);
        });
        self.metrics.finish(Status::Completed, None);
        // The oracle's pass is a test instrument, not part of the migration.
        self.metrics
            .update(|s| s.total_time_ms = s.total_time_ms.saturating_sub(verify_ms));
        if let Err(e) = vm.hand_off(new_epoch) {
            // The VM runs on the target; the local VMM failing to stop is the
            // operator's to clean up, never a reason to run the guest here.
            tracing::error!("the VM runs on the target but the local VMM did not stop: {e}");
        }
        if let Some(c) = &self.control {
            c.handle.shutdown();
        }
        Ok(Outcome { epoch: new_epoch })
    }

    /// Makes `control` this migration's control stream, with a reader
    /// thread that counts the target's acks (fresh per connection) and
    /// forwards everything else.
    fn start_control_reader(
        &mut self,
        control: Box<dyn Conn>,
    ) -> Result<(), ferry_transport::TransportError> {
        let mut reader = control.try_clone()?;
        reader.set_timeout(None)?;
        let handle = control.try_clone()?;
        let tx = Arc::new(Mutex::new(ControlTx {
            conn: control,
            seq: 0,
        }));
        self.control = Some(Control {
            tx: tx.clone(),
            handle,
        });
        let acked: Arc<Vec<AtomicU64>> =
            Arc::new((0..self.streams).map(|_| AtomicU64::new(0)).collect());
        self.acked = acked.clone();
        self.events = Some(spawn_control_reader(
            ControlReader {
                conn: reader,
                seq: 0,
                pages: self.mem.pages(),
                checkpoints: self.checkpoints.clone(),
                staging: None,
                tx,
            },
            acked,
        ));
        Ok(())
    }

    /// Records the hand-off in the journal, if there is one: a failure
    /// fails the migration before COMMIT.
    fn record_hand_off(
        &self,
        r: &Reconnect<'_>,
        epoch: u64,
        postcopy: bool,
        take_back: bool,
    ) -> Result<(), MigrationError> {
        let Some(j) = &self.cfg.journal else {
            return Ok(());
        };
        let h = HandOff {
            session: hex(&r.session),
            vm: r.vm.into(),
            to: r.to.into(),
            transport: r.transport.name().into(),
            streams: self.streams,
            epoch,
            postcopy,
            take_back,
            grace_ms: self.cfg.postcopy_grace.as_millis() as u64,
            released: false,
        };
        *self.hand_off.lock().unwrap_or_else(|p| p.into_inner()) = Some(h.clone());
        j.hand_off(&h).map_err(|e| {
            MigrationError::Invalid(format!(
                "cannot record the hand-off (so a restarted ferryd could finish it): {e}"
            ))
        })
    }

    /// Sends COMMIT (the hand-off is recorded) and waits for COMMITTED.
    /// Any answer but COMMITTED or an explicit ABORT leaves the outcome to
    /// the target: [`MigrationError::CommitUnknown`].
    fn commit(&mut self, new_epoch: u64) -> Result<(), MigrationError> {
        self.commit_sent = true;
        self.send_control(&ControlMsg::Commit { epoch: new_epoch })
            .map_err(|e| MigrationError::CommitUnknown(format!("sending COMMIT failed: {e}")))?;
        match self.wait_control("waiting for COMMITTED", self.cfg.io_timeout) {
            Ok(ControlMsg::Committed) => Ok(()),
            // An explicit ABORT means the target did not run the VM: it is ours again.
            Err(e @ MigrationError::PeerAborted(_)) => Err(e),
            Ok(other) => Err(MigrationError::CommitUnknown(format!(
                "the target answered COMMIT with {other:?}"
            ))),
            Err(e) => Err(MigrationError::CommitUnknown(e.to_string())),
        }
    }

    /// The switch to post-copy and the post-copy phase (see
    /// [`crate::postcopy`]): pause, tell the target which pages are stale,
    /// hand the VM over, then serve faults and push the rest until the
    /// target holds every page.
    fn postcopy(
        &mut self,
        vm: &mut dyn SourceVm,
        pending: &mut DirtyBitmap,
        dirty: &mut DirtyBitmap,
        round: u32,
        epoch: u64,
        reconnect: &Reconnect<'_>,
    ) -> Result<Outcome, MigrationError> {
        self.check_cancel()?;
        let switch_after = round;
        self.metrics.update(|s| s.status = Status::Switchover);
        let paused_at = Instant::now();
        let state = vm.pause()?;
        self.paused = true;
        dirty.clear();
        self.sync_logs(vm, dirty)?;
        pending.or_with(dirty);
        if self.throttle_pct != 0 {
            self.set_throttle(vm, 0)?;
        }
        let stale_pages = pending.count();
        let totals = self.pipeline.as_ref().expect("pipeline running").totals();
        // The stale bitmap covers memory pages only (no disk in post-copy).
        let words = self.mem.pages().div_ceil(64) as usize;
        let stale: Vec<u8> = pending.words_mut()[..words]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let phase = "sending the stale bitmap";
        self.send_frame(FrameKind::Stale, &stale)
            .map_err(|source| MigrationError::Protocol { phase, source })?;
        self.metrics
            .wire_bytes
            .fetch_add(stale.len() as u64 + 24, Ordering::Relaxed);
        self.send_state_and_prepare(&state, totals, true)?;
        self.metrics.update(|s| {
            s.status = Status::Committing;
            s.guest_progress_at_pause = state.progress;
            s.remaining_pages = stale_pages;
        });
        // Whether a lost target can be replaced: it checkpoints (and keeps a
        // lease), and this VM can roll back to a checkpoint.
        let take_back =
            match self.wait_control("waiting for PREPARED", self.cfg.slow_step_timeout)? {
                ControlMsg::Prepared { checkpoints, .. } => checkpoints && self.checkpoint_ms() > 0,
                ControlMsg::Abort { reason } => return Err(MigrationError::PeerAborted(reason)),
                other => return Err(unexpected("waiting for PREPARED", Incoming::Control(other))),
            };
        if !take_back {
            // Nothing may be applied to guest memory then.
            if let Some(c) = &self.checkpoints {
                c.close();
            }
        }
        self.check_cancel()?;
        // Serve pages from now on: the target's VMM touches guest memory as
        // soon as it runs, before COMMITTED comes back.
        let priority = self.priority.take().expect("priority stream connected");
        let wire_bytes = Arc::new(AtomicU64::new(0));
        let server = crate::postcopy::source::DemandServer::start(
            self.mem.clone(),
            priority,
            self.streams + 1,
            wire_bytes.clone(),
        )
        .map_err(|source| MigrationError::Transport {
            phase: "starting the demand server",
            source,
        })?;
        let new_epoch = epoch + 1;
        if let Err(e) = self.record_hand_off(reconnect, new_epoch, true, take_back) {
            server.stop();
            return Err(e);
        }
        self.metrics.update(|s| s.epoch = new_epoch);
        tracing::info!(
            epoch = new_epoch,
            stale_pages,
            "hand-off recorded; sending COMMIT (post-copy)"
        );
        // With take-back, a COMMIT whose outcome is unknown is a broken
        // connection: either the target runs the VM (and a resume finds
        // it) or it does not (and the lease rule makes taking it back safe).
        let mut broke_at_commit = None;
        if let (Some(c), true) = (&self.checkpoints, take_back) {
            c.arm();
        }
        match self.commit(new_epoch) {
            Ok(()) => {}
            Err(MigrationError::CommitUnknown(e)) if take_back => {
                broke_at_commit = Some(format!("COMMIT: {e}"))
            }
            Err(e) => {
                server.stop();
                return Err(e);
            }
        }
        // The VM runs on the target from here; this side only serves pages.
        let running_at = Instant::now();
        let downtime_ms = paused_at.elapsed().as_millis() as u64;
        self.metrics.update(|s| {
            s.downtime_ms = downtime_ms;
            s.status = Status::Postcopy;
            s.postcopy = Some(crate::postcopy::PostcopyStats {
                stale_pages,
                switch_after_round: switch_after,
                ..Default::default()
            });
        });
        if self.logging {
            self.logging = false;
            if let Err(e) = vm.stop_dirty_log() {
                tracing::warn!("could not stop dirty logging: {e}");
            }
        }
        let serve = Serve {
            pending: &*pending,
            server: Some(server),
            round,
            epoch: new_epoch,
            take_back,
            state: &state,
            broke: broke_at_commit,
            switch_after,
            running_at,
            wire_bytes,
        };
        self.serve_postcopy(vm, reconnect, serve)
    }

    /// Post-copy from COMMIT on (or, for [`recover_out`], from a restarted
    /// daemon's first RESUME): serve faults and push what the target
    /// lacks, over new connections when one breaks, until the target holds
    /// every page (the VM is handed off), or it is lost (the VM is taken
    /// back, with `take_back`).
    fn serve_postcopy(
        &mut self,
        vm: &mut dyn SourceVm,
        reconnect: &Reconnect<'_>,
        serve: Serve<'_>,
    ) -> Result<Outcome, MigrationError> {
        let Serve {
            pending,
            server,
            mut round,
            epoch: new_epoch,
            take_back,
            state,
            broke: mut broke_at_commit,
            switch_after,
            running_at,
            wire_bytes,
        } = serve;
        let broken = MigrationError::PostcopyBroken;
        let mut server = server;
        let watch = match (&self.checkpoints, take_back) {
            (Some(c), true) => {
                let w = crate::postcopy::checkpoint::GraceWatch::start(
                    c.clone(),
                    self.cfg.postcopy_grace,
                );
                w.arm(self.connection_handles(server.as_ref()));
                Some(w)
            }
            _ => None,
        };
        let mut todo = pending.clone();
        let mut resend = switch_after > 0;
        let (mut served, mut background) = (0u64, 0u64);
        let result = loop {
            let r = match (broke_at_commit.take(), &server) {
                (Some(e), _) => Err(PushEnd::Broke(e)),
                (None, Some(server)) => {
                    round += 1;
                    let demand = server.demand().clone();
                    let r = self.postcopy_push(&demand, todo.clone(), round, resend, running_at);
                    served += demand.pages.load(Ordering::Relaxed);
                    r
                }
                (None, None) => Err(PushEnd::Broke("no connection".into())),
            };
            if let Some(s) = server.take() {
                s.stop();
            }
            match r {
                Ok(verify) if !take_back => {
                    // No lease there: RELEASED is a courtesy.
                    if let Some(c) = &self.checkpoints {
                        c.close();
                    }
                    if self.send_control(&ControlMsg::Released).is_ok() {
                        self.drain_control(Duration::from_secs(2));
                    }
                    break Ok(verify);
                }
                Ok(verify) => {
                    let r = self.release(vm, reconnect, pending, &wire_bytes, state);
                    self.stop_connection(&mut background);
                    break r.map(|()| verify);
                }
                Err(PushEnd::Concluded(c)) => {
                    self.stop_connection(&mut background);
                    break self.concluded(vm, c, take_back, state);
                }
                Err(PushEnd::Fenced(e) | PushEnd::Fatal(e)) if !take_back => break Err(broken(e)),
                Err(PushEnd::Fenced(e)) => {
                    self.stop_connection(&mut background);
                    break Err(self.take_back(vm, format!("the target stopped: {e}"), state));
                }
                // With take-back, even a protocol error only ends this
                // connection: a new one may go on, and if none can, the
                // target's lease runs out before the grace does.
                Err(PushEnd::Fatal(e) | PushEnd::Broke(e)) => {
                    if let Some(why) = take_back
                        .then(|| self.drain_control(Duration::from_millis(500)))
                        .flatten()
                    {
                        self.stop_connection(&mut background);
                        let why = format!("the target stopped: {why} ({e})");
                        break Err(self.take_back(vm, why, state));
                    }
                    // The connection broke: the guest on the target waits
                    // for the pages it touches. Reconnect and go on with
                    // what the target still lacks.
                    tracing::warn!("post-copy: {e}; reconnecting");
                    self.stop_connection(&mut background);
                    match self.resume_postcopy(reconnect, pending, &wire_bytes, take_back) {
                        Ok((missing, s)) => {
                            todo = missing;
                            if let Some(w) = &watch {
                                w.arm(self.connection_handles(Some(&s)));
                            }
                            server = Some(s);
                            self.metrics.update(|s| {
                                if let Some(p) = s.postcopy.as_mut() {
                                    p.reconnects += 1;
                                }
                            });
                            // A new pipeline's delta caches are empty.
                            resend = false;
                        }
                        Err(PushEnd::Concluded(c)) => {
                            break self.concluded(vm, c, take_back, state)
                        }
                        // Silence after RELEASED: the target may run unleased.
                        Err(e2) if take_back && self.released => {
                            break Err(broken(format!(
                                "{e}; {}; RELEASED went out before, so the target may run \
                                 the VM: it stays paused here (`ferry migrate --resume` asks \
                                 the target again)",
                                e2.message()
                            )))
                        }
                        Err(e2) if take_back => {
                            let why = format!("{e}; {}", e2.message());
                            break Err(self.take_back(vm, why, state));
                        }
                        Err(e2) => break Err(broken(format!("{e}; {}", e2.message()))),
                    }
                }
            }
        };
        self.metrics
            .wire_bytes
            .fetch_add(wire_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
        let verify = result?;
        let duration_ms = running_at.elapsed().as_millis() as u64;
        // None when the end was learnt from the target (CONCLUDED).
        let totals = if self.pipeline.is_some() {
            self.finish_pipeline()
        } else {
            Vec::new()
        };
        let background = background + totals.iter().map(|t| t.pages).sum::<u64>();
        self.paused = false;
        self.metrics.update(|s| {
            s.iterations = round;
            s.remaining_pages = 0;
            s.verify_ms = verify.verify_ms;
            s.verify = Some(verify);
            if let Some(p) = s.postcopy.as_mut() {
                p.requested_pages = served;
                p.demand_pages = served;
                p.background_pages = background;
                p.duration_ms = duration_ms;
            }
        });
        self.metrics.finish(Status::Completed, None);
        self.metrics
            .update(|s| s.total_time_ms = s.total_time_ms.saturating_sub(s.verify_ms));
        if let Err(e) = vm.hand_off(new_epoch) {
            tracing::error!("the VM runs on the target but the local VMM did not stop: {e}");
        }
        if let Some(c) = &self.control {
            c.handle.shutdown();
        }
        Ok(Outcome { epoch: new_epoch })
    }

    /// Every page is on the target, whose guest runs under a lease: let go
    /// (RELEASED), and know that it was heard before handing the VM off.
    /// The target's clean close says so, as does CONCLUDED `completed` on a
    /// new connection. FENCED (its guest stopped before it let go), or
    /// CONCLUDED `fenced`, means the VM is taken back. With no answer, after
    /// the grace, the outcome is unknown: taking the VM back could run it
    /// twice (the target may have heard), handing it off could lose it (it
    /// may not have, and its lease ends).
    fn release(
        &mut self,
        vm: &mut dyn SourceVm,
        reconnect: &Reconnect<'_>,
        pending: &DirtyBitmap,
        wire_bytes: &Arc<AtomicU64>,
        state: &VmState,
    ) -> Result<(), MigrationError> {
        let mut background = 0;
        // From the first RELEASED on, silence never means the target stopped.
        if !self.released {
            self.released = true;
            let h = self
                .hand_off
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let (Some(j), Some(mut h)) = (&self.cfg.journal, h) {
                h.released = true;
                if let Err(e) = j.hand_off(&h) {
                    tracing::error!("cannot record that RELEASED goes out: {e}");
                }
            }
        }
        loop {
            let end = match self.send_control(&ControlMsg::Released) {
                Ok(()) => self.release_end(Duration::from_secs(2)),
                Err(e) => Err(format!("sending RELEASED: {e}")),
            };
            let e = match end {
                Ok(None) => {
                    if let Some(c) = &self.checkpoints {
                        c.close();
                    }
                    return Ok(());
                }
                Ok(Some(why)) => {
                    self.stop_connection(&mut background);
                    let why = format!("the target stopped its guest before it let go: {why}");
                    return Err(self.take_back(vm, why, state));
                }
                Err(e) => e,
            };
            tracing::warn!("post-copy: RELEASED unconfirmed ({e}); reconnecting");
            self.stop_connection(&mut background);
            match self.resume_postcopy(reconnect, pending, wire_bytes, true) {
                // It still waits: say it again on the new connection.
                Ok((_, server)) => server.stop(),
                Err(PushEnd::Concluded(c)) => {
                    return self.concluded(vm, c, true, state).map(|_| ());
                }
                Err(e2) => {
                    return Err(MigrationError::PostcopyBroken(format!(
                        "every page reached the target, but whether it heard RELEASED is \
                         unknown ({e}; {}); the VM stays paused here: `ferry migrate --resume` \
                         asks the target again",
                        e2.message()
                    )))
                }
            }
        }
    }

    /// After RELEASED: `Ok(None)` when the target closed its side cleanly
    /// (it read RELEASED), `Ok(Some(why))` when it said FENCED, `Err` when
    /// the connection failed or stayed silent for `limit`.
    fn release_end(&self, limit: Duration) -> Result<Option<String>, String> {
        let events = self.events.as_ref().ok_or("no control stream")?;
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(left) {
                Ok(Event::Closed) => return Ok(None),
                Ok(Event::Fenced(r)) => return Ok(Some(r)),
                Ok(Event::Failed(e) | Event::Aborted(e)) => return Err(e),
                Ok(Event::Control(_) | Event::Stale(_)) => {}
                Err(_) => return Err(format!("no word from the target within {limit:?}")),
            }
        }
    }

    /// The checkpoint interval the target is asked for: none when this VM
    /// cannot roll back to one.
    fn checkpoint_ms(&self) -> u64 {
        if self.rollback_ok && self.checkpoints.is_some() && !self.cfg.postcopy_grace.is_zero() {
            self.cfg.checkpoint_interval.as_millis() as u64
        } else {
            0
        }
    }

    /// Reads what is left on the control stream until it ends, at most
    /// for `limit`; returns the reason of a FENCED among it. A target that
    /// stopped its guest says FENCED before it lets go of its connections,
    /// and that word may still be on its way when a data stream fails; and
    /// after RELEASED the target closes first.
    fn drain_control(&self, limit: Duration) -> Option<String> {
        let events = self.events.as_ref()?;
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(left) {
                Ok(Event::Fenced(r)) => return Some(r),
                Ok(Event::Failed(_) | Event::Aborted(_) | Event::Closed) | Err(_) => return None,
                Ok(Event::Control(_) | Event::Stale(_)) => {}
            }
        }
    }

    /// Handles on every stream of the current connection.
    fn connection_handles(
        &self,
        server: Option<&crate::postcopy::source::DemandServer>,
    ) -> Vec<Box<dyn Conn>> {
        let mut h: Vec<Box<dyn Conn>> = self
            .pipeline
            .as_ref()
            .map(|p| p.handles())
            .unwrap_or_default();
        h.extend(server.and_then(|s| s.handle()));
        h.extend(
            self.control
                .as_ref()
                .and_then(|c| c.handle.try_clone().ok()),
        );
        h
    }

    /// Stops everything that used the current connection.
    fn stop_connection(&mut self, background: &mut u64) {
        if let Some(p) = self.pipeline.take() {
            *background += p.totals().iter().map(|t| t.pages).sum::<u64>();
            p.stop(true);
        }
        if let Some(c) = self.control.take() {
            c.handle.shutdown();
        }
        self.events = None;
    }

    /// The migration ended on the target (RESUME answered CONCLUDED):
    /// finish it here accordingly. `Ok` when the VM runs there (its check
    /// of memory is not known here).
    fn concluded(
        &mut self,
        vm: &mut dyn SourceVm,
        c: wire::Conclusion,
        take_back: bool,
        state: &VmState,
    ) -> Result<crate::link::VerifyReport, MigrationError> {
        match c {
            wire::Conclusion::Completed { epoch } => {
                tracing::info!(
                    epoch,
                    "post-copy: the target holds every page and runs the VM"
                );
                if let Some(c) = &self.checkpoints {
                    c.close();
                }
                Ok(crate::link::VerifyReport::default())
            }
            wire::Conclusion::Fenced if take_back => {
                Err(self.take_back(vm, "the target stopped its guest for good".into(), state))
            }
            wire::Conclusion::Fenced => Err(MigrationError::PostcopyBroken(
                "the target stopped its guest for good, and this VM cannot be taken back".into(),
            )),
            wire::Conclusion::Aborted => {
                // COMMIT never took effect there: the VM was never run
                // anywhere since the pause, and nothing was applied here.
                if let Some(c) = &self.checkpoints {
                    c.close();
                }
                if let Err(e) = vm.resume() {
                    return Err(MigrationError::PostcopyBroken(format!(
                        "the target never ran the VM, but it could not be resumed here: {e}"
                    )));
                }
                self.paused = false;
                self.metrics.update(|s| s.epoch = s.epoch.saturating_sub(1));
                Err(MigrationError::PeerAborted(
                    "COMMIT never took effect on the target; the VM runs here again".into(),
                ))
            }
        }
    }

    /// The target is lost for good (or says its guest is stopped): run the
    /// VM here again from the last applied checkpoint (or from the switch,
    /// before any). Returns the migration's error.
    fn take_back(
        &mut self,
        vm: &mut dyn SourceVm,
        why: String,
        at_switch: &VmState,
    ) -> MigrationError {
        if self.checkpoints.as_ref().is_some_and(|c| c.torn()) {
            return MigrationError::PostcopyBroken(format!(
                "{why}; the VM cannot be taken back: this side's ferryd died while it \
                 wrote a checkpoint into guest memory, and no later one mended it"
            ));
        }
        let applied = self.checkpoints.as_ref().and_then(|c| c.close());
        let (from, progress) = applied
            .as_ref()
            .map_or((0, at_switch.progress), |a| (a.id, a.state.progress));
        tracing::warn!(
            checkpoint = from,
            pages = applied.as_ref().map_or(0, |a| a.pages),
            progress,
            "post-copy: {why}; taking the VM back"
        );
        if let Some(a) = &applied {
            if let Err(e) = vm.rollback(&a.state) {
                return MigrationError::PostcopyBroken(format!(
                    "{why}; rolling the VM back to checkpoint {} failed: {e}",
                    a.id
                ));
            }
        }
        if let Err(e) = vm.resume() {
            return MigrationError::PostcopyBroken(format!(
                "{why}; the VM could not be resumed here from checkpoint {from}: {e}"
            ));
        }
        self.paused = false;
        // Ownership moves back: an epoch past the target's.
        self.metrics.update(|s| {
            s.epoch += 1;
            s.guest_progress_at_pause = progress;
            if let Some(p) = s.postcopy.as_mut() {
                p.taken_back_from = Some(from);
            }
        });
        MigrationError::TakenBack(format!(
            "{why}; the VM runs here again from checkpoint {from} (guest progress {progress})"
        ))
    }

    /// One connection's share of post-copy: push `todo` in the background
    /// (from the latest fault on) while the demand server answers faults,
    /// then wait until the target holds every page.
    fn postcopy_push(
        &mut self,
        demand: &crate::postcopy::source::Demand,
        todo: DirtyBitmap,
        round: u32,
        resend: bool,
        running_at: Instant,
    ) -> Result<crate::link::VerifyReport, PushEnd> {
        let broke = |what: &str, e: String| PushEnd::Broke(format!("{what}: {e}"));
        let pipeline = self.pipeline.as_mut().expect("pipeline running");
        // Pages sent in a pre-copy round go as XOR deltas against the copy
        // the target holds; after a pure post-copy switch none was.
        pipeline.set_resend(resend, true);
        let mut order = crate::postcopy::source::PushOrder::new(todo);
        while let Some((back, runs)) = order.next(demand) {
            if let Some(e) = demand.failure.message() {
                return Err(broke("priority stream", e));
            }
            if back {
                pipeline
                    .flush_all()
                    .map_err(|e| broke("background push", e))?;
            }
            for (first, count) in runs {
                pipeline
                    .send_run(&self.mem, first, count)
                    .map_err(|e| broke("background push", e))?;
            }
        }
        pipeline
            .end_round(round, self.cfg.io_timeout * 6)
            .map_err(|e| broke("background push", e))?;
        let pushed_ms = running_at.elapsed().as_millis() as u64;
        tracing::info!(round, pushed_ms, "post-copy: every stale page pushed");
        self.send_control(&ControlMsg::PushDone { round })
            .map_err(|e| broke("sending PUSH_DONE", e.to_string()))?;
        // The target says when it holds every page; it may still be
        // requesting the last ones. Silence for long means it is gone.
        let events = self.events.as_ref().expect("control reader running");
        let mut last = (0, 0);
        let mut quiet_since = Instant::now();
        loop {
            match events.recv_timeout(Duration::from_secs(1)) {
                Ok(Event::Control(ControlMsg::PostcopyDone { verify })) => return Ok(verify),
                Ok(Event::Control(other)) => {
                    return Err(PushEnd::Fatal(format!(
                        "unexpected {other:?} during post-copy"
                    )))
                }
                Ok(Event::Stale(_)) => {
                    return Err(PushEnd::Fatal(
                        "unexpected stale bitmap during post-copy".into(),
                    ))
                }
                Ok(Event::Aborted(r)) => {
                    return Err(PushEnd::Fatal(format!("the target aborted post-copy: {r}")))
                }
                Ok(Event::Fenced(r)) => return Err(PushEnd::Fenced(r)),
                Ok(Event::Failed(e)) => return Err(broke("control stream", e)),
                Ok(Event::Closed) => return Err(broke("control stream", CLOSED.into())),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(broke("control stream", "closed".into()))
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            }
            if let Some(e) = demand.failure.message() {
                return Err(broke("priority stream", e));
            }
            let now = (
                demand.pages.load(Ordering::Relaxed),
                self.acked.iter().map(|a| a.load(Ordering::Relaxed)).sum(),
            );
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() > self.cfg.io_timeout {
                return Err(PushEnd::Broke(format!(
                    "the target sent nothing for {:?}",
                    self.cfg.io_timeout
                )));
            }
        }
    }

    /// Reconnects a post-copy whose connection broke, with backoff, for up
    /// to `postcopy_grace`: a new session that RESUMEs this one. Returns
    /// the pages the target still lacks and the new demand server.
    /// With `take_back`, the grace runs from the last word heard from the
    /// target (the lease rule), and a refusal is retried like a failure:
    /// the answer that counts is the one at the deadline.
    fn resume_postcopy(
        &mut self,
        r: &Reconnect<'_>,
        stale: &DirtyBitmap,
        wire_bytes: &Arc<AtomicU64>,
        take_back: bool,
    ) -> Result<(DirtyBitmap, crate::postcopy::source::DemandServer), PushEnd> {
        let deadline = match (&self.checkpoints, take_back) {
            (Some(c), true) => c.last_heard() + self.cfg.postcopy_grace,
            _ => Instant::now() + self.cfg.postcopy_grace,
        };
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0u32;
        self.connect_deadline = Some(deadline);
        let r = loop {
            if attempt > 0 && Instant::now() >= deadline {
                break Err(PushEnd::Broke(format!(
                    "could not reconnect within {:?} of the last word from the target \
                     ({attempt} attempts)",
                    self.cfg.postcopy_grace
                )));
            }
            attempt += 1;
            match self.try_resume(r, stale, wire_bytes) {
                Ok(x) => {
                    tracing::info!(attempt, "post-copy resumed");
                    break Ok(x);
                }
                Err(e @ PushEnd::Concluded(_)) => break Err(e),
                Err(PushEnd::Fatal(e) | PushEnd::Fenced(e)) if !take_back => {
                    break Err(PushEnd::Fatal(e))
                }
                Err(PushEnd::Fatal(e) | PushEnd::Fenced(e) | PushEnd::Broke(e)) => {
                    if let Some(p) = self.pipeline.take() {
                        p.stop(true);
                    }
                    if let Some(c) = self.control.take() {
                        c.handle.shutdown();
                    }
                    self.events = None;
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || (!take_back && delay > left) {
                        break Err(PushEnd::Broke(format!(
                            "could not reconnect within {:?} ({attempt} attempts; last: {e})",
                            self.cfg.postcopy_grace
                        )));
                    }
                    tracing::info!(
                        attempt,
                        "post-copy: reconnecting failed ({e}); again in {delay:?}"
                    );
                    std::thread::sleep(delay.min(left));
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        };
        self.connect_deadline = None;
        r
    }

    fn try_resume(
        &mut self,
        r: &Reconnect<'_>,
        stale: &DirtyBitmap,
        wire_bytes: &Arc<AtomicU64>,
    ) -> Result<(DirtyBitmap, crate::postcopy::source::DemandServer), PushEnd> {
        let broke = |e: MigrationError| PushEnd::Broke(e.to_string());
        let session = crate::key::random_bytes();
        let control = self
            .connect(r.transport, r.to, r.key, &session, 0, r.vm)
            .map_err(broke)?;
        let mut data = Vec::with_capacity(self.streams as usize);
        for i in 1..=self.streams {
            data.push(
                self.connect(r.transport, r.to, r.key, &session, i, r.vm)
                    .map_err(broke)?,
            );
        }
        let priority = self
            .connect(r.transport, r.to, r.key, &session, self.streams + 1, r.vm)
            .map_err(broke)?;
        self.start_control_reader(control)
            .map_err(|e| PushEnd::Broke(e.to_string()))?;
        self.send_control(&ControlMsg::Resume {
            session: hex(&r.session),
        })
        .map_err(|e| PushEnd::Broke(e.to_string()))?;
        match self.wait_control("resuming post-copy", self.cfg.io_timeout) {
            Ok(ControlMsg::Resumed) => {}
            Ok(ControlMsg::Concluded { outcome }) => return Err(PushEnd::Concluded(outcome)),
            Ok(ControlMsg::Busy { reason }) => return Err(PushEnd::Broke(reason)),
            Ok(other) => {
                return Err(PushEnd::Fatal(format!(
                    "the target answered RESUME with {other:?}"
                )))
            }
            Err(MigrationError::PeerAborted(reason)) => {
                return Err(PushEnd::Fatal(format!(
                    "the target refused to resume: {reason}"
                )))
            }
            Err(e) => return Err(broke(e)),
        }
        let events = self.events.as_ref().expect("reader running");
        let words = match events.recv_timeout(self.cfg.io_timeout) {
            Ok(Event::Stale(w)) => w,
            Ok(Event::Failed(e)) => return Err(PushEnd::Broke(e)),
            Ok(other) => {
                return Err(PushEnd::Fatal(format!(
                    "expected the target's missing pages, got {}",
                    other.name()
                )))
            }
            Err(_) => return Err(PushEnd::Broke("no missing-page bitmap".into())),
        };
        let pages = self.mem.pages();
        if words.len() != pages.div_ceil(64) as usize * 8 {
            return Err(PushEnd::Fatal(format!(
                "the target's missing-page bitmap has {} bytes",
                words.len()
            )));
        }
        let mut missing = DirtyBitmap::new(stale.pages());
        for (w, c) in missing.words_mut().iter_mut().zip(words.chunks_exact(8)) {
            *w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        }
        // Only pages that were stale can be missing.
        missing.and_with(stale);
        tracing::info!(
            missing = missing.count(),
            "post-copy: the target still lacks these"
        );
        self.pipeline = Some(
            Pipeline::start(
                self.mem.clone(),
                data,
                self.metrics.clone(),
                self.cfg.bandwidth_mib_s.map(|b| Arc::new(Throttle::new(b))),
                0,
                None,
                &self.cfg.placement,
            )
            .map_err(|e| PushEnd::Broke(e.to_string()))?,
        );
        let server = crate::postcopy::source::DemandServer::start(
            self.mem.clone(),
            priority,
            self.streams + 1,
            wire_bytes.clone(),
        )
        .map_err(|e| PushEnd::Broke(e.to_string()))?;
        Ok((missing, server))
    }

    fn connect(
        &self,
        transport: &dyn Transport,
        to: &str,
        key: &Key,
        session: &[u8; 16],
        stream: u16,
        vm: &str,
    ) -> Result<Box<dyn Conn>, MigrationError> {
        let phase = "connecting";
        // A resume never waits past its deadline (at least 100 ms a try).
        let timeout = match self.connect_deadline {
            Some(d) => self
                .cfg
                .connect_timeout
                .min(d.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(100)),
            None => self.cfg.connect_timeout,
        };
        let mut conn = transport
            .connect(to, timeout)
            .map_err(|source| MigrationError::Transport { phase, source })?;
        conn.set_timeout(Some(timeout))
            .map_err(|source| MigrationError::Transport { phase, source })?;
        let hello = Hello {
            session: *session,
            stream,
            // A post-copy's priority stream; and after COMMIT every session
            // is a RESUME, which brings one whatever the mode.
            streams: self.streams + u16::from(self.cfg.mode.may_postcopy() || self.commit_sent),
            vm: vm.into(),
        };
        handshake::connect(&mut *conn, key, &hello).map_err(|e| match e {
            WireError::Transport(source) => MigrationError::Transport { phase, source },
            WireError::Refused(r) | WireError::Refusing(r) => MigrationError::Auth(r),
            source => MigrationError::Protocol { phase, source },
        })?;
        conn.set_timeout(Some(self.cfg.io_timeout))
            .map_err(|source| MigrationError::Transport { phase, source })?;
        Ok(conn)
    }

    /// Fills `dirty` from the memory dirty log and, with a disk, the disk's
    /// (at [`Self::disk_base`]).
    fn sync_logs(
        &self,
        vm: &mut dyn SourceVm,
        dirty: &mut DirtyBitmap,
    ) -> Result<(), MigrationError> {
        let mem_words = self.mem.pages().div_ceil(64) as usize;
        let words = dirty.words_mut();
        vm.sync_dirty_log(&mut words[..mem_words])?;
        if self.disk_blocks > 0 {
            let at = (self.disk_base / 64) as usize;
            vm.sync_disk_log(&mut words[at..])?;
        }
        Ok(())
    }

    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.cancel.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        match self.events.as_ref().and_then(|r| r.try_recv().ok()) {
            None => Ok(()),
            Some(Event::Failed(e)) => Err(control_broken("pre-copy", e)),
            Some(Event::Closed) => Err(control_broken("pre-copy", CLOSED.into())),
            Some(Event::Aborted(e) | Event::Fenced(e)) => Err(MigrationError::PeerAborted(e)),
            Some(Event::Control(m)) => Err(unexpected("pre-copy", Incoming::Control(m))),
            Some(Event::Stale(w)) => Err(unexpected("pre-copy", Incoming::Stale(Words(w)))),
        }
    }

    /// Waits out the rest of [`ROUND_MIN`] after a round that started at
    /// `t`, watching for cancel.
    fn wait_round_min(&self, t: Instant) -> Result<(), MigrationError> {
        while let Some(left) = ROUND_MIN.checked_sub(t.elapsed()) {
            self.check_cancel()?;
            std::thread::sleep(left.min(Duration::from_millis(10)));
        }
        Ok(())
    }

    /// Asks the VMM to throttle the guest's vCPUs.
    /// A VM that cannot be throttled is migrated without it (logged once).
    fn set_throttle(&mut self, vm: &mut dyn SourceVm, pct: u8) -> Result<(), MigrationError> {
        if self.throttle_unsupported {
            return Ok(());
        }
        match vm.set_throttle(pct) {
            Ok(()) => {}
            Err(crate::VmError::Unsupported { op }) => {
                tracing::warn!("the VM does not support {op}; converging without throttling");
                self.throttle_unsupported = true;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        self.throttle_pct = pct;
        self.metrics.update(|s| s.throttle_pct = pct);
        Ok(())
    }

    /// Queues every page of `dirty` and ends the round on all streams.
    /// Returns the pages sent.
    ///
    /// With `peek` (the bulk round), every [`PEEK_EVERY`] it reads the dirty
    /// log without clearing it and skips the pages the guest has already
    /// rewritten: they stay in the log, so the sync after the round returns
    /// them and the next round sends them, once, instead of twice (and, with
    /// XOR-delta, from a copy it keeps, so that their next copy is a delta).
    fn send_round<'v>(
        &mut self,
        dirty: &mut DirtyBitmap,
        round: u32,
        mut peek: Option<&mut (dyn SourceVm + 'v)>,
    ) -> Result<u64, MigrationError> {
        /// Pages queued between two looks at cancel and the control stream:
        /// 4096 x 4 KiB = 16 MiB, so a cancel is seen quickly without a look
        /// per run (a dirty round of scattered pages is a run per page).
        const CHECK_PAGES: u64 = 4096;
        let mut sent = 0;
        let mut skipped = 0;
        let mut queued_pages = 0;
        let mut next_check = CHECK_PAGES;
        // Runs split where disk blocks start: memory and disk go different ways.
        let base = self.disk_base;
        let disk = self.disk_blocks > 0;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut disk_sent = 0;
        for (f, c) in dirty.runs() {
            if disk && f < base && f + c > base {
                runs.push((f, base - f));
                runs.push((base, f + c - base));
            } else {
                runs.push((f, c));
            }
        }
        let mut rewritten = peek.as_ref().map(|_| DirtyBitmap::new(dirty.pages()));
        // Peeking, queue in small steps so a fresh look applies soon.
        let step = if peek.is_some() {
            PEEK_STEP_PAGES
        } else {
            CHECK_PAGES
        };
        let mut peeked_at: Option<Instant> = None;
        let pipeline = self.pipeline.as_mut().expect("pipeline running");
        pipeline.set_resend(round >= 2, self.paused);
        for (first, count) in runs {
            let mut p = first;
            while p < first + count {
                let n = (first + count - p).min(step);
                let mut chunk = vec![(p, n)];
                let is_disk = disk && p >= base;
                if is_disk {
                    let pipeline = self.pipeline.as_mut().expect("pipeline running");
                    let queued = pipeline.send_blocks(p - base, n);
                    queued.map_err(|e| self.stage_error(e))?;
                    chunk.clear();
                    sent += n;
                    disk_sent += n;
                } else if let (Some(vm), Some(seen)) = (peek.as_deref_mut(), rewritten.as_mut()) {
                    let due = peeked_at.is_none_or(|t| t.elapsed() >= PEEK_EVERY);
                    let looked = if due {
                        peeked_at = Some(Instant::now());
                        let mem_words = self.mem.pages().div_ceil(64) as usize;
                        vm.peek_dirty_log(&mut seen.words_mut()[..mem_words])
                    } else {
                        Ok(())
                    };
                    match looked {
                        Ok(()) => chunk = seen.runs_within(p, n).collect(),
                        Err(e) => {
                            tracing::info!("not skipping rewritten pages in the bulk round: {e}");
                            peek = None;
                            rewritten = None;
                        }
                    }
                }
                for (q, m) in chunk {
                    let pipeline = self.pipeline.as_mut().expect("pipeline running");
                    let queued = pipeline.send_run(&self.mem, q, m);
                    queued.map_err(|e| self.stage_error(e))?;
                    sent += m;
                }
                skipped += n - (sent - queued_pages);
                queued_pages = sent;
                p += n;
                if sent + skipped >= next_check {
                    next_check = sent + skipped + CHECK_PAGES;
                    self.check_cancel()?;
                }
            }
        }
        self.last_disk_sent = disk_sent;
        if skipped > 0 {
            tracing::info!(
                round,
                skipped,
                "bulk round skipped pages the guest had rewritten"
            );
            self.metrics.update(|s| s.bulk_skipped += skipped);
        }
        self.check_cancel()?;
        let timeout = self.cfg.io_timeout.max(Duration::from_secs(30));
        let pipeline = self.pipeline.as_mut().expect("pipeline running");
        let ended = pipeline.end_round(round, timeout);
        ended.map_err(|e| self.stage_error(e))?;
        Ok(sent)
    }

    fn stage_error(&self, e: String) -> MigrationError {
        match self.events.as_ref().and_then(|r| r.try_recv().ok()) {
            Some(Event::Aborted(reason)) => return MigrationError::PeerAborted(reason),
            Some(Event::Failed(e)) => return control_broken("sending pages", e),
            _ => {}
        }
        MigrationError::Transport {
            phase: "sending pages",
            source: ferry_transport::TransportError::Io {
                op: "data stream",
                source: std::io::Error::other(e),
            },
        }
    }

    /// Ends the last round and stops the stages; returns per-stream totals.
    /// Stops the stages after the final round; returns what each stream sent.
    fn finish_pipeline(&mut self) -> Vec<StreamTotals> {
        let pipeline = self.pipeline.take().expect("pipeline running");
        let totals = pipeline.totals();
        pipeline.stop(false);
        totals
    }

    fn send_control(&self, msg: &ControlMsg) -> Result<(), WireError> {
        self.send_frame(FrameKind::Control, &wire::encode_control(msg))
    }

    fn send_frame(&self, kind: FrameKind, payload: &[u8]) -> Result<(), WireError> {
        self.control
            .as_ref()
            .expect("control stream open")
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(kind, payload)
    }

    fn send_state_and_prepare(
        &mut self,
        state: &VmState,
        streams: Vec<StreamTotals>,
        postcopy: bool,
    ) -> Result<(), MigrationError> {
        let phase = "sending the state";
        if state.blob.len() > crate::vm::STATE_BYTES_MAX {
            return Err(MigrationError::Invalid(format!(
                "the VMM's state blob is {} bytes, over the cap",
                state.blob.len()
            )));
        }
        self.send_frame(FrameKind::State, &state.blob)
            .map_err(|source| MigrationError::Protocol { phase, source })?;
        self.metrics
            .wire_bytes
            .fetch_add(state.blob.len() as u64 + 24, Ordering::Relaxed);
        let prepare = ControlMsg::Prepare {
            streams,
            state_len: state.blob.len() as u64,
            state_crc: crc32c::crc32c(&state.blob),
            progress: state.progress,
            postcopy,
            grace_ms: self.cfg.postcopy_grace.as_millis() as u64,
            checkpoint_ms: if postcopy { self.checkpoint_ms() } else { 0 },
        };
        self.send_control(&prepare)
            .map_err(|source| MigrationError::Protocol { phase, source })
    }

    fn wait_control(
        &self,
        phase: &'static str,
        timeout: Duration,
    ) -> Result<ControlMsg, MigrationError> {
        let events = self.events.as_ref().expect("control reader running");
        let deadline = Instant::now() + timeout;
        loop {
            match events.recv_timeout(Duration::from_millis(50)) {
                Ok(Event::Control(m)) => return Ok(m),
                Ok(Event::Stale(w)) => return Err(unexpected(phase, Incoming::Stale(Words(w)))),
                // A target's guest stopped for good before COMMITTED never
                // ran past the switch: as good as an ABORT.
                Ok(Event::Aborted(e) | Event::Fenced(e)) => {
                    return Err(MigrationError::PeerAborted(e))
                }
                Ok(Event::Failed(e)) => return Err(control_broken(phase, e)),
                Ok(Event::Closed) => return Err(control_broken(phase, CLOSED.into())),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(MigrationError::Transport {
                        phase,
                        source: ferry_transport::TransportError::Io {
                            op: "control stream",
                            source: std::io::Error::other("closed"),
                        },
                    })
                }
                Err(_) if Instant::now() > deadline => {
                    return Err(MigrationError::Transport {
                        phase,
                        source: ferry_transport::TransportError::Io {
                            op: "control stream",
                            source: std::io::Error::other(format!("no answer within {timeout:?}")),
                        },
                    })
                }
                Err(_) => {}
            }
            if self.cancel.is_cancelled() && !self.commit_sent {
                return Err(MigrationError::Cancelled);
            }
        }
    }

    /// Undoes everything after an error before COMMIT: tell the target, stop
    /// the stages, and run the VM here again.
    fn fail(&mut self, vm: &mut dyn SourceVm, e: &MigrationError) {
        tracing::warn!("migration failed: {e}");
        if let Some(p) = self.pipeline.take() {
            p.stop(true);
        }
        if let Some(p) = self.priority.take() {
            p.shutdown();
        }
        if matches!(e, MigrationError::PostcopyBroken(_)) {
            // The VM runs on the target; this side must never run it again.
            tracing::error!("post-copy broke off; the VM stays paused on the source");
            return;
        }
        if matches!(e, MigrationError::CommitUnknown(_)) {
            // COMMIT may have arrived: the target decides. Never resume here.
            tracing::error!("COMMIT outcome unknown; the VM stays paused on the source");
            return;
        }
        if self.control.is_some() {
            let _ = self.send_control(&ControlMsg::Abort {
                reason: e.to_string(),
            });
        }
        if let Some(c) = self.control.take() {
            c.handle.shutdown();
        }
        if self.paused {
            match vm.resume() {
                Ok(()) => self.paused = false,
                Err(re) => tracing::error!(
                    "could not resume the VM on the source after a failed migration: {re}"
                ),
            }
        }
        if self.throttle_pct != 0 {
            match vm.set_throttle(0) {
                Ok(()) => {
                    self.throttle_pct = 0;
                    self.metrics.update(|s| s.throttle_pct = 0);
                }
                Err(te) => tracing::error!("could not lift the guest's throttle: {te}"),
            }
        }
        if self.logging {
            if let Err(se) = vm.stop_dirty_log() {
                tracing::warn!("could not stop dirty logging: {se}");
            }
            self.logging = false;
        }
    }
}

fn control_broken(phase: &'static str, e: String) -> MigrationError {
    MigrationError::Transport {
        phase,
        source: ferry_transport::TransportError::Io {
            op: "control stream",
            source: std::io::Error::other(e),
        },
    }
}

/// A control-stream frame from the target.
#[derive(Debug)]
enum Incoming {
    Control(ControlMsg),
    Ack(wire::Ack),
    Stale(Words),
    /// Part of a checkpoint, staged by the reader.
    Checkpoint,
}

/// A bitmap's bytes; debug-printed by size only.
struct Words(Vec<u8>);

impl std::fmt::Debug for Words {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bitmap of {} bytes", self.0.len())
    }
}

fn unexpected(phase: &'static str, got: Incoming) -> MigrationError {
    MigrationError::Protocol {
        phase,
        source: WireError::Violation(format!("unexpected {got:?}")),
    }
}

/// The sending half of the control stream. The control reader shares it:
/// it acknowledges checkpoints as soon as they are applied.
struct ControlTx {
    conn: Box<dyn Conn>,
    seq: u64,
}

impl ControlTx {
    fn send(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), WireError> {
        self.seq += 1;
        wire::send_frame(&mut *self.conn, kind, 0, self.seq, payload)
    }
}

/// This migration's control stream: the shared sender, and a handle to
/// shut it down without waiting for a send in progress.
struct Control {
    tx: Arc<Mutex<ControlTx>>,
    handle: Box<dyn Conn>,
}

struct ControlReader {
    conn: Box<dyn Conn>,
    seq: u64,
    /// Guest pages (checkpoint pages are checked against it).
    pages: u64,
    /// Post-copy with checkpoints: where they go.
    checkpoints: Option<Arc<crate::postcopy::checkpoint::SourceCheckpoints>>,
    /// A checkpoint being received.
    staging: Option<crate::postcopy::checkpoint::Staging>,
    tx: Arc<Mutex<ControlTx>>,
}

impl ControlReader {
    fn next(&mut self) -> Result<Incoming, WireError> {
        let (h, p) = wire::recv_frame(&mut *self.conn)?;
        if h.stream != 0 {
            return Err(WireError::Unexpected {
                kind: h.kind,
                context: "control stream, wrong stream id",
            });
        }
        if h.seq != self.seq + 1 {
            return Err(WireError::Sequence {
                stream: 0,
                expected: self.seq + 1,
                got: h.seq,
            });
        }
        self.seq = h.seq;
        if let Some(c) = &self.checkpoints {
            c.heard();
        }
        match h.kind {
            FrameKind::Control => Ok(Incoming::Control(wire::decode_control(&p)?)),
            FrameKind::Ack => Ok(Incoming::Ack(wire::Ack::decode(&p)?)),
            FrameKind::Stale => Ok(Incoming::Stale(Words(p))),
            FrameKind::CheckpointPages if self.checkpoints.is_some() => {
                self.staging
                    .get_or_insert_with(Default::default)
                    .add_pages(&p, self.pages)?;
                Ok(Incoming::Checkpoint)
            }
            FrameKind::State if self.checkpoints.is_some() => {
                self.staging
                    .get_or_insert_with(Default::default)
                    .set_state(p)?;
                Ok(Incoming::Checkpoint)
            }
            kind => Err(WireError::Unexpected {
                kind,
                context: "control stream from the target",
            }),
        }
    }

    /// Checkpoint `id` is announced complete: apply it, acknowledge it.
    fn commit_checkpoint(
        &mut self,
        id: u64,
        pages: u64,
        state_len: u64,
        state_crc: u32,
        progress: u64,
    ) -> Result<(), WireError> {
        let Some(c) = &self.checkpoints else {
            return Err(WireError::Violation(
                "a checkpoint in a migration without checkpoints".into(),
            ));
        };
        let staging = self.staging.take().unwrap_or_default();
        if c.commit(staging, id, pages, state_len, state_crc, progress)? {
            tracing::debug!(id, pages, progress, "post-copy: checkpoint applied");
            self.tx.lock().unwrap_or_else(|p| p.into_inner()).send(
                FrameKind::Control,
                &wire::encode_control(&ControlMsg::CheckpointAck { id }),
            )?;
        }
        Ok(())
    }
}

fn spawn_control_reader(mut reader: ControlReader, acked: Arc<Vec<AtomicU64>>) -> Receiver<Event> {
    let (tx, rx) = bounded(16);
    std::thread::Builder::new()
        .name("ferry-control-rx".into())
        .spawn(move || loop {
            match reader.next() {
                Ok(Incoming::Ack(a)) => {
                    if let Some(slot) = acked.get((a.stream as usize).wrapping_sub(1)) {
                        slot.fetch_max(a.seq, Ordering::Relaxed);
                    } else {
                        let _ = tx.send(Event::Failed(format!(
                            "ack for unknown stream {}",
                            a.stream
                        )));
                        return;
                    }
                }
                Ok(Incoming::Control(ControlMsg::Abort { reason })) => {
                    let _ = tx.send(Event::Aborted(reason));
                    return;
                }
                Ok(Incoming::Checkpoint) => {}
                Ok(Incoming::Control(ControlMsg::Checkpoint {
                    id,
                    pages,
                    state_len,
                    state_crc,
                    progress,
                })) => {
                    if let Err(e) =
                        reader.commit_checkpoint(id, pages, state_len, state_crc, progress)
                    {
                        let _ = tx.send(Event::Failed(e.to_string()));
                        return;
                    }
                }
                Ok(Incoming::Control(ControlMsg::Fenced { reason })) => {
                    let _ = tx.send(Event::Fenced(reason));
                    return;
                }
                Ok(Incoming::Control(m)) => {
                    if tx.send(Event::Control(m)).is_err() {
                        return;
                    }
                }
                Ok(Incoming::Stale(Words(w))) => {
                    if tx.send(Event::Stale(w)).is_err() {
                        return;
                    }
                }
                Err(WireError::Transport(ferry_transport::TransportError::Closed { .. })) => {
                    let _ = tx.send(Event::Closed);
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Event::Failed(e.to_string()));
                    return;
                }
            }
        })
        .expect("spawning a thread");
    rx
}

/// The transfer rate the downtime forecast uses, in pages/s: a moving
/// average over rounds large enough to measure (a round of a few pages
/// measures latency, not rate).
#[derive(Debug, Default)]
struct RateMeter {
    rate: Option<f64>,
}

impl RateMeter {
    /// Rounds smaller than this keep the previous rate.
    const PAGES_MIN: u64 = 256;

    fn add(&mut self, pages: u64, took: Duration) {
        let secs = took.as_secs_f64().max(1e-6);
        let now = pages as f64 / secs;
        self.rate = Some(match self.rate {
            None => now.max(1.0),
            Some(r) if pages < Self::PAGES_MIN => r,
            Some(r) => 0.5 * r + 0.5 * now,
        });
    }

    fn pages_s(&self) -> f64 {
        self.rate.unwrap_or(1.0)
    }
}
