//! A deterministic simulation of the switchover and ownership protocol of
//! docs/protocol.md: the source's and the target's control state machines
//! (PREPARE/COMMIT and the hand-off record, the target's stage records,
//! CONCLUDED, post-copy checkpoints, the lease, take-back, RELEASED, RESUME
//! after a break, a restarted ferryd on either side), written out as two explicit state machines and driven on
//! a virtual clock by one seeded event queue with a seeded fault model.
//!
//! ```text
//!  seed ──▶ Params (mode, checkpoints, delays) + one or two Faults
//!        ──▶ World: event queue (virtual ms, FIFO among equal times)
//!              Deliver(msg on conn) · Broken(conn) · Timer(side, kind, gen)
//!              · Crash/Restart(side) · VmmDies
//!            after every action: never two running VMs; epochs only grow
//!        ──▶ at quiescence: no side left waiting; the VM runs on exactly one
//!            side (or the source says `unknown` and a fault explains it)
//! ```
//!
//! Faults: a connection cut (each side notices within the I/O timeout), a
//! message that fails its checks (what a dropped, duplicated, reordered or
//! corrupted frame becomes on a sequence-numbered, CRC-checked stream: the
//! receiver breaks the connection), a stall or a partition (short, or past
//! the I/O timeout, or past the grace), a ferryd crash on either side at
//! any of its actions (its journal or conclusions survive, the rest is
//! lost) and a restart after a while, and the target VMM dying.
//!
//! Everything runs on one thread with no real I/O and no real time, so a
//! seed replays exactly: a failure prints the seed and its trace, and
//! `FERRY_MODEL_SEED=N` replays it (`FERRY_MODEL_SEEDS=N` runs 0..N).
//!
//! This checks the protocol as documented, not the engine's code: the
//! engine runs the same invariant under real threads over the in-process
//! transport in `migrate.rs`, and with real processes in `ferry-bench
//! faults`. Where the two disagree, this file or the engine is wrong.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

type Ms = u64;
type ConnId = u64;

/// The I/O timeout: silence this long breaks a connection.
const IO_TIMEOUT: Ms = 200;
/// The post-copy grace (`--postcopy-grace-s`); the lease is half of it.
const GRACE: Ms = 1_000;
/// The checkpoint interval (`--checkpoint-ms`): two fit in half the grace.
const CHECKPOINT: Ms = 100;
/// How long a source asks how a pre-copy switch ended (`inquiry_max`).
const INQUIRY_MAX: Ms = 3_000;
/// How long a target waits for its source to resume a broken post-copy.
const TARGET_WAIT: Ms = 2 * GRACE;
/// The VM's first epoch; COMMIT gives it EPOCH0 + 1, take-back EPOCH0 + 2.
const EPOCH0: u64 = 7;
/// Simulated time after which a run that has not settled is a hang.
const HORIZON: Ms = 60_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Side {
    Source,
    Target,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Source => Side::Target,
            Side::Target => Side::Source,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Conclusion {
    Aborted,
    Completed(u64),
    Fenced,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Msg {
    // Source to target.
    Start { postcopy: bool, checkpoints: bool },
    Prepare,
    Commit(u64),
    Abort,
    CheckpointAck(u64),
    PushDone,
    Released,
    Resume,
    // Target to source.
    Prepared,
    Committed,
    Refused,
    Checkpoint { id: u64, taken: Ms },
    PostcopyDone,
    Fenced,
    Resumed,
    Concluded(Conclusion),
    Busy,
    NotKnown,
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    /// Source: the pre-copy rounds are over; pause and PREPARE.
    Pause,
    /// Either: an answer did not come within the I/O timeout.
    Reply,
    /// Source: the background push has sent every page.
    Push,
    /// Source: the take-back watchdog (grace since the last word).
    Grace,
    /// Source: the next reconnect attempt.
    Retry,
    /// Target: take a checkpoint.
    Checkpoint,
    /// Target: the lease may have run out.
    Lease,
    /// Target: waited long enough for a RESUME.
    Wait,
}

#[derive(Clone, Debug)]
enum Ev {
    Deliver {
        to: Side,
        conn: ConnId,
        msg: Msg,
        bad: bool,
    },
    Broken {
        side: Side,
        conn: ConnId,
    },
    Timer {
        side: Side,
        kind: Timer,
        generation: u64,
    },
    Restart(Side),
    VmmDies,
    Fault(Fault),
}

/// Who runs the VM on one side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vm {
    /// No VM (target before PREPARE, or its VMM quit).
    None,
    /// Restored or paused: holds the VM, does not run it.
    Held,
    Running(u64),
    /// Stopped for good (the source handed it off; the target fenced).
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// The VM runs on the target; the source VMM quit.
    Completed,
    /// The VM runs on the source again (before COMMIT took effect).
    Resumed,
    /// Post-copy: taken back from the last checkpoint.
    TakenBack,
    /// The source cannot tell; the VM stays paused there.
    Unknown,
}

/// The source's hand-off record: written before COMMIT, survives a crash.
#[derive(Clone, Copy, Debug)]
struct HandOff {
    epoch: u64,
    postcopy: bool,
    take_back: bool,
    released: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SPhase {
    Down,
    Precopy,
    AwaitPrepared,
    AwaitCommitted,
    /// Post-copy, connected: serving pages, applying checkpoints.
    Serving,
    /// RELEASED sent; waiting for the target's clean close.
    Releasing,
    /// Between reconnect attempts.
    Backoff,
    /// RESUME sent on a new connection.
    AwaitResume,
    Done(Outcome),
}

struct Source {
    phase: SPhase,
    conn: Option<ConnId>,
    /// When the last frame of this migration came from the target.
    last_heard: Ms,
    /// When the current string of reconnect attempts began.
    retry_since: Ms,
    backoff: Ms,
    push_left: Ms,
    push_since: Option<Ms>,
    generation: u64,
    // Kept across a crash.
    journal: Option<HandOff>,
    applied: Option<(u64, Ms)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TPhase {
    Down,
    Idle,
    Receiving,
    Prepared,
    Running,
    Ended,
}

struct Target {
    phase: TPhase,
    conn: Option<ConnId>,
    /// The session's connection broke; waiting for RESUME since then.
    waiting: Option<Ms>,
    postcopy: bool,
    checkpoints: bool,
    released: bool,
    lease_until: Ms,
    next_checkpoint: u64,
    sent_checkpoint: Option<(u64, Ms)>,
    generation: u64,
    push_done: bool,
    /// Handling RELEASED (for the blocking window it opens).
    releasing: bool,
    // Kept across a crash.
    conclusion: Option<Conclusion>,
    /// Recorded before PREPARED and before the guest runs.
    stage: Option<Stage>,
}

/// What a target records before it acts, so that a restarted ferryd can
/// tell a switch that never reached COMMIT from one that may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// PREPARED is about to go out: the guest has not run here.
    Prepared,
    /// COMMIT arrived: the guest is about to run.
    Committing,
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The current connection breaks; each side notices within the I/O timeout.
    Cut,
    /// The next message on the current connection fails its checks.
    Bad(Side),
    /// Nothing gets through for this long; longer than the I/O timeout
    /// breaks the connection, and no new one can be made meanwhile.
    Partition(Ms),
    /// This side's ferryd dies at its n-th action from now; restarts after.
    Crash(Side, u32, Ms),
    /// The target VMM dies.
    VmmDies,
}

struct Params {
    postcopy: bool,
    checkpoints: bool,
    precopy_ms: Ms,
    push_ms: Ms,
    delay: (Ms, Ms),
}

struct Conn {
    broken: bool,
    /// Nothing is delivered before this (a partition).
    held_until: Ms,
    last: [Ms; 2],
    bad_next: [bool; 2],
}

struct World {
    rules: Rules,
    now: Ms,
    rng: Rng,
    queue: BinaryHeap<Reverse<(Ms, u64)>>,
    events: HashMap<u64, Ev>,
    next_event: u64,
    p: Params,
    conns: Vec<Conn>,
    partition_until: Ms,
    src: Source,
    tgt: Target,
    svm: Vm,
    tvm: Vm,
    /// Highest epoch any side has run the VM with.
    epoch_max: u64,
    /// Crash countdowns, per side: crash instead of the n-th next action.
    crash_in: HashMap<Side, (u32, Ms)>,
    /// A fault longer than the grace or the inquiry happened: an `unknown`
    /// outcome is allowed.
    long_fault: bool,
    /// The target ferryd died inside one of the protocol's blocking windows
    /// (the guest about to run, or RELEASED being acted on): an `unknown`
    /// outcome is allowed.
    blocking_window: bool,
    /// When the target's guest last stopped running, and since when the
    /// source's restored checkpoint dates: guest time lost by a take-back.
    target_stopped: Option<Ms>,
    /// When the target's guest first ran.
    committed_at: Option<Ms>,
    lost_ms: Option<Ms>,
    /// Why the outcome is `unknown`, when it is.
    unknown_why: Option<&'static str>,
    trace: Vec<String>,
}

struct Crashed;

/// The protocol's rules a mutation test may break, to show the model
/// catches it.
#[derive(Clone, Copy)]
struct Rules {
    /// A restarted target calls a migration last recorded `prepared`
    /// aborted.
    prepared_aborts: bool,
    /// The source never takes the VM back on silence after RELEASED.
    silent_after_released_keeps: bool,
    /// A restarted target settles a migration last recorded `committing`
    /// by its VMM: still running the guest (with all its memory), the
    /// migration completed; gone, the guest is fenced.
    committing_settles: bool,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            prepared_aborts: true,
            silent_after_released_keeps: true,
            committing_settles: true,
        }
    }
}

