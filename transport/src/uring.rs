//! io_uring transport: TCP on the wire, the data path driven by io_uring.
//!
//! A uring peer and a [`tcp`] peer talk to each other: the bytes,
//! and so the frames, acknowledgements and commit protocol above them, are
//! the same; only how they move differs. Connecting, listening, accepting and
//! socket options are ordinary syscalls; [`Conn::send`], [`Conn::recv_exact`]
//! and [`Conn::recv_exact_volatile`] go through io_uring.
//!
//! ```text
//!   stream (Arc<Socket>: fd, deadline, read-ahead buffer)
//!     ├── handle A (sender thread)   ── ring A ── SENDMSG[_ZC] ──▶ kernel socket
//!     └── handle B = A.try_clone()   ── ring B ── RECV ──────────▶ kernel socket
//!   shutdown() on any handle = shutdown(2) on the socket: wakes what is in flight on every ring
//! ```
//!
//! # Rings: one per connection handle
//!
//! [`Conn`] is blocking and per call, and each handle is used by one thread
//! at a time (`&mut self`); ferry runs a sender and a receiver thread per
//! stream, each on its own handle. So each handle owns a ring: no lock, no
//! routing of completions between threads, and a ring is exactly as busy as
//! the thread using it. A ring per thread (thread-local) would save rings
//! only where one thread serves several streams, which ferry does not do; a
//! ring per core would need a lock or a completion dispatcher thread, i.e.
//! the cross-thread wake-up a blocking call exists to avoid. A ring is small
//! (8 submission and 64 completion entries, about 3 pages, one fd) and a
//! stream has one 64 KiB read-ahead buffer; a migration of N streams uses
//! 2 (N + 1) rings and fds. Rings use `IORING_SETUP_COOP_TASKRUN`.
//! `IORING_SETUP_DEFER_TASKRUN` (which would tie a ring to one thread) and a
//! registered socket fd (`IOSQE_FIXED_FILE`) were measured and changed
//! nothing beyond noise (`--frames 1`, 1 GiB, before the read-ahead below
//! existed: 0.54 - 0.59 CPU s/GiB with and without either, 3 runs each), so
//! neither is used.
//!
//! A handle has one operation in flight at a time. Submitting it and waiting
//! for it is one `io_uring_enter`, and no call returns while the kernel may
//! still write into or read from memory it was lent (if waiting fails in a
//! way that leaves no means to reap the operation, the process aborts rather
//! than free that memory under the kernel).
//!
//! # Deadlines and shutdown
//!
//! [`Conn::set_timeout`] stores the deadline in the stream, so it is shared
//! by every handle, and each wait is an `io_uring_enter` with that timeout
//! (`IORING_FEAT_EXT_ARG`). When it passes, the operation is cancelled
//! (`IORING_OP_ASYNC_CANCEL`) and its completion says what it did before.
//! A receive completes at each arrival, so each wait is one wait for progress
//! and the deadline is exact. A send is one `MSG_WAITALL` operation per
//! batch of segments, which reports progress only when it ends; its wait is
//! cut in four slices, and an operation still in flight at the end of a slice
//! is cancelled, its partial count taken as progress, and the rest
//! resubmitted: a stalled send ends 1 to 1.25 deadlines after its last
//! progress, and a send held back by a slow reader pays a cancel per quarter
//! deadline. [`Conn::shutdown`] is `shutdown(2)` on the shared socket; the
//! socket's wake-up completes an operation in flight on any handle's ring
//! (a receive with end of stream, a send with `EPIPE`).
//!
//! # Sends
//!
//! A send is one `IORING_OP_SENDMSG` per up to [`IOV_MAX`] segments, with
//! `MSG_WAITALL` so the kernel keeps sending as room appears instead of
//! completing at each full socket buffer (measured: about 5300
//! `io_uring_enter` for 2 GiB in 1 MiB sends and receives, where TCP makes
//! about 6000 `sendmsg`, `recvfrom` and `poll` calls). Guest memory goes to
//! the kernel by raw pointer and is never viewed as `&[u8]`.
//!
//! With [`UringTransport::with_zero_copy_min_bytes`], runs of guest memory
//! at least that long go as `IORING_OP_SENDMSG_ZC`: the kernel pins the pages
//! and the NIC reads them, with no copy into socket buffers. [`Seg::Bytes`]
//! always go by copy (the caller may reuse them when `send` returns), in a
//! `SENDMSG` of their own, so a frame header before a zero-copy run costs one
//! more operation. The send returns once its bytes are queued, before the
//! kernel's notification that it let go of the pages (which comes when the
//! peer acknowledges them, a round trip later); notifications are reaped by
//! later calls. That is sound because the kernel holds page references, not
//! our addresses: guest memory unmapped meanwhile stays alive for it, and
//! what it sends is what the guest wrote, which a live guest does anyway
//! during a copy send and which dirty tracking resends. Over loopback (and a
//! veth pair) the kernel copies each zero-copy skb when it is delivered (every
//! notification reports `IORING_NOTIF_USAGE_ZC_COPIED`), so zero-copy there
//! pays for pinning and copying both, measured below at 1.5x (4 streams) to
//! 2.5x (1 stream) the CPU per GiB: the default is copy
//! ([`ZERO_COPY_MIN_BYTES_DEFAULT`]), and the option is for real NICs, where
//! it removes the sender's copy (about a quarter of the CPU of a loopback
//! stream, by the profile below) but which this machine cannot measure. Its
//! loopback caveats (small socket buffers, short deadlines) are on
//! [`UringTransport::with_zero_copy_min_bytes`].
//!
//! [`Seg::Bytes`]: crate::Seg::Bytes
//!
//! # Receives
//!
//! A receive of at least [`DIRECT_RECV_MIN_BYTES`] is `IORING_OP_RECV`
//! straight into its destination (guest memory for
//! [`Conn::recv_exact_volatile`], so raw pages cost one copy). Smaller ones
//! (frame headers, page tables, compressed pages, scattered raw pages) come
//! from a per-stream read-ahead buffer of [`READ_AHEAD_BYTES`], refilled by
//! one `RECV` of whatever the socket holds, once a receive is the third small
//! one in a row (a frame's header and table come in twos before a run of raw
//! pages, which read-ahead would pull through the buffer for one more copy).
//! The buffer belongs to the stream, so a clone that receives next gets its
//! bytes first.
//!
//! Multishot receive with a provided-buffer ring was not used: once armed it
//! takes every byte the socket gets into ring buffers, whether the next read
//! is a header or a megabyte of raw pages, so raw pages would always pay the
//! extra copy that [`Conn::recv_exact_volatile`] exists to avoid; the one-shot
//! read-ahead above gives small reads the same batching and only them.
//! `MSG_WAITALL` on receives saved nothing (medians of 3 runs of 2 GiB over
//! 4 streams: 0.344 CPU s/GiB with it, 0.335 without), and without it each
//! completion is progress, so a receive's deadline needs no slicing; receives
//! go without it.
//!
//! # Start-up probe
//!
//! [`UringTransport::new`] creates a ring and probes its opcodes. It refuses,
//! with a sentence saying why and pointing at the tcp transport, when
//! io_uring is missing (`ENOSYS`), disabled (`EPERM`: `kernel.io_uring_disabled`
//! or a seccomp filter), or lacks `SENDMSG`, `RECV`, `ASYNC_CANCEL` or wait
//! timeouts (`IORING_FEAT_EXT_ARG`, Linux 5.11). Without `SENDMSG_ZC`
//! (Linux 6.1) a zero-copy request falls back to copying, and without
//! `IORING_SETUP_COOP_TASKRUN` (Linux 5.19) rings are set up without it:
//! one `tracing` info line each.
//!
//! # Measurements
//!
//! Loopback, Linux 6.18, 2 shared cores (load average 0.5 - 2.6 from other
//! work, so runs interleaved and medians given), default socket buffers
//! (autotuning), CPU of the whole process (both ends) from `getrusage`:
//!
//! ```text
//! cargo run --release -p ferry-transport --example blast -- --transport tcp|uring \
//!     [--zc-min-kib N] [--frames PAGES] <streams> <total_mib>
//! ```
//!
//! | case (2 GiB unless noted)          | GB/s median | range       | CPU s/GiB median | range         | runs |
//! |------------------------------------|-------------|-------------|------------------|---------------|------|
//! | tcp, 4 streams                     | 6.04        | 5.72 - 7.72 | 0.333            | 0.254 - 0.347 | 9    |
//! | uring, 4 streams                   | 5.87        | 5.69 - 6.87 | 0.335            | 0.284 - 0.350 | 9    |
//! | tcp, 1 stream                      | 5.04        | 4.37 - 5.38 | 0.311            | 0.299 - 0.344 | 9    |
//! | uring, 1 stream                    | 5.16        | 4.83 - 5.55 | 0.312            | 0.292 - 0.326 | 9    |
//! | uring copy, 4 streams              | 5.58        | 5.49 - 6.26 | 0.350            | 0.316 - 0.367 | 5    |
//! | uring zero-copy from 64 KiB, 4     | 3.01        | 2.92 - 3.18 | 0.518            | 0.466 - 0.530 | 5    |
//! | uring zero-copy from 1 MiB, 4      | 3.03        | 2.93 - 3.12 | 0.507            | 0.481 - 0.534 | 5    |
//! | uring copy, 1 stream               | 5.07        | 4.78 - 5.76 | 0.311            | 0.290 - 0.335 | 5    |
//! | uring zero-copy from 64 KiB, 1     | 1.73        | 1.65 - 1.81 | 0.778            | 0.739 - 0.799 | 5    |
//! | tcp, frames, 256 pages/recv, 4     | 7.09        | 6.46 - 8.77 | 0.287            | 0.232 - 0.300 | 7    |
//! | uring, frames, 256 pages/recv, 4   | 6.50        | 6.27 - 6.76 | 0.299            | 0.294 - 0.316 | 7    |
//! | tcp, frames, 1 page/recv, 4        | 4.28        | 4.11 - 4.96 | 0.491            | 0.414 - 0.506 | 7    |
//! | uring, frames, 1 page/recv, 4      | 5.30        | 5.17 - 5.50 | 0.385            | 0.374 - 0.401 | 7    |
//!
//! ("frames" is `--frames`: each 1 MiB as the engine frames pages, a 24-byte
//! header and a 4 KiB page table, then 256 pages received in one run, or one
//! page per receive as scattered dirty pages arrive.) The same frame runs
//! with read-ahead off (`DIRECT_RECV_MIN_BYTES` = 0) took 0.55 - 0.58 CPU
//! s/GiB for one page per receive, and with it on for every small receive
//! (`READ_AHEAD_STREAK` = 1) 0.36 - 0.38 for 256 pages per receive, 5 runs of
//! 1 GiB each.
//!
//! So on loopback io_uring moves bytes at TCP's cost, no better: `perf`
//! puts over half of the CPU in the two copies (`_copy_from_iter` 26%,
//! `_copy_to_iter` 27%) and most of the rest in the TCP/IP stack under
//! softirq, with io_uring's own submission and completion at 1 - 2%; a
//! syscall saved costs too little to show at 1 MiB per call (1 200 - 1 900
//! context switches for 2 GiB either way). Where it wins is many small
//! receives, through the read-ahead. Socket buffer size moves both far
//! more: at 128 KiB (`sockbuf_kib` 128) both take 0.17 - 0.19 CPU s/GiB on
//! loopback (cache locality, see [`crate::tcp::SOCKET_BUFFER_BYTES_DEFAULT`]).

