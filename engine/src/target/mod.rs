//! The target side of a migration: sessions, the receive pipeline, commit.
//!
//! ```text
//!  [Acceptor] connections ─handshake─▶ pending session ─all N+1 joined─▶ IncomingSession
//!  migrate_in:  Spec ─▶ create memory + VMM ─▶ SpecAck ─▶ Receiving (pages, acks)
//!               State, Prepare ─▶ check totals, nothing suspect, state CRC ─▶ VMM restore
//!               ─▶ Prepared ─▶ Commit ─▶ VMM run ─▶ Committed (the VM runs here)
//!  Abort, EOF, any error before Commit: the VMM is told to quit, memory dropped.
//! ```

mod pipeline;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError};
use ferry_transport::Conn;

use self::pipeline::{DiskSink, Receivers, Shared};
use crate::bitmap::AtomicBitmap;
use crate::link::VmSpec;
use crate::metrics::Status;
use crate::source::pipeline::Failure;
use crate::wire::handshake::{self, Hello};
use crate::wire::FrameHeader;
use crate::wire::{self, ControlMsg, FrameKind, StreamTotals, WireError};
use crate::{GuestMem, Key, Metrics, MigrationError, TargetVm, VmState};

/// A session whose connections did not all arrive within this time is
/// dropped: the source connects all of them back to back.
const PENDING_TTL: Duration = Duration::from_secs(30);

enum Slot {
    Empty,
    /// Authenticated, being welcomed.
    Reserved,
    Ready(Box<dyn Conn>),
}

struct Pending {
    vm: String,
    streams: u16,
    slots: Vec<Slot>,
    created: Instant,
}

#[derive(Default)]
struct AcceptorState {
    pending: HashMap<[u8; 16], Pending>,
    /// Sessions that assembled: running or done. Never joinable again.
    claimed: HashSet<[u8; 16]>,
}

/// Authenticates incoming connections and groups them into sessions.
pub struct Acceptor {
    key: Key,
    state: Mutex<AcceptorState>,
}

/// All connections of one incoming migration, authenticated.
pub struct IncomingSession {
    id: String,
    vm: String,
    peer: String,
    control: Box<dyn Conn>,
    data: Vec<Box<dyn Conn>>,
    /// The first control frame, when [`Resumes::route`] read it already.
    first: Option<(FrameHeader, Vec<u8>)>,
}

impl IncomingSession {
    /// Session id chosen by the source (hex).
    pub fn id(&self) -> &str {
        &self.id
    }
    /// Name of the VM being migrated in.
    pub fn vm_name(&self) -> &str {
        &self.vm
    }
    /// The source's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }
    /// Data streams.
    pub fn streams(&self) -> usize {
        self.data.len()
    }
}

impl Acceptor {
    /// An acceptor for peers holding `key`.
    pub fn new(key: Key) -> Self {
        Acceptor {
            key,
            state: Mutex::new(AcceptorState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AcceptorState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Authenticates `conn` (blocking, bounded by its timeout) and files it
    /// under its session. Returns the session once its last connection
    /// arrived. Errors (bad key, garbage, a claim on a running session) leave
    /// every other session untouched.
    pub fn admit(
        &self,
        mut conn: Box<dyn Conn>,
    ) -> Result<Option<IncomingSession>, MigrationError> {
        let peer = conn.peer();
        let hello =
            handshake::accept(&mut *conn, &self.key, |h| self.reserve(h)).map_err(|e| match e {
                WireError::Refusing(r) => MigrationError::Auth(format!("refused {peer}: {r}")),
                WireError::Transport(source) => MigrationError::Transport {
                    phase: "handshake",
                    source,
                },
                source => MigrationError::Protocol {
                    phase: "handshake",
                    source,
                },
            })?;
        let mut st = self.lock();
        let Some(p) = st.pending.get_mut(&hello.session) else {
            return Err(MigrationError::Auth(format!(
                "session {} expired while {peer} joined",
                hello.session_hex()
            )));
        };
        p.slots[hello.stream as usize] = Slot::Ready(conn);
        if !p.slots.iter().all(|s| matches!(s, Slot::Ready(_))) {
            return Ok(None);
        }
        let p = st.pending.remove(&hello.session).expect("present above");
        st.claimed.insert(hello.session);
        let mut conns = p.slots.into_iter().map(|s| match s {
            Slot::Ready(c) => c,
            _ => unreachable!("all slots ready"),
        });
        let control = conns.next().expect("slot 0 is control");
        Ok(Some(IncomingSession {
            id: hello.session_hex(),
            vm: p.vm,
            peer,
            control,
            data: conns.collect(),
            first: None,
        }))
    }

    /// Checks a hello against the sessions we know and reserves its slot.
    fn reserve(&self, h: &Hello) -> Result<(), String> {
        let mut st = self.lock();
        st.pending.retain(|_, p| p.created.elapsed() < PENDING_TTL);
        if st.claimed.contains(&h.session) {
            return Err(format!(
                "session {} is already running; a second connection cannot join it",
                h.session_hex()
            ));
        }
        let p = st.pending.entry(h.session).or_insert_with(|| Pending {
            vm: h.vm.clone(),
            streams: h.streams,
            slots: (0..=h.streams).map(|_| Slot::Empty).collect(),
            created: Instant::now(),
        });
        if p.streams != h.streams || p.vm != h.vm {
            return Err(format!(
                "connection disagrees with session {} (VM or stream count)",
                h.session_hex()
            ));
        }
        let slot = &mut p.slots[h.stream as usize];
        if !matches!(slot, Slot::Empty) {
            return Err(format!(
                "stream {} of session {} is already connected",
                h.stream,
                h.session_hex()
            ));
        }
        *slot = Slot::Reserved;
        Ok(())
    }
}

/// Post-copy migrations whose connection to the source broke, waiting for
/// the source to reconnect. A daemon keeps one and passes every assembled
/// session through [`Resumes::route`] before [`migrate_in`].
///
/// It also remembers how recent migrations ended here, so that a source
/// whose ferryd restarted mid-switch can ask (RESUME answered with
/// CONCLUDED) whether the VM runs here.
#[derive(Default, Debug)]
pub struct Resumes {
    waiting: Mutex<HashMap<String, crossbeam_channel::Sender<IncomingSession>>>,
    ended: Mutex<Ended>,
    /// Where conclusions outlive the process, if anywhere.
    store: Option<Box<dyn ConclusionStore>>,
}

/// Where a target keeps how its migrations ended, so that a restarted
/// daemon still answers a source that asks (RESUME, answered CONCLUDED):
/// without it, a source whose own daemon died after COMMIT finds the
/// migration unknown and cannot tell whether the VM runs here.
///
/// Besides how migrations ended it keeps how far running ones got
/// ([`Stage`]), each recorded before the target acts on it: a daemon that
/// died after PREPARED but before COMMIT took effect left a guest that never
/// ran here (its VMM exits with it), so the restarted daemon answers
/// `aborted` and the source resumes the VM at once, instead of keeping it
/// paused with its outcome unknown. One that died while starting the guest
/// (`committing`) left the answer with the guest's VMM: the restarted
/// daemon lists such migrations ([`Resumes::in_doubt`]), answers BUSY for
/// them, and settles each ([`Resumes::settle`]) once it knows: `completed`
/// when the VMM comes back with the guest running, `fenced` when the VMM is
/// gone (its guest stopped for good; the source takes the VM back).
pub trait ConclusionStore: Send + Sync + std::fmt::Debug {
    /// The records so far, oldest first (the last of an id wins).
    fn load(&self) -> Vec<(String, Record)>;
    /// Records `record` for migration `id`, before the source can learn it.
    /// `kept` is the number of records a reader needs (the store may drop
    /// older ones).
    fn record(&self, id: &str, record: Record, kept: usize) -> std::io::Result<()>;
}

impl<T: ConclusionStore + ?Sized> ConclusionStore for Arc<T> {
    fn load(&self) -> Vec<(String, Record)> {
        (**self).load()
    }
    fn record(&self, id: &str, record: Record, kept: usize) -> std::io::Result<()> {
        (**self).record(id, record, kept)
    }
}

/// How far an incoming migration got, recorded before the target acts on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// PREPARED is about to go out: the guest has not run here.
    Prepared,
    /// COMMIT arrived: the guest is about to run here with this epoch.
    Committing {
        /// The epoch COMMIT gave the VM.
        epoch: u64,
    },
}

/// One record of a [`ConclusionStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// The migration reached this stage.
    Stage(Stage),
    /// The migration ended so.
    Ended(wire::Conclusion),
}

/// Migrations running here, and how the last [`CONCLUSIONS_KEPT`] ended.
#[derive(Default, Debug)]
struct Ended {
    active: std::collections::HashSet<String>,
    /// Migrations a previous daemon died in while starting the guest, with
    /// their epoch: unsettled.
    doubt: HashMap<String, u64>,
    concluded: HashMap<String, wire::Conclusion>,
    order: std::collections::VecDeque<String>,
}

/// How many ended migrations a target remembers for sources that ask.
pub const CONCLUSIONS_KEPT: usize = 4096;

/// Records a store keeps: a migration writes up to three (two stages and
/// its end).
const RECORDS_KEPT: usize = 3 * CONCLUSIONS_KEPT;

impl Ended {
    /// Keeps `outcome` for `id`, forgetting the oldest beyond
    /// [`CONCLUSIONS_KEPT`].
    fn keep(&mut self, id: String, outcome: wire::Conclusion) {
        if self.concluded.insert(id.clone(), outcome).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > CONCLUSIONS_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.concluded.remove(&old);
            }
        }
    }
}

