//! The vCPU thread: runs the guest, paces it, and parks it at consistent
//! points.
//!
//! The guest exits only between page writes (`out EXIT_PORT`) and at its disk
//! doorbell (`out DISK_PORT`, whose command the exit handler completes), so
//! the thread looks at its command queue only there: a pause never lands
//! mid-page or mid-command. At every exit the VMM also tells a disk workload
//! how many block writes are due ([`crate::disk::pacing`]). The
//! waits the VMM adds at exits (1 ms per idle loop, the dirty-rate pacing)
//! are `recv_timeout`s on the same queue, so a pause also cuts them short.
//!
//! Throttling (auto-converge) works like QEMU's cpu-throttle, measured at
//! exits: once the vCPU has run for [`THROTTLE_SLICE`] of wall time since its
//! last throttle sleep, it sleeps `ran * p / (100 - p)`, so at p% it runs
//! (100 - p)% of the time. The sleep also moves the pacing deadline: a paced
//! dirty guest throttled at p% writes (100 - p)% of its configured rate (it
//! does not catch up afterwards), like a guest whose writes need CPU time.
//!
//! ```text
//!            Run                 exit: Pause
//!   Parked ───────▶ Running ──────────────────▶ Parked (state returned)
//!     ▲  Restore (parked only)      │ bad exit
//!     └─────────────────────────────┴──────────▶ Failed (parked; Run refused)
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use ferry_engine::link::THROTTLE_PCT_MAX;

use crate::abi;
use crate::disk::doorbell::DiskPort;
use crate::disk::pacing::DiskPacer;
use crate::layout::PAGE_BYTES;
use crate::state::VcpuState;

/// Sleep per idle loop. An exit costs tens of µs of host CPU on a nested
/// host (1 ms sleeps measured ~10% of a core there), so idle exits 200 times
/// a second (~2%). Pause latency does not depend on it: a pause cuts the
/// sleep short.
pub const IDLE_SLEEP: Duration = Duration::from_millis(5);
/// When pacing falls this far behind (a pause, a slow host), it forgets the
/// debt instead of bursting to catch up.
pub const PACING_SLACK_MAX: Duration = Duration::from_millis(20);
/// Run time between two throttle sleeps, QEMU's cpu-throttle timeslice: at
/// 99% the vCPU runs 10 ms and sleeps 990 ms. Slices are measured at exits,
/// which come far more often (a dirty batch of 64 KiB is ~64 µs at 1 GiB/s;
/// idle exits every 5 ms). Pause latency does not grow: the sleep is a
/// `recv_timeout` that a pause cuts short.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// Errors of the vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A vCPU ioctl failed.
    #[error("vCPU {op} failed: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest stopped in a way it never should (reported once it happened).
    #[error("the guest failed: {0}")]
    Guest(String),
    /// The request needs a parked vCPU.
    #[error("cannot {0} while the vCPU runs")]
    Running(&'static str),
    /// The vCPU thread is gone.
    #[error("the vCPU thread has exited")]
    Gone,
}

/// How the VMM paces the dirty workload and the disk workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pacing {
    /// Bytes the guest writes per `EV_BATCH` exit.
    pub batch_bytes: u64,
    /// Target rate (None: unpaced).
    pub bytes_per_s: Option<u64>,
    /// Disk block writes per second (None: no disk workload).
    pub disk_blocks_per_s: Option<u64>,
}

impl Pacing {
    /// Pacing for `batch_pages` per batch at `bytes_per_s`, and disk writes
    /// at `disk_blocks_per_s`.
    pub fn new(batch_pages: u64, bytes_per_s: Option<u64>, disk_blocks_per_s: Option<u64>) -> Self {
        Pacing {
            batch_bytes: batch_pages * PAGE_BYTES,
            bytes_per_s,
            disk_blocks_per_s,
        }
    }

    /// The disk pacer: the longest planned wait at an exit is one dirty
    /// batch's time (idle sleeps are shorter than the pacer's slack).
    fn disk_pacer(&self) -> DiskPacer {
        DiskPacer::new(
            self.disk_blocks_per_s,
            self.batch_time().unwrap_or_default(),
        )
    }

    fn batch_time(&self) -> Option<Duration> {
        let rate = self.bytes_per_s.filter(|&r| r > 0)?;
        Some(Duration::from_nanos(
            (u128::from(self.batch_bytes) * 1_000_000_000 / u128::from(rate)) as u64,
        ))
    }
}

type Reply<T> = mpsc::Sender<Result<T, VcpuError>>;

