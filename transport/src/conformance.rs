//! The conformance suite every [`Transport`] must pass.
//!
//! Call [`run_all`] from an integration test with a fresh transport and an
//! address it can listen on repeatedly (`"127.0.0.1:0"` for TCP, any name for
//! the in-process hub); each case binds and drops its own listener. The cases
//! are also public one by one, for a transport that must skip one with a reason.
//!
//! Nothing here can hang: every connection gets an [`IO_TIMEOUT`], and a
//! watchdog ends the process if a case outlives [`CASE_DEADLINE`]. The suite
//! assumes a transport buffers at least 1 KiB and well under [`STALL_BYTES`]
//! for a stalled reader.
//!
//! What "the peer dies" means differs by how: when the peer drops its last
//! handle (a process exit), blocked sends and receives fail promptly with a
//! disconnect. When it only calls `shutdown`, receives see EOF promptly, but
//! on TCP a send blocked on the peer's full window ends only at its deadline
//! (Linux keeps queueing after `SHUT_RD`; only closing the socket resets it),
//! so [`peer_dies_mid_transfer`] accepts a `Timeout` there.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;

use crate::{Conn, Listener, Seg, Transport, TransportError};

/// Deadline set on every connection of the suite: the longest any single wait
/// may take before the case fails instead of hanging.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A case running longer than this aborts the process (a hang is a failure).
pub const CASE_DEADLINE: Duration = Duration::from_secs(60);

/// How fast errors must surface after the peer dies or a deadline passes.
/// Generous for a loaded 2-core CI machine; a hang is the failure mode we catch.
pub const PROMPT: Duration = Duration::from_secs(3);

/// Bytes a stalled reader leaves unread in the backpressure and send-timeout
/// cases. Loopback TCP buffers at most `wmem_max` (4 MiB) on the sender plus
/// the receive window (which autotuning does not grow while nobody reads), so
/// 32 MiB is sure to fill them.
pub const STALL_BYTES: usize = 32 << 20;

/// A case of the suite.
pub type Case = fn(&dyn Transport, &str);

/// Every case, by name, in the order [`run_all`] runs them.
pub const CASES: &[(&str, Case)] = &[
    ("ordering", ordering),
    ("many_streams", many_streams),
    ("frame_sizes", frame_sizes),
    ("vectored_guest", vectored_guest),
    ("backpressure", backpressure),
    ("peer_dies_mid_transfer", peer_dies_mid_transfer),
    ("shutdown_wakes_everyone", shutdown_wakes_everyone),
    ("clean_close", clean_close),
    ("timeouts", timeouts),
    ("connect_refused", connect_refused),
    ("accept_timeout", accept_timeout),
    ("duplex_clone", duplex_clone),
    ("reconnect", reconnect),
];

/// Runs every case against `t`, listening on `listen_addr`.
pub fn run_all(t: &dyn Transport, listen_addr: &str) {
    for (name, case) in CASES {
        let label = format!("{}/{name}", t.name());
        let started = Instant::now();
        let _watchdog = Watchdog::arm(label.clone(), CASE_DEADLINE);
        case(t, listen_addr);
        eprintln!("conformance {label}: ok in {:?}", started.elapsed());
    }
}

/// Ends the process if not dropped within its deadline.
struct Watchdog {
    done: Arc<(Mutex<bool>, Condvar)>,
}

impl Watchdog {
    fn arm(label: String, limit: Duration) -> Self {
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = Arc::clone(&done);
        thread::spawn(move || {
            let (lock, cv) = &*flag;
            let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
            let (guard, _) = cv
                .wait_timeout_while(guard, limit, |done| !*done)
                .unwrap_or_else(|p| p.into_inner());
            if !*guard {
                eprintln!("conformance {label}: still running after {limit:?}; a hang, aborting");
                std::process::exit(101);
            }
        });
        Self { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.done;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }
}

/// Deterministic test bytes: splitmix64 of `seed` and the word index.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Asserts equality of two buffers without printing megabytes on failure.
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {at} of {}: got {:#04x}, want {:#04x}",
            want.len(),
            got[at],
            want[at]
        );
    }
}

