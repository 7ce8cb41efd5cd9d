//! Paths of the uring transport the shared conformance suite cannot see:
//! operations cancelled mid-transfer at a slice end, zero-copy accounting,
//! the per-wait deadline under a trickle, and the start-up refusal.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;

use super::conn::{Socket, UringConn};
use super::{probe, setup_error, UringTransport};
use crate::conformance::pattern;
use crate::tcp::set_buffer_sizes;
use crate::{Conn, Seg, Transport, TransportError};

/// A connected pair of uring handles with `sockbuf` socket buffers, and the
/// client sending zero-copy from `zc_min` bytes.
fn pair(sockbuf: Option<NonZeroU32>, zc_min: Option<NonZeroU32>) -> (UringConn, UringConn) {
    let features = probe().expect("io_uring");
    let zc_min = zc_min.filter(|_| features.sendmsg_zc);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    if let Some(b) = sockbuf {
        use std::os::fd::AsRawFd;
        set_buffer_sizes(listener.as_raw_fd(), b).expect("listener buffers");
    }
    let addr = listener.local_addr().expect("addr");
    let client = TcpStream::connect(addr).expect("connect");
    if let Some(b) = sockbuf {
        use std::os::fd::AsRawFd;
        set_buffer_sizes(client.as_raw_fd(), b).expect("client buffers");
    }
    let (server, peer) = listener.accept().expect("accept");
    let wrap = |s: TcpStream, name: String, zc| {
        s.set_nodelay(true).expect("nodelay");
        UringConn::new(Arc::new(Socket::new(s, name)), features.setup, zc).expect("ring")
    };
    (
        wrap(client, addr.to_string(), zc_min),
        wrap(server, peer.to_string(), None),
    )
}

/// Small socket buffers, short deadlines and a reader that drains in sips:
/// the sender's MSG_WAITALL operations outlive their wait slices, are
/// cancelled after moving part of their bytes (or none), and resume; neither
/// a byte skipped nor one repeated across 3000 segments, by copy and by
/// zero-copy.
#[test]
fn cancelled_transfers_resume_at_the_right_byte() {
    // By copy: 16 KiB buffers and a 100 ms deadline (slices of 25 ms) while the
    // reader takes 64 KiB per 10 ms, so a multi-megabyte operation outlives
    // many slices. By zero-copy, runs are one operation each and small, so
    // the reader pauses 400 ms per 2 MiB against a 1 s deadline (slices of
    // 250 ms). Zero-copy gets neither the smaller buffers nor the shorter
    // deadline: after a zero-copy send is cancelled part-way, loopback TCP
    // holds the next ones back for over 100 ms (measured; with 16 KiB
    // buffers, about 140 ms per zero-copy send even without cancels), which
    // a 100 ms deadline reports as a timeout.
    struct Case {
        zc_min: Option<NonZeroU32>,
        sockbuf_kib: u32,
        deadline: Duration,
        pause: Duration,
    }
    let cases = [
        Case {
            zc_min: None,
            sockbuf_kib: 16,
            deadline: Duration::from_millis(100),
            pause: Duration::ZERO,
        },
        Case {
            zc_min: NonZeroU32::new(4096),
            sockbuf_kib: 64,
            deadline: Duration::from_secs(1),
            pause: Duration::from_millis(400),
        },
    ];
    for Case {
        zc_min,
        sockbuf_kib,
        deadline,
        pause,
    } in cases
    {
        let (mut client, mut server) = pair(NonZeroU32::new(sockbuf_kib << 10), zc_min);
        server
            .set_timeout(Some(Duration::from_secs(5)))
            .expect("set_timeout");
        client.set_timeout(Some(deadline)).expect("set_timeout");
        let mut guest = pattern(21, 4 << 20);
        let bytes = pattern(22, 4096);
        // Segment i: i % 13 bytes, then a guest run of up to 3 pages, so runs
        // both above and below the zero-copy threshold occur.
        let glen = |i: usize| (i * 997) % (3 * 4096);
        let goff = |i: usize| i * 1300;
        let mut want = Vec::new();
        for i in 0..1500usize {
            want.extend_from_slice(&bytes[..i % 13]);
            want.extend_from_slice(&guest[goff(i)..goff(i) + glen(i)]);
        }
        let total = want.len();
        thread::scope(|s| {
            let guest = &mut guest;
            let bytes = &bytes;
            let sender = s.spawn(move || {
                let mem = VolatileSlice::from(&mut guest[..]);
                let mut segs = Vec::new();
                for i in 0..1500usize {
                    segs.push(Seg::Bytes(&bytes[..i % 13]));
                    segs.push(Seg::Guest(
                        mem.subslice(goff(i), glen(i)).expect("in bounds"),
                    ));
                }
                client.send(&segs).expect("send");
                client.stats()
            });
            let mut got = vec![0u8; total];
            let mut done = 0;
            while done < total {
                let n = (total - done).min(64 << 10);
                server.recv_exact(&mut got[done..done + n]).expect("recv");
                done += n;
                thread::sleep(Duration::from_millis(10));
                if done % (2 << 20) < n {
                    thread::sleep(pause);
                }
            }
            assert!(got == want, "stream differs from the segments sent");
            let stats = sender.join().expect("sender panicked");
            assert!(
                stats.cancels > 0,
                "no operation outlived its slice, so the resume path went untested: {stats:?}"
            );
            if zc_min.is_some() {
                assert!(
                    stats.zc_notified as i64 + stats.zc_pending > 0,
                    "no zero-copy send happened: {stats:?}"
                );
            }
        });
    }
}