enum Cmd {
    Run(Reply<()>),
    Pause(Reply<VcpuState>),
    Restore(Box<VcpuState>, Pacing, Reply<()>),
    Quit,
}

/// The signal that kicks a vCPU out of KVM_RUN.
const KICK_SIGNAL: libc::c_int = libc::SIGUSR2;
/// How long a command waits before the vCPU is kicked (again).
const KICK_EVERY: Duration = Duration::from_millis(10);

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs a handler for [`KICK_SIGNAL`] that does nothing, without
/// SA_RESTART, so that the signal interrupts KVM_RUN (EINTR) instead of
/// killing the process.
fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    let r = ONCE.get_or_init(|| {
        // SAFETY: a zeroed sigaction is valid; the handler is an extern "C"
        // fn that touches nothing, so it is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            if libc::sigaction(KICK_SIGNAL, &sa, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    });
    r.map_err(std::io::Error::from_raw_os_error)
}

#[derive(Debug, Default)]
struct Shared {
    running: AtomicBool,
    /// The vCPU thread (pthread_t), for kicks; 0 until it runs.
    thread: AtomicU64,
    failure: Mutex<Option<String>>,
    /// Throttle percentage, 0..=THROTTLE_PCT_MAX; read at every exit.
    throttle_pct: AtomicU8,
}

/// The handle of a vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    tx: mpsc::Sender<Cmd>,
    shared: Arc<Shared>,
    join: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts the thread, parked, with the vCPU as it is (set its state with
    /// [`VcpuHandle::restore`] before the first run). `disk` serves the
    /// guest's disk doorbell (None: the VM has no disk).
    pub fn spawn(vcpu: VcpuFd, pacing: Pacing, disk: Option<DiskPort>) -> std::io::Result<Self> {
        install_kick_handler()?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let thread = Thread {
            vcpu,
            rx,
            shared: shared.clone(),
            pacing,
            deadline: Instant::now(),
            slice_start: Instant::now(),
            disk,
            disk_pacer: pacing.disk_pacer(),
        };
        let join = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || thread.main())?;
        Ok(VcpuHandle {
            tx,
            shared,
            join: Some(join),
        })
    }

    /// Sends a command and waits for its answer. A vCPU inside KVM_RUN
    /// reads commands only at its next exit, and one waiting on a page that
    /// has not arrived (post-copy: a userfaultfd fault) makes none: it is
    /// kicked with a signal every 10 ms until it answers (KVM_RUN then
    /// returns EINTR; the guest re-executes the instruction later).
    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, VcpuError> {
        let (reply, rx) = mpsc::channel();
        self.tx.send(make(reply)).map_err(|_| VcpuError::Gone)?;
        loop {
            match rx.recv_timeout(KICK_EVERY) {
                Ok(r) => return r,
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::Gone),
                Err(RecvTimeoutError::Timeout) => self.kick(),
            }
        }
    }

    fn kick(&self) {
        let t = self.shared.thread.load(Ordering::Acquire);
        if t != 0 {
            // SAFETY: pthread_kill to the vCPU thread, which lives as long
            // as this handle (joined in Drop); the signal's handler (set in
            // `install_kick_handler`) does nothing.
            unsafe { libc::pthread_kill(t as libc::pthread_t, KICK_SIGNAL) };
        }
    }

    /// Runs the guest (no-op when running).
    pub fn run(&self) -> Result<(), VcpuError> {
        self.call(Cmd::Run)
    }

    /// Parks the vCPU at the guest's next exit and returns its state.
    pub fn pause(&self) -> Result<VcpuState, VcpuError> {
        self.call(Cmd::Pause)
    }

    /// Loads a state into the parked vCPU.
    pub fn restore(&self, state: VcpuState, pacing: Pacing) -> Result<(), VcpuError> {
        self.call(|r| Cmd::Restore(Box::new(state), pacing, r))
    }

    /// Throttles the vCPU to `100 - percent`% of wall time from its next
    /// exit on (0: full speed). `percent` is at most [`THROTTLE_PCT_MAX`]; the
    /// caller checks values from outside.
    pub fn set_throttle(&self, percent: u8) {
        assert!(
            percent <= THROTTLE_PCT_MAX,
            "throttle {percent}% over the cap"
        );
        self.shared.throttle_pct.store(percent, Ordering::SeqCst);
    }

    /// The throttle in effect, percent.
    pub fn throttle_pct(&self) -> u8 {
        self.shared.throttle_pct.load(Ordering::SeqCst)
    }

    /// Whether the guest is running now.
    pub fn running(&self) -> bool {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// Why the guest failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().expect("failure lock").clone()
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Quit);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

