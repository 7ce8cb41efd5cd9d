//! The target side of post-copy: the fault thread, the priority receiver,
//! the mapper, and the page hand-over every receiver goes through.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_compress::Codec;
use ferry_transport::Conn;
use userfaultfd::{Event, Uffd};

use super::{Latencies, PageStates, PostcopyStats};
use crate::source::pipeline::Failure;
use crate::vm::Userfault;
use crate::wire::{self, FrameKind, PageEntry, WireError};
use crate::{GuestMem, PageIndex, PAGE_SIZE};

/// Where the guest's view of memory is: region i covers pages
/// `first..first + pages` at `host` in the VMM's address space.
struct HostRegion {
    first: u64,
    pages: u64,
    host: u64,
}

/// The target's post-copy state, shared by every receiver.
pub(crate) struct TargetPostcopy {
    uffd: Uffd,
    regions: Vec<HostRegion>,
    pub(crate) states: PageStates,
    mem: Arc<GuestMem>,
    /// Pages the guest waits for, and since when.
    waiting: Mutex<HashMap<u64, Instant>>,
    latencies: Mutex<Latencies>,
    faults: AtomicU64,
    faults_present: AtomicU64,
    demand_pages: AtomicU64,
    background_pages: AtomicU64,
    duplicates: AtomicU64,
    requested: AtomicU64,
    stale: u64,
    /// The priority stream's sending half (requests) and its seq; `None`
    /// while the connection to the source is down.
    requests: Mutex<Option<(Box<dyn Conn>, u64)>>,
    stop: AtomicBool,
    /// Failures that end post-copy here (the VMM is gone).
    pub(crate) failure: Failure,
    /// The connection to the source broke (a new one may resume).
    link_error: Mutex<Option<String>>,
    /// Set when the guest started running here.
    running_since: Mutex<Option<Instant>>,
}

impl TargetPostcopy {
    /// Takes over the VMM's userfaultfd. `stale` (u64 words) marks the pages
    /// whose copy here is not current; everything else is present.
    pub(crate) fn new(
        uf: Userfault,
        mem: Arc<GuestMem>,
        stale: &[u64],
        priority: Box<dyn Conn>,
    ) -> Result<Self, String> {
        let specs = mem.region_specs();
        if uf.host_addrs.len() != specs.len() {
            return Err(format!(
                "the VMM mapped {} regions, the spec has {}",
                uf.host_addrs.len(),
                specs.len()
            ));
        }
        let mut first = 0;
        let mut regions = Vec::new();
        for (r, &host) in specs.iter().zip(&uf.host_addrs) {
            if host % PAGE_SIZE as u64 != 0 {
                return Err(format!("region at {host:#x} is not page aligned"));
            }
            let pages = r.size / PAGE_SIZE as u64;
            regions.push(HostRegion { first, pages, host });
            first += pages;
        }
        // SAFETY: `into_raw_fd` hands us sole ownership of a descriptor
        // the VMM sent as its userfaultfd; `Uffd` closes it on drop.
        let uffd = unsafe { Uffd::from_raw_fd(uf.fd.into_raw_fd()) };
        // Non-blocking reads: the fault thread polls with a timeout.
        set_nonblocking(uffd.as_raw_fd()).map_err(|e| format!("userfaultfd: {e}"))?;
        let states = PageStates::new(mem.pages(), stale);
        let stale_pages = mem.pages() - states.present_count();
        Ok(TargetPostcopy {
            uffd,
            regions,
            states,
            mem,
            waiting: Mutex::default(),
            latencies: Mutex::default(),
            faults: AtomicU64::new(0),
            faults_present: AtomicU64::new(0),
            demand_pages: AtomicU64::new(0),
            background_pages: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            requested: AtomicU64::new(0),
            stale: stale_pages,
            requests: Mutex::new(Some((priority, 0))),
            stop: AtomicBool::new(false),
            failure: Failure::default(),
            link_error: Mutex::new(None),
            running_since: Mutex::new(None),
        })
    }

