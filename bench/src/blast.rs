//! The link baseline: a raw TCP blast of N streams over the same path a
//! migration takes, to tell how close the migration comes to the wire.
//!
//! ```text
//!  blast-send                               blast-recv
//!  connect x N ──────────────────────────▶  accept x N
//!  per stream: len (u64 LE) | len bytes ──▶ read and discard
//!                                       ◀── b'K' once all bytes arrived
//! ```
//!
//! The clock runs from before the first connect until the last stream's
//! acknowledgement, so the result counts bytes the receiver really got, not
//! bytes parked in socket buffers.
//!
//! Two modes. `memory` (the link baseline of `migrate`): every byte is read
//! from its own place in a buffer as large as the transfer and written to its
//! own place in an equally large buffer on the receiver, both touched before
//! the clock starts, which is what moving guest memory costs at the least.
//! `hot`: one 256 KiB buffer on each side, reused; on loopback that stays in
//! the CPU caches and shows the path's peak, not a memory-to-memory rate. Both ends are hidden subcommands of
//! ferry-bench so that, with `--netns`, each runs inside its own namespace.

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Send buffer: 256 KiB per write keeps syscalls well under 1% of the time
/// at 10 GB/s (40 k writes/s).
const CHUNK_BYTES: usize = 256 << 10;
/// Cap on the bytes one stream may announce: 1 TiB, the engine's guest cap.
pub const STREAM_BYTES_MAX: u64 = 1 << 40;
/// Cap on streams; the migration API caps its own far lower.
pub const STREAMS_MAX: u32 = 64;
/// Per-read/write deadline: a blast that stalls this long is broken, not slow.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The acknowledgement byte.
const ACK: u8 = b'K';
/// First line blast-recv prints: `LISTENING <addr>`.
const READY_PREFIX: &str = "LISTENING ";

/// How the blast uses memory; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Buffers as large as the transfer on both sides.
    Memory,
    /// One reused 256 KiB buffer on each side.
    Hot,
}

/// One buffer per stream share, every page written once so that the clock
/// never pays a first-touch page fault.
fn touched_buffers(bytes: u64, streams: u32) -> Vec<Vec<u8>> {
    shares(bytes, streams)
        .into_iter()
        .map(|n| {
            let mut v = vec![0u8; n as usize];
            for (i, b) in v.iter_mut().enumerate().step_by(4096) {
                *b = (i >> 12) as u8 | 1;
            }
            v
        })
        .collect()
}

/// What blast-send measured.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BlastResult {
    /// The mode.
    pub mode: Mode,
    /// Bytes moved and acknowledged.
    pub bytes: u64,
    /// Streams used.
    pub streams: u32,
    /// Wall time, connect to last acknowledgement.
    pub ms: u64,
    /// bytes / ms in MiB/s.
    pub mib_s: f64,
}

/// Splits `bytes` over `streams` as evenly as possible.
fn shares(bytes: u64, streams: u32) -> Vec<u64> {
    let n = u64::from(streams);
    (0..n)
        .map(|i| bytes / n + u64::from(i < bytes % n))
        .collect()
}

