//! Fault injection and naming rules of the in-process transport.

use std::io::ErrorKind;
use std::thread;
use std::time::{Duration, Instant};

use ferry_transport::inproc::{ConnIndex, Dir, Fault, InProcTransport};
use ferry_transport::{Conn, Listener, Seg, Transport, TransportError};
use proptest::prelude::*;

/// Longest any wait in these tests may take; a hang becomes a Timeout error.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon a cut must wake a blocked party.
const PROMPT: Duration = Duration::from_secs(2);

fn connect(hub: &InProcTransport, listener: &mut dyn Listener) -> (Box<dyn Conn>, Box<dyn Conn>) {
    let mut c = hub
        .connect(&listener.local_addr(), IO_TIMEOUT)
        .expect("connect");
    let mut s = listener
        .accept(Some(IO_TIMEOUT))
        .expect("accept")
        .expect("pending connection");
    c.set_timeout(Some(IO_TIMEOUT)).expect("set_timeout");
    s.set_timeout(Some(IO_TIMEOUT)).expect("set_timeout");
    (c, s)
}

fn is_reset(e: &TransportError) -> bool {
    match e {
        TransportError::Send { source, .. } | TransportError::Recv { source, .. } => {
            source.kind() == ErrorKind::ConnectionReset
        }
        _ => false,
    }
}

fn bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[test]
fn cut_after_delivers_exactly_the_planned_bytes() {
    let hub = InProcTransport::new();
    hub.fault_plan([Fault::CutAfter {
        conn: ConnIndex(1),
        dir: Dir::ConnectorToListener,
        bytes: 10_000,
    }]);
    let mut l = hub.listen("target").expect("listen");
    let (mut c0, mut s0) = connect(&hub, l.as_mut());
    let (mut c1, mut s1) = connect(&hub, l.as_mut());
    let data = bytes(50_000);

    let r = c1.send(&[Seg::Bytes(&data)]);
    assert!(r.as_ref().is_err_and(is_reset), "send past the cut: {r:?}");
    let mut got = vec![0u8; 10_000];
    s1.recv_exact(&mut got)
        .expect("the bytes before the cut arrive");
    assert_eq!(got, data[..10_000]);
    let r = s1.recv_exact(&mut [0u8; 1]);
    assert!(r.as_ref().is_err_and(is_reset), "recv after the cut: {r:?}");
    assert!(r.is_err_and(|e| e.is_disconnect()));
    // Both directions are cut.
    let r = s1.send(&[Seg::Bytes(b"reply")]);
    assert!(r.as_ref().is_err_and(is_reset), "reverse send: {r:?}");
    let r = c1.recv_exact(&mut [0u8; 1]);
    assert!(r.as_ref().is_err_and(is_reset), "reverse recv: {r:?}");
    assert_eq!(
        hub.carried(ConnIndex(1), Dir::ConnectorToListener),
        Some(10_000)
    );

    // Connection 0 is not in the plan.
    c0.send(&[Seg::Bytes(&data)]).expect("send on conn 0");
    let mut got = vec![0u8; data.len()];
    s0.recv_exact(&mut got).expect("recv on conn 0");
    assert_eq!(got, data);
}

#[test]
fn cut_at_a_send_boundary_completes_that_send() {
    let hub = InProcTransport::new();
    hub.fault_plan([Fault::CutAfter {
        conn: ConnIndex(0),
        dir: Dir::ListenerToConnector,
        bytes: 300,
    }]);
    let mut l = hub.listen("t").expect("listen");
    let (mut c, mut s) = connect(&hub, l.as_mut());
    // The other direction does not count towards the cut.
    c.send(&[Seg::Bytes(&bytes(1000))])
        .expect("send the other way");
    s.send(&[Seg::Bytes(&bytes(100)), Seg::Bytes(&bytes(200))])
        .expect("ends exactly at the cut");
    let r = s.send(&[Seg::Bytes(b"x")]);
    assert!(r.is_err_and(|e| is_reset(&e)));
    let mut got = vec![0u8; 300];
    c.recv_exact(&mut got).expect("all 300 bytes");
    assert!(c.recv_exact(&mut [0u8; 1]).is_err_and(|e| is_reset(&e)));
    // Bytes already queued the other way stay readable after the cut.
    let mut got = vec![0u8; 1000];
    s.recv_exact(&mut got).expect("queued before the cut");
    assert_eq!(got, bytes(1000));
}