    fn host_of(&self, page: u64) -> u64 {
        let r = self
            .regions
            .iter()
            .find(|r| page >= r.first && page < r.first + r.pages)
            .expect("page inside guest memory");
        r.host + (page - r.first) * PAGE_SIZE as u64
    }

    fn page_of(&self, addr: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let end = r.host + r.pages * PAGE_SIZE as u64;
            (addr >= r.host && addr < end).then(|| r.first + (addr - r.host) / PAGE_SIZE as u64)
        })
    }

    /// Maps `first..first + n` (claimed pages, now written) for the guest.
    fn map(&self, first: u64, n: u64) {
        let mut p = first;
        let end = first + n;
        while p < end {
            // A run never crosses a region: the host address jumps there.
            let region_end = self
                .regions
                .iter()
                .find(|r| p >= r.first && p < r.first + r.pages)
                .map_or(end, |r| r.first + r.pages)
                .min(end);
            let len = (region_end - p) * PAGE_SIZE as u64;
            let start = self.host_of(p);
            match self
                .uffd
                .r#continue(start as *mut libc::c_void, len as usize, true)
            {
                Ok(mapped) if mapped >= len => p = region_end,
                // Partly mapped (EAGAIN after progress): go on from there.
                Ok(mapped) if mapped > 0 => p += mapped / PAGE_SIZE as u64,
                Ok(_) | Err(_) if region_end - p > 1 => {
                    // Some page of the run is mapped already (the guest's
                    // first touch of a present page raced us): page by page.
                    for q in p..region_end {
                        self.map_one(q);
                    }
                    p = region_end;
                }
                Ok(_) | Err(_) => {
                    self.map_one(p);
                    p += 1;
                }
            }
        }
    }

    /// Maps one page; a page mapped already is fine, but its waiter (if any)
    /// is woken explicitly.
    fn map_one(&self, page: u64) {
        let start = self.host_of(page) as *mut libc::c_void;
        for _ in 0..100 {
            match self.uffd.r#continue(start, PAGE_SIZE, true) {
                Ok(_) => return,
                Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EEXIST => {
                    let _ = self.uffd.wake(start, PAGE_SIZE);
                    return;
                }
                Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EAGAIN => {
                    std::thread::yield_now();
                }
                Err(e) => {
                    self.failure.fail(format!(
                        "mapping page {page} for the guest (UFFDIO_CONTINUE) failed: {e:?}; \
                         the target VMM may be gone"
                    ));
                    return;
                }
            }
        }
        self.failure
            .fail(format!("mapping page {page}: UFFDIO_CONTINUE kept failing"));
    }

    /// A receiver wrote pages `first..first + n` (all claimed by it): hand
    /// them to the guest.
    pub(crate) fn complete(&self, first: u64, n: u64, demand: bool) {
        for p in first..first + n {
            self.states.set_present(p);
        }
        self.map(first, n);
        let ctr = if demand {
            &self.demand_pages
        } else {
            &self.background_pages
        };
        ctr.fetch_add(n, Ordering::Relaxed);
        for p in first..first + n {
            if self.states.take_faulted(p) {
                self.fault_resolved(p);
            }
        }
    }

    fn fault_resolved(&self, page: u64) {
        let since = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&page);
        if let Some(t) = since {
            self.latencies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .add(t.elapsed().as_micros() as u64);
        }
    }

    /// A run of written pages to hand over with one `complete`.
    pub(crate) fn batch(&self) -> Handover<'_> {
        Handover {
            pc: self,
            first: 0,
            n: 0,
        }
    }

    /// A copy of a page that another copy beat: counted and dropped.
    pub(crate) fn duplicate(&self) {
        self.duplicates.fetch_add(1, Ordering::Relaxed);
    }

    /// A claimed page whose copy failed its check: it goes back to missing,
    /// and a waiting guest's request is sent again.
    pub(crate) fn reject(&self, page: u64, why: &str) {
        tracing::warn!("post-copy: page {page} rejected ({why}); requesting it again");
        self.states.release(page);
        if self.waiting_for(page) && self.states.mark_requested(page) {
            self.request(&[page]);
        }
    }

    fn waiting_for(&self, page: u64) -> bool {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&page)
    }

    /// Sends requests for `pages` (ascending) on the priority stream. While
    /// the connection is down they are forgotten (not failed): the pages
    /// are requested again once a new connection is up.
    fn request(&self, pages: &[u64]) {
        if pages.is_empty() {
            return;
        }
        let mut c = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let mut sent = 0;
        if let Some((conn, seq)) = c.as_mut() {
            for chunk in pages.chunks(wire::PAGES_PER_FRAME_MAX) {
                let payload: Vec<u8> = chunk.iter().flat_map(|p| p.to_le_bytes()).collect();
                *seq += 1;
                if let Err(e) = wire::send_frame(&mut **conn, FrameKind::Request, 0, *seq, &payload)
                {
                    self.link_broke(format!("sending page requests: {e}"));
                    *c = None;
                    break;
                }
                sent += chunk.len();
                self.requested
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
        for &p in &pages[sent..] {
            self.states.unmark_requested(p);
        }
    }

    fn link_broke(&self, why: String) {
        let mut l = self.link_error.lock().unwrap_or_else(|p| p.into_inner());
        if l.is_none() {
            tracing::warn!("post-copy: the connection to the source broke: {why}");
            *l = Some(why);
        }
    }

    /// Why the connection to the source broke, if it did.
    pub(crate) fn link_error(&self) -> Option<String> {
        self.link_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The connection is down: requests wait for the next one; pages cut
    /// off on the way are forgotten. Call with every receiver stopped.
    pub(crate) fn disconnected(&self) {
        *self.requests.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.states.forget_unfinished();
    }

    /// A new connection is up: requests go on `priority`, and every page a
    /// guest waits for is requested again.
    pub(crate) fn reconnected(&self, priority: Box<dyn Conn>) {
        *self.requests.lock().unwrap_or_else(|p| p.into_inner()) = Some((priority, 0));
        *self.link_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let mut waiting: Vec<u64> = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .filter(|&p| !self.states.is_present(p) && self.states.mark_requested(p))
            .collect();
        waiting.sort_unstable();
        self.request(&waiting);
    }

    /// Requests every page nothing is on its way for (after the source
    /// pushed everything: pages rejected on the way, for example).
    pub(crate) fn request_unclaimed(&self) -> u64 {
        let mut want = Vec::new();
        for (first, n) in self.states.unclaimed() {
            for p in first..first + n {
                if self.states.mark_requested(p) {
                    want.push(p);
                }
            }
        }
        self.request(&want);
        want.len() as u64
    }

    /// One guest fault at `addr`.
    fn fault(&self, addr: u64, batch: &mut Vec<u64>) {
        let Some(page) = self.page_of(addr) else {
            tracing::warn!("post-copy: fault at {addr:#x} outside guest memory");
            return;
        };
        if self.states.is_present(page) {
            // Here already, just not mapped yet for the guest.
            self.faults_present.fetch_add(1, Ordering::Relaxed);
            self.map_one(page);
            return;
        }
        self.faults.fetch_add(1, Ordering::Relaxed);
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(page)
            .or_insert_with(Instant::now);
        self.states.set_faulted(page);
        // The page may have arrived between the check and the mark: then
        // its receiver may not have seen the mark.
        if self.states.is_present(page) {
            if self.states.take_faulted(page) {
                self.map_one(page);
                self.fault_resolved(page);
            }
            return;
        }
        if self.states.mark_requested(page) {
            batch.push(page);
        }
    }

    /// The fault thread: reads the guest's faults and requests their pages.
    fn fault_loop(&self) {
        let mut batch = Vec::with_capacity(wire::PAGES_PER_FRAME_MAX);
        let mut buf = userfaultfd::EventBuffer::new(64);
        while !self.stop.load(Ordering::Acquire) && !self.failure.is_set() {
            let mut pfd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, 50) };
            if rc <= 0 {
                continue;
            }
            let events = match self.uffd.read_events(&mut buf) {
                Ok(ev) => ev,
                Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EAGAIN => continue,
                Err(e) => {
                    self.failure
                        .fail(format!("reading guest faults (userfaultfd) failed: {e:?}"));
                    return;
                }
            };
            batch.clear();
            for ev in events {
                match ev {
                    Ok(Event::Pagefault { addr, .. }) => self.fault(addr as u64, &mut batch),
                    Ok(other) => tracing::debug!("post-copy: userfaultfd event {other:?}"),
                    Err(e) => tracing::warn!("post-copy: bad userfaultfd event: {e}"),
                }
            }
            batch.sort_unstable();
            self.request(&batch);
        }
    }

    /// The priority receiver: demand pages from the source.
    fn priority_loop(
        &self,
        mut conn: Box<dyn Conn>,
        stream: u16,
        stop: &AtomicBool,
    ) -> Result<(), WireError> {
        let mut seq = 0u64;
        let mut entries: Vec<PageEntry> = Vec::new();
        let mut scratch = vec![0u8; PAGE_SIZE];
        let pages = self.mem.pages();
        loop {
            let table = match wire::recv_next(
                &mut *conn,
                FrameKind::Pages,
                stream,
                &mut seq,
                "priority stream from the source",
            ) {
                Ok(t) => t,
                Err(_) if stop.load(Ordering::Acquire) || self.stop.load(Ordering::Acquire) => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            };
            entries.clear();
            if table.is_empty() || !table.len().is_multiple_of(PageEntry::BYTES) {
                return Err(WireError::Malformed {
                    what: "priority page table",
                    detail: format!("{} bytes", table.len()),
                });
            }
            for raw in table.chunks_exact(PageEntry::BYTES) {
                let e = PageEntry::decode(raw)?;
                if e.page >= pages || !matches!(e.codec, Codec::Raw | Codec::Zero) {
                    return Err(WireError::Malformed {
                        what: "priority page entry",
                        detail: format!("page {} codec {:?}", e.page, e.codec),
                    });
                }
                entries.push(e);
            }
            for e in &entries {
                let mine = self.states.claim(e.page);
                let slice = self.mem.page(PageIndex(e.page)).expect("checked above");
                match (e.codec, mine) {
                    (Codec::Raw, true) => {
                        conn.recv_exact_volatile(&slice)?;
                        if crate::wire::crc::crc32c_guest(&slice) != e.crc {
                            self.reject(e.page, "CRC mismatch on the priority stream");
                            continue;
                        }
                    }
                    (Codec::Raw, false) => {
                        conn.recv_exact(&mut scratch)?;
                        self.duplicate();
                        continue;
                    }
                    (_, true) => slice.copy_from(&[0u8; PAGE_SIZE][..]),
                    (_, false) => {
                        self.duplicate();
                        continue;
                    }
                }
                self.complete(e.page, 1, true);
            }
        }
    }

    /// Maps every page that is here already, so the guest's first touch of
    /// it costs no fault (runs in the background; a touch before it gets
    /// there is answered by the fault thread).
    fn map_present(&self) {
        for (first, n) in self.states.present_runs() {
            if self.stop.load(Ordering::Acquire) || self.failure.is_set() {
                return;
            }
            let mut p = first;
            while p < first + n {
                let k = (first + n - p).min(512);
                self.map(p, k);
                p += k;
            }
        }
    }

    /// Notes that the guest runs now (post-copy's clock starts).
    pub(crate) fn running(&self) {
        *self.running_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// The numbers so far.
    pub(crate) fn stats(&self) -> PostcopyStats {
        let mut s = PostcopyStats {
            stale_pages: self.stale,
            faults: self.faults.load(Ordering::Relaxed),
            faults_present: self.faults_present.load(Ordering::Relaxed),
            demand_pages: self.demand_pages.load(Ordering::Relaxed),
            background_pages: self.background_pages.load(Ordering::Relaxed),
            duplicate_pages: self.duplicates.load(Ordering::Relaxed),
            requested_pages: self.requested.load(Ordering::Relaxed),
            duration_ms: self
                .running_since
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .map_or(0, |t| t.elapsed().as_millis() as u64),
            ..Default::default()
        };
        self.latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fill(&mut s);
        s
    }
}

/// Written pages gathered into runs, so that consecutive pages are mapped
/// with one `UFFDIO_CONTINUE` (background pages only).
pub(crate) struct Handover<'a> {
    pc: &'a TargetPostcopy,
    first: u64,
    n: u64,
}

