//! Reverse incremental checkpointing: during post-copy the target sends
//! back, every `checkpoint_interval`, the pages its guest wrote since the
//! last acknowledged checkpoint and the vCPU state of the same instant; the
//! source applies them to its copy of guest memory once the whole
//! checkpoint is there. If the target is lost, the source takes the VM back
//! from the last applied checkpoint (PostCopyFT's recovery).
//!
//! ```text
//!  target (guest running)                                 source (guest paused)
//!  every interval, if the last checkpoint was acknowledged:
//!    pause vCPUs; dirty log (guest writes since the last sync);
//!    copy those pages + the carry (pages of unacknowledged checkpoints);
//!    resume vCPUs                                          staging
//!  ── CheckpointPages × n, State(blob), Checkpoint{id} ─▶ all there, CRCs
//!                                                         match: apply to guest
//!  ◀───────────────────────────── CheckpointAck{id} ────── memory, keep the state
//! ```
//!
//! **Never two live copies: a lease.** The target may run the guest only
//! while it holds a lease: `grace / 2` from the moment it took its last
//! acknowledged checkpoint (or sent PREPARED, before the first). A watchdog
//! thread kills the target VMM when the lease runs out. The source takes
//! the VM back only after `grace` without a word from the target. Whatever
//! the target took before the last frame the source heard from it was
//! taken before that frame was heard, so the target's guest is dead before
//! the source's runs (clock rates, not clocks, must agree; `grace / 2` of
//! margin covers the kill). A target that knows its guest is gone (its VMM
//! died, or it was killed after an error) says `Fenced`, and the source
//! takes the VM back at once.
//!
//! **The end.** When every page is on the target it says `PostcopyDone`;
//! the source lets go for good and answers `Released`. The target needs
//! no lease after that; until it has it, it goes on checkpointing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::source::journal::{CheckpointRecord, Journal};
use crate::vm::{Fencer, VmState};
use crate::wire::{self, FrameKind, WireError};
use crate::{GuestMem, PageIndex, PAGE_SIZE};

/// Pages per `CheckpointPages` frame.
pub(crate) const PAGES_PER_FRAME: usize = wire::PAGES_PER_FRAME_MAX;

