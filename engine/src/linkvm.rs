//! [`SourceVm`] and [`TargetVm`] over the link protocol, for VMMs that run in
//! their own process and attach to ferryd.

use crate::link::{Link, LinkError, LinkMsg, VerifyReport, VmStats};
use crate::vm::{SourceVm, TargetVm, VmError, VmState};

/// A VMM on the other end of a link.
#[derive(Debug)]
pub struct LinkVm {
    link: Link,
}

fn link_err(op: &'static str) -> impl FnOnce(LinkError) -> VmError {
    move |e| match e {
        LinkError::Remote(message) => VmError::Request { op, message },
        source => VmError::Link { op, source },
    }
}

fn expect(op: &'static str, got: &LinkMsg, want: &'static str) -> VmError {
    VmError::Link {
        op,
        source: LinkError::Unexpected {
            expected: want,
            got: got.kind().into(),
        },
    }
}

impl LinkVm {
    /// Wraps a registered link.
    pub fn new(link: Link) -> Self {
        LinkVm { link }
    }

    /// The link, for requests outside the traits.
    pub fn link(&mut self) -> &mut Link {
        &mut self.link
    }

    /// A dirty-log request (`sync` or `peek`): ORs the reply into `bitmap`.
    fn dirty_log(
        &mut self,
        op: &'static str,
        msg: LinkMsg,
        bitmap: &mut [u64],
    ) -> Result<(), VmError> {
        let r = self.link.call(&msg, &[]).map_err(link_err(op))?;
        if r.msg != LinkMsg::DirtyLog {
            return Err(expect(op, &r.msg, "dirty_log"));
        }
        if r.bin.len() != bitmap.len() * 8 {
            return Err(VmError::Request {
                op,
                message: format!(
                    "bitmap of {} bytes, expected {}",
                    r.bin.len(),
                    bitmap.len() * 8
                ),
            });
        }
        for (w, b) in bitmap.iter_mut().zip(r.bin.chunks_exact(8)) {
            *w |= u64::from_le_bytes(b.try_into().expect("chunks of 8"));
        }
        Ok(())
    }

    fn simple(&mut self, op: &'static str, msg: LinkMsg) -> Result<(), VmError> {
        let r = self.link.call(&msg, &[]).map_err(link_err(op))?;
        match r.msg {
            LinkMsg::Ok => Ok(()),
            other => Err(expect(op, &other, "ok")),
        }
    }

    /// Asks the VMM for its live numbers.
    pub fn stats(&mut self) -> Result<VmStats, VmError> {
        let r = self
            .link
            .call(&LinkMsg::GetStats, &[])
            .map_err(link_err("get_stats"))?;
        match r.msg {
            LinkMsg::Stats(s) => Ok(s),
            other => Err(expect("get_stats", &other, "stats")),
        }
    }
}

impl SourceVm for LinkVm {
    fn start_dirty_log(&mut self) -> Result<(), VmError> {
        self.simple("start_dirty_log", LinkMsg::StartDirtyLog)
    }

    fn sync_dirty_log(&mut self, bitmap: &mut [u64]) -> Result<(), VmError> {
        self.dirty_log("sync_dirty_log", LinkMsg::SyncDirtyLog, bitmap)
    }

    fn peek_dirty_log(&mut self, bitmap: &mut [u64]) -> Result<(), VmError> {
        self.dirty_log("peek_dirty_log", LinkMsg::PeekDirtyLog, bitmap)
    }

    fn sync_disk_log(&mut self, bitmap: &mut [u64]) -> Result<(), VmError> {
        self.dirty_log("sync_disk_log", LinkMsg::SyncDiskLog, bitmap)
    }

    fn stop_dirty_log(&mut self) -> Result<(), VmError> {
        self.simple("stop_dirty_log", LinkMsg::StopDirtyLog)
    }

    fn pause(&mut self) -> Result<VmState, VmError> {
        let r = self
            .link
            .call(&LinkMsg::Pause, &[])
            .map_err(link_err("pause"))?;
        match r.msg {
            LinkMsg::Paused { progress } => Ok(VmState {
                blob: r.bin,
                progress,
            }),
            other => Err(expect("pause", &other, "paused")),
        }
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.simple("resume", LinkMsg::Resume)
    }

    fn hand_off(&mut self, epoch: u64) -> Result<(), VmError> {
        self.simple(
            "quit",
            LinkMsg::Quit {
                reason: format!("migrated away (epoch {epoch})"),
            },
        )
    }

    /// Sends `Throttle`; the VMM refuses a percentage over
    /// [`THROTTLE_PCT_MAX`](crate::link::THROTTLE_PCT_MAX).
    fn set_throttle(&mut self, percent: u8) -> Result<(), VmError> {
        self.simple("throttle", LinkMsg::Throttle { percent })
    }

    fn can_rollback(&self) -> bool {
        true
    }

    fn rollback(&mut self, state: &VmState) -> Result<(), VmError> {
        let r = self
            .link
            .call(&LinkMsg::Rollback, &state.blob)
            .map_err(link_err("rollback"))?;
        match r.msg {
            LinkMsg::Ok => Ok(()),
            other => Err(expect("rollback", &other, "ok")),
        }
    }
}

impl TargetVm for LinkVm {
    fn restore(&mut self, state: &VmState) -> Result<VerifyReport, VmError> {
        let r = self
            .link
            .call(&LinkMsg::Restore, &state.blob)
            .map_err(link_err("restore"))?;
        match r.msg {
            LinkMsg::Restored { verify } => Ok(verify),
            other => Err(expect("restore", &other, "restored")),
        }
    }

