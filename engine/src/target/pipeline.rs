//! The target data path: one receive thread per stream -> decode workers ->
//! guest memory.
//!
//! ```text
//!  Conn s ──▶ receiver s: header, table (CRC), then per page:
//!               raw  -> recv straight into guest memory, CRC check
//!               zero -> clear the page if it was ever written
//!               lz4  -> pooled buffer ──▶ decoder (s % D): CRC, decode, write
//!             RoundEnd: wait until the decoder applied everything of stream s,
//!             then Ack{stream, seq, round} on the control stream
//! ```
//!
//! Within a round a page appears once; across rounds a page always comes on
//! the same stream (chunk ownership, checked here) and the receiver drains its
//! decoder at every RoundEnd, so an older copy can never land after a newer one.
//!
//! Disk blocks (`Blocks` frames) are decoded by the receiver itself into a
//! registered buffer of the disk writer, which writes them with io_uring
//! (O_DIRECT where the file system allows it). A zero block is not written
//! (the new image is sparse, so holes stay holes) or, when an older copy
//! was, punched out. At RoundEnd the receiver waits for its stream's disk
//! writes as for its decoder, so an XOR-delta always finds its base block
//! on disk and an older block never lands after a newer one.
//!
//! A raw page read from a running guest may be torn (its CRC then fails); such
//! a page must come again in a later round because the guest dirtied it. The
//! receiver marks it *suspect* and a later good copy clears the mark; PREPARE
//! fails while any page is suspect.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use ferry_compress::{decode, decode_delta, Codec, PAGE_SIZE, PAYLOAD_BYTES_MAX};
use ferry_transport::Conn;

use crate::bitmap::AtomicBitmap;
use crate::memory::{GuestMem, PageIndex};
use crate::metrics::Metrics;
use crate::numa::{touched_buffer, Placement, Stage};
use crate::postcopy::target::TargetPostcopy;
use crate::source::pipeline::{owner_stream, Failure};
use crate::wire::crc::crc32c_guest;
use crate::wire::{
    self, frame_crc, Ack, FrameHeader, FrameKind, PageEntry, WireError, HEADER_BYTES,
};

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// How long a round end waits for its stream's disk writes.
const DISK_DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Compressed pages queued per decoder: 256 x 4 KiB = 1 MiB.
const DECODE_DEPTH: usize = 256;

/// State shared by receivers, decoders and the control thread.
pub struct Shared {
    /// Guest memory being filled.
    pub mem: Arc<GuestMem>,
    /// Pages written at least once (a zero page for a never-written page is a no-op).
    pub written: AtomicBitmap,
    /// Pages whose last copy failed its CRC (see the module docs).
    pub suspect: AtomicBitmap,
    /// Per stream: seq of the last frame fully applied (index 0 = stream 1).
    pub applied: Vec<AtomicU64>,
    /// Per stream: page entries received.
    pub pages: Vec<AtomicU64>,
    /// First failure of any stage.
    pub failure: Failure,
    /// The control stream's sending half, and its seq.
    pub control: Mutex<(Box<dyn Conn>, u64)>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The disk image being written, when the VM has a disk.
    pub disk: Option<DiskSink>,
    /// Set at a post-copy switch: from then on every page written is first
    /// claimed, and handed to the guest once written.
    pub postcopy: std::sync::OnceLock<Arc<TargetPostcopy>>,
}

/// Where received disk blocks go.
pub struct DiskSink {
    /// The new image (XOR-delta bases are read from it; zero blocks punched).
    pub file: Arc<std::fs::File>,
    /// Blocks of the disk.
    pub blocks: u64,
    /// Blocks with data in the image (a zero block for any other is a no-op).
    pub written: AtomicBitmap,
    /// The io_uring writer.
    pub writer: crate::disk::uring::DiskWriter,
}

impl DiskSink {
    /// Makes `block` a hole again (it held an older, non-zero copy).
    fn punch(&self, block: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let bytes = crate::link::DISK_BLOCK_BYTES as i64;
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                block as i64 * bytes,
                bytes,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
        // No hole punching here: write zeros instead (buffered; the block's
        // last write completed at an earlier round end).
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(&ZERO_PAGE, block * crate::link::DISK_BLOCK_BYTES)
    }
}

