//! In-process transport for deterministic tests, with fault injection.
//!
//! An [`InProcTransport`] is a hub (clone it freely: clones share one hub).
//! `listen("name")` registers a listener under a name; `connect("name")`
//! makes a connected pair of bounded in-memory byte pipes, one per direction,
//! and queues the far end on the listener. A stalled reader fills its pipe
//! and blocks the writer, as a TCP receive window does.
//!
//! ```text
//!   connector end                                      listener end
//!   send ─▶ [ pipe ConnectorToListener, PIPE_BYTES ] ─▶ recv
//!   recv ◀─ [ pipe ListenerToConnector, PIPE_BYTES ] ◀─ send
//! ```
//!
//! End-of-stream rules match [`crate::tcp`]: `shutdown` or dropping the last
//! handle of an end closes both of its directions, so the peer reads what was
//! already queued and then EOF, and its sends fail (`BrokenPipe`).
//!
//! # Fault injection
//!
//! Connections are numbered in connect order from 0 ([`ConnIndex`]). A plan
//! set with [`InProcTransport::fault_plan`] applies to connections made after
//! the call; each [`Fault`] names one connection and one [`Dir`]ection and
//! counts bytes from the start of that direction's stream, so a plan replays
//! identically run after run:
//!
//! - [`Fault::CutAfter`]: once `bytes` bytes have entered the pipe, the
//!   connection breaks in both directions. The reader gets exactly those
//!   bytes, then `ConnectionReset`; the writer's send fails with
//!   `ConnectionReset` if it had more to write (a send ending exactly at the
//!   cut succeeds). From then on every send fails, and every receive returns
//!   the bytes already queued in its direction, then `ConnectionReset`.
//! - [`Fault::FlipBit`]: the byte at stream offset `offset` arrives with one
//!   bit flipped, as a link corrupting data past the TCP checksum would do.
//! - [`Fault::Drop`], [`Fault::Duplicate`], [`Fault::Reorder`]: bytes lost,
//!   a send delivered twice, a send delivered after the next one; what a
//!   reliable stream never does, but what a protocol must detect (and what
//!   a broken middlebox or a bug in a transport would do).
//! - [`Fault::Stall`]: the link goes silent for a while after a byte, then
//!   delivers everything: a delay, or a partition that heals.
//!
//! [`InProcTransport::cut`] and [`InProcTransport::cut_all`] break live
//! connections on demand, with the same effect as a `CutAfter` firing now.

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;

use crate::{Conn, Listener, Result, Seg, Transport, TransportError};

mod pipe;

use pipe::{Dst, Link, Pipe, RecvEnd, Src};

/// Capacity of each direction of a connection. 256 KiB = 64 pages of 4 KiB, so
/// a page-sized frame never waits on the reader page by page, while a test
/// session of 8 streams x 2 directions holds at most 4 MiB in flight.
pub const PIPE_BYTES_DEFAULT: usize = 256 << 10;

/// Connections a listener queues before `connect` waits for an `accept`
/// (Linux's default `somaxconn` and std's listen backlog are both 128 or more;
/// a session needs N + 1 <= 65 connections).
pub const BACKLOG_MAX: usize = 128;

/// Index of a connection on one hub, in connect order from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnIndex(pub u32);

/// One direction of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Bytes sent by the end that called `connect` (the migration source).
    ConnectorToListener,
    /// Bytes sent by the end that `accept` returned (the migration target).
    ListenerToConnector,
}

impl Dir {
    pub(crate) fn pipe(self) -> usize {
        match self {
            Dir::ConnectorToListener => 0,
            Dir::ListenerToConnector => 1,
        }
    }
}

