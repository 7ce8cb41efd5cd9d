//! The source data path: read stage (the caller) -> encode workers -> one
//! send thread per stream, joined by bounded channels with pooled buffers.
//!
//! ```text
//!  caller: dirty bitmap -> Batches ──▶ encoder w (streams s with s % E == w) ──▶ sender s ──▶ Conn s
//!                                         zero check / lz4 / raw + CRC            writev: header, table,
//!                                                                                 payloads, guest memory
//! ```
//!
//! Page ownership: a page always travels on the stream that owns its 2 MiB
//! chunk ([`owner_stream`]), and one encoder and one sender serve each stream
//! in order. So a newer copy of a page can never overtake an older one, with
//! no global ordering between streams.
//!
//! Disk blocks take a side road into the same encoders: the caller queues
//! batches of blocks (up to a frame's worth, one owner stream each) on the
//! disk reader's io_uring; its thread hands each completed batch to the
//! stream's encoder, which encodes it like re-sent pages (from the private
//! copy the read made) into a `Blocks` frame. Blocks follow the same
//! ownership rule (by 2 MiB of disk), and every round drains the reader
//! before its RoundEnd, so block copies cannot overtake each other either.
//!
//! ```text
//!  caller: dirty blocks ─▶ disk reader (io_uring, O_DIRECT, QD >= 32) ─▶ encoder w ─▶ sender s
//! ```

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use ferry_compress::{
    is_zero, is_zero_guest, Codec, DeltaCache, DeltaOutcome, DeltaStats, PageEncoder, PAGE_SIZE,
};
use ferry_transport::{Conn, Seg};

use crate::bitmap::AtomicBitmap;
use crate::disk::uring::{self, DiskReader, Recycler};
use crate::memory::{GuestMem, PageIndex};
use crate::metrics::Metrics;
use crate::numa::{touched_buffer, Placement, PlacementPolicy, Stage};
use crate::wire::crc::{crc32c_guest, prefetch};
use crate::wire::{frame_crc, FrameHeader, FrameKind, PageEntry, PAGES_PER_FRAME_MAX};

/// Pages per ownership chunk: 512 x 4 KiB = 2 MiB, a huge page, so one
/// stream reads a huge page's worth of contiguous memory at a time.
pub const CHUNK_PAGES: u64 = 512;

/// The data stream (1-based) that owns `page` in a session of `streams`.
pub fn owner_stream(page: u64, streams: u16) -> u16 {
    debug_assert!(streams > 0);
    1 + ((page / CHUNK_PAGES) % streams as u64) as u16
}

/// Batches queued per encoder: 64 x 256 KiB = 16 MiB of guest memory in
/// flight per encoder, enough to cover a scheduling hiccup, small enough that
/// a cancelled round stops quickly.
const WORK_DEPTH: usize = 64;
/// Encoded frames queued per sender: 4 x 256 KiB.
const OUT_DEPTH: usize = 4;
/// Encoded frame buffers per stream in the pool (OUT_DEPTH + one being
/// encoded + one being sent).
const POOL_PER_STREAM: usize = OUT_DEPTH + 2;

/// What the caller hands an encoder.
enum Work {
    /// Ascending pages of one stream, at most a frame's worth.
    Pages {
        stream: u16,
        pages: Vec<u64>,
        /// Sent before (a round after the bulk one): a delta candidate.
        resend: bool,
        /// The final round (guest paused): nothing is sent after it.
        last: bool,
    },
    /// Disk blocks read by the disk reader, all owned by `batch.stream`.
    Blocks {
        batch: uring::Batch,
        /// As for `Pages`.
        resend: bool,
        /// As for `Pages`.
        last: bool,
    },
    RoundEnd {
        stream: u16,
        round: u32,
    },
}

/// What follows a `Pages` frame's table, in order.
enum Part {
    /// Bytes of the frame's payload buffer.
    Payload { off: usize, len: usize },
    /// Consecutive raw guest pages, sent straight from guest memory.
    Guest { first: u64, count: u64 },
}

/// One encoded frame (pooled).
struct Encoded {
    /// `Pages` or `Blocks`.
    kind: FrameKind,
    table: Vec<u8>,
    payload: Vec<u8>,
    parts: Vec<Part>,
    entries: u64,
}

impl Default for Encoded {
    fn default() -> Self {
        Encoded {
            kind: FrameKind::Pages,
            table: Vec::new(),
            payload: Vec::new(),
            parts: Vec::new(),
            entries: 0,
        }
    }
}

/// The disk this migration moves, as the pipeline reads it.
pub struct DiskInput {
    /// The image (the VMM's descriptor; the reader opens its own).
    pub file: Arc<std::fs::File>,
    /// Blocks of the image.
    pub blocks: u64,
    /// Index of block 0 in the migration's page index space (memory pages
    /// come first): the delta cache and the re-send bitmap key on it.
    pub base: u64,
}