/// A listener and one connection through it, both ends with [`IO_TIMEOUT`].
pub struct Pair {
    /// The listener (kept so more connections can be made).
    pub listener: Box<dyn Listener>,
    /// The end that connected.
    pub client: Box<dyn Conn>,
    /// The end `accept` returned.
    pub server: Box<dyn Conn>,
}

/// Binds `addr` and makes one connection through it.
pub fn pair(t: &dyn Transport, addr: &str) -> Pair {
    let mut listener = t.listen(addr).expect("listen");
    let (client, server) = connect_to(t, listener.as_mut());
    Pair {
        listener,
        client,
        server,
    }
}

/// Makes one more connection through `listener`; both ends get [`IO_TIMEOUT`].
pub fn connect_to(
    t: &dyn Transport,
    listener: &mut dyn Listener,
) -> (Box<dyn Conn>, Box<dyn Conn>) {
    let addr = listener.local_addr();
    let mut client = t.connect(&addr, IO_TIMEOUT).expect("connect");
    let mut server = listener
        .accept(Some(IO_TIMEOUT))
        .expect("accept")
        .expect("accept timed out with a connection pending");
    client.set_timeout(Some(IO_TIMEOUT)).expect("set_timeout");
    server.set_timeout(Some(IO_TIMEOUT)).expect("set_timeout");
    (client, server)
}