#[test]
fn cut_after_zero_bytes_fails_the_first_send() {
    let hub = InProcTransport::new();
    hub.fault_plan([Fault::CutAfter {
        conn: ConnIndex(0),
        dir: Dir::ConnectorToListener,
        bytes: 0,
    }]);
    let mut l = hub.listen("t").expect("listen");
    let (mut c, mut s) = connect(&hub, l.as_mut());
    c.send(&[]).expect("an empty send moves nothing");
    assert!(c.send(&[Seg::Bytes(b"x")]).is_err_and(|e| is_reset(&e)));
    assert!(s.recv_exact(&mut [0u8; 1]).is_err_and(|e| is_reset(&e)));
}

#[test]
fn cut_wakes_a_blocked_reader_and_writer() {
    let hub = InProcTransport::with_pipe_bytes(4096);
    hub.fault_plan([Fault::CutAfter {
        conn: ConnIndex(0),
        dir: Dir::ListenerToConnector,
        bytes: 10,
    }]);
    let mut l = hub.listen("t").expect("listen");
    let (c, mut s) = connect(&hub, l.as_mut());
    let mut reader = c.try_clone().expect("clone");
    let mut writer = c;
    thread::scope(|scope| {
        let r = scope.spawn(move || {
            let mut b = [0u8; 100];
            (reader.recv_exact(&mut b), Instant::now())
        });
        // Fills the 4 KiB pipe nobody reads, then blocks.
        let w = scope.spawn(move || (writer.send(&[Seg::Bytes(&bytes(1 << 20))]), Instant::now()));
        thread::sleep(Duration::from_millis(100));
        let at = Instant::now();
        // The reply crosses the planned cut.
        assert!(s
            .send(&[Seg::Bytes(&bytes(20))])
            .is_err_and(|e| is_reset(&e)));
        for h in [r, w] {
            let (res, woke) = h.join().expect("no panic");
            assert!(res.is_err_and(|e| is_reset(&e)));
            assert!(woke.saturating_duration_since(at) < PROMPT);
        }
    });
}

#[test]
fn flip_bit_corrupts_exactly_one_byte() {
    let hub = InProcTransport::new();
    hub.fault_plan([Fault::FlipBit {
        conn: ConnIndex(0),
        dir: Dir::ConnectorToListener,
        offset: 5000,
        bit: 3,
    }]);
    let mut l = hub.listen("t").expect("listen");
    let (mut c, mut s) = connect(&hub, l.as_mut());
    let zeros = vec![0u8; 10_000];
    for chunk in zeros.chunks(777) {
        c.send(&[Seg::Bytes(chunk)]).expect("send");
    }
    s.send(&[Seg::Bytes(&zeros)]).expect("send back");
    let mut got = vec![0u8; 10_000];
    s.recv_exact(&mut got).expect("recv");
    let flipped: Vec<(usize, u8)> = got
        .iter()
        .enumerate()
        .filter(|(_, b)| **b != 0)
        .map(|(i, b)| (i, *b))
        .collect();
    assert_eq!(flipped, vec![(5000, 0x08)]);
    c.recv_exact(&mut got).expect("recv back");
    assert!(got.iter().all(|b| *b == 0), "the other direction is clean");
}

#[test]
fn flip_bit_in_guest_memory_sends() {
    let hub = InProcTransport::new();
    hub.fault_plan([Fault::FlipBit {
        conn: ConnIndex(0),
        dir: Dir::ConnectorToListener,
        offset: 4,
        bit: 7,
    }]);
    let mut l = hub.listen("t").expect("listen");
    let (mut c, mut s) = connect(&hub, l.as_mut());
    let mut page = vec![0u8; 4096];
    let mem = vm_memory::VolatileSlice::from(&mut page[..]);
    c.send(&[Seg::Bytes(&[0u8; 2]), Seg::Guest(mem)])
        .expect("send");
    let mut got = vec![0u8; 4098];
    let into = vm_memory::VolatileSlice::from(&mut got[..]);
    s.recv_exact_volatile(&into).expect("recv");
    assert_eq!(got[4], 0x80);
    assert_eq!(got.iter().filter(|b| **b != 0).count(), 1);
}

