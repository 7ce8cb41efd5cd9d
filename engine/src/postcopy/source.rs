//! The source side of post-copy: the demand server on the priority stream,
//! and the order of the background push (from the latest fault on).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use ferry_compress::Codec;
use ferry_transport::{Conn, Seg};

use crate::bitmap::{AtomicBitmap, DirtyBitmap};
use crate::source::pipeline::Failure;
use crate::wire::{self, FrameHeader, FrameKind, PageEntry, WireError, HEADER_BYTES};
use crate::{GuestMem, PageIndex};

/// No fault seen yet.
const NO_HINT: u64 = u64::MAX;

/// State the demand server shares with the background push.
pub(crate) struct Demand {
    /// Pages served on demand (the push skips them).
    pub(crate) served: AtomicBitmap,
    /// The page of the latest request.
    hint: AtomicU64,
    /// Pages served.
    pub(crate) pages: AtomicU64,
    stop: AtomicBool,
    pub(crate) failure: Failure,
}

/// The demand server thread.
pub(crate) struct DemandServer {
    demand: Arc<Demand>,
    thread: Option<JoinHandle<()>>,
    conn: Box<dyn Conn>,
}

impl Demand {
    pub(crate) fn new(pages: u64) -> Self {
        Demand {
            served: AtomicBitmap::new(pages),
            hint: AtomicU64::new(NO_HINT),
            pages: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            failure: Failure::default(),
        }
    }

    /// Notes the latest requested page: the push moves there.
    pub(crate) fn hint(&self, page: u64) {
        self.hint.store(page, Ordering::Release);
    }
}

impl DemandServer {
    /// Serves requests on `conn` (stream `stream`) from `mem`, which the
    /// paused guest no longer changes.
    pub(crate) fn start(
        mem: Arc<GuestMem>,
        conn: Box<dyn Conn>,
        stream: u16,
        wire_bytes: Arc<AtomicU64>,
    ) -> Result<Self, ferry_transport::TransportError> {
        let demand = Arc::new(Demand::new(mem.pages()));
        let keep = conn.try_clone()?;
        let d = demand.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-pc-serve".into())
            .spawn(move || {
                super::raise_priority();
                if let Err(e) = serve(&d, &mem, conn, stream, &wire_bytes) {
                    if !d.stop.load(Ordering::Acquire) {
                        d.failure.fail(format!("priority stream: {e}"));
                    }
                }
            })
            .expect("spawning a thread");
        Ok(DemandServer {
            demand,
            thread: Some(thread),
            conn: keep,
        })
    }

    /// A handle on the priority stream, to break it from another thread.
    pub(crate) fn handle(&self) -> Option<Box<dyn Conn>> {
        self.conn.try_clone().ok()
    }

    pub(crate) fn demand(&self) -> &Arc<Demand> {
        &self.demand
    }

