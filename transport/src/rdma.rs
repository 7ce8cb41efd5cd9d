//! RDMA verbs transport: one reliable-connected (RC) queue pair per stream,
//! set up over a TCP side channel; raw guest pages move one-sided, from the
//! source's guest memory straight into the target's.
//!
//! ```text
//!   connect(host:port)                                  accept
//!   ── TCP side channel ──────────────────────────────────────────▶
//!   Hello {qpn, psn, gid, lid, mtu, credits, slot size}  ◀──────▶  Hello
//!   QP INIT -> RTR -> RTS                                          QP INIT -> RTR -> RTS
//!   'R' (ready: receives posted, QP connected)           ◀──────▶  'R'
//!   ═══ queue pair: DATA / CREDIT / RTS / CTS / WRITE_WITH_IMM / FIN ═══
//!   side channel stays open, silent: its end is the peer's end (process death included)
//! ```
//!
//! # Set-up and addressing
//!
//! An address is `host:port` as for TCP: the listener is a TCP listener, and
//! every connection starts as a TCP connection (the side channel). The
//! device, port and GID are found from the IP address that connection uses,
//! as RDMA CM resolves an address: the RoCE v2 GID equal to it (see
//! `rdma/gid.rs`); a loopback side channel takes the first IPv4 RoCE v2 GID (both
//! ends are this host), and [`RdmaConfig`] pins any of the three by hand.
//! Each side then creates its queue pair, posts its receives, and sends a
//! 64-byte hello (layout in `docs/protocol.md`); both move their QP to
//! ready-to-send with the other's numbers and exchange one ready byte, so no
//! message reaches a QP that cannot take it. The side channel then carries
//! nothing, but stays open: when the peer process dies, its kernel closes
//! it, which a queue pair alone would not tell a receiver.
//!
//! # Messages
//!
//! Every message is a SEND WITH IMMEDIATE (or, for raw pages, an RDMA WRITE
//! WITH IMMEDIATE); the immediate's top four bits are its type, the other
//! 28 a value:
//!
//! | type    | payload                     | value                     |
//! |---------|-----------------------------|---------------------------|
//! | DATA    | stream bytes, up to 32 KiB  | credits returned          |
//! | CREDIT  | -                           | credits returned          |
//! | RTS     | run length (u64)            | -                         |
//! | CTS     | offset, address, length, rkey, token | -                |
//! | WRITTEN | (the WRITE's data)          | the CTS's token           |
//! | FIN     | -                           | -                         |
//!
//! Ordinary bytes (frame headers, page tables, compressed pages, guest
//! memory that is not registered or is shorter than the rendezvous
//! threshold) are copied into registered 32 KiB staging slots and sent as
//! DATA into the receiver's pre-posted receive slots; the receiver copies
//! them out. A sender holds one credit per receive slot the receiver keeps
//! for DATA (32); the receiver returns credits once 8 are owed, on its next
//! DATA or in a CREDIT. Control messages take no credit: their receives are
//! reposted the moment they are read, and 32 extra receives are posted for
//! them (with an infinite RNR retry as the backstop).
//!
//! # Raw pages: one-sided
//!
//! A [`Seg::Guest`](crate::Seg::Guest) of at least
//! [`RENDEZVOUS_MIN_BYTES_DEFAULT`] inside memory offered with
//! [`Conn::register_memory`] is not copied: the sender announces it (RTS)
//! and waits. The receiver, when its reader reaches it in stream order,
//! grants a piece (CTS) naming where it must land: the destination of
//! [`Conn::recv_exact_volatile`] itself when that lies in its registered
//! guest memory, or else a registered 1 MiB landing buffer. The sender
//! answers with one RDMA WRITE WITH IMMEDIATE from its guest memory into
//! that address, the immediate carrying the grant's token, so the receiver
//! learns the piece landed without touching the data. Raw pages therefore
//! cost no CPU copy on either side.
//!
//! The grant makes the write happen exactly where a TCP receive would have
//! copied the bytes, when the reader asks for them: a one-sided write
//! pushed ahead of the reader could overwrite a page that an earlier frame
//! of the stream, not yet decoded, is about to write, or that the guest
//! already runs on. The cost is one round trip per run (at most 256 KiB, a
//! frame's raw pages), which the other streams hide.
//!
//! `send` returns once every announced run has landed (its WRITE
//! completed), so the memory it names is never read after the call; a
//! failed or timed-out stream can leave a WRITE in flight, from memory that
//! stays registered and mapped until the stream is gone. Guest memory is
//! registered lazily, 16 MiB chunks at a time, the first time a run
//! touches them: for reading only on the side that sends, for remote writes
//! on the side that receives, and only after the engine's handshake has
//! authenticated the peer (it is the first raw page that registers).
//! Registering pins the chunk (`RLIMIT_MEMLOCK` or `CAP_IPC_LOCK`); where
//! it fails, the stream logs why once and sends everything by copy.
//!
//! # Completions and threads
//!
//! Each stream has one completion queue for both directions and a progress
//! thread that sleeps in `poll(2)` on the CQ's completion channel, the side
//! channel and an eventfd, so nothing spins while idle. Sends are signaled
//! every 16th (and when the queue is nearly full, a staging slot is the
//! last one, or a WRITE or FIN is posted); a signaled completion retires
//! everything posted before it. User threads post work requests themselves
//! and wait on a condition variable the progress thread notifies.
//!
//! # Ends
//!
//! [`Conn::shutdown`] sends FIN: the peer reads what came before, then end
//! of stream; its blocked and later sends fail at once. Dropping the last
//! handle waits (up to 5 s) for the last sends to be acknowledged, sends
//! FIN, and closes the side channel. A peer whose side channel closes
//! without FIN died: receivers get what had arrived, then an error (after a
//! 200 ms grace for messages still in flight); senders fail at once. A
//! silent peer (host down, link cut) fails sends within about half a
//! second (RC retries: 7 x 67 ms) and receives at their deadline.
//!
//! # Throughput
//!
//! Tested on soft-RoCE (`rdma_rxe`) inside a QEMU guest with software CPU
//! emulation: the verbs and the protocol are exercised for real, but the
//! speed there says nothing about a real NIC.

