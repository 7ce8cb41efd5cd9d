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
            match *f {
                Fault::CutAfter { dir, bytes, .. } => {
                    let st = pipes[dir.pipe()]
                        .state
                        .get_mut()
                        .unwrap_or_else(PoisonError::into_inner);
                    st.cut_after = Some(st.cut_after.map_or(bytes, |b| b.min(bytes)));
                }
                Fault::FlipBit {
                    dir, offset, bit, ..
                } => {
                    let st = pipes[dir.pipe()]
                        .state
                        .get_mut()
                        .unwrap_or_else(PoisonError::into_inner);
                    st.flips.push((offset, 1u8 << bit));
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
            }),
            changed: Condvar::new(),
        }
    }

    /// Writes all of `src`, blocking while the pipe is full. The deadline is
    /// per wait: it restarts whenever bytes move, as `SO_SNDTIMEO` does.
    pub(super) fn write(
        &self,
        link: &Link,
        src: Src<'_, '_>,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        let total = src.len();
        let mut done = 0;
        let mut deadline = timeout.map(|t| Instant::now() + t);
        let mut st = lock(&self.state);
        // A planned cut fired here; the other direction is cut once `st` is released.
        let mut fired = false;
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
            if st.cut_after.is_some_and(|limit| st.carried >= limit) {
                st.cut = true;
                fired = true;
                self.changed.notify_all();
                continue;
            }
            let cap = st.ring.len();
            let space = cap - st.len;
            if space == 0 {
                st = wait_until(&self.changed, st, deadline)?;
                continue;
            }
            let mut n = space.min(total - done);
            if let Some(limit) = st.cut_after {
                // limit > carried here, checked above.
                n = n.min(usize::try_from(limit - st.carried).unwrap_or(usize::MAX));
            }
            let tail = (st.head + st.len) % cap;
            let first = n.min(cap - tail);
            src.copy_to(done, &mut st.ring[tail..tail + first])?;
            src.copy_to(done + first, &mut st.ring[..n - first])?;
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
            st.len += n;
            st.carried = end;
            done += n;
            deadline = timeout.map(|t| Instant::now() + t);
            // Cut as soon as the planned byte count is reached, so a reader
            // waiting for more sees the reset rather than a silent stall.
            if st.cut_after.is_some_and(|limit| st.carried >= limit) {
                st.cut = true;
                fired = true;
            }
            self.changed.notify_all();
        };
        drop(st);
        if fired {
            link.cut();
        }
        result
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