impl Resumes {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// A registry that records conclusions in `store` and starts with the
    /// last [`CONCLUSIONS_KEPT`] it holds.
    pub fn with_store(store: Box<dyn ConclusionStore>) -> Arc<Self> {
        let mut ended = Ended::default();
        let mut staged: Vec<(String, Stage)> = Vec::new();
        for (id, record) in store.load() {
            match record {
                Record::Ended(outcome) => {
                    staged.retain(|(s, _)| *s != id);
                    ended.doubt.remove(&id);
                    ended.keep(id, outcome);
                }
                Record::Stage(stage) => {
                    staged.retain(|(s, _)| *s != id);
                    staged.push((id, stage));
                }
            }
        }
        // Migrations the previous daemon died in.
        for (id, stage) in staged {
            match stage {
                Stage::Prepared => {
                    tracing::info!(
                        "migration {id}: the previous ferryd died after PREPARED and before \
                         COMMIT took effect; the guest never ran here (aborted)"
                    );
                    ended.keep(id, wire::Conclusion::Aborted);
                }
                Stage::Committing { epoch } => {
                    tracing::warn!(
                        "migration {id}: the previous ferryd died while starting the guest here; \
                         whether it runs is for its VMM to say (the source keeps it paused)"
                    );
                    ended.doubt.insert(id, epoch);
                }
            }
        }
        Arc::new(Self {
            waiting: Mutex::default(),
            ended: Mutex::new(ended),
            store: Some(store),
        })
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, crossbeam_channel::Sender<IncomingSession>>>
    {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `id` as resumable: sessions that resume it arrive on the
    /// channel until [`Self::forget`].
    fn wait(&self, id: &str) -> Receiver<IncomingSession> {
        let (tx, rx) = bounded(1);
        self.lock().insert(id.to_string(), tx);
        rx
    }

    fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    fn ended(&self) -> std::sync::MutexGuard<'_, Ended> {
        self.ended.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Migration `id` starts here.
    fn begin(&self, id: &str) {
        self.ended().active.insert(id.to_string());
    }

    /// Records that migration `id` reached `stage`, before acting on it.
    fn stage(&self, id: &str, stage: Stage) -> std::io::Result<()> {
        let _e = self.ended();
        match &self.store {
            Some(store) => store.record(id, Record::Stage(stage), RECORDS_KEPT),
            None => Ok(()),
        }
    }

    /// Migration `id` ended here: `outcome`, or `None` when it did not end
    /// cleanly (a broken post-copy whose guest still waits for pages).
    fn conclude(&self, id: &str, outcome: Option<wire::Conclusion>) {
        let mut e = self.ended();
        if let (Some(outcome), Some(store)) = (outcome, &self.store) {
            // Under the lock, so that the store's order is the table's.
            if let Err(err) = store.record(id, Record::Ended(outcome), RECORDS_KEPT) {
                tracing::warn!(
                    "migration {id}: could not record that it ended ({outcome:?}): {err}; \
                     a restarted ferryd will not know"
                );
            }
        }
        e.active.remove(id);
        if let Some(outcome) = outcome {
            e.keep(id.to_string(), outcome);
        }
    }

    /// How migration `id` ended here, if it did.
    pub fn conclusion(&self, id: &str) -> Option<wire::Conclusion> {
        self.ended().concluded.get(id).copied()
    }

    /// Migrations a previous daemon died in while starting the guest here
    /// (their last record is `committing`), with the epoch COMMIT gave: the
    /// guest may run here or not, and only its VMM can say. A source that
    /// asks is told BUSY until [`Self::settle`].
    pub fn in_doubt(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .ended()
            .doubt
            .iter()
            .map(|(id, e)| (id.clone(), *e))
            .collect();
        v.sort();
        v
    }

    /// Settles migration `id`, in doubt: records `outcome` (`completed`
    /// when its VMM runs the guest here, `fenced` when the VMM is gone, so
    /// the guest is stopped for good) and answers it from now on. `Ok(false)`
    /// when `id` is not in doubt (settled already); an error when the
    /// record could not be written (it stays in doubt: a source told
    /// `fenced` by a daemon that restarts again must not later hear
    /// `completed`).
    pub fn settle(&self, id: &str, outcome: wire::Conclusion) -> std::io::Result<bool> {
        let mut e = self.ended();
        if !e.doubt.contains_key(id) {
            return Ok(false);
        }
        if let Some(store) = &self.store {
            store.record(id, Record::Ended(outcome), RECORDS_KEPT)?;
        }
        e.doubt.remove(id);
        e.keep(id.to_string(), outcome);
        Ok(true)
    }

    /// Reads the session's first control frame. A RESUME of a waiting
    /// post-copy is handed to it (`None`); a RESUME of anything else is
    /// refused with ABORT (`None`); any other session comes back, first
    /// frame kept, for [`migrate_in`].
    pub fn route(&self, mut session: IncomingSession) -> Option<IncomingSession> {
        let first = match wire::recv_frame(&mut *session.control) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("session {}: no first control frame: {e}", session.id);
                return None;
            }
        };
        let resume = match (&first.0.kind, first.0.seq) {
            (FrameKind::Control, 1) => match wire::decode_control(&first.1) {
                Ok(ControlMsg::Resume { session: id }) => Some(id),
                _ => None,
            },
            _ => None,
        };
        let Some(id) = resume else {
            session.first = Some(first);
            return Some(session);
        };
        let tx = self.lock().get(&id).cloned();
        match tx {
            Some(tx) => {
                tracing::info!("session {} resumes post-copy migration {id}", session.id);
                if let Err(e) = tx.try_send(session) {
                    tracing::warn!("post-copy migration {id} stopped waiting: {e}");
                }
            }
            None => {
                let answer = {
                    let e = self.ended();
                    match e.concluded.get(&id) {
                        Some(&outcome) => ControlMsg::Concluded { outcome },
                        None if e.doubt.contains_key(&id) => ControlMsg::Busy {
                            reason: format!(
                                "the ferryd here died while it started the guest of migration \
                                 {id}; waiting for its VMM to say whether the guest runs; try \
                                 again"
                            ),
                        },
                        None if e.active.contains(&id) => ControlMsg::Busy {
                            reason: format!(
                                "migration {id} is still running here and not waiting to \
                                 resume; try again"
                            ),
                        },
                        None => ControlMsg::Abort {
                            reason: format!("no migration {id} is known here"),
                        },
                    }
                };
                tracing::warn!(
                    "session {} resumes {id}, which is not waiting here: {answer:?}",
                    session.id
                );
                let _ = wire::send_frame(
                    &mut *session.control,
                    FrameKind::Control,
                    0,
                    1,
                    &wire::encode_control(&answer),
                );
            }
        }
        None
    }
}