type Step = Result<(), Crashed>;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

impl World {
    fn new(seed: u64, rules: Rules) -> World {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        for _ in 0..4 {
            rng.next();
        }
        let postcopy = rng.below(3) != 0;
        let p = Params {
            postcopy,
            checkpoints: postcopy && rng.below(4) != 0,
            precopy_ms: rng.range(5, 300),
            push_ms: rng.range(50, 1500),
            delay: {
                let lo = rng.range(0, 3);
                (lo, lo + rng.range(0, 20))
            },
        };
        let mut w = World {
            rules,
            now: 0,
            rng,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            next_event: 0,
            p,
            conns: Vec::new(),
            partition_until: 0,
            src: Source {
                phase: SPhase::Down,
                conn: None,
                last_heard: 0,
                retry_since: 0,
                backoff: 100,
                push_left: 0,
                push_since: None,
                generation: 0,
                journal: None,
                applied: None,
            },
            tgt: Target {
                phase: TPhase::Idle,
                conn: None,
                waiting: None,
                postcopy: false,
                checkpoints: false,
                released: false,
                lease_until: 0,
                next_checkpoint: 1,
                sent_checkpoint: None,
                generation: 0,
                push_done: false,
                releasing: false,
                conclusion: None,
                stage: None,
            },
            svm: Vm::Running(EPOCH0),
            tvm: Vm::None,
            epoch_max: EPOCH0,
            crash_in: HashMap::new(),
            long_fault: false,
            blocking_window: false,
            target_stopped: None,
            committed_at: None,
            lost_ms: None,
            unknown_why: None,
            trace: Vec::new(),
        };
        w.src.push_left = w.p.push_ms;
        // One fault, sometimes two, at seeded times across the run.
        let span = w.p.precopy_ms + w.p.push_ms + 400;
        for _ in 0..(1 + (w.rng.below(4) == 0) as u32) {
            let at = w.rng.below(span);
            let fault = w.draw_fault();
            w.schedule(at, Ev::Fault(fault));
        }
        w
    }