/// Registered read buffers of the disk reader: 128 x 256 KiB = 32 MiB, so
/// the ring keeps >= 32 reads in flight while encoders hold a few batches.
const DISK_BUFFERS: usize = 128;
/// Submission queue entries of the disk reader's ring.
const DISK_QUEUE_DEPTH: u32 = 64;

impl DiskSide {
    /// Queues a read. The bulk round reads with O_DIRECT (cold data, not
    /// worth caching); later rounds read the blocks the guest just wrote,
    /// which a VMM writing through the page cache holds there dirty, so
    /// they go through the page cache.
    fn read(&self, stream: u16, blocks: Vec<u64>, dirty_round: bool) -> Result<(), String> {
        if dirty_round {
            self.reader.read_cached(stream, blocks)
        } else {
            self.reader.read(stream, blocks)
        }
    }
}

/// The disk side of a running pipeline.
struct DiskSide {
    reader: DiskReader,
    base: u64,
    blocks: u64,
    /// Blocks gathered per stream for the next read batch.
    pending: Vec<Vec<u64>>,
    /// Flags of the batches being read: bit 0 resend, bit 1 last round.
    flags: Arc<AtomicU8>,
}

enum Out {
    Frame(Box<Encoded>),
    RoundEnd(u32),
}

/// A round ended on a stream: the RoundEnd frame went out with this seq.
#[derive(Clone, Copy, Debug)]
pub struct RoundSent {
    /// The stream.
    pub stream: u16,
    /// The round.
    pub round: u32,
    /// The RoundEnd frame's seq.
    pub seq: u64,
    /// Page entries sent on the stream so far.
    pub pages: u64,
}

/// Shared failure slot: the first error wins, everyone stops.
#[derive(Default)]
pub struct Failure {
    set: AtomicBool,
    msg: Mutex<Option<String>>,
}