struct Thread {
    vcpu: VcpuFd,
    rx: mpsc::Receiver<Cmd>,
    shared: Arc<Shared>,
    pacing: Pacing,
    deadline: Instant,
    /// End of the last throttle sleep (or of the last exit when unthrottled).
    slice_start: Instant,
    disk: Option<DiskPort>,
    disk_pacer: DiskPacer,
}

enum Flow {
    Continue,
    Quit,
}

impl Thread {
    fn main(mut self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.shared.thread.store(me as u64, Ordering::Release);
        loop {
            let cmd = if self.is_running() {
                match self.rx.try_recv() {
                    Ok(cmd) => Some(cmd),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return,
                }
            } else {
                match self.rx.recv() {
                    Ok(cmd) => Some(cmd),
                    Err(_) => return,
                }
            };
            let flow = match cmd {
                Some(cmd) => self.handle(cmd),
                None => self.run_once(),
            };
            if let Flow::Quit = flow {
                self.set_running(false);
                return;
            }
        }
    }

    fn is_running(&self) -> bool {
        self.shared.running.load(Ordering::SeqCst)
    }

    fn set_running(&self, on: bool) {
        self.shared.running.store(on, Ordering::SeqCst);
    }

    fn fail(&self, why: String) {
        tracing::error!("guest failed: {why}");
        *self.shared.failure.lock().expect("failure lock") = Some(why);
        self.set_running(false);
    }

    fn handle(&mut self, cmd: Cmd) -> Flow {
        match cmd {
            Cmd::Run(reply) => {
                let failure = self.shared.failure.lock().expect("failure lock").clone();
                let r = match failure {
                    Some(why) => Err(VcpuError::Guest(why)),
                    None => {
                        self.deadline = Instant::now();
                        self.slice_start = self.deadline;
                        self.start_disk_pacing()
                    }
                };
                let _ = reply.send(r);
            }
            Cmd::Pause(reply) => {
                self.set_running(false);
                self.disk_pacer.stop();
                let _ = reply.send(self.save());
            }
            Cmd::Restore(state, pacing, reply) => {
                let r = if self.is_running() {
                    Err(VcpuError::Running("restore"))
                } else {
                    self.pacing = pacing;
                    self.disk_pacer = pacing.disk_pacer();
                    self.load(&state)
                };
                let _ = reply.send(r);
            }
            Cmd::Quit => return Flow::Quit,
        }
        Flow::Continue
    }

    /// Starts running: the disk pacer counts from now, and from the writes
    /// the guest has made (a restored guest brings its own count).
    fn start_disk_pacing(&mut self) -> Result<(), VcpuError> {
        if let (Some(port), true) = (&self.disk, self.disk_pacer.active()) {
            let written = port
                .written()
                .map_err(|e| VcpuError::Guest(format!("cannot read the disk counter: {e}")))?;
            self.disk_pacer.start(Instant::now(), written);
        }
        self.set_running(true);
        Ok(())
    }

    /// Writes the disk writes due into the control block (a disk workload).
    fn pace_disk(&mut self) {
        let Some(port) = self.disk.as_ref().filter(|_| self.disk_pacer.active()) else {
            return;
        };
        let r = port
            .written()
            .and_then(|w| match self.disk_pacer.at_exit(Instant::now(), w) {
                Some(due) => port.set_due(due),
                None => Ok(()),
            });
        if let Err(e) = r {
            self.fail(format!("disk pacing failed: {e}"));
        }
    }

    /// The disk doorbell: runs the guest's command to completion.
    fn disk_doorbell(&mut self, cmd: Option<u64>) {
        let r = match (&self.disk, cmd) {
            (None, _) => Err("the guest rang the disk doorbell, but the VM has no disk".into()),
            (Some(_), None) => Err("empty disk doorbell write".into()),
            (Some(port), Some(cmd)) => port.doorbell(cmd).map_err(|e| e.to_string()),
        };
        if let Err(why) = r {
            self.fail(why);
        }
    }

    /// The guest read a block back whose stamp is not its latest write.
    fn disk_bad(&mut self) {
        let why = match self.disk.as_ref().map(DiskPort::bad_block) {
            Some(Ok((block, Some(v)))) => format!(
                "the guest read disk block {block} back, and its stamp is not version {v} \
                 (the disk lost or misplaced a write)"
            ),
            Some(Ok((block, None))) => {
                format!("the guest reported a bad disk block {block} outside its window")
            }
            Some(Err(e)) => format!("the guest reported a bad disk block ({e})"),
            None => "the guest reported a bad disk block, but the VM has no disk".into(),
        };
        self.fail(why);
    }

