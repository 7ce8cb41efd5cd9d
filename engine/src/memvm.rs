//! In-process VMs for tests and examples: a "guest" thread that writes pages
//! of a [`GuestMem`] at a chosen rate and logs them as KVM's dirty log would,
//! and a target that records what it was asked to do. They let the protocol
//! and the pipelines be tested in one process, with any transport, without
//! KVM. Each written page holds its (page, version) stamp in every u64 word.
//!
//! [`MemSourceVm`] honours `set_throttle` as ferry-vmm does: at p% its guest
//! runs (100 - p)% of the time, so it writes (100 - p)% of its rate. With
//! [`MemSourceVm::attach_disk`] its guest also writes disk blocks of an image
//! file (stamped, incompressible, every 8th one zero) and logs them.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::Bytes;

use crate::bitmap::DirtyBitmap;
use crate::link::{VerifyReport, THROTTLE_PCT_MAX};
use crate::vm::{SourceVm, TargetVm, VmError, VmState};
use crate::{GuestMem, PageIndex, PAGE_SIZE};

/// The stamp word of `page` at `version`.
pub fn stamp(page: u64, version: u64) -> u64 {
    (page << 32) | (version & 0xffff_ffff)
}

/// Writes `page` with its stamp.
pub fn write_page(mem: &GuestMem, page: u64, version: u64) {
    let words = [stamp(page, version); PAGE_SIZE / 8];
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    mem.page(PageIndex(page))
        .expect("page in range")
        .copy_from(&bytes[..]);
}

/// Writes `page` with incompressible bytes derived from its stamp (the
/// first word is the stamp itself).
pub fn write_random_page(mem: &GuestMem, page: u64, version: u64) {
    let mut x = stamp(page, version).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(PAGE_SIZE);
    bytes.extend_from_slice(&stamp(page, version).to_le_bytes());
    while bytes.len() < PAGE_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    mem.page(PageIndex(page))
        .expect("page in range")
        .copy_from(&bytes[..]);
}

/// Pages a guest writes per batch before checking for a pause.
const BATCH_PAGES: u64 = 16;

struct Shared {
    mem: Arc<GuestMem>,
    log: Mutex<Option<DirtyBitmap>>,
    stop: AtomicBool,
    progress: AtomicU64,
    throttle_pct: AtomicU8,
    /// Guest writes touch this many leading pages only (0: all).
    hot_pages: u64,
    /// A write changes one 64-byte line of the page, not all of it.
    partial: bool,
    /// The disk the guest writes, once attached.
    disk: Mutex<Option<MemDisk>>,
}

/// A disk image the in-process guest writes.
struct MemDisk {
    file: Arc<std::fs::File>,
    blocks: u64,
    /// Block writes per page write.
    per_page: f64,
    log: Option<DirtyBitmap>,
}

impl MemDisk {
    /// Writes block `block` at `version` (zero when `version % 8 == 0`),
    /// then logs it: a sync that clears the bit precedes any read that
    /// could see older data.
    fn write(&mut self, block: u64, version: u64) {
        use std::os::unix::fs::FileExt;
        let mut data = vec![0u8; PAGE_SIZE];
        if !version.is_multiple_of(8) {
            let mut x = stamp(block, version).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for w in data.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            data[..8].copy_from_slice(&stamp(block, version).to_le_bytes());
        }
        self.file
            .write_all_at(&data, block * PAGE_SIZE as u64)
            .expect("writing the test disk");
        if let Some(log) = self.log.as_mut() {
            log.set(block);
        }
    }
}

/// A source VM whose guest is a thread writing stamped, incompressible pages
/// (or, with `partial`, one stamped line of a page per write).
pub struct MemSourceVm {
    shared: Arc<Shared>,
    rate_pages_s: u64,
    seed: u64,
    writer: Option<JoinHandle<u64>>,
    /// Set once `hand_off` was called, with the epoch.
    pub handed_off: Option<u64>,
    /// How many times `resume` was called.
    pub resumes: u32,
    /// Every percentage `set_throttle` accepted, in order.
    pub throttles: Vec<u8>,
    /// Post-copy take-back: the checkpoint state it was rolled back to.
    pub rolled_back: Option<VmState>,
    /// When `resume` was last called.
    pub resumed_at: Option<Instant>,
}