mod gid;
mod stream;
mod verbs;
mod wire;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::tcp;
use crate::{Conn, Listener, Result, Transport, TransportError};
use stream::{Buffers, Parts, Stream};
use verbs::{Cq, Device, Endpoint, Qp, QpCaps};
use wire::{Hello, HELLO_BYTES, READY};

pub use gid::Route;
pub use stream::{BOUNCE_BYTES, CHUNK_BYTES, DATA_CREDITS, SLOT_BYTES};

/// Guest runs of at least this many bytes in registered memory go
/// one-sided (RTS, CTS, WRITE WITH IMMEDIATE); shorter ones are copied.
/// Four pages: below that, the grant's round trip costs more than a copy.
pub const RENDEZVOUS_MIN_BYTES_DEFAULT: usize = 16 << 10;

/// Longest the side-channel set-up of one connection may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a connection's RDMA traffic goes. Every field defaults to
/// auto-detection from the IP address the connection uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RdmaConfig {
    /// RDMA device name (`rxe0`, `mlx5_0`); `None` finds the device that
    /// holds the connection's local IP address.
    pub device: Option<String>,
    /// Port of that device (from 1); `None` finds it with the address.
    pub port: Option<u8>,
    /// GID table index; `None` finds the RoCE v2 GID of the address.
    pub gid_index: Option<u8>,
}

/// RDMA transport: a TCP side channel per connection sets the queue pair up
/// and watches the peer's liveness; bytes move over RDMA.
#[derive(Debug)]
pub struct RdmaTransport {
    config: RdmaConfig,
    rendezvous_min: usize,
    devices: Arc<Mutex<HashMap<String, Arc<Device>>>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name())
            .finish()
    }
}