mod conn;
mod ring;

use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, IoUring, Probe};

use crate::tcp;
use crate::{Conn, Listener, Result, Transport, TransportError};
use conn::{Socket, UringConn};
use ring::RingSetup;

pub use conn::{DIRECT_RECV_MIN_BYTES, IOV_MAX, READ_AHEAD_BYTES};

/// Guest runs of at least this many bytes go out with `IORING_OP_SENDMSG_ZC`
/// by default; `None` sends everything by copy. See the module docs for the
/// measurement behind the choice.
pub const ZERO_COPY_MIN_BYTES_DEFAULT: Option<NonZeroU32> = None;

/// What the start-up probe found the kernel offers.
#[derive(Debug, Clone, Copy)]
struct Features {
    /// `IORING_OP_SENDMSG_ZC` (Linux 6.1).
    sendmsg_zc: bool,
    /// How every ring is set up.
    setup: RingSetup,
}

/// TCP driven by io_uring. Addresses are `host:port`; a peer may use
/// [`crate::tcp::TcpTransport`], the bytes on the wire are the same.
#[derive(Debug, Clone, Copy)]
pub struct UringTransport {
    features: Features,
    zero_copy_min_bytes: Option<NonZeroU32>,
    socket_buffer_bytes: Option<NonZeroU32>,
}

