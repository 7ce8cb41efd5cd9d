//! A connection handle: the shared socket and this handle's own ring.

use std::io::{self, ErrorKind};
use std::net::{Shutdown, TcpStream};
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use vm_memory::{Bytes, VolatileSlice};

use super::ring::{Completion, Ring, RingSetup, RingStats, SEND_ZC_REPORT_USAGE};
use crate::{Conn, Result, Seg, TransportError};

/// Most iovecs one `SENDMSG` takes (Linux `UIO_MAXIOV`). A send with more
/// segments is several operations, one after the other: at 4 KiB pages one
/// still covers 4 MiB.
pub const IOV_MAX: usize = 1024;

/// Most bytes one operation moves, so that its result fits the completion's
/// `i32`; a larger receive or send is several operations.
const OP_BYTES_MAX: usize = 1 << 30;

/// Bytes of a stream's read-ahead buffer. A receive of fewer than
/// [`DIRECT_RECV_MIN_BYTES`] (a frame header, a page table, a compressed
/// page, one scattered raw page) is served from it, and refilled by one
/// `RECV` of whatever the socket holds, up to this much. See the module docs
/// for the measurement.
pub const READ_AHEAD_BYTES: usize = 64 << 10;

/// Receives of at least this many bytes (after what the read-ahead buffer
/// holds) go straight into their destination, one `RECV` per arrival:
/// an operation costs about as much as copying 32 KiB once more in user
/// space, so larger receives are cheaper direct (and raw pages land in guest
/// memory with one copy).
pub const DIRECT_RECV_MIN_BYTES: usize = 32 << 10;

const _: () = assert!(DIRECT_RECV_MIN_BYTES <= READ_AHEAD_BYTES);

/// A receive reads ahead only as the third small one in a row: a frame's
/// header and page table come in twos before a large run of raw pages, and
/// reading ahead there would pull the start of the run through the buffer
/// (one more copy of it, measured at +20% CPU for bulk frames); scattered
/// pages and compressed payloads come in longer streaks.
const READ_AHEAD_STREAK: u32 = 3;

/// A send's wait for progress is cut into this many slices. A send is one
/// `MSG_WAITALL` operation, which reports progress only when it ends; at the
/// end of a slice with the operation still in flight it is cancelled to learn
/// whether it moved any bytes, and resubmitted for the rest. So a stalled
/// send is reported between 1 and 1 + 1/4 timeouts after its last progress,
/// and a send blocked on a slow reader pays one cancel per quarter timeout:
/// with the 10 s deadlines ferry uses, one per 2.5 s. (A receive completes at
/// each arrival, so its wait is one slice: the deadline itself.)
const SEND_WAIT_SLICES: u32 = 4;

/// Shortest slice: a zero timeout means the shortest wait, not "forever".
const SLICE_MIN: Duration = Duration::from_micros(1);

/// `Timeout` stored when there is none.
const NO_TIMEOUT: u64 = u64::MAX;

/// What every handle of one stream shares: the socket (so its state, and a
/// `shutdown`, reach all of them), the deadline, and the bytes read ahead
/// (which belong to the stream, not to the handle that happened to read them:
/// any handle may receive next).
pub(super) struct Socket {
    stream: TcpStream,
    peer: String,
    /// Nanoseconds of the per-wait deadline, or [`NO_TIMEOUT`].
    timeout_ns: AtomicU64,
    /// Held for a whole receive, so receives on two handles at once (which
    /// no caller makes: their bytes would interleave arbitrarily) queue up
    /// instead of splitting the stream.
    ahead: Mutex<ReadAhead>,
}

impl Socket {
    pub fn new(stream: TcpStream, peer: String) -> Self {
        Self {
            stream,
            peer,
            timeout_ns: AtomicU64::new(NO_TIMEOUT),
            ahead: Mutex::new(ReadAhead::new()),
        }
    }

    fn timeout(&self) -> Option<Duration> {
        match self.timeout_ns.load(Ordering::Relaxed) {
            NO_TIMEOUT => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.stream.as_raw_fd())
    }

    fn timeout_err(&self) -> TransportError {
        TransportError::Timeout {
            peer: self.peer.clone(),
        }
    }

    fn send_err(&self, e: io::Error) -> TransportError {
        TransportError::Send {
            peer: self.peer.clone(),
            source: e,
        }
    }

    fn recv_err(&self, e: io::Error) -> TransportError {
        TransportError::Recv {
            peer: self.peer.clone(),
            source: e,
        }
    }