#[test]
fn cut_and_cut_all_on_demand() {
    let hub = InProcTransport::new();
    let mut l = hub.listen("t").expect("listen");
    let mut pairs: Vec<_> = (0..3).map(|_| connect(&hub, l.as_mut())).collect();
    assert_eq!(hub.connections_made(), 3);
    assert!(!hub.cut(ConnIndex(7)), "no such connection");

    assert!(hub.cut(ConnIndex(1)));
    assert!(pairs[1]
        .0
        .send(&[Seg::Bytes(b"x")])
        .is_err_and(|e| is_reset(&e)));
    for i in [0, 2] {
        let (c, s) = &mut pairs[i];
        c.send(&[Seg::Bytes(b"ok")]).expect("untouched connection");
        s.recv_exact(&mut [0u8; 2]).expect("untouched connection");
    }

    // A partition while everyone is blocked in a receive.
    thread::scope(|scope| {
        let handles: Vec<_> = pairs
            .iter_mut()
            .flat_map(|(c, s)| [c, s])
            .map(|conn| scope.spawn(move || (conn.recv_exact(&mut [0u8; 8]), Instant::now())))
            .collect();
        thread::sleep(Duration::from_millis(100));
        let at = Instant::now();
        assert_eq!(hub.cut_all(), 3);
        for h in handles {
            let (r, woke) = h.join().expect("no panic");
            assert!(r.is_err_and(|e| is_reset(&e)));
            assert!(woke.saturating_duration_since(at) < PROMPT);
        }
    });
    drop(pairs);
    assert_eq!(hub.cut_all(), 0, "dropped connections are forgotten");
    // The listener survives a partition.
    let (mut c, mut s) = connect(&hub, l.as_mut());
    c.send(&[Seg::Bytes(b"again")]).expect("send");
    s.recv_exact(&mut [0u8; 5]).expect("recv");
}

#[test]
fn plan_applies_to_later_connections_by_global_index() {
    let hub = InProcTransport::new();
    let mut l = hub.listen("t").expect("listen");
    let (mut c0, _s0) = connect(&hub, l.as_mut());
    hub.fault_plan([
        Fault::CutAfter {
            conn: ConnIndex(0),
            dir: Dir::ConnectorToListener,
            bytes: 0,
        },
        Fault::CutAfter {
            conn: ConnIndex(1),
            dir: Dir::ConnectorToListener,
            bytes: 0,
        },
    ]);
    c0.send(&[Seg::Bytes(b"made before the plan")])
        .expect("unaffected");
    let (mut c1, _s1) = connect(&hub, l.as_mut());
    assert!(c1.send(&[Seg::Bytes(b"x")]).is_err());
    // A clone of the hub shares numbering and plan.
    let other = hub.clone();
    assert_eq!(other.connections_made(), 2);
}

#[test]
#[should_panic(expected = "flips bit 8")]
fn flip_of_a_ninth_bit_is_a_test_bug() {
    InProcTransport::new().fault_plan([Fault::FlipBit {
        conn: ConnIndex(0),
        dir: Dir::ConnectorToListener,
        offset: 0,
        bit: 8,
    }]);
}

#[test]
fn names_refuse_and_free() {
    let hub = InProcTransport::new();
    let r = hub.connect("nobody", IO_TIMEOUT);
    match r {
        Err(TransportError::Connect { source, .. }) => {
            assert_eq!(source.kind(), ErrorKind::ConnectionRefused)
        }
        other => panic!(
            "want Connect(ConnectionRefused), got {:?}",
            other.map(|c| c.peer())
        ),
    }
    let l = hub.listen("svc").expect("listen");
    assert_eq!(l.local_addr(), "svc");
    let again = hub.listen("svc");
    assert!(
        matches!(&again, Err(TransportError::Listen { source, .. }) if source.kind() == ErrorKind::AddrInUse),
        "second listen on one name"
    );
    // A connection queued but never accepted is closed with the listener.
    let mut c = hub.connect("svc", IO_TIMEOUT).expect("connect");
    c.set_timeout(Some(IO_TIMEOUT)).expect("set_timeout");
    drop(l);
    assert!(matches!(
        c.recv_exact(&mut [0u8; 1]),
        Err(TransportError::Closed { .. })
    ));
    assert!(hub.connect("svc", IO_TIMEOUT).is_err(), "name freed");
    let _l = hub.listen("svc").expect("the name can be reused");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Against a naive oracle: whatever the chunking of the sends, the reader
    /// gets exactly the first `cut` bytes, with the planned bit flipped if it
    /// falls before the cut, and then a reset.
    #[test]
    fn faults_are_deterministic(
        chunks in proptest::collection::vec(0usize..5000, 1..40),
        cut in 0u64..100_000,
        flip_at in 0u64..100_000,
        bit in 0u8..8,
    ) {
        let total: usize = chunks.iter().sum();
        let data = bytes(total);
        // Pipes larger than any stream here, so one thread can send it all first.
        let hub = InProcTransport::with_pipe_bytes(256 << 10);
        hub.fault_plan([
            Fault::CutAfter { conn: ConnIndex(0), dir: Dir::ConnectorToListener, bytes: cut },
            Fault::FlipBit { conn: ConnIndex(0), dir: Dir::ConnectorToListener, offset: flip_at, bit },
        ]);
        let mut l = hub.listen("p").expect("listen");
        let (mut c, mut s) = connect(&hub, l.as_mut());
        let mut offset = 0;
        let mut send_failed = false;
        for len in &chunks {
            let r = c.send(&[Seg::Bytes(&data[offset..offset + len])]);
            offset += len;
            if r.is_err() {
                // Only ever because the cut fired, and only once past it.
                prop_assert!(offset as u64 > cut, "send failed before the cut");
                send_failed = true;
                break;
            }
        }
        prop_assert_eq!(send_failed, total as u64 > cut);

        let delivered = (total as u64).min(cut) as usize;
        let mut want = data[..delivered].to_vec();
        if flip_at < delivered as u64 {
            want[flip_at as usize] ^= 1 << bit;
        }
        let mut got = vec![0u8; delivered];
        s.recv_exact(&mut got).expect("delivered bytes");
        prop_assert_eq!(got, want);
        if total as u64 >= cut {
            let r = s.recv_exact(&mut [0u8; 1]);
            prop_assert!(r.is_err_and(|e| is_reset(&e)));
        }
    }
}