impl RdmaTransport {
    /// Checks that this host has an RDMA device to use (the one `config`
    /// names, if any); an error says why not.
    pub fn new(config: RdmaConfig) -> Result<Self> {
        let unusable = |why: String| TransportError::Io {
            op: "starting the rdma transport",
            source: io::Error::new(ErrorKind::Unsupported, why),
        };
        let names = verbs::device_names().map_err(|e| {
            unusable(format!(
                "libibverbs cannot list RDMA devices ({e}); is rdma-core installed?"
            ))
        })?;
        if names.is_empty() {
            return Err(unusable(
                "this host has no RDMA device (no RDMA NIC, or its kernel driver is not \
                 loaded; for soft-RoCE: `modprobe rdma_rxe && rdma link add rxe0 type rxe \
                 netdev <if>`)"
                    .into(),
            ));
        }
        if let Some(want) = &config.device {
            if !names.contains(want) {
                return Err(unusable(format!(
                    "no RDMA device called {want} (this host has {})",
                    names.join(", ")
                )));
            }
        }
        Ok(Self {
            config,
            rendezvous_min: RENDEZVOUS_MIN_BYTES_DEFAULT,
            devices: Arc::default(),
        })
    }

    /// The configuration in effect.
    pub fn config(&self) -> &RdmaConfig {
        &self.config
    }

    /// Sets the rendezvous threshold (bytes; see
    /// [`RENDEZVOUS_MIN_BYTES_DEFAULT`]); `usize::MAX` copies everything.
    pub fn with_rendezvous_min_bytes(mut self, bytes: usize) -> Self {
        self.rendezvous_min = bytes.max(1);
        self
    }

    /// The device, port and GID a connection over local address `local` uses.
    pub fn route(&self, local: std::net::IpAddr) -> io::Result<Route> {
        gid::resolve(Path::new(gid::SYSFS), &self.config, local)
    }

    fn device(&self, name: &str) -> io::Result<Arc<Device>> {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = devices.get(name) {
            return Ok(d.clone());
        }
        let d = Device::open(name)?;
        devices.insert(name.to_string(), d.clone());
        Ok(d)
    }

    /// Turns a connected side channel into an RDMA stream.
    fn establish(&self, side: TcpStream, peer: SocketAddr) -> io::Result<Box<dyn Conn>> {
        side.set_nodelay(true)?;
        side.set_nonblocking(false)?;
        side.set_read_timeout(Some(SETUP_TIMEOUT))?;
        side.set_write_timeout(Some(SETUP_TIMEOUT))?;
        let route = self.route(side.local_addr()?.ip())?;
        let device = self.device(&route.device)?;
        let (mtu, lid) = device.port(route.port)?;
        let cq = Arc::new(Cq::new(
            &device,
            (stream::SQ_DEPTH + stream::RECV_SLOTS) as i32,
        )?);
        let qp = Qp::new(
            &cq,
            QpCaps {
                send_wr: stream::SQ_DEPTH as u32,
                recv_wr: stream::RECV_SLOTS as u32,
                inline: stream::INLINE_BYTES,
            },
        )?;
        qp.init(route.port)?;
        let bufs = Buffers::new(&device)?;
        bufs.post_receives(&qp)?;
        let psn = initial_psn();
        let ours = Hello {
            endpoint: Endpoint {
                qpn: qp.qpn(),
                psn,
                gid: route.gid,
                lid,
                mtu: mtu as u8,
            },
            global: route.global,
            credits: stream::DATA_CREDITS as u16,
            slot_bytes: stream::SLOT_BYTES as u32,
        };
        (&side).write_all(&ours.encode())?;
        let mut raw = [0u8; HELLO_BYTES];
        (&side).read_exact(&mut raw)?;
        let theirs = Hello::decode(&raw)?;
        if theirs.global != route.global {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                "one side routes by GID (RoCE) and the other by LID (InfiniBand)",
            ));
        }
        let path_mtu = ours.endpoint.mtu.min(theirs.endpoint.mtu);
        qp.connect(
            route.port,
            route.gid_index,
            route.global,
            psn,
            &theirs.endpoint,
            path_mtu.into(),
        )?;
        (&side).write_all(&[READY])?;
        let mut ready = [0u8; 1];
        (&side).read_exact(&mut ready)?;
        if ready[0] != READY {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                "the peer's ready byte is wrong",
            ));
        }
        side.set_read_timeout(None)?;
        side.set_write_timeout(None)?;
        tracing::debug!(
            "rdma stream to {peer}: {} port {} gid {} qpn {} -> qpn {}, mtu code {path_mtu}",
            route.device,
            route.port,
            route.gid_index,
            ours.endpoint.qpn,
            theirs.endpoint.qpn
        );
        Stream::start(
            Parts {
                qp,
                cq,
                side,
                peer: format!("{peer} (rdma {})", route.device),
                rendezvous_min: self.rendezvous_min,
            },
            bufs,
            theirs.credits,
            theirs.slot_bytes,
        )
    }
}