/// Sends `data` as many small frames of varying size; the receiver checks
/// sequence numbers and contents, so any reordering or loss shows.
pub fn ordering(t: &dyn Transport, addr: &str) {
    const MESSAGES: u64 = 3000;
    let Pair {
        listener: _l,
        mut client,
        mut server,
    } = pair(t, addr);
    thread::scope(|s| {
        s.spawn(move || {
            for seq in 0..MESSAGES {
                let len = (seq * 7919 % 2000) as usize;
                let body = pattern(seq, len);
                let mut hdr = [0u8; 12];
                hdr[..8].copy_from_slice(&seq.to_le_bytes());
                hdr[8..].copy_from_slice(&(len as u32).to_le_bytes());
                client
                    .send(&[Seg::Bytes(&hdr), Seg::Bytes(&body)])
                    .expect("send");
            }
            client.shutdown();
        });
        for seq in 0..MESSAGES {
            let mut hdr = [0u8; 12];
            server.recv_exact(&mut hdr).expect("recv header");
            let got_seq = u64::from_le_bytes(hdr[..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(hdr[8..].try_into().expect("4 bytes")) as usize;
            assert_eq!(got_seq, seq, "message out of order");
            assert_eq!(len, (seq * 7919 % 2000) as usize);
            let mut body = vec![0u8; len];
            server.recv_exact(&mut body).expect("recv body");
            assert_same("message body", &body, &pattern(seq, len));
        }
        let mut b = [0u8; 1];
        let end = server.recv_exact(&mut b);
        assert!(
            matches!(end, Err(TransportError::Closed { .. })),
            "expected Closed after the last message, got {end:?}"
        );
    });
}

/// Eight streams at once, each carrying its own pattern both ways.
pub fn many_streams(t: &dyn Transport, addr: &str) {
    const STREAMS: u32 = 8;
    const BYTES: usize = 2 << 20;
    const CHUNK: usize = 64 << 10;
    let mut listener = t.listen(addr).expect("listen");
    let local = listener.local_addr();
    thread::scope(|s| {
        for i in 0..STREAMS {
            let local = &local;
            s.spawn(move || {
                let mut c = t.connect(local, IO_TIMEOUT).expect("connect");
                c.set_timeout(Some(IO_TIMEOUT)).expect("set_timeout");
                c.send(&[Seg::Bytes(&i.to_le_bytes())]).expect("send index");
                let data = pattern(u64::from(i), BYTES);
                for chunk in data.chunks(CHUNK) {
                    c.send(&[Seg::Bytes(chunk)]).expect("send");
                }
                let mut back = vec![0u8; BYTES];
                c.recv_exact(&mut back).expect("recv echo");
                assert_same("echo", &back, &pattern(u64::from(i) + 100, BYTES));
            });
        }
        for _ in 0..STREAMS {
            let mut conn = listener
                .accept(Some(IO_TIMEOUT))
                .expect("accept")
                .expect("accept timed out");
            conn.set_timeout(Some(IO_TIMEOUT)).expect("set_timeout");
            s.spawn(move || {
                let mut idx = [0u8; 4];
                conn.recv_exact(&mut idx).expect("recv index");
                let i = u32::from_le_bytes(idx);
                assert!(i < STREAMS, "bad stream index {i}");
                let mut got = vec![0u8; BYTES];
                conn.recv_exact(&mut got).expect("recv");
                assert_same("stream", &got, &pattern(u64::from(i), BYTES));
                conn.send(&[Seg::Bytes(&pattern(u64::from(i) + 100, BYTES))])
                    .expect("send echo");
            });
        }
    });
}

/// Frames at every size boundary, each sent one way and echoed back.
pub fn frame_sizes(t: &dyn Transport, addr: &str) {
    const SIZES: &[usize] = &[
        0,
        1,
        4095,
        4096,
        4097,
        (64 << 10) - 1,
        64 << 10,
        (64 << 10) + 1,
        1 << 20,
        8 << 20,
    ];
    let Pair {
        listener: _l,
        mut client,
        mut server,
    } = pair(t, addr);
    thread::scope(|s| {
        s.spawn(move || {
            for &size in SIZES {
                let mut len = [0u8; 8];
                server.recv_exact(&mut len).expect("recv length");
                let len = u64::from_le_bytes(len) as usize;
                assert_eq!(len, size);
                let mut body = vec![0u8; len];
                server.recv_exact(&mut body).expect("recv body");
                server
                    .send(&[Seg::Bytes(&(len as u64).to_le_bytes()), Seg::Bytes(&body)])
                    .expect("echo");
            }
        });
        for &size in SIZES {
            let body = pattern(size as u64, size);
            client
                .send(&[Seg::Bytes(&(size as u64).to_le_bytes()), Seg::Bytes(&body)])
                .expect("send");
            let mut len = [0u8; 8];
            client.recv_exact(&mut len).expect("recv echo length");
            assert_eq!(u64::from_le_bytes(len) as usize, size);
            let mut back = vec![0u8; size];
            client.recv_exact(&mut back).expect("recv echo body");
            assert_same(&format!("frame of {size} bytes"), &back, &body);
        }
    });
}

/// Vectored sends mixing bytes and guest memory (empty segments and more than
/// 1024 segments included), received partly into guest memory.
pub fn vectored_guest(t: &dyn Transport, addr: &str) {
    const PAGE: usize = 4096;
    const PAGES: usize = 1500;
    let Pair {
        listener: _l,
        mut client,
        mut server,
    } = pair(t, addr);
    let mut guest = pattern(7, PAGES * PAGE + 1000);
    let bytes_part = pattern(8, 64);
    // The stream the sender produces, computed without the transport.
    let mut want = Vec::new();
    want.extend_from_slice(&bytes_part[..13]);
    want.extend_from_slice(&guest[..PAGE]);
    want.extend_from_slice(b"mid");
    want.extend_from_slice(&guest[3 * PAGE + 5..3 * PAGE + 5 + 100_000]);
    for p in 0..PAGES {
        want.extend_from_slice(&bytes_part[..p % 7]);
        want.extend_from_slice(&guest[p * PAGE..(p + 1) * PAGE]);
    }
    let first_len = 13 + PAGE + 3 + 100_000;
    thread::scope(|s| {
        let guest = &mut guest;
        let bytes_part = &bytes_part;
        s.spawn(move || {
            let mem = VolatileSlice::from(&mut guest[..]);
            let sub = |off, len| mem.subslice(off, len).expect("in bounds");
            client
                .send(&[
                    Seg::Bytes(&bytes_part[..13]),
                    Seg::Guest(sub(0, PAGE)),
                    Seg::Bytes(&[]),
                    Seg::Bytes(b"mid"),
                    Seg::Guest(sub(5, 0)),
                    Seg::Guest(sub(3 * PAGE + 5, 100_000)),
                ])
                .expect("send mixed");
            // 2 x 1500 segments: more than one sendmsg's IOV_MAX of 1024.
            let mut segs = Vec::with_capacity(2 * PAGES);
            for p in 0..PAGES {
                segs.push(Seg::Bytes(&bytes_part[..p % 7]));
                segs.push(Seg::Guest(sub(p * PAGE, PAGE)));
            }
            client.send(&segs).expect("send many segments");
        });
        // Receive the first send: a header into bytes, the rest into "guest"
        // memory at an unaligned offset.
        let mut hdr = [0u8; 13];
        server.recv_exact(&mut hdr).expect("recv header");
        assert_same("header", &hdr, &want[..13]);
        let mut target = vec![0u8; first_len + 1];
        {
            let mem = VolatileSlice::from(&mut target[..]);
            let dst = mem.subslice(1, first_len - 13).expect("in bounds");
            server.recv_exact_volatile(&dst).expect("recv into guest");
        }
        assert_same(
            "guest receive",
            &target[1..first_len - 12],
            &want[13..first_len],
        );
        let mut rest = vec![0u8; want.len() - first_len];
        {
            let mem = VolatileSlice::from(&mut rest[..]);
            server.recv_exact_volatile(&mem).expect("recv many");
        }
        assert_same("many segments", &rest, &want[first_len..]);
        // An empty volatile receive is a no-op.
        let mut none = [0u8; 0];
        server
            .recv_exact_volatile(&VolatileSlice::from(&mut none[..]))
            .expect("empty receive");
    });
}

/// A stalled reader blocks the sender; once it reads, all data arrives intact.
pub fn backpressure(t: &dyn Transport, addr: &str) {
    let Pair {
        listener: _l,
        mut client,
        mut server,
    } = pair(t, addr);
    let data = pattern(3, STALL_BYTES);
    let sent = AtomicBool::new(false);
    thread::scope(|s| {
        let sender = s.spawn(|| {
            let r = client.send(&[Seg::Bytes(&data)]);
            sent.store(true, Ordering::SeqCst);
            r
        });
        thread::sleep(Duration::from_millis(300));
        assert!(
            !sent.load(Ordering::SeqCst),
            "send of {STALL_BYTES} bytes finished while nobody read: no backpressure"
        );
        let mut got = vec![0u8; STALL_BYTES];
        server.recv_exact(&mut got).expect("recv after stall");
        sender.join().expect("sender panicked").expect("send");
        assert_same("stalled stream", &got, &data);
    });
}

/// The peer dies while this end is blocked both receiving (mid-frame) and
/// sending (into a full window): both fail promptly with a disconnect error.
/// Run twice: the peer dropping all its handles, and the peer shutting down.
pub fn peer_dies_mid_transfer(t: &dyn Transport, addr: &str) {
    // The writer's deadline after a mere `shutdown` of the peer (see the module docs).
    const SEND_DEADLINE: Duration = Duration::from_secs(1);
    for kill in ["drop", "shutdown"] {
        let Pair {
            listener: _l,
            mut client,
            server,
        } = pair(t, addr);
        client
            .set_timeout(Some(SEND_DEADLINE))
            .expect("set_timeout");
        let mut reader = client.try_clone().expect("try_clone");
        let mut writer = client;
        let mut server = Some(server);
        let big = pattern(4, STALL_BYTES);
        if let Some(s) = server.as_mut() {
            s.send(&[Seg::Bytes(&big[..500])]).expect("send part");
        }
        thread::scope(|s| {
            let recv = s.spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                let r = reader.recv_exact(&mut buf);
                (r, Instant::now())
            });
            let send = s.spawn(move || {
                let r = writer.send(&[Seg::Bytes(&big)]);
                (r, Instant::now())
            });
            thread::sleep(Duration::from_millis(200));
            let killed_at = Instant::now();
            match kill {
                "drop" => drop(server.take()),
                _ => server.as_ref().expect("alive").shutdown(),
            }
            for (what, h) in [("recv", recv), ("send", send)] {
                let (r, at) = h.join().expect("panicked");
                let err = match r {
                    Ok(()) => panic!("{what} succeeded after the peer's {kill}"),
                    Err(e) => e,
                };
                let timeout_ok = what == "send" && kill == "shutdown";
                assert!(
                    err.is_disconnect()
                        || (timeout_ok && matches!(err, TransportError::Timeout { .. })),
                    "{what} after the peer's {kill}: want a disconnect, got {err}"
                );
                let late = at.saturating_duration_since(killed_at);
                let limit = if timeout_ok {
                    SEND_DEADLINE + PROMPT
                } else {
                    PROMPT
                };
                assert!(
                    late < limit,
                    "{what} took {late:?} to notice the peer's {kill}"
                );
            }
        });
    }
}

