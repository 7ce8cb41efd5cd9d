//! Batched 4 KiB block I/O on an io_uring.
//!
//! The source reads batches of blocks of the VM's raw image to send; the target
//! writes the batches it receives into a new sparse image. A [`DiskReader`] or
//! [`DiskWriter`] owns one ring, one thread that alone touches the ring, and a
//! pool of [`BlockBuf`]s registered with the ring, so `READ_FIXED` /
//! `WRITE_FIXED` skip pinning pages for every I/O. The image is reopened with
//! `O_DIRECT` where the file system allows it, so the page cache neither holds
//! a second copy of the disk nor competes with guest RAM.
//!
//! ```text
//!  callers (any thread)                       ring thread ("ferry-disk-rd" / "ferry-disk-wr")
//!  ────────────────────                       ──────────────────────────────────────────────
//!  pool ──BlockBuf──► read() / write()
//!                        │ Request ──channel──► take_requests: one SQE per contiguous run
//!                        │                                    ▼
//!                        └ eventfd += 1         pending SQEs ──► SQ (<= depth I/Os in flight)
//!                              │                                    ▼
//!                              └─► POLL_ADD CQE ──► submit_and_wait(1) ◄── I/O CQEs
//!                                                                   ▼
//!                                   run done │ short: resubmit the rest │ error: fail all
//!                                                                   ▼ every run of a batch done
//!  Recycler::give ◄── deliver(Batch)  (reader)          pool ◄── BlockBuf  (writer)
//! ```
//!
//! # How the ring thread waits
//!
//! It sleeps in exactly one place: `io_uring_enter` waiting for one
//! completion. A one-shot `POLL_ADD` on an eventfd stays armed in the ring;
//! a requester sends its batch on the channel and then adds 1 to the eventfd,
//! so a new request completes that poll and wakes the thread just as a
//! finished I/O does. Idle (only the poll armed) or busy (I/O in flight), the
//! wait is the same: no timeouts, no spinning. The thread resets the eventfd
//! when it reaps the poll and drains the channel after that, so a request sent
//! after a drain always leaves the counter non-zero and the re-armed poll
//! fires at once: no wake-up is lost.
//!
//! # A batch's life
//!
//! Queued (channel) → Submitting (runs pending) → In flight → Done (delivered,
//! or its buffer back in the pool). A run's completion is one of: all bytes
//! (the run is done), fewer (the rest is resubmitted: a short transfer is
//! retried, never ignored), zero (end of file: an error, since the image is a
//! whole number of blocks and the caller asked for a block past its end), or
//! a negative errno (an error). The first error fails the whole reader or
//! writer: pending runs are dropped, in-flight ones cancelled or awaited, and
//! every later call returns that error.
//!
//! # Memory
//!
//! A pool's buffers are one anonymous mapping. The kernel does fixed-buffer
//! I/O to the pages it pinned at registration, not through our addresses, so
//! even I/O left in flight when a thread gives up waiting can never write into
//! memory that was handed out again: after `munmap` the pinned pages live on
//! until the ring lets go of them. Each [`BlockBuf`] keeps the mapping alive,
//! so a buffer may outlive its reader or writer (it is then unregistered and
//! only good for reading what it holds).

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender, TryRecvError};
use io_uring::{opcode, squeue, types, IoUring, Probe};

/// Bytes per disk block: the unit of every read and write here.
pub const BLOCK_BYTES: usize = 4096;
const _: () = assert!(BLOCK_BYTES as u64 == crate::link::DISK_BLOCK_BYTES);

/// Blocks per batch (= one wire frame's worth, 64 x 4 KiB = 256 KiB).
pub const BATCH_BLOCKS_MAX: usize = 64;

/// Bytes of one [`BlockBuf`]: 64 blocks x 4 KiB = 256 KiB.
pub const BUF_BYTES: usize = BLOCK_BYTES * BATCH_BLOCKS_MAX;

/// Smallest queue depth we run with.
pub const QUEUE_DEPTH_MIN: u32 = 32;

/// Largest queue depth: 1024 I/Os of up to 256 KiB is 256 MiB in flight, far
/// more than a device needs to stay busy.
pub const QUEUE_DEPTH_MAX: u32 = 1024;

/// Most buffers one reader or writer registers: 1024 x 256 KiB = 256 MiB of
/// pinned memory (the kernel's own cap is 16384 buffers).
pub const BUFFERS_MAX: usize = 1024;

/// Buffers to register for a queue depth. A batch of contiguous blocks is one
/// SQE, so keeping `depth` SQEs in flight takes `depth` buffers in the ring,
/// and as many again are in the consumer's hands (encoders and sockets on the
/// source, frame decoding on the target): at the minimum depth that is
/// 2 x 32 x 256 KiB = 16 MiB pinned.
pub const fn buffers_for_depth(depth: u32) -> usize {
    2 * depth as usize
}

/// How long stopping (or failing) waits for I/O still in flight. A local disk
/// completes a 256 KiB I/O in milliseconds; 5 s rides out a stalled device
/// without hanging a migration's teardown. What is still in flight then is
/// left to the kernel (see the module docs on memory).
const STOP_WAIT: Duration = Duration::from_secs(5);

/// How long `stop` waits for the ring thread before leaving it behind:
/// [`STOP_WAIT`] plus 2 s for a `deliver` call that is in progress.
const JOIN_WAIT: Duration = Duration::from_secs(7);

/// Longest single wait while winding down, so the deadline gets checked.
const WIND_DOWN_TICK: Duration = Duration::from_millis(100);

/// `io_uring_enter` failing with EAGAIN/EBUSY is retried 1 ms apart: 10,000
/// retries are 10 s of a kernel short of memory, which we call a failure.
const ENTER_BUSY_RETRIES: u32 = 10_000;

/// `user_data` of the eventfd poll. I/O entries use `buffer << 8 | run`,
/// below 2^18 since buffers <= [`BUFFERS_MAX`] and runs < 64.
const POLL_TAG: u64 = u64::MAX;

/// `user_data` of the cancel-everything entry sent when winding down.
const CANCEL_TAG: u64 = u64::MAX - 1;

/// The anonymous mapping behind a pool's buffers.
///
/// A mapping rather than the allocator: the kernel pins the pages of a
/// registered buffer and does its I/O to those pages. After `munmap` they stay
/// alive for the kernel until the ring lets go, and the addresses can only come
/// back as fresh pages; memory that `free` gave to the next `malloc` would
/// instead be shared with a late kernel write.
struct Region {
    base: NonNull<u8>,
    buffers: usize,
}