    /// The error for EOF after `done` of the expected bytes.
    fn eof_err(&self, done: usize, want: usize) -> TransportError {
        if done == 0 {
            TransportError::Closed {
                peer: self.peer.clone(),
            }
        } else {
            self.recv_err(io::Error::new(
                ErrorKind::UnexpectedEof,
                format!("peer closed after {done} of {want} bytes"),
            ))
        }
    }
}

/// Bytes received ahead of the caller's request: `buf[start..end]`.
struct ReadAhead {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Receives in a row shorter than [`DIRECT_RECV_MIN_BYTES`].
    small_streak: u32,
}

impl ReadAhead {
    fn new() -> Self {
        Self {
            buf: vec![0; READ_AHEAD_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            small_streak: 0,
        }
    }

    /// Counts a receive of `want` bytes; true when it may read ahead.
    fn note(&mut self, want: usize) -> bool {
        if want >= DIRECT_RECV_MIN_BYTES {
            self.small_streak = 0;
            return false;
        }
        self.small_streak = self.small_streak.saturating_add(1);
        self.small_streak >= READ_AHEAD_STREAK
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.end - self.start);
        self.start += n;
    }
}

/// Where a receive lands.
enum Dst<'a, 'b> {
    Bytes(&'a mut [u8]),
    Guest(&'a VolatileSlice<'b>),
}

impl Dst<'_, '_> {
    fn len(&self) -> usize {
        match self {
            Dst::Bytes(b) => b.len(),
            Dst::Guest(v) => v.len(),
        }
    }

    /// Copies `src` to offset `at` (guest memory through vm-memory's
    /// volatile copy, never a `&mut [u8]`).
    fn fill(&mut self, at: usize, src: &[u8]) -> io::Result<()> {
        match self {
            Dst::Bytes(b) => {
                b[at..at + src.len()].copy_from_slice(src);
                Ok(())
            }
            Dst::Guest(v) => v.write_slice(src, at).map_err(io::Error::other),
        }
    }

    /// Address of byte `at`, for the kernel to write.
    fn ptr(&mut self, at: usize) -> *mut u8 {
        debug_assert!(at <= self.len());
        let base = match self {
            Dst::Bytes(b) => b.as_mut_ptr(),
            // See the `needs_drop` assertion above `seg_ptr` for dropping the guard.
            Dst::Guest(v) => v.ptr_guard_mut().as_ptr(),
        };
        base.wrapping_add(at)
    }
}

/// A connection handle: one ring of its own over the shared socket.
pub(super) struct UringConn {
    sock: Arc<Socket>,
    ring: Ring,
    setup: RingSetup,
    /// Guest runs at least this long go zero-copy; `None` = never.
    zero_copy_min_bytes: Option<NonZeroU32>,
    /// Scratch iovecs of the current send.
    iov: IoVecs,
}

/// The iovec scratch array. Its pointers are only meaningful during the send
/// that filled them and are never dereferenced by us.
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the raw pointers inside are plain addresses the kernel reads during
// one `send` call on the owning handle; moving the array to another thread
// between calls moves no access with it.
unsafe impl Send for IoVecs {}

impl UringConn {
    pub fn new(
        sock: Arc<Socket>,
        setup: RingSetup,
        zero_copy_min_bytes: Option<NonZeroU32>,
    ) -> io::Result<Self> {
        Ok(Self {
            sock,
            ring: Ring::new(setup)?,
            setup,
            zero_copy_min_bytes,
            iov: IoVecs(Vec::with_capacity(IOV_MAX)),
        })
    }

    /// What this handle's ring has done.
    pub fn stats(&self) -> RingStats {
        self.ring.stats()
    }

    /// Bytes of the stream read ahead and not yet received.
    #[cfg(test)]
    pub fn read_ahead_pending(&self) -> usize {
        let ahead = self
            .sock
            .ahead
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ahead.pending().len()
    }

