//! The byte pipes under an in-process connection: a bounded ring buffer per
//! direction, with end-of-stream, cut and bit-flip state.

use std::io::{self, ErrorKind};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;

use super::{lock, ConnIndex, Fault};

/// One connection: two pipes and the fault state.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) index: ConnIndex,
    /// Indexed by [`Dir::pipe`].
    pub(super) pipes: [Pipe; 2],
}

impl Link {
    pub(super) fn new<'f>(
        index: ConnIndex,
        pipe_bytes: usize,
        faults: impl Iterator<Item = &'f Fault>,
    ) -> Self {
        let mut pipes = [Pipe::new(pipe_bytes), Pipe::new(pipe_bytes)];
        for f in faults {
            let st = pipes[f.dir().pipe()]
                .state
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner);
            match *f {
                Fault::CutAfter { bytes, .. } => {
                    st.cut_after = Some(st.cut_after.map_or(bytes, |b| b.min(bytes)));
                }
                Fault::FlipBit { offset, bit, .. } => st.flips.push((offset, 1u8 << bit)),
                Fault::Drop { offset, len, .. } => {
                    st.drops.push((offset, offset.saturating_add(len)));
                }
                Fault::Duplicate { offset, .. } => st.dups.push(offset),
                Fault::Reorder { offset, .. } => st.reorders.push(offset),
                Fault::Stall { offset, for_ms, .. } => {
                    st.stalls.push((offset, Duration::from_millis(for_ms)));
                }
            }
        }
        Self { index, pipes }
    }

    /// Breaks both directions and wakes everyone waiting on them.
    pub(super) fn cut(&self) {
        for pipe in &self.pipes {
            let mut st = lock(&pipe.state);
            st.cut = true;
            pipe.changed.notify_all();
        }
    }
}

/// One direction: a bounded ring buffer.
#[derive(Debug)]
pub(super) struct Pipe {
    pub(super) state: Mutex<PipeState>,
    /// Signalled on every change: data in, data out, close, cut.
    changed: Condvar,
}

#[derive(Debug)]
pub(super) struct PipeState {
    ring: Box<[u8]>,
    head: usize,
    len: usize,
    /// Bytes ever accepted into the pipe: the stream offset of the next byte.
    pub(super) carried: u64,
    /// The sending end shut down: the reader drains, then sees EOF.
    writer_closed: bool,
    /// The receiving end shut down: queued bytes are dropped, sends fail.
    reader_closed: bool,
    /// The link broke: the reader drains, then sees a reset; sends fail.
    cut: bool,
    cut_after: Option<u64>,
    /// (stream offset, xor mask).
    flips: Vec<(u64, u8)>,
    /// Stream ranges [start, end) never delivered.
    drops: Vec<(u64, u64)>,
    /// The send carrying one of these offsets is delivered twice.
    dups: Vec<u64>,
    /// The send carrying one of these offsets is delivered after the next.
    reorders: Vec<u64>,
    /// A send held back by a reorder, delivered after the next send.
    held: Option<Vec<u8>>,
    /// (stream offset, how long): once the offset is sent, the reader gets
    /// nothing more for that long.
    stalls: Vec<(u64, Duration)>,
    /// The reader gets nothing before this.
    stalled_until: Option<Instant>,
}

/// Where a send's bytes come from.
#[derive(Clone, Copy)]
pub(super) enum Src<'s, 'a> {
    Bytes(&'s [u8]),
    Guest(&'s VolatileSlice<'a>),
}

impl Src<'_, '_> {
    fn len(&self) -> usize {
        match self {
            Src::Bytes(b) => b.len(),
            Src::Guest(v) => v.len(),
        }
    }

    /// Copies `dst.len()` bytes starting at `from` into `dst` (volatile reads for guest memory).
    fn copy_to(&self, from: usize, dst: &mut [u8]) -> io::Result<()> {
        match self {
            Src::Bytes(b) => dst.copy_from_slice(&b[from..from + dst.len()]),
            Src::Guest(v) => {
                let n = v
                    .subslice(from, dst.len())
                    .map_err(io::Error::other)?
                    .copy_to(dst);
                debug_assert_eq!(n, dst.len());
            }
        }
        Ok(())
    }
}

/// Where a receive's bytes go.
pub(super) enum Dst<'s, 'a> {
    Bytes(&'s mut [u8]),
    Guest(&'s VolatileSlice<'a>),
}

impl Dst<'_, '_> {
    pub(super) fn len(&self) -> usize {
        match self {
            Dst::Bytes(b) => b.len(),
            Dst::Guest(v) => v.len(),
        }
    }