// SAFETY: a Region is an owned mapping. Its bytes are reached only through
// BlockBufs, each of which owns one slot exclusively (see BlockBuf::range_ptr).
unsafe impl Send for Region {}
// SAFETY: as above; &Region gives out only the base address and the size.
unsafe impl Sync for Region {}

impl Region {
    fn new(buffers: usize) -> io::Result<Arc<Self>> {
        assert!(buffers > 0 && buffers <= BUFFERS_MAX, "{buffers} buffers");
        // SAFETY: a new private anonymous mapping at an address the kernel
        // picks; no existing memory is touched. The result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                buffers * BUF_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Arc::new(Self { base, buffers }))
    }

    /// Start of buffer `index`; mmap aligns it to the page, so to 4096.
    fn buf_ptr(&self, index: u16) -> *mut u8 {
        assert!(
            usize::from(index) < self.buffers,
            "buffer {index} of {}",
            self.buffers
        );
        self.base
            .as_ptr()
            .wrapping_add(usize::from(index) * BUF_BYTES)
    }

    fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.buffers)
            .map(|i| libc::iovec {
                iov_base: self.buf_ptr(i as u16).cast(),
                iov_len: BUF_BYTES,
            })
            .collect()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: base and length are exactly the mapping made in new(). Every
        // BlockBuf holds an Arc, so none is left and no reference into the
        // mapping exists. Pages the kernel still pins stay valid for it.
        let rc = unsafe { libc::munmap(self.base.as_ptr().cast(), self.buffers * BUF_BYTES) };
        debug_assert_eq!(rc, 0, "munmap: {}", io::Error::last_os_error());
    }
}

/// A 4096-byte-aligned buffer of [`BATCH_BLOCKS_MAX`] blocks, registered with
/// the ring of the reader or writer whose pool it came from (it knows its
/// buffer index for `READ_FIXED` / `WRITE_FIXED`).
///
/// `Send`, not `Clone`: exactly one `BlockBuf` exists per slot, and while the
/// kernel does I/O to the slot the ring thread holds it, so a `&[u8]` from
/// [`block`](Self::block) never overlaps a kernel access. The memory stays
/// valid as long as the `BlockBuf` lives, even past its reader or writer.
pub struct BlockBuf {
    region: Arc<Region>,
    index: u16,
}

impl BlockBuf {
    /// Block `i` (< [`BATCH_BLOCKS_MAX`]) of the buffer: [`BLOCK_BYTES`] bytes.
    pub fn block(&self, i: usize) -> &[u8] {
        self.blocks_at(i, 1)
    }

    /// Block `i` (< [`BATCH_BLOCKS_MAX`]) of the buffer, to fill.
    pub fn block_mut(&mut self, i: usize) -> &mut [u8] {
        self.blocks_at_mut(i, 1)
    }

    /// The first `n` (<= [`BATCH_BLOCKS_MAX`]) blocks as one slice.
    pub fn blocks(&self, n: usize) -> &[u8] {
        self.blocks_at(0, n)
    }

    /// The first `n` (<= [`BATCH_BLOCKS_MAX`]) blocks as one slice, to fill.
    pub fn blocks_mut(&mut self, n: usize) -> &mut [u8] {
        self.blocks_at_mut(0, n)
    }

    /// Start of blocks `first..first + n`, checked to lie inside this buffer.
    fn range_ptr(&self, first: usize, n: usize) -> *mut u8 {
        assert!(
            first
                .checked_add(n)
                .is_some_and(|end| end <= BATCH_BLOCKS_MAX),
            "blocks {first}..+{n} of a {BATCH_BLOCKS_MAX}-block buffer"
        );
        self.region
            .buf_ptr(self.index)
            .wrapping_add(first * BLOCK_BYTES)
    }

    fn blocks_at(&self, first: usize, n: usize) -> &[u8] {
        let p = self.range_ptr(first, n);
        // SAFETY: range_ptr checked that the n blocks lie inside this buffer's
        // slot of the mapping, which the Arc keeps mapped and which mmap
        // zero-filled (so the bytes are initialised). This BlockBuf is the
        // only handle to the slot and the kernel touches the slot only while
        // the ring thread owns it, so nothing writes it during &self.
        unsafe { std::slice::from_raw_parts(p, n * BLOCK_BYTES) }
    }

    fn blocks_at_mut(&mut self, first: usize, n: usize) -> &mut [u8] {
        let p = self.range_ptr(first, n);
        // SAFETY: as in blocks_at; &mut self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(p, n * BLOCK_BYTES) }
    }
}

impl fmt::Debug for BlockBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockBuf")
            .field("index", &self.index)
            .finish()
    }
}

/// Blocks read (source) or to write (target): `blocks` ascend, are unique and
/// number 1..=[`BATCH_BLOCKS_MAX`]; `buf.block(i)` holds `blocks[i]`.
#[derive(Debug)]
pub struct Batch {
    /// The migration stream the blocks belong to (1-based on the target).
    pub stream: u16,
    /// Block numbers, ascending and unique.
    pub blocks: Vec<u64>,
    /// The blocks' contents, `buf.block(i)` for `blocks[i]`.
    pub buf: BlockBuf,
}

/// Hands buffers back to a reader's or writer's pool from any thread.
#[derive(Clone)]
pub struct Recycler {
    pool: Sender<BlockBuf>,
    region: Arc<Region>,
}

impl Recycler {
    /// Returns `buf` to the pool it came from. Panics if it came from another
    /// reader's or writer's pool (its index would name the wrong buffer).
    pub fn give(&self, buf: BlockBuf) {
        assert!(
            Arc::ptr_eq(&buf.region, &self.region),
            "buffer {} given to another pool",
            buf.index
        );
        // Full cannot happen: the capacity is the number of buffers and each
        // exists once. Disconnected means the owner is gone: just drop it.
        let _ = self.pool.try_send(buf);
    }
}

impl fmt::Debug for Recycler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recycler")
            .field("free", &self.pool.len())
            .finish()
    }
}

/// Checks a batch's block list against the image size.
fn check_blocks(blocks: &[u64], blocks_total: u64) -> Result<(), String> {
    if blocks.is_empty() || blocks.len() > BATCH_BLOCKS_MAX {
        return Err(format!(
            "a batch holds 1..={BATCH_BLOCKS_MAX} blocks, not {}",
            blocks.len()
        ));
    }
    if let Some(w) = blocks.windows(2).find(|w| w[0] >= w[1]) {
        return Err(format!(
            "a batch's blocks must ascend without repeats: {} then {}",
            w[0], w[1]
        ));
    }
    let last = blocks[blocks.len() - 1];
    if last >= blocks_total {
        return Err(format!(
            "block {last} is past the image's {blocks_total} blocks"
        ));
    }
    Ok(())
}