impl Failure {
    /// Records `msg` if nothing failed before.
    pub fn fail(&self, msg: String) {
        let mut m = self.msg.lock().unwrap_or_else(|p| p.into_inner());
        if m.is_none() {
            *m = Some(msg);
        }
        self.set.store(true, Ordering::SeqCst);
    }
    /// Whether anything failed.
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }
    /// The first error.
    pub fn message(&self) -> Option<String> {
        self.msg.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A token bucket shared by all senders (`--bandwidth-mib-s`).
pub struct Throttle {
    bytes_per_s: f64,
    state: Mutex<(Instant, f64)>,
}

impl Throttle {
    /// A bucket refilled at `mib_s` MiB/s, holding at most 10 ms of tokens
    /// (so bursts stay short).
    pub fn new(mib_s: u64) -> Self {
        Throttle {
            bytes_per_s: mib_s as f64 * 1048576.0,
            state: Mutex::new((Instant::now(), 0.0)),
        }
    }

    /// Takes `bytes` tokens, sleeping until they exist.
    pub fn take(&self, bytes: usize) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let cap = self.bytes_per_s * 0.010;
            s.1 = (s.1 + now.duration_since(s.0).as_secs_f64() * self.bytes_per_s).min(cap);
            s.0 = now;
            s.1 -= bytes as f64;
            if s.1 < 0.0 {
                Duration::from_secs_f64(-s.1 / self.bytes_per_s)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// The running encode + send stages of one migration.
pub struct Pipeline {
    streams: u16,
    encoders: usize,
    work: Vec<Sender<Work>>,
    round_rx: Receiver<RoundSent>,
    threads: Vec<JoinHandle<()>>,
    /// The first failure of any stage.
    pub failure: Arc<Failure>,
    conns: Vec<Box<dyn Conn>>,
    last: Vec<RoundSent>,
    /// Pages gathered per stream for its next frame.
    pending: Vec<Vec<u64>>,
    /// The pages queued now were sent before (rounds after the bulk one).
    resend: bool,
    /// The pages queued now are the final round's.
    final_round: bool,
    disk: Option<DiskSide>,
}

/// Encoder workers: at most one per stream, and no more than the cores can
/// run next to the senders (2 on the machines we test on).
fn encoder_count(streams: u16) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (streams as usize).min(cores.max(1))
}

impl Pipeline {
    /// Starts the stages over the data connections (index i = stream i + 1).
    pub fn start(
        mem: Arc<GuestMem>,
        conns: Vec<Box<dyn Conn>>,
        metrics: Arc<Metrics>,
        throttle: Option<Arc<Throttle>>,
        xor_cache_bytes: u64,
        disk: Option<DiskInput>,
        placement: &PlacementPolicy,
    ) -> Result<Self, ferry_transport::TransportError> {
        let streams = u16::try_from(conns.len()).expect("stream count checked by the caller");
        assert!(streams > 0);
        let encoders = encoder_count(streams);
        let failure = Arc::new(Failure::default());
        // Pages (and blocks) sent at least once in this session, to count re-sends.
        let index_end = disk.as_ref().map_or(mem.pages(), |d| d.base + d.blocks);
        let sent_before = Arc::new(AtomicBitmap::new(index_end));
        let (round_tx, round_rx) = bounded(streams as usize * 4);
        // Encoders run near guest memory, senders near the NIC (crate::numa).
        let plan = Placement::for_source(
            placement,
            &mem,
            &conns[0].peer(),
            disk.as_ref().map(|d| &*d.file),
        );
        metrics.update(|s| s.placement = plan.clone());
        // Filled by the encoders, each with its streams' share, from their
        // own node.
        let (pool_tx, pool_rx) = bounded::<Box<Encoded>>(streams as usize * POOL_PER_STREAM);
        let mut threads = Vec::new();
        let mut out_txs = Vec::new();
        let mut clones = Vec::new();
        for (i, conn) in conns.iter().enumerate() {
            let (tx, rx) = bounded::<Out>(OUT_DEPTH);
            out_txs.push(tx);
            let stream = i as u16 + 1;
            let mut conn = conn.try_clone()?;
            // Raw pages may go one-sided where the transport can (RDMA).
            conn.register_memory(mem.clone())?;
            clones.push(conn.try_clone()?);
            let (mem, metrics, failure, pool_tx, round_tx, throttle) = (
                mem.clone(),
                metrics.clone(),
                failure.clone(),
                pool_tx.clone(),
                round_tx.clone(),
                throttle.clone(),
            );
            let pin = plan.pinner(Stage::Send);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("ferry-send-{stream}"))
                    .spawn(move || {
                        pin.enter();
                        let mut s = SendStage {
                            stream,
                            conn,
                            mem,
                            metrics,
                            throttle,
                            seq: 0,
                            pages: 0,
                        };
                        // `rx` lives until the failure is recorded, so the
                        // encoder finding the channel closed also finds why.
                        if let Err(e) = s.run(&rx, pool_tx, round_tx) {
                            failure.fail(format!("stream {stream}: {e}"));
                            s.conn.shutdown();
                        }
                        drop(rx);
                    })
                    .expect("spawning a thread"),
            );
        }
        let mut work = Vec::new();
        let mut work_rxs = Vec::new();
        for _ in 0..encoders {
            let (tx, rx) = bounded::<Work>(WORK_DEPTH);
            work.push(tx);
            work_rxs.push(rx);
        }
        // The disk reader hands each batch it read to the stream's encoder.
        let flags = Arc::new(AtomicU8::new(0));
        let disk = match disk {
            None => None,
            Some(d) => {
                let (txs, flags2) = (work.clone(), flags.clone());
                let deliver = move |batch: uring::Batch| {
                    let f = flags2.load(Ordering::Acquire);
                    let w = Work::Blocks {
                        batch,
                        resend: f & 1 != 0,
                        last: f & 2 != 0,
                    };
                    let Work::Blocks { batch, .. } = &w else {
                        unreachable!()
                    };
                    let tx = &txs[(batch.stream as usize - 1) % txs.len()];
                    tx.send(w).map_err(|_| "the encoders stopped".to_string())
                };
                let reader = DiskReader::start_pinned(
                    &d.file,
                    d.blocks,
                    DISK_BUFFERS,
                    DISK_QUEUE_DEPTH,
                    deliver,
                    plan.pinner(Stage::DiskRead),
                )
                .map_err(|source| ferry_transport::TransportError::Io {
                    op: "starting the disk reader",
                    source,
                })?;
                metrics.update(|s| {
                    if let Some(ds) = s.disk.as_mut() {
                        ds.direct_io = reader.direct();
                    }
                });
                Some(DiskSide {
                    reader,
                    base: d.base,
                    blocks: d.blocks,
                    pending: (0..streams)
                        .map(|_| Vec::with_capacity(uring::BATCH_BLOCKS_MAX))
                        .collect(),
                    flags,
                })
            }
        };
        let recycler = disk.as_ref().map(|d| d.reader.recycler());
        let disk_base = disk.as_ref().map_or(0, |d| d.base);
        // With a bandwidth cap the link is the bottleneck, so the bulk
        // round keeps a copy of what it sends in the delta cache: a page the
        // guest rewrites later then goes as a delta on its first re-send
        // instead of whole (a memcpy per page, which a capped link hides).
        // Only when the cache holds at least half of guest memory: a smaller
        // one would fill with bulk pages the guest never touches again and
        // evict the hot ones (measured at 1/8: re-sent pages cost 4% more,
        // downtime rose from 49 to 77 ms).
        let keep_first_sends = throttle.is_some() && xor_cache_bytes >= mem.bytes() / 2;
        // Chunk fingerprints of every page cost 1/32 of guest memory and
        // give a page the cache does not hold a delta base all the same (a
        // patch of its changed 256-byte chunks). They come out of the cache's
        // budget, when it is at least twice their size; under a cap the bulk
        // round fingerprints what it sends (a copy and a hash per page), so
        // that even a page's first re-send is a patch.
        let mem_pages = mem.bytes() / PAGE_SIZE as u64;
        let fp_bytes = DeltaCache::fingerprint_bytes(mem_pages);
        let fingerprints = xor_cache_bytes >= 2 * fp_bytes;
        let content_bytes = if fingerprints {
            xor_cache_bytes - fp_bytes
        } else {
            xor_cache_bytes
        };
        let fingerprint_first_sends = throttle.is_some() && fingerprints;
        for (w, rx) in work_rxs.into_iter().enumerate() {
            // This encoder serves streams s (1-based) with (s - 1) % encoders == w.
            let outs: Vec<Option<Sender<Out>>> = out_txs
                .iter()
                .enumerate()
                .map(|(i, tx)| (i % encoders == w).then(|| tx.clone()))
                .collect();
            let (mem, metrics, failure, pool_rx, sent_before, recycler) = (
                mem.clone(),
                metrics.clone(),
                failure.clone(),
                pool_rx.clone(),
                sent_before.clone(),
                recycler.clone(),
            );
            let (pin, pool_tx) = (plan.pinner(Stage::Encode), pool_tx.clone());
            let share = outs.iter().flatten().count() * POOL_PER_STREAM;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("ferry-encode-{w}"))
                    .spawn(move || {
                        pin.enter();
                        for _ in 0..share {
                            let e = Box::new(Encoded {
                                table: touched_buffer(PAGES_PER_FRAME_MAX * PageEntry::BYTES),
                                payload: touched_buffer(PAGES_PER_FRAME_MAX * PAGE_SIZE),
                                ..Encoded::default()
                            });
                            // The pool holds every stream's share: never full.
                            let _ = pool_tx.send(e);
                        }
                        drop(pool_tx);
                        // Pages are pinned to encoders, so each keeps its
                        // own share of the delta cache, without locks.
                        let mut cache = DeltaCache::new((content_bytes / encoders as u64) as usize);
                        if fingerprints {
                            cache = cache.with_fingerprints(mem_pages);
                        }
                        let stage = EncodeStage {
                            mem: &mem,
                            metrics: &metrics,
                            sent_before: &sent_before,
                            recycler,
                            disk_base,
                            keep_first_sends,
                            fingerprint_first_sends,
                        };
                        if let Err(e) = stage.run(&rx, outs, pool_rx, cache) {
                            failure.fail(e);
                        }
                        drop(rx);
                    })
                    .expect("spawning a thread"),
            );
        }
        let last = (1..=streams)
            .map(|stream| RoundSent {
                stream,
                round: 0,
                seq: 0,
                pages: 0,
            })
            .collect();
        Ok(Pipeline {
            streams,
            encoders,
            work,
            round_rx,
            threads,
            failure,
            conns: clones,
            last,
            pending: (0..streams)
                .map(|_| Vec::with_capacity(PAGES_PER_FRAME_MAX))
                .collect(),
            resend: false,
            final_round: false,
            disk,
        })
    }

    /// Queues one item for `stream`'s encoder. Blocks when the stages are
    /// full. Err when a stage failed.
    fn push(&self, w: Work, stream: u16) -> Result<(), String> {
        let tx = &self.work[(stream as usize - 1) % self.encoders];
        tx.send(w).map_err(|_| {
            self.failure
                .message()
                .unwrap_or_else(|| "pipeline stopped".into())
        })
    }

    /// Queues every page of `first..first + count`, split by owner stream,
    /// region boundaries and frame size.
    pub fn send_run(&mut self, mem: &GuestMem, first: u64, count: u64) -> Result<(), String> {
        let mut p = first;
        let end = first + count;
        while p < end {
            // A stretch owned by one stream: to the end of the chunk or run.
            let chunk_end = ((p / CHUNK_PAGES + 1) * CHUNK_PAGES).min(end);
            let stream = owner_stream(p, self.streams);
            assert!(
                mem.pages_left_in_region(PageIndex(p)) > 0,
                "page {p} outside guest memory"
            );
            for page in p..chunk_end {
                let pending = &mut self.pending[stream as usize - 1];
                pending.push(page);
                if pending.len() == PAGES_PER_FRAME_MAX {
                    self.flush(stream)?;
                }
            }
            p = chunk_end;
        }
        Ok(())
    }

    /// Queues every disk block of `first..first + count` for reading, split
    /// by owner stream and batch size.
    pub fn send_blocks(&mut self, first: u64, count: u64) -> Result<(), String> {
        let d = self.disk.as_mut().expect("a disk to send");
        assert!(first + count <= d.blocks, "blocks past the end of the disk");
        let end = first + count;
        let mut b = first;
        while b < end {
            let chunk_end = ((b / CHUNK_PAGES + 1) * CHUNK_PAGES).min(end);
            let stream = owner_stream(b, self.streams);
            for block in b..chunk_end {
                let pending = &mut d.pending[stream as usize - 1];
                pending.push(block);
                if pending.len() == uring::BATCH_BLOCKS_MAX {
                    let blocks = std::mem::take(pending);
                    d.read(stream, blocks, self.resend)?;
                }
            }
            b = chunk_end;
        }
        Ok(())
    }

    /// Queues every gathered block for reading, and waits until the reader
    /// handed all of them to the encoders (before a round ends).
    fn drain_blocks(&mut self, timeout: Duration) -> Result<(), String> {
        let Some(d) = self.disk.as_mut() else {
            return Ok(());
        };
        for i in 0..d.pending.len() {
            let blocks = std::mem::take(&mut d.pending[i]);
            if !blocks.is_empty() {
                d.read(i as u16 + 1, blocks, self.resend)?;
            }
        }
        d.reader.drain(timeout)
    }

    /// Queues the pages gathered for `stream` as one frame. Scattered dirty
    /// pages of a stream share frames this way, instead of a frame each.
    fn flush(&mut self, stream: u16) -> Result<(), String> {
        let pending = &mut self.pending[stream as usize - 1];
        if pending.is_empty() {
            return Ok(());
        }
        let pages = std::mem::replace(pending, Vec::with_capacity(PAGES_PER_FRAME_MAX));
        let (resend, last) = (self.resend, self.final_round);
        self.push(
            Work::Pages {
                stream,
                pages,
                resend,
                last,
            },
            stream,
        )
    }

    /// Sends every stream's gathered pages now, so that the pages queued
    /// next start new frames (a frame's pages must ascend).
    pub fn flush_all(&mut self) -> Result<(), String> {
        for s in 1..=self.streams {
            self.flush(s)?;
        }
        Ok(())
    }

    /// Marks the pages queued from now on as sent before (or not). Frames
    /// never mix rounds: every round ends with [`Self::end_round`].
    /// `last` marks the final round: a page the delta cache does not hold
    /// goes straight from guest memory then (the guest is paused, and no
    /// later round could use a cached copy).
    pub fn set_resend(&mut self, resend: bool, last: bool) {
        self.resend = resend;
        self.final_round = last;
        if let Some(d) = &self.disk {
            // The reader is drained at every round end, so no batch of the
            // previous round can pick these flags up.
            d.flags
                .store(u8::from(resend) | u8::from(last) << 1, Ordering::Release);
        }
    }

    /// Ends `round` on every stream and waits until each sent its RoundEnd.
    /// Returns per-stream results, index 0 = stream 1.
    pub fn end_round(&mut self, round: u32, timeout: Duration) -> Result<(), String> {
        self.drain_blocks(timeout)
            .map_err(|e| self.failure.message().unwrap_or(e))?;
        for s in 1..=self.streams {
            self.flush(s)?;
            self.push(Work::RoundEnd { stream: s, round }, s)?;
        }
        let mut got: Vec<Option<RoundSent>> = vec![None; self.streams as usize];
        let deadline = Instant::now() + timeout;
        while got.iter().any(Option::is_none) {
            if self.failure.is_set() {
                return Err(self.failure.message().unwrap_or_default());
            }
            match self.round_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(r) if r.round == round => got[r.stream as usize - 1] = Some(r),
                Ok(r) => unreachable!("round {} ended while waiting for {round}", r.round),
                Err(_) if Instant::now() > deadline => {
                    return Err(format!("round {round} did not drain within {timeout:?}"))
                }
                Err(_) => {}
            }
        }
        self.last = got.into_iter().map(|r| r.expect("all present")).collect();
        Ok(())
    }

    /// What each stream sent up to its last RoundEnd, index 0 = stream 1.
    pub fn totals(&self) -> Vec<crate::wire::StreamTotals> {
        self.last
            .iter()
            .map(|r| crate::wire::StreamTotals {
                last_seq: r.seq,
                pages: r.pages,
            })
            .collect()
    }

    /// Handles on the data streams, to break them from another thread.
    pub fn handles(&self) -> Vec<Box<dyn Conn>> {
        self.conns
            .iter()
            .filter_map(|c| c.try_clone().ok())
            .collect()
    }

    /// Stops all stages. With `abort`, unblocks senders stuck on a dead peer.
    pub fn stop(mut self, abort: bool) {
        if abort {
            self.failure.fail("aborted".into());
            for c in &self.conns {
                c.shutdown();
            }
        }
        if let Some(d) = self.disk.take() {
            // Its deliver callback may wait on an encoder: stop the reader
            // while the encoders still run (they drain it), then the rest.
            d.reader.stop();
        }
        self.work.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What an encoder works with besides its channels.
struct EncodeStage<'a> {
    mem: &'a GuestMem,
    metrics: &'a Metrics,
    /// Pages sent at least once (every encoder marks its own pages).
    sent_before: &'a AtomicBitmap,
    /// Where the disk reader's buffers go back (with a disk).
    recycler: Option<Recycler>,
    /// Index of disk block 0 in the page index space.
    disk_base: u64,
    /// Keep a copy of every page's first send in the delta cache (see
    /// `Pipeline::start`).
    keep_first_sends: bool,
    /// Keep the fingerprints of every page's first send (see
    /// `Pipeline::start`).
    fingerprint_first_sends: bool,
}