impl Handover<'_> {
    /// Adds a written page; a page that does not extend the run flushes it.
    pub(crate) fn add(&mut self, page: u64) {
        if self.n > 0 && page == self.first + self.n && self.n < 512 {
            self.n += 1;
            return;
        }
        self.flush();
        self.first = page;
        self.n = 1;
    }

    /// Hands the run over now.
    pub(crate) fn flush(&mut self) {
        if self.n > 0 {
            self.pc.complete(self.first, self.n, false);
            self.n = 0;
        }
    }
}

impl Drop for Handover<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

fn set_nonblocking(fd: i32) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The threads of the target's post-copy: fault reader, priority receiver,
/// and the mapper of present pages. The priority receiver is restarted on
/// each new connection; the others live as long as post-copy.
pub(crate) struct Threads {
    pc: Arc<TargetPostcopy>,
    threads: Vec<JoinHandle<()>>,
    priority: Option<PriorityThread>,
}

/// The priority receiver: its thread, a handle on its stream (to shut it
/// down), and its stop flag.
type PriorityThread = (JoinHandle<()>, Box<dyn Conn>, Arc<AtomicBool>);

impl Threads {
    /// Starts them. `priority` is the priority stream (index `stream`).
    pub(crate) fn start(
        pc: Arc<TargetPostcopy>,
        priority: Box<dyn Conn>,
        stream: u16,
    ) -> Result<Self, ferry_transport::TransportError> {
        let mut threads = Vec::new();
        let p = pc.clone();
        threads.push(
            std::thread::Builder::new()
                .name("ferry-pc-faults".into())
                .spawn(move || {
                    super::raise_priority();
                    p.fault_loop()
                })
                .expect("spawning a thread"),
        );
        let p = pc.clone();
        threads.push(
            std::thread::Builder::new()
                .name("ferry-pc-map".into())
                .spawn(move || p.map_present())
                .expect("spawning a thread"),
        );
        let mut t = Threads {
            pc,
            threads,
            priority: None,
        };
        t.start_priority(priority, stream)?;
        Ok(t)
    }