/// Blocks `first..first + count` of a batch, contiguous on disk: one SQE.
#[derive(Debug)]
struct Run {
    first: usize,
    count: usize,
    /// Bytes transferred so far; a short transfer resubmits the rest.
    done_bytes: usize,
}

impl Run {
    fn bytes(&self) -> usize {
        self.count * BLOCK_BYTES
    }
}

/// Splits a checked block list into runs of consecutive blocks.
fn runs(blocks: &[u64]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (i, &b) in blocks.iter().enumerate() {
        match out.last_mut() {
            Some(r) if blocks[r.first] + r.count as u64 == b => r.count += 1,
            _ => out.push(Run {
                first: i,
                count: 1,
                done_bytes: 0,
            }),
        }
    }
    out
}

/// The entry for what is left of run `r` of the batch in buffer `index`.
fn run_entry(
    op: Op,
    fd: types::Fd,
    region: &Region,
    index: u16,
    r: usize,
    run: &Run,
    blocks: &[u64],
) -> squeue::Entry {
    debug_assert!(run.done_bytes < run.bytes());
    let skip = run.first * BLOCK_BYTES + run.done_bytes;
    let ptr = region.buf_ptr(index).wrapping_add(skip);
    // At most one buffer, 256 KiB.
    let len = (run.bytes() - run.done_bytes) as u32;
    let offset = blocks[run.first] * BLOCK_BYTES as u64 + run.done_bytes as u64;
    let entry = match op {
        Op::Read => opcode::ReadFixed::new(fd, ptr, len, index)
            .offset(offset)
            .build(),
        Op::Write => opcode::WriteFixed::new(fd, ptr.cast_const(), len, index)
            .offset(offset)
            .build(),
    };
    entry.user_data((u64::from(index) << 8) | r as u64)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

impl Op {
    fn what(self) -> &'static str {
        match self {
            Op::Read => "disk reader",
            Op::Write => "disk writer",
        }
    }
    fn verb(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
        }
    }
    fn thread_name(self) -> &'static str {
        match self {
            Op::Read => "ferry-disk-rd",
            Op::Write => "ferry-disk-wr",
        }
    }
}

/// Whether to try O_DIRECT; tests can make the file system "refuse" it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DirectMode {
    Try,
    #[cfg(test)]
    Refused,
}

/// Reopens `file` through /proc/self/fd: a new open file description, so the
/// caller's offset and flags stay as they are. O_DIRECT if the file system
/// allows it, else buffered; returns whether O_DIRECT is in use.
fn reopen(file: &File, op: Op, mode: DirectMode) -> io::Result<(File, bool)> {
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let open = |flags: i32| {
        OpenOptions::new()
            .read(true)
            .write(op == Op::Write)
            .custom_flags(flags)
            .open(&path)
    };
    let direct = match mode {
        DirectMode::Try => open(libc::O_DIRECT).and_then(|f| probe_direct(&f).map(|()| f)),
        #[cfg(test)]
        DirectMode::Refused => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    match direct {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::info!(
                "{}: the file system refuses O_DIRECT ({e}); using buffered I/O",
                op.what()
            );
            let f = open(0).map_err(|e| ctx(e, format!("{}: reopening {path}", op.what())))?;
            Ok((f, false))
        }
        Err(e) => Err(ctx(
            e,
            format!("{}: reopening {path} with O_DIRECT", op.what()),
        )),
    }
}

/// A second, buffered open of `file` (already our own reopen): for reads of
/// blocks the VMM has just written through the page cache, which an O_DIRECT
/// read would first have to write back to the device.
fn reopen_buffered(file: &File, op: Op) -> io::Result<File> {
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    if op == Op::Write {
        o.write(true);
    }
    o.open(&path)
        .map_err(|e| ctx(e, format!("{}: reopening {path} buffered", op.what())))
}

/// Some file systems accept O_DIRECT at open and refuse it (EINVAL) at the
/// first I/O; one aligned read of block 0 finds out before the ring does.
/// Other errors are left for the ring's reads to report with a block number.
fn probe_direct(f: &File) -> io::Result<()> {
    #[repr(C, align(4096))]
    struct Aligned([u8; BLOCK_BYTES]);
    if f.metadata()?.len() < BLOCK_BYTES as u64 {
        return Ok(());
    }
    let mut block = Box::new(Aligned([0; BLOCK_BYTES]));
    match f.read_at(&mut block.0, 0) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Err(e),
        _ => Ok(()),
    }
}

/// Adds context to an io::Error, keeping its kind.
fn ctx(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A new ring for `depth` I/Os, refusing kernels that lack what we use.
fn open_ring(op: Op, depth: u32) -> io::Result<IoUring> {
    let what = op.what();
    // Room for `depth` I/Os, the eventfd poll and one cancel. The kernel makes
    // the CQ twice the SQ, so completions can never overflow.
    let entries = (depth + 2).next_power_of_two();
    let ring = IoUring::new(entries).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{what}: this kernel has no io_uring ({e})"),
        ),
        Some(libc::EPERM) => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{what}: io_uring is disabled here (sysctl kernel.io_uring_disabled, or a \
                 seccomp filter): {e}"
            ),
        ),
        _ => ctx(e, format!("{what}: io_uring_setup with {entries} entries")),
    })?;
    let unsupported = |lacks: &str| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{what}: this kernel's io_uring lacks {lacks}"),
        )
    };
    if !ring.params().is_feature_ext_arg() {
        return Err(unsupported("IORING_FEAT_EXT_ARG (Linux 5.11)"));
    }
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| ctx(e, format!("{what}: probing io_uring opcodes (Linux 5.6+)")))?;
    let io = match op {
        Op::Read => (opcode::ReadFixed::CODE, "READ_FIXED"),
        Op::Write => (opcode::WriteFixed::CODE, "WRITE_FIXED"),
    };
    for (code, name) in [
        io,
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ] {
        if !probe.is_supported(code) {
            return Err(unsupported(name));
        }
    }
    Ok(ring)
}

/// An eventfd that requesters bump after queueing a request.
struct Wake(File);

