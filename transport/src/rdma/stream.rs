//! One RDMA stream: a connected RC queue pair, its buffers and credits, the
//! progress thread that reaps its completions, and the [`Conn`] handles on it.
//!
//! See the module docs of [`super`] for the protocol; this file is its
//! mechanics. All shared state is in one [`State`] behind one mutex, with
//! one condition variable: user threads post work requests and wait; the
//! progress thread polls the completion queue, updates the state and wakes
//! them.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdma_sys::{
    ibv_access_flags, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wc, ibv_wc_status, ibv_wr_opcode,
};
use vm_memory::VolatileSlice;

use super::verbs::{status_str, Cq, Device, Mr, Qp};
use super::wire::{imm, parse_imm, Cts, Msg, Rts};
use crate::{Conn, MappedMemory, Result, Seg, TransportError};

/// Bytes of each receive slot and staging slot: the largest DATA message.
pub const SLOT_BYTES: usize = 32 << 10;
/// DATA messages a receiver holds at once: the sender's credits.
pub const DATA_CREDITS: usize = 32;
/// Extra receives for control messages (credits, grants, landings, FIN),
/// which are reposted as soon as they are read and take no credit.
pub const CTRL_SLOTS: usize = 32;
/// Receive queue depth.
pub const RECV_SLOTS: usize = DATA_CREDITS + CTRL_SLOTS;
/// Staging slots for outgoing DATA.
pub const SEND_SLOTS: usize = 32;
/// Send queue depth.
pub const SQ_DEPTH: usize = 128;
/// Send queue entries only the progress thread may use (for the WRITE that
/// answers a grant), so it never waits for room.
const SQ_RESERVED: usize = 8;
/// Every this many unsignaled sends, one is signaled (completion moderation).
pub const SIGNAL_EVERY: u32 = 16;
/// A receiver returns credits once this many are owed.
const RETURN_CREDITS_AT: u32 = (DATA_CREDITS / 4) as u32;
/// Bytes a grant into a non-registered destination may cover: the landing
/// buffer's size.
pub const BOUNCE_BYTES: usize = 1 << 20;
/// Guest memory is registered lazily in chunks of this many bytes.
pub const CHUNK_BYTES: usize = 16 << 20;
/// Bytes a control message carries at most (sent inline).
pub const INLINE_BYTES: u32 = 64;
/// How long a dropped stream waits for its last sends to be acknowledged.
const LINGER: Duration = Duration::from_secs(5);
/// After the peer's side channel closes, how long a receiver still waits
/// for messages that were in flight.
const GONE_GRACE: Duration = Duration::from_millis(200);
/// High bit of a receive's work request id.
const RECV_BIT: u64 = 1 << 63;

