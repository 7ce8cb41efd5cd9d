//! Tests that need a real RDMA device. They run where `FERRY_RDMA_ADDR` names
//! an IP address on one (`cargo xtask rdma` boots a soft-RoCE VM and sets
//! it), and skip with a printed reason elsewhere.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use vm_memory::VolatileSlice;

use super::stream::ONE_SIDED_BYTES;
use super::*;
use crate::{MappedMemory, Seg};

/// The address to test on, or `None` (printed) when there is no device.
pub fn rdma_addr() -> Option<String> {
    match std::env::var("FERRY_RDMA_ADDR") {
        Ok(a) if !a.is_empty() => Some(a),
        _ => {
            eprintln!(
                "skipped: FERRY_RDMA_ADDR is not set (no RDMA device here; `cargo xtask rdma` \
                 runs this inside a soft-RoCE VM)"
            );
            None
        }
    }
}

/// Page-aligned anonymous memory standing in for guest RAM.
struct Guest {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a plain mapping; the tests synchronise their accesses.
unsafe impl Send for Guest {}
// SAFETY: as above.
unsafe impl Sync for Guest {}

impl Guest {
    fn new(len: usize) -> Arc<Guest> {
        // SAFETY: a fresh anonymous mapping.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Arc::new(Guest {
            ptr: ptr.cast(),
            len,
        })
    }

    fn slice(&self) -> VolatileSlice<'_> {
        // SAFETY: the mapping is valid for `len` bytes while self lives.
        unsafe { VolatileSlice::new(self.ptr, self.len) }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: mapped in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

// SAFETY: the one range is mapped while the Guest lives.
unsafe impl MappedMemory for Guest {
    fn ranges(&self) -> Vec<(*mut u8, usize)> {
        vec![(self.ptr, self.len)]
    }
}

fn pair(t: &RdmaTransport, addr: &str) -> (Box<dyn Conn>, Box<dyn Conn>) {
    let mut l = t.listen(&format!("{addr}:0")).expect("listen");
    let to = l.local_addr();
    let server = thread::spawn(move || {
        l.accept(Some(Duration::from_secs(10)))
            .expect("accept")
            .expect("a peer")
    });
    let client = t.connect(&to, Duration::from_secs(10)).expect("connect");
    let server = server.join().unwrap();
    (client, server)
}

fn fill(g: &Guest, seed: u8) {
    let mut v = vec![0u8; g.len];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8;
    }
    g.slice().copy_from(&v);
}

fn bytes(v: &VolatileSlice<'_>) -> Vec<u8> {
    let mut out = vec![0u8; v.len()];
    v.copy_to(&mut out);
    out
}