    /// Copies `src` to offset `at` (volatile writes for guest memory).
    fn copy_from(&mut self, at: usize, src: &[u8]) -> io::Result<()> {
        match self {
            Dst::Bytes(b) => b[at..at + src.len()].copy_from_slice(src),
            Dst::Guest(v) => v
                .subslice(at, src.len())
                .map_err(io::Error::other)?
                .copy_from(src),
        }
        Ok(())
    }
}

/// How a receive ended short of its length.
pub(super) enum RecvEnd {
    /// EOF after this many bytes.
    Eof(usize),
    Err(io::Error),
}

/// Waits on `cv` until `deadline` (`None` = forever). Err(TimedOut) once it has passed.
fn wait_until<'m>(
    cv: &Condvar,
    guard: MutexGuard<'m, PipeState>,
    deadline: Option<Instant>,
) -> io::Result<MutexGuard<'m, PipeState>> {
    match deadline {
        None => Ok(cv.wait(guard).unwrap_or_else(PoisonError::into_inner)),
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::from(ErrorKind::TimedOut));
            }
            Ok(cv
                .wait_timeout(guard, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0)
        }
    }
}

fn reset_err(index: ConnIndex) -> io::Error {
    io::Error::new(
        ErrorKind::ConnectionReset,
        format!("inproc connection #{} was cut", index.0),
    )
}

impl Pipe {
    fn new(bytes: usize) -> Self {
        Self {
            state: Mutex::new(PipeState {
                ring: vec![0u8; bytes].into_boxed_slice(),
                head: 0,
                len: 0,
                carried: 0,
                writer_closed: false,
                reader_closed: false,
                cut: false,
                cut_after: None,
                flips: Vec::new(),
                drops: Vec::new(),
                dups: Vec::new(),
                reorders: Vec::new(),
                held: None,
                stalls: Vec::new(),
                stalled_until: None,
            }),
            changed: Condvar::new(),
        }
    }

    /// Writes all of `src`, blocking while the pipe is full. The deadline is
    /// per wait: it restarts whenever bytes move, as `SO_SNDTIMEO` does.
    /// The plan's drops, duplicates, reorders and stalls apply here.
    pub(super) fn write(
        &self,
        link: &Link,
        src: Src<'_, '_>,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        let st = lock(&self.state);
        let (start, total) = (st.carried, src.len() as u64);
        let hit = |o: &u64| (start..start + total).contains(o);
        let dup = st.dups.iter().any(hit);
        let reorder = st.reorders.iter().any(hit);
        // A planned cut fired here; the other direction is cut once `st` is released.
        let mut fired = false;
        let (st, result) = if reorder && !st.cut {
            // Held back whole, as a segment that arrives late; the stream
            // offset moves on as if it went.
            let mut st = st;
            let mut bytes = vec![0u8; src.len()];
            src.copy_to(0, &mut bytes)?;
            let earlier = st.held.replace(bytes);
            st.carried += total;
            match earlier {
                Some(b) => self.put(link, st, Src::Bytes(&b), timeout, false, &mut fired),
                None => (st, Ok(())),
            }
        } else {
            let copy = dup.then(|| {
                let mut bytes = vec![0u8; src.len()];
                src.copy_to(0, &mut bytes).map(|()| bytes)
            });
            let (mut st, mut r) = self.put(link, st, src, timeout, true, &mut fired);
            if let (Ok(()), Some(copy)) = (&r, copy) {
                let copy = copy?;
                (st, r) = self.put(link, st, Src::Bytes(&copy), timeout, false, &mut fired);
            }
            // A send held back by a reorder goes after this one.
            if r.is_ok() {
                if let Some(held) = st.held.take() {
                    (st, r) = self.put(link, st, Src::Bytes(&held), timeout, false, &mut fired);
                }
            }
            (st, r)
        };
        drop(st);
        if fired {
            link.cut();
        }
        result
    }