/// Settings of the receiving side.
#[derive(Clone, Debug)]
pub struct TargetConfig {
    /// A data stream silent for this long (while a round is open) is dead.
    pub io_timeout: Duration,
    /// Fault in all guest memory before receiving (when it does not come
    /// from the reserve).
    pub prefault: bool,
    /// Pre-faulted memory to use when it fits.
    pub reserve: Option<Arc<crate::memory::Reserve>>,
    /// Set to abort the migration before COMMIT (the source then resumes
    /// the VM); seen within 200 ms.
    pub cancel: crate::Cancel,
    /// Where received disk images go (`<vm>.img`, written as a hidden
    /// `.partial` file until COMMIT). `None` refuses VMs with a disk.
    pub disk_dir: Option<std::path::PathBuf>,
    /// Which CPUs the receivers and decoders run on ([`crate::numa`]).
    pub placement: crate::numa::PlacementPolicy,
    /// Post-copy migrations wait here for the source to reconnect after a
    /// network fault; `None`: a broken connection ends post-copy.
    pub resumes: Option<Arc<Resumes>>,
    /// How long a post-copy with a broken connection waits for the source
    /// to reconnect.
    pub postcopy_grace: Duration,
}

impl Default for TargetConfig {
    fn default() -> Self {
        TargetConfig {
            io_timeout: Duration::from_secs(30),
            prefault: true,
            reserve: None,
            cancel: crate::Cancel::new(),
            disk_dir: None,
            placement: crate::numa::PlacementPolicy::Auto,
            resumes: None,
            postcopy_grace: Duration::from_secs(60),
        }
    }
}

/// A migration received and committed: the VM runs here now.
pub struct TargetOutcome<V> {
    /// The epoch it runs with.
    pub epoch: u64,
    /// Its spec.
    pub spec: VmSpec,
    /// Its memory.
    pub mem: Arc<GuestMem>,
    /// The VMM running it.
    pub vm: V,
    /// The received disk image, renamed to its final path at COMMIT.
    pub disk_path: Option<std::path::PathBuf>,
}

/// Receives one migration. `create_vm` is called once the spec is known and
/// memory exists (and, for a VM with a disk, the new image: the VMM may use
/// it only from `restore` on); it starts the target VMM (not yet running the
/// guest).
pub fn migrate_in<V: TargetVm>(
    session: IncomingSession,
    cfg: &TargetConfig,
    metrics: Arc<Metrics>,
    create_vm: impl FnOnce(&VmSpec, &GuestMem, Option<&std::fs::File>) -> Result<V, MigrationError>,
) -> Result<TargetOutcome<V>, MigrationError> {
    let id = session.id.clone();
    if let Some(r) = &cfg.resumes {
        r.begin(&id);
    }
    let mut ran = false;
    let result = receive(session, cfg, metrics, create_vm, &mut ran);
    if let Some(r) = &cfg.resumes {
        let outcome = match (&result, ran) {
            (Ok(o), _) => Some(wire::Conclusion::Completed { epoch: o.epoch }),
            (Err(MigrationError::Fenced(_)), _) => Some(wire::Conclusion::Fenced),
            (Err(_), false) => Some(wire::Conclusion::Aborted),
            // The VM ran here and its post-copy broke: nobody can say yet.
            (Err(_), true) => None,
        };
        r.conclude(&id, outcome);
    }
    result
}

fn receive<V: TargetVm>(
    session: IncomingSession,
    cfg: &TargetConfig,
    metrics: Arc<Metrics>,
    create_vm: impl FnOnce(&VmSpec, &GuestMem, Option<&std::fs::File>) -> Result<V, MigrationError>,
    ran: &mut bool,
) -> Result<TargetOutcome<V>, MigrationError> {
    let IncomingSession {
        id: session_id,
        vm: vm_name,
        mut control,
        data,
        first,
        ..
    } = session;
    let streams = data.len();
    metrics.update(|s| {
        s.status = Status::Setup;
        s.streams = streams as u32;
        s.vm = vm_name.clone();
    });
    let fail = |metrics: &Metrics, e: MigrationError| {
        metrics.finish(
            if matches!(e, MigrationError::Cancelled) {
                Status::Cancelled
            } else {
                Status::Failed
            },
            Some(e.to_string()),
        );
        e
    };
    let tx_transport = |source| MigrationError::Transport {
        phase: "setup",
        source,
    };
    control
        .set_timeout(Some(cfg.io_timeout))
        .map_err(tx_transport)?;
    for d in &data {
        let mut d = d.try_clone().map_err(tx_transport)?;
        d.set_timeout(Some(cfg.io_timeout)).map_err(tx_transport)?;
    }
    // SPEC
    let (h, p) = match first {
        Some(f) => f,
        None => wire::recv_frame(&mut *control).map_err(|source| MigrationError::Protocol {
            phase: "receiving the spec",
            source,
        })?,
    };
    let (spec, epoch, mode) = match (h.kind, h.seq) {
        (FrameKind::Control, 1) => match wire::decode_control(&p) {
            Ok(ControlMsg::Spec { spec, epoch, mode }) => (spec, epoch, mode),
            Ok(other) => {
                return Err(fail(
                    &metrics,
                    protocol("receiving the spec", format!("got {other:?}")),
                ))
            }
            Err(source) => {
                return Err(fail(
                    &metrics,
                    MigrationError::Protocol {
                        phase: "receiving the spec",
                        source,
                    },
                ))
            }
        },
        _ => {
            return Err(fail(
                &metrics,
                protocol(
                    "receiving the spec",
                    format!("got a {:?} frame, seq {}", h.kind, h.seq),
                ),
            ))
        }
    };
    let mut ctl_tx = control.try_clone().map_err(tx_transport)?;
    let abort_early = |ctl: &mut Box<dyn Conn>, e: MigrationError| {
        let _ = wire::send_frame(
            &mut **ctl,
            FrameKind::Control,
            0,
            1,
            &wire::encode_control(&ControlMsg::Abort {
                reason: e.to_string(),
            }),
        );
        e
    };
    if spec.name != vm_name {
        let e = MigrationError::Invalid(format!(
            "spec names VM {:?}, the handshake {:?}",
            spec.name, vm_name
        ));
        return Err(fail(&metrics, abort_early(&mut ctl_tx, e)));
    }
    // With post-copy possible, the last connection is the priority stream.
    let mut data = data;
    let priority = if mode.may_postcopy() {
        if data.len() < 2 || spec.disk.is_some() {
            let e = MigrationError::Invalid(format!(
                "mode {mode} needs a data stream besides the priority stream, and no disk"
            ));
            return Err(fail(&metrics, abort_early(&mut ctl_tx, e)));
        }
        data.pop()
    } else {
        None
    };
    let streams = data.len();
    metrics.update(|s| {
        s.streams = streams as u32;
        s.mode = mode.name().into();
    });
    let reserved = cfg.reserve.as_ref().and_then(|r| r.take(&spec));
    // Whatever happens from here, refill the reserve once this migration is over.
    let _refill = RefillOnDrop(cfg.reserve.clone());
    let from_reserve = reserved.is_some();
    let mem = match reserved.map_or_else(|| GuestMem::create(&spec), Ok) {
        Ok(m) => Arc::new(m),
        Err(e) => return Err(fail(&metrics, abort_early(&mut ctl_tx, e.into()))),
    };
    metrics.update(|s| s.mem_bytes = mem.bytes());
    tracing::info!(
        from_reserve,
        "guest memory ready ({} MiB)",
        mem.bytes() >> 20
    );
    // Post-copy maps pages for the guest with UFFDIO_CONTINUE, which needs
    // every page in the memfd: always pre-fault then.
    if (cfg.prefault || mode.may_postcopy()) && !from_reserve {
        mem.prefault();
    }
    // Where each stage runs (crate::numa): receivers near the NIC, decoders
    // near guest memory, the disk writer near the image's device.
    let peer = data.first().map_or_else(String::new, |c| c.peer());
    let plan_for = |disk: Option<&std::fs::File>| {
        crate::numa::Placement::for_target(&cfg.placement, &mem, &peer, disk)
    };
    // The disk: a new sparse image, removed again unless COMMIT arrives.
    let mut image = match &spec.disk {
        None => None,
        Some(d) => {
            match DiskImage::create(cfg, &spec.name, &session_id, d, streams as u16, plan_for) {
                Ok(i) => Some(i),
                Err(e) => return Err(fail(&metrics, abort_early(&mut ctl_tx, e))),
            }
        }
    };
    let plan = match &image {
        Some(i) => i.plan.clone(),
        None => plan_for(None),
    };
    if let Some(i) = &image {
        let direct = i.writer.as_ref().is_some_and(|w| w.direct());
        metrics.update(|s| {
            s.disk = Some(crate::metrics::DiskStats {
                bytes: i.blocks * crate::link::DISK_BLOCK_BYTES,
                direct_io: direct,
                ..Default::default()
            })
        });
    }
    let mut vm = match create_vm(&spec, &mem, image.as_ref().map(|i| &*i.file)) {
        Ok(vm) => vm,
        Err(e) => return Err(fail(&metrics, abort_early(&mut ctl_tx, e))),
    };
    let pages = mem.pages();
    let shared = Arc::new(Shared {
        mem: mem.clone(),
        written: AtomicBitmap::new(pages),
        suspect: AtomicBitmap::new(pages),
        applied: (0..streams).map(|_| AtomicU64::new(0)).collect(),
        pages: (0..streams).map(|_| AtomicU64::new(0)).collect(),
        failure: Failure::default(),
        control: Mutex::new((ctl_tx, 0)),
        metrics: metrics.clone(),
        disk: image.as_mut().map(|i| i.take_sink()),
        postcopy: std::sync::OnceLock::new(),
    });
    let result = (|| {
        let receivers =
            Receivers::start(shared.clone(), data, plan.clone()).map_err(tx_transport)?;
        let mut session = Session {
            shared: shared.clone(),
            session_id: session_id.clone(),
            receivers: Some(receivers),
            events: None,
            cfg,
            priority,
            stale: None,
            pc_threads: None,
            resume_rx: None,
            plan: plan.clone(),
            ckpt: None,
            watchdog: None,
            done_verify: None,
            ran: false,
        };
        let r = session.run(&mut vm, control, epoch);
        *ran = session.ran;
        if let Some(r) = &cfg.resumes {
            r.forget(&session_id);
        }
        if r.is_ok() {
            // Done: the source waits for this side to close first (its
            // last word, RELEASED, must not be lost to a reset).
            if let Ok(c) = session.shared.control.lock() {
                c.0.shutdown();
            }
        }
        if let Some(t) = session.pc_threads.take() {
            t.stop();
        }
        if let Some(rx) = session.receivers.take() {
            rx.stop();
        }
        r
    })();
    // The receivers are gone; the disk writer (in `shared`) stops when the
    // last reference drops, at the end of this function.
    match result {
        Ok(epoch) => {
            // The VM runs here: its image takes its final name. A failure now
            // cannot undo the migration; the operator finds the file by its
            // partial name in the log.
            let disk_path = image.map(|i| i.commit());
            metrics.update(|s| s.epoch = epoch);
            metrics.finish(Status::Completed, None);
            Ok(TargetOutcome {
                epoch,
                spec,
                mem,
                vm,
                disk_path,
            })
        }
        Err(e @ MigrationError::PostcopyBroken(_)) => {
            // The VM runs here and owns its state: never quit it. Its guest
            // waits for the pages it lacks.
            tracing::error!("{e}");
            metrics.update(|s| {
                s.status = Status::Unknown;
                s.error = Some(e.to_string());
            });
            Err(e)
        }
        Err(e) => {
            let _ = shared.send_control(
                FrameKind::Control,
                &wire::encode_control(&ControlMsg::Abort {
                    reason: e.to_string(),
                }),
            );
            vm.abort(&e.to_string());
            // `image` drops here and removes the partial file.
            drop(image);
            Err(fail(&metrics, e))
        }
    }
}