/// `shutdown` on one handle wakes a reader blocked on another handle of the
/// same stream, and the peer; it is idempotent; sends after it fail.
pub fn shutdown_wakes_everyone(t: &dyn Transport, addr: &str) {
    let Pair {
        listener: _l,
        mut client,
        server,
    } = pair(t, addr);
    let mut reader = server.try_clone().expect("try_clone");
    thread::scope(|s| {
        let blocked = s.spawn(move || {
            let mut b = [0u8; 16];
            (reader.recv_exact(&mut b), Instant::now())
        });
        let peer_blocked = s.spawn(move || {
            let mut b = [0u8; 16];
            (client.recv_exact(&mut b), Instant::now())
        });
        thread::sleep(Duration::from_millis(150));
        let at = Instant::now();
        server.shutdown();
        server.shutdown();
        for (who, h) in [("own reader", blocked), ("peer reader", peer_blocked)] {
            let (r, woke) = h.join().expect("panicked");
            assert!(
                matches!(r, Err(TransportError::Closed { .. })),
                "{who} after shutdown: want Closed, got {r:?}"
            );
            let late = woke.saturating_duration_since(at);
            assert!(late < PROMPT, "{who} took {late:?} to wake");
        }
    });
    let mut server = server;
    let r = server.send(&[Seg::Bytes(b"after")]);
    assert!(r.is_err(), "send after shutdown succeeded");
}