    /// Fills `dst` from the read-ahead buffer and the socket.
    fn recv_into(&mut self, mut dst: Dst<'_, '_>) -> Result<()> {
        let want = dst.len();
        if want == 0 {
            return Ok(());
        }
        let sock = &*self.sock;
        let ring = &mut self.ring;
        let mut ahead = sock.ahead.lock().unwrap_or_else(PoisonError::into_inner);
        let read_ahead = ahead.note(want);
        let mut done = 0;
        let mut stall = Stall::new(sock.timeout(), 1);
        loop {
            let n = ahead.pending().len().min(want - done);
            if n > 0 {
                dst.fill(done, &ahead.pending()[..n])
                    .map_err(|e| sock.recv_err(e))?;
                ahead.consume(n);
                done += n;
            }
            if done == want {
                return Ok(());
            }
            debug_assert!(ahead.pending().is_empty());
            let left = want - done;
            let direct = !read_ahead || left >= DIRECT_RECV_MIN_BYTES;
            // No MSG_WAITALL: a receive completes with whatever the socket holds
            // (at least a byte), so each completion is progress and the
            // deadline is exact; MSG_WAITALL saved no CPU here (module docs).
            let (ptr, len) = if direct {
                (dst.ptr(done), left.min(OP_BYTES_MAX))
            } else {
                (ahead.buf.as_mut_ptr(), READ_AHEAD_BYTES)
            };
            let entry = opcode::Recv::new(sock.fd(), ptr, len as u32).build();
            let slice = stall.slice();
            // SAFETY: `ptr .. ptr + len` is either the rest of `dst` (a uniquely
            // borrowed buffer, or guest memory valid for writes for the slice's
            // lifetime, which covers this call; the kernel writes through the
            // raw pointer, so a concurrent guest access is a race on raw bytes
            // only) or the read-ahead buffer, which the lock held here keeps
            // ours and which is not referenced until `run` returns. `run`
            // returns only once the kernel is done with the range. The socket
            // fd stays open: `self.sock` owns it.
            let c = unsafe { ring.run(entry, slice) };
            let c = c.map_err(|e| sock.recv_err(e))?;
            match progress(&c, len).map_err(|e| sock.recv_err(e))? {
                Step::Moved(n) if direct => {
                    done += n;
                    stall.progressed();
                }
                Step::Moved(n) => {
                    ahead.start = 0;
                    ahead.end = n;
                    stall.progressed();
                }
                Step::End => return Err(sock.eof_err(done, want)),
                Step::Nothing if stall.expired(c.cancelled.then_some(slice).flatten()) => {
                    return Err(sock.timeout_err())
                }
                Step::Nothing => {}
            }
        }
    }