impl MemSourceVm {
    /// A VM over `mem` whose guest writes `rate_pages_s` pages per second
    /// (0: an idle guest), choosing pages from `seed`.
    pub fn new(mem: Arc<GuestMem>, rate_pages_s: u64, seed: u64) -> Self {
        Self::with_pattern(mem, rate_pages_s, seed, 0, false)
    }

    /// Like [`Self::new`], with writes confined to `hot_pages` pages spread
    /// evenly over memory (0: all of memory) and, with `partial`, changing
    /// one 64-byte line of a page per write (what XOR-delta is for).
    pub fn with_pattern(
        mem: Arc<GuestMem>,
        rate_pages_s: u64,
        seed: u64,
        hot_pages: u64,
        partial: bool,
    ) -> Self {
        let shared = Arc::new(Shared {
            mem,
            log: Mutex::new(None),
            stop: AtomicBool::new(false),
            progress: AtomicU64::new(0),
            throttle_pct: AtomicU8::new(0),
            hot_pages,
            partial,
            disk: Mutex::new(None),
        });
        let mut vm = MemSourceVm {
            shared,
            rate_pages_s,
            seed,
            writer: None,
            handed_off: None,
            resumes: 0,
            throttles: Vec::new(),
            rolled_back: None,
            resumed_at: None,
        };
        vm.start_guest();
        vm
    }

    /// Gives the guest a disk: from now on it also writes `blocks_s`
    /// blocks per second of `file` (a multiple of 4 KiB), at random.
    pub fn attach_disk(&mut self, file: Arc<std::fs::File>, blocks_s: u64) {
        let blocks = file.metadata().expect("stat the test disk").len() / PAGE_SIZE as u64;
        self.stop_guest();
        *self.shared.disk.lock().unwrap_or_else(|p| p.into_inner()) = Some(MemDisk {
            file,
            blocks,
            per_page: blocks_s as f64 / self.rate_pages_s.max(1) as f64,
            log: None,
        });
        self.start_guest();
    }

    /// Whether the guest thread runs.
    pub fn running(&self) -> bool {
        self.writer.is_some()
    }

    /// The guest's progress counter (pages written).
    pub fn progress(&self) -> u64 {
        self.shared.progress.load(Ordering::SeqCst)
    }