    /// One KVM_RUN and the handling of its exit.
    fn run_once(&mut self) -> Flow {
        let wait = match self.vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let port = u64::from(port);
                let byte = data.first().map(|&b| u64::from(b));
                let wait = match (port, byte) {
                    (abi::EXIT_PORT, Some(abi::EV_IDLE)) => Some(IDLE_SLEEP),
                    (abi::EXIT_PORT, Some(abi::EV_BATCH)) => self.pace(),
                    (abi::EXIT_PORT, Some(abi::EV_CHECKPOINT)) => None,
                    (abi::EXIT_PORT, Some(abi::EV_DISK_BAD)) => {
                        self.disk_bad();
                        None
                    }
                    (abi::EXIT_PORT, Some(abi::EV_BAD_CONFIG)) => {
                        self.fail("the guest rejected its control block".into());
                        None
                    }
                    (abi::EXIT_PORT, other) => {
                        self.fail(format!("unknown guest event {other:?}"));
                        None
                    }
                    (abi::DISK_PORT, cmd) => {
                        self.disk_doorbell(cmd);
                        None
                    }
                    (port, _) => {
                        self.fail(format!("guest output to unknown port {port:#x}"));
                        None
                    }
                };
                if self.is_running() {
                    self.pace_disk();
                }
                wait
            }
            Ok(exit) => {
                let why = format!("unexpected vCPU exit {exit:?}");
                self.fail(why);
                None
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => {
                self.fail(format!("KVM_RUN failed: {e}"));
                None
            }
        };
        let throttle = match self.is_running() {
            true => self.throttle(),
            false => None,
        };
        let wait = wait.unwrap_or_default() + throttle.unwrap_or_default();
        if wait.is_zero() {
            return Flow::Continue;
        }
        match self.rx.recv_timeout(wait) {
            Ok(cmd) => self.handle(cmd),
            Err(RecvTimeoutError::Timeout) => {
                if throttle.is_some() {
                    self.slice_start = Instant::now();
                }
                Flow::Continue
            }
            Err(RecvTimeoutError::Disconnected) => Flow::Quit,
        }
    }

    /// The throttle sleep due at this exit, if the vCPU has run a whole
    /// slice. Moves the pacing deadline by the same amount.
    fn throttle(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let p = u32::from(self.shared.throttle_pct.load(Ordering::SeqCst));
        assert!(p <= u32::from(THROTTLE_PCT_MAX));
        if p == 0 {
            self.slice_start = now;
            return None;
        }
        let ran = now - self.slice_start;
        if ran < THROTTLE_SLICE {
            return None;
        }
        // ran / (ran + sleep) = (100 - p) / 100.
        let sleep = ran * p / (100 - p);
        self.deadline += sleep;
        self.disk_pacer.skip(sleep);
        Some(sleep)
    }

    /// Time to wait after a dirty batch so the long-run rate holds.
    fn pace(&mut self) -> Option<Duration> {
        let batch = self.pacing.batch_time()?;
        self.deadline += batch;
        let now = Instant::now();
        if self.deadline > now {
            Some(self.deadline - now)
        } else {
            if now - self.deadline > PACING_SLACK_MAX {
                self.deadline = now;
            }
            None
        }
    }

    /// KVM completes an `out` only on the next KVM_RUN; run once with
    /// immediate_exit so the saved RIP is past the instruction.
    fn complete_pending_io(&mut self) {
        self.vcpu.set_kvm_immediate_exit(1);
        match self.vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => tracing::warn!("completing pending I/O: {e}"),
            Ok(exit) => tracing::warn!("completing pending I/O returned exit {exit:?}"),
        }
        self.vcpu.set_kvm_immediate_exit(0);
    }

    fn save(&mut self) -> Result<VcpuState, VcpuError> {
        self.complete_pending_io();
        let err = |op| move |source| VcpuError::Kvm { op, source };
        Ok(VcpuState {
            regs: self.vcpu.get_regs().map_err(err("get regs"))?,
            sregs: self.vcpu.get_sregs().map_err(err("get sregs"))?,
            fpu: self.vcpu.get_fpu().map_err(err("get fpu"))?,
        })
    }

    fn load(&mut self, s: &VcpuState) -> Result<(), VcpuError> {
        let err = |op| move |source| VcpuError::Kvm { op, source };
        self.vcpu.set_sregs(&s.sregs).map_err(err("set sregs"))?;
        self.vcpu.set_regs(&s.regs).map_err(err("set regs"))?;
        self.vcpu.set_fpu(&s.fpu).map_err(err("set fpu"))?;
        Ok(())
    }
}