    fn draw_fault(&mut self) -> Fault {
        let side = if self.rng.below(2) == 0 {
            Side::Source
        } else {
            Side::Target
        };
        let outage = match self.rng.below(10) {
            0..=4 => self.rng.range(1, IO_TIMEOUT / 2),
            5..=7 => self.rng.range(IO_TIMEOUT, GRACE / 2),
            _ => self.rng.range(GRACE / 2, 2 * GRACE),
        };
        match self.rng.below(5) {
            0 => Fault::Cut,
            1 => Fault::Bad(side),
            2 => Fault::Partition(outage),
            3 => Fault::Crash(side, self.rng.range(1, 12) as u32, outage),
            _ => Fault::VmmDies,
        }
    }

    fn log(&mut self, s: String) {
        self.trace.push(format!("{:>6} {s}", self.now));
    }

    fn schedule(&mut self, at: Ms, ev: Ev) {
        let id = self.next_event;
        self.next_event += 1;
        self.events.insert(id, ev);
        self.queue.push(Reverse((at, id)));
    }

    fn timer(&mut self, side: Side, kind: Timer, after: Ms) {
        let generation = match side {
            Side::Source => self.src.generation,
            Side::Target => self.tgt.generation,
        };
        self.schedule(
            self.now + after,
            Ev::Timer {
                side,
                kind,
                generation,
            },
        );
    }

    /// One action of `side`: where a crash was planned, it happens instead.
    fn act(&mut self, side: Side) -> Step {
        if let Some((n, restart)) = self.crash_in.get_mut(&side) {
            *n -= 1;
            if *n == 0 {
                let restart = *restart;
                self.crash_in.remove(&side);
                self.crash(side, restart);
                return Err(Crashed);
            }
        }
        Ok(())
    }

    // ---- the network ----

    fn connect(&mut self) -> Option<ConnId> {
        if self.now < self.partition_until || self.tgt.phase == TPhase::Down {
            return None;
        }
        self.conns.push(Conn {
            broken: false,
            held_until: 0,
            last: [0, 0],
            bad_next: [false, false],
        });
        Some(self.conns.len() as ConnId - 1)
    }

    fn send(&mut self, from: Side, conn: Option<ConnId>, msg: Msg) {
        let Some(conn) = conn else { return };
        let dir = from as usize;
        let jitter = self.rng.range(self.p.delay.0, self.p.delay.1);
        let c = &mut self.conns[conn as usize];
        if c.broken {
            return;
        }
        let at = (self.now + jitter).max(c.last[dir]).max(c.held_until);
        c.last[dir] = at;
        let bad = std::mem::take(&mut c.bad_next[dir]);
        self.log(format!("{from:?} sends {msg:?} on {conn}"));
        self.schedule(
            at,
            Ev::Deliver {
                to: from.other(),
                conn,
                msg,
                bad,
            },
        );
    }

    /// `conn` breaks; `side` learns it after `after`, the peer within the
    /// I/O timeout.
    fn break_conn(&mut self, conn: ConnId, side: Side, after: Ms) {
        if self.conns[conn as usize].broken {
            return;
        }
        self.conns[conn as usize].broken = true;
        let peer_after = self.rng.range(0, IO_TIMEOUT);
        self.schedule(self.now + after, Ev::Broken { side, conn });
        self.schedule(
            self.now + peer_after,
            Ev::Broken {
                side: side.other(),
                conn,
            },
        );
    }

    fn apply_fault(&mut self, f: Fault) {
        self.log(format!("FAULT {f:?}"));
        let current = self.src.conn.or(self.tgt.conn);
        match f {
            Fault::Cut => {
                if let Some(c) = current {
                    let after = self.rng.range(0, IO_TIMEOUT);
                    self.break_conn(c, Side::Source, after);
                }
            }
            Fault::Bad(side) => {
                if let Some(c) = current {
                    self.conns[c as usize].bad_next[side as usize] = true;
                }
            }
            Fault::Partition(ms) => {
                if ms >= GRACE / 2 {
                    self.long_fault = true;
                }
                self.partition_until = self.now + ms;
                let live: Vec<ConnId> = (0..self.conns.len() as ConnId)
                    .filter(|&c| !self.conns[c as usize].broken)
                    .collect();
                for c in live {
                    if ms >= IO_TIMEOUT {
                        self.break_conn(c, Side::Source, IO_TIMEOUT);
                    } else {
                        self.conns[c as usize].held_until = self.now + ms;
                    }
                }
            }
            Fault::Crash(side, n, restart) => {
                if restart >= GRACE / 2 {
                    self.long_fault = true;
                }
                self.crash_in.insert(side, (n, restart));
            }
            Fault::VmmDies => self.schedule(self.now, Ev::VmmDies),
        }
    }

    // ---- checks ----

    fn check(&mut self) {
        let running = |v: Vm| matches!(v, Vm::Running(_));
        if running(self.svm) && running(self.tvm) {
            self.fail("the VM runs on both sides");
        }
        for v in [self.svm, self.tvm] {
            if let Vm::Running(e) = v {
                if e < self.epoch_max {
                    self.fail(&format!(
                        "the VM runs with epoch {e} after {}",
                        self.epoch_max
                    ));
                }
                self.epoch_max = e;
            }
        }
    }

    fn fail(&self, why: &str) -> ! {
        panic!("{why}\ntrace:\n{}", self.trace.join("\n"));
    }

    // ---- the run ----

    fn run(&mut self) {
        self.src.phase = SPhase::Precopy;
        self.src.conn = self.connect();
        self.send(
            Side::Source,
            self.src.conn,
            Msg::Start {
                postcopy: self.p.postcopy,
                checkpoints: self.p.checkpoints,
            },
        );
        self.timer(Side::Source, Timer::Pause, self.p.precopy_ms);
        while let Some(Reverse((at, id))) = self.queue.pop() {
            if at > HORIZON {
                break;
            }
            self.now = at;
            let ev = self.events.remove(&id).expect("queued event");
            let _ = self.handle(ev);
            self.check();
        }
        self.settle();
    }