impl Wake {
    fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        Ok(Self(File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    fn notify(&self) {
        // Can fail only with EAGAIN, with the counter near 2^64: a wake-up is
        // pending then anyway.
        let _ = (&self.0).write(&1u64.to_ne_bytes());
    }

    fn reset(&self) {
        // EAGAIN means it was zero already.
        let _ = (&self.0).read(&mut [0u8; 8]);
    }
}

/// What requesters and the ring thread share.
struct Shared {
    what: &'static str,
    progress: Mutex<Progress>,
    changed: Condvar,
    in_flight_max: AtomicU32,
}

/// Batch counts per slot (the reader uses slot 0, the writer slot = stream).
struct Progress {
    queued: Vec<u64>,
    done: Vec<u64>,
    error: Option<String>,
    exited: bool,
}

impl Progress {
    fn health(&self, what: &str) -> Result<(), String> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.exited {
            return Err(format!("the {what} has stopped"));
        }
        Ok(())
    }
}

impl Shared {
    fn new(what: &'static str, slots: usize) -> Self {
        Self {
            what,
            progress: Mutex::new(Progress {
                queued: vec![0; slots],
                done: vec![0; slots],
                error: None,
                exited: false,
            }),
            changed: Condvar::new(),
            in_flight_max: AtomicU32::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check(&self) -> Result<(), String> {
        self.lock().health(self.what)
    }

    /// Records the first error; later calls return it.
    fn fail(&self, msg: String) {
        let mut p = self.lock();
        if p.error.is_none() {
            tracing::warn!("{} stopping: {msg}", self.what);
            p.error = Some(msg);
        }
        drop(p);
        self.changed.notify_all();
    }

    fn finish(&self, slot: usize) {
        self.lock().done[slot] += 1;
        self.changed.notify_all();
    }

    /// Waits until every batch queued so far in `slots` is done.
    fn wait(&self, slots: Range<usize>, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now().checked_add(timeout);
        let mut p = self.lock();
        let targets = p.queued[slots.clone()].to_vec();
        loop {
            if let Some(e) = &p.error {
                return Err(e.clone());
            }
            let left: u64 = targets
                .iter()
                .zip(&p.done[slots.clone()])
                .map(|(t, d)| t.saturating_sub(*d))
                .sum();
            if left == 0 {
                return Ok(());
            }
            p.health(self.what)?;
            let wait = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if wait.is_zero() {
                return Err(format!(
                    "{}: timed out after {timeout:?} with {left} batches not done",
                    self.what
                ));
            }
            p = self
                .changed
                .wait_timeout(p, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

enum Request {
    /// A batch, and whether to go through the page cache (the reader's
    /// second, buffered descriptor) instead of O_DIRECT.
    Io(Batch, bool),
    Stop,
}

/// The reader's consumer of completed batches.
type Deliver = Box<dyn FnMut(Batch) -> Result<(), String> + Send>;

/// Where a done batch goes.
enum Sink {
    /// Reader: to the caller's callback.
    Deliver(Deliver),
    /// Writer: its buffer back to the pool.
    Pool(Sender<BlockBuf>),
}

/// A batch whose runs are pending or in flight.
struct InFlight {
    batch: Batch,
    /// Through the buffered descriptor.
    cached: bool,
    runs: Vec<Run>,
    runs_left: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Taking requests and doing I/O.
    Running,
    /// Stopped or failed: no new I/O, waiting out what is in flight.
    WindingDown,
}

/// Marks the ring thread's end, however it ends (return or panic).
struct ExitGuard {
    shared: Arc<Shared>,
    /// Dropped last: disconnects the requesters' `exited` receivers.
    _exited: Sender<()>,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let mut p = self.shared.lock();
        if std::thread::panicking() && p.error.is_none() {
            p.error = Some(format!("the {} thread panicked", self.shared.what));
        }
        p.exited = true;
        drop(p);
        self.shared.changed.notify_all();
    }
}

/// The ring thread's state.
struct Worker {
    /// First field, so dropped first: before the file and the eventfd its
    /// entries name, and before the buffers (though see [`Region`]).
    ring: IoUring,
    op: Op,
    fd: types::Fd,
    region: Arc<Region>,
    requests: Receiver<Request>,
    wake: Arc<Wake>,
    shared: Arc<Shared>,
    sink: Sink,
    depth: u32,
    /// By buffer index: the batch using that buffer, if any.
    slots: Vec<Option<InFlight>>,
    /// Entries built but not yet in the SQ (the depth was reached).
    pending: VecDeque<squeue::Entry>,
    /// Reader: batches done, to deliver after the next submit.
    ready: Vec<Batch>,
    cqes: Vec<(u64, i32)>,
    /// I/O entries pushed to the SQ whose completion was not reaped yet.
    io_in_flight: u32,
    poll_armed: bool,
    phase: Phase,
    _file: Arc<File>,
    /// The reader's buffered descriptor (its own open file description),
    /// for batches that should come from the page cache.
    fd_cached: types::Fd,
    _file_cached: Arc<File>,
    _exit: ExitGuard,
}

impl Worker {
    fn run(mut self) {
        let enter_broken = loop {
            self.take_requests();
            if self.phase == Phase::WindingDown {
                break false;
            }
            self.push_pending();
            self.arm_poll();
            // With batches to deliver, only submit (the device works on the
            // new SQEs while we deliver); otherwise sleep until a completion.
            let deliver_now = !self.ready.is_empty();
            if let Err(e) = self.enter(usize::from(!deliver_now), None) {
                self.fail(e);
                break true;
            }
            if deliver_now {
                self.deliver_ready();
            }
            self.reap();
            if self.phase == Phase::WindingDown {
                break false;
            }
        };
        if !enter_broken {
            self.wind_down();
        }
    }

    fn take_requests(&mut self) {
        while self.phase == Phase::Running {
            match self.requests.try_recv() {
                Ok(Request::Io(batch, cached)) => self.accept(batch, cached),
                Ok(Request::Stop) | Err(TryRecvError::Disconnected) => self.begin_wind_down(),
                Err(TryRecvError::Empty) => break,
            }
        }
    }

    /// Builds a batch's entries, one per run, into `pending`.
    fn accept(&mut self, batch: Batch, cached: bool) {
        assert!(
            Arc::ptr_eq(&batch.buf.region, &self.region),
            "a foreign buffer"
        );
        let index = batch.buf.index;
        let runs = runs(&batch.blocks);
        let fd = if cached { self.fd_cached } else { self.fd };
        for (r, run) in runs.iter().enumerate() {
            let entry = run_entry(self.op, fd, &self.region, index, r, run, &batch.blocks);
            self.pending.push_back(entry);
        }
        let slot = &mut self.slots[usize::from(index)];
        assert!(slot.is_none(), "buffer {index} queued twice");
        *slot = Some(InFlight {
            cached,
            runs_left: runs.len(),
            runs,
            batch,
        });
    }

    /// Moves pending entries into the SQ while fewer than `depth` are in flight.
    fn push_pending(&mut self) {
        let mut sq = self.ring.submission();
        while self.io_in_flight < self.depth {
            let Some(entry) = self.pending.front() else {
                break;
            };
            // SAFETY: the entry names a range of one registered buffer (built
            // by entry() from a checked run inside the slot) whose BlockBuf
            // sits in self.slots until this entry's completion is reaped; the
            // slot is not handed out before. The fd is self._file, which lives
            // as long as the ring (and the kernel holds its own reference for
            // in-flight requests). If the thread ever leaves I/O in flight,
            // the kernel's page pins keep its target valid (see Region).
            if unsafe { sq.push(entry) }.is_err() {
                break;
            }
            self.pending.pop_front();
            self.io_in_flight += 1;
        }
        drop(sq);
        self.shared
            .in_flight_max
            .fetch_max(self.io_in_flight, Ordering::Relaxed);
    }

    fn arm_poll(&mut self) {
        if self.poll_armed || self.phase != Phase::Running {
            return;
        }
        let fd = types::Fd(self.wake.0.as_raw_fd());
        let entry = opcode::PollAdd::new(fd, libc::POLLIN as u32)
            .build()
            .user_data(POLL_TAG);
        // SAFETY: a poll names no memory; the eventfd is held by self.wake,
        // which is dropped after the ring.
        let pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        // The SQ has room for depth + 2 entries: I/O, this poll and a cancel.
        debug_assert!(pushed, "no SQ room for the poll");
        self.poll_armed = pushed;
    }

    /// Submits the SQ and waits for `want` completions (or `timeout`).
    fn enter(&mut self, want: usize, timeout: Option<Duration>) -> Result<(), String> {
        let mut busy = 0u32;
        loop {
            let res = match timeout {
                None => self.ring.submit_and_wait(want),
                Some(t) => {
                    let ts = types::Timespec::from(t);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.ring.submitter().submit_with_args(want, &args)
                }
            };
            let Err(e) = res else {
                return Ok(());
            };
            match e.raw_os_error() {
                // Unsubmitted entries stay in the SQ for the retry.
                Some(libc::EINTR) => {}
                Some(libc::ETIME) => return Ok(()),
                Some(libc::EAGAIN | libc::EBUSY) => {
                    busy += 1;
                    if busy > ENTER_BUSY_RETRIES {
                        return Err(format!(
                            "{}: io_uring_enter kept failing: {e}",
                            self.op.what()
                        ));
                    }
                    // Reaping frees kernel resources; else back off a little.
                    if !self.ring.completion().is_empty() {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                _ => return Err(format!("{}: io_uring_enter failed: {e}", self.op.what())),
            }
        }
    }

    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(user_data, res) in &cqes {
            match user_data {
                POLL_TAG => {
                    self.poll_armed = false;
                    self.wake.reset();
                    if res < 0 && res != -libc::ECANCELED && self.phase == Phase::Running {
                        let e = io::Error::from_raw_os_error(-res);
                        self.fail(format!("{}: polling its eventfd: {e}", self.op.what()));
                    }
                }
                CANCEL_TAG => {}
                _ => self.io_done(user_data, res),
            }
        }
        self.cqes = cqes;
    }

    fn io_done(&mut self, user_data: u64, res: i32) {
        let index = (user_data >> 8) as usize;
        let r = (user_data & 0xff) as usize;
        assert!(self.io_in_flight > 0, "a completion with nothing in flight");
        self.io_in_flight -= 1;
        let fl = self.slots[index]
            .as_mut()
            .expect("a completion for a buffer without a batch");
        let run = &mut fl.runs[r];
        let outcome = if self.phase == Phase::WindingDown {
            // Results no longer matter; only the accounting does.
            Ok(true)
        } else if res > 0 {
            run.done_bytes += res as usize;
            assert!(
                run.done_bytes <= run.bytes(),
                "{res} bytes for a {}-byte run",
                run.bytes()
            );
            Ok(run.done_bytes == run.bytes())
        } else {
            let block = fl.batch.blocks[run.first + run.done_bytes / BLOCK_BYTES];
            let why = if res == 0 {
                "hit the end of the file (a short transfer: the image ends before this block)"
                    .to_string()
            } else {
                format!("failed: {}", io::Error::from_raw_os_error(-res))
            };
            Err(format!(
                "{}: {} of block {block} (stream {}) {why}",
                self.op.what(),
                self.op.verb(),
                fl.batch.stream
            ))
        };
        match outcome {
            Ok(false) => {
                // Short: resubmit the rest of the run ahead of new work.
                let run = &fl.runs[r];
                let entry = run_entry(
                    self.op,
                    if fl.cached { self.fd_cached } else { self.fd },
                    &self.region,
                    index as u16,
                    r,
                    run,
                    &fl.batch.blocks,
                );
                self.pending.push_front(entry);
            }
            Ok(true) => {
                fl.runs_left -= 1;
                if fl.runs_left == 0 {
                    self.batch_done(index);
                }
            }
            Err(msg) => {
                fl.runs_left -= 1;
                if fl.runs_left == 0 {
                    self.slots[index] = None;
                }
                self.fail(msg);
            }
        }
    }

    fn batch_done(&mut self, index: usize) {
        let fl = self.slots[index].take().expect("a done batch");
        if self.phase == Phase::WindingDown {
            return;
        }
        match &self.sink {
            Sink::Deliver(_) => self.ready.push(fl.batch),
            Sink::Pool(pool) => {
                let stream = usize::from(fl.batch.stream);
                let _ = pool.try_send(fl.batch.buf);
                self.shared.finish(stream);
            }
        }
    }

    fn deliver_ready(&mut self) {
        for batch in std::mem::take(&mut self.ready) {
            let Sink::Deliver(deliver) = &mut self.sink else {
                unreachable!("only a reader has batches to deliver");
            };
            match deliver(batch) {
                Ok(()) => self.shared.finish(0),
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
    }

    fn fail(&mut self, msg: String) {
        self.shared.fail(msg);
        self.begin_wind_down();
    }

    /// Stops taking work and asks the kernel to cancel what is in flight.
    fn begin_wind_down(&mut self) {
        if self.phase == Phase::WindingDown {
            return;
        }
        self.phase = Phase::WindingDown;
        self.pending.clear();
        self.ready.clear();
        if self.io_in_flight > 0 {
            let entry = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(CANCEL_TAG);
            // SAFETY: a cancel names no memory and no fd.
            let _ = unsafe { self.ring.submission().push(&entry) };
        }
    }

    /// Waits (bounded) for the I/O still in flight: completed or cancelled.
    fn wind_down(&mut self) {
        let deadline = Instant::now() + STOP_WAIT;
        while self.io_in_flight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    "{}: {} I/Os still in flight after {STOP_WAIT:?}; leaving them to the kernel",
                    self.op.what(),
                    self.io_in_flight
                );
                return;
            }
            if let Err(e) = self.enter(1, Some(left.min(WIND_DOWN_TICK))) {
                tracing::warn!("{}: winding down: {e}", self.op.what());
                return;
            }
            self.reap();
        }
    }
}

/// The caller's side of a reader or writer.
struct Front {
    op: Op,
    file: Arc<File>,
    direct: bool,
    blocks_total: u64,
    region: Arc<Region>,
    pool_tx: Sender<BlockBuf>,
    pool_rx: Receiver<BlockBuf>,
    requests: Sender<Request>,
    wake: Arc<Wake>,
    shared: Arc<Shared>,
    /// Disconnected when the ring thread has ended.
    exited: Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl Front {
    #[allow(clippy::too_many_arguments)]
    fn start(
        file: &File,
        op: Op,
        blocks_total: u64,
        slots: usize,
        buffers: usize,
        depth: u32,
        deliver: Option<Deliver>,
        mode: DirectMode,
        pin: Option<crate::numa::Pinner>,
    ) -> io::Result<Self> {
        let what = op.what();
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        if buffers == 0 || buffers > BUFFERS_MAX {
            return Err(invalid(format!(
                "{what}: {buffers} buffers; 1..={BUFFERS_MAX} are allowed"
            )));
        }
        if !(QUEUE_DEPTH_MIN..=QUEUE_DEPTH_MAX).contains(&depth) {
            return Err(invalid(format!(
                "{what}: queue depth {depth}; {QUEUE_DEPTH_MIN}..={QUEUE_DEPTH_MAX} are allowed"
            )));
        }
        let need = blocks_total
            .checked_mul(BLOCK_BYTES as u64)
            .ok_or_else(|| invalid(format!("{what}: {blocks_total} blocks overflow")))?;
        let have = file.metadata()?.len();
        if have < need {
            return Err(invalid(format!(
                "{what}: the image has {have} bytes, fewer than {blocks_total} blocks of \
                 {BLOCK_BYTES}"
            )));
        }
        let (reopened, direct) = reopen(file, op, mode)?;
        let file = Arc::new(reopened);
        let cached = Arc::new(reopen_buffered(&file, op)?);
        let ring = open_ring(op, depth)?;
        let region = Region::new(buffers)?;
        // SAFETY: the iovecs describe the region's buffers, which stay mapped
        // while the ring lives: the Worker holds the region and drops the ring
        // first, and the kernel's pins outlast munmap anyway (see Region).
        unsafe { ring.submitter().register_buffers(&region.iovecs()) }.map_err(|e| {
            ctx(
                e,
                format!(
                    "{what}: registering {buffers} x {} KiB buffers (they are pinned: is \
                     RLIMIT_MEMLOCK big enough?)",
                    BUF_BYTES >> 10
                ),
            )
        })?;
        let wake = Arc::new(Wake::new()?);
        let (pool_tx, pool_rx) = bounded(buffers);
        for index in 0..buffers {
            let buf = BlockBuf {
                region: region.clone(),
                index: index as u16,
            };
            let sent = pool_tx.try_send(buf);
            debug_assert!(sent.is_ok(), "the pool holds every buffer");
        }
        let (requests, requests_rx) = unbounded();
        let shared = Arc::new(Shared::new(what, slots));
        let (exited_tx, exited) = bounded::<()>(0);
        let sink = match deliver {
            Some(d) => Sink::Deliver(d),
            None => Sink::Pool(pool_tx.clone()),
        };
        let worker = Worker {
            ring,
            op,
            fd: types::Fd(file.as_raw_fd()),
            region: region.clone(),
            requests: requests_rx,
            wake: wake.clone(),
            shared: shared.clone(),
            sink,
            depth,
            slots: (0..buffers).map(|_| None).collect(),
            pending: VecDeque::new(),
            ready: Vec::new(),
            cqes: Vec::new(),
            io_in_flight: 0,
            poll_armed: false,
            phase: Phase::Running,
            _file: file.clone(),
            fd_cached: types::Fd(cached.as_raw_fd()),
            _file_cached: cached,
            _exit: ExitGuard {
                shared: shared.clone(),
                _exited: exited_tx,
            },
        };
        // The ring thread runs where the migration's placement puts its
        // stage; without one, on the CPUs of the NUMA node that holds the
        // image's device, when sysfs tells (on one node: anywhere).
        let place = match pin {
            Some(_) => None,
            None => super::numa::device_node_cpus(std::path::Path::new("/sys"), &file),
        };
        let thread = std::thread::Builder::new()
            .name(op.thread_name().into())
            .spawn(move || {
                if let Some(p) = pin {
                    p.enter();
                } else if let Some((node, cpus)) = place {
                    match super::numa::pin_current_thread(&cpus) {
                        Ok(()) => tracing::info!(
                            "{what}: ring thread on NUMA node {node} (CPUs {cpus:?}), the image's device's"
                        ),
                        Err(e) => tracing::warn!("{what}: cannot pin to node {node}: {e}"),
                    }
                }
                worker.run()
            })
            .map_err(|e| ctx(e, format!("{what}: starting its thread")))?;
        Ok(Self {
            op,
            file,
            direct,
            blocks_total,
            region,
            pool_tx,
            pool_rx,
            requests,
            wake,
            shared,
            exited,
            thread: Some(thread),
        })
    }

    fn recycler(&self) -> Recycler {
        Recycler {
            pool: self.pool_tx.clone(),
            region: self.region.clone(),
        }
    }

    fn owns(&self, buf: &BlockBuf) -> bool {
        Arc::ptr_eq(&buf.region, &self.region)
    }

    /// A free buffer; waits while all are busy, fails once the thread ended.
    fn take_buffer(&self) -> Result<BlockBuf, String> {
        self.shared.check()?;
        crossbeam_channel::select! {
            recv(self.pool_rx) -> buf => {
                // This Front holds a sender, so the pool never disconnects.
                let buf = buf.map_err(|_| format!("the {}'s pool closed", self.op.what()))?;
                if let Err(e) = self.shared.check() {
                    self.recycler().give(buf);
                    return Err(e);
                }
                Ok(buf)
            }
            recv(self.exited) -> _ => Err(self.shared.check().err().unwrap_or_else(|| {
                format!("the {} has stopped", self.op.what())
            })),
        }
    }

    /// Hands a checked batch to the ring thread, counted in `slot`.
    fn queue(&self, slot: usize, batch: Batch, cached: bool) -> Result<(), String> {
        debug_assert!(self.owns(&batch.buf));
        {
            let mut p = self.shared.lock();
            if let Err(e) = p.health(self.op.what()) {
                drop(p);
                self.recycler().give(batch.buf);
                return Err(e);
            }
            p.queued[slot] += 1;
        }
        if self.requests.send(Request::Io(batch, cached)).is_err() {
            let stopped = format!("the {} has stopped", self.op.what());
            return Err(self.shared.check().err().unwrap_or(stopped));
        }
        self.wake.notify();
        Ok(())
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let _ = self.requests.send(Request::Stop);
        self.wake.notify();
        match self.exited.recv_timeout(JOIN_WAIT) {
            Err(RecvTimeoutError::Timeout) => tracing::warn!(
                "{}: its thread did not stop within {JOIN_WAIT:?} (a deliver call blocked?); \
                 leaving it behind",
                self.op.what()
            ),
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if thread.join().is_err() {
                    tracing::warn!("{}: its thread panicked", self.op.what());
                }
            }
        }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Reads batches of blocks of an image through an io_uring, on its own
/// thread ("ferry-disk-rd"), handing each to a callback.
pub struct DiskReader {
    front: Front,
}

impl DiskReader {
    /// Reopens `file` through /proc/self/fd read-only with O_DIRECT (a new
    /// open file description: the caller's flags never change), falling back
    /// to buffered I/O with one `tracing::info!` line when the file system
    /// refuses O_DIRECT (EINVAL); registers `buffers` (1..=[`BUFFERS_MAX`];
    /// see [`buffers_for_depth`]) [`BlockBuf`]s with a new ring of `depth`
    /// ([`QUEUE_DEPTH_MIN`]..=[`QUEUE_DEPTH_MAX`]) entries, and starts one
    /// thread, "ferry-disk-rd", that submits and completes reads.
    ///
    /// `deliver` is called on that thread with each completed [`Batch`], in
    /// completion order; it should hand the buffer back through a
    /// [`Recycler`] when done with it. An `Err` from it stops the reader, and
    /// the error is what later calls return. While it blocks, no new reads
    /// are submitted (backpressure). It must not call [`read`](Self::read):
    /// with every buffer busy that would wait for itself.
    ///
    /// Refuses with an `io::Error` when the file is shorter than
    /// `blocks_total` blocks, io_uring is unavailable (ENOSYS, or EPERM from
    /// the `kernel.io_uring_disabled` sysctl) or lacks an opcode used here
    /// (READ_FIXED, POLL_ADD, ASYNC_CANCEL, found with a probe).
    pub fn start(
        file: &File,
        blocks_total: u64,
        buffers: usize,
        depth: u32,
        deliver: impl FnMut(Batch) -> Result<(), String> + Send + 'static,
    ) -> io::Result<Self> {
        Self::start_with(
            file,
            blocks_total,
            buffers,
            depth,
            Box::new(deliver),
            DirectMode::Try,
            None,
        )
    }

    /// [`DiskReader::start`] with the ring thread placed by `pin` (a
    /// migration's plan for [`crate::numa::Stage::DiskRead`]).
    pub fn start_pinned(
        file: &File,
        blocks_total: u64,
        buffers: usize,
        depth: u32,
        deliver: impl FnMut(Batch) -> Result<(), String> + Send + 'static,
        pin: crate::numa::Pinner,
    ) -> io::Result<Self> {
        Self::start_with(
            file,
            blocks_total,
            buffers,
            depth,
            Box::new(deliver),
            DirectMode::Try,
            Some(pin),
        )
    }

    fn start_with(
        file: &File,
        blocks_total: u64,
        buffers: usize,
        depth: u32,
        deliver: Deliver,
        mode: DirectMode,
        pin: Option<crate::numa::Pinner>,
    ) -> io::Result<Self> {
        let front = Front::start(
            file,
            Op::Read,
            blocks_total,
            1,
            buffers,
            depth,
            Some(deliver),
            mode,
            pin,
        )?;
        Ok(Self { front })
    }

    /// Queues a read of `blocks` for `stream`. The blocks must ascend, be
    /// unique, number 1..=[`BATCH_BLOCKS_MAX`] and lie below `blocks_total`
    /// (`Err` otherwise). Waits for a free buffer while all are busy. Each
    /// contiguous run of blocks is one READ_FIXED entry, and the ring thread
    /// submits whatever has queued up in one `io_uring_enter`.
    pub fn read(&self, stream: u16, blocks: Vec<u64>) -> Result<(), String> {
        self.read_via(stream, blocks, false)
    }

    /// [`Self::read`] through the page cache (a second, buffered open of
    /// the image): for blocks the VMM has just written with buffered I/O,
    /// which sit in the page cache, dirty. An O_DIRECT read of such a block
    /// must first write it back to the device, one read at a time; a
    /// buffered read copies it from memory.
    pub fn read_cached(&self, stream: u16, blocks: Vec<u64>) -> Result<(), String> {
        self.read_via(stream, blocks, true)
    }

    fn read_via(&self, stream: u16, blocks: Vec<u64>, cached: bool) -> Result<(), String> {
        check_blocks(&blocks, self.front.blocks_total)
            .map_err(|e| format!("disk read for stream {stream}: {e}"))?;
        let buf = self.front.take_buffer()?;
        self.front.queue(
            0,
            Batch {
                stream,
                blocks,
                buf,
            },
            cached,
        )
    }

    /// A handle that returns delivered buffers to this reader's pool.
    pub fn recycler(&self) -> Recycler {
        self.front.recycler()
    }

    /// Returns a delivered buffer to the pool (as [`Recycler::give`]).
    pub fn recycle(&self, buf: BlockBuf) {
        self.front.recycler().give(buf);
    }

    /// Waits until every batch queued so far was delivered (`Ok`), the
    /// reader failed (its error) or `timeout` passed (`Err`).
    pub fn drain(&self, timeout: Duration) -> Result<(), String> {
        self.front.shared.wait(0..1, timeout)
    }

    /// Whether O_DIRECT is in use.
    pub fn direct(&self) -> bool {
        self.front.direct
    }

    /// The most read entries that were in flight at once.
    pub fn max_in_flight(&self) -> u32 {
        self.front.shared.in_flight_max.load(Ordering::Relaxed)
    }

    /// Stops the thread: reads in flight are cancelled or completed (waiting
    /// at most 5 s) and not delivered. Never hangs: if a `deliver` call has
    /// not returned after 7 s, the thread is left behind (and ends when the
    /// call returns). Dropping the reader does the same.
    pub fn stop(mut self) {
        self.front.shutdown();
    }
}

impl fmt::Debug for DiskReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskReader")
            .field("blocks_total", &self.front.blocks_total)
            .field("direct", &self.front.direct)
            .finish_non_exhaustive()
    }
}

/// Writes batches of blocks into an image through an io_uring, on its own
/// thread ("ferry-disk-wr"), tracking completion per stream.
pub struct DiskWriter {
    front: Front,
    streams: u16,
}

impl DiskWriter {
    /// Reopens `file` through /proc/self/fd read-write with O_DIRECT (same
    /// fallback as [`DiskReader::start`]), registers `buffers` [`BlockBuf`]s
    /// with a ring of `depth` entries and starts one thread, "ferry-disk-wr".
    /// Streams are numbered `1..=streams`. The file must already be at least
    /// `blocks_total` blocks long (`set_len`): writes never extend it.
    pub fn start(
        file: &File,
        blocks_total: u64,
        streams: u16,
        buffers: usize,
        depth: u32,
    ) -> io::Result<Self> {
        Self::start_with(
            file,
            blocks_total,
            streams,
            buffers,
            depth,
            DirectMode::Try,
            None,
        )
    }

    /// [`DiskWriter::start`] with the ring thread placed by `pin` (a
    /// migration's plan for [`crate::numa::Stage::DiskWrite`]).
    pub fn start_pinned(
        file: &File,
        blocks_total: u64,
        streams: u16,
        buffers: usize,
        depth: u32,
        pin: crate::numa::Pinner,
    ) -> io::Result<Self> {
        Self::start_with(
            file,
            blocks_total,
            streams,
            buffers,
            depth,
            DirectMode::Try,
            Some(pin),
        )
    }

    fn start_with(
        file: &File,
        blocks_total: u64,
        streams: u16,
        buffers: usize,
        depth: u32,
        mode: DirectMode,
        pin: Option<crate::numa::Pinner>,
    ) -> io::Result<Self> {
        if streams == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "disk writer: needs at least one stream",
            ));
        }
        let slots = usize::from(streams) + 1;
        let front = Front::start(
            file,
            Op::Write,
            blocks_total,
            slots,
            buffers,
            depth,
            None,
            mode,
            pin,
        )?;
        Ok(Self { front, streams })
    }

    /// A free buffer to fill; waits while all are busy, `Err` once the
    /// writer failed or stopped.
    pub fn buffer(&self) -> Result<BlockBuf, String> {
        self.front.take_buffer()
    }

    /// Queues the batch's writes (each contiguous run one WRITE_FIXED entry);
    /// the buffer goes back to the pool when its writes complete. The blocks
    /// are checked as in [`DiskReader::read`], the stream must be in
    /// `1..=streams` and the buffer must come from this writer; on `Err` the
    /// buffer goes back to the pool.
    pub fn write(&self, batch: Batch) -> Result<(), String> {
        if !self.front.owns(&batch.buf) {
            return Err(format!(
                "disk write for stream {}: the buffer is not this writer's",
                batch.stream
            ));
        }
        let checked = if batch.stream == 0 || batch.stream > self.streams {
            Err(format!("streams are 1..={}", self.streams))
        } else {
            check_blocks(&batch.blocks, self.front.blocks_total)
        };
        if let Err(e) = checked {
            self.front.recycler().give(batch.buf);
            return Err(format!("disk write for stream {}: {e}", batch.stream));
        }
        self.front.queue(usize::from(batch.stream), batch, false)
    }

    /// Returns an unused buffer to the pool (as [`Recycler::give`]).
    pub fn recycle(&self, buf: BlockBuf) {
        self.front.recycler().give(buf);
    }

    /// A handle that returns unused buffers to this writer's pool.
    pub fn recycler(&self) -> Recycler {
        self.front.recycler()
    }

    /// Waits until every write queued for `stream` so far has completed (a
    /// round barrier); writes of other streams are not waited for. `Err` on
    /// a failed write (short writes are retried, and a write that makes no
    /// progress is an error), a bad stream or `timeout`.
    pub fn drain_stream(&self, stream: u16, timeout: Duration) -> Result<(), String> {
        if stream == 0 || stream > self.streams {
            return Err(format!(
                "disk writer: no stream {stream} (streams are 1..={})",
                self.streams
            ));
        }
        let s = usize::from(stream);
        self.front.shared.wait(s..s + 1, timeout)
    }

    /// Waits for the writes of all streams queued so far, then `fdatasync`s
    /// the image.
    pub fn sync(&self, timeout: Duration) -> Result<(), String> {
        self.front
            .shared
            .wait(1..usize::from(self.streams) + 1, timeout)?;
        self.front
            .file
            .sync_data()
            .map_err(|e| format!("disk writer: fdatasync: {e}"))
    }

    /// Whether O_DIRECT is in use.
    pub fn direct(&self) -> bool {
        self.front.direct
    }

    /// The most write entries that were in flight at once.
    pub fn max_in_flight(&self) -> u32 {
        self.front.shared.in_flight_max.load(Ordering::Relaxed)
    }

    /// Stops the thread: writes in flight are cancelled or completed (waiting
    /// at most a few seconds); never hangs. Call [`sync`](Self::sync) first
    /// to keep what was written. Dropping the writer does the same.
    pub fn stop(mut self) {
        self.front.shutdown();
    }
}

impl fmt::Debug for DiskWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskWriter")
            .field("blocks_total", &self.front.blocks_total)
            .field("streams", &self.streams)
            .field("direct", &self.front.direct)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