/// Bytes this process has written one-sided (WRITE WITH IMMEDIATE), for tests.
pub(crate) static ONE_SIDED_BYTES: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// An anonymous mapping for buffers the device reads or writes.
struct Buffer {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a plain memory block; who touches which part when is governed by
// the stream's state under its mutex.
unsafe impl Send for Buffer {}
// SAFETY: as above.
unsafe impl Sync for Buffer {}

impl Buffer {
    fn new(len: usize) -> io::Result<Buffer> {
        // SAFETY: a fresh private anonymous mapping; no existing memory involved.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Buffer {
            ptr: ptr.cast(),
            len,
        })
    }

    fn at(&self, off: usize) -> *mut u8 {
        debug_assert!(off <= self.len);
        // SAFETY: `off` is within the mapping (checked by callers' slot math).
        unsafe { self.ptr.add(off) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length, unmapped once; the MR
        // over it is dropped first (field order of `Stream`).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// What a posted send work request holds until it completes.
#[derive(Clone, Copy, Debug)]
enum SqKind {
    /// A DATA message from this staging slot.
    Staging(usize),
    /// A piece of a granted run, this many bytes.
    Write(u64),
    /// A control message (inline).
    Ctrl,
}

/// One entry of the stream's receive-side queue, in stream order.
#[derive(Debug)]
enum Item {
    /// DATA in receive slot `slot`: `len` bytes, `off` already read.
    Data { slot: usize, len: usize, off: usize },
    /// An announced run of `len` bytes, `off` already granted and landed.
    Run { len: u64, off: u64 },
    /// End of stream.
    Fin,
}

/// The run this side announced and is serving (one at a time: `send`
/// waits for it).
struct RunOut {
    addr: *mut u8,
    lkey: u32,
    len: u64,
    /// Bytes granted so far (grants come in order).
    granted: u64,
    /// Bytes whose WRITE completed.
    landed: u64,
}

/// Memory offered through [`Conn::register_memory`], registered chunk by
/// chunk on first use. Regions drop before the mapping they cover.
struct Registered {
    ranges: Vec<RegRange>,
    mem: Arc<dyn MappedMemory>,
}

struct RegRange {
    start: usize,
    len: usize,
    /// Per chunk: a local-read registration (for sending).
    read: Vec<Option<Mr>>,
    /// Per chunk: a remote-write registration (for receiving).
    write: Vec<Option<Mr>>,
}

/// Why a stream can no longer move bytes.
#[derive(Clone, Debug)]
struct Broken {
    kind: ErrorKind,
    what: String,
}

/// Everything the handles and the progress thread share.
struct State {
    // Sending.
    credits: u32,
    credits_max: u32,
    free_staging: Vec<usize>,
    sq: VecDeque<(u64, SqKind)>,
    sq_next: u64,
    unsignaled: u32,
    run_out: Option<RunOut>,
    fin_sent: bool,
    // Receiving.
    inbound: VecDeque<Item>,
    owed: u32,
    next_token: u32,
    landed_token: Option<(u32, u32)>,
    // Life.
    timeout: Option<Duration>,
    shut: bool,
    peer_gone: Option<Instant>,
    broken: Option<Broken>,
    stop: bool,
    regs: Vec<Registered>,
    /// Bytes this stream sent as DATA (copied) and one-sided (WRITE).
    copied_bytes: u64,
    one_sided_bytes: u64,
    /// Registering guest memory failed once: everything goes by copy.
    copy_only: bool,
}

// SAFETY: the raw pointer in `run_out` points into registered guest memory
// kept alive by `regs`; it is only used to build work requests.
unsafe impl Send for State {}

/// The stream: verbs resources (dropped in field order: QP and MRs before
/// the CQ, buffers and device), the side channel, the shared state.
pub struct Stream {
    qp: Qp,
    recv_mr: Mr,
    send_mr: Mr,
    bounce_mr: Mr,
    recv_buf: Buffer,
    send_buf: Buffer,
    bounce: Buffer,
    cq: Arc<Cq>,
    device: Arc<Device>,
    state: Mutex<State>,
    cond: Condvar,
    /// Serialises `send` calls of different handles (a message's bytes stay together).
    send_lock: Mutex<()>,
    /// Serialises receives the same way.
    recv_lock: Mutex<()>,
    wake: OwnedFd,
    side: TcpStream,
    peer: String,
    /// Bytes of a DATA message: the smaller of our slots and the peer's.
    data_bytes: usize,
    rendezvous_min: usize,
}

/// Everything [`Stream::new`] needs, set up by the connect or accept path.
pub struct Parts {
    pub qp: Qp,
    pub cq: Arc<Cq>,
    pub side: TcpStream,
    pub peer: String,
    pub rendezvous_min: usize,
}

/// Receive and staging buffers, registered, before the QP connects
/// (receives must be posted before the peer may send).
pub struct Buffers {
    recv_buf: Buffer,
    send_buf: Buffer,
    bounce: Buffer,
    recv_mr: Mr,
    send_mr: Mr,
    bounce_mr: Mr,
}

impl Buffers {
    /// Maps and registers the buffers of one stream on `device`.
    pub fn new(device: &Arc<Device>) -> io::Result<Buffers> {
        let recv_buf = Buffer::new(RECV_SLOTS * SLOT_BYTES)?;
        let send_buf = Buffer::new(SEND_SLOTS * SLOT_BYTES)?;
        let bounce = Buffer::new(BOUNCE_BYTES)?;
        let local = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        let remote = local | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        // SAFETY: each buffer outlives its MR: both move into the Stream,
        // whose field order drops the MRs first.
        let (recv_mr, send_mr, bounce_mr) = unsafe {
            (
                device.register(recv_buf.ptr, recv_buf.len, local)?,
                device.register(send_buf.ptr, send_buf.len, ibv_access_flags(0))?,
                device.register(bounce.ptr, bounce.len, remote)?,
            )
        };
        Ok(Buffers {
            recv_buf,
            send_buf,
            bounce,
            recv_mr,
            send_mr,
            bounce_mr,
        })
    }

    /// Posts every receive slot on `qp` (in INIT or later).
    pub fn post_receives(&self, qp: &Qp) -> io::Result<()> {
        for slot in 0..RECV_SLOTS {
            // SAFETY: the slot lies in the registered receive buffer, which
            // lives as long as the QP (both end up in one Stream).
            unsafe {
                qp.post_recv(
                    RECV_BIT | slot as u64,
                    self.recv_buf.at(slot * SLOT_BYTES),
                    SLOT_BYTES as u32,
                    self.recv_mr.lkey(),
                )?;
            }
        }
        Ok(())
    }
}

impl Stream {
    /// A connected stream; `peer_credits` and `peer_slot_bytes` come from
    /// the peer's hello. Starts the progress thread and returns the first handle.
    pub fn start(
        parts: Parts,
        bufs: Buffers,
        peer_credits: u16,
        peer_slot_bytes: u32,
    ) -> io::Result<Box<dyn Conn>> {
        // SAFETY: plain eventfd creation.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh fd owned by nobody else.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };
        parts.side.set_nonblocking(true)?;
        let device = parts.qp.device().clone();
        let stream = Arc::new(Stream {
            qp: parts.qp,
            recv_mr: bufs.recv_mr,
            send_mr: bufs.send_mr,
            bounce_mr: bufs.bounce_mr,
            recv_buf: bufs.recv_buf,
            send_buf: bufs.send_buf,
            bounce: bufs.bounce,
            cq: parts.cq,
            device,
            state: Mutex::new(State {
                credits: u32::from(peer_credits),
                credits_max: u32::from(peer_credits),
                free_staging: (0..SEND_SLOTS).rev().collect(),
                sq: VecDeque::with_capacity(SQ_DEPTH),
                sq_next: 1,
                unsignaled: 0,
                run_out: None,
                fin_sent: false,
                inbound: VecDeque::new(),
                owed: 0,
                next_token: 1,
                landed_token: None,
                timeout: None,
                shut: false,
                peer_gone: None,
                broken: None,
                stop: false,
                regs: Vec::new(),
                copied_bytes: 0,
                one_sided_bytes: 0,
                copy_only: false,
            }),
            cond: Condvar::new(),
            send_lock: Mutex::new(()),
            recv_lock: Mutex::new(()),
            wake,
            side: parts.side,
            peer: parts.peer,
            data_bytes: SLOT_BYTES.min(peer_slot_bytes as usize),
            rendezvous_min: parts.rendezvous_min,
        });
        stream.cq.arm()?;
        let progress = {
            let s = stream.clone();
            std::thread::Builder::new()
                .name("ferry-rdma".into())
                .spawn(move || s.progress())?
        };
        let handles = Arc::new(Handles {
            stream,
            progress: Mutex::new(Some(progress)),
        });
        Ok(Box::new(RdmaConn { h: handles }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- progress thread ----

    fn progress(self: Arc<Self>) {
        let mut wcs: Vec<ibv_wc> = (0..32)
            // SAFETY: ibv_wc is plain data; zero is a valid value.
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        let mut watch_side = true;
        loop {
            if let Err(e) = self.drain(&mut wcs) {
                self.fail(ErrorKind::Other, format!("polling completions failed: {e}"));
            }
            if self.lock().stop {
                return;
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.cq.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: if watch_side {
                        self.side.as_raw_fd()
                    } else {
                        -1
                    },
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a live array of three pollfds; the fds are open
            // while self lives (a negative fd is ignored by poll).
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != ErrorKind::Interrupted {
                    self.fail(ErrorKind::Other, format!("poll failed: {e}"));
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            if fds[0].revents != 0 {
                while self.cq.take_event() {}
                if let Err(e) = self.cq.arm() {
                    self.fail(
                        ErrorKind::Other,
                        format!("arming the completion queue failed: {e}"),
                    );
                }
            }
            if fds[1].revents != 0 {
                let mut v = 0u64;
                // SAFETY: reads 8 bytes into a live u64 from our eventfd.
                unsafe { libc::read(self.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
            }
            if watch_side && fds[2].revents != 0 && self.side_closed() {
                watch_side = false;
                // Messages acknowledged before the close are in the CQ by now.
                let _ = self.drain(&mut wcs);
                let mut st = self.lock();
                st.peer_gone = Some(Instant::now());
                drop(st);
                self.cond.notify_all();
                // Wake up once the grace period ends, for receivers waiting on it.
                let s = self.clone();
                let _ = std::thread::Builder::new()
                    .name("ferry-rdma-grace".into())
                    .spawn(move || {
                        std::thread::sleep(GONE_GRACE);
                        s.cond.notify_all();
                    });
            }
        }
    }

    /// True once the side channel reports end of stream or an error; the
    /// peer never writes to it after set-up, so any byte is a violation too.
    fn side_closed(&self) -> bool {
        let mut b = [0u8; 1];
        match (&self.side).read(&mut b) {
            Ok(0 | 1) => true,
            Ok(_) => unreachable!("read into one byte"),
            Err(e) => e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::Interrupted,
        }
    }

    /// Reaps every completion now in the CQ.
    fn drain(&self, wcs: &mut [ibv_wc]) -> io::Result<()> {
        loop {
            let n = self.cq.poll(wcs)?;
            if n == 0 {
                return Ok(());
            }
            let mut st = self.lock();
            for wc in &wcs[..n] {
                self.complete(&mut st, wc);
            }
            drop(st);
            self.cond.notify_all();
        }
    }

    fn complete(&self, st: &mut State, wc: &ibv_wc) {
        if wc.wr_id & RECV_BIT == 0 {
            if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                let what = format!(
                    "a send to {} failed: {} (the peer is gone or unreachable)",
                    self.peer,
                    status_str(wc.status)
                );
                set_broken(st, ErrorKind::ConnectionReset, what);
            }
            retire(st, wc.wr_id);
            return;
        }
        let slot = (wc.wr_id & !RECV_BIT) as usize;
        if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
            if wc.status != ibv_wc_status::IBV_WC_WR_FLUSH_ERR || st.broken.is_none() {
                let what = format!(
                    "a receive from {} failed: {}",
                    self.peer,
                    status_str(wc.status)
                );
                set_broken(st, ErrorKind::ConnectionReset, what);
            }
            return;
        }
        // SAFETY: the immediate union member is the one set for messages
        // with immediates; every message of this protocol carries one.
        let raw = u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data });
        let len = wc.byte_len as usize;
        let Some((msg, value)) = parse_imm(raw) else {
            return self.violation(st, format!("unknown message type in immediate {raw:#x}"));
        };
        // SAFETY: the slot's receive completed, so the device is done with
        // it; it is reposted only after these bytes are read.
        let payload = unsafe {
            std::slice::from_raw_parts(self.recv_buf.at(slot * SLOT_BYTES), len.min(SLOT_BYTES))
        };
        match msg {
            Msg::Data => {
                if len == 0 || len > SLOT_BYTES {
                    return self.violation(st, format!("DATA of {len} bytes"));
                }
                if !self.take_credits(st, value) {
                    return;
                }
                st.inbound.push_back(Item::Data { slot, len, off: 0 });
                return; // the slot stays with the reader
            }
            Msg::Credit => {
                if !self.take_credits(st, value) {
                    return;
                }
            }
            Msg::Rts => match Rts::decode(payload) {
                Some(r) => st.inbound.push_back(Item::Run { len: r.len, off: 0 }),
                None => return self.violation(st, format!("bad RTS payload ({len} bytes)")),
            },
            Msg::Cts => match Cts::decode(payload) {
                Some(c) => {
                    if let Err(what) = self.serve(st, c) {
                        return self.violation(st, what);
                    }
                }
                None => return self.violation(st, format!("bad CTS payload ({len} bytes)")),
            },
            Msg::Written => st.landed_token = Some((value, wc.byte_len)),
            Msg::Fin => st.inbound.push_back(Item::Fin),
        }
        if let Err(e) = self.repost(slot) {
            set_broken(
                st,
                ErrorKind::Other,
                format!("reposting a receive failed: {e}"),
            );
        }
    }

    fn take_credits(&self, st: &mut State, value: u32) -> bool {
        st.credits += value;
        if st.credits > st.credits_max {
            let what = format!(
                "the peer returned more credits than it has ({})",
                st.credits
            );
            self.violation(st, what);
            return false;
        }
        true
    }

    fn violation(&self, st: &mut State, what: String) {
        tracing::warn!("rdma stream from {}: protocol violation: {what}", self.peer);
        set_broken(
            st,
            ErrorKind::InvalidData,
            format!("protocol violation by {}: {what}", self.peer),
        );
        self.qp.set_error();
    }

    fn repost(&self, slot: usize) -> io::Result<()> {
        // SAFETY: the slot lies in the registered receive buffer, which lives
        // as long as the QP; nobody reads it until its next completion.
        unsafe {
            self.qp.post_recv(
                RECV_BIT | slot as u64,
                self.recv_buf.at(slot * SLOT_BYTES),
                SLOT_BYTES as u32,
                self.recv_mr.lkey(),
            )
        }
    }

    /// Answers a grant: WRITE WITH IMMEDIATE of the piece, from our memory
    /// straight into the peer's.
    fn serve(&self, st: &mut State, c: Cts) -> std::result::Result<(), String> {
        let Some(run) = st.run_out.as_mut() else {
            return Err("a grant for no announced run".into());
        };
        if c.off != run.granted || c.off + u64::from(c.len) > run.len {
            return Err(format!(
                "grant of {} bytes at {} for a run of {} with {} granted",
                c.len, c.off, run.len, run.granted
            ));
        }
        run.granted += u64::from(c.len);
        // SAFETY: `off` is inside the run, which lies in one registered chunk.
        let addr = unsafe { run.addr.add(c.off as usize) };
        let lkey = run.lkey;
        let mut sge = ibv_sge {
            addr: addr as u64,
            length: c.len,
            lkey,
        };
        // SAFETY: plain data; zero is valid for every field not set.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.imm_data_invalidated_rkey_union.imm_data = imm(Msg::Written, c.token).to_be();
        wr.wr.rdma.remote_addr = c.addr;
        wr.wr.rdma.rkey = c.rkey;
        // SAFETY: the source lies in a registered chunk (kept alive by the
        // registration in `st.regs`); the sender's `send` call, which lent
        // that memory, waits until this WRITE completes; the remote address
        // and key are the peer's own grant.
        post(&self.qp, st, &mut wr, SqKind::Write(u64::from(c.len)), true)
            .map_err(|e| format!("posting a WRITE failed: {e}"))
    }

    fn fail(&self, kind: ErrorKind, what: String) {
        let mut st = self.lock();
        set_broken(&mut st, kind, what);
        drop(st);
        self.cond.notify_all();
    }

    // ---- user side ----

    /// Waits on the condition variable for at most the stream's deadline.
    /// Returns false when the deadline passed.
    fn wait<'a>(
        &self,
        st: MutexGuard<'a, State>,
        deadline: Option<Instant>,
    ) -> (MutexGuard<'a, State>, bool) {
        match deadline {
            None => (self.cond.wait(st).unwrap_or_else(|e| e.into_inner()), true),
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    return (st, false);
                }
                let (g, _) = self
                    .cond
                    .wait_timeout(st, d - now)
                    .unwrap_or_else(|e| e.into_inner());
                (g, true)
            }
        }
    }

    fn deadline(st: &State) -> Option<Instant> {
        st.timeout.map(|t| Instant::now() + t)
    }

    fn send_error(&self, kind: ErrorKind, what: impl Into<String>) -> TransportError {
        TransportError::Send {
            peer: self.peer.clone(),
            source: io::Error::new(kind, what.into()),
        }
    }

    fn recv_error(&self, kind: ErrorKind, what: impl Into<String>) -> TransportError {
        TransportError::Recv {
            peer: self.peer.clone(),
            source: io::Error::new(kind, what.into()),
        }
    }

    fn timeout(&self, st: &mut State, partial: bool) -> TransportError {
        if partial {
            // Part of a message moved: the stream cannot be resynchronised.
            set_broken(
                st,
                ErrorKind::TimedOut,
                "a send or receive timed out midway".into(),
            );
        }
        TransportError::Timeout {
            peer: self.peer.clone(),
        }
    }

    /// Why a send cannot go on, if it cannot.
    fn send_blocked(&self, st: &State) -> Option<TransportError> {
        if let Some(b) = &st.broken {
            return Some(self.send_error(b.kind, b.what.clone()));
        }
        if st.shut || st.fin_sent {
            return Some(self.send_error(ErrorKind::BrokenPipe, "the stream was shut down"));
        }
        if st.inbound.iter().any(|i| matches!(i, Item::Fin)) {
            return Some(self.send_error(ErrorKind::BrokenPipe, "the peer shut the stream down"));
        }
        if st.peer_gone.is_some() {
            return Some(self.send_error(ErrorKind::ConnectionReset, "the peer is gone"));
        }
        None
    }

    fn send(&self, segs: &[Seg<'_>]) -> Result<()> {
        let _one = self.send_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut staged: Option<(usize, usize)> = None; // (slot, bytes filled)
        let mut any = false;
        for seg in segs {
            match seg {
                Seg::Bytes(b) => {
                    let mut at = 0;
                    while at < b.len() {
                        let (slot, fill) = self.staging(&mut staged, any)?;
                        let n = (self.data_bytes - fill).min(b.len() - at);
                        // SAFETY: the slot is ours (off the free list, not
                        // posted); `fill + n` stays within it.
                        unsafe {
                            ptr::copy_nonoverlapping(
                                b[at..].as_ptr(),
                                self.send_buf.at(slot * SLOT_BYTES + fill),
                                n,
                            );
                        }
                        at += n;
                        any = true;
                        self.filled(&mut staged, n)?;
                    }
                }
                Seg::Guest(v) => {
                    let mut at = 0;
                    while at < v.len() {
                        let rest = v.subslice(at, v.len() - at).expect("inside the segment");
                        if rest.len() >= self.rendezvous_min {
                            let ptr = rest.ptr_guard().as_ptr() as *mut u8;
                            if let Some((lkey, n)) = self.read_key(ptr, rest.len()) {
                                if let Some((slot, fill)) = staged.take() {
                                    self.post_data(slot, fill, true)?;
                                }
                                self.run(ptr, lkey, n, any)?;
                                at += n;
                                any = true;
                                continue;
                            }
                        }
                        let (slot, fill) = self.staging(&mut staged, any)?;
                        let n = (self.data_bytes - fill).min(rest.len());
                        // SAFETY: as above; the guest memory is read through
                        // a volatile copy, never as a `&[u8]`.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                self.send_buf.at(slot * SLOT_BYTES + fill),
                                n,
                            )
                        };
                        rest.subslice(0, n).expect("n <= len").copy_to(dst);
                        at += n;
                        any = true;
                        self.filled(&mut staged, n)?;
                    }
                }
            }
        }
        if let Some((slot, fill)) = staged.take() {
            self.post_data(slot, fill, any)?;
        }
        Ok(())
    }

    /// The current staging slot, taking a free one (waiting) if none.
    fn staging(
        &self,
        staged: &mut Option<(usize, usize)>,
        partial: bool,
    ) -> Result<(usize, usize)> {
        if let Some(s) = *staged {
            return Ok(s);
        }
        let mut st = self.lock();
        let deadline = Self::deadline(&st);
        loop {
            if let Some(e) = self.send_blocked(&st) {
                return Err(e);
            }
            if let Some(slot) = st.free_staging.pop() {
                *staged = Some((slot, 0));
                return Ok((slot, 0));
            }
            let (g, ok) = self.wait(st, deadline);
            st = g;
            if !ok {
                return Err(self.timeout(&mut st, partial));
            }
        }
    }

    fn filled(&self, staged: &mut Option<(usize, usize)>, n: usize) -> Result<()> {
        let (slot, fill) = staged.as_mut().expect("a slot is staged");
        *fill += n;
        if *fill == self.data_bytes {
            let (slot, fill) = (*slot, *fill);
            *staged = None;
            self.post_data(slot, fill, true)?;
        }
        Ok(())
    }

    /// Sends staging slot `slot` (`len` bytes) as DATA, waiting for a credit.
    fn post_data(&self, slot: usize, len: usize, partial: bool) -> Result<()> {
        let mut st = self.lock();
        let deadline = Self::deadline(&st);
        loop {
            if let Some(e) = self.send_blocked(&st) {
                st.free_staging.push(slot);
                return Err(e);
            }
            if st.credits > 0 && st.sq.len() < SQ_DEPTH - SQ_RESERVED {
                break;
            }
            let (g, ok) = self.wait(st, deadline);
            st = g;
            if !ok {
                st.free_staging.push(slot);
                return Err(self.timeout(&mut st, partial));
            }
        }
        st.credits -= 1;
        st.copied_bytes += len as u64;
        let owed = std::mem::take(&mut st.owed);
        let mut sge = ibv_sge {
            addr: self.send_buf.at(slot * SLOT_BYTES) as u64,
            length: len as u32,
            lkey: self.send_mr.lkey(),
        };
        // SAFETY: plain data.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND_WITH_IMM;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.imm_data_invalidated_rkey_union.imm_data = imm(Msg::Data, owed).to_be();
        let last_slot = st.free_staging.is_empty();
        // SAFETY: the slot is registered and stays off the free list until
        // this request (or a later signaled one) completes.
        let r = post(&self.qp, &mut st, &mut wr, SqKind::Staging(slot), last_slot);
        if let Err(e) = r {
            st.free_staging.push(slot);
            st.owed += owed;
            let what = format!("posting a send failed: {e}");
            set_broken(&mut st, ErrorKind::Other, what.clone());
            return Err(self.send_error(ErrorKind::Other, what));
        }
        Ok(())
    }

    /// Sends a control message (inline payload), waiting for queue room.
    fn post_ctrl(
        &self,
        st: &mut MutexGuard<'_, State>,
        msg: Msg,
        value: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        debug_assert!(payload.len() <= INLINE_BYTES as usize);
        let mut sge = ibv_sge {
            addr: payload.as_ptr() as u64,
            length: payload.len() as u32,
            lkey: 0,
        };
        // SAFETY: plain data.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND_WITH_IMM;
        if !payload.is_empty() {
            wr.sg_list = &mut sge;
            wr.num_sge = 1;
            wr.send_flags = ibv_send_flags::IBV_SEND_INLINE.0;
        }
        wr.imm_data_invalidated_rkey_union.imm_data = imm(msg, value).to_be();
        // SAFETY: inline data is copied by the post itself; there is no
        // other memory in the request.
        post(&self.qp, st, &mut wr, SqKind::Ctrl, msg == Msg::Fin)
    }

    /// Waits for queue room for a control message from a user thread.
    fn ctrl_room<'a>(
        &self,
        mut st: MutexGuard<'a, State>,
        deadline: Option<Instant>,
    ) -> std::result::Result<MutexGuard<'a, State>, (MutexGuard<'a, State>, bool)> {
        loop {
            if st.broken.is_some() {
                return Err((st, true));
            }
            if st.sq.len() < SQ_DEPTH - SQ_RESERVED {
                return Ok(st);
            }
            let (g, ok) = self.wait(st, deadline);
            st = g;
            if !ok {
                return Err((st, false));
            }
        }
    }

    /// Announces a run of registered memory and serves the receiver's
    /// grants until all of it has landed.
    fn run(&self, addr: *mut u8, lkey: u32, len: usize, partial: bool) -> Result<()> {
        let st = self.lock();
        let deadline = Self::deadline(&st);
        let mut st = match self.ctrl_room(st, deadline) {
            Ok(st) => st,
            Err((mut st, broken)) => {
                return Err(match (broken, self.send_blocked(&st)) {
                    (true, Some(e)) => e,
                    _ => self.timeout(&mut st, partial),
                })
            }
        };
        if let Some(e) = self.send_blocked(&st) {
            return Err(e);
        }
        st.run_out = Some(RunOut {
            addr,
            lkey,
            len: len as u64,
            granted: 0,
            landed: 0,
        });
        let rts = Rts { len: len as u64 }.encode();
        if let Err(e) = self.post_ctrl(&mut st, Msg::Rts, 0, &rts) {
            st.run_out = None;
            let what = format!("posting a send failed: {e}");
            set_broken(&mut st, ErrorKind::Other, what.clone());
            return Err(self.send_error(ErrorKind::Other, what));
        }
        loop {
            let done = st.run_out.as_ref().is_some_and(|r| r.landed == r.len);
            if done {
                st.run_out = None;
                return Ok(());
            }
            if let Some(e) = self.send_blocked(&st) {
                // A WRITE may still be in flight from this memory; it is
                // registered and stays mapped, and the stream is dead.
                st.run_out = None;
                return Err(e);
            }
            let before = st.run_out.as_ref().map_or(0, |r| r.landed);
            let (g, ok) = self.wait(st, deadline);
            st = g;
            let after = st.run_out.as_ref().map_or(0, |r| r.landed);
            if !ok && after == before {
                st.run_out = None;
                return Err(self.timeout(&mut st, true));
            }
        }
    }

    /// Lkey and usable length of a registered run starting at `ptr`
    /// (registering its chunk on first use); `None` if `ptr` is not in
    /// registered memory, or registering failed (then everything of this
    /// stream goes by copy).
    fn read_key(&self, ptr: *mut u8, len: usize) -> Option<(u32, usize)> {
        self.key(ptr, len, false)
    }

    /// Rkey and usable length for a destination at `ptr`, as [`Self::read_key`].
    fn write_key(&self, ptr: *mut u8, len: usize) -> Option<(u32, usize)> {
        self.key(ptr, len, true)
    }

    fn key(&self, ptr: *mut u8, len: usize, write: bool) -> Option<(u32, usize)> {
        let mut st = self.lock();
        if st.copy_only {
            return None;
        }
        let a = ptr as usize;
        let mut failed = None;
        'search: for reg in &mut st.regs {
            for r in &mut reg.ranges {
                if a < r.start || a >= r.start + r.len {
                    continue;
                }
                let chunk = (a - r.start) / CHUNK_BYTES;
                let chunk_start = r.start + chunk * CHUNK_BYTES;
                let chunk_len = CHUNK_BYTES.min(r.start + r.len - chunk_start);
                let n = len.min(chunk_start + chunk_len - a);
                let slot = if write {
                    &mut r.write[chunk]
                } else {
                    &mut r.read[chunk]
                };
                if slot.is_none() {
                    let access = if write {
                        ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
                    } else {
                        ibv_access_flags(0)
                    };
                    // SAFETY: the chunk lies in a range the MappedMemory keeps
                    // mapped while `reg` lives, and the MR drops before it.
                    match unsafe {
                        self.device
                            .register(chunk_start as *mut u8, chunk_len, access)
                    } {
                        Ok(mr) => *slot = Some(mr),
                        Err(e) => {
                            failed = Some(e);
                            break 'search;
                        }
                    }
                }
                let mr = slot.as_ref().expect("registered above");
                return Some((if write { mr.rkey() } else { mr.lkey() }, n));
            }
        }
        if let Some(e) = failed {
            // Most likely RLIMIT_MEMLOCK without CAP_IPC_LOCK: slower, not wrong.
            tracing::warn!(
                "rdma stream to {}: cannot register guest memory ({e}); its pages go by copy",
                self.peer
            );
            st.copy_only = true;
        }
        None
    }

    fn recv(&self, mut dst: Dst<'_, '_>) -> Result<()> {
        let _one = self.recv_lock.lock().unwrap_or_else(|e| e.into_inner());
        let total = dst.len();
        let mut filled = 0;
        let mut st = self.lock();
        let mut deadline = Self::deadline(&st);
        while filled < total {
            if let Some(b) = &st.broken {
                return Err(self.recv_error(b.kind, b.what.clone()));
            }
            if st.shut {
                return Err(self.ended(
                    filled,
                    ErrorKind::UnexpectedEof,
                    "the stream was shut down mid-message",
                ));
            }
            match st.inbound.front_mut() {
                Some(Item::Data { slot, len, off }) => {
                    let n = (*len - *off).min(total - filled);
                    // SAFETY: the slot's receive completed and it is not
                    // reposted until fully read; `off + n <= len <= SLOT_BYTES`.
                    let src = unsafe {
                        std::slice::from_raw_parts(self.recv_buf.at(*slot * SLOT_BYTES + *off), n)
                    };
                    dst.write(filled, src);
                    *off += n;
                    filled += n;
                    if *off == *len {
                        let slot = *slot;
                        st.inbound.pop_front();
                        if let Err(e) = self.repost(slot) {
                            let what = format!("reposting a receive failed: {e}");
                            set_broken(&mut st, ErrorKind::Other, what.clone());
                            return Err(self.recv_error(ErrorKind::Other, what));
                        }
                        st.owed += 1;
                        if st.owed >= RETURN_CREDITS_AT {
                            let owed = std::mem::take(&mut st.owed);
                            st = match self.ctrl_room(st, deadline) {
                                Ok(mut g) => {
                                    if let Err(e) = self.post_ctrl(&mut g, Msg::Credit, owed, &[]) {
                                        set_broken(
                                            &mut g,
                                            ErrorKind::Other,
                                            format!("posting credits failed: {e}"),
                                        );
                                    }
                                    g
                                }
                                Err((mut g, _)) => {
                                    g.owed += owed;
                                    g
                                }
                            };
                        }
                    }
                    deadline = Self::deadline(&st);
                }
                Some(Item::Run { len, off }) => {
                    let (run_len, run_off) = (*len, *off);
                    let want = (run_len - run_off).min((total - filled) as u64) as usize;
                    drop(st);
                    let direct = match &dst {
                        Dst::Guest(v) => {
                            let p = v.ptr_guard_mut().as_ptr();
                            // SAFETY: `filled < total = v.len()`.
                            let p = unsafe { p.add(filled) };
                            self.write_key(p, want).map(|(rkey, n)| (p as u64, rkey, n))
                        }
                        Dst::Plain(_) => None,
                    };
                    let (addr, rkey, n, bounce) = match direct {
                        Some((addr, rkey, n)) => (addr, rkey, n, false),
                        None => (
                            self.bounce.ptr as u64,
                            self.bounce_mr.rkey(),
                            want.min(BOUNCE_BYTES),
                            true,
                        ),
                    };
                    st = self.lock();
                    let token = st.next_token;
                    st.next_token = if token >= super::wire::VALUE_MASK {
                        1
                    } else {
                        token + 1
                    };
                    st.landed_token = None;
                    let cts = Cts {
                        off: run_off,
                        addr,
                        len: n as u32,
                        rkey,
                        token,
                    }
                    .encode();
                    st = match self.ctrl_room(st, deadline) {
                        Ok(g) => g,
                        Err((mut g, broken)) => {
                            if broken {
                                let b = g.broken.clone().expect("broken");
                                return Err(self.recv_error(b.kind, b.what));
                            }
                            return Err(self.timeout(&mut g, filled > 0));
                        }
                    };
                    if let Err(e) = self.post_ctrl(&mut st, Msg::Cts, 0, &cts) {
                        let what = format!("posting a grant failed: {e}");
                        set_broken(&mut st, ErrorKind::Other, what.clone());
                        return Err(self.recv_error(ErrorKind::Other, what));
                    }
                    loop {
                        if let Some((t, bytes)) = st.landed_token {
                            if t != token || bytes as usize != n {
                                let what = format!(
                                    "protocol violation by {}: landing {t} of {bytes} bytes for grant {token} of {n}",
                                    self.peer
                                );
                                set_broken(&mut st, ErrorKind::InvalidData, what.clone());
                                self.qp.set_error();
                                return Err(self.recv_error(ErrorKind::InvalidData, what));
                            }
                            break;
                        }
                        if let Some(b) = &st.broken {
                            return Err(self.recv_error(b.kind, b.what.clone()));
                        }
                        if st.shut {
                            return Err(self.recv_error(
                                ErrorKind::UnexpectedEof,
                                "the stream was shut down mid-message",
                            ));
                        }
                        if self.gone_for_good(&st) {
                            return Err(self.recv_error(
                                ErrorKind::ConnectionReset,
                                "the peer went away mid-message",
                            ));
                        }
                        let (g, ok) = self.wait(st, deadline);
                        st = g;
                        if !ok && st.landed_token.is_none() {
                            return Err(self.timeout(&mut st, true));
                        }
                    }
                    st.landed_token = None;
                    if bounce {
                        // SAFETY: the WRITE into the landing buffer completed
                        // (its immediate arrived after the data); nothing
                        // writes it until our next grant.
                        let src = unsafe { std::slice::from_raw_parts(self.bounce.ptr, n) };
                        dst.write(filled, src);
                    }
                    filled += n;
                    if let Some(Item::Run { len, off }) = st.inbound.front_mut() {
                        *off += n as u64;
                        if *off == *len {
                            st.inbound.pop_front();
                        }
                    }
                    deadline = Self::deadline(&st);
                }
                Some(Item::Fin) => {
                    return Err(self.ended(
                        filled,
                        ErrorKind::UnexpectedEof,
                        "the peer closed the stream mid-message",
                    ));
                }
                None => {
                    if self.gone_for_good(&st) {
                        return Err(self.ended(
                            filled,
                            ErrorKind::ConnectionReset,
                            "the peer went away mid-message",
                        ));
                    }
                    let (g, ok) = self.wait(st, deadline);
                    st = g;
                    if !ok && st.inbound.is_empty() {
                        return Err(self.timeout(&mut st, filled > 0));
                    }
                }
            }
        }
        Ok(())
    }

    /// End of stream for a receive that got `filled` bytes: `Closed` at a
    /// message boundary, else a `Recv` error of `kind` saying `what`.
    fn ended(&self, filled: usize, kind: ErrorKind, what: &str) -> TransportError {
        if filled == 0 {
            TransportError::Closed {
                peer: self.peer.clone(),
            }
        } else {
            self.recv_error(kind, what)
        }
    }

    fn gone_for_good(&self, st: &State) -> bool {
        st.peer_gone.is_some_and(|t| t.elapsed() >= GONE_GRACE)
    }

    fn shutdown(&self) {
        let mut st = self.lock();
        if !st.shut {
            st.shut = true;
            self.send_fin(&mut st);
        }
        drop(st);
        self.cond.notify_all();
    }

    fn send_fin(&self, st: &mut MutexGuard<'_, State>) {
        if st.fin_sent || st.broken.is_some() || st.peer_gone.is_some() {
            return;
        }
        st.fin_sent = true;
        // The reserved entries guarantee room: FIN is the last message.
        if let Err(e) = self.post_ctrl(st, Msg::Fin, 0, &[]) {
            tracing::debug!("rdma stream to {}: posting FIN failed: {e}", self.peer);
        }
    }

    /// Last handle gone: let the last sends be acknowledged, say FIN, stop
    /// the progress thread.
    fn close(&self, progress: Option<JoinHandle<()>>) {
        let mut st = self.lock();
        self.send_fin(&mut st);
        let until = Instant::now() + LINGER;
        while !st.sq.is_empty() && st.broken.is_none() && st.peer_gone.is_none() {
            let now = Instant::now();
            if now >= until {
                tracing::debug!(
                    "rdma stream to {}: closing with {} sends unacknowledged",
                    self.peer,
                    st.sq.len()
                );
                break;
            }
            st = self
                .cond
                .wait_timeout(st, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.stop = true;
        if st.copied_bytes + st.one_sided_bytes > 0 {
            tracing::info!(
                "rdma stream to {} closed: sent {} KiB one-sided (WRITE WITH IMMEDIATE into \
                 registered memory), {} KiB copied (SEND)",
                self.peer,
                st.one_sided_bytes >> 10,
                st.copied_bytes >> 10
            );
        }
        drop(st);
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(t) = progress {
            let _ = t.join();
        }
        let _ = self.side.shutdown(std::net::Shutdown::Both);
    }
}

/// Posts `wr` as the next send request of kind `kind`, signaled when
/// `signal`, every [`SIGNAL_EVERY`]th time, or when the queue is nearly full.
fn post(
    qp: &Qp,
    st: &mut State,
    wr: &mut ibv_send_wr,
    kind: SqKind,
    signal: bool,
) -> io::Result<()> {
    let seq = st.sq_next;
    let signal =
        signal || st.unsignaled + 1 >= SIGNAL_EVERY || st.sq.len() + 1 >= SQ_DEPTH - SQ_RESERVED;
    wr.wr_id = seq;
    if signal {
        wr.send_flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
    }
    // SAFETY: per `Qp::post_send`, upheld by each caller for its request.
    unsafe { qp.post_send(wr) }?;
    st.sq_next += 1;
    st.sq.push_back((seq, kind));
    st.unsignaled = if signal { 0 } else { st.unsignaled + 1 };
    Ok(())
}

/// A signaled send completed: it and every send before it are done.
fn retire(st: &mut State, seq: u64) {
    while let Some(&(s, kind)) = st.sq.front() {
        if s > seq {
            break;
        }
        st.sq.pop_front();
        match kind {
            SqKind::Staging(slot) => st.free_staging.push(slot),
            SqKind::Write(n) => {
                ONE_SIDED_BYTES.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                st.one_sided_bytes += n;
                if let Some(r) = st.run_out.as_mut() {
                    r.landed += n;
                }
            }
            SqKind::Ctrl => {}
        }
    }
}

fn set_broken(st: &mut State, kind: ErrorKind, what: String) {
    if st.broken.is_none() {
        st.broken = Some(Broken { kind, what });
    }
}

/// Where received bytes go.
enum Dst<'a, 'b> {
    Plain(&'a mut [u8]),
    Guest(&'a VolatileSlice<'b>),
}

impl Dst<'_, '_> {
    fn len(&self) -> usize {
        match self {
            Dst::Plain(b) => b.len(),
            Dst::Guest(v) => v.len(),
        }
    }

    fn write(&mut self, at: usize, src: &[u8]) {
        match self {
            Dst::Plain(b) => b[at..at + src.len()].copy_from_slice(src),
            Dst::Guest(v) => v
                .subslice(at, src.len())
                .expect("inside the destination")
                .copy_from(src),
        }
    }
}

/// The handles' common part: the last one to go closes the stream.
struct Handles {
    stream: Arc<Stream>,
    progress: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handles {
    fn drop(&mut self) {
        let progress = self
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.stream.close(progress);
    }
}

/// A [`Conn`] handle on an RDMA stream.
pub struct RdmaConn {
    h: Arc<Handles>,
}

impl Conn for RdmaConn {
    fn send(&mut self, segs: &[Seg<'_>]) -> Result<()> {
        self.h.stream.send(segs)
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.h.stream.recv(Dst::Plain(buf))
    }

    fn recv_exact_volatile(&mut self, dst: &VolatileSlice<'_>) -> Result<()> {
        self.h.stream.recv(Dst::Guest(dst))
    }

    fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.h.stream.lock().timeout = timeout;
        Ok(())
    }

    fn try_clone(&self) -> Result<Box<dyn Conn>> {
        Ok(Box::new(RdmaConn { h: self.h.clone() }))
    }

    fn shutdown(&self) {
        self.h.stream.shutdown();
    }

    fn peer(&self) -> String {
        self.h.stream.peer.clone()
    }

    fn register_memory(&mut self, mem: Arc<dyn MappedMemory>) -> Result<()> {
        let ranges = mem
            .ranges()
            .into_iter()
            .filter(|(_, len)| *len > 0)
            .map(|(start, len)| {
                let chunks = len.div_ceil(CHUNK_BYTES);
                RegRange {
                    start: start as usize,
                    len,
                    read: (0..chunks).map(|_| None).collect(),
                    write: (0..chunks).map(|_| None).collect(),
                }
            })
            .collect();
        let mut st = self.h.stream.lock();
        let already = st
            .regs
            .iter()
            .any(|r| Arc::as_ptr(&r.mem) as *const () == Arc::as_ptr(&mem) as *const ());
        if !already {
            st.regs.push(Registered { ranges, mem });
        }
        Ok(())
    }
}