    fn settle(&mut self) {
        let outcome = match self.src.phase {
            SPhase::Done(o) => o,
            other => self.fail(&format!("the source never ended (still {other:?})")),
        };
        if matches!(self.tgt.phase, TPhase::Receiving | TPhase::Prepared) {
            self.fail(&format!("the target never ended ({:?})", self.tgt.phase));
        }
        let s = matches!(self.svm, Vm::Running(_));
        let t = matches!(self.tvm, Vm::Running(_));
        let on_target_alone = t && !s && self.svm == Vm::Stopped;
        let on_source_alone = s && !t;
        match outcome {
            Outcome::Completed if !on_target_alone => {
                self.fail("completed, but the VM does not run on the target alone")
            }
            Outcome::Resumed | Outcome::TakenBack if !on_source_alone => {
                self.fail("resumed, but the VM does not run on the source alone")
            }
            Outcome::Unknown => {
                if s {
                    self.fail("unknown, but the source runs the VM");
                }
                // The cases the protocol documents as left to the operator.
                self.unknown_why = Some(if self.long_fault {
                    "a fault as long as half the grace or more"
                } else if self.blocking_window {
                    "the target ferryd died starting the guest or acting on RELEASED"
                } else if self.p.postcopy && !self.p.checkpoints {
                    "post-copy without checkpoints"
                } else {
                    self.fail("unknown without a fault that explains it")
                });
            }
            _ => {}
        }
        if outcome == Outcome::TakenBack {
            // Nothing is lost when the guest never ran there.
            let from = self.src.applied.map(|(_, t)| t);
            self.lost_ms = Some(match (self.target_stopped, from) {
                (None, _) => 0,
                (Some(stopped), Some(from)) => stopped.saturating_sub(from),
                (Some(stopped), None) => {
                    stopped.saturating_sub(self.committed_at.unwrap_or(stopped))
                }
            });
        }
    }

    fn handle(&mut self, ev: Ev) -> Step {
        match ev {
            Ev::Fault(f) => {
                self.apply_fault(f);
                Ok(())
            }
            Ev::Deliver { to, conn, msg, bad } => {
                if self.conns[conn as usize].broken {
                    return Ok(());
                }
                if bad {
                    self.log(format!("{to:?} finds a bad frame on {conn}"));
                    self.break_conn(conn, to, 0);
                    return Ok(());
                }
                self.log(format!("{to:?} gets {msg:?} on {conn}"));
                match to {
                    Side::Source => self.source_msg(conn, msg),
                    Side::Target => self.target_msg(conn, msg),
                }
            }
            Ev::Broken { side, conn } => match side {
                Side::Source if self.src.conn == Some(conn) => {
                    self.log(format!("Source: {conn} broke"));
                    self.source_broken()
                }
                Side::Target if self.tgt.conn == Some(conn) => {
                    self.log(format!("Target: {conn} broke"));
                    self.target_broken()
                }
                _ => Ok(()),
            },
            Ev::Timer {
                side,
                kind,
                generation,
            } => match side {
                Side::Source if generation == self.src.generation => self.source_timer(kind),
                Side::Target if generation == self.tgt.generation => self.target_timer(kind),
                _ => Ok(()),
            },
            Ev::Restart(side) => {
                self.log(format!("{side:?} ferryd restarts"));
                match side {
                    Side::Source => self.source_restart(),
                    Side::Target => {
                        self.tgt.phase = TPhase::Idle;
                        self.tgt.releasing = false;
                        if self.rules.prepared_aborts
                            && self.tgt.conclusion.is_none()
                            && self.tgt.stage == Some(Stage::Prepared)
                        {
                            // Its VMM quit with it, the guest never having run.
                            self.tgt.conclusion = Some(Conclusion::Aborted);
                        }
                        if self.rules.committing_settles
                            && self.tgt.conclusion.is_none()
                            && self.tgt.stage == Some(Stage::Committing)
                        {
                            self.target_settle();
                        }
                        Ok(())
                    }
                }
            }
            Ev::VmmDies => self.target_vmm_dies(),
        }
    }

    fn crash(&mut self, side: Side, restart_after: Ms) {
        self.log(format!("{side:?} ferryd CRASHES"));
        match side {
            Side::Source => {
                self.src.generation += 1;
                if let Some(c) = self.src.conn.take() {
                    self.break_conn(c, Side::Source, 0);
                }
                self.src.phase = SPhase::Down;
                self.src.push_since = None;
            }
            Side::Target => {
                if !self.rules.committing_settles
                    && (self.tgt.releasing
                        || (self.tgt.stage == Some(Stage::Committing)
                            && self.tgt.conclusion.is_none()))
                {
                    self.blocking_window = true;
                }
                self.tgt.generation += 1;
                if let Some(c) = self.tgt.conn.take() {
                    self.break_conn(c, Side::Target, 0);
                }
                // Its VMM: one that never ran quits; one running under a
                // lease exits when its link to ferryd closes; one with no
                // lease (pre-copy, released) keeps running.
                match self.tvm {
                    Vm::Held => self.tvm = Vm::None,
                    Vm::Running(_)
                        if self.tgt.postcopy && self.tgt.checkpoints && !self.tgt.released =>
                    {
                        self.stop_target_vm()
                    }
                    _ => {}
                }
                self.tgt.phase = TPhase::Down;
                self.tgt.waiting = None;
            }
        }
        self.schedule(self.now + restart_after, Ev::Restart(side));
    }

    fn stop_target_vm(&mut self) {
        if matches!(self.tvm, Vm::Running(_)) {
            self.target_stopped = Some(self.now);
        }
        self.tvm = Vm::Stopped;
    }

    // ---- the source ----