/// A planned fault; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Break connection `conn` in both directions once `bytes` bytes have
    /// been carried in direction `dir`. `bytes = 0` breaks it at the first send.
    CutAfter {
        /// Which connection.
        conn: ConnIndex,
        /// Which direction's byte count triggers the cut.
        dir: Dir,
        /// Bytes delivered in `dir` before the cut.
        bytes: u64,
    },
    /// Flip bit `bit` (0 = least significant, < 8) of the byte at stream
    /// offset `offset` in direction `dir` of connection `conn`.
    FlipBit {
        /// Which connection.
        conn: ConnIndex,
        /// Which direction's stream.
        dir: Dir,
        /// Offset of the byte from the start of the stream.
        offset: u64,
        /// Which bit of that byte, 0..8.
        bit: u8,
    },
    /// Bytes `offset..offset + len` of the stream are lost: the reader gets
    /// the bytes before them, then the ones after.
    Drop {
        /// Which connection.
        conn: ConnIndex,
        /// Which direction's stream.
        dir: Dir,
        /// Offset of the first lost byte.
        offset: u64,
        /// How many are lost.
        len: u64,
    },
    /// The send that carries byte `offset` arrives twice in a row.
    Duplicate {
        /// Which connection.
        conn: ConnIndex,
        /// Which direction's stream.
        dir: Dir,
        /// A byte of the send.
        offset: u64,
    },
    /// The send that carries byte `offset` arrives after the next send (or
    /// never, if no send follows).
    Reorder {
        /// Which connection.
        conn: ConnIndex,
        /// Which direction's stream.
        dir: Dir,
        /// A byte of the send.
        offset: u64,
    },
    /// Once byte `offset` is sent, the reader gets nothing for `for_ms`
    /// (a link that goes silent for a while, then delivers everything).
    Stall {
        /// Which connection.
        conn: ConnIndex,
        /// Which direction's stream.
        dir: Dir,
        /// The byte after which the link goes silent.
        offset: u64,
        /// For how long, ms.
        for_ms: u64,
    },
}

impl Fault {
    fn conn(&self) -> ConnIndex {
        match *self {
            Fault::CutAfter { conn, .. }
            | Fault::FlipBit { conn, .. }
            | Fault::Drop { conn, .. }
            | Fault::Duplicate { conn, .. }
            | Fault::Reorder { conn, .. }
            | Fault::Stall { conn, .. } => conn,
        }
    }

    fn dir(&self) -> Dir {
        match *self {
            Fault::CutAfter { dir, .. }
            | Fault::FlipBit { dir, .. }
            | Fault::Drop { dir, .. }
            | Fault::Duplicate { dir, .. }
            | Fault::Reorder { dir, .. }
            | Fault::Stall { dir, .. } => dir,
        }
    }
}

/// In-process transport: a hub of named listeners. Cheap to clone; clones
/// share listeners, connection numbering and the fault plan.
#[derive(Clone, Debug)]
pub struct InProcTransport {
    hub: Arc<Hub>,
}

impl Default for InProcTransport {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug)]
struct Hub {
    state: Mutex<HubState>,
    pipe_bytes: usize,
}

#[derive(Debug, Default)]
struct HubState {
    listeners: HashMap<String, Arc<Backlog>>,
    connections_made: u32,
    plan: Vec<Fault>,
    /// Connections that may still be alive, for `cut`/`cut_all`.
    live: Vec<Weak<Link>>,
    /// A partition is in force: every connect is refused.
    partitioned: bool,
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves the
/// state consistent before anything that could panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl InProcTransport {
    /// A new, empty hub with [`PIPE_BYTES_DEFAULT`] per direction.
    pub fn new() -> Self {
        Self::with_pipe_bytes(PIPE_BYTES_DEFAULT)
    }

    /// A new, empty hub whose pipes hold `pipe_bytes` per direction (at least 1).
    pub fn with_pipe_bytes(pipe_bytes: usize) -> Self {
        Self {
            hub: Arc::new(Hub {
                state: Mutex::new(HubState::default()),
                pipe_bytes: pipe_bytes.max(1),
            }),
        }
    }

    /// Replaces the fault plan. It applies to connections made after this
    /// call, identified by their [`ConnIndex`] (which counts every connection
    /// of the hub, including ones made before the call).
    ///
    /// # Panics
    ///
    /// If a [`Fault::FlipBit`] names a bit of 8 or more (a bug in the test).
    pub fn fault_plan(&self, faults: impl IntoIterator<Item = Fault>) {
        let plan: Vec<Fault> = faults.into_iter().collect();
        for f in &plan {
            if let Fault::FlipBit { bit, .. } = f {
                assert!(*bit < 8, "fault plan flips bit {bit} of a byte: {f:?}");
            }
        }
        lock(&self.hub.state).plan = plan;
    }

    /// Breaks connection `conn` now, as if its link failed. Returns false if
    /// no such connection is alive.
    pub fn cut(&self, conn: ConnIndex) -> bool {
        let link = lock(&self.hub.state)
            .live
            .iter()
            .filter_map(Weak::upgrade)
            .find(|l| l.index == conn);
        match link {
            Some(link) => {
                link.cut();
                true
            }
            None => false,
        }
    }

    /// Breaks every live connection now (a partition). Returns how many.
    pub fn cut_all(&self) -> usize {
        let links: Vec<Arc<Link>> = lock(&self.hub.state)
            .live
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for link in &links {
            link.cut();
        }
        links.len()
    }