/// Sends `data` in `chunk`-byte sends on a fresh connection 0 under
/// `fault`, closes, and returns everything the far end reads before EOF.
fn through(fault: Fault, data: &[u8], chunk: usize) -> Vec<u8> {
    let hub = InProcTransport::new();
    hub.fault_plan([fault]);
    let mut l = hub.listen("t").expect("listen");
    let (mut c, mut s) = connect(&hub, l.as_mut());
    let sender = {
        let data = data.to_vec();
        thread::spawn(move || {
            for piece in data.chunks(chunk) {
                c.send(&[Seg::Bytes(piece)]).expect("send");
            }
            c.shutdown();
        })
    };
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while s.recv_exact(&mut byte).is_ok() {
        got.push(byte[0]);
    }
    sender.join().unwrap();
    got
}

#[test]
fn drop_loses_exactly_the_planned_range() {
    let data = bytes(10_000);
    let got = through(
        Fault::Drop {
            conn: ConnIndex(0),
            dir: Dir::ConnectorToListener,
            offset: 1000,
            len: 2500,
        },
        &data,
        700,
    );
    let mut want = data[..1000].to_vec();
    want.extend_from_slice(&data[3500..]);
    assert_eq!(got, want);
}

#[test]
fn duplicate_delivers_one_send_twice() {
    let data = bytes(3000);
    let got = through(
        Fault::Duplicate {
            conn: ConnIndex(0),
            dir: Dir::ConnectorToListener,
            offset: 1500,
        },
        &data,
        1000,
    );
    let mut want = data[..2000].to_vec();
    want.extend_from_slice(&data[1000..]);
    assert_eq!(got, want);
}

#[test]
fn reorder_swaps_one_send_with_the_next() {
    let data = bytes(4000);
    let got = through(
        Fault::Reorder {
            conn: ConnIndex(0),
            dir: Dir::ConnectorToListener,
            offset: 1000,
        },
        &data,
        1000,
    );
    let mut want = data[..1000].to_vec();
    want.extend_from_slice(&data[2000..3000]);
    want.extend_from_slice(&data[1000..2000]);
    want.extend_from_slice(&data[3000..]);
    assert_eq!(got, want);
}

#[test]
fn stall_silences_the_link_then_delivers_everything() {
    let hub = InProcTransport::new();
    hub.fault_plan([Fault::Stall {
        conn: ConnIndex(0),
        dir: Dir::ConnectorToListener,
        offset: 10,
        for_ms: 300,
    }]);
    let mut l = hub.listen("t").expect("listen");
    let (mut c, mut s) = connect(&hub, l.as_mut());
    let data = bytes(100);
    let t0 = Instant::now();
    c.send(&[Seg::Bytes(&data)]).expect("send");
    // A reader with a shorter deadline times out; a patient one gets it all.
    s.set_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut got = vec![0u8; 100];
    assert!(s.recv_exact(&mut got).is_err(), "silent while stalled");
    s.set_timeout(Some(IO_TIMEOUT)).unwrap();
    s.recv_exact(&mut got).expect("delivered after the stall");
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(got, data);
}