impl Shared {
    /// Sends a frame on the control stream (any thread).
    pub fn send_control(&self, kind: FrameKind, payload: &[u8]) -> Result<(), WireError> {
        let mut c = self.control.lock().unwrap_or_else(|p| p.into_inner());
        c.1 += 1;
        let seq = c.1;
        wire::send_frame(&mut *c.0, kind, 0, seq, payload)
    }
}

struct DecodeJob {
    /// Post-copy: the page was claimed for this copy; hand it over once written.
    postcopy: bool,
    stream: u16,
    page: u64,
    codec: Codec,
    crc: u32,
    buf: Vec<u8>,
}

/// Per-stream counters between a receiver and its decoder.
struct Progress {
    queued: AtomicU64,
    done: AtomicU64,
}

/// The running receive + decode stages.
pub struct Receivers {
    threads: Vec<JoinHandle<()>>,
    conns: Vec<Box<dyn Conn>>,
}

impl Receivers {
    /// Starts the stages over the data connections (index i = stream i + 1).
    pub fn start(
        shared: Arc<Shared>,
        conns: Vec<Box<dyn Conn>>,
        plan: Placement,
    ) -> Result<Self, ferry_transport::TransportError> {
        let streams = conns.len() as u16;
        // Receivers run near the NIC, decoders near guest memory (crate::numa).
        shared.metrics.update(|s| s.placement = plan.clone());
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let decoders = (streams as usize).min(cores).max(1);
        let (pool_tx, pool_rx) = bounded::<Vec<u8>>(decoders * DECODE_DEPTH + streams as usize);
        let progress: Arc<Vec<Progress>> = Arc::new(
            (0..streams)
                .map(|_| Progress {
                    queued: AtomicU64::new(0),
                    done: AtomicU64::new(0),
                })
                .collect(),
        );
        let mut threads = Vec::new();
        let mut job_txs = Vec::new();
        for d in 0..decoders {
            let (tx, rx) = bounded::<DecodeJob>(DECODE_DEPTH);
            job_txs.push(tx);
            let (shared, progress, pool_tx) = (shared.clone(), progress.clone(), pool_tx.clone());
            let pin = plan.pinner(Stage::Decode);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("ferry-decode-{d}"))
                    .spawn(move || {
                        pin.enter();
                        if let Err(e) = decode_stage(rx, &shared, &progress, pool_tx) {
                            shared.failure.fail(e);
                        }
                    })
                    .expect("spawning a thread"),
            );
        }
        let mut clones = Vec::new();
        for (i, mut conn) in conns.into_iter().enumerate() {
            // Raw pages may land one-sided where the transport can (RDMA).
            conn.register_memory(shared.mem.clone())?;
            clones.push(conn.try_clone()?);
            let stream = i as u16 + 1;
            let mut r = RecvStage {
                stream,
                streams,
                conn,
                seq: 0,
                shared: shared.clone(),
                jobs: job_txs[i % decoders].clone(),
                pool: pool_rx.clone(),
                progress: progress.clone(),
                entries: Vec::with_capacity(crate::wire::PAGES_PER_FRAME_MAX),
                scratch: Vec::new(),
            };
            let pin = plan.pinner(Stage::Receive);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("ferry-recv-{stream}"))
                    .spawn(move || {
                        pin.enter();
                        r.scratch = touched_buffer(PAYLOAD_BYTES_MAX);
                        match r.run() {
                            Ok(()) => {}
                            // The source closing a stream after COMMIT or an abort is normal.
                            Err(WireError::Transport(e)) if e.is_disconnect() => {}
                            Err(e) => r.shared.failure.fail(format!("stream {stream}: {e}")),
                        }
                    })
                    .expect("spawning a thread"),
            );
        }
        Ok(Receivers {
            threads,
            conns: clones,
        })
    }

    /// Stops the stages (shutting the streams down) and waits for them.
    pub fn stop(mut self) {
        for c in &self.conns {
            c.shutdown();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn decode_stage(
    rx: Receiver<DecodeJob>,
    shared: &Shared,
    progress: &[Progress],
    pool: Sender<Vec<u8>>,
) -> Result<(), String> {
    let mut page_buf = vec![0u8; PAGE_SIZE];
    // Post-copy: decoded pages are handed to the guest in runs, flushed
    // whenever the queue runs dry (a waiting vCPU never waits for more).
    let mut done = None;
    loop {
        let job = match rx.try_recv() {
            Ok(j) => j,
            Err(_) => {
                if let Some(d) = done.as_mut() {
                    crate::postcopy::target::Handover::flush(d);
                }
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => break,
                }
            }
        };
        let slice = shared
            .mem
            .page(PageIndex(job.page))
            .expect("page checked by the receiver");
        if job.postcopy {
            let pc = shared.postcopy.get().expect("post-copy started");
            let batch = done.get_or_insert_with(|| pc.batch());
            match decode_postcopy(&job, &slice, &mut page_buf) {
                Ok(()) => {
                    slice.copy_from(&page_buf[..]);
                    shared.written.set(job.page);
                    batch.add(job.page);
                }
                // The source's memory is frozen, so this copy is damaged:
                // the page goes back to missing and is requested again.
                Err(e) => pc.reject(job.page, &e),
            }
            progress[job.stream as usize - 1]
                .done
                .fetch_add(1, Ordering::Release);
            let _ = pool.try_send(job.buf);
            continue;
        }
        let fail = |e: String| format!("stream {}: page {}: {e}", job.stream, job.page);
        if job.codec == Codec::Lz4 {
            if crc32c::crc32c(&job.buf) != job.crc {
                // Compressed payloads come from a private copy on the source: a
                // bad CRC is corruption, not a torn page.
                return Err(fail("CRC mismatch on a compressed page".into()));
            }
            decode(Codec::Lz4, &job.buf, &mut page_buf).map_err(|e| fail(e.to_string()))?;
        } else {
            // A delta against the version this side holds; the CRC covers
            // the rebuilt page, so a delta meant for another version (or a
            // corrupted one) cannot slip into guest memory.
            if shared.suspect.get(job.page) {
                return Err(fail("XOR delta for a page whose last copy was torn".into()));
            }
            slice.copy_to(&mut page_buf[..]);
            decode_delta(job.codec, &job.buf, &mut page_buf).map_err(|e| fail(e.to_string()))?;
            if crc32c::crc32c(&page_buf) != job.crc {
                return Err(fail(
                    "XOR delta does not rebuild the page it was made for (wrong base version)"
                        .into(),
                ));
            }
        }
        slice.copy_from(&page_buf[..]);
        shared.written.set(job.page);
        shared.suspect.clear(job.page);
        progress[job.stream as usize - 1]
            .done
            .fetch_add(1, Ordering::Release);
        let _ = pool.try_send(job.buf);
    }
    Ok(())
}

/// Decodes a post-copy page (lz4 or XOR delta) into `out`.
fn decode_postcopy(
    job: &DecodeJob,
    slice: &vm_memory::VolatileSlice<'_>,
    out: &mut [u8],
) -> Result<(), String> {
    if job.codec == Codec::Lz4 {
        if crc32c::crc32c(&job.buf) != job.crc {
            return Err("CRC mismatch on a compressed page".into());
        }
        decode(Codec::Lz4, &job.buf, out).map_err(|e| e.to_string())?;
    } else {
        slice.copy_to(out);
        decode_delta(job.codec, &job.buf, out).map_err(|e| e.to_string())?;
        if crc32c::crc32c(out) != job.crc {
            return Err("XOR delta does not rebuild the page it was made for".into());
        }
    }
    Ok(())
}

struct RecvStage {
    stream: u16,
    streams: u16,
    conn: Box<dyn Conn>,
    seq: u64,
    shared: Arc<Shared>,
    jobs: Sender<DecodeJob>,
    pool: Receiver<Vec<u8>>,
    progress: Arc<Vec<Progress>>,
    entries: Vec<PageEntry>,
    /// A compressed block's payload.
    scratch: Vec<u8>,
}

impl RecvStage {
    fn run(&mut self) -> Result<(), WireError> {
        let mut table = Vec::with_capacity(FrameKind::Pages.payload_cap());
        loop {
            if self.shared.failure.is_set() {
                return Ok(());
            }
            let mut hb = [0u8; HEADER_BYTES];
            self.conn.recv_exact(&mut hb)?;
            let h = FrameHeader::decode(&hb)?;
            if h.stream != self.stream {
                return Err(WireError::Unexpected {
                    kind: h.kind,
                    context: "frame for another stream",
                });
            }
            if h.seq != self.seq + 1 {
                return Err(WireError::Sequence {
                    stream: self.stream,
                    expected: self.seq + 1,
                    got: h.seq,
                });
            }
            self.seq = h.seq;
            table.resize(h.len as usize, 0);
            self.conn.recv_exact(&mut table)?;
            if frame_crc(h.kind, h.stream, h.len, h.seq, &table) != h.crc {
                return Err(WireError::Crc(h.kind));
            }
            self.shared
                .metrics
                .wire_bytes
                .fetch_add(HEADER_BYTES as u64 + h.len as u64, Ordering::Relaxed);
            match h.kind {
                FrameKind::Pages => self.pages(&table)?,
                FrameKind::Blocks => self.blocks(&table)?,
                FrameKind::RoundEnd => {
                    let round = u32::from_le_bytes(table[..].try_into().map_err(|_| {
                        WireError::Malformed {
                            what: "round end",
                            detail: format!("{} bytes", table.len()),
                        }
                    })?);
                    self.drain()?;
                    if let Some(d) = &self.shared.disk {
                        d.writer
                            .drain_stream(self.stream, DISK_DRAIN_TIMEOUT)
                            .map_err(|detail| WireError::Malformed {
                                what: "disk writes",
                                detail,
                            })?;
                    }
                    self.shared.applied[self.stream as usize - 1].store(h.seq, Ordering::Release);
                    self.shared
                        .metrics
                        .update(|s| s.iterations = s.iterations.max(round));
                    let ack = Ack {
                        stream: self.stream,
                        round,
                        seq: h.seq,
                    };
                    self.shared.send_control(FrameKind::Ack, &ack.encode())?;
                }
                kind => {
                    return Err(WireError::Unexpected {
                        kind,
                        context: "data stream",
                    })
                }
            }
        }
    }

    /// Waits until the decoder applied every page this stream queued.
    fn drain(&self) -> Result<(), WireError> {
        let p = &self.progress[self.stream as usize - 1];
        let queued = p.queued.load(Ordering::Relaxed);
        let mut spins = 0u32;
        while p.done.load(Ordering::Acquire) < queued {
            if self.shared.failure.is_set() {
                return Err(WireError::Malformed {
                    what: "decode stage",
                    detail: self.shared.failure.message().unwrap_or_default(),
                });
            }
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        Ok(())
    }

    /// A `Blocks` frame: check the table, receive and decode every block
    /// into a disk buffer, and queue the writes.
    fn blocks(&mut self, table: &[u8]) -> Result<(), WireError> {
        let shared = self.shared.clone();
        let Some(disk) = shared.disk.as_ref() else {
            return Err(WireError::Unexpected {
                kind: FrameKind::Blocks,
                context: "disk blocks for a VM without a disk",
            });
        };
        if table.is_empty() || !table.len().is_multiple_of(PageEntry::BYTES) {
            return Err(WireError::Malformed {
                what: "block table",
                detail: format!("{} bytes", table.len()),
            });
        }
        let bad = |detail: String| WireError::Malformed {
            what: "block entry",
            detail,
        };
        self.entries.clear();
        for raw_entry in table.chunks_exact(PageEntry::BYTES) {
            let e = PageEntry::decode(raw_entry)?;
            if e.page >= disk.blocks {
                return Err(bad(format!(
                    "block {} past the end of the disk ({} blocks)",
                    e.page, disk.blocks
                )));
            }
            if owner_stream(e.page, self.streams) != self.stream {
                return Err(bad(format!(
                    "block {} does not belong to stream {}",
                    e.page, self.stream
                )));
            }
            if self.entries.last().is_some_and(|p| p.page >= e.page) {
                return Err(bad(format!("block {} out of order in its frame", e.page)));
            }
            self.entries.push(e);
        }
        let entries = std::mem::take(&mut self.entries);
        let stage_err = |detail: String| WireError::Malformed {
            what: "disk writes",
            detail,
        };
        let mut buf = disk.writer.buffer().map_err(stage_err)?;
        let mut blocks = Vec::with_capacity(entries.len());
        let mut payload = std::mem::take(&mut self.scratch);
        let (mut zero, mut lz4, mut raw, mut xor, mut data_bytes) = (0u64, 0u64, 0u64, 0u64, 0u64);
        for e in &entries {
            data_bytes += e.len as u64;
            let fail = |what: &str| bad(format!("block {}: {what}", e.page));
            if e.codec == Codec::Zero {
                if disk.written.get(e.page) {
                    disk.punch(e.page)
                        .map_err(|err| stage_err(format!("punching block {}: {err}", e.page)))?;
                    disk.written.clear(e.page);
                }
                zero += 1;
                continue;
            }
            let slot = buf.block_mut(blocks.len());
            match e.codec {
                Codec::Raw => {
                    self.conn.recv_exact(slot)?;
                    if crc32c::crc32c(slot) != e.crc {
                        // Blocks come from a private copy: a bad CRC is corruption.
                        return Err(fail("CRC mismatch"));
                    }
                    raw += 1;
                }
                Codec::Lz4 => {
                    payload.resize(e.len as usize, 0);
                    self.conn.recv_exact(&mut payload)?;
                    if crc32c::crc32c(&payload) != e.crc {
                        return Err(fail("CRC mismatch on a compressed block"));
                    }
                    decode(Codec::Lz4, &payload, slot).map_err(|err| fail(&err.to_string()))?;
                    lz4 += 1;
                }
                _ => {
                    payload.resize(e.len as usize, 0);
                    self.conn.recv_exact(&mut payload)?;
                    if disk.written.get(e.page) {
                        use std::os::unix::fs::FileExt;
                        disk.file
                            .read_exact_at(slot, e.page * crate::link::DISK_BLOCK_BYTES)
                            .map_err(|err| stage_err(format!("reading block {}: {err}", e.page)))?;
                    } else {
                        slot.fill(0);
                    }
                    decode_delta(e.codec, &payload, slot).map_err(|err| fail(&err.to_string()))?;
                    if crc32c::crc32c(slot) != e.crc {
                        return Err(fail(
                            "XOR delta does not rebuild the block it was made for (wrong base version)",
                        ));
                    }
                    xor += 1;
                }
            }
            disk.written.set(e.page);
            blocks.push(e.page);
        }
        self.scratch = payload;
        let n = entries.len() as u64;
        self.entries = entries;
        if blocks.is_empty() {
            disk.writer.recycle(buf);
        } else {
            let batch = crate::disk::uring::Batch {
                stream: self.stream,
                blocks,
                buf,
            };
            disk.writer.write(batch).map_err(stage_err)?;
        }
        let m = &shared.metrics;
        m.wire_bytes.fetch_add(data_bytes, Ordering::Relaxed);
        m.disk.wire_bytes.fetch_add(
            data_bytes + HEADER_BYTES as u64 + table.len() as u64,
            Ordering::Relaxed,
        );
        m.disk.blocks.fetch_add(n, Ordering::Relaxed);
        m.disk.zero.fetch_add(zero, Ordering::Relaxed);
        m.disk.lz4.fetch_add(lz4, Ordering::Relaxed);
        m.disk.raw.fetch_add(raw, Ordering::Relaxed);
        m.disk.xor.fetch_add(xor, Ordering::Relaxed);
        self.shared.pages[self.stream as usize - 1].fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn pages(&mut self, table: &[u8]) -> Result<(), WireError> {
        if let Some(pc) = self.shared.postcopy.get().cloned() {
            return self.pages_postcopy(table, &pc);
        }
        self.pages_precopy(table)
    }

    /// Checks a page table and fills `self.entries`.
    fn check_table(&mut self, table: &[u8], total_pages: u64) -> Result<(), WireError> {
        if table.is_empty() || !table.len().is_multiple_of(PageEntry::BYTES) {
            return Err(WireError::Malformed {
                what: "page table",
                detail: format!("{} bytes", table.len()),
            });
        }
        // Check the whole table before touching memory.
        self.entries.clear();
        for raw_entry in table.chunks_exact(PageEntry::BYTES) {
            let e = PageEntry::decode(raw_entry)?;
            let bad = |detail: String| WireError::Malformed {
                what: "page entry",
                detail,
            };
            if e.page >= total_pages {
                return Err(bad(format!(
                    "page {} past the end of guest memory ({total_pages} pages)",
                    e.page
                )));
            }
            if owner_stream(e.page, self.streams) != self.stream {
                return Err(bad(format!(
                    "page {} does not belong to stream {}",
                    e.page, self.stream
                )));
            }
            if self
                .entries
                .last()
                .is_some_and(|prev: &PageEntry| prev.page >= e.page)
            {
                return Err(bad(format!("page {} out of order in its frame", e.page)));
            }
            self.entries.push(e);
        }
        Ok(())
    }

    /// Receives an encoded page's payload and queues it for this stream's
    /// decoder (`postcopy`: the page was claimed; hand it over once written).
    fn queue_decode(&mut self, e: PageEntry, postcopy: bool) -> Result<(), WireError> {
        let mut buf = self
            .pool
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(PAYLOAD_BYTES_MAX));
        buf.resize(e.len as usize, 0);
        self.conn.recv_exact(&mut buf)?;
        self.progress[self.stream as usize - 1]
            .queued
            .fetch_add(1, Ordering::Relaxed);
        let job = DecodeJob {
            postcopy,
            stream: self.stream,
            page: e.page,
            codec: e.codec,
            crc: e.crc,
            buf,
        };
        self.jobs.send(job).map_err(|_| WireError::Malformed {
            what: "decode stage",
            detail: self
                .shared
                .failure
                .message()
                .unwrap_or_else(|| "stopped".into()),
        })
    }

    /// Post-copy: every page is claimed before it is written; a page that
    /// another copy already claimed is read off the wire and dropped, and a
    /// written page goes to the guest at once.
    fn pages_postcopy(&mut self, table: &[u8], pc: &TargetPostcopy) -> Result<(), WireError> {
        let mem = self.shared.mem.clone();
        self.check_table(table, mem.pages())?;
        let entries = std::mem::take(&mut self.entries);
        let mut data_bytes = 0u64;
        let mut done = pc.batch();
        let mut i = 0;
        while i < entries.len() {
            let e = entries[i];
            let slice = mem.page(PageIndex(e.page)).expect("index checked above");
            data_bytes += e.len as u64;
            let mine = pc.states.claim(e.page);
            match (e.codec, mine) {
                (Codec::Zero, true) => {
                    if self.shared.written.get(e.page) {
                        slice.copy_from(&ZERO_PAGE[..]);
                    }
                    done.add(e.page);
                    i += 1;
                }
                (Codec::Raw, true) => {
                    // Consecutive raw pages this copy claimed: one receive
                    // straight into guest memory.
                    let mut n = 1;
                    while i + n < entries.len()
                        && entries[i + n].codec == Codec::Raw
                        && entries[i + n].page == e.page + n as u64
                        && mem.pages_left_in_region(PageIndex(e.page)) > n as u64
                        && pc.states.claim(e.page + n as u64)
                    {
                        n += 1;
                    }
                    let run = mem
                        .pages_slice(PageIndex(e.page), n as u64)
                        .expect("run inside one region");
                    self.conn.recv_exact_volatile(&run)?;
                    for (k, re) in entries[i..i + n].iter().enumerate() {
                        let page = run
                            .subslice(k * PAGE_SIZE, PAGE_SIZE)
                            .expect("inside the run");
                        if crc32c_guest(&page) == re.crc {
                            self.shared.written.set(re.page);
                            done.add(re.page);
                        } else {
                            pc.reject(re.page, "CRC mismatch in the background push");
                        }
                    }
                    data_bytes += (n as u64 - 1) * PAGE_SIZE as u64;
                    i += n;
                }
                (Codec::Zero, false) => {
                    pc.duplicate();
                    i += 1;
                }
                (_, false) => {
                    // Someone else's page: off the wire, dropped.
                    self.scratch.resize(e.len as usize, 0);
                    self.conn.recv_exact(&mut self.scratch[..e.len as usize])?;
                    pc.duplicate();
                    i += 1;
                }
                (_, true) => {
                    self.queue_decode(e, true)?;
                    i += 1;
                }
            }
        }
        done.flush();
        let n = entries.len() as u64;
        self.entries = entries;
        self.shared
            .metrics
            .wire_bytes
            .fetch_add(data_bytes, Ordering::Relaxed);
        self.shared.pages[self.stream as usize - 1].fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn pages_precopy(&mut self, table: &[u8]) -> Result<(), WireError> {
        let mem = self.shared.mem.clone();
        let total_pages = mem.pages();
        self.check_table(table, total_pages)?;
        let entries = std::mem::take(&mut self.entries);
        let (mut zero, mut lz4, mut raw, mut data_bytes) = (0u64, 0u64, 0u64, 0u64);
        let (mut xor, mut xor_bytes) = (0u64, 0u64);
        let mut i = 0;
        while i < entries.len() {
            let e = entries[i];
            let slice = mem.page(PageIndex(e.page)).expect("index checked above");
            data_bytes += e.len as u64;
            match e.codec {
                Codec::Zero => {
                    if self.shared.written.get(e.page) {
                        slice.copy_from(&ZERO_PAGE[..]);
                    }
                    self.shared.suspect.clear(e.page);
                    zero += 1;
                    i += 1;
                }
                Codec::Raw => {
                    // A run of raw pages adjacent in guest memory arrives with one receive.
                    let mut n = 1;
                    while i + n < entries.len()
                        && entries[i + n].codec == Codec::Raw
                        && entries[i + n].page == e.page + n as u64
                        && mem.pages_left_in_region(PageIndex(e.page)) > n as u64
                    {
                        n += 1;
                    }
                    let run = mem
                        .pages_slice(PageIndex(e.page), n as u64)
                        .expect("run inside one region");
                    self.conn.recv_exact_volatile(&run)?;
                    for (k, re) in entries[i..i + n].iter().enumerate() {
                        let page = run
                            .subslice(k * PAGE_SIZE, PAGE_SIZE)
                            .expect("inside the run");
                        self.shared.written.set(re.page);
                        if crc32c_guest(&page) == re.crc {
                            self.shared.suspect.clear(re.page);
                        } else {
                            self.shared.suspect.set(re.page);
                        }
                    }
                    data_bytes += (n as u64 - 1) * PAGE_SIZE as u64;
                    raw += n as u64;
                    i += n;
                }
                Codec::Lz4 | Codec::Xor | Codec::XorLz4 => {
                    self.queue_decode(e, false)?;
                    if e.codec == Codec::Lz4 {
                        lz4 += 1;
                    } else {
                        xor += 1;
                        xor_bytes += e.len as u64;
                    }
                    i += 1;
                }
            }
        }
        self.entries = entries;
        let m = &self.shared.metrics;
        m.wire_bytes.fetch_add(data_bytes, Ordering::Relaxed);
        m.pages_zero.fetch_add(zero, Ordering::Relaxed);
        m.pages_compressed.fetch_add(lz4, Ordering::Relaxed);
        m.pages_raw.fetch_add(raw, Ordering::Relaxed);
        m.xor.pages.fetch_add(xor, Ordering::Relaxed);
        m.xor.bytes.fetch_add(xor_bytes, Ordering::Relaxed);
        self.shared.pages[self.stream as usize - 1]
            .fetch_add(zero + lz4 + raw + xor, Ordering::Relaxed);
        Ok(())
    }
}