/// A peer trickling one byte per 60 ms keeps a receive with a 200 ms
/// deadline alive for over a second (each wait for progress is short); a
/// peer going quiet ends it in a timeout between 1 and 1.25 deadlines.
#[test]
fn deadline_bounds_each_wait_not_the_call() {
    let (mut client, mut server) = pair(None, None);
    let deadline = Duration::from_millis(200);
    server.set_timeout(Some(deadline)).expect("set_timeout");
    thread::scope(|s| {
        s.spawn(move || {
            for b in 0..20u8 {
                client.send(&[Seg::Bytes(&[b])]).expect("send");
                thread::sleep(Duration::from_millis(60));
            }
            // Keep the stream open past the stall below.
            thread::sleep(Duration::from_millis(600));
        });
        let started = Instant::now();
        let mut got = [0u8; 20];
        server
            .recv_exact(&mut got)
            .expect("a trickle is not a timeout");
        assert!(started.elapsed() > deadline * 5, "{:?}", started.elapsed());
        assert_eq!(got.to_vec(), (0..20u8).collect::<Vec<_>>());
        let started = Instant::now();
        let r = server.recv_exact(&mut [0u8; 1]);
        let took = started.elapsed();
        assert!(
            matches!(r, Err(TransportError::Timeout { .. })),
            "a stall: want Timeout, got {r:?}"
        );
        assert!(took >= deadline, "timed out early: {took:?}");
        // 1.25 deadlines plus scheduling slack on a loaded machine.
        assert!(
            took < deadline * 5 / 4 + Duration::from_millis(300),
            "{took:?}"
        );
    });
}

/// Every zero-copy send is notified once the peer has the bytes, and the
/// handle can be dropped with notifications still owed.
#[test]
fn zero_copy_sends_are_notified() {
    let features = probe().expect("io_uring");
    if !features.sendmsg_zc {
        eprintln!("skipped: this kernel has no IORING_OP_SENDMSG_ZC");
        return;
    }
    const SENDS: usize = 32;
    const RUN: usize = 64 << 10;
    let (mut client, mut server) = pair(None, NonZeroU32::new(RUN as u32));
    server
        .set_timeout(Some(Duration::from_secs(10)))
        .expect("set_timeout");
    let mut guest = pattern(31, RUN);
    let want = guest.clone();
    thread::scope(|s| {
        let guest = &mut guest;
        let sender = s.spawn(move || {
            let mem = VolatileSlice::from(&mut guest[..]);
            for _ in 0..SENDS {
                client
                    .send(&[Seg::Bytes(b"hdr"), Seg::Guest(mem)])
                    .expect("send");
            }
            client
        });
        let mut got = vec![0u8; 3 + RUN];
        for _ in 0..SENDS {
            server.recv_exact(&mut got).expect("recv");
            assert_eq!(&got[..3], b"hdr");
            assert!(got[3..] == want[..], "zero-copy payload differs");
        }
        let mut client = sender.join().expect("sender panicked");
        // One more send reaps the notifications of the acknowledged ones.
        client.send(&[Seg::Bytes(b"x")]).expect("send");
        let stats = client.stats();
        eprintln!("zero-copy over loopback: {stats:?}");
        assert_eq!(
            stats.zc_notified as i64 + stats.zc_pending,
            SENDS as i64,
            "one notification per zero-copy send: {stats:?}"
        );
        assert!(stats.zc_notified > 0, "{stats:?}");
        drop(client);
    });
}