/// Sends `bytes` to a blast receiver at `to` over `streams` connections.
pub fn send(to: SocketAddr, bytes: u64, streams: u32, mode: Mode) -> Result<BlastResult> {
    if streams == 0 || streams > STREAMS_MAX {
        bail!("streams must be 1..={STREAMS_MAX}, not {streams}");
    }
    let mut bufs = match mode {
        Mode::Memory => touched_buffers(bytes, streams),
        Mode::Hot => Vec::new(),
    };
    let start = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..streams {
        let s = TcpStream::connect_timeout(&to, IO_TIMEOUT)
            .with_context(|| format!("blast: cannot connect to {to}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        conns.push(s);
    }
    let workers: Vec<_> = conns
        .into_iter()
        .zip(shares(bytes, streams))
        .map(|(mut s, n)| {
            let big = bufs.pop();
            std::thread::spawn(move || -> Result<()> {
                let hot = vec![0x5au8; CHUNK_BYTES];
                s.write_all(&n.to_le_bytes())?;
                let mut off = 0u64;
                while off < n {
                    let k = (n - off).min(CHUNK_BYTES as u64) as usize;
                    match &big {
                        Some(b) => s.write_all(&b[off as usize..off as usize + k])?,
                        None => s.write_all(&hot[..k])?,
                    }
                    off += k as u64;
                }
                let mut ack = [0u8; 1];
                s.read_exact(&mut ack)?;
                if ack[0] != ACK {
                    bail!(
                        "blast: receiver sent {:#04x} instead of an acknowledgement",
                        ack[0]
                    );
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        match w.join() {
            Ok(r) => r.context("blast: a stream failed")?,
            Err(_) => bail!("blast: a sender thread panicked"),
        }
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    Ok(BlastResult {
        mode,
        bytes,
        streams,
        ms: ms.round() as u64,
        mib_s: bytes as f64 / (1024.0 * 1024.0) / (ms.max(0.001) / 1000.0),
    })
}

/// Accepts `streams` connections on `listener`, swallows what each
/// announces, acknowledges each, and returns the total bytes received.
/// `bufs` (memory mode) are the destination buffers, one per stream.
pub fn receive(listener: TcpListener, streams: u32, mut bufs: Vec<Vec<u8>>) -> Result<u64> {
    if streams == 0 || streams > STREAMS_MAX {
        bail!("streams must be 1..={STREAMS_MAX}, not {streams}");
    }
    let mut workers = Vec::new();
    for _ in 0..streams {
        let mut big = bufs.pop();
        let (mut s, peer) = listener.accept().context("blast: accept failed")?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        workers.push(std::thread::spawn(move || -> Result<u64> {
            let mut len = [0u8; 8];
            s.read_exact(&mut len)?;
            let len = u64::from_le_bytes(len);
            if len > STREAM_BYTES_MAX {
                bail!("blast: {peer} announced {len} bytes, over the {STREAM_BYTES_MAX}-byte cap");
            }
            let got = match big.as_mut().filter(|b| b.len() as u64 >= len) {
                Some(b) => {
                    s.read_exact(&mut b[..len as usize])?;
                    len
                }
                None => std::io::copy(&mut (&mut s).take(len), &mut std::io::sink())?,
            };
            if got != len {
                bail!("blast: {peer} closed after {got} of {len} bytes");
            }
            s.write_all(&[ACK])?;
            Ok(got)
        }));
    }
    let mut total = 0;
    for w in workers {
        match w.join() {
            Ok(r) => total += r?,
            Err(_) => bail!("blast: a receiver thread panicked"),
        }
    }
    Ok(total)
}

/// `ferry-bench blast-recv`: prepares its buffers (memory mode: `bytes`
/// in all), binds, prints `LISTENING <addr>`, receives.
pub fn recv_main(listen: SocketAddr, streams: u32, bytes: Option<u64>) -> Result<()> {
    let bufs = match bytes {
        Some(b) if b > STREAM_BYTES_MAX => bail!("blast: {b} bytes is over the cap"),
        Some(b) => touched_buffers(b, streams),
        None => Vec::new(),
    };
    let l =
        TcpListener::bind(listen).with_context(|| format!("blast: cannot listen on {listen}"))?;
    let addr = l.local_addr()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{READY_PREFIX}{addr}")?;
    out.flush()?;
    let bytes = receive(l, streams, bufs)?;
    writeln!(out, "{}", serde_json::json!({ "bytes": bytes }))?;
    Ok(())
}

/// `ferry-bench blast-send`: prints one [`BlastResult`] as JSON.
pub fn send_main(to: SocketAddr, bytes: u64, streams: u32, mode: Mode) -> Result<()> {
    let r = send(to, bytes, streams, mode)?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// Reads blast-recv's first line; returns the address it listens on.
pub fn parse_ready(r: &mut impl BufRead) -> Result<SocketAddr> {
    let mut line = String::new();
    r.read_line(&mut line)
        .context("blast: cannot read the receiver's output")?;
    let addr = line.trim().strip_prefix(READY_PREFIX).with_context(|| {
        format!(
            "blast: the receiver printed {:?}, not its address",
            line.trim()
        )
    })?;
    addr.parse()
        .with_context(|| format!("blast: bad receiver address {addr:?}"))
}

/// Runs a receiver in-process on a loopback port; for tests.
#[cfg(test)]
fn spawn_local_receiver(streams: u32) -> (SocketAddr, std::thread::JoinHandle<Result<u64>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    (
        addr,
        std::thread::spawn(move || receive(l, streams, Vec::new())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        assert_eq!(shares(10, 3), vec![4, 3, 3]);
        assert_eq!(shares(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(shares(1 << 30, 4).iter().sum::<u64>(), 1 << 30);
    }

    #[test]
    fn blast_over_loopback_counts_every_byte() {
        let (addr, h) = spawn_local_receiver(3);
        let r = send(addr, 10 << 20 | 7, 3, Mode::Hot).unwrap();
        assert_eq!(h.join().unwrap().unwrap(), 10 << 20 | 7);
        assert_eq!((r.bytes, r.streams), (10 << 20 | 7, 3));
        assert!(r.mib_s > 0.0);
    }

    #[test]
    fn memory_mode_lands_every_byte_in_its_place() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = std::thread::spawn(move || receive(l, 2, touched_buffers(3 << 20, 2)));
        let r = send(addr, 3 << 20, 2, Mode::Memory).unwrap();
        assert_eq!(h.join().unwrap().unwrap(), 3 << 20);
        assert_eq!(r.mode, Mode::Memory);
    }

    #[test]
    fn receiver_rejects_oversized_announcement() {
        let (addr, h) = spawn_local_receiver(1);
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&(STREAM_BYTES_MAX + 1).to_le_bytes()).unwrap();
        let e = h.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("over the"), "{e}");
    }

    #[test]
    fn ready_line_parses() {
        let mut ok: &[u8] = b"LISTENING 127.0.0.1:4000\n";
        assert_eq!(
            parse_ready(&mut ok).unwrap(),
            "127.0.0.1:4000".parse().unwrap()
        );
        let mut bad: &[u8] = b"error: boom\n";
        assert!(parse_ready(&mut bad).is_err());
    }
}