    fn source_timer(&mut self, kind: Timer) -> Step {
        match (kind, self.src.phase) {
            (Timer::Pause, SPhase::Precopy) => {
                self.act(Side::Source)?;
                self.svm = Vm::Held;
                self.act(Side::Source)?;
                self.send(Side::Source, self.src.conn, Msg::Prepare);
                self.src.phase = SPhase::AwaitPrepared;
                self.timer(Side::Source, Timer::Reply, IO_TIMEOUT);
                Ok(())
            }
            (Timer::Reply, SPhase::AwaitPrepared) => self.source_resume("no PREPARED"),
            (Timer::Reply, SPhase::AwaitCommitted) => self.source_broken(),
            (Timer::Reply, SPhase::AwaitResume) => self.source_retry(),
            (Timer::Push, SPhase::Serving) => {
                self.src.push_left = 0;
                self.src.push_since = None;
                self.act(Side::Source)?;
                self.send(Side::Source, self.src.conn, Msg::PushDone);
                Ok(())
            }
            (Timer::Grace, _) => self.source_grace(),
            (Timer::Retry, SPhase::Backoff) => self.source_try_resume(),
            _ => Ok(()),
        }
    }

    /// Pre-COMMIT failure: the VM runs here again.
    fn source_resume(&mut self, why: &str) -> Step {
        self.log(format!("Source: {why}: resuming the VM here"));
        self.act(Side::Source)?;
        self.send(Side::Source, self.src.conn, Msg::Abort);
        self.act(Side::Source)?;
        self.svm = Vm::Running(EPOCH0);
        self.src.journal = None;
        self.source_done(Outcome::Resumed);
        Ok(())
    }

    fn source_done(&mut self, o: Outcome) {
        self.log(format!("Source ends: {o:?}"));
        self.src.phase = SPhase::Done(o);
        self.src.generation += 1;
        if let Some(c) = self.src.conn.take() {
            self.break_conn(c, Side::Source, 0);
        }
    }

    fn take_back(&mut self, why: &str) -> Step {
        self.log(format!("Source: {why}: taking the VM back"));
        self.act(Side::Source)?;
        let epoch = EPOCH0 + 2;
        if let Some(h) = &mut self.src.journal {
            h.epoch = epoch;
        }
        self.act(Side::Source)?;
        self.svm = Vm::Running(epoch);
        self.src.journal = None;
        self.source_done(Outcome::TakenBack);
        Ok(())
    }

    fn source_unknown(&mut self, why: &str) -> Step {
        self.log(format!("Source: {why}: outcome unknown, VM stays paused"));
        self.source_done(Outcome::Unknown);
        Ok(())
    }

    fn hand_off(&mut self) -> Step {
        self.act(Side::Source)?;
        self.svm = Vm::Stopped;
        self.src.journal = None;
        self.source_done(Outcome::Completed);
        Ok(())
    }

    fn may_take_back(&self) -> bool {
        self.src.journal.is_some_and(|h| {
            h.take_back && h.postcopy && (!h.released || !self.rules.silent_after_released_keeps)
        })
    }

    fn source_grace(&mut self) -> Step {
        let live = matches!(
            self.src.phase,
            SPhase::Serving | SPhase::Releasing | SPhase::Backoff | SPhase::AwaitResume
        );
        if !live || self.src.journal.is_none() {
            return Ok(());
        }
        let silent = self.now.saturating_sub(self.src.last_heard);
        if silent < GRACE {
            let left = GRACE - silent;
            self.timer(Side::Source, Timer::Grace, left);
            return Ok(());
        }
        if self.may_take_back() {
            return self.take_back("the grace ran out");
        }
        self.source_unknown("the target stayed silent for the grace")
    }

    fn source_msg(&mut self, conn: ConnId, msg: Msg) -> Step {
        if self.src.conn != Some(conn) {
            return Ok(());
        }
        let session = !matches!(msg, Msg::Busy | Msg::NotKnown);
        if session {
            self.src.last_heard = self.now;
        }
        match (self.src.phase, msg) {
            (SPhase::AwaitPrepared, Msg::Prepared) => {
                let h = HandOff {
                    epoch: EPOCH0 + 1,
                    postcopy: self.p.postcopy,
                    take_back: self.p.postcopy && self.p.checkpoints,
                    released: false,
                };
                self.act(Side::Source)?;
                self.src.journal = Some(h);
                self.act(Side::Source)?;
                self.send(Side::Source, self.src.conn, Msg::Commit(h.epoch));
                self.src.phase = SPhase::AwaitCommitted;
                self.timer(Side::Source, Timer::Reply, IO_TIMEOUT);
                Ok(())
            }
            (SPhase::AwaitPrepared | SPhase::Precopy, Msg::Refused) => {
                self.source_resume("the target refused")
            }
            (SPhase::AwaitCommitted, Msg::Committed) => {
                if self.p.postcopy {
                    self.source_serving()
                } else {
                    self.hand_off()
                }
            }
            (SPhase::AwaitCommitted, Msg::Refused) => {
                // The target says the guest never ran there.
                self.source_resume("COMMIT refused")
            }
            (SPhase::Serving | SPhase::Releasing, Msg::Checkpoint { id, taken }) => {
                if self.src.applied.is_none_or(|(a, _)| id > a) {
                    self.act(Side::Source)?;
                    self.src.applied = Some((id, taken));
                }
                self.act(Side::Source)?;
                self.send(Side::Source, self.src.conn, Msg::CheckpointAck(id));
                Ok(())
            }
            (SPhase::Serving | SPhase::Releasing, Msg::PostcopyDone) => self.source_release(),
            (SPhase::Releasing, Msg::Close) => self.hand_off(),
            (SPhase::Serving | SPhase::Releasing, Msg::Fenced) => self.source_fenced(),
            (SPhase::AwaitResume, Msg::Resumed) => {
                if self.src.journal.is_some_and(|h| h.released) {
                    self.src.phase = SPhase::Releasing;
                    self.act(Side::Source)?;
                    self.send(Side::Source, self.src.conn, Msg::Released);
                    Ok(())
                } else if !self.p.postcopy {
                    // A pre-copy switch is never resumed as post-copy.
                    self.source_unknown("the target resumed a pre-copy switch")
                } else {
                    self.source_serving()
                }
            }
            (SPhase::AwaitResume, Msg::Concluded(c)) => match c {
                Conclusion::Completed(_) => self.hand_off(),
                Conclusion::Aborted => self.source_resume("the target never ran it"),
                Conclusion::Fenced => self.source_fenced(),
            },
            (SPhase::AwaitResume, Msg::Busy | Msg::NotKnown) => {
                self.source_drop_conn();
                self.source_retry()
            }
            _ => Ok(()),
        }
    }