/// EOF at a frame boundary is `Closed`; EOF mid-frame is `Recv(UnexpectedEof)`.
pub fn clean_close(t: &dyn Transport, addr: &str) {
    let Pair {
        mut listener,
        mut client,
        mut server,
    } = pair(t, addr);
    client.send(&[Seg::Bytes(&pattern(1, 100))]).expect("send");
    client.shutdown();
    let mut got = [0u8; 100];
    server.recv_exact(&mut got).expect("data before EOF");
    assert_same("data before EOF", &got, &pattern(1, 100));
    let r = server.recv_exact(&mut got[..1]);
    assert!(
        matches!(r, Err(TransportError::Closed { .. })),
        "EOF at a boundary: want Closed, got {r:?}"
    );
    // Empty receives succeed even at EOF: there is nothing to wait for.
    server.recv_exact(&mut []).expect("empty receive");

    let (mut client, mut server) = connect_to(t, listener.as_mut());
    client.send(&[Seg::Bytes(&pattern(2, 50))]).expect("send");
    drop(client);
    let r = server.recv_exact(&mut got);
    match r {
        Err(TransportError::Recv { ref source, .. })
            if source.kind() == std::io::ErrorKind::UnexpectedEof => {}
        other => panic!("EOF mid-frame: want Recv(UnexpectedEof), got {other:?}"),
    }
}

/// A receive with nothing arriving, and a send into a stalled reader, both
/// end in `Timeout`; a receive timeout that consumed nothing leaves the stream usable.
pub fn timeouts(t: &dyn Transport, addr: &str) {
    let Pair {
        listener: _l,
        mut client,
        mut server,
    } = pair(t, addr);
    let wait = Duration::from_millis(150);
    server.set_timeout(Some(wait)).expect("set_timeout");
    let started = Instant::now();
    let r = server.recv_exact(&mut [0u8; 8]);
    let took = started.elapsed();
    assert!(
        matches!(r, Err(TransportError::Timeout { .. })),
        "recv with no data: want Timeout, got {r:?}"
    );
    assert!(
        took >= wait - Duration::from_millis(20),
        "timed out early: {took:?}"
    );
    assert!(took < wait + PROMPT, "timed out late: {took:?}");

    client.send(&[Seg::Bytes(b"12345678")]).expect("send");
    let mut got = [0u8; 8];
    server.recv_exact(&mut got).expect("recv after a timeout");
    assert_eq!(&got, b"12345678");

    client.set_timeout(Some(wait)).expect("set_timeout");
    let started = Instant::now();
    let r = client.send(&[Seg::Bytes(&pattern(5, STALL_BYTES))]);
    let took = started.elapsed();
    assert!(
        matches!(r, Err(TransportError::Timeout { .. })),
        "send into a stalled reader: want Timeout, got {r:?}"
    );
    assert!(took < wait + PROMPT, "send timed out late: {took:?}");
}

