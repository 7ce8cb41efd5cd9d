//! Loopback throughput of the TCP transport, sent the way raw pages are:
//! 1 MiB sends of 256 guest-memory segments of 4 KiB, received straight into
//! (private) guest memory.
//!
//! ```text
//! cargo run --release -p ferry-transport --example blast -- [streams] [total_mib] [sockbuf_kib]
//! ```
//!
//! Defaults: 4 streams, 2048 MiB in total, kernel autotuning (`sockbuf_kib` 0).

use std::num::NonZeroU32;
use std::thread;
use std::time::{Duration, Instant};

use ferry_transport::tcp::TcpTransport;
use ferry_transport::{Seg, Transport};
use vm_memory::VolatileSlice;

/// Bytes per send: 256 pages of 4 KiB.
const SEND_BYTES: usize = 1 << 20;
const PAGE_BYTES: usize = 4096;
const IO_TIMEOUT: Duration = Duration::from_secs(30);

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .map(|a| {
            a.parse()
                .unwrap_or_else(|_| panic!("argument {n} must be a number: {a}"))
        })
        .unwrap_or(default)
}

fn main() {
    let streams = arg(1, 4).max(1) as usize;
    let total_mib = arg(2, 2048);
    let sockbuf_kib = arg(3, 0);
    let sends_per_stream = (total_mib as usize * (1 << 20) / SEND_BYTES / streams).max(1);
    let bytes = (sends_per_stream * SEND_BYTES * streams) as u64;
    let sockbuf = NonZeroU32::new(u32::try_from(sockbuf_kib * 1024).expect("sockbuf fits u32"));
    let t = TcpTransport::with_socket_buffer_bytes(sockbuf);

    let mut listener = t.listen("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr();
    let started = Instant::now();
    thread::scope(|s| {
        for _ in 0..streams {
            let addr = &addr;
            let t = &t;
            s.spawn(move || {
                let mut c = t.connect(addr, IO_TIMEOUT).expect("connect");
                c.set_timeout(Some(IO_TIMEOUT)).expect("set_timeout");
                let mut guest = vec![0x5au8; SEND_BYTES];
                let mem = VolatileSlice::from(&mut guest[..]);
                let segs: Vec<Seg<'_>> = (0..SEND_BYTES / PAGE_BYTES)
                    .map(|p| Seg::Guest(mem.subslice(p * PAGE_BYTES, PAGE_BYTES).expect("page")))
                    .collect();
                for _ in 0..sends_per_stream {
                    c.send(&segs).expect("send");
                }
            });
        }
        for _ in 0..streams {
            let mut conn = listener
                .accept(Some(IO_TIMEOUT))
                .expect("accept")
                .expect("accept timed out");
            conn.set_timeout(Some(IO_TIMEOUT)).expect("set_timeout");
            s.spawn(move || {
                let mut guest = vec![0u8; SEND_BYTES];
                let mem = VolatileSlice::from(&mut guest[..]);
                for _ in 0..sends_per_stream {
                    conn.recv_exact_volatile(&mem).expect("recv");
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    println!(
        "tcp loopback: {streams} stream(s), {} MiB, socket buffers {}: {:.2} s, {:.2} GB/s ({:.2} GiB/s)",
        bytes >> 20,
        if sockbuf_kib == 0 {
            "autotuned".to_owned()
        } else {
            format!("{sockbuf_kib} KiB")
        },
        secs,
        bytes as f64 / secs / 1e9,
        bytes as f64 / secs / f64::from(1u32 << 30),
    );
}