/// Registered write buffers of the disk writer: 128 x 256 KiB = 32 MiB
/// (twice the queue depth: the ring's share plus the receivers').
const DISK_BUFFERS: usize = 128;
/// Submission queue entries of the disk writer's ring.
const DISK_QUEUE_DEPTH: u32 = 64;

/// A disk image being received: removed on drop unless committed.
struct DiskImage {
    partial: std::path::PathBuf,
    path: std::path::PathBuf,
    file: Arc<std::fs::File>,
    blocks: u64,
    /// Until the receivers take it.
    writer: Option<crate::disk::uring::DiskWriter>,
    committed: bool,
    /// The migration's placement, planned once the image (and so its
    /// device) exists.
    plan: crate::numa::Placement,
}

impl DiskImage {
    fn create(
        cfg: &TargetConfig,
        vm: &str,
        session: &str,
        d: &crate::link::DiskSpec,
        streams: u16,
        plan_for: impl FnOnce(Option<&std::fs::File>) -> crate::numa::Placement,
    ) -> Result<Self, MigrationError> {
        d.validate().map_err(MigrationError::Invalid)?;
        let dir = cfg.disk_dir.as_ref().ok_or_else(|| {
            MigrationError::Invalid(
                "the VM has a disk, but this target has no directory for disk images".into(),
            )
        })?;
        if vm.is_empty() || vm.contains('/') || vm.starts_with('.') {
            return Err(MigrationError::Invalid(format!(
                "VM name {vm:?} cannot name a disk image"
            )));
        }
        let path = dir.join(format!("{vm}.img"));
        if path.exists() {
            return Err(MigrationError::Invalid(format!(
                "a disk image for VM {vm} already exists at {}; move it away first",
                path.display()
            )));
        }
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let short = &session[..session.len().min(8)];
        let partial = dir.join(format!(".{vm}.{short}.partial"));
        let io = |what: &str, e: std::io::Error| {
            MigrationError::Invalid(format!("{what} {}: {e}", partial.display()))
        };
        // Guest data: readable by ferryd's user only.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io("creating the directory of", e))?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(|e| io("creating", e))?;
        let file = Arc::new(file);
        let plan = plan_for(Some(&file));
        let mut img = DiskImage {
            partial: partial.clone(),
            path,
            file: file.clone(),
            blocks: d.blocks(),
            writer: None,
            committed: false,
            plan,
        };
        file.set_len(d.bytes).map_err(|e| io("sizing", e))?;
        let writer = crate::disk::uring::DiskWriter::start_pinned(
            &file,
            d.blocks(),
            streams,
            DISK_BUFFERS,
            DISK_QUEUE_DEPTH,
            img.plan.pinner(crate::numa::Stage::DiskWrite),
        )
        .map_err(|e| io("starting io_uring writes to", e))?;
        tracing::info!(
            "receiving the disk ({} MiB) into {}",
            d.bytes >> 20,
            partial.display()
        );
        img.writer = Some(writer);
        Ok(img)
    }

    /// What the receivers need to write the image.
    fn take_sink(&mut self) -> DiskSink {
        DiskSink {
            file: self.file.clone(),
            blocks: self.blocks,
            written: AtomicBitmap::new(self.blocks),
            writer: self.writer.take().expect("taken once"),
        }
    }

    /// Renames the image to its final path.
    fn commit(mut self) -> std::path::PathBuf {
        self.committed = true;
        match std::fs::rename(&self.partial, &self.path) {
            Ok(()) => self.path.clone(),
            Err(e) => {
                tracing::error!(
                    "the VM runs here, but its disk image keeps the name {}: renaming to {} failed: {e}",
                    self.partial.display(),
                    self.path.display()
                );
                self.partial.clone()
            }
        }
    }
}

impl Drop for DiskImage {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = std::fs::remove_file(&self.partial) {
                tracing::warn!("could not remove {}: {e}", self.partial.display());
            }
        }
    }
}

struct RefillOnDrop(Option<Arc<crate::memory::Reserve>>);

impl Drop for RefillOnDrop {
    fn drop(&mut self) {
        if let Some(r) = &self.0 {
            r.refill();
        }
    }
}

fn protocol(phase: &'static str, detail: String) -> MigrationError {
    MigrationError::Protocol {
        phase,
        source: WireError::Violation(detail),
    }
}

enum Event {
    Frame(FrameKind, Vec<u8>),
    Failed(WireError),
}

/// How post-copy over one connection ended, short of completing.
enum PostcopyEnd {
    /// The connection broke; a new one may resume.
    Broke(String),
    /// Nothing can go on (the VMM is gone).
    Fatal(String),
}

