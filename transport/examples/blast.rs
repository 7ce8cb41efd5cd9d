//! Loopback throughput and CPU cost of a transport, sent the way raw pages
//! are: 1 MiB sends of 256 guest-memory segments of 4 KiB, received straight
//! into (private) guest memory.
//!
//! ```text
//! cargo run --release -p ferry-transport --example blast -- \
//!     [--transport tcp|uring] [--zc-min-kib N] [--frames PAGES] \
//!     [streams] [total_mib] [sockbuf_kib]
//! ```
//!
//! Defaults: tcp, 4 streams, 2048 MiB in total, kernel autotuning
//! (`sockbuf_kib` 0). `--zc-min-kib` (uring only) sends guest runs of at
//! least N KiB with zero-copy; 0 turns zero-copy off; without it the
//! transport's default holds. `--frames PAGES` sends each 1 MiB the way the
//! engine frames pages (a 24-byte header and a 4 KiB page table as bytes,
//! then the pages) and receives header, table, then the pages PAGES at a
//! time (1 = scattered dirty pages, one receive each). CPU is the whole
//! process (both ends), from `getrusage`.

use std::num::NonZeroU32;
use std::thread;
use std::time::{Duration, Instant};

use ferry_transport::tcp::TcpTransport;
use ferry_transport::uring::UringTransport;
use ferry_transport::{Seg, Transport};
use vm_memory::VolatileSlice;

/// Bytes per send: 256 pages of 4 KiB.
const SEND_BYTES: usize = 1 << 20;
const PAGE_BYTES: usize = 4096;
/// `--frames`: the engine's frame header and a page table of 16 bytes per page.
const HEADER_BYTES: usize = 24;
const TABLE_BYTES: usize = 16 * SEND_BYTES / PAGE_BYTES;
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Command line: flags anywhere, then positional numbers.
struct Args {
    transport: String,
    zc_min_kib: Option<u64>,
    /// Pages per receive in frame mode; `None` = plain 1 MiB receives.
    frames: Option<usize>,
    numbers: Vec<u64>,
}

impl Args {
    fn parse() -> Self {
        let mut args = Args {
            transport: "tcp".to_owned(),
            zc_min_kib: None,
            frames: None,
            numbers: Vec::new(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            match a.as_str() {
                "--transport" => args.transport = it.next().expect("--transport needs a name"),
                "--zc-min-kib" => {
                    let n = it.next().expect("--zc-min-kib needs a number");
                    args.zc_min_kib = Some(n.parse().expect("--zc-min-kib must be a number"));
                }
                "--frames" => {
                    let n = it.next().expect("--frames needs a page count");
                    let n: usize = n.parse().expect("--frames must be a number");
                    assert!(
                        (1..=SEND_BYTES / PAGE_BYTES).contains(&n),
                        "--frames takes 1 to 256 pages"
                    );
                    args.frames = Some(n);
                }
                _ => args.numbers.push(
                    a.parse()
                        .unwrap_or_else(|_| panic!("arguments must be numbers: {a}")),
                ),
            }
        }
        args
    }

    fn number(&self, n: usize, default: u64) -> u64 {
        self.numbers.get(n).copied().unwrap_or(default)
    }
}

/// User and system CPU seconds of this process so far.
fn cpu_seconds() -> (f64, f64) {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live rusage the call writes; RUSAGE_SELF needs nothing else.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(ru.ru_utime), secs(ru.ru_stime))
}

fn main() {
    let args = Args::parse();
    let streams = args.number(0, 4).max(1) as usize;
    let total_mib = args.number(1, 2048);
    let sockbuf_kib = args.number(2, 0);
    let sends_per_stream = (total_mib as usize * (1 << 20) / SEND_BYTES / streams).max(1);
    let bytes = (sends_per_stream * SEND_BYTES * streams) as u64;
    let sockbuf = NonZeroU32::new(u32::try_from(sockbuf_kib * 1024).expect("sockbuf fits u32"));
    let t: Box<dyn Transport> = match args.transport.as_str() {
        "tcp" => Box::new(TcpTransport::with_socket_buffer_bytes(sockbuf)),
        "uring" => {
            let mut u = UringTransport::new()
                .expect("uring transport")
                .with_socket_buffer_bytes(sockbuf);
            if let Some(kib) = args.zc_min_kib {
                let bytes = u32::try_from(kib * 1024).expect("zc threshold fits u32");
                u = u.with_zero_copy_min_bytes(NonZeroU32::new(bytes));
            }
            Box::new(u)
        }
        other => panic!("unknown transport {other}: tcp or uring"),
    };
    let t = t.as_ref();
    let frames = args.frames;
    let zc = match args.transport.as_str() {
        "uring" => match args.zc_min_kib {
            Some(0) => ", copy".to_owned(),
            Some(k) => format!(", zero-copy from {k} KiB"),
            None => ", default zero-copy policy".to_owned(),
        },
        _ => String::new(),
    };

    let mut listener = t.listen("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr();
    let (user0, sys0) = cpu_seconds();
    let started = Instant::now();
    thread::scope(|s| {
        for _ in 0..streams {
            let addr = &addr;
            s.spawn(move || {
                let mut c = t.connect(addr, IO_TIMEOUT).expect("connect");
                c.set_timeout(Some(IO_TIMEOUT)).expect("set_timeout");
                let mut guest = vec![0x5au8; SEND_BYTES];
                let mem = VolatileSlice::from(&mut guest[..]);
                let header = [0x11u8; HEADER_BYTES];
                let table = [0x22u8; TABLE_BYTES];
                let mut segs: Vec<Seg<'_>> = Vec::new();
                if frames.is_some() {
                    segs.push(Seg::Bytes(&header));
                    segs.push(Seg::Bytes(&table));
                }
                segs.extend(
                    (0..SEND_BYTES / PAGE_BYTES).map(|p| {
                        Seg::Guest(mem.subslice(p * PAGE_BYTES, PAGE_BYTES).expect("page"))
                    }),
                );
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
                let mut header = [0u8; HEADER_BYTES];
                let mut table = [0u8; TABLE_BYTES];
                for _ in 0..sends_per_stream {
                    match frames {
                        None => conn.recv_exact_volatile(&mem).expect("recv"),
                        Some(run) => {
                            conn.recv_exact(&mut header).expect("recv header");
                            conn.recv_exact(&mut table).expect("recv table");
                            for off in (0..SEND_BYTES).step_by(run * PAGE_BYTES) {
                                let len = (run * PAGE_BYTES).min(SEND_BYTES - off);
                                let pages = mem.subslice(off, len).expect("pages");
                                conn.recv_exact_volatile(&pages).expect("recv pages");
                            }
                        }
                    }
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let (user1, sys1) = cpu_seconds();
    let (user, sys) = (user1 - user0, sys1 - sys0);
    let gib = bytes as f64 / f64::from(1u32 << 30);
    let zc = match frames {
        Some(run) => format!("{zc}, frames received {run} page(s) at a time"),
        None => zc,
    };
    println!(
        "{} loopback{zc}: {streams} stream(s), {} MiB, socket buffers {}: {:.2} s, {:.2} GB/s \
         ({:.2} GiB/s), CPU {:.2} s (user {:.2}, sys {:.2}) = {:.3} CPU s/GiB",
        t.name(),
        bytes >> 20,
        if sockbuf_kib == 0 {
            "autotuned".to_owned()
        } else {
            format!("{sockbuf_kib} KiB")
        },
        secs,
        bytes as f64 / secs / 1e9,
        gib / secs,
        user + sys,
        user,
        sys,
        (user + sys) / gib,
    );
}