    /// Starts (`true`: every live connection breaks, and connects are
    /// refused) or ends a partition.
    pub fn partition(&self, on: bool) {
        lock(&self.hub.state).partitioned = on;
        if on {
            self.cut_all();
        }
    }

    /// How many connections this hub has made; the next gets this index.
    pub fn connections_made(&self) -> u32 {
        lock(&self.hub.state).connections_made
    }

    /// Bytes carried so far in direction `dir` of live connection `conn`.
    pub fn carried(&self, conn: ConnIndex, dir: Dir) -> Option<u64> {
        let link = lock(&self.hub.state)
            .live
            .iter()
            .filter_map(Weak::upgrade)
            .find(|l| l.index == conn)?;
        let carried = lock(&link.pipes[dir.pipe()].state).carried;
        Some(carried)
    }
}

impl Transport for InProcTransport {
    fn name(&self) -> &'static str {
        "inproc"
    }

    fn connect(&self, addr: &str, timeout: Duration) -> Result<Box<dyn Conn>> {
        let refused = || TransportError::Connect {
            addr: addr.to_owned(),
            source: io::Error::new(ErrorKind::ConnectionRefused, "no inproc listener"),
        };
        let backlog = {
            let hub = lock(&self.hub.state);
            if hub.partitioned {
                return Err(refused());
            }
            hub.listeners.get(addr).cloned().ok_or_else(refused)?
        };
        let deadline = Instant::now() + timeout;
        let mut queue = lock(&backlog.state);
        loop {
            if queue.closed {
                return Err(refused());
            }
            if queue.pending.len() < BACKLOG_MAX {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Connect {
                    addr: addr.to_owned(),
                    source: io::Error::new(ErrorKind::TimedOut, "inproc backlog full"),
                });
            }
            queue = backlog
                .changed
                .wait_timeout(queue, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        // Numbering under the backlog lock keeps connect order = accept order.
        let link = {
            let mut hub = lock(&self.hub.state);
            let index = ConnIndex(hub.connections_made);
            hub.connections_made += 1;
            let link = Arc::new(Link::new(
                index,
                self.hub.pipe_bytes,
                hub.plan.iter().filter(|f| f.conn() == index),
            ));
            hub.live.retain(|w| w.strong_count() > 0);
            hub.live.push(Arc::downgrade(&link));
            link
        };
        let label = format!("inproc:{addr}#{}", link.index.0);
        let listener_end = InProcConn::new(Arc::clone(&link), Side::Listener, label.clone());
        let connector_end = InProcConn::new(link, Side::Connector, label);
        queue.pending.push_back(listener_end);
        backlog.changed.notify_all();
        Ok(Box::new(connector_end))
    }

    fn listen(&self, addr: &str) -> Result<Box<dyn Listener>> {
        let mut hub = lock(&self.hub.state);
        if hub.listeners.contains_key(addr) {
            return Err(TransportError::Listen {
                addr: addr.to_owned(),
                source: io::Error::new(ErrorKind::AddrInUse, "inproc name already listening"),
            });
        }
        let backlog = Arc::new(Backlog {
            state: Mutex::new(BacklogState::default()),
            changed: Condvar::new(),
        });
        hub.listeners.insert(addr.to_owned(), Arc::clone(&backlog));
        Ok(Box::new(InProcListener {
            name: addr.to_owned(),
            backlog,
            hub: Arc::clone(&self.hub),
        }))
    }
}

/// Connections waiting for `accept`.
#[derive(Debug)]
struct Backlog {
    state: Mutex<BacklogState>,
    /// Signalled when a connection is queued or taken, and on close.
    changed: Condvar,
}

#[derive(Debug, Default)]
struct BacklogState {
    pending: VecDeque<InProcConn>,
    closed: bool,
}

/// A named listener; dropping it frees the name and refuses queued connections.
struct InProcListener {
    name: String,
    backlog: Arc<Backlog>,
    hub: Arc<Hub>,
}