    /// Stops serving (the stream is shut down).
    pub(crate) fn stop(mut self) {
        self.demand.stop.store(true, Ordering::Release);
        self.conn.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    d: &Demand,
    mem: &GuestMem,
    mut conn: Box<dyn Conn>,
    stream: u16,
    wire_bytes: &AtomicU64,
) -> Result<(), WireError> {
    let (mut rseq, mut sseq) = (0u64, 0u64);
    let pages = mem.pages();
    let mut table = Vec::with_capacity(wire::PAGES_PER_FRAME_MAX * PageEntry::BYTES);
    loop {
        let payload = match wire::recv_next(
            &mut *conn,
            FrameKind::Request,
            0,
            &mut rseq,
            "priority stream from the target",
        ) {
            Ok(p) => p,
            // The target closes the stream once it holds every page; a
            // target that died is noticed on the control stream.
            Err(WireError::Transport(e)) if e.is_disconnect() => return Ok(()),
            Err(e) => return Err(e),
        };
        if payload.is_empty() || !payload.len().is_multiple_of(8) {
            return Err(WireError::Malformed {
                what: "page request",
                detail: format!("{} bytes", payload.len()),
            });
        }
        let mut want: Vec<u64> = payload
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        if let Some(&bad) = want.iter().find(|&&p| p >= pages) {
            return Err(WireError::Malformed {
                what: "page request",
                detail: format!("page {bad} past the end of guest memory ({pages} pages)"),
            });
        }
        want.sort_unstable();
        want.dedup();
        d.hint(want[0]);
        // One frame: the table, then each raw page straight from memory.
        table.clear();
        let mut segs_pages = Vec::with_capacity(want.len());
        for &p in &want {
            let slice = mem.page(PageIndex(p)).expect("checked above");
            let zero = ferry_compress::is_zero_guest(&slice);
            let entry = PageEntry {
                page: p,
                codec: if zero { Codec::Zero } else { Codec::Raw },
                len: if zero { 0 } else { crate::PAGE_SIZE as u16 },
                crc: if zero {
                    0
                } else {
                    crate::wire::crc::crc32c_guest(&slice)
                },
            };
            entry.encode_into(&mut table);
            if !zero {
                segs_pages.push(slice);
            }
            d.served.set(p);
        }
        sseq += 1;
        let len = table.len() as u32;
        let header = FrameHeader {
            kind: FrameKind::Pages,
            stream,
            len,
            seq: sseq,
            crc: wire::frame_crc(FrameKind::Pages, stream, len, sseq, &table),
        }
        .encode();
        let mut segs = vec![Seg::Bytes(&header), Seg::Bytes(&table)];
        segs.extend(segs_pages.iter().map(|s| Seg::Guest(*s)));
        conn.send(&segs)?;
        let bytes = (HEADER_BYTES + table.len() + segs_pages.len() * crate::PAGE_SIZE) as u64;
        wire_bytes.fetch_add(bytes, Ordering::Relaxed);
        d.pages.fetch_add(want.len() as u64, Ordering::Relaxed);
    }
}

/// Pages per step of the background push: one 2 MiB ownership chunk.
pub(crate) const PUSH_STEP: u64 = 512;

/// The order of the background push: step by step through `todo`, jumping
/// to the latest fault whenever there is a new one (the guest tends to touch
/// memory near what it touched last), wrapping around at the end.
pub(crate) struct PushOrder {
    todo: DirtyBitmap,
    cursor: u64,
    last_hint: u64,
    left: u64,
    last_step: Option<u64>,
}

impl PushOrder {
    pub(crate) fn new(mut todo: DirtyBitmap) -> Self {
        let left = todo.count();
        PushOrder {
            todo,
            cursor: 0,
            last_hint: NO_HINT,
            left,
            last_step: None,
        }
    }

    /// The next step's runs of pages to push (those not served on demand
    /// meanwhile), or `None` when everything was pushed. The flag says the
    /// step lies below the previous one (a jump back to a fault, or the
    /// wrap-around): pages gathered for frames must be flushed first, since
    /// a frame's pages ascend.
    pub(crate) fn next(&mut self, demand: &Demand) -> Option<(bool, Vec<(u64, u64)>)> {
        let pages = self.todo.pages();
        if self.left == 0 || pages == 0 {
            return None;
        }
        let hint = demand.hint.load(Ordering::Acquire);
        if hint != self.last_hint && hint != NO_HINT && hint < pages {
            self.last_hint = hint;
            self.cursor = hint / PUSH_STEP * PUSH_STEP;
        }
        loop {
            let step = self.cursor;
            let n = PUSH_STEP.min(pages - step);
            self.cursor = if step + n >= pages { 0 } else { step + n };
            let runs: Vec<(u64, u64)> = self.todo.runs_set_within(step, n).collect();
            if runs.is_empty() {
                continue;
            }
            let mut out = Vec::new();
            for (first, count) in runs {
                self.left -= count;
                let mut start = None;
                for p in first..first + count {
                    match (demand.served.get(p), start) {
                        (false, None) => start = Some(p),
                        (true, Some(s)) => {
                            out.push((s, p - s));
                            start = None;
                        }
                        _ => {}
                    }
                }
                if let Some(s) = start {
                    out.push((s, first + count - s));
                }
            }
            self.todo.clear_range(step, n);
            let back = self.last_step.is_some_and(|l| step < l);
            self.last_step = Some(step);
            return Some((back, out));
        }
    }
}