/// Connecting to an address nobody listens on fails promptly with `Connect`.
pub fn connect_refused(t: &dyn Transport, addr: &str) {
    let listener = t.listen(addr).expect("listen");
    let gone = listener.local_addr();
    drop(listener);
    let started = Instant::now();
    let r = t.connect(&gone, IO_TIMEOUT);
    assert!(
        matches!(r, Err(TransportError::Connect { .. })),
        "connect to a closed address: want Connect, got {:?}",
        r.map(|c| c.peer())
    );
    assert!(
        started.elapsed() < PROMPT,
        "refusal took {:?}",
        started.elapsed()
    );
}

/// `accept` with a timeout and no peer returns `Ok(None)` on time, then still
/// accepts a later connection.
pub fn accept_timeout(t: &dyn Transport, addr: &str) {
    let mut listener = t.listen(addr).expect("listen");
    let wait = Duration::from_millis(100);
    let started = Instant::now();
    let r = listener.accept(Some(wait)).expect("accept");
    let took = started.elapsed();
    assert!(r.is_none(), "accept with no peer returned a connection");
    assert!(
        took >= wait - Duration::from_millis(20),
        "accept returned early: {took:?}"
    );
    assert!(took < wait + PROMPT, "accept returned late: {took:?}");
    let (mut c, mut s) = connect_to(t, listener.as_mut());
    c.send(&[Seg::Bytes(b"x")]).expect("send");
    let mut b = [0u8; 1];
    s.recv_exact(&mut b).expect("recv");
    assert_eq!(&b, b"x");
}

/// With `try_clone`, each end sends and receives at once from two threads;
/// 16 MiB each way cannot fit in buffers, so this deadlocks unless the
/// handles really are independent.
pub fn duplex_clone(t: &dyn Transport, addr: &str) {
    const BYTES: usize = 16 << 20;
    let Pair {
        listener: _l,
        client,
        server,
    } = pair(t, addr);
    let a_to_b = pattern(11, BYTES);
    let b_to_a = pattern(12, BYTES);
    thread::scope(|s| {
        for (conn, out, inn) in [(client, &a_to_b, &b_to_a), (server, &b_to_a, &a_to_b)] {
            let mut rx = conn.try_clone().expect("try_clone");
            let mut tx = conn;
            s.spawn(move || {
                for chunk in out.chunks(1 << 20) {
                    tx.send(&[Seg::Bytes(chunk)]).expect("send");
                }
            });
            s.spawn(move || {
                let mut got = vec![0u8; BYTES];
                rx.recv_exact(&mut got).expect("recv");
                assert_same("duplex", &got, inn);
            });
        }
    });
}

/// After a connection dies, a new one to the same listener works.
pub fn reconnect(t: &dyn Transport, addr: &str) {
    let Pair {
        mut listener,
        mut client,
        server,
    } = pair(t, addr);
    drop(server);
    let r = client.recv_exact(&mut [0u8; 4]);
    assert!(
        r.as_ref().is_err_and(TransportError::is_disconnect),
        "recv from a dead peer: want a disconnect, got {r:?}"
    );
    drop(client);
    for round in 0..3u64 {
        let (mut client, mut server) = connect_to(t, listener.as_mut());
        let data = pattern(round, 100_000);
        thread::scope(|s| {
            s.spawn(|| client.send(&[Seg::Bytes(&data)]).expect("send"));
            let mut got = vec![0u8; data.len()];
            server.recv_exact(&mut got).expect("recv");
            assert_same("after reconnect", &got, &data);
        });
        server.send(&[Seg::Bytes(b"ack")]).expect("send ack");
        let mut ack = [0u8; 3];
        client.recv_exact(&mut ack).expect("recv ack");
        assert_eq!(&ack, b"ack");
    }
}