    fn run(&mut self, _epoch: u64) -> Result<(), VmError> {
        self.simple("run", LinkMsg::Run)
    }

    fn check(&mut self) -> Result<(), VmError> {
        if self.link.peer_gone() {
            return Err(VmError::Link {
                op: "check",
                source: LinkError::Closed,
            });
        }
        Ok(())
    }

    fn restore_postcopy(&mut self, state: &VmState) -> Result<crate::vm::Userfault, VmError> {
        let mut r = self
            .link
            .call(&LinkMsg::RestorePostcopy, &state.blob)
            .map_err(link_err("restore_postcopy"))?;
        match r.msg {
            LinkMsg::PostcopyReady { host_addrs } if r.fds.len() == 1 => Ok(crate::vm::Userfault {
                fd: r.fds.remove(0),
                host_addrs,
            }),
            LinkMsg::PostcopyReady { .. } => Err(VmError::Request {
                op: "restore_postcopy",
                message: format!("the reply carried {} descriptors, not 1", r.fds.len()),
            }),
            other => Err(expect("restore_postcopy", &other, "postcopy_ready")),
        }
    }

    fn postcopy_done(&mut self) -> Result<VerifyReport, VmError> {
        let r = self
            .link
            .call(&LinkMsg::PostcopyDone, &[])
            .map_err(link_err("postcopy_done"))?;
        match r.msg {
            LinkMsg::Verified { verify } => Ok(verify),
            other => Err(expect("postcopy_done", &other, "verified")),
        }
    }

    fn start_checkpoints(&mut self) -> Result<bool, VmError> {
        self.simple("start_dirty_log", LinkMsg::StartDirtyLog)?;
        Ok(true)
    }

    fn checkpoint_begin(&mut self, bitmap: &mut [u64]) -> Result<VmState, VmError> {
        let state = SourceVm::pause(self)?;
        self.dirty_log("sync_dirty_log", LinkMsg::SyncDirtyLog, bitmap)?;
        Ok(state)
    }

    fn checkpoint_end(&mut self) -> Result<(), VmError> {
        self.simple("resume", LinkMsg::Resume)
    }

    fn stop_checkpoints(&mut self) -> Result<(), VmError> {
        self.simple("stop_dirty_log", LinkMsg::StopDirtyLog)
    }

    /// Kills the VMM process at the other end of the link (found with
    /// SO_PEERCRED, held as a pidfd so that a reused pid is never hit).
    fn fencer(&mut self) -> Option<crate::vm::Fencer> {
        let pid = match self.link.peer_pid() {
            Ok(p) if p > 0 => p,
            Ok(_) | Err(_) => return None,
        };
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("cannot hold the VMM's process (pid {pid}): {e}");
                return None;
            }
        };
        Some(Box::new(move || kill_and_wait(&pidfd, pid)))
    }

    fn abort(&mut self, reason: &str) {
        let _ = self.link.send(
            &LinkMsg::Quit {
                reason: reason.into(),
            },
            &[],
            &[],
        );
        let _ = self.link.recv();
        self.link.shutdown();
    }
}

fn pidfd_open(pid: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// SIGKILLs the process behind `pidfd` and waits (up to 10 s) until it has
/// exited: its vCPUs run no more once this returns `Ok`.
fn kill_and_wait(pidfd: &std::os::fd::OwnedFd, pid: i32) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_send_signal on a pidfd we own; no siginfo is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        // ESRCH: it has exited already.
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(format!("cannot kill the VMM (pid {pid}): {e}"));
        }
    }
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // A pidfd becomes readable when its process has exited.
    // SAFETY: one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    if rc == 1 {
        tracing::warn!("the VMM (pid {pid}) is killed: its guest runs no more");
        Ok(())
    } else {
        Err(format!(
            "the VMM (pid {pid}) was sent SIGKILL but had not exited after 10 s"
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::link::THROTTLE_PCT_MAX;

    /// A VMM that answers `Throttle` as ferry-vmm does and records it.
    fn fake_vmm(link: Link) -> std::thread::JoinHandle<Vec<u8>> {
        let mut link = link;
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while let Ok(r) = link.recv() {
                let reply = match r.msg {
                    LinkMsg::Throttle { percent } if percent <= THROTTLE_PCT_MAX => {
                        seen.push(percent);
                        LinkMsg::Ok
                    }
                    LinkMsg::Throttle { percent } => LinkMsg::Error {
                        message: format!("throttle of {percent}% is out of range"),
                    },
                    _ => LinkMsg::Error {
                        message: "unexpected".into(),
                    },
                };
                if link.send(&reply, &[], &[]).is_err() {
                    break;
                }
            }
            seen
        })
    }

    #[test]
    fn set_throttle_sends_the_request() {
        let (a, b) = UnixStream::pair().unwrap();
        let vmm = fake_vmm(Link::new(b));
        let mut vm = LinkVm::new(Link::new(a));
        vm.set_throttle(30).unwrap();
        vm.set_throttle(0).unwrap();
        match vm.set_throttle(100) {
            Err(VmError::Request { op, message }) => {
                assert_eq!(op, "throttle");
                assert!(message.contains("100%"), "{message}");
            }
            other => panic!("out-of-range throttle: {other:?}"),
        }
        drop(vm);
        assert_eq!(vmm.join().unwrap(), [30, 0]);
    }
}