impl EncodeStage<'_> {
    fn run(
        &self,
        rx: &Receiver<Work>,
        outs: Vec<Option<Sender<Out>>>,
        pool: Receiver<Box<Encoded>>,
        mut cache: DeltaCache,
    ) -> Result<(), String> {
        let (mem, metrics) = (self.mem, self.metrics);
        let mut enc = PageEncoder::default();
        let mut stage = vec![0u8; PAGE_SIZE];
        let mut lz = Vec::with_capacity(PAGE_SIZE);
        let mut delta = Vec::with_capacity(PAGE_SIZE);
        let xor = cache.enabled();
        // First sends are kept for later deltas only where the link, not
        // the CPU, is the bottleneck: the copy is cheap against a capped link.
        let remember = xor && self.keep_first_sends;
        let fingerprint = xor && self.fingerprint_first_sends;
        let mut published = DeltaStats::default();
        let out_for = |s: u16| {
            outs[s as usize - 1]
                .as_ref()
                .expect("work routed to the stream's encoder")
        };
        for w in rx {
            match w {
                Work::RoundEnd { stream, round } => {
                    if xor {
                        publish(&cache.stats(), &mut published, metrics);
                    }
                    if out_for(stream).send(Out::RoundEnd(round)).is_err() {
                        return Ok(()); // the sender failed and reported why
                    }
                }
                Work::Blocks {
                    batch,
                    resend,
                    last,
                } => {
                    let Ok(mut e) = pool.recv() else {
                        return Ok(());
                    };
                    let stream = batch.stream;
                    self.encode_blocks(&batch, resend && xor, last, &mut e, &mut enc, &mut cache)?;
                    if let Some(r) = &self.recycler {
                        r.give(batch.buf);
                    }
                    if out_for(stream).send(Out::Frame(e)).is_err() {
                        return Ok(());
                    }
                }
                Work::Pages {
                    stream,
                    pages,
                    resend,
                    last,
                } => {
                    let Ok(mut e) = pool.recv() else {
                        return Ok(());
                    };
                    e.kind = FrameKind::Pages;
                    e.table.clear();
                    e.payload.clear();
                    e.parts.clear();
                    e.entries = pages.len() as u64;
                    let (mut zero, mut lz4, mut lz4_bytes, mut raw) = (0, 0, 0, 0);
                    let (mut resent, mut resent_bytes) = (0, 0);
                    for (k, &page) in pages.iter().enumerate() {
                        if let Some(next) = pages.get(k + 1).and_then(|&n| mem.page(PageIndex(n))) {
                            prefetch(&next);
                        }
                        let slice = mem
                            .page(PageIndex(page))
                            .ok_or_else(|| format!("page {page} out of range"))?;
                        let (codec, len, crc);
                        if xor && resend && (!last || cache.contains(page)) {
                            // A page sent before: from a private copy, so that
                            // the cache holds exactly what the target holds.
                            slice.copy_to(&mut stage[..]);
                            let off = e.payload.len();
                            if is_zero(&stage) {
                                cache.forget(page);
                                (codec, len, crc) = (Codec::Zero, 0, 0);
                                zero += 1;
                            } else {
                                delta.clear();
                                match cache.encode(page, &stage, &mut delta, DELTA_BYTES_MAX) {
                                    DeltaOutcome::Delta { codec: c, len: n } => {
                                        // The CRC covers the page the delta
                                        // rebuilds, so the target also proves it
                                        // applied it to the right base.
                                        (codec, len, crc) = (c, n, crc32c::crc32c(&stage));
                                        e.payload.extend_from_slice(&delta[..n]);
                                    }
                                    DeltaOutcome::Miss | DeltaOutcome::Overflow => {
                                        if enc.should_try()
                                            && enc.compress(&stage, &mut lz) == Codec::Lz4
                                        {
                                            (codec, len, crc) =
                                                (Codec::Lz4, lz.len(), crc32c::crc32c(&lz));
                                            e.payload.extend_from_slice(&lz);
                                            lz4 += 1;
                                            lz4_bytes += lz.len() as u64;
                                        } else {
                                            (codec, len, crc) =
                                                (Codec::Raw, PAGE_SIZE, crc32c::crc32c(&stage));
                                            e.payload.extend_from_slice(&stage);
                                            raw += 1;
                                        }
                                    }
                                }
                                e.parts.push(Part::Payload { off, len });
                            }
                        } else if is_zero_guest(&slice) {
                            (codec, len, crc) = (Codec::Zero, 0, 0);
                            zero += 1;
                        } else {
                            let try_lz4 = enc.should_try();
                            if try_lz4 || remember || fingerprint {
                                // A first send from a private copy: to try lz4
                                // on it, or to keep it (or its fingerprints)
                                // for a later delta (the cache then holds
                                // exactly what was sent).
                                slice.copy_to(&mut stage[..]);
                                if remember {
                                    cache.remember(page, &stage);
                                } else if fingerprint {
                                    cache.fingerprint(page, &stage);
                                }
                                let off = e.payload.len();
                                if try_lz4 && enc.compress(&stage, &mut lz) == Codec::Lz4 {
                                    (codec, len, crc) = (Codec::Lz4, lz.len(), crc32c::crc32c(&lz));
                                    e.payload.extend_from_slice(&lz);
                                    lz4 += 1;
                                    lz4_bytes += lz.len() as u64;
                                } else {
                                    // Already staged: send the private copy,
                                    // whose CRC is exact.
                                    (codec, len, crc) =
                                        (Codec::Raw, PAGE_SIZE, crc32c::crc32c(&stage));
                                    e.payload.extend_from_slice(&stage);
                                    raw += 1;
                                }
                                e.parts.push(Part::Payload { off, len });
                            } else {
                                (codec, len, crc) = (Codec::Raw, PAGE_SIZE, crc32c_guest(&slice));
                                raw += 1;
                                match e.parts.last_mut() {
                                    Some(Part::Guest { first, count })
                                        if *first + *count == page
                                            && mem.pages_left_in_region(PageIndex(*first))
                                                > *count =>
                                    {
                                        *count += 1
                                    }
                                    _ => e.parts.push(Part::Guest {
                                        first: page,
                                        count: 1,
                                    }),
                                }
                            }
                        }
                        if self.sent_before.set(page) {
                            resent += 1;
                            resent_bytes += (len + PageEntry::BYTES) as u64;
                        }
                        PageEntry {
                            page,
                            codec,
                            len: len as u16,
                            crc,
                        }
                        .encode_into(&mut e.table);
                    }
                    metrics.pages_zero.fetch_add(zero, Ordering::Relaxed);
                    metrics.pages_compressed.fetch_add(lz4, Ordering::Relaxed);
                    metrics
                        .compressed_bytes
                        .fetch_add(lz4_bytes, Ordering::Relaxed);
                    metrics.pages_raw.fetch_add(raw, Ordering::Relaxed);
                    metrics.resent_pages.fetch_add(resent, Ordering::Relaxed);
                    metrics
                        .resent_bytes
                        .fetch_add(resent_bytes, Ordering::Relaxed);
                    if out_for(stream).send(Out::Frame(e)).is_err() {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }
}

impl EncodeStage<'_> {
    /// Encodes a batch of disk blocks into `e` as a `Blocks` frame. Every
    /// block is a private copy (the read), so each goes zero, XOR-delta
    /// (when `delta`: the block was sent before and XOR-delta is on), lz4
    /// or raw from the payload buffer.
    fn encode_blocks(
        &self,
        batch: &uring::Batch,
        delta: bool,
        last: bool,
        e: &mut Encoded,
        enc: &mut PageEncoder,
        cache: &mut DeltaCache,
    ) -> Result<(), String> {
        let d = &self.metrics.disk;
        e.kind = FrameKind::Blocks;
        e.table.clear();
        e.payload.clear();
        e.parts.clear();
        e.entries = batch.blocks.len() as u64;
        let (mut zero, mut lz4, mut raw, mut xor) = (0, 0, 0, 0);
        let (mut resent, mut resent_bytes) = (0, 0);
        let mut lz = Vec::with_capacity(PAGE_SIZE);
        let mut out = Vec::with_capacity(PAGE_SIZE);
        for (i, &block) in batch.blocks.iter().enumerate() {
            let data = batch.buf.block(i);
            let key = self.disk_base + block;
            let off = e.payload.len();
            let (codec, len, crc);
            if is_zero(data) {
                cache.forget(key);
                (codec, len, crc) = (Codec::Zero, 0, 0);
                zero += 1;
            } else {
                let mut coded = None;
                // In the final round a miss is not worth caching.
                if delta && (!last || cache.contains(key)) {
                    out.clear();
                    if let DeltaOutcome::Delta { codec: c, len: n } =
                        cache.encode(key, data, &mut out, DELTA_BYTES_MAX)
                    {
                        // The CRC covers the rebuilt block, as for pages.
                        coded = Some((c, n, crc32c::crc32c(data)));
                        e.payload.extend_from_slice(&out[..n]);
                        xor += 1;
                    }
                }
                (codec, len, crc) = match coded {
                    Some(c) => c,
                    None if enc.should_try() && enc.compress(data, &mut lz) == Codec::Lz4 => {
                        e.payload.extend_from_slice(&lz);
                        lz4 += 1;
                        (Codec::Lz4, lz.len(), crc32c::crc32c(&lz))
                    }
                    None => {
                        e.payload.extend_from_slice(data);
                        raw += 1;
                        (Codec::Raw, PAGE_SIZE, crc32c::crc32c(data))
                    }
                };
                e.parts.push(Part::Payload { off, len });
            }
            if self.sent_before.set(key) {
                resent += 1;
                resent_bytes += (len + PageEntry::BYTES) as u64;
            }
            PageEntry {
                page: block,
                codec,
                len: len as u16,
                crc,
            }
            .encode_into(&mut e.table);
        }
        d.blocks.fetch_add(e.entries, Ordering::Relaxed);
        d.zero.fetch_add(zero, Ordering::Relaxed);
        d.lz4.fetch_add(lz4, Ordering::Relaxed);
        d.raw.fetch_add(raw, Ordering::Relaxed);
        d.xor.fetch_add(xor, Ordering::Relaxed);
        d.resent.fetch_add(resent, Ordering::Relaxed);
        let m = self.metrics;
        m.resent_bytes.fetch_add(resent_bytes, Ordering::Relaxed);
        Ok(())
    }
}

/// A delta longer than this does not pay against lz4 or raw (whose table
/// entry costs the same): 7/8 of a page, as for lz4.
const DELTA_BYTES_MAX: usize = ferry_compress::LZ4_BYTES_MAX_DEFAULT;

/// Adds what `now` counted since `before` to the migration's XOR counters.
fn publish(now: &DeltaStats, before: &mut DeltaStats, metrics: &Metrics) {
    let x = &metrics.xor;
    let add = |c: &std::sync::atomic::AtomicU64, a: u64, b: u64| {
        c.fetch_add(a.saturating_sub(b), Ordering::Relaxed);
    };
    add(&x.pages, now.pages, before.pages);
    add(&x.bytes, now.bytes, before.bytes);
    add(&x.cache_hits, now.hits, before.hits);
    add(&x.cache_misses, now.misses, before.misses);
    add(&x.patches, now.patches, before.patches);
    add(&x.patch_bytes, now.patch_bytes, before.patch_bytes);
    add(&x.overflows, now.overflows, before.overflows);
    add(&x.evictions, now.evictions, before.evictions);
    *before = *now;
}

struct SendStage {
    stream: u16,
    conn: Box<dyn Conn>,
    mem: Arc<GuestMem>,
    metrics: Arc<Metrics>,
    throttle: Option<Arc<Throttle>>,
    seq: u64,
    pages: u64,
}

impl SendStage {
    fn run(
        &mut self,
        rx: &Receiver<Out>,
        pool: Sender<Box<Encoded>>,
        rounds: Sender<RoundSent>,
    ) -> Result<(), String> {
        for out in rx {
            match out {
                Out::Frame(e) => {
                    self.send_pages(&e)?;
                    let _ = pool.send(e);
                }
                Out::RoundEnd(round) => {
                    self.seq += 1;
                    crate::wire::send_frame(
                        &mut *self.conn,
                        FrameKind::RoundEnd,
                        self.stream,
                        self.seq,
                        &round.to_le_bytes(),
                    )
                    .map_err(|e| e.to_string())?;
                    self.metrics.wire_bytes.fetch_add(28, Ordering::Relaxed);
                    let sent = RoundSent {
                        stream: self.stream,
                        round,
                        seq: self.seq,
                        pages: self.pages,
                    };
                    if rounds.send(sent).is_err() {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    fn send_pages(&mut self, e: &Encoded) -> Result<(), String> {
        self.seq += 1;
        let len = e.table.len() as u32;
        let crc = frame_crc(e.kind, self.stream, len, self.seq, &e.table);
        let header = FrameHeader {
            kind: e.kind,
            stream: self.stream,
            len,
            seq: self.seq,
            crc,
        }
        .encode();
        let mut segs = Vec::with_capacity(2 + e.parts.len());
        segs.push(Seg::Bytes(&header));
        segs.push(Seg::Bytes(&e.table));
        for part in &e.parts {
            segs.push(match *part {
                Part::Payload { off, len } => Seg::Bytes(&e.payload[off..off + len]),
                Part::Guest { first, count } => Seg::Guest(
                    self.mem
                        .pages_slice(PageIndex(first), count)
                        .expect("range checked by the encoder"),
                ),
            });
        }
        let bytes: usize = segs.iter().map(Seg::len).sum();
        if let Some(t) = &self.throttle {
            t.take(bytes);
        }
        self.conn.send(&segs).map_err(|e| e.to_string())?;
        self.pages += e.entries;
        self.metrics
            .wire_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        if e.kind == FrameKind::Blocks {
            self.metrics
                .disk
                .wire_bytes
                .fetch_add(bytes as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_is_by_chunk_and_covers_all_streams() {
        assert_eq!(owner_stream(0, 4), 1);
        assert_eq!(owner_stream(CHUNK_PAGES - 1, 4), 1);
        assert_eq!(owner_stream(CHUNK_PAGES, 4), 2);
        assert_eq!(owner_stream(4 * CHUNK_PAGES, 4), 1);
        assert_eq!(owner_stream(12345, 1), 1);
    }

    #[test]
    fn throttle_paces() {
        let t = Throttle::new(100);
        let start = Instant::now();
        for _ in 0..20 {
            t.take(1 << 20);
        }
        // 20 MiB at 100 MiB/s is 200 ms, minus the 10 ms burst allowance.
        assert!(
            start.elapsed() >= Duration::from_millis(180),
            "{:?}",
            start.elapsed()
        );
    }
}
