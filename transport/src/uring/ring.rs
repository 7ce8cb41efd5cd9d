//! One io_uring per connection handle: the only place that submits to the
//! kernel, waits for completions and cancels.
//!
//! A [`Ring`] has at most one transfer in flight, and [`Ring::run`] does not
//! return while it is: a buffer handed to the kernel is never reachable by it
//! after the call that lent it returns. The one exception is the page pins of
//! a zero-copy send, which outlive the send by design (see the parent
//! module's docs); they hold pages, not our addresses.
//!
//! ```text
//!   run(entry, slice)
//!     push entry (tag n) ──► enter(submit 1, wait 1 CQE, timeout = slice)
//!                               │ CQE tag n            │ slice passed, no CQE
//!                               ▼                      ▼
//!                          Completed(res)      push ASYNC_CANCEL(tag n)
//!                                              enter(wait 1 CQE, no timeout)
//!                                                      ▼
//!                                              Cancelled(res): bytes moved
//!                                              before the cancel, or -ECANCELED
//! ```

use std::io;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// Submission queue entries of a ring. A handle has one transfer and at most
/// one cancel in flight (`send` and `recv` are blocking calls, one operation
/// at a time), so 8 leaves room to spare.
pub(super) const SQ_ENTRIES: u32 = 8;

/// Completion queue entries: the transfer, its cancel, and the notifications
/// of zero-copy sends, which may trail their send by a round trip (a send's
/// pages are released when the peer acknowledges them). 64 is more than a
/// handle can owe, since each zero-copy send of at least
/// `ZERO_COPY_MIN_BYTES` waits for its own completion first; the kernel keeps
/// an overflow list beyond that anyway (`IORING_FEAT_NODROP`).
pub(super) const CQ_ENTRIES: u32 = 64;

/// `user_data` of cancel entries; transfers use a counter that cannot reach it.
const CANCEL_TAG: u64 = u64::MAX;

/// `IORING_SEND_ZC_REPORT_USAGE` (Linux 6.2): the notification says whether
/// the kernel had to copy after all (`IORING_NOTIF_USAGE_ZC_COPIED`).
pub(super) const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;

/// `IORING_NOTIF_USAGE_ZC_COPIED`, in a notification's result.
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

/// `io_uring_enter` failing with EBUSY or EAGAIN (completion backlog, or the
/// kernel short of memory for a request) is retried 1 ms apart.
const ENTER_BUSY_PAUSE: Duration = Duration::from_millis(1);

/// Busy retries before an entry the kernel never took is given up on:
/// 10,000 x 1 ms is 10 s of a kernel short of memory, which we call a failure.
/// (Once the kernel took the entry there is no giving up: see [`Ring::run`].)
const ENTER_BUSY_RETRIES: u32 = 10_000;

/// Ring setup choices, made once by the transport's probe.
#[derive(Debug, Clone, Copy)]
pub(super) struct RingSetup {
    /// `IORING_SETUP_COOP_TASKRUN` (Linux 5.19): completions are processed when
    /// the thread enters the kernel (it is always waiting in `io_uring_enter`
    /// when something completes) rather than by interrupting it.
    pub coop_taskrun: bool,
    /// Zero-copy sends may ask for `IORING_SEND_ZC_REPORT_USAGE` (Linux 6.2;
    /// on 6.1 the flag fails every send with EINVAL).
    pub zc_report_usage: bool,
}

/// How an `io_uring_enter` went.
enum Entered {
    /// It waited (for a completion, until the timeout, or until a signal).
    Waited,
    /// The kernel was busy; we paused and nothing may have been submitted.
    Busy,
}

/// How one operation ended.
#[derive(Debug, Clone, Copy)]
pub(super) struct Completion {
    /// Bytes moved (>= 0) or a negative errno.
    pub res: i32,
    /// The wait slice passed and the operation was cancelled: `res` is what it
    /// did before (bytes moved, or `-ECANCELED` if nothing).
    pub cancelled: bool,
}

/// What one ring has done, for tests and logs.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct RingStats {
    /// Operations submitted.
    pub ops: u64,
    /// Operations cancelled at the end of a wait slice.
    pub cancels: u64,
    /// Zero-copy notifications still owed by the kernel (signed: one may be
    /// reaped before the completion that announces it).
    pub zc_pending: i64,
    /// Zero-copy notifications received.
    pub zc_notified: u64,
    /// Of those, the ones saying the kernel copied after all.
    pub zc_copied: u64,
}