/// A 24-bit initial packet sequence number that differs between connections.
fn initial_psn() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = NEXT.fetch_add(0x9e37, std::sync::atomic::Ordering::Relaxed);
    (t ^ n ^ std::process::id().rotate_left(8)) & 0x00ff_ffff
}

impl Transport for RdmaTransport {
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn connect(&self, addr: &str, timeout: Duration) -> Result<Box<dyn Conn>> {
        let (side, target) = tcp::connect_stream(addr, timeout, |_| Ok(()))?;
        self.establish(side, target)
            .map_err(|source| TransportError::Connect {
                addr: addr.to_owned(),
                source,
            })
    }

    fn listen(&self, addr: &str) -> Result<Box<dyn Listener>> {
        let (listener, local) = tcp::bind_listener(addr, None)?;
        let transport = Arc::new(RdmaTransport {
            config: self.config.clone(),
            rendezvous_min: self.rendezvous_min,
            devices: self.devices.clone(),
        });
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ferry-rdma-listen".into())
                .spawn(move || backlog(listener, transport, tx, stop))
                .map_err(|source| TransportError::Listen {
                    addr: addr.to_owned(),
                    source,
                })?
        };
        Ok(Box::new(RdmaListener {
            local,
            rx,
            stop,
            thread: Some(thread),
        }))
    }
}

/// What the backlog thread hands to `accept`.
type Setup = std::result::Result<Box<dyn Conn>, (SocketAddr, io::Error)>;

/// How often the backlog thread checks whether its listener was dropped.
const BACKLOG_TICK: Duration = Duration::from_millis(50);

/// Accepts side channels and sets each stream up on a thread of its own,
/// like the kernel's TCP backlog: a connect completes without waiting for
/// the owner's next `accept`, and one slow peer holds up no other.
fn backlog(
    listener: TcpListener,
    transport: Arc<RdmaTransport>,
    tx: mpsc::Sender<Setup>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        match tcp::accept_stream(&listener, Some(BACKLOG_TICK)) {
            Ok(Some((side, peer))) => {
                let (t, tx) = (transport.clone(), tx.clone());
                let spawned = std::thread::Builder::new()
                    .name("ferry-rdma-setup".into())
                    .spawn(move || {
                        let _ = tx.send(t.establish(side, peer).map_err(|e| (peer, e)));
                    });
                if let Err(e) = spawned {
                    tracing::warn!("rdma listener: cannot start a set-up thread: {e}");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("rdma listener: {e}");
                std::thread::sleep(BACKLOG_TICK);
            }
        }
    }
}

/// A bound listener: its backlog thread accepts side channels and sets
/// each stream up; `accept` takes the next one ready.
struct RdmaListener {
    local: SocketAddr,
    rx: mpsc::Receiver<Setup>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener for RdmaListener {
    fn accept(&mut self, timeout: Option<Duration>) -> Result<Option<Box<dyn Conn>>> {
        let got = match timeout {
            None => self
                .rx
                .recv()
                .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            Some(t) => self.rx.recv_timeout(t),
        };
        match got {
            Ok(Ok(conn)) => Ok(Some(conn)),
            Ok(Err((peer, e))) => Err(TransportError::Accept(io::Error::new(
                e.kind(),
                format!("rdma set-up with {peer} failed: {e}"),
            ))),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(TransportError::Accept(
                io::Error::other("the rdma listener's backlog thread stopped"),
            )),
        }
    }

    fn local_addr(&self) -> String {
        self.local.to_string()
    }
}

impl Drop for RdmaListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