/// The refusal names the cause and the way out.
#[test]
fn setup_errors_say_why() {
    let eperm = setup_error(io::Error::from_raw_os_error(libc::EPERM)).to_string();
    assert!(
        eperm.contains("io_uring_disabled") && eperm.contains("use the tcp transport"),
        "{eperm}"
    );
    let enosys = setup_error(io::Error::from_raw_os_error(libc::ENOSYS)).to_string();
    assert!(enosys.contains("without io_uring"), "{enosys}");
}

/// The transport's own constructor probes successfully here and keeps the
/// zero-copy choice it was given (or refuses it without kernel support).
#[test]
fn constructor_keeps_options() {
    let t = UringTransport::new().expect("io_uring");
    assert_eq!(t.name(), "uring");
    let zc = NonZeroU32::new(1 << 16);
    let t = t.with_zero_copy_min_bytes(zc);
    let supported = probe().expect("io_uring").sendmsg_zc;
    assert_eq!(t.zero_copy_min_bytes(), zc.filter(|_| supported));
    assert_eq!(t.with_zero_copy_min_bytes(None).zero_copy_min_bytes(), None);
}

/// Bytes read ahead belong to the stream: a clone receiving next gets them
/// first, and a large receive drains them before going straight to its
/// destination.
#[test]
fn read_ahead_belongs_to_the_stream() {
    let (mut client, mut server) = pair(None, None);
    server
        .set_timeout(Some(Duration::from_secs(5)))
        .expect("set_timeout");
    let small = pattern(41, 100);
    let big = pattern(42, 300_000);
    thread::scope(|s| {
        s.spawn(|| {
            let mut segs = Vec::new();
            for _ in 0..10 {
                segs.push(Seg::Bytes(&small));
            }
            segs.push(Seg::Bytes(&big));
            client.send(&segs).expect("send");
        });
        // Three small receives in a row: the third reads ahead, pulling in the
        // rest of the small messages and the start of the big one.
        let mut got = [0u8; 100];
        for _ in 0..3 {
            server.recv_exact(&mut got).expect("recv small");
            assert_eq!(got[..], small[..]);
        }
        assert!(
            server.read_ahead_pending() > 0,
            "the third small receive read nothing ahead"
        );
        let mut clone = server.try_clone().expect("try_clone");
        drop(server);
        for _ in 3..10 {
            clone.recv_exact(&mut got).expect("recv small on the clone");
            assert_eq!(got[..], small[..]);
        }
        let mut target = vec![0u8; big.len()];
        {
            let mem = VolatileSlice::from(&mut target[..]);
            clone.recv_exact_volatile(&mem).expect("recv big");
        }
        assert!(target == big, "large receive after read-ahead differs");
    });
}

/// `shutdown` on one handle ends a send blocked on a full window on another
/// handle at once, with an error, not at its deadline.
#[test]
fn shutdown_fails_a_blocked_send() {
    let (mut client, _server) = pair(None, None);
    client
        .set_timeout(Some(Duration::from_secs(10)))
        .expect("set_timeout");
    let closer = client.try_clone().expect("try_clone");
    let data = pattern(51, 32 << 20);
    thread::scope(|s| {
        let sender = s.spawn(move || {
            let r = client.send(&[Seg::Bytes(&data)]);
            (r, Instant::now())
        });
        thread::sleep(Duration::from_millis(200));
        let at = Instant::now();
        closer.shutdown();
        let (r, ended) = sender.join().expect("sender panicked");
        assert!(
            matches!(r, Err(TransportError::Send { .. })),
            "send after shutdown: want a Send error, got {r:?}"
        );
        let late = ended.saturating_duration_since(at);
        assert!(late < Duration::from_secs(1), "send took {late:?} to fail");
    });
}