struct Session<'a> {
    /// This connection's shared state (a resumed post-copy gets a new one).
    shared: Arc<Shared>,
    /// The migration's id (a resuming source names it).
    session_id: String,
    receivers: Option<Receivers>,
    events: Option<Receiver<Event>>,
    cfg: &'a TargetConfig,
    /// The priority stream, until post-copy starts.
    priority: Option<Box<dyn Conn>>,
    /// The stale bitmap of a post-copy switch (u64 words).
    stale: Option<Vec<u64>>,
    /// Post-copy's threads, once started.
    pc_threads: Option<crate::postcopy::target::Threads>,
    /// Sessions resuming this post-copy (registered from PREPARE on).
    resume_rx: Option<Receiver<IncomingSession>>,
    /// Where receivers run (for a resumed post-copy's new ones).
    plan: crate::numa::Placement,
    /// Post-copy checkpoints, when the source can take the VM back.
    ckpt: Option<crate::postcopy::checkpoint::Checkpointer>,
    /// The lease on running the guest, with checkpoints.
    watchdog: Option<crate::postcopy::checkpoint::Watchdog>,
    /// Post-copy: every page is here, and the VMM's check of it.
    done_verify: Option<crate::link::VerifyReport>,
    /// COMMIT took effect: the VMM runs the guest here.
    ran: bool,
}

/// The shortest checkpoint interval a source may ask for.
const CHECKPOINT_MS_MIN: u64 = 10;