    /// FENCED proves the target stopped its guest for good: the VM comes
    /// back even after RELEASED went out (silence alone would not do then).
    /// A pre-copy (fenced by a restarted target whose VMM is gone) comes
    /// back from the switch.
    fn source_fenced(&mut self) -> Step {
        if self.src.journal.is_some_and(|h| h.take_back || !h.postcopy) {
            self.take_back("the target fenced its guest")
        } else {
            self.source_unknown("the target fenced, but there is no checkpoint to take back")
        }
    }

    fn source_serving(&mut self) -> Step {
        self.src.phase = SPhase::Serving;
        if self.src.push_left == 0 {
            self.act(Side::Source)?;
            self.send(Side::Source, self.src.conn, Msg::PushDone);
        } else {
            self.src.push_since = Some(self.now);
            self.timer(Side::Source, Timer::Push, self.src.push_left);
        }
        self.timer(Side::Source, Timer::Grace, GRACE);
        Ok(())
    }

    fn source_release(&mut self) -> Step {
        self.act(Side::Source)?;
        if let Some(h) = &mut self.src.journal {
            h.released = true;
        }
        self.act(Side::Source)?;
        self.send(Side::Source, self.src.conn, Msg::Released);
        self.src.phase = SPhase::Releasing;
        Ok(())
    }

    fn source_drop_conn(&mut self) {
        if let Some(c) = self.src.conn.take() {
            // The source has let go of it already: only the peer's notice matters.
            self.break_conn(c, Side::Source, 0);
        }
    }

    fn source_broken(&mut self) -> Step {
        if let Some(since) = self.src.push_since.take() {
            self.src.push_left = self.src.push_left.saturating_sub(self.now - since);
        }
        self.src.generation += 1;
        match self.src.phase {
            SPhase::Precopy | SPhase::AwaitPrepared => {
                self.src.conn = None;
                self.source_resume("the connection broke before COMMIT")
            }
            SPhase::AwaitCommitted | SPhase::Serving | SPhase::Releasing | SPhase::AwaitResume => {
                self.source_drop_conn();
                if self.src.phase != SPhase::AwaitResume {
                    self.src.retry_since = self.now;
                    self.src.backoff = 100;
                }
                if self.src.journal.is_some_and(|h| h.postcopy) {
                    self.timer(Side::Source, Timer::Grace, 0);
                }
                self.source_retry()
            }
            _ => Ok(()),
        }
    }

    /// Waits out the backoff, or gives up.
    fn source_retry(&mut self) -> Step {
        self.src.generation += 1;
        self.source_drop_conn();
        let postcopy = self.src.journal.is_some_and(|h| h.postcopy);
        let waited = self.now - self.src.retry_since;
        if postcopy {
            self.timer(Side::Source, Timer::Grace, 0);
        } else if waited >= INQUIRY_MAX {
            return self.source_unknown("the target never said how the switch ended");
        }
        self.src.phase = SPhase::Backoff;
        let d = self.src.backoff;
        self.src.backoff = (d * 2).min(2_000);
        self.timer(Side::Source, Timer::Retry, d);
        Ok(())
    }

    fn source_try_resume(&mut self) -> Step {
        self.act(Side::Source)?;
        match self.connect() {
            Some(c) => {
                self.src.conn = Some(c);
                self.send(Side::Source, Some(c), Msg::Resume);
                self.src.phase = SPhase::AwaitResume;
                self.timer(Side::Source, Timer::Reply, IO_TIMEOUT);
                if self.src.journal.is_some_and(|h| h.postcopy) {
                    self.timer(Side::Source, Timer::Grace, 0);
                }
                Ok(())
            }
            None => self.source_retry(),
        }
    }

    fn source_restart(&mut self) -> Step {
        self.src.generation += 1;
        match self.src.journal {
            // Nothing recorded: COMMIT was never sent; a paused VM runs
            // here again, a running one never stopped.
            None => {
                if self.svm == Vm::Held {
                    self.svm = Vm::Running(EPOCH0);
                }
                if self.svm == Vm::Running(EPOCH0) {
                    self.src.phase = SPhase::Done(Outcome::Resumed);
                    self.log("Source: nothing recorded; the VM runs here".into());
                }
                Ok(())
            }
            Some(_) => {
                self.log("Source: a hand-off record: asking the target".into());
                self.src.retry_since = self.now;
                self.src.last_heard = self.now;
                self.src.backoff = 100;
                self.src.push_left = self.p.push_ms;
                self.source_try_resume()
            }
        }
    }

    // ---- the target ----