    /// Puts `src` into the ring. `counted`: these are the stream's next
    /// bytes (offsets advance, and the plan's cuts, flips, drops and stalls
    /// apply); otherwise a duplicate or late copy of bytes already counted.
    fn put<'m>(
        &'m self,
        link: &Link,
        mut st: MutexGuard<'m, PipeState>,
        src: Src<'_, '_>,
        timeout: Option<Duration>,
        counted: bool,
        fired: &mut bool,
    ) -> (MutexGuard<'m, PipeState>, io::Result<()>) {
        let total = src.len();
        let mut done = 0;
        let mut deadline = timeout.map(|t| Instant::now() + t);
        let result = loop {
            if done == total {
                break Ok(());
            }
            if st.cut {
                break Err(reset_err(link.index));
            }
            if st.writer_closed || st.reader_closed {
                break Err(io::Error::new(ErrorKind::BrokenPipe, "inproc peer closed"));
            }
            if counted && st.cut_after.is_some_and(|limit| st.carried >= limit) {
                st.cut = true;
                *fired = true;
                self.changed.notify_all();
                continue;
            }
            // Dropped bytes: the stream offset moves, nothing is queued.
            if counted {
                let at = st.carried;
                if let Some(&(_, end)) = st.drops.iter().find(|(a, b)| (*a..*b).contains(&at)) {
                    let skip = usize::try_from(end - at)
                        .unwrap_or(usize::MAX)
                        .min(total - done);
                    st.carried += skip as u64;
                    done += skip;
                    continue;
                }
            }
            let cap = st.ring.len();
            let space = cap - st.len;
            if space == 0 {
                st = match wait_until(&self.changed, st, deadline) {
                    Ok(st) => st,
                    Err(e) => return (lock(&self.state), Err(e)),
                };
                continue;
            }
            let mut n = space.min(total - done);
            if counted {
                let at = st.carried;
                if let Some(limit) = st.cut_after {
                    // limit > carried here, checked above.
                    n = n.min(usize::try_from(limit - at).unwrap_or(usize::MAX));
                }
                // Stop short of the next dropped range.
                if let Some(next) = st.drops.iter().map(|(a, _)| *a).filter(|&a| a > at).min() {
                    n = n.min(usize::try_from(next - at).unwrap_or(usize::MAX));
                }
            }
            let tail = (st.head + st.len) % cap;
            let first = n.min(cap - tail);
            if let Err(e) = src
                .copy_to(done, &mut st.ring[tail..tail + first])
                .and_then(|()| src.copy_to(done + first, &mut st.ring[..n - first]))
            {
                break Err(e);
            }
            if counted {
                let start = st.carried;
                let end = start + n as u64;
                let PipeState { ring, flips, .. } = &mut *st;
                for &(offset, mask) in flips.iter() {
                    if (start..end).contains(&offset) {
                        // In range, so the difference is below n: it fits a usize.
                        let at = (tail + (offset - start) as usize) % cap;
                        ring[at] ^= mask;
                    }
                }
                if let Some(&(_, d)) = st.stalls.iter().find(|(o, _)| (start..end).contains(o)) {
                    st.stalled_until = Some(Instant::now() + d);
                }
                st.carried = end;
            }
            st.len += n;
            done += n;
            deadline = timeout.map(|t| Instant::now() + t);
            // Cut as soon as the planned byte count is reached, so a reader
            // waiting for more sees the reset rather than a silent stall.
            if counted && st.cut_after.is_some_and(|limit| st.carried >= limit) {
                st.cut = true;
                *fired = true;
            }
            self.changed.notify_all();
        };
        (st, result)
    }

    /// Fills `dst`, blocking while the pipe is empty; deadline per wait.
    pub(super) fn read(
        &self,
        link: &Link,
        dst: &mut Dst<'_, '_>,
        timeout: Option<Duration>,
    ) -> std::result::Result<(), RecvEnd> {
        let want = dst.len();
        let mut done = 0;
        let mut deadline = timeout.map(|t| Instant::now() + t);
        let mut st = lock(&self.state);
        while done < want {
            if st.reader_closed {
                return Err(RecvEnd::Eof(done));
            }
            // A stall: nothing arrives before its end (a slow or silent
            // link), but a cut still shows.
            if let Some(until) = st.stalled_until.filter(|&u| u > Instant::now() && !st.cut) {
                let d = match deadline {
                    Some(d) if d < until => Some(d),
                    _ => Some(until),
                };
                st = wait_until(&self.changed, st, d).map_err(RecvEnd::Err)?;
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(RecvEnd::Err(io::Error::from(ErrorKind::TimedOut)));
                }
                continue;
            }
            if st.len > 0 {
                let cap = st.ring.len();
                let n = st.len.min(want - done);
                let head = st.head;
                let first = n.min(cap - head);
                dst.copy_from(done, &st.ring[head..head + first])
                    .map_err(RecvEnd::Err)?;
                dst.copy_from(done + first, &st.ring[..n - first])
                    .map_err(RecvEnd::Err)?;
                st.head = (head + n) % cap;
                st.len -= n;
                done += n;
                deadline = timeout.map(|t| Instant::now() + t);
                self.changed.notify_all();
                continue;
            }
            if st.cut {
                return Err(RecvEnd::Err(reset_err(link.index)));
            }
            if st.writer_closed {
                return Err(RecvEnd::Eof(done));
            }
            st = wait_until(&self.changed, st, deadline).map_err(RecvEnd::Err)?;
        }
        Ok(())
    }

    pub(super) fn close_writer(&self) {
        let mut st = lock(&self.state);
        st.writer_closed = true;
        self.changed.notify_all();
    }

    pub(super) fn close_reader(&self) {
        let mut st = lock(&self.state);
        st.reader_closed = true;
        st.len = 0;
        self.changed.notify_all();
    }
}