impl Listener for InProcListener {
    fn accept(&mut self, timeout: Option<Duration>) -> Result<Option<Box<dyn Conn>>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut queue = lock(&self.backlog.state);
        loop {
            if let Some(conn) = queue.pending.pop_front() {
                self.backlog.changed.notify_all();
                return Ok(Some(Box::new(conn)));
            }
            queue = match deadline {
                None => self
                    .backlog
                    .changed
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    self.backlog
                        .changed
                        .wait_timeout(queue, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    fn local_addr(&self) -> String {
        self.name.clone()
    }
}

impl Drop for InProcListener {
    fn drop(&mut self) {
        {
            let mut hub = lock(&self.hub.state);
            if hub
                .listeners
                .get(&self.name)
                .is_some_and(|b| Arc::ptr_eq(b, &self.backlog))
            {
                hub.listeners.remove(&self.name);
            }
        }
        let pending = {
            let mut queue = lock(&self.backlog.state);
            queue.closed = true;
            self.backlog.changed.notify_all();
            std::mem::take(&mut queue.pending)
        };
        // Dropping the unaccepted ends (outside the lock) closes them: their
        // connectors read EOF, as after a TCP listener closes with a backlog.
        drop(pending);
    }
}

/// Which end of a link.
#[derive(Debug, Clone, Copy)]
enum Side {
    Connector,
    Listener,
}

/// One end of a link, shared by all handles (`try_clone`) of it. Dropping the
/// last handle closes the end.
#[derive(Debug)]
struct Endpoint {
    link: Arc<Link>,
    side: Side,
    /// Shared by all handles, as socket options are shared by dup'd fds.
    timeout: Mutex<Option<Duration>>,
    peer: String,
}

impl Endpoint {
    fn tx(&self) -> &Pipe {
        match self.side {
            Side::Connector => &self.link.pipes[Dir::ConnectorToListener.pipe()],
            Side::Listener => &self.link.pipes[Dir::ListenerToConnector.pipe()],
        }
    }

    fn rx(&self) -> &Pipe {
        match self.side {
            Side::Connector => &self.link.pipes[Dir::ListenerToConnector.pipe()],
            Side::Listener => &self.link.pipes[Dir::ConnectorToListener.pipe()],
        }
    }

    fn close(&self) {
        self.tx().close_writer();
        self.rx().close_reader();
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.close();
    }
}

/// A handle on one end of an in-process connection.
#[derive(Debug)]
struct InProcConn {
    end: Arc<Endpoint>,
}

impl InProcConn {
    fn new(link: Arc<Link>, side: Side, label: String) -> Self {
        let peer = match side {
            Side::Connector => format!("{label} (listener end)"),
            Side::Listener => format!("{label} (connector end)"),
        };
        Self {
            end: Arc::new(Endpoint {
                link,
                side,
                timeout: Mutex::new(None),
                peer,
            }),
        }
    }

    fn timeout(&self) -> Option<Duration> {
        *lock(&self.end.timeout)
    }

    fn recv(&self, mut dst: Dst<'_, '_>) -> Result<()> {
        let want = dst.len();
        match self.end.rx().read(&self.end.link, &mut dst, self.timeout()) {
            Ok(()) => Ok(()),
            Err(RecvEnd::Eof(0)) => Err(TransportError::Closed {
                peer: self.end.peer.clone(),
            }),
            Err(RecvEnd::Eof(done)) => Err(TransportError::Recv {
                peer: self.end.peer.clone(),
                source: io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("peer closed after {done} of {want} bytes"),
                ),
            }),
            Err(RecvEnd::Err(e)) if e.kind() == ErrorKind::TimedOut => {
                Err(TransportError::Timeout {
                    peer: self.end.peer.clone(),
                })
            }
            Err(RecvEnd::Err(source)) => Err(TransportError::Recv {
                peer: self.end.peer.clone(),
                source,
            }),
        }
    }
}

impl Conn for InProcConn {
    fn send(&mut self, segs: &[Seg<'_>]) -> Result<()> {
        let timeout = self.timeout();
        for seg in segs {
            let src = match seg {
                Seg::Bytes(b) => Src::Bytes(b),
                Seg::Guest(v) => Src::Guest(v),
            };
            if let Err(e) = self.end.tx().write(&self.end.link, src, timeout) {
                return Err(if e.kind() == ErrorKind::TimedOut {
                    TransportError::Timeout {
                        peer: self.end.peer.clone(),
                    }
                } else {
                    TransportError::Send {
                        peer: self.end.peer.clone(),
                        source: e,
                    }
                });
            }
        }
        Ok(())
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.recv(Dst::Bytes(buf))
    }

    fn recv_exact_volatile(&mut self, dst: &VolatileSlice<'_>) -> Result<()> {
        self.recv(Dst::Guest(dst))
    }

    fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<()> {
        *lock(&self.end.timeout) = timeout;
        Ok(())
    }

    fn try_clone(&self) -> Result<Box<dyn Conn>> {
        Ok(Box::new(InProcConn {
            end: Arc::clone(&self.end),
        }))
    }

    fn shutdown(&self) {
        self.end.close();
    }

    fn peer(&self) -> String {
        self.end.peer.clone()
    }
}