    /// Whether its dirty log is on.
    pub fn logging(&self) -> bool {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The throttle in effect, percent (0: full speed).
    pub fn throttle_pct(&self) -> u8 {
        self.shared.throttle_pct.load(Ordering::SeqCst)
    }

    fn start_guest(&mut self) {
        if self.rate_pages_s == 0 {
            self.writer = Some(std::thread::spawn(|| 0));
            return;
        }
        self.shared.stop.store(false, Ordering::SeqCst);
        let (shared, rate, mut x) = (self.shared.clone(), self.rate_pages_s, self.seed | 1);
        self.writer = Some(std::thread::spawn(move || {
            let batch_time = Duration::from_secs_f64(BATCH_PAGES as f64 / rate as f64);
            let mut deadline = Instant::now();
            // A hot set is spread evenly over memory: hot page k is page
            // k * stride.
            let (pages, stride) = match shared.hot_pages {
                0 => (shared.mem.pages(), 1),
                h => {
                    let h = h.min(shared.mem.pages());
                    (h, shared.mem.pages() / h)
                }
            };
            let mut written = 0u64;
            let mut disk_due = 0.0f64;
            while !shared.stop.load(Ordering::SeqCst) {
                if let Some(d) = shared
                    .disk
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_mut()
                {
                    disk_due += d.per_page * BATCH_PAGES as f64;
                    while disk_due >= 1.0 {
                        disk_due -= 1.0;
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let version = shared.progress.fetch_add(1, Ordering::SeqCst) + 1;
                        d.write(x % d.blocks, version);
                    }
                }
                for _ in 0..BATCH_PAGES {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = (x % pages) * stride;
                    let version = shared.progress.fetch_add(1, Ordering::SeqCst) + 1;
                    if shared.partial {
                        let line = [stamp(page, version); 8];
                        let bytes: Vec<u8> = line.iter().flat_map(|w| w.to_le_bytes()).collect();
                        let off = (version as usize % (PAGE_SIZE / 64)) * 64;
                        shared
                            .mem
                            .page(PageIndex(page))
                            .expect("page in range")
                            .write_slice(&bytes, off)
                            .expect("line inside the page");
                    } else {
                        write_random_page(&shared.mem, page, version);
                    }
                    if let Some(log) = shared
                        .log
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_mut()
                    {
                        log.set(page);
                    }
                }
                written += BATCH_PAGES;
                // Throttled at p%, the guest runs (100 - p)% of the time: a
                // batch takes 100 / (100 - p) times as long.
                let p = u32::from(shared.throttle_pct.load(Ordering::SeqCst));
                debug_assert!(p <= u32::from(THROTTLE_PCT_MAX));
                deadline += batch_time * 100 / (100 - p);
                if let Some(wait) = deadline.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            written
        }));
    }

    fn stop_guest(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Drop for MemSourceVm {
    fn drop(&mut self) {
        self.stop_guest();
    }
}

impl SourceVm for MemSourceVm {
    fn start_dirty_log(&mut self) -> Result<(), VmError> {
        *self.shared.log.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(DirtyBitmap::new(self.shared.mem.pages()));
        if let Some(d) = self
            .shared
            .disk
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            d.log = Some(DirtyBitmap::new(d.blocks));
        }
        Ok(())
    }

    fn sync_disk_log(&mut self, bitmap: &mut [u64]) -> Result<(), VmError> {
        let mut disk = self.shared.disk.lock().unwrap_or_else(|p| p.into_inner());
        let log = disk
            .as_mut()
            .and_then(|d| d.log.as_mut())
            .ok_or(VmError::Request {
                op: "sync_disk_log",
                message: "no disk, or logging is off".into(),
            })?;
        for (o, w) in bitmap.iter_mut().zip(log.words_mut().iter_mut()) {
            *o |= std::mem::take(w);
        }
        Ok(())
    }

    fn sync_dirty_log(&mut self, bitmap: &mut [u64]) -> Result<(), VmError> {
        let mut log = self.shared.log.lock().unwrap_or_else(|p| p.into_inner());
        let log = log.as_mut().ok_or(VmError::Request {
            op: "sync_dirty_log",
            message: "logging is off".into(),
        })?;
        for (o, w) in bitmap.iter_mut().zip(log.words_mut().iter_mut()) {
            *o |= std::mem::take(w);
        }
        Ok(())
    }

    fn stop_dirty_log(&mut self) -> Result<(), VmError> {
        *self.shared.log.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(d) = self
            .shared
            .disk
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            d.log = None;
        }
        Ok(())
    }

    fn peek_dirty_log(&mut self, bitmap: &mut [u64]) -> Result<(), VmError> {
        let mut log = self.shared.log.lock().unwrap_or_else(|p| p.into_inner());
        let log = log.as_mut().ok_or(VmError::Request {
            op: "peek_dirty_log",
            message: "logging is off".into(),
        })?;
        for (o, w) in bitmap.iter_mut().zip(log.words_mut().iter()) {
            *o |= *w;
        }
        Ok(())
    }

    fn pause(&mut self) -> Result<VmState, VmError> {
        self.stop_guest();
        let progress = self.progress();
        Ok(VmState {
            blob: progress.to_le_bytes().to_vec(),
            progress,
        })
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.resumes += 1;
        self.resumed_at = Some(Instant::now());
        // As ferry-vmm: a VM that stays here runs at full speed again.
        self.shared.throttle_pct.store(0, Ordering::SeqCst);
        if self.writer.is_none() {
            self.start_guest();
        }
        Ok(())
    }

    fn hand_off(&mut self, epoch: u64) -> Result<(), VmError> {
        self.stop_guest();
        self.handed_off = Some(epoch);
        Ok(())
    }

    fn can_rollback(&self) -> bool {
        true
    }

    fn rollback(&mut self, state: &VmState) -> Result<(), VmError> {
        if self.writer.is_some() {
            return Err(VmError::Request {
                op: "rollback",
                message: "the VM runs".into(),
            });
        }
        self.rolled_back = Some(state.clone());
        Ok(())
    }

    fn set_throttle(&mut self, percent: u8) -> Result<(), VmError> {
        if percent > THROTTLE_PCT_MAX {
            return Err(VmError::Request {
                op: "throttle",
                message: format!("throttle of {percent}% is over {THROTTLE_PCT_MAX}%"),
            });
        }
        self.shared.throttle_pct.store(percent, Ordering::SeqCst);
        self.throttles.push(percent);
        Ok(())
    }
}

/// What a [`MemTargetVm`] was asked to do.
#[derive(Debug, Default, Clone)]
pub struct TargetLog {
    /// The state it restored.
    pub restored: Option<VmState>,
    /// The epoch it runs with.
    pub running: Option<u64>,
    /// Why it was aborted.
    pub aborted: Option<String>,
    /// Post-copy: the pages its guest wrote while pages were still moving,
    /// with the version it wrote last (the test checks no late copy
    /// overwrote them).
    pub postcopy_writes: std::collections::HashMap<u64, u64>,
    /// Post-copy: pages its guest read or wrote before post-copy ended.
    pub postcopy_touches: u64,
    /// Post-copy: every write of its guest, (page, version), in order; the
    /// guest's progress counter is its length.
    pub writes: Vec<(u64, u64)>,
    /// Post-copy: the progress counter at each checkpoint.
    pub checkpoints: Vec<u64>,
    /// When its guest was stopped for good (fenced); nothing was written
    /// after.
    pub fenced: Option<Instant>,
    /// Set by a test: the VMM "dies" (its guest stops, `check` fails).
    pub die: bool,
    /// Set by a test: the target daemon died. The VMM then dies too if its
    /// guest runs under a lease (checkpoints on), as ferry-vmm exits when
    /// its link closes then; otherwise it keeps running. A dead daemon asks
    /// nothing more: `run` fails from then on.
    pub ferryd_died: bool,
    /// The VMM's process, as a test sees it from outside.
    pub vmm: Option<VmmHandle>,
}

/// A [`MemTargetVm`]'s process as a test sees it from outside (as a daemon
/// sees a VMM by its pid): whether its guest runs under a lease, and a way
/// to kill it.
#[derive(Clone)]
pub struct VmmHandle {
    ctl: Arc<GuestCtl>,
}

impl std::fmt::Debug for VmmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmHandle")
            .field("leased", &self.leased())
            .finish()
    }
}