impl UringTransport {
    /// Probes the kernel's io_uring and returns a transport with the measured
    /// defaults, or an error saying why this host cannot run it (io_uring
    /// missing, disabled by `kernel.io_uring_disabled` or a seccomp filter, or
    /// older than Linux 5.11). Optional features the kernel lacks are logged
    /// once each, and done without.
    pub fn new() -> Result<Self> {
        let features = probe()?;
        Ok(Self {
            features,
            zero_copy_min_bytes: None,
            socket_buffer_bytes: None,
        }
        .with_zero_copy_min_bytes(ZERO_COPY_MIN_BYTES_DEFAULT))
    }

    /// Sends runs of guest memory of at least `bytes` with zero-copy
    /// (`IORING_OP_SENDMSG_ZC`), or everything by copy with `None`. Without
    /// kernel support this logs once and keeps copying. It pays only on a real
    /// NIC (see the module docs). Measured on loopback: it needs socket buffers
    /// of at least 24 KiB (with 16 KiB, TCP stalled about 140 ms per zero-copy
    /// send), and after a zero-copy send cancelled part-way at a wait slice,
    /// the next ones made no progress for over 100 ms, so deadlines should be
    /// well above that (ferry's are seconds).
    pub fn with_zero_copy_min_bytes(mut self, bytes: Option<NonZeroU32>) -> Self {
        self.zero_copy_min_bytes = match bytes {
            Some(_) if !self.features.sendmsg_zc => {
                tracing::info!(
                    "uring transport: this kernel has no IORING_OP_SENDMSG_ZC (Linux 6.1+); \
                     guest pages are sent by copy"
                );
                None
            }
            b => b,
        };
        self
    }