#[test]
fn guest_runs_land_one_sided_in_registered_memory_and_by_copy_elsewhere() {
    let Some(addr) = rdma_addr() else { return };
    let t = RdmaTransport::new(RdmaConfig::default()).expect("an RDMA device");
    let (mut tx, mut rx) = pair(&t, &addr);
    tx.set_timeout(Some(Duration::from_secs(10))).unwrap();
    rx.set_timeout(Some(Duration::from_secs(10))).unwrap();
    const MIB: usize = 1 << 20;
    let src = Guest::new(40 * MIB);
    let dst = Guest::new(40 * MIB);
    fill(&src, 7);
    tx.register_memory(src.clone()).unwrap();
    rx.register_memory(dst.clone()).unwrap();
    let s = src.slice();
    let d = dst.slice();
    let before = ONE_SIDED_BYTES.load(Ordering::Relaxed);

    // A header, then a 256 KiB run, then a run across a 16 MiB chunk
    // boundary, then one page (copied: below the threshold).
    let header = b"frame header....".to_vec();
    thread::scope(|scope| {
        let sending = scope.spawn(|| {
            let s = src.slice();
            let run_a = s.subslice(MIB, 256 << 10).unwrap();
            let run_b = s.subslice(16 * MIB - 8192, 64 << 10).unwrap();
            let page = s.subslice(30 * MIB, 4096).unwrap();
            tx.send(&[
                Seg::Bytes(&header),
                Seg::Guest(run_a),
                Seg::Guest(run_b),
                Seg::Guest(page),
            ])
            .expect("send");
        });
        let mut got = vec![0u8; header.len()];
        rx.recv_exact(&mut got).unwrap();
        assert_eq!(got, header);
        // The first run straight into registered memory at the same offset.
        rx.recv_exact_volatile(&d.subslice(MIB, 256 << 10).unwrap())
            .unwrap();
        // The second in two receives: half into registered memory, half
        // into a plain buffer (through the landing buffer).
        rx.recv_exact_volatile(&d.subslice(16 * MIB - 8192, 32 << 10).unwrap())
            .unwrap();
        let mut rest = vec![0u8; 32 << 10];
        rx.recv_exact(&mut rest).unwrap();
        d.subslice(16 * MIB - 8192 + (32 << 10), 32 << 10)
            .unwrap()
            .copy_from(&rest);
        rx.recv_exact_volatile(&d.subslice(30 * MIB, 4096).unwrap())
            .unwrap();
        sending.join().unwrap();
    });
    for (off, len) in [
        (MIB, 256 << 10),
        (16 * MIB - 8192, 64 << 10),
        (30 * MIB, 4096),
    ] {
        assert_eq!(
            bytes(&d.subslice(off, len).unwrap()),
            bytes(&s.subslice(off, len).unwrap()),
            "run at {off}"
        );
    }
    let one_sided = ONE_SIDED_BYTES.load(Ordering::Relaxed) - before;
    assert_eq!(one_sided, (256 + 64) << 10, "bytes written one-sided");
}

#[test]
fn unregistered_guest_memory_and_a_dead_peer() {
    let Some(addr) = rdma_addr() else { return };
    let t = RdmaTransport::new(RdmaConfig::default()).expect("an RDMA device");
    let (mut tx, mut rx) = pair(&t, &addr);
    rx.set_timeout(Some(Duration::from_secs(10))).unwrap();
    let src = Guest::new(1 << 20);
    fill(&src, 3);
    // Not registered: copied through DATA, same bytes.
    let before = ONE_SIDED_BYTES.load(Ordering::Relaxed);
    tx.send(&[Seg::Guest(src.slice())]).unwrap();
    let mut got = vec![0u8; 1 << 20];
    rx.recv_exact(&mut got).unwrap();
    assert_eq!(got, bytes(&src.slice()));
    assert_eq!(ONE_SIDED_BYTES.load(Ordering::Relaxed), before);
    // The sender goes away without a word: the receiver gets end of stream.
    drop(tx);
    let r = rx.recv_exact(&mut [0u8; 8]);
    assert!(
        matches!(r, Err(TransportError::Closed { .. })),
        "want Closed, got {r:?}"
    );
}

#[test]
fn a_peer_that_is_not_rdma_is_refused_at_accept() {
    let Some(addr) = rdma_addr() else { return };
    let t = RdmaTransport::new(RdmaConfig::default()).expect("an RDMA device");
    let mut l = t.listen(&format!("{addr}:0")).unwrap();
    let to = l.local_addr();
    let bad = thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(to).unwrap();
        s.write_all(&[b'G'; HELLO_BYTES]).unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let r = l.accept(Some(Duration::from_secs(10)));
    let e = r.err().expect("refused");
    assert!(e.to_string().contains("does not speak"), "{e}");
    bad.join().unwrap();
}

#[test]
fn configured_device_must_exist() {
    let Some(_) = rdma_addr() else { return };
    let e = RdmaTransport::new(RdmaConfig {
        device: Some("nonexistent9".into()),
        ..RdmaConfig::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("nonexistent9"), "{e}");
}