impl VmmHandle {
    /// Whether its guest runs under a lease (checkpoints on).
    pub fn leased(&self) -> bool {
        self.ctl
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dirty
            .is_some()
    }

    /// Kills it: its guest stops for good (`log.fenced` says when). Call
    /// without holding `log`.
    pub fn kill(&self, log: &Mutex<TargetLog>) {
        self.ctl
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fenced = true;
        self.ctl.resumed.notify_all();
        log.lock()
            .unwrap_or_else(|p| p.into_inner())
            .fenced
            .get_or_insert_with(Instant::now);
    }
}

/// A target VM that records requests; shares its log with the test.
///
/// For post-copy it registers its own mapping of guest memory (the "VMM's"
/// view, separate from the engine's) with a userfaultfd, and its guest, a
/// thread, reads and rewrites pages through it from `run` on: every access
/// to a page that has not arrived blocks in the kernel until the engine
/// maps it, as a vCPU would.
pub struct MemTargetVm {
    view: Arc<GuestMem>,
    /// The shared log.
    pub log: Arc<Mutex<TargetLog>>,
    /// How long `run` takes (a slow VMM start, for tests of the COMMIT window).
    pub run_delay: Duration,
    userfault: Option<userfaultfd::Uffd>,
    guest: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    /// Pauses and stops of the post-copy guest, and its dirty log.
    ctl: Arc<GuestCtl>,
}