    /// Fixes `SO_SNDBUF` and `SO_RCVBUF` of every socket to `bytes`, or leaves
    /// kernel autotuning on with `None` (the default, as for TCP: see
    /// [`crate::tcp::SOCKET_BUFFER_BYTES_DEFAULT`]).
    pub fn with_socket_buffer_bytes(mut self, bytes: Option<NonZeroU32>) -> Self {
        self.socket_buffer_bytes = bytes;
        self
    }

    /// The zero-copy threshold in effect (`None` when sending by copy).
    pub fn zero_copy_min_bytes(&self) -> Option<NonZeroU32> {
        self.zero_copy_min_bytes
    }

    /// Applies per-connection options to a fresh socket.
    fn configure(&self, stream: &TcpStream) -> io::Result<()> {
        stream.set_nodelay(true)?;
        // Blocking, as io_uring expects: on an O_NONBLOCK socket a receive with
        // nothing to read could complete with EAGAIN instead of waiting.
        stream.set_nonblocking(false)?;
        if let Some(bytes) = self.socket_buffer_bytes {
            tcp::set_buffer_sizes(stream.as_raw_fd(), bytes)?;
        }
        Ok(())
    }

    /// Wraps a connected, configured socket in a handle with its own ring.
    fn conn(&self, stream: TcpStream, peer: SocketAddr) -> io::Result<Box<dyn Conn>> {
        let sock = Arc::new(Socket::new(stream, peer.to_string()));
        Ok(Box::new(UringConn::new(
            sock,
            self.features.setup,
            self.zero_copy_min_bytes,
        )?))
    }
}