/// Encodes one `CheckpointPages` payload: indices, then the pages.
pub(crate) fn encode_pages(pages: &[u64], data: &[u8]) -> Vec<u8> {
    debug_assert_eq!(data.len(), pages.len() * PAGE_SIZE);
    let mut out = Vec::with_capacity(pages.len() * (8 + PAGE_SIZE));
    for p in pages {
        out.extend_from_slice(&p.to_le_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// Splits a `CheckpointPages` payload into page indices and bytes,
/// checking every index against the guest's `pages`.
pub(crate) fn decode_pages(payload: &[u8], pages: u64) -> Result<(Vec<u64>, &[u8]), WireError> {
    let malformed = |detail: String| WireError::Malformed {
        what: "checkpoint pages",
        detail,
    };
    let per = 8 + PAGE_SIZE;
    if payload.is_empty() || !payload.len().is_multiple_of(per) {
        return Err(malformed(format!("{} bytes", payload.len())));
    }
    let n = payload.len() / per;
    let (idx, data) = payload.split_at(n * 8);
    let list: Vec<u64> = idx
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    if let Some(bad) = list.iter().find(|&&p| p >= pages) {
        return Err(malformed(format!("page {bad} of {pages}")));
    }
    Ok((list, data))
}

/// A checkpoint the source has applied.
#[derive(Clone, Debug)]
pub(crate) struct Applied {
    pub(crate) id: u64,
    pub(crate) state: VmState,
    pub(crate) pages: u64,
}

/// The source's side: what has been applied, and when the target was last
/// heard from.
pub(crate) struct SourceCheckpoints {
    mem: Arc<GuestMem>,
    metrics: Arc<crate::Metrics>,
    base: Instant,
    /// Milliseconds after `base` of the last frame from the target.
    heard_ms: AtomicU64,
    applied: Mutex<Option<Applied>>,
    /// Set at the post-copy COMMIT: before it the source's guest may run,
    /// and nothing from the target may touch its memory.
    armed: AtomicBool,
    /// Set by a take-back (or the end): nothing is applied after it.
    closed: AtomicBool,
    count: AtomicU64,
    pages: AtomicU64,
    /// Records each checkpoint (with the migration's session id) for a
    /// restarted daemon ([`crate::source::journal`]).
    journal: Option<(Arc<dyn Journal>, String)>,
    /// Memory holds part of a checkpoint: its pages were being written when
    /// a daemon died (a restarted one learns it from the journal). A later
    /// checkpoint mends it; a take-back from it is impossible.
    torn: AtomicBool,
}

/// A checkpoint being received (the control reader's).
#[derive(Default)]
pub(crate) struct Staging {
    pages: Vec<u64>,
    data: Vec<u8>,
    state: Option<Vec<u8>>,
}

impl Staging {
    /// Adds one `CheckpointPages` frame.
    pub(crate) fn add_pages(&mut self, payload: &[u8], pages: u64) -> Result<(), WireError> {
        let (list, data) = decode_pages(payload, pages)?;
        self.pages.extend_from_slice(&list);
        self.data.extend_from_slice(data);
        Ok(())
    }

    /// The checkpoint's state blob.
    pub(crate) fn set_state(&mut self, blob: Vec<u8>) -> Result<(), WireError> {
        if self.state.is_some() {
            return Err(WireError::Violation(
                "two state blobs in one checkpoint".into(),
            ));
        }
        self.state = Some(blob);
        Ok(())
    }
}

impl SourceCheckpoints {
    pub(crate) fn new(
        mem: Arc<GuestMem>,
        metrics: Arc<crate::Metrics>,
        journal: Option<(Arc<dyn Journal>, String)>,
    ) -> Self {
        SourceCheckpoints {
            mem,
            metrics,
            base: Instant::now(),
            heard_ms: AtomicU64::new(0),
            applied: Mutex::new(None),
            armed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            count: AtomicU64::new(0),
            pages: AtomicU64::new(0),
            journal,
            torn: AtomicBool::new(false),
        }
    }

    /// Writes checkpoint pages into guest memory (`data`: 4 KiB per page).
    fn write_pages(&self, pages: &[u64], data: &[u8]) {
        for (i, &p) in pages.iter().enumerate() {
            let src = &data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            self.mem
                .page(PageIndex(p))
                .expect("checked when staged")
                .copy_from(src);
        }
    }

    /// A restarted daemon's: armed (the hand-off was recorded), with the
    /// checkpoint its predecessor recorded last. One it was still writing
    /// into memory is written again from the pages the journal kept, or
    /// else memory is torn (see the field).
    pub(crate) fn restored(
        mem: Arc<GuestMem>,
        metrics: Arc<crate::Metrics>,
        journal: Option<(Arc<dyn Journal>, String)>,
        last: Option<&CheckpointRecord>,
    ) -> Self {
        let c = Self::new(mem, metrics, journal);
        c.armed.store(true, Ordering::Release);
        let Some(r) = last else { return c };
        let redo = match (&c.journal, r.applied) {
            (Some((j, session)), false) => match j.load_checkpoint_pages(session, r.id) {
                Ok(Some((pages, data)))
                    if data.len() == pages.len() * PAGE_SIZE
                        && pages.iter().all(|&p| p < c.mem.pages()) =>
                {
                    Some((pages, data))
                }
                Ok(Some(_)) => {
                    tracing::error!(id = r.id, "the recorded checkpoint pages do not fit");
                    None
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::error!(id = r.id, "cannot read the recorded checkpoint pages: {e}");
                    None
                }
            },
            _ => None,
        };
        let whole = match (r.applied, redo) {
            (true, _) => true,
            (false, Some((pages, data))) => {
                tracing::warn!(
                    id = r.id,
                    pages = pages.len(),
                    "writing again the checkpoint the last daemon was writing when it died"
                );
                c.write_pages(&pages, &data);
                let done = CheckpointRecord {
                    applied: true,
                    ..r.clone()
                };
                if let Some((j, session)) = &c.journal {
                    if let Err(e) = j.checkpoint(session, &done) {
                        tracing::warn!("cannot record checkpoint {} as applied: {e}", r.id);
                    }
                }
                true
            }
            (false, None) => false,
        };
        if whole {
            *c.applied.lock().unwrap_or_else(|p| p.into_inner()) = Some(Applied {
                id: r.id,
                state: VmState {
                    blob: r.state.clone(),
                    progress: r.progress,
                },
                pages: 0,
            });
        } else {
            c.torn.store(true, Ordering::Release);
        }
        c
    }

    /// Whether memory holds part of a checkpoint (see the field).
    pub(crate) fn torn(&self) -> bool {
        self.torn.load(Ordering::Acquire)
    }

    /// Something came from the target now.
    pub(crate) fn heard(&self) {
        self.heard_ms
            .fetch_max(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// When the target was last heard from.
    pub(crate) fn last_heard(&self) -> Instant {
        self.base + Duration::from_millis(self.heard_ms.load(Ordering::Relaxed))
    }

    /// Checkpoint `id` is complete: checks it against its announcement and
    /// applies it to guest memory. Returns false when closed (nothing
    /// applied).
    pub(crate) fn commit(
        &self,
        staging: Staging,
        id: u64,
        pages: u64,
        state_len: u64,
        state_crc: u32,
        progress: u64,
    ) -> Result<bool, WireError> {
        let bad = |m: String| WireError::Violation(format!("checkpoint {id}: {m}"));
        let blob = staging.state.ok_or_else(|| bad("no state blob".into()))?;
        if staging.pages.len() as u64 != pages {
            return Err(bad(format!(
                "{} pages arrived, {pages} announced",
                staging.pages.len()
            )));
        }
        if blob.len() as u64 != state_len || crc32c::crc32c(&blob) != state_crc {
            return Err(bad("the state blob does not match its length/CRC".into()));
        }
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if !self.armed.load(Ordering::Acquire) {
            return Err(bad("before the post-copy switch".into()));
        }
        if self.closed.load(Ordering::Acquire) {
            return Ok(false);
        }
        if applied.as_ref().is_some_and(|a| a.id >= id) {
            return Err(bad("its id is not past the last applied one".into()));
        }
        let journal = |r: &CheckpointRecord| match &self.journal {
            Some((j, session)) => j
                .checkpoint(session, r)
                .map_err(|e| bad(format!("cannot record it: {e}"))),
            None => Ok(()),
        };
        if let Some((j, session)) = &self.journal {
            j.checkpoint_pages(session, id, &staging.pages, &staging.data)
                .map_err(|e| bad(format!("cannot record its pages: {e}")))?;
        }
        journal(&CheckpointRecord {
            id,
            applied: false,
            progress,
            state: blob.clone(),
        })?;
        self.torn.store(true, Ordering::Release);
        self.write_pages(&staging.pages, &staging.data);
        self.torn.store(false, Ordering::Release);
        let recorded = journal(&CheckpointRecord {
            id,
            applied: true,
            progress,
            state: blob.clone(),
        });
        *applied = Some(Applied {
            id,
            state: VmState { blob, progress },
            pages,
        });
        // Not acknowledged: the target carries its pages into the next.
        recorded?;
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let total = self.pages.fetch_add(pages, Ordering::Relaxed) + pages;
        self.metrics.update(|s| {
            if let Some(p) = s.postcopy.as_mut() {
                p.checkpoints = n;
                p.checkpoint_pages = total;
            }
        });
        Ok(true)
    }

    /// The post-copy COMMIT is about to go out (the source's guest is
    /// paused for good): checkpoints may be applied from now on.
    pub(crate) fn arm(&self) {
        self.armed.store(true, Ordering::Release);
    }

    /// No checkpoint is applied from now on; returns the last one.
    pub(crate) fn close(&self) -> Option<Applied> {
        let applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        self.closed.store(true, Ordering::Release);
        applied.clone()
    }
}

/// Source side, with take-back: breaks the current connection once the
/// grace has passed since the target was last heard from, so that no send
/// or receive waits on a dead link past the moment the VM may be taken back.
pub(crate) struct GraceWatch {
    handles: Arc<Mutex<Vec<Box<dyn ferry_transport::Conn>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GraceWatch {
    pub(crate) fn start(heard: Arc<SourceCheckpoints>, grace: Duration) -> Self {
        let handles: Arc<Mutex<Vec<Box<dyn ferry_transport::Conn>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (h, st) = (handles.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("ferry-pc-grace".into())
            .spawn(move || {
                while !st.load(Ordering::Acquire) {
                    if heard.last_heard().elapsed() > grace {
                        let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
                        if !h.is_empty() {
                            tracing::warn!(
                                "post-copy: nothing from the target for {grace:?}; \
                                 breaking the connection"
                            );
                        }
                        for c in h.drain(..) {
                            c.shutdown();
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
            .expect("spawning a thread");
        GraceWatch {
            handles,
            stop,
            thread: Some(thread),
        }
    }

    /// Watches a new connection's streams (the old ones are forgotten).
    pub(crate) fn arm(&self, handles: Vec<Box<dyn ferry_transport::Conn>>) {
        *self.handles.lock().unwrap_or_else(|p| p.into_inner()) = handles;
    }
}

impl Drop for GraceWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The target's lease on running the guest (see the module docs).
pub(crate) struct Lease {
    base: Instant,
    fence_after: Duration,
    /// Milliseconds after `base` when the lease runs out.
    until_ms: AtomicU64,
    /// The source let go: no lease any more.
    released: AtomicBool,
    /// The guest was stopped for good.
    fenced: Mutex<Option<String>>,
    stop: AtomicBool,
}

impl Lease {
    /// A lease from `from` (just before PREPARED went out).
    pub(crate) fn new(from: Instant, fence_after: Duration) -> Arc<Self> {
        let l = Lease {
            base: from,
            fence_after,
            until_ms: AtomicU64::new(0),
            released: AtomicBool::new(false),
            fenced: Mutex::new(None),
            stop: AtomicBool::new(false),
        };
        l.renew(from);
        Arc::new(l)
    }

    /// A checkpoint taken at `taken` was acknowledged.
    pub(crate) fn renew(&self, taken: Instant) {
        let until = (taken.saturating_duration_since(self.base) + self.fence_after).as_millis();
        self.until_ms.fetch_max(until as u64, Ordering::AcqRel);
    }

    /// The source let go of the VM: the lease ends without a fence.
    pub(crate) fn release(&self) {
        self.released.store(true, Ordering::Release);
    }

    pub(crate) fn released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Why the guest was stopped, if it was.
    pub(crate) fn fenced(&self) -> Option<String> {
        self.fenced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How long until the lease runs out (zero when it has).
    pub(crate) fn left(&self) -> Duration {
        let until = Duration::from_millis(self.until_ms.load(Ordering::Acquire));
        until.saturating_sub(self.base.elapsed())
    }

    /// Stops the guest now (once): runs `fencer`, records why.
    fn fence(&self, fencer: Fencer, why: String) -> String {
        let mut f = self.fenced.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = f.as_ref() {
            return w.clone();
        }
        let why = match fencer() {
            Ok(()) => why,
            Err(e) => format!("{why}; {e}"),
        };
        tracing::error!("post-copy: the guest here is stopped for good: {why}");
        *f = Some(why.clone());
        why
    }
}

/// The watchdog that enforces a [`Lease`], and the fencer it uses (which
/// the migration may also use directly).
pub(crate) struct Watchdog {
    lease: Arc<Lease>,
    fencer: Arc<Mutex<Option<Fencer>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Starts it; `on_fence` runs after a fence by the watchdog.
    pub(crate) fn start(
        lease: Arc<Lease>,
        fencer: Fencer,
        on_fence: impl Fn(String) + Send + 'static,
    ) -> Self {
        let fencer = Arc::new(Mutex::new(Some(fencer)));
        let (l, f) = (lease.clone(), fencer.clone());
        let thread = std::thread::Builder::new()
            .name("ferry-pc-lease".into())
            .spawn(move || {
                while !l.stop.load(Ordering::Acquire) && !l.released() {
                    if l.left().is_zero() {
                        let why = format!(
                            "no checkpoint acknowledged by the source for {:?}",
                            l.fence_after
                        );
                        if let Some(fencer) = f.lock().unwrap_or_else(|p| p.into_inner()).take() {
                            on_fence(l.fence(fencer, why));
                        }
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .expect("spawning a thread");
        Watchdog {
            lease,
            fencer,
            thread: Some(thread),
        }
    }

    /// Stops the guest now (the migration failed here). Returns why it is
    /// stopped (the first reason wins).
    pub(crate) fn fence_now(&self, why: String) -> String {
        match self.fencer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(fencer) => self.lease.fence(fencer, why),
            None => self.lease.fenced().unwrap_or(why),
        }
    }

    pub(crate) fn lease(&self) -> &Arc<Lease> {
        &self.lease
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.lease.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The target's checkpointing: what is in flight and what it carries.
pub(crate) struct Checkpointer {
    pub(crate) interval: Duration,
    next_id: u64,
    /// Pages of checkpoints sent but not acknowledged: every later
    /// checkpoint carries them until one is.
    carry: Vec<u64>,
    /// The checkpoint in flight: id and when it was taken.
    in_flight: Option<(u64, Instant)>,
    last: Instant,
    pub(crate) stats: CheckpointStats,
    /// Where the pages of a checkpoint are copied to ([`copy_pages`]):
    /// as large as the largest checkpoint so far.
    pub(crate) buf: Vec<u8>,
}

/// Checkpoint numbers of one post-copy (target side).
#[derive(Clone, Debug, Default)]
pub(crate) struct CheckpointStats {
    pub(crate) taken: u64,
    pub(crate) acked: u64,
    pub(crate) pages: u64,
    pub(crate) pause_max_us: u64,
    pub(crate) pause_total_us: u64,
}

impl Checkpointer {
    pub(crate) fn new(interval: Duration, pages: u64) -> Self {
        Checkpointer {
            interval,
            next_id: 1,
            carry: vec![0; pages.div_ceil(64) as usize],
            in_flight: None,
            last: Instant::now(),
            stats: CheckpointStats::default(),
            buf: Vec::new(),
        }
    }

    /// Whether the next checkpoint is due now.
    pub(crate) fn due(&self) -> bool {
        self.in_flight.is_none() && self.last.elapsed() >= self.interval
    }

    /// The pages of the next checkpoint: the guest's writes in `dirty`,
    /// with the carry. Only `present` pages can have been written by the
    /// guest; any other bit is dropped (and counted).
    pub(crate) fn gather(
        &mut self,
        dirty: &mut [u64],
        present: impl Fn(u64) -> bool,
        pages: u64,
    ) -> (Vec<u64>, u64) {
        let mut out = Vec::new();
        let mut dropped = 0;
        for (w, (d, c)) in dirty.iter_mut().zip(&self.carry).enumerate() {
            let mut bits = *d | *c;
            *d = 0;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let p = w as u64 * 64 + b;
                if p >= pages {
                    continue;
                }
                if present(p) {
                    out.push(p);
                } else {
                    dropped += 1;
                }
            }
        }
        (out, dropped)
    }

    /// A checkpoint of `pages` was sent; returns its id.
    pub(crate) fn sent(&mut self, pages: &[u64], taken: Instant, pause: Duration) -> u64 {
        self.carry.iter_mut().for_each(|w| *w = 0);
        for &p in pages {
            self.carry[(p / 64) as usize] |= 1 << (p % 64);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.in_flight = Some((id, taken));
        self.last = taken;
        let us = pause.as_micros() as u64;
        self.stats.taken += 1;
        self.stats.pages += pages.len() as u64;
        self.stats.pause_max_us = self.stats.pause_max_us.max(us);
        self.stats.pause_total_us += us;
        id
    }

    /// The source acknowledged `id`: returns when it was taken, if it is
    /// the one in flight.
    pub(crate) fn acked(&mut self, id: u64) -> Option<Instant> {
        match self.in_flight {
            Some((i, taken)) if i == id => {
                self.in_flight = None;
                self.carry.iter_mut().for_each(|w| *w = 0);
                self.stats.acked += 1;
                Some(taken)
            }
            _ => None,
        }
    }

    /// The connection broke: the checkpoint in flight is lost; its pages
    /// stay in the carry.
    pub(crate) fn disconnected(&mut self) {
        self.in_flight = None;
    }
}

/// Sends one frame of the control stream.
pub(crate) type SendFrame<'a> = dyn FnMut(FrameKind, &[u8]) -> Result<(), WireError> + 'a;

/// Sends one checkpoint on the control stream through `send`.
pub(crate) fn send(
    send: &mut SendFrame<'_>,
    id: u64,
    pages: &[u64],
    data: &[u8],
    state: &VmState,
) -> Result<(), WireError> {
    for (i, chunk) in pages.chunks(PAGES_PER_FRAME).enumerate() {
        let at = i * PAGES_PER_FRAME * PAGE_SIZE;
        send(
            FrameKind::CheckpointPages,
            &encode_pages(chunk, &data[at..at + chunk.len() * PAGE_SIZE]),
        )?;
    }
    send(FrameKind::State, &state.blob)?;
    send(
        FrameKind::Control,
        &wire::encode_control(&wire::ControlMsg::Checkpoint {
            id,
            pages: pages.len() as u64,
            state_len: state.blob.len() as u64,
            state_crc: crc32c::crc32c(&state.blob),
            progress: state.progress,
        }),
    )
}

/// Copies `pages` out of guest memory (the guest is paused) into `buf`,
/// which is kept from one checkpoint to the next; returns the copy. A fresh
/// buffer would cost, while the guest waits, a zero fill and a page fault
/// per 4 KiB of it (about 2 us each on the 2-core test machine: 60 ms for
/// a checkpoint of 30,000 pages).
pub(crate) fn copy_pages<'b>(mem: &GuestMem, pages: &[u64], buf: &'b mut Vec<u8>) -> &'b [u8] {
    use vm_memory::Bytes;
    let need = pages.len() * PAGE_SIZE;
    if buf.len() < need {
        buf.resize(need, 0);
    }
    let data = &mut buf[..need];
    for (i, &p) in pages.iter().enumerate() {
        mem.page(PageIndex(p))
            .expect("page in range")
            .read_slice(&mut data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE], 0)
            .expect("reading guest memory");
    }
    &buf[..need]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_payload_round_trips_and_checks_indices() {
        let data: Vec<u8> = (0..2 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        let p = encode_pages(&[3, 9], &data);
        let (list, bytes) = decode_pages(&p, 10).unwrap();
        assert_eq!(list, [3, 9]);
        assert_eq!(bytes, &data[..]);
        assert!(decode_pages(&p, 9).is_err(), "page 9 of 9");
        assert!(decode_pages(&p[..p.len() - 1], 10).is_err(), "torn");
        assert!(decode_pages(&[], 10).is_err(), "empty");
    }

    #[test]
    fn carry_stays_until_acknowledged() {
        let mut c = Checkpointer::new(Duration::ZERO, 130);
        let mut dirty = vec![0b101u64, 0, 0b11];
        let (pages, dropped) = c.gather(&mut dirty, |p| p != 2, 130);
        assert_eq!((pages.clone(), dropped), (vec![0, 128, 129], 1));
        assert_eq!(dirty, [0, 0, 0], "gather takes the dirty bits");
        let id = c.sent(&pages, Instant::now(), Duration::from_micros(5));
        assert!(!c.due(), "one checkpoint in flight at a time");
        c.disconnected();
        // Lost: its pages come again with the next one.
        let mut dirty = vec![1u64 << 7, 0, 0];
        let (pages, _) = c.gather(&mut dirty, |_| true, 130);
        assert_eq!(pages, [0, 7, 128, 129]);
        let id2 = c.sent(&pages, Instant::now(), Duration::ZERO);
        assert!(id2 > id);
        assert!(c.acked(id).is_none(), "a stale ack changes nothing");
        assert!(c.acked(id2).is_some());
        let mut dirty = vec![0u64; 3];
        assert!(c.gather(&mut dirty, |_| true, 130).0.is_empty());
        assert_eq!(c.stats.taken, 2);
        assert_eq!(c.stats.acked, 1);
    }

    #[test]
    fn the_lease_fences_once_when_it_runs_out() {
        let lease = Lease::new(Instant::now(), Duration::from_millis(60));
        let fenced = Arc::new(AtomicU64::new(0));
        let f = fenced.clone();
        let dog = Watchdog::start(
            lease.clone(),
            Box::new(move || {
                f.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }),
            |_| {},
        );
        // Renewed in time: still held.
        std::thread::sleep(Duration::from_millis(30));
        lease.renew(Instant::now());
        std::thread::sleep(Duration::from_millis(40));
        assert!(lease.fenced().is_none());
        std::thread::sleep(Duration::from_millis(100));
        assert!(lease.fenced().is_some());
        assert_eq!(dog.fence_now("again".into()), lease.fenced().unwrap());
        assert_eq!(fenced.load(Ordering::SeqCst), 1, "fenced once");
    }

    fn mem(pages: u64) -> Arc<GuestMem> {
        let spec = crate::link::VmSpec {
            name: "t".into(),
            regions: vec![crate::link::RegionSpec {
                gpa: 0,
                size: pages * PAGE_SIZE as u64,
                memfd_offset: 0,
            }],
            vcpus: 1,
            vmm_config: serde_json::Value::Null,
            disk: None,
        };
        Arc::new(GuestMem::create(&spec).unwrap())
    }

    fn staged(pages: &[u64], fill: u8, blob: &[u8]) -> Staging {
        let mut st = Staging::default();
        let data = vec![fill; pages.len() * PAGE_SIZE];
        st.add_pages(&encode_pages(pages, &data), 16).unwrap();
        st.set_state(blob.to_vec()).unwrap();
        st
    }

    #[test]
    fn the_source_applies_whole_checkpoints_only_after_the_switch_and_before_the_end() {
        use vm_memory::Bytes;
        let m = mem(16);
        let metrics = Arc::new(crate::Metrics::new("m", "vm", "source", "peer"));
        let c = SourceCheckpoints::new(m.clone(), metrics, None);
        let blob = b"state".to_vec();
        let crc = crc32c::crc32c(&blob);
        let page = |p: u64| {
            let mut b = [0u8; 1];
            m.page(PageIndex(p)).unwrap().read_slice(&mut b, 0).unwrap();
            b[0]
        };
        // Before COMMIT the source's guest may still run: refused.
        assert!(c.commit(staged(&[1], 7, &blob), 1, 1, 5, crc, 10).is_err());
        assert_eq!(page(1), 0);
        c.arm();
        // Announced counts and the blob's CRC must match what came.
        assert!(c.commit(staged(&[1], 7, &blob), 1, 2, 5, crc, 10).is_err());
        assert!(c
            .commit(staged(&[1], 7, &blob), 1, 1, 5, crc ^ 1, 10)
            .is_err());
        assert_eq!(
            page(1),
            0,
            "a checkpoint that fails its checks changes nothing"
        );
        assert!(c
            .commit(staged(&[1, 3], 7, &blob), 2, 2, 5, crc, 10)
            .unwrap());
        assert_eq!((page(1), page(3)), (7, 7));
        assert!(
            c.commit(staged(&[1], 9, &blob), 2, 1, 5, crc, 11).is_err(),
            "ids only go up"
        );
        let last = c.close().expect("applied");
        assert_eq!((last.id, last.state.progress, last.pages), (2, 10, 2));
        assert!(!c.commit(staged(&[1], 9, &blob), 3, 1, 5, crc, 12).unwrap());
        assert_eq!(page(1), 7, "nothing is applied after a take-back began");
    }

    #[test]
    fn a_released_lease_never_fences() {
        let lease = Lease::new(Instant::now(), Duration::from_millis(20));
        lease.release();
        let _dog = Watchdog::start(lease.clone(), Box::new(|| Ok(())), |_| {});
        std::thread::sleep(Duration::from_millis(80));
        assert!(lease.fenced().is_none());
    }
}