/// The post-copy guest's controls: a write happens only with `state`
/// locked, not paused and not stopped (a write never faults: its page was
/// read first), so that pausing or fencing it never waits for a fault.
#[derive(Default)]
struct GuestCtl {
    state: Mutex<CtlState>,
    resumed: std::sync::Condvar,
}

#[derive(Default)]
struct CtlState {
    paused: bool,
    fenced: bool,
    /// Checkpoints on: the pages written since the last checkpoint.
    dirty: Option<DirtyBitmap>,
}

impl MemTargetVm {
    /// A target over `mem`; `log` tells the test what happened.
    pub fn new(mem: &GuestMem, log: Arc<Mutex<TargetLog>>) -> Self {
        let fd = mem.memfd().try_clone_to_owned().expect("dup memfd");
        let view = GuestMem::from_memfd(fd, &mem.region_specs()).expect("map memfd");
        let ctl: Arc<GuestCtl> = Arc::default();
        log.lock().unwrap_or_else(|p| p.into_inner()).vmm = Some(VmmHandle { ctl: ctl.clone() });
        MemTargetVm {
            view: Arc::new(view),
            log,
            run_delay: Duration::ZERO,
            userfault: None,
            guest: None,
            ctl,
        }
    }

    fn stop_guest(&mut self) {
        if let Some((stop, t)) = self.guest.take() {
            stop.store(true, Ordering::Release);
            // A guest blocked on a page that never comes must be woken:
            // closing our descriptor does not do it while the engine still
            // holds its copy of the userfaultfd (a VMM found dead while
            // post-copy waits for the source), so unregister the memory,
            // which wakes every thread waiting on it (its access then
            // sees plain shared memory), as a dead VMM's exit would end them.
            if let Some(uffd) = self.userfault.take() {
                for (ptr, len) in ferry_transport::MappedMemory::ranges(&*self.view) {
                    let _ = uffd.unregister(ptr.cast(), len);
                    let _ = uffd.wake(ptr.cast(), len);
                }
            }
            let _ = t.join();
        }
    }
}

impl Drop for MemTargetVm {
    fn drop(&mut self) {
        self.stop_guest();
    }
}