impl Session<'_> {
    fn run<V: TargetVm>(
        &mut self,
        vm: &mut V,
        control: Box<dyn Conn>,
        epoch: u64,
    ) -> Result<u64, MigrationError> {
        let mut control = control;
        // Liveness comes from the data streams while pages flow, and from the
        // source's EOF; the control stream may be quiet for a long pre-copy.
        control
            .set_timeout(None)
            .map_err(|source| MigrationError::Transport {
                phase: "setup",
                source,
            })?;
        self.events = Some(spawn_reader(control));
        self.send(&ControlMsg::SpecAck)?;
        self.shared.metrics.update(|s| s.status = Status::Active);
        let mut state: Option<Vec<u8>> = None;
        let mut prepared = false;
        loop {
            if self.cfg.cancel.is_cancelled() {
                return Err(MigrationError::Cancelled);
            }
            let ev = match self
                .events
                .as_ref()
                .expect("reader running")
                .recv_timeout(Duration::from_millis(200))
            {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => {
                    vm.check()?;
                    if !prepared && self.shared.failure.is_set() {
                        return Err(protocol(
                            "receiving pages",
                            self.shared.failure.message().unwrap_or_default(),
                        ));
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(protocol("control stream", "reader stopped".into()))
                }
            };
            match ev {
                Event::Failed(source) => {
                    return Err(MigrationError::Protocol {
                        phase: "control stream",
                        source,
                    })
                }
                Event::Frame(FrameKind::Stale, words) => {
                    let want = self.shared.mem.pages().div_ceil(64) as usize * 8;
                    if self.stale.is_some() || prepared || self.priority.is_none() {
                        return Err(protocol("switchover", "an unexpected stale bitmap".into()));
                    }
                    if words.len() != want {
                        return Err(protocol(
                            "switchover",
                            format!("stale bitmap of {} bytes, want {want}", words.len()),
                        ));
                    }
                    self.stale = Some(
                        words
                            .chunks_exact(8)
                            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                            .collect(),
                    );
                }
                Event::Frame(FrameKind::State, blob) => {
                    if state.is_some() || prepared {
                        return Err(protocol("switchover", "a second state blob".into()));
                    }
                    self.shared
                        .metrics
                        .update(|s| s.status = Status::Switchover);
                    state = Some(blob);
                }
                Event::Frame(FrameKind::Control, p) => {
                    match wire::decode_control(&p).map_err(|source| MigrationError::Protocol {
                        phase: "control stream",
                        source,
                    })? {
                        ControlMsg::Prepare {
                            streams,
                            state_len,
                            state_crc,
                            progress,
                            postcopy,
                            grace_ms,
                            checkpoint_ms,
                        } => {
                            if prepared {
                                return Err(protocol("switchover", "a second PREPARE".into()));
                            }
                            let blob = state.take().ok_or_else(|| {
                                protocol("switchover", "PREPARE before the state".into())
                            })?;
                            if blob.len() as u64 != state_len || crc32c::crc32c(&blob) != state_crc
                            {
                                return Err(protocol(
                                    "switchover",
                                    "the state blob does not match PREPARE's length/CRC".into(),
                                ));
                            }
                            self.check_totals(&streams)?;
                            if let Some(d) = &self.shared.disk {
                                d.writer
                                    .sync(self.cfg.io_timeout)
                                    .map_err(MigrationError::Incomplete)?;
                            }
                            self.shared.metrics.update(|s| {
                                s.status = Status::Committing;
                                s.guest_progress_at_pause = progress;
                            });
                            if postcopy {
                                self.start_postcopy(
                                    vm,
                                    VmState { blob, progress },
                                    grace_ms,
                                    checkpoint_ms,
                                )?;
                                self.record_stage(Stage::Prepared);
                                self.send(&ControlMsg::Prepared {
                                    verify: Default::default(),
                                    checkpoints: self.watchdog.is_some(),
                                })?;
                                prepared = true;
                                continue;
                            }
                            if self.stale.is_some() {
                                return Err(protocol(
                                    "switchover",
                                    "a stale bitmap for a pre-copy switch".into(),
                                ));
                            }
                            let verify = vm.restore(&VmState { blob, progress })?;
                            self.shared.metrics.update(|s| {
                                s.verify_ms = verify.verify_ms;
                                s.verify = Some(verify.clone());
                            });
                            self.record_stage(Stage::Prepared);
                            self.send(&ControlMsg::Prepared {
                                verify,
                                checkpoints: false,
                            })?;
                            prepared = true;
                        }
                        ControlMsg::Commit { epoch: new_epoch } => {
                            if !prepared {
                                return Err(protocol(
                                    "switchover",
                                    "COMMIT before PREPARED".into(),
                                ));
                            }
                            if new_epoch <= epoch {
                                return Err(protocol(
                                    "switchover",
                                    format!("COMMIT epoch {new_epoch} is not past {epoch}"),
                                ));
                            }
                            // Recorded first: a restarted daemon must never
                            // call a guest that may run here aborted.
                            if let Some(r) = &self.cfg.resumes {
                                r.stage(&self.session_id, Stage::Committing { epoch: new_epoch })
                                    .map_err(|e| {
                                        MigrationError::Incomplete(format!(
                                        "could not record COMMIT in the state directory ({e}); \
                                         the guest stays on the source"
                                    ))
                                    })?;
                            }
                            vm.run(new_epoch)?;
                            self.ran = true;
                            // From here on the VM runs here: nothing may undo it.
                            if let Some(t) = &self.pc_threads {
                                t.postcopy().running();
                            }
                            if let Err(e) = self.send(&ControlMsg::Committed) {
                                tracing::warn!(
                                    "the VM runs here, but COMMITTED could not be sent: {e}"
                                );
                            }
                            if self.pc_threads.is_some() {
                                self.finish_postcopy(vm)?;
                            }
                            return Ok(new_epoch);
                        }
                        ControlMsg::Abort { reason } => {
                            return Err(MigrationError::PeerAborted(reason))
                        }
                        other => {
                            return Err(protocol("control stream", format!("unexpected {other:?}")))
                        }
                    }
                }
                Event::Frame(kind, _) => {
                    return Err(MigrationError::Protocol {
                        phase: "control stream",
                        source: WireError::Unexpected {
                            kind,
                            context: "control stream from the source",
                        },
                    })
                }
            }
        }
    }

    /// PREPARE of a post-copy switch: the VMM restores the state over a
    /// userfaultfd, and the fault and priority threads start.
    fn start_postcopy<V: TargetVm>(
        &mut self,
        vm: &mut V,
        state: VmState,
        grace_ms: u64,
        checkpoint_ms: u64,
    ) -> Result<(), MigrationError> {
        if checkpoint_ms > 0 && grace_ms / 2 < 2 * checkpoint_ms.max(CHECKPOINT_MS_MIN) {
            return Err(protocol(
                "switchover",
                format!(
                    "a post-copy grace of {grace_ms} ms is too short for checkpoints every \
                     {checkpoint_ms} ms (the lease, half the grace, must cover two)"
                ),
            ));
        }
        let stale = self.stale.take().ok_or_else(|| {
            protocol(
                "switchover",
                "post-copy PREPARE without a stale bitmap".into(),
            )
        })?;
        let priority = self.priority.take().ok_or_else(|| {
            protocol(
                "switchover",
                "post-copy PREPARE without a priority stream".into(),
            )
        })?;
        let uf = vm.restore_postcopy(&state)?;
        let pc = crate::postcopy::target::TargetPostcopy::new(
            uf,
            self.shared.mem.clone(),
            &stale,
            priority
                .try_clone()
                .map_err(|source| MigrationError::Transport {
                    phase: "post-copy",
                    source,
                })?,
        )
        .map_err(|e| protocol("switchover", e))?;
        let pc = Arc::new(pc);
        tracing::info!(
            stale = self.shared.mem.pages() - pc.states.present_count(),
            "post-copy: the VMM's memory is registered; ready to run"
        );
        let stream = self.shared.applied.len() as u16 + 1;
        let threads = crate::postcopy::target::Threads::start(pc.clone(), priority, stream)
            .map_err(|source| MigrationError::Transport {
                phase: "post-copy",
                source,
            })?;
        // From here on, data receivers claim every page they write.
        let _ = self.shared.postcopy.set(pc.clone());
        self.publish(&pc);
        self.pc_threads = Some(threads);
        if checkpoint_ms > 0 {
            self.start_checkpoints(vm, &pc, grace_ms, checkpoint_ms)?;
        }
        // From here a source that lost its connection may come back.
        self.resume_rx = self.cfg.resumes.as_ref().map(|r| r.wait(&self.session_id));
        Ok(())
    }

    /// Checkpoints for a post-copy whose source can take the VM back:
    /// the VMM logs the guest's writes, and a watchdog holds the lease.
    fn start_checkpoints<V: TargetVm>(
        &mut self,
        vm: &mut V,
        pc: &Arc<crate::postcopy::target::TargetPostcopy>,
        grace_ms: u64,
        checkpoint_ms: u64,
    ) -> Result<(), MigrationError> {
        use crate::postcopy::checkpoint::{Checkpointer, Lease, Watchdog};
        if !vm.start_checkpoints()? {
            tracing::warn!("post-copy: the VM cannot checkpoint; a lost source or target loses it");
            return Ok(());
        }
        let Some(fencer) = vm.fencer() else {
            tracing::warn!(
                "post-copy: no way to stop the VMM from outside; running without checkpoints"
            );
            return Ok(());
        };
        let fence_after = Duration::from_millis(grace_ms / 2);
        let lease = Lease::new(Instant::now(), fence_after);
        let p = pc.clone();
        self.watchdog = Some(Watchdog::start(lease, fencer, move |why| {
            p.failure.fail(format!("the guest was stopped: {why}"))
        }));
        self.ckpt = Some(Checkpointer::new(
            Duration::from_millis(checkpoint_ms.max(CHECKPOINT_MS_MIN)),
            self.shared.mem.pages(),
        ));
        tracing::info!(
            checkpoint_ms,
            fence_after_ms = grace_ms / 2,
            "post-copy: checkpoints on; the guest runs here under a lease"
        );
        Ok(())
    }

    /// Post-copy failed here for good. With a lease, the guest is stopped
    /// (the VMM killed) and the source told, so that it takes the VM back
    /// at once; without, the guest is left as it is.
    /// Records that PREPARED goes out. Failing to is no danger (a restarted
    /// daemon then does not know the migration, which keeps the source
    /// waiting, never running the VM twice), so it is only logged.
    fn record_stage(&self, stage: Stage) {
        if let Some(r) = &self.cfg.resumes {
            if let Err(e) = r.stage(&self.session_id, stage) {
                tracing::warn!(
                    "migration {}: could not record {stage:?}: {e}; a restarted ferryd \
                     will not know it",
                    self.session_id
                );
            }
        }
    }

    fn postcopy_failed(&mut self, why: String) -> MigrationError {
        match &self.watchdog {
            Some(w) => {
                let why = w.fence_now(why);
                let _ = self.send(&ControlMsg::Fenced {
                    reason: why.clone(),
                });
                MigrationError::Fenced(why)
            }
            None => MigrationError::PostcopyBroken(why),
        }
    }

    /// Publishes the post-copy numbers.
    fn publish(&self, pc: &crate::postcopy::target::TargetPostcopy) {
        let mut st = pc.stats();
        if let Some(c) = &self.ckpt {
            st.checkpoints = c.stats.acked;
            st.checkpoint_pages = c.stats.pages;
            st.checkpoint_pause_max_us = c.stats.pause_max_us;
            st.checkpoint_pause_mean_us = c.stats.pause_total_us / c.stats.taken.max(1);
        }
        self.shared.metrics.update(|s| s.postcopy = Some(st));
    }

    /// One checkpoint: the guest paused while its written pages are copied,
    /// then sent on the control stream.
    fn checkpoint<V: TargetVm>(
        &mut self,
        vm: &mut V,
        pc: &crate::postcopy::target::TargetPostcopy,
    ) -> Result<(), PostcopyEnd> {
        let pages = self.shared.mem.pages();
        let mut dirty = vec![0u64; pages.div_ceil(64) as usize];
        let taken = Instant::now();
        let state = vm
            .checkpoint_begin(&mut dirty)
            .map_err(|e| PostcopyEnd::Fatal(format!("checkpoint: {e}")))?;
        let c = self.ckpt.as_mut().expect("checkpoints on");
        let (list, dropped) = c.gather(&mut dirty, |p| pc.states.is_present(p), pages);
        let mut buf = std::mem::take(&mut c.buf);
        let data = crate::postcopy::checkpoint::copy_pages(&self.shared.mem, &list, &mut buf);
        vm.checkpoint_end()
            .map_err(|e| PostcopyEnd::Fatal(format!("resuming after a checkpoint: {e}")))?;
        let pause = taken.elapsed();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "checkpoint: the dirty log named pages not here yet"
            );
        }
        let id = c.sent(&list, taken, pause);
        tracing::debug!(
            id,
            pages = list.len(),
            ?pause,
            "post-copy: checkpoint taken"
        );
        let shared = self.shared.clone();
        let sent = crate::postcopy::checkpoint::send(
            &mut |kind, payload| shared.send_control(kind, payload),
            id,
            &list,
            data,
            &state,
        )
        .map_err(|e| PostcopyEnd::Broke(format!("sending checkpoint {id}: {e}")));
        if let Some(c) = self.ckpt.as_mut() {
            c.buf = buf;
        }
        sent
    }

    /// The guest runs here: wait until every page is present, requesting
    /// what the background push did not bring; then close the VMM's
    /// userfaultfd and tell the source (and, under a lease, wait until it
    /// lets go).
    fn finish_postcopy<V: TargetVm>(&mut self, vm: &mut V) -> Result<(), MigrationError> {
        let pc = self
            .pc_threads
            .as_ref()
            .expect("post-copy started")
            .postcopy()
            .clone();
        let metrics = self.shared.metrics.clone();
        metrics.update(|s| s.status = Status::Postcopy);
        let mut resumed: Option<IncomingSession> = None;
        loop {
            let broke = match self.postcopy_connected(vm, &pc, &mut resumed) {
                Ok(()) => break,
                Err(PostcopyEnd::Fatal(e)) => return Err(self.postcopy_failed(e)),
                Err(PostcopyEnd::Broke(e)) => e,
            };
            // The source may have let go and closed before a checkpoint
            // in flight here failed: its RELEASED is still to be read.
            if self.done_verify.is_some() && self.released_after_break() {
                break;
            }
            if let Some(c) = self.ckpt.as_mut() {
                c.disconnected();
            }
            // The connection to the source broke: the guest goes on, and
            // waits only when it touches a page that is not here.
            let Some(waiting) = self.resume_rx.clone() else {
                return Err(self.postcopy_failed(broke));
            };
            self.disconnect(&pc);
            let session = match resumed.take() {
                Some(s) => s,
                None => {
                    let grace = self.cfg.postcopy_grace;
                    match &self.watchdog {
                        Some(w) => tracing::warn!(
                            "post-copy: {broke}; waiting for the source to reconnect \
                             (the guest here is stopped in {:?} without it)",
                            w.lease().left()
                        ),
                        None => tracing::warn!(
                            "post-copy: {broke}; waiting up to {grace:?} for the source to reconnect"
                        ),
                    }
                    let deadline = Instant::now() + grace;
                    loop {
                        match waiting.recv_timeout(Duration::from_millis(200)) {
                            Ok(s) => break s,
                            Err(RecvTimeoutError::Timeout)
                                if self.watchdog.is_some() || Instant::now() < deadline =>
                            {
                                if let Some(why) = pc.failure.message() {
                                    return Err(self.postcopy_failed(why));
                                }
                                if let Err(e) = vm.check() {
                                    return Err(self.postcopy_failed(format!("the VMM: {e}")));
                                }
                                self.publish(&pc);
                            }
                            Err(_) => {
                                return Err(self.postcopy_failed(format!(
                                    "{broke}; the source did not reconnect within {grace:?}"
                                )))
                            }
                        }
                    }
                }
            };
            if let Err(e) = self.reconnect(&pc, session) {
                tracing::warn!("post-copy: resuming failed: {e}");
                self.shared.failure.fail(format!("resuming failed: {e}"));
            }
        }
        self.publish(&pc);
        tracing::info!(stats = ?pc.stats(), "post-copy complete: every page is here");
        if self.watchdog.take().is_some() {
            if let Err(e) = vm.stop_checkpoints() {
                tracing::warn!("post-copy: could not stop the VMM's dirty log: {e}");
            }
        }
        Ok(())
    }

    /// After a break with POSTCOPY_DONE sent: whether RELEASED is among what
    /// the control stream delivered before it ended (waits for its end up
    /// to 500 ms). Releases the lease if so.
    fn released_after_break(&mut self) -> bool {
        let Some(events) = self.events.as_ref() else {
            return false;
        };
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(left) {
                Ok(Event::Frame(FrameKind::Control, p)) => {
                    if let Ok(ControlMsg::Released) = wire::decode_control(&p) {
                        if let Some(w) = &self.watchdog {
                            w.lease().release();
                        }
                        tracing::info!("post-copy: the source let go of the VM");
                        return true;
                    }
                }
                Ok(Event::Frame(..)) => {}
                Ok(Event::Failed(_)) | Err(_) => return false,
            }
        }
    }

    /// Post-copy over one connection: until every page is here (and, under
    /// a lease, the source let go), or the connection breaks.
    fn postcopy_connected<V: TargetVm>(
        &mut self,
        vm: &mut V,
        pc: &crate::postcopy::target::TargetPostcopy,
        resumed: &mut Option<IncomingSession>,
    ) -> Result<(), PostcopyEnd> {
        let metrics = self.shared.metrics.clone();
        let mut push_done: Option<Instant> = None;
        let mut last_sweep = Instant::now();
        let mut done_sent = false;
        let broke = PostcopyEnd::Broke;
        let Some(events) = self.events.take() else {
            return Err(broke("no control stream".into()));
        };
        let result = loop {
            if pc.states.complete() && !done_sent {
                if self.done_verify.is_none() {
                    if let Some(t) = self.pc_threads.take() {
                        t.stop();
                    }
                    let verify = match vm.postcopy_done() {
                        Ok(v) => v,
                        Err(e) => break Err(PostcopyEnd::Fatal(format!("the VMM: {e}"))),
                    };
                    metrics.update(|s| {
                        s.verify_ms = verify.verify_ms;
                        s.verify = Some(verify.clone());
                    });
                    self.done_verify = Some(verify);
                }
                let verify = self.done_verify.clone().unwrap_or_default();
                if let Err(e) = self.send(&ControlMsg::PostcopyDone { verify }) {
                    break Err(broke(format!("sending POSTCOPY_DONE: {e}")));
                }
                done_sent = true;
                if self.watchdog.is_none() {
                    break Ok(());
                }
            }
            if let Some(e) = pc.failure.message() {
                break Err(PostcopyEnd::Fatal(e));
            }
            if let Err(e) = vm.check() {
                break Err(PostcopyEnd::Fatal(format!("the VMM: {e}")));
            }
            if let Some(e) = pc.link_error() {
                break Err(broke(e));
            }
            if let Some(e) = self.shared.failure.message() {
                break Err(broke(e));
            }
            // The source may notice a broken connection first and be back
            // before anything failed here.
            if let Some(s) = self.resume_rx.as_ref().and_then(|r| r.try_recv().ok()) {
                *resumed = Some(s);
                break Err(broke("the source reconnected".into()));
            }
            if self.ckpt.as_ref().is_some_and(|c| c.due()) {
                if let Err(e) = self.checkpoint(vm, pc) {
                    break Err(e);
                }
            }
            match events.recv_timeout(Duration::from_millis(20)) {
                Ok(Event::Frame(FrameKind::Control, p)) => match wire::decode_control(&p) {
                    Ok(ControlMsg::PushDone { round }) => {
                        tracing::info!(round, "post-copy: the source pushed every stale page");
                        push_done = Some(Instant::now());
                    }
                    Ok(ControlMsg::CheckpointAck { id }) => {
                        let taken = self.ckpt.as_mut().and_then(|c| c.acked(id));
                        match (taken, &self.watchdog) {
                            (Some(t), Some(w)) => w.lease().renew(t),
                            _ => tracing::warn!(
                                "post-copy: an ack for checkpoint {id}, not in flight"
                            ),
                        }
                    }
                    Ok(ControlMsg::Released) if done_sent => {
                        if let Some(w) = &self.watchdog {
                            w.lease().release();
                        }
                        tracing::info!("post-copy: the source let go of the VM");
                        break Ok(());
                    }
                    Ok(other) => {
                        break Err(broke(format!("unexpected {other:?} during post-copy")))
                    }
                    Err(e) => break Err(broke(format!("control stream: {e}"))),
                },
                Ok(Event::Frame(kind, _)) => {
                    break Err(broke(format!("unexpected {kind:?} frame during post-copy")))
                }
                Ok(Event::Failed(e)) => break Err(broke(format!("control stream: {e}"))),
                Err(RecvTimeoutError::Disconnected) => {
                    break Err(broke("control stream closed".into()))
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.publish(pc);
            // Everything was pushed and has had time to land: whatever no
            // receiver claimed is missing (a copy failed its check).
            if !done_sent
                && push_done.is_some_and(|t| t.elapsed() > crate::postcopy::target::SWEEP_AFTER)
                && last_sweep.elapsed() > crate::postcopy::target::SWEEP_AFTER
            {
                last_sweep = Instant::now();
                let n = pc.request_unclaimed();
                if n > 0 {
                    tracing::info!(pages = n, "post-copy: requested pages nothing brought");
                }
            }
        };
        self.events = Some(events);
        result
    }

    /// The connection broke: stop everything that used it. Pages cut off on
    /// the way are forgotten, so that the next connection brings them.
    fn disconnect(&mut self, pc: &crate::postcopy::target::TargetPostcopy) {
        if let Some(rx) = self.receivers.take() {
            rx.stop();
        }
        if let Some(t) = self.pc_threads.as_mut() {
            t.stop_priority();
        }
        if let Ok(c) = self.shared.control.lock() {
            c.0.shutdown();
        }
        self.events = None;
        pc.disconnected();
    }

    /// A source reconnected: the post-copy goes on over `session`'s
    /// connections. It learns which pages are still missing here.
    fn reconnect(
        &mut self,
        pc: &Arc<crate::postcopy::target::TargetPostcopy>,
        session: IncomingSession,
    ) -> Result<(), String> {
        let IncomingSession {
            control, mut data, ..
        } = session;
        let streams = self.shared.applied.len();
        if data.len() != streams + 1 {
            return Err(format!(
                "the resumed session has {} data streams, this migration {}",
                data.len(),
                streams + 1
            ));
        }
        let priority = data.pop().expect("checked above");
        let tx = |e: ferry_transport::TransportError| e.to_string();
        let mut ctl_tx = control.try_clone().map_err(tx)?;
        ctl_tx.set_timeout(Some(self.cfg.io_timeout)).map_err(tx)?;
        let mut reader = control;
        reader.set_timeout(None).map_err(tx)?;
        for d in &data {
            d.try_clone()
                .and_then(|mut d| d.set_timeout(Some(self.cfg.io_timeout)))
                .map_err(tx)?;
        }
        let old = &self.shared;
        let pages = old.mem.pages();
        // What earlier connections wrote is not known page by page any
        // more: a zero page then always clears its page.
        let written = AtomicBitmap::new(pages);
        for p in 0..pages {
            written.set(p);
        }
        let shared = Arc::new(Shared {
            mem: old.mem.clone(),
            written,
            suspect: AtomicBitmap::new(pages),
            applied: (0..streams).map(|_| AtomicU64::new(0)).collect(),
            pages: (0..streams).map(|_| AtomicU64::new(0)).collect(),
            failure: Failure::default(),
            control: Mutex::new((ctl_tx, 0)),
            metrics: old.metrics.clone(),
            disk: None,
            postcopy: std::sync::OnceLock::new(),
        });
        let _ = shared.postcopy.set(pc.clone());
        self.shared = shared;
        self.receivers =
            Some(Receivers::start(self.shared.clone(), data, self.plan.clone()).map_err(tx)?);
        self.events = Some(spawn_reader(reader));
        // Requests go on the new priority stream from now on (none once
        // every page is here).
        pc.reconnected(priority.try_clone().map_err(tx)?);
        if let Some(t) = self.pc_threads.as_mut() {
            t.start_priority(priority, streams as u16 + 1).map_err(tx)?;
        }
        self.send(&ControlMsg::Resumed).map_err(|e| e.to_string())?;
        let missing: Vec<u8> = pc
            .states
            .missing_words()
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        self.shared
            .send_control(FrameKind::Stale, &missing)
            .map_err(|e| e.to_string())?;
        tracing::info!(
            missing = pages - pc.states.present_count(),
            "post-copy resumed on a new connection"
        );
        Ok(())
    }

    fn send(&self, msg: &ControlMsg) -> Result<(), MigrationError> {
        self.shared
            .send_control(FrameKind::Control, &wire::encode_control(msg))
            .map_err(|source| MigrationError::Protocol {
                phase: "control stream",
                source,
            })
    }

    /// Waits until every stream applied up to its announced last frame, then
    /// checks page counts and that no page is left suspect.
    fn check_totals(&self, totals: &[StreamTotals]) -> Result<(), MigrationError> {
        let s = &self.shared;
        if totals.len() != s.applied.len() {
            return Err(protocol(
                "prepare",
                format!(
                    "{} stream totals for {} streams",
                    totals.len(),
                    s.applied.len()
                ),
            ));
        }
        let deadline = Instant::now() + self.cfg.io_timeout;
        for (i, t) in totals.iter().enumerate() {
            while s.applied[i].load(Ordering::Acquire) < t.last_seq {
                if s.failure.is_set() {
                    return Err(MigrationError::Incomplete(
                        s.failure.message().unwrap_or_default(),
                    ));
                }
                if Instant::now() > deadline {
                    return Err(MigrationError::Incomplete(format!(
                        "stream {} did not reach seq {} in time",
                        i + 1,
                        t.last_seq
                    )));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let (applied, got) = (
                s.applied[i].load(Ordering::Acquire),
                s.pages[i].load(Ordering::Acquire),
            );
            if applied != t.last_seq || got != t.pages {
                return Err(MigrationError::Incomplete(format!(
                    "stream {}: applied seq {applied} / {got} pages, source sent seq {} / {} pages",
                    i + 1,
                    t.last_seq,
                    t.pages
                )));
            }
        }
        let suspect = s.suspect.count();
        if suspect > 0 {
            return Err(MigrationError::Incomplete(format!(
                "{suspect} pages failed their CRC and were never sent again"
            )));
        }
        Ok(())
    }
}

fn spawn_reader(mut conn: Box<dyn Conn>) -> Receiver<Event> {
    let (tx, rx) = bounded(4);
    std::thread::Builder::new()
        .name("ferry-control-rx".into())
        .spawn(move || {
            let mut seq = 1; // the spec was frame 1
            loop {
                let ev = match wire::recv_frame(&mut *conn) {
                    Ok((h, _)) if h.stream != 0 => Event::Failed(WireError::Unexpected {
                        kind: h.kind,
                        context: "control stream, wrong stream id",
                    }),
                    Ok((h, _)) if h.seq != seq + 1 => Event::Failed(WireError::Sequence {
                        stream: 0,
                        expected: seq + 1,
                        got: h.seq,
                    }),
                    Ok((h, p)) => {
                        seq = h.seq;
                        Event::Frame(h.kind, p)
                    }
                    Err(e) => Event::Failed(e),
                };
                let stop = matches!(ev, Event::Failed(_));
                if tx.send(ev).is_err() || stop {
                    return;
                }
            }
        })
        .expect("spawning a thread");
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that outlives the registries using it, as a file does.
    #[derive(Debug, Default)]
    struct Kept(Arc<Mutex<Vec<(String, Record)>>>);

    impl ConclusionStore for Kept {
        fn load(&self) -> Vec<(String, Record)> {
            self.0.lock().unwrap().clone()
        }
        fn record(&self, id: &str, record: Record, _: usize) -> std::io::Result<()> {
            self.0.lock().unwrap().push((id.to_string(), record));
            Ok(())
        }
    }

    #[test]
    fn conclusions_outlive_the_registry_through_its_store() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let first = Resumes::with_store(Box::new(Kept(lines.clone())));
        first.begin("aa");
        first.conclude("aa", Some(wire::Conclusion::Completed { epoch: 2 }));
        first.begin("bb");
        // A broken post-copy has no conclusion to record.
        first.conclude("bb", None);
        first.begin("cc");
        first.conclude("cc", Some(wire::Conclusion::Aborted));
        // Stages: one that ended, and two the daemon died in, before COMMIT
        // and while starting the guest.
        first.begin("dd");
        first.stage("dd", Stage::Prepared).unwrap();
        first.stage("dd", Stage::Committing { epoch: 4 }).unwrap();
        first.conclude("dd", Some(wire::Conclusion::Completed { epoch: 4 }));
        first.begin("ee");
        first.stage("ee", Stage::Prepared).unwrap();
        first.begin("ff");
        first.stage("ff", Stage::Prepared).unwrap();
        first.stage("ff", Stage::Committing { epoch: 5 }).unwrap();
        drop(first);
        let lines2 = lines.clone();
        let next = Resumes::with_store(Box::new(Kept(lines)));
        assert_eq!(
            next.conclusion("aa"),
            Some(wire::Conclusion::Completed { epoch: 2 })
        );
        assert_eq!(next.conclusion("bb"), None);
        assert_eq!(next.conclusion("cc"), Some(wire::Conclusion::Aborted));
        assert_eq!(
            next.conclusion("dd"),
            Some(wire::Conclusion::Completed { epoch: 4 })
        );
        // The guest never ran here: the source may resume it.
        assert_eq!(next.conclusion("ee"), Some(wire::Conclusion::Aborted));
        // It may run here: nobody can say it did not, until its VMM does.
        assert_eq!(next.conclusion("ff"), None);
        assert_eq!(next.in_doubt(), vec![("ff".to_string(), 5)]);
        assert!(!next.settle("ee", wire::Conclusion::Fenced).unwrap());
        assert!(next
            .settle("ff", wire::Conclusion::Completed { epoch: 5 })
            .unwrap());
        assert!(next.in_doubt().is_empty());
        assert!(!next.settle("ff", wire::Conclusion::Fenced).unwrap());
        drop(next);
        // The settlement outlives this registry too.
        let third = Resumes::with_store(Box::new(Kept(lines2)));
        assert_eq!(
            third.conclusion("ff"),
            Some(wire::Conclusion::Completed { epoch: 5 })
        );
        assert!(third.in_doubt().is_empty());
        // Without a store, a new registry knows nothing.
        assert_eq!(Resumes::new().conclusion("aa"), None);
    }
}