/// An io_uring owned by one connection handle.
pub(super) struct Ring {
    ring: IoUring,
    next_tag: u64,
    stats: RingStats,
    /// An entry is stuck in the submission queue: never enter again.
    broken: bool,
}

impl Ring {
    /// A new ring set up as `setup` says.
    pub fn new(setup: RingSetup) -> io::Result<Self> {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(CQ_ENTRIES);
        if setup.coop_taskrun {
            builder.setup_coop_taskrun();
        }
        Ok(Self {
            ring: builder.build(SQ_ENTRIES)?,
            next_tag: 0,
            stats: RingStats::default(),
            broken: false,
        })
    }

    /// What this ring has done so far.
    pub fn stats(&self) -> RingStats {
        self.stats
    }

    /// Submits `entry` and waits for its completion. If `slice` (`None` =
    /// forever) passes first, cancels the operation and waits for the
    /// completion the cancel causes. The operation's `user_data` is set here.
    ///
    /// Errors only for a failure before the kernel took the entry; once it
    /// did, this returns only with the operation's completion in hand (an
    /// `io_uring_enter` failure that leaves no way to reap it aborts the
    /// process rather than free memory the kernel may still write).
    ///
    /// # Safety
    ///
    /// Every address in `entry` (a buffer, or a `msghdr`, its iovecs and the
    /// memory they describe) must be valid for the access the opcode makes
    /// (reads for sends, writes for receives) until this returns, and must
    /// not be accessed through a Rust reference meanwhile, except memory the
    /// kernel only reads. A zero-copy send must only name memory whose pages
    /// may be read by the kernel after this returns (guest memory; see the
    /// module docs of `uring`).
    pub unsafe fn run(
        &mut self,
        entry: squeue::Entry,
        slice: Option<Duration>,
    ) -> io::Result<Completion> {
        if self.broken {
            return Err(io::Error::other(
                "this connection's io_uring failed earlier and is out of service",
            ));
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        self.stats.ops += 1;
        debug_assert!(tag < CANCEL_TAG);
        // Leftover completions (a late cancel, notifications) are reaped first
        // so they can never be taken for this operation's.
        let stale = self.reap(tag);
        debug_assert!(
            stale.is_none(),
            "completion for an operation not yet submitted"
        );
        {
            let mut sq = self.ring.submission();
            // SAFETY: the caller guarantees every address in `entry` stays valid
            // until this function returns, and it does not return before the
            // operation's completion is reaped (below: each path either errors
            // while the entry is still in our queue, or ends with `Some` from
            // `reap`, or aborts).
            let pushed = unsafe { sq.push(&entry.user_data(tag)) };
            pushed.map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        // One clock read per operation: the first wait takes the whole slice,
        // and only a wake-up without our completion (a late cancel result, a
        // zero-copy notification, a signal) needs to know what is left.
        let started = slice.map(|_| Instant::now());
        let mut left = slice;
        let mut busy = 0;
        loop {
            let submitted = self.enter(left);
            if let Some((res, _)) = self.reap(tag) {
                return Ok(Completion {
                    res,
                    cancelled: false,
                });
            }
            match submitted {
                Ok(Entered::Waited) => {}
                Ok(Entered::Busy) if self.queued() == 0 => {}
                Ok(Entered::Busy) => {
                    busy += 1;
                    if busy > ENTER_BUSY_RETRIES {
                        self.broken = true;
                        return Err(io::Error::other(
                            "io_uring stayed busy for 10 s without taking the operation",
                        ));
                    }
                }
                Err(e) if self.queued() > 0 => {
                    // The kernel never took the entry. It cannot be taken back
                    // out of the queue, so the ring must never enter again (an
                    // enter would submit it with addresses gone stale).
                    self.broken = true;
                    return Err(e);
                }
                Err(e) => abort_in_flight("waiting for", &e),
            }
            if let (Some(slice), Some(started)) = (slice, started) {
                match slice.checked_sub(started.elapsed()) {
                    Some(l) if !l.is_zero() => left = Some(l),
                    _ => break, // the slice passed: cancel below
                }
            }
        }
        // The slice passed with the operation in flight.
        self.stats.cancels += 1;
        {
            let cancel = opcode::AsyncCancel::new(tag).build().user_data(CANCEL_TAG);
            let mut sq = self.ring.submission();
            // SAFETY: a cancel carries no address, only the tag to cancel.
            let pushed = unsafe { sq.push(&cancel) };
            if pushed.is_err() {
                abort_in_flight("cancelling", &io::Error::other("submission queue full"));
            }
        }
        loop {
            if let Err(e) = self.enter(None) {
                abort_in_flight("cancelling", &e);
            }
            // A busy kernel is retried without limit here: the operation is in
            // flight and its memory cannot be let go before it completes.
            if let Some((res, _)) = self.reap(tag) {
                return Ok(Completion {
                    res,
                    cancelled: true,
                });
            }
        }
    }

    /// Entries in the submission queue not yet taken by the kernel.
    fn queued(&mut self) -> usize {
        self.ring.submission().len()
    }

    /// Submits what is queued and waits for one completion, at most `wait`
    /// (`None` = no limit). A passed timeout and a signal are `Waited`, a busy
    /// kernel is `Busy` (after a pause): either way the caller looks at the
    /// queues.
    fn enter(&mut self, wait: Option<Duration>) -> io::Result<Entered> {
        let r = match wait {
            None => self.ring.submit_and_wait(1),
            Some(w) => {
                let ts = types::Timespec::from(w);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match r {
            Ok(_) => Ok(Entered::Waited),
            Err(e) => match e.raw_os_error() {
                Some(libc::ETIME) | Some(libc::EINTR) => Ok(Entered::Waited),
                Some(libc::EBUSY) | Some(libc::EAGAIN) => {
                    std::thread::sleep(ENTER_BUSY_PAUSE);
                    Ok(Entered::Busy)
                }
                _ => Err(e),
            },
        }
    }

    /// Reaps every completion; returns the result and flags of operation `tag`
    /// if it was among them. Notifications and cancel results are accounted
    /// and dropped.
    fn reap(&mut self, tag: u64) -> Option<(i32, u32)> {
        let mut found = None;
        let mut stats = self.stats;
        for cqe in self.ring.completion() {
            let (ud, res, flags) = (cqe.user_data(), cqe.result(), cqe.flags());
            if cqueue::notif(flags) {
                stats.zc_pending -= 1;
                stats.zc_notified += 1;
                if (res as u32) & NOTIF_USAGE_ZC_COPIED != 0 {
                    stats.zc_copied += 1;
                }
            } else if ud == CANCEL_TAG {
                // -ENOENT or -EALREADY when the operation finished first: its
                // own completion says what happened.
            } else if ud == tag {
                debug_assert!(found.is_none(), "two completions for operation {tag}");
                if cqueue::more(flags) {
                    stats.zc_pending += 1;
                }
                found = Some((res, flags));
            } else {
                debug_assert!(ud < tag, "completion for unknown operation {ud}");
            }
        }
        self.stats = stats;
        found
    }
}

/// Whether the kernel accepts `IORING_SEND_ZC_REPORT_USAGE` on a
/// `SENDMSG_ZC`: flags are checked when the entry is prepared, before its fd,
/// so a send on fd -1 fails with EBADF if the flag is known and EINVAL if not.
/// Uses `ring`, which must have nothing in flight.
pub(super) fn probe_zc_report_usage(ring: &mut IoUring) -> io::Result<bool> {
    // SAFETY: an all-zero msghdr is a valid "no name, no control" header.
    let msg: libc::msghdr = unsafe { std::mem::zeroed() };
    let entry = opcode::SendMsgZc::new(types::Fd(-1), &msg)
        .ioprio(SEND_ZC_REPORT_USAGE)
        .build()
        .user_data(0);
    // SAFETY: the entry's only address is `msg`, which lives until after the
    // completion is reaped below (the send fails before reading it anyway).
    unsafe { ring.submission().push(&entry) }
        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => {
                // The entry may still be in flight with `msg` on this frame.
                abort_in_flight("probing", &e)
            }
        }
        if let Some(cqe) = ring.completion().next() {
            return Ok(cqe.result() != -libc::EINVAL);
        }
    }
}

/// The kernel may still write into memory we were lent, and we cannot learn
/// when it stops: returning would free that memory under it, so end here.
fn abort_in_flight(what: &str, e: &io::Error) -> ! {
    eprintln!(
        "ferry-transport: io_uring failed while {what} an operation in flight ({e}); \
         aborting, since its buffer cannot be released safely"
    );
    std::process::abort()
}