/// The post-copy guest of [`MemTargetVm`]: touches pages at random, reading
/// most and rewriting every fourth with a new version, until stopped.
fn postcopy_guest(view: &GuestMem, log: &Mutex<TargetLog>, stop: &AtomicBool, ctl: &GuestCtl) {
    let pages = view.pages();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut version = 1_000_000;
    let mut word = [0u8; 8];
    while !stop.load(Ordering::Acquire) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = x % pages;
        // Every access reads first: the fault (if any) happens here.
        view.page(PageIndex(page))
            .expect("in range")
            .read_slice(&mut word, 0)
            .expect("page read");
        if x.is_multiple_of(4) {
            let mut st = ctl.state.lock().unwrap_or_else(|p| p.into_inner());
            while st.paused && !st.fenced {
                st = ctl.resumed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.fenced || stop.load(Ordering::Acquire) {
                return;
            }
            version += 1;
            write_page(view, page, version);
            if let Some(d) = st.dirty.as_mut() {
                d.set(page);
            }
            let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
            l.postcopy_writes.insert(page, version);
            l.writes.push((page, version));
        }
        log.lock()
            .unwrap_or_else(|p| p.into_inner())
            .postcopy_touches += 1;
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// CRC32C over all of guest memory (a test hash).
pub fn mem_crc(mem: &GuestMem) -> u32 {
    let mut crc = 0;
    let mut buf = vec![0u8; PAGE_SIZE];
    for p in 0..mem.pages() {
        mem.page(PageIndex(p))
            .expect("in range")
            .read_slice(&mut buf, 0)
            .expect("page read");
        crc = crc32c::crc32c_append(crc, &buf);
    }
    crc
}

impl TargetVm for MemTargetVm {
    fn restore(&mut self, state: &VmState) -> Result<VerifyReport, VmError> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).restored = Some(state.clone());
        let start = Instant::now();
        let mem_hash = format!("{:08x}", mem_crc(&self.view));
        let verify_ms = start.elapsed().as_millis() as u64;
        Ok(VerifyReport {
            checked: true,
            mem_hash,
            verify_ms,
            ..VerifyReport::default()
        })
    }

    fn run(&mut self, epoch: u64) -> Result<(), VmError> {
        std::thread::sleep(self.run_delay);
        {
            // The guest's order: the control state, then the log.
            let fenced = self
                .ctl
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .fenced;
            let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            if log.ferryd_died || fenced {
                return Err(VmError::Request {
                    op: "run",
                    message: "the VMM is gone, or the daemon asking is dead (test)".into(),
                });
            }
            log.running = Some(epoch);
        }
        if self.userfault.is_some() {
            let stop = Arc::new(AtomicBool::new(false));
            let (view, log, s, ctl) = (
                self.view.clone(),
                self.log.clone(),
                stop.clone(),
                self.ctl.clone(),
            );
            let t = std::thread::Builder::new()
                .name("memvm-pc-guest".into())
                .spawn(move || postcopy_guest(&view, &log, &s, &ctl))
                .expect("spawning a thread");
            self.guest = Some((stop, t));
        }
        Ok(())
    }

    fn restore_postcopy(&mut self, state: &VmState) -> Result<crate::vm::Userfault, VmError> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        use userfaultfd::{FeatureFlags, RegisterMode, UffdBuilder};
        let err = |message: String| VmError::Request {
            op: "restore_postcopy",
            message,
        };
        self.log.lock().unwrap_or_else(|p| p.into_inner()).restored = Some(state.clone());
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(true)
            .require_features(FeatureFlags::from_bits_retain(1 << 10)) // MINOR_SHMEM
            .create()
            .map_err(|e| err(format!("userfaultfd: {e:?}")))?;
        let ranges = ferry_transport::MappedMemory::ranges(&*self.view);
        for &(ptr, len) in &ranges {
            uffd.register_with_mode(ptr.cast(), len, RegisterMode::MISSING | RegisterMode::MINOR)
                .map_err(|e| err(format!("registering: {e:?}")))?;
            // SAFETY: exactly one of our live shared mappings; for shared
            // memory MADV_DONTNEED drops page-table entries only.
            if unsafe { libc::madvise(ptr.cast(), len, libc::MADV_DONTNEED) } != 0 {
                return Err(err(format!("madvise: {}", std::io::Error::last_os_error())));
            }
        }
        // SAFETY: dup of a descriptor we own; the copy is owned by the result.
        let dup = unsafe { libc::dup(uffd.as_raw_fd()) };
        if dup < 0 {
            return Err(err(format!("dup: {}", std::io::Error::last_os_error())));
        }
        self.userfault = Some(uffd);
        Ok(crate::vm::Userfault {
            // SAFETY: `dup` returned a fresh descriptor nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(dup) },
            host_addrs: ranges.iter().map(|r| r.0 as u64).collect(),
        })
    }

    fn postcopy_done(&mut self) -> Result<VerifyReport, VmError> {
        self.stop_guest();
        self.userfault = None;
        Ok(VerifyReport {
            checked: true,
            mem_hash: format!("{:08x}", mem_crc(&self.view)),
            ..VerifyReport::default()
        })
    }

    fn check(&mut self) -> Result<(), VmError> {
        let (leased, fenced) = {
            let st = self.ctl.state.lock().unwrap_or_else(|p| p.into_inner());
            (st.dirty.is_some(), st.fenced)
        };
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        // A fenced VMM is gone, as a killed process is.
        let dies = log.die || fenced || (log.ferryd_died && leased);
        drop(log);
        if dies {
            self.stop_guest();
            return Err(VmError::Request {
                op: "check",
                message: "the VMM died (test)".into(),
            });
        }
        Ok(())
    }

    fn start_checkpoints(&mut self) -> Result<bool, VmError> {
        self.ctl
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dirty = Some(DirtyBitmap::new(self.view.pages()));
        Ok(true)
    }

    fn checkpoint_begin(&mut self, bitmap: &mut [u64]) -> Result<VmState, VmError> {
        let mut st = self.ctl.state.lock().unwrap_or_else(|p| p.into_inner());
        st.paused = true;
        if let Some(d) = st.dirty.as_mut() {
            for (o, w) in bitmap.iter_mut().zip(d.words_mut().iter_mut()) {
                *o |= std::mem::take(w);
            }
        }
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let progress = log.writes.len() as u64;
        log.checkpoints.push(progress);
        Ok(VmState {
            blob: progress.to_le_bytes().to_vec(),
            progress,
        })
    }

    fn checkpoint_end(&mut self) -> Result<(), VmError> {
        self.ctl
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .paused = false;
        self.ctl.resumed.notify_all();
        Ok(())
    }

    fn stop_checkpoints(&mut self) -> Result<(), VmError> {
        self.ctl
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dirty = None;
        Ok(())
    }

    fn fencer(&mut self) -> Option<crate::vm::Fencer> {
        let (vmm, log) = (
            VmmHandle {
                ctl: self.ctl.clone(),
            },
            self.log.clone(),
        );
        Some(Box::new(move || {
            vmm.kill(&log);
            Ok(())
        }))
    }

    fn abort(&mut self, reason: &str) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).aborted = Some(reason.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{RegionSpec, VmSpec};

    fn mem(mib: u64) -> Arc<GuestMem> {
        let spec = VmSpec {
            name: "t".into(),
            regions: vec![RegionSpec {
                gpa: 0,
                size: mib << 20,
                memfd_offset: 0,
            }],
            vcpus: 1,
            vmm_config: serde_json::Value::Null,
            disk: None,
        };
        Arc::new(GuestMem::create(&spec).expect("memfd"))
    }

    /// Pages the guest writes in `window`.
    fn rate(vm: &MemSourceVm, window: Duration) -> u64 {
        let p0 = vm.progress();
        std::thread::sleep(window);
        vm.progress() - p0
    }

    #[test]
    fn throttle_slows_the_guest_and_resume_ends_it() {
        let mut vm = MemSourceVm::new(mem(4), 20_000, 1);
        let window = Duration::from_millis(500);
        std::thread::sleep(Duration::from_millis(50));
        let full = rate(&vm, window);
        vm.set_throttle(75).unwrap();
        assert_eq!(vm.throttle_pct(), 75);
        std::thread::sleep(Duration::from_millis(20));
        let slow = rate(&vm, window);
        // 10000 pages at full speed, 2500 at 75%: generous margins.
        assert!(full > 5_000, "full speed wrote {full} pages");
        assert!(slow * 10 < full * 5, "75% throttle: {slow} vs {full} pages");
        assert!(vm.set_throttle(100).is_err());
        assert_eq!(vm.throttle_pct(), 75, "a refused value changes nothing");
        vm.pause().unwrap();
        vm.resume().unwrap();
        assert_eq!(vm.throttle_pct(), 0, "resume runs at full speed");
        assert_eq!(vm.throttles, [75]);
        vm.set_throttle(0).unwrap();
        assert_eq!(vm.throttles, [75, 0]);
    }
}