    /// Fills the scratch iovecs from position `pos` of `segs` with the next
    /// operation's run of segments; returns the iovec count, the bytes they
    /// hold and whether the run goes zero-copy.
    ///
    /// A zero-copy run is guest memory only (empty segments aside), at least
    /// `zero_copy_min_bytes` of it; a copy run stops where such a run starts.
    fn fill_iov(&mut self, segs: &[Seg<'_>], pos: Pos) -> (usize, usize, bool) {
        let zc_min = self.zero_copy_min_bytes.map(|b| b.get() as usize);
        let qualifies = |at: Pos| zc_min.is_some_and(|min| guest_run_bytes(segs, at, min) >= min);
        let zc = qualifies(pos);
        let iov = &mut self.iov.0;
        iov.clear();
        let mut bytes = 0;
        let mut at = pos;
        // In a copy run: whether the guest run under `at` was already found too
        // short for zero-copy (so each run is measured once, not per segment).
        let mut run_checked = false;
        while at.seg < segs.len() && iov.len() < IOV_MAX && bytes < OP_BYTES_MAX {
            let seg = &segs[at.seg];
            let (base, len) = seg_ptr(seg, at.skip);
            if len > 0 {
                let is_guest = matches!(seg, Seg::Guest(_));
                if zc && !is_guest {
                    break;
                }
                if !zc && is_guest && !run_checked {
                    if !iov.is_empty() && qualifies(at) {
                        break;
                    }
                    run_checked = true;
                }
                if !is_guest {
                    run_checked = false;
                }
                let len = len.min(OP_BYTES_MAX - bytes);
                iov.push(libc::iovec {
                    iov_base: base as *mut libc::c_void,
                    iov_len: len,
                });
                bytes += len;
            }
            at = Pos {
                seg: at.seg + 1,
                skip: 0,
            };
        }
        (iov.len(), bytes, zc)
    }
}

/// Guest bytes from `pos` up to the next `Seg::Bytes` (empty segments do not
/// end a run), counting stops at `enough`.
fn guest_run_bytes(segs: &[Seg<'_>], pos: Pos, enough: usize) -> usize {
    let mut total = 0;
    let mut skip = pos.skip;
    for seg in &segs[pos.seg..] {
        match seg {
            Seg::Guest(v) => total += v.len() - skip,
            Seg::Bytes([]) => {}
            Seg::Bytes(_) => break,
        }
        skip = 0;
        if total >= enough {
            break;
        }
    }
    total
}

/// The next unsent byte of a send: segment index and offset within it.
#[derive(Debug, Clone, Copy)]
struct Pos {
    seg: usize,
    skip: usize,
}

impl Pos {
    /// Moves past finished and empty segments; true when nothing is left.
    fn settle(&mut self, segs: &[Seg<'_>]) -> bool {
        while self.seg < segs.len() && self.skip == segs[self.seg].len() {
            self.seg += 1;
            self.skip = 0;
        }
        self.seg == segs.len()
    }

    /// Advances by `n` bytes.
    fn advance(&mut self, segs: &[Seg<'_>], mut n: usize) {
        while n > 0 {
            let left = segs[self.seg].len() - self.skip;
            if n < left {
                self.skip += n;
                return;
            }
            n -= left;
            self.seg += 1;
            self.skip = 0;
        }
    }
}

/// What one completed or cancelled operation means for the call.
enum Step {
    /// Bytes moved: progress.
    Moved(usize),
    /// End of stream (a receive returned 0).
    End,
    /// Nothing moved (cancelled at the end of a slice, or a retry the kernel
    /// asked for): the caller checks its deadline and resubmits.
    Nothing,
}

/// Interprets a completion of an operation of `len` bytes.
fn progress(c: &Completion, len: usize) -> io::Result<Step> {
    match c.res {
        n if n > 0 => {
            let n = n as usize;
            debug_assert!(n <= len, "{n} bytes moved by an operation of {len}");
            Ok(Step::Moved(n.min(len)))
        }
        0 => Ok(Step::End),
        e if e == -libc::ECANCELED && c.cancelled => Ok(Step::Nothing),
        // EINTR: a cancel interrupted a blocking attempt. EAGAIN: the kernel
        // gave up retrying internally without progress; neither moved a byte.
        e if e == -libc::EINTR || e == -libc::EAGAIN => Ok(Step::Nothing),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

/// The per-wait deadline of one call: each wait for progress is bounded by
/// the timeout, and any progress starts a new wait. The wait is cut into
/// `slices` (see [`SEND_WAIT_SLICES`]).
///
/// The clock is read only once a slice has passed without progress: the fast
/// path (every operation completes within its first slice) reads none.
struct Stall {
    timeout: Option<Duration>,
    slices: u32,
    /// When the current wait for progress began; `None` while that is "just
    /// now" (the call started or progress was made, and no slice passed since).
    since: Option<Instant>,
}

impl Stall {
    fn new(timeout: Option<Duration>, slices: u32) -> Self {
        debug_assert!(slices > 0);
        Self {
            timeout,
            slices,
            since: None,
        }
    }

    /// How long the next wait may take before the operation is cancelled.
    fn slice(&self) -> Option<Duration> {
        self.timeout.map(|t| {
            let left = match self.since {
                None => t,
                Some(since) => t.saturating_sub(since.elapsed()),
            };
            (t / self.slices).min(left).max(SLICE_MIN)
        })
    }

    fn progressed(&mut self) {
        self.since = None;
    }

    /// After an operation that moved nothing (it was cancelled after waiting
    /// `waited`): true once the wait for progress has lasted the timeout.
    fn expired(&mut self, waited: Option<Duration>) -> bool {
        let Some(t) = self.timeout else {
            return false;
        };
        let since = *self.since.get_or_insert_with(|| {
            let now = Instant::now();
            now.checked_sub(waited.unwrap_or_default()).unwrap_or(now)
        });
        since.elapsed() >= t
    }
}

// A `PtrGuard` pins a mapping only under vm-memory's `xen` feature (where it
// has a destructor). Without it, the pointer stays valid for the slice's
// lifetime and the guard can be dropped at once; this fails to compile if the
// feature is ever enabled, so the send path is revisited then.
const _: () = assert!(!std::mem::needs_drop::<vm_memory::volatile_memory::PtrGuard>());

/// Pointer and length of segment `seg`, `skip` bytes in. Guest memory is taken
/// through its pointer guard and never viewed as `&[u8]`.
fn seg_ptr(seg: &Seg<'_>, skip: usize) -> (*const u8, usize) {
    let (base, len) = match seg {
        Seg::Bytes(b) => (b.as_ptr(), b.len()),
        Seg::Guest(v) => {
            let guard = v.ptr_guard();
            (guard.as_ptr(), guard.len())
        }
    };
    debug_assert!(skip <= len);
    (base.wrapping_add(skip), len - skip)
}

impl Drop for UringConn {
    fn drop(&mut self) {
        // Zero-copy notifications still owed are the kernel's business now: it
        // holds the pages, and closing the ring waits for them in the background.
        let s = self.stats();
        tracing::debug!(
            peer = %self.sock.peer,
            ops = s.ops,
            cancels = s.cancels,
            zc_notified = s.zc_notified,
            zc_copied = s.zc_copied,
            zc_pending = s.zc_pending,
            "uring connection handle closed"
        );
    }
}

impl Conn for UringConn {
    fn send(&mut self, segs: &[Seg<'_>]) -> Result<()> {
        let mut pos = Pos { seg: 0, skip: 0 };
        let mut stall = Stall::new(self.sock.timeout(), SEND_WAIT_SLICES);
        loop {
            if pos.settle(segs) {
                return Ok(());
            }
            let (count, bytes, zc) = self.fill_iov(segs, pos);
            debug_assert!(count > 0 && bytes > 0);
            // SAFETY: an all-zero msghdr is a valid "no name, no control" header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = self.iov.0.as_mut_ptr();
            msg.msg_iovlen = count as _;
            // MSG_WAITALL: the kernel keeps sending as room appears until all
            // `bytes` are queued, rather than completing at each full buffer.
            let flags = (libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32;
            let entry = if zc {
                let report = if self.setup.zc_report_usage {
                    SEND_ZC_REPORT_USAGE
                } else {
                    0
                };
                opcode::SendMsgZc::new(self.sock.fd(), &msg)
                    .flags(flags)
                    .ioprio(report)
                    .build()
            } else {
                opcode::SendMsg::new(self.sock.fd(), &msg)
                    .flags(flags)
                    .build()
            };
            let slice = stall.slice();
            // SAFETY:
            // - `msg` lives on this frame and points at the first `count` scratch
            //   iovecs, which are not touched until `run` returns;
            // - each iovec covers memory valid for reads for the whole call:
            //   `Seg::Bytes` borrows a live slice, `Seg::Guest` a VolatileSlice
            //   whose lifetime covers `segs` (see the `needs_drop` assertion
            //   above `seg_ptr` for dropping its PtrGuard);
            // - the kernel only reads through them, so a guest writing its memory
            //   meanwhile is a race on raw bytes, never on a Rust reference;
            // - a zero-copy run (`zc`) holds guest memory only, whose pages the
            //   kernel may keep reading after `run` returns: they are pinned, and
            //   what they hold then is what the guest wrote, which dirty tracking
            //   already resends (module docs); `Seg::Bytes` always go by copy;
            // - the socket fd stays open: `self.sock` owns it.
            let c = unsafe { self.ring.run(entry, slice) };
            let c = c.map_err(|e| self.sock.send_err(e))?;
            match progress(&c, bytes).map_err(|e| self.sock.send_err(e))? {
                Step::Moved(n) => {
                    pos.advance(segs, n);
                    stall.progressed();
                }
                Step::End => {
                    return Err(self.sock.send_err(io::Error::from(ErrorKind::WriteZero)));
                }
                Step::Nothing if stall.expired(c.cancelled.then_some(slice).flatten()) => {
                    return Err(self.sock.timeout_err())
                }
                Step::Nothing => {}
            }
        }
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.recv_into(Dst::Bytes(buf))
    }

    fn recv_exact_volatile(&mut self, dst: &VolatileSlice<'_>) -> Result<()> {
        self.recv_into(Dst::Guest(dst))
    }

    fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<()> {
        let ns = match timeout {
            None => NO_TIMEOUT,
            Some(t) => u64::try_from(t.max(SLICE_MIN).as_nanos())
                .unwrap_or(NO_TIMEOUT - 1)
                .min(NO_TIMEOUT - 1),
        };
        self.sock.timeout_ns.store(ns, Ordering::Relaxed);
        Ok(())
    }

    fn try_clone(&self) -> Result<Box<dyn Conn>> {
        let conn = UringConn::new(Arc::clone(&self.sock), self.setup, self.zero_copy_min_bytes)
            .map_err(|source| TransportError::Io {
                op: "try_clone (io_uring_setup)",
                source,
            })?;
        Ok(Box::new(conn))
    }

    fn shutdown(&self) {
        // A receive in flight on any handle's ring is woken by the socket's
        // state change and completes with EOF. ENOTCONN after the first call
        // (or after a reset) is the idempotent case.
        let _ = self.sock.stream.shutdown(Shutdown::Both);
    }

    fn peer(&self) -> String {
        self.sock.peer.clone()
    }
}