    fn target_msg(&mut self, conn: ConnId, msg: Msg) -> Step {
        if self.tgt.phase == TPhase::Down {
            return Ok(());
        }
        if self.tgt.conn != Some(conn) {
            return self.target_new_conn(conn, msg);
        }
        match (self.tgt.phase, msg) {
            (TPhase::Receiving, Msg::Prepare) => {
                self.act(Side::Target)?;
                self.tvm = Vm::Held;
                self.act(Side::Target)?;
                self.tgt.stage = Some(Stage::Prepared);
                self.act(Side::Target)?;
                self.send(Side::Target, self.tgt.conn, Msg::Prepared);
                self.tgt.phase = TPhase::Prepared;
                // The lease before the first checkpoint runs from PREPARED.
                self.tgt.lease_until = self.now + GRACE / 2;
                Ok(())
            }
            (TPhase::Prepared, Msg::Commit(epoch)) => {
                if self.tvm != Vm::Held {
                    // The VMM died since PREPARED: the guest never ran.
                    self.act(Side::Target)?;
                    self.send(Side::Target, self.tgt.conn, Msg::Refused);
                    return self.target_end(Conclusion::Aborted);
                }
                self.act(Side::Target)?;
                self.tgt.stage = Some(Stage::Committing);
                self.act(Side::Target)?;
                self.tvm = Vm::Running(epoch);
                self.committed_at = Some(self.now);
                self.act(Side::Target)?;
                self.send(Side::Target, self.tgt.conn, Msg::Committed);
                if self.tgt.postcopy {
                    self.tgt.phase = TPhase::Running;
                    if self.tgt.checkpoints {
                        self.timer(Side::Target, Timer::Checkpoint, CHECKPOINT);
                        let left = self.tgt.lease_until.saturating_sub(self.now);
                        self.timer(Side::Target, Timer::Lease, left);
                    }
                    Ok(())
                } else {
                    self.target_end(Conclusion::Completed(epoch))
                }
            }
            (TPhase::Receiving | TPhase::Prepared, Msg::Abort) => {
                self.target_end(Conclusion::Aborted)
            }
            (TPhase::Running, Msg::CheckpointAck(id)) => {
                if let Some((s, taken)) = self.tgt.sent_checkpoint {
                    if s == id {
                        self.tgt.lease_until = self.tgt.lease_until.max(taken + GRACE / 2);
                        self.tgt.sent_checkpoint = None;
                    }
                }
                Ok(())
            }
            (TPhase::Running, Msg::PushDone) => {
                self.tgt.push_done = true;
                self.act(Side::Target)?;
                self.send(Side::Target, self.tgt.conn, Msg::PostcopyDone);
                Ok(())
            }
            (TPhase::Running, Msg::Released) => {
                self.tgt.releasing = true;
                self.act(Side::Target)?;
                self.tgt.released = true;
                let Vm::Running(e) = self.tvm else {
                    return Ok(());
                };
                self.target_end(Conclusion::Completed(e))?;
                self.tgt.releasing = false;
                self.act(Side::Target)?;
                self.send(Side::Target, self.tgt.conn, Msg::Close);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A message on a connection that is not the session's: a new session.
    fn target_new_conn(&mut self, conn: ConnId, msg: Msg) -> Step {
        match msg {
            Msg::Start {
                postcopy,
                checkpoints,
            } => {
                if self.tgt.phase != TPhase::Idle {
                    return Ok(());
                }
                self.tgt.phase = TPhase::Receiving;
                self.tgt.conn = Some(conn);
                self.tgt.postcopy = postcopy;
                self.tgt.checkpoints = checkpoints;
                Ok(())
            }
            Msg::Resume => {
                self.act(Side::Target)?;
                let answer = if let Some(c) = self.tgt.conclusion {
                    Msg::Concluded(c)
                } else if self.tgt.phase == TPhase::Running {
                    if self.tgt.waiting.is_some() {
                        self.tgt.waiting = None;
                        self.tgt.conn = Some(conn);
                        self.send(Side::Target, Some(conn), Msg::Resumed);
                        if self.tgt.push_done {
                            self.send(Side::Target, Some(conn), Msg::PostcopyDone);
                        }
                        return Ok(());
                    }
                    Msg::Busy
                } else if matches!(self.tgt.phase, TPhase::Receiving | TPhase::Prepared) {
                    Msg::Busy
                } else {
                    Msg::NotKnown
                };
                self.send(Side::Target, Some(conn), answer);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn target_end(&mut self, c: Conclusion) -> Step {
        if c == Conclusion::Aborted {
            self.act(Side::Target)?;
            self.tvm = Vm::None;
        }
        self.act(Side::Target)?;
        self.tgt.conclusion = Some(c);
        self.tgt.phase = TPhase::Ended;
        self.tgt.generation += 1;
        self.log(format!("Target ends: {c:?}"));
        Ok(())
    }

    fn target_broken(&mut self) -> Step {
        self.tgt.conn = None;
        match self.tgt.phase {
            TPhase::Receiving | TPhase::Prepared => self.target_end(Conclusion::Aborted),
            TPhase::Running => {
                self.tgt.sent_checkpoint = None;
                self.tgt.waiting = Some(self.now);
                self.timer(Side::Target, Timer::Wait, TARGET_WAIT);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn target_timer(&mut self, kind: Timer) -> Step {
        if self.tgt.phase != TPhase::Running {
            return Ok(());
        }
        match kind {
            Timer::Checkpoint if !self.tgt.released => {
                if self.tgt.sent_checkpoint.is_none() && self.tgt.conn.is_some() {
                    self.act(Side::Target)?;
                    let id = self.tgt.next_checkpoint;
                    self.tgt.next_checkpoint += 1;
                    self.tgt.sent_checkpoint = Some((id, self.now));
                    self.send(
                        Side::Target,
                        self.tgt.conn,
                        Msg::Checkpoint {
                            id,
                            taken: self.now,
                        },
                    );
                }
                self.timer(Side::Target, Timer::Checkpoint, CHECKPOINT);
                Ok(())
            }
            Timer::Lease if !self.tgt.released => {
                if self.now >= self.tgt.lease_until {
                    self.log("Target: the lease ran out".into());
                    self.act(Side::Target)?;
                    self.stop_target_vm();
                    self.act(Side::Target)?;
                    self.send(Side::Target, self.tgt.conn, Msg::Fenced);
                    self.target_end(Conclusion::Fenced)
                } else {
                    let left = self.tgt.lease_until - self.now;
                    self.timer(Side::Target, Timer::Lease, left);
                    Ok(())
                }
            }
            Timer::Wait if self.tgt.waiting.is_some() => {
                // No source came back: keep the guest (it has no lease to
                // lose) unless it runs under one, which the lease ends.
                self.log("Target: no RESUME within its wait".into());
                self.tgt.waiting = None;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A restarted target whose last record of the migration is
    /// `committing` asks the guest's VMM (ferryd's `indoubt`: by the pid
    /// recorded with it): one that runs the guest with all its memory
    /// registers again, and the migration completed; one that is gone (it
    /// never ran the guest, or ran it under a lease and exited with the old
    /// ferryd) fenced it. A post-copy guest still waiting for pages (no
    /// lease: no checkpoints) stays in doubt, and the source keeps asking.
    fn target_settle(&mut self) {
        let complete = !self.tgt.postcopy || self.tgt.push_done;
        let settled = match self.tvm {
            Vm::Running(e) if complete => Some(Conclusion::Completed(e)),
            Vm::Running(_) => None,
            Vm::None | Vm::Held | Vm::Stopped => Some(Conclusion::Fenced),
        };
        self.log(format!(
            "Target settles the migration in doubt: {settled:?}"
        ));
        if settled.is_some() {
            self.tgt.conclusion = settled;
        }
    }

    fn target_vmm_dies(&mut self) -> Step {
        match (self.tgt.phase, self.tvm) {
            (TPhase::Prepared, Vm::Held) => {
                self.log("Target VMM dies (restored, not running)".into());
                self.tvm = Vm::None;
                Ok(())
            }
            (TPhase::Running, Vm::Running(_)) if !self.tgt.released && self.tgt.checkpoints => {
                self.log("Target VMM dies under post-copy".into());
                self.stop_target_vm();
                self.act(Side::Target)?;
                self.send(Side::Target, self.tgt.conn, Msg::Fenced);
                self.target_end(Conclusion::Fenced)
            }
            _ => Ok(()),
        }
    }
}

fn seeds(default: u64) -> std::ops::Range<u64> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    match var("FERRY_MODEL_SEED") {
        Some(s) => s..s + 1,
        None => 0..var("FERRY_MODEL_SEEDS").unwrap_or(default),
    }
}

/// Runs one seed; a broken invariant panics with the seed and the trace.
fn run_seed(seed: u64) -> (String, Option<Ms>, Vec<String>) {
    match try_seed(seed, Rules::default()) {
        Ok(r) => r,
        Err(msg) => panic!("seed {seed} (replay: FERRY_MODEL_SEED={seed}): {msg}"),
    }
}

/// Runs one seed under `rules`: the outcome, the guest time a take-back
/// lost and the trace, or the broken invariant with the trace.
fn try_seed(seed: u64, rules: Rules) -> Result<(String, Option<Ms>, Vec<String>), String> {
    let mut w = World::new(seed, rules);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        w.run();
    }));
    if let Err(e) = r {
        return Err(e
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| "panic".into()));
    }
    let SPhase::Done(o) = w.src.phase else {
        unreachable!("settle checked it")
    };
    let o = match w.unknown_why {
        Some(why) => format!("{o:?} ({why})"),
        None => format!("{o:?}"),
    };
    Ok((o, w.lost_ms, w.trace))
}

#[test]
fn the_protocol_never_splits_or_loses_the_vm() {
    let mut outcomes: HashMap<String, u64> = HashMap::new();
    let (mut lost_max, mut lost_seed) = (0, 0);
    let range = seeds(20_000);
    for seed in range.clone() {
        let (o, lost, _) = run_seed(seed);
        *outcomes.entry(o).or_default() += 1;
        if lost.unwrap_or(0) > lost_max {
            lost_max = lost.unwrap_or(0);
            lost_seed = seed;
        }
    }
    let mut v: Vec<_> = outcomes.into_iter().collect();
    v.sort();
    eprintln!(
        "{} seeds: {v:?}; guest time lost by a take-back at most {lost_max} ms",
        range.end - range.start
    );
    // A take-back loses what the target's guest did since the checkpoint
    // the source holds: at most the lease (half the grace) past the last
    // acknowledged checkpoint, which is at most a checkpoint interval plus
    // a round trip old.
    assert!(
        lost_max <= GRACE / 2 + CHECKPOINT + 2 * IO_TIMEOUT,
        "seed {lost_seed} lost {lost_max} ms of guest time:\n{}",
        run_seed(lost_seed).2.join("\n")
    );
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 77, 1234] {
        assert_eq!(run_seed(seed).2, run_seed(seed).2, "seed {seed}");
    }
}

/// The model can fail: with either rule broken, some seed breaks an
/// invariant (a VM left running nowhere, or running on both sides). The
/// caught panics print into the test's captured output.
#[test]
fn the_model_catches_a_broken_rule() {
    let first_failure = |rules: Rules| (0..20_000).find_map(|s| try_seed(s, rules).err());
    let no_prepared = first_failure(Rules {
        prepared_aborts: false,
        ..Rules::default()
    });
    let eager_take_back = first_failure(Rules {
        silent_after_released_keeps: false,
        ..Rules::default()
    });
    let no_settling = first_failure(Rules {
        committing_settles: false,
        ..Rules::default()
    });
    let no_prepared = no_prepared.expect("no seed missed the prepared record");
    assert!(no_prepared.starts_with("unknown without"), "{no_prepared}");
    let eager = eager_take_back.expect("no seed caught a take-back after RELEASED");
    assert!(eager.starts_with("the VM runs on both sides"), "{eager}");
    // Without settling, a migration in doubt stays `unknown`: allowed only
    // as a documented blocking window, which the model then counts, so
    // the check is that those unknowns appear at all.
    assert!(no_settling.is_none(), "{no_settling:?}");
    let unknowns = |rules: Rules| {
        (0..20_000)
            .filter(|&s| {
                try_seed(s, rules).is_ok_and(|(o, _, _)| o.contains("target ferryd died starting"))
            })
            .count()
    };
    assert_eq!(unknowns(Rules::default()), 0);
    assert!(
        unknowns(Rules {
            committing_settles: false,
            ..Rules::default()
        }) > 0
    );
}