/// Checks that io_uring works here and has what the transport needs.
fn probe() -> Result<Features> {
    let mut ring = IoUring::new(ring::SQ_ENTRIES).map_err(setup_error)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| {
        unusable(format!(
            "cannot probe io_uring opcodes ({e}); Linux 5.6+ needed"
        ))
    })?;
    if !ring.params().is_feature_ext_arg() {
        return Err(unusable(
            "this kernel's io_uring has no wait timeouts (IORING_FEAT_EXT_ARG, Linux 5.11+)"
                .to_owned(),
        ));
    }
    for (code, name) in [
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::Recv::CODE, "RECV"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ] {
        if !probe.is_supported(code) {
            return Err(unusable(format!(
                "this kernel's io_uring has no IORING_OP_{name}"
            )));
        }
    }
    let coop_taskrun = IoUring::<io_uring::squeue::Entry>::builder()
        .setup_coop_taskrun()
        .build(ring::SQ_ENTRIES)
        .is_ok();
    if !coop_taskrun {
        tracing::info!(
            "uring transport: no IORING_SETUP_COOP_TASKRUN (Linux 5.19+); \
             completions interrupt the waiting thread"
        );
    }
    let sendmsg_zc = probe.is_supported(opcode::SendMsgZc::CODE);
    let zc_report_usage = sendmsg_zc
        && ring::probe_zc_report_usage(&mut ring)
            .map_err(|e| unusable(format!("cannot probe zero-copy send flags ({e})")))?;
    Ok(Features {
        sendmsg_zc,
        setup: RingSetup {
            coop_taskrun,
            zc_report_usage,
        },
    })
}

/// The error for a failed `io_uring_setup`, saying why in a sentence.
fn setup_error(e: io::Error) -> TransportError {
    let why = match e.raw_os_error() {
        Some(libc::ENOSYS) => "this kernel is built without io_uring".to_owned(),
        Some(libc::EPERM) => {
            let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "?".to_owned());
            format!(
                "io_uring is disabled for this process (sysctl kernel.io_uring_disabled = \
                 {sysctl}: 2 disables it for all, 1 for all but the io_uring_group; or a \
                 seccomp filter such as a container runtime's)"
            )
        }
        _ => format!("io_uring_setup failed ({e})"),
    };
    TransportError::Io {
        op: "starting the uring transport",
        source: io::Error::new(e.kind(), format!("{why}; use the tcp transport")),
    }
}

/// The error for a kernel whose io_uring lacks something we need.
fn unusable(why: String) -> TransportError {
    TransportError::Io {
        op: "starting the uring transport",
        source: io::Error::new(
            ErrorKind::Unsupported,
            format!("{why}; use the tcp transport"),
        ),
    }
}

impl Transport for UringTransport {
    fn name(&self) -> &'static str {
        "uring"
    }

    fn connect(&self, addr: &str, timeout: Duration) -> Result<Box<dyn Conn>> {
        let (stream, target) = tcp::connect_stream(addr, timeout, |s| self.configure(s))?;
        self.conn(stream, target)
            .map_err(|source| TransportError::Connect {
                addr: addr.to_owned(),
                source,
            })
    }

    fn listen(&self, addr: &str) -> Result<Box<dyn Listener>> {
        let (listener, local) = tcp::bind_listener(addr, self.socket_buffer_bytes)?;
        Ok(Box::new(UringListener {
            listener,
            local,
            transport: *self,
        }))
    }
}

/// A bound listener. Accepting is ordinary syscalls: only the data path
/// goes through io_uring.
struct UringListener {
    listener: TcpListener,
    local: SocketAddr,
    transport: UringTransport,
}

impl Listener for UringListener {
    fn accept(&mut self, timeout: Option<Duration>) -> Result<Option<Box<dyn Conn>>> {
        let Some((stream, peer)) = tcp::accept_stream(&self.listener, timeout)? else {
            return Ok(None);
        };
        self.transport
            .configure(&stream)
            .map_err(TransportError::Accept)?;
        self.transport
            .conn(stream, peer)
            .map(Some)
            .map_err(TransportError::Accept)
    }

    fn local_addr(&self) -> String {
        self.local.to_string()
    }
}

#[cfg(test)]
mod tests;
