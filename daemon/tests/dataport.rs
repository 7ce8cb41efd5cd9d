//! Garbage on the TCP data port is refused with a logged error, and ferryd
//! keeps serving and accepting.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::Ferryd;

fn connect(d: &Ferryd) -> TcpStream {
    let s = TcpStream::connect(d.listen()).expect("connect to the data port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// A frame header (24 bytes): magic 0xF7E1, kind, flags, stream, reserved, len, seq, crc.
fn header(kind: u8, len: u32) -> Vec<u8> {
    let mut h = vec![0xE1, 0xF7, kind, 0, 0, 0, 0, 0];
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&[0; 12]);
    h
}

#[test]
fn garbage_is_refused_and_ferryd_keeps_serving() {
    let d = Ferryd::start();
    // A connection that says nothing at all times out after the admission
    // deadline (5 s); opened first so its wait overlaps the other cases.
    let silent = connect(&d);
    let silent_addr = silent.local_addr().unwrap().to_string();
    let mut random = vec![0u8; 4096];
    getrandom::fill(&mut random).unwrap();
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("random bytes", random, false),
        ("truncated handshake", header(2, 100)[..10].to_vec(), true),
        ("oversized length", header(2, u32::MAX - 7), false),
        ("unknown frame kind", header(99, 0), false),
    ];
    let mut open = Vec::new();
    for (what, bytes, keep_open) in cases {
        let mut s = connect(&d);
        let me = s.local_addr().unwrap().to_string();
        let _ = s.write_all(&bytes);
        if keep_open {
            open.push(s);
        } else {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let line = d.wait_log(&["WARN", "refused", &me]);
        eprintln!("{what}: {line}");
        assert_eq!(
            d.client().request("GET", "/api/v1/ping", None).unwrap().0,
            200
        );
    }
    d.wait_log(&["WARN", "refused", &silent_addr]);
    // Still accepting.
    let s = connect(&d);
    let me = s.local_addr().unwrap().to_string();
    drop(s);
    d.wait_log(&["refused", &me]);
    assert_eq!(
        d.client().request("GET", "/api/v1/ping", None).unwrap().0,
        200
    );
    drop((open, silent));
}
