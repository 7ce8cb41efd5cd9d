//! Byte transports for ferry sessions.
//!
//! A migration session is one control connection plus N data connections
//! between a source and a target. This crate only moves bytes: framing,
//! authentication and meaning live in `ferry-engine`. Every implementation
//! passes the same conformance suite ([`conformance::run_all`], run for each
//! transport by `tests/conformance.rs`).
//!
//! Implementations: [`tcp::TcpTransport`], [`uring::UringTransport`] (the
//! same TCP on the wire, its data path driven by io_uring) and
//! [`inproc::InProcTransport`] (in-memory, with fault injection, for
//! deterministic protocol tests).
//!
//! ```text
//!   source                                   target
//!   Transport::connect ──── control ────────▶ Listener::accept
//!   Transport::connect ──── data 0..N ──────▶ Listener::accept
//! ```
//!
//! Two things set this trait apart from `std::io::{Read, Write}`:
//! - sends are vectored over [`Seg`]s, which may point into guest memory that a
//!   running guest writes concurrently ([`Seg::Guest`]); the transport hands
//!   such memory to the kernel (or copies it) without ever forming a `&[u8]`;
//! - receives can land straight in guest memory ([`Conn::recv_exact_volatile`]),
//!   so raw pages cost one copy on the target.

use std::sync::Arc;
use std::time::Duration;

use vm_memory::VolatileSlice;

#[doc(hidden)]
pub mod conformance;
pub mod inproc;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod tcp;
pub mod uring;

/// Errors of every transport. Sentence-style messages; the cause is kept.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Connecting to a peer failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address we tried.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Binding a listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address we tried.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Accepting a connection failed.
    #[error("accept failed: {0}")]
    Accept(#[source] std::io::Error),
    /// Sending failed (the peer went away, or the link broke).
    #[error("send to {peer} failed: {source}")]
    Send {
        /// The peer.
        peer: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Receiving failed, or the peer closed before the expected bytes arrived.
    #[error("receive from {peer} failed: {source}")]
    Recv {
        /// The peer.
        peer: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A send or receive deadline passed (see [`Conn::set_timeout`]). Part of
    /// a frame may have moved: treat the stream as broken unless nothing was
    /// expected yet.
    #[error("send to or receive from {peer} timed out")]
    Timeout {
        /// The peer.
        peer: String,
    },
    /// The connection was closed by the peer (EOF at a frame boundary).
    #[error("connection to {peer} closed by the peer")]
    Closed {
        /// The peer.
        peer: String,
    },
    /// Any other socket-level failure (options, clone).
    #[error("socket operation {op} failed: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl TransportError {
    /// True when the error means the peer is gone (EOF, reset, broken pipe),
    /// as opposed to a local failure.
    pub fn is_disconnect(&self) -> bool {
        use std::io::ErrorKind::*;
        match self {
            TransportError::Closed { .. } => true,
            TransportError::Send { source, .. } | TransportError::Recv { source, .. } => matches!(
                source.kind(),
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected
            ),
            _ => false,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, TransportError>;

/// One piece of a vectored send.
#[derive(Clone, Copy)]
pub enum Seg<'a> {
    /// Ordinary bytes the caller owns (headers, encoded payloads).
    Bytes(&'a [u8]),
    /// Guest memory: may be written by a running guest while it is sent. The
    /// transport reads it through raw pointers only (writev, or a volatile copy).
    Guest(VolatileSlice<'a>),
}

impl Seg<'_> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Seg::Bytes(b) => b.len(),
            Seg::Guest(v) => v.len(),
        }
    }

    /// True when the segment is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Memory a connection may hand to its hardware for one-sided, zero-copy
/// transfers: guest RAM mappings (see [`Conn::register_memory`]).
///
/// # Safety
///
/// Every range [`MappedMemory::ranges`] returns must stay mapped, readable and
/// writable for as long as the value lives, and must not move.
pub unsafe trait MappedMemory: Send + Sync {
    /// The mapped ranges, as (start, length in bytes).
    fn ranges(&self) -> Vec<(*mut u8, usize)>;
}

/// A byte transport: makes connections and listeners.
pub trait Transport: Send + Sync {
    /// Short name shown to users ("tcp", "inproc").
    fn name(&self) -> &'static str;
    /// Opens one connection to `addr`, failing after `timeout`.
    fn connect(&self, addr: &str, timeout: Duration) -> Result<Box<dyn Conn>>;
    /// Binds a listener on `addr`.
    fn listen(&self, addr: &str) -> Result<Box<dyn Listener>>;
}

/// Accepts connections.
pub trait Listener: Send {
    /// Waits for the next connection. Returns `Ok(None)` when `timeout` passes
    /// with no connection (so a daemon can check for shutdown).
    fn accept(&mut self, timeout: Option<Duration>) -> Result<Option<Box<dyn Conn>>>;
    /// The address peers connect to (with the real port when bound to port 0).
    fn local_addr(&self) -> String;
}

/// One bidirectional, ordered, reliable byte stream.
pub trait Conn: Send {
    /// Sends all bytes of all segments, in order, or fails.
    fn send(&mut self, segs: &[Seg<'_>]) -> Result<()>;
    /// Fills `buf` completely, or fails. EOF before the first byte is
    /// [`TransportError::Closed`]; EOF after it is a `Recv` error.
    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<()>;
    /// Fills `dst` (guest memory) completely, or fails; same EOF rules.
    fn recv_exact_volatile(&mut self, dst: &VolatileSlice<'_>) -> Result<()>;
    /// Deadline for each blocking receive and send (a peer that stops reading
    /// must not hang a sender forever); `None` waits forever. It bounds each
    /// wait for progress, not a whole call. Like a socket option, it is shared
    /// by every handle of the stream (`try_clone`). A zero duration means the
    /// shortest wait the implementation offers, not "forever".
    fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<()>;
    /// A second handle on the same stream, so one thread can send while another receives.
    fn try_clone(&self) -> Result<Box<dyn Conn>>;
    /// Shuts the stream down in both directions; blocked receivers on any
    /// handle wake with an error. Idempotent. The peer reads what was already
    /// sent, then EOF. A peer blocked sending into our full window fails at
    /// once in-process, but on TCP only at its deadline (Linux keeps queueing
    /// after `SHUT_RD`); dropping every handle resets a TCP stream instead.
    fn shutdown(&self);
    /// Printable peer address, for errors and logs.
    fn peer(&self) -> String;
    /// Offers `mem` for one-sided, zero-copy transfers on this stream (every
    /// handle of it): [`Seg::Guest`] segments inside it may be read, and
    /// [`Conn::recv_exact_volatile`] destinations inside it written, by the
    /// transport's hardware directly. The stream keeps `mem` alive while it
    /// may use it. Transports without such a path ignore it (the default);
    /// the bytes and their order are the same either way.
    fn register_memory(&mut self, mem: Arc<dyn MappedMemory>) -> Result<()> {
        let _ = mem;
        Ok(())
    }
}