    /// Starts the priority receiver on `conn`.
    pub(crate) fn start_priority(
        &mut self,
        conn: Box<dyn Conn>,
        stream: u16,
    ) -> Result<(), ferry_transport::TransportError> {
        let keep = conn.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (p, st) = (self.pc.clone(), stop.clone());
        let t = std::thread::Builder::new()
            .name("ferry-pc-demand".into())
            .spawn(move || {
                super::raise_priority();
                if let Err(e) = p.priority_loop(conn, stream, &st) {
                    if !st.load(Ordering::Acquire) {
                        p.link_broke(format!("priority stream: {e}"));
                    }
                }
            })
            .expect("spawning a thread");
        self.priority = Some((t, keep, stop));
        Ok(())
    }

    /// Stops the priority receiver (its stream is shut down).
    pub(crate) fn stop_priority(&mut self) {
        if let Some((t, conn, stop)) = self.priority.take() {
            stop.store(true, Ordering::Release);
            conn.shutdown();
            let _ = t.join();
        }
    }

    /// The shared state.
    pub(crate) fn postcopy(&self) -> &Arc<TargetPostcopy> {
        &self.pc
    }

    /// Stops them all.
    pub(crate) fn stop(mut self) {
        self.pc.stop.store(true, Ordering::Release);
        self.stop_priority();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// How long the target waits, after the source said everything was pushed,
/// before it requests whatever is still missing.
pub(crate) const SWEEP_AFTER: Duration = Duration::from_millis(200);
