//! What the engine needs from a VMM: one small trait per side.
//!
//! A VMM that links the library implements these directly; ferryd implements
//! them over the link protocol ([`crate::link`]) for VMMs in other processes
//! ([`crate::linkvm`]). Required methods have no default bodies; optional
//! capabilities (throttling) default to [`VmError::Unsupported`].

use crate::link::VerifyReport;

/// Errors a VMM reports.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The request failed inside the VMM.
    #[error("VMM request {op} failed: {message}")]
    Request {
        /// The request.
        op: &'static str,
        /// The VMM's reason.
        message: String,
    },
    /// The VMM could not be reached (it died, or the link broke).
    #[error("VMM link failed during {op}: {source}")]
    Link {
        /// The request.
        op: &'static str,
        /// The cause.
        #[source]
        source: crate::link::LinkError,
    },
    /// The VM does not implement an optional capability.
    #[error("the VM does not support {op}")]
    Unsupported {
        /// The request.
        op: &'static str,
    },
}

/// Opaque, versioned vCPU + device state produced by [`SourceVm::pause`].
/// Only the VMM interprets it; ferry moves it and checks its length and CRC.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmState {
    /// The VMM's bytes.
    pub blob: Vec<u8>,
    /// The guest's progress counter at the pause, when the VMM knows one.
    pub progress: u64,
}

/// Cap on a state blob from a peer: vCPU registers and a few devices are
/// kilobytes; 16 MiB leaves room for large vCPU counts.
pub const STATE_BYTES_MAX: usize = 16 << 20;

/// The source side: a running VM to be migrated away.
pub trait SourceVm: Send {
    /// Starts dirty logging. From now on every guest write marks its page.
    fn start_dirty_log(&mut self) -> Result<(), VmError>;
    /// ORs into `bitmap` (one bit per page, u64 words, page-index order) the
    /// pages written since the last call (or since `start_dirty_log`), and
    /// re-arms logging for them.
    fn sync_dirty_log(&mut self, bitmap: &mut [u64]) -> Result<(), VmError>;
    /// Stops dirty logging (the migration ended either way).
    fn stop_dirty_log(&mut self) -> Result<(), VmError>;
    /// ORs into `bitmap` the pages written since the last sync (or since
    /// `start_dirty_log`) *without* re-arming anything: those pages stay in
    /// the log and are returned by the next [`Self::sync_dirty_log`]. The
    /// bulk round uses it to skip pages the guest already rewrote.
    ///
    /// Optional: the default refuses with [`VmError::Unsupported`].
    fn peek_dirty_log(&mut self, bitmap: &mut [u64]) -> Result<(), VmError> {
        let _ = bitmap;
        Err(VmError::Unsupported {
            op: "peek_dirty_log",
        })
    }
    /// ORs into `bitmap` (one bit per 4 KiB disk block, u64 words) the disk
    /// blocks written since the last call (or since `start_dirty_log`), and
    /// clears them. A block's bit must be set only after the write reached
    /// the image, so a read after the sync that clears it sees the new data.
    ///
    /// Optional: only VMs migrated with a disk need it; the default refuses
    /// with [`VmError::Unsupported`].
    fn sync_disk_log(&mut self, bitmap: &mut [u64]) -> Result<(), VmError> {
        let _ = bitmap;
        Err(VmError::Unsupported {
            op: "sync_disk_log",
        })
    }
    /// Stops the vCPUs at a consistent point and returns their state.
    fn pause(&mut self) -> Result<VmState, VmError>;
    /// Runs the vCPUs again: the migration failed or was cancelled.
    fn resume(&mut self) -> Result<(), VmError>;
    /// The hand-off is committed: the VM now runs elsewhere; stop for good.
    fn hand_off(&mut self, epoch: u64) -> Result<(), VmError>;
    /// Lets the vCPUs run only `100 - percent`% of wall time, so that a guest
    /// that dirties memory faster than it can be sent slows down
    /// (auto-converge); 0 is full speed, at most
    /// [`THROTTLE_PCT_MAX`](crate::link::THROTTLE_PCT_MAX). `resume` ends any
    /// throttle: a VM that stays after a failed migration runs at full speed.
    ///
    /// Optional: the default refuses with [`VmError::Unsupported`], so a
    /// policy must cope with VMs that cannot be throttled.
    fn set_throttle(&mut self, percent: u8) -> Result<(), VmError> {
        let _ = percent;
        Err(VmError::Unsupported { op: "set_throttle" })
    }
    /// Post-copy take-back: the paused VM's vCPU and device state become
    /// `state` (a checkpoint of the target's, whose pages the engine wrote
    /// into guest memory already). The engine then calls
    /// [`Self::resume`]. Never called while the VM runs.
    ///
    /// Optional: without it a source can take a VM back only from the
    /// instant of the switch (no checkpoint applied). The default refuses
    /// with [`VmError::Unsupported`].
    fn rollback(&mut self, state: &VmState) -> Result<(), VmError> {
        let _ = state;
        Err(VmError::Unsupported { op: "rollback" })
    }
    /// Whether [`Self::rollback`] works. Without it, post-copy asks the
    /// target for no checkpoints.
    fn can_rollback(&self) -> bool {
        false
    }
}

/// Stops a target's guest for good from any thread, even while the engine
/// is inside a request to the VMM: kills the VMM and returns once it is
/// gone (an error if that could not be confirmed).
pub type Fencer = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// The target side: a VM being received.
pub trait TargetVm: Send {
    /// Loads `state` into a new VM over the received memory; does not run it.
    fn restore(&mut self, state: &VmState) -> Result<VerifyReport, VmError>;
    /// COMMIT arrived: run the VM.
    fn run(&mut self, epoch: u64) -> Result<(), VmError>;
    /// Cheap liveness check while pages flow: an error when the VMM is gone,
    /// so the target aborts at once instead of receiving a whole pre-copy
    /// for a VM that can never run.
    fn check(&mut self) -> Result<(), VmError>;
    /// The migration failed before COMMIT: throw the VM away.
    fn abort(&mut self, reason: &str);
    /// Loads `state` for a post-copy start (see [`crate::postcopy`]): the
    /// VMM registers its mapping of guest memory with a userfaultfd in
    /// minor and missing mode, unmaps every page from its own page tables
    /// (the memory stays in the memfd), and hands the descriptor over.
    /// Does not run the VM.
    ///
    /// Optional: the default refuses with [`VmError::Unsupported`], and a
    /// migration in `postcopy` mode then fails before COMMIT.
    fn restore_postcopy(&mut self, state: &VmState) -> Result<Userfault, VmError> {
        let _ = state;
        Err(VmError::Unsupported {
            op: "restore_postcopy",
        })
    }
    /// Post-copy is over: every page is in memory and mapped. The VMM
    /// closes its userfaultfd and checks its memory (a test instrument).
    fn postcopy_done(&mut self) -> Result<VerifyReport, VmError> {
        Err(VmError::Unsupported {
            op: "postcopy_done",
        })
    }
    /// Post-copy, after [`Self::restore_postcopy`] and before `run`: starts
    /// logging the guest's writes for checkpoints. Returns false when the
    /// VM cannot checkpoint (the default): post-copy then runs without
    /// them, and a lost target loses the VM.
    fn start_checkpoints(&mut self) -> Result<bool, VmError> {
        Ok(false)
    }
    /// Pauses the vCPUs, ORs into `bitmap` the pages the guest wrote since
    /// the last call (or since `start_checkpoints`), and returns the state
    /// of this instant. The guest stays paused until
    /// [`Self::checkpoint_end`]: the engine copies the pages meanwhile.
    fn checkpoint_begin(&mut self, bitmap: &mut [u64]) -> Result<VmState, VmError> {
        let _ = bitmap;
        Err(VmError::Unsupported {
            op: "checkpoint_begin",
        })
    }
    /// Runs the vCPUs again after [`Self::checkpoint_begin`].
    fn checkpoint_end(&mut self) -> Result<(), VmError> {
        Err(VmError::Unsupported {
            op: "checkpoint_end",
        })
    }
    /// Post-copy is over and the source let go: stops the logging
    /// `start_checkpoints` began.
    fn stop_checkpoints(&mut self) -> Result<(), VmError> {
        Ok(())
    }
    /// A way to stop the guest for good from another thread (the lease
    /// watchdog of post-copy). Required when `start_checkpoints` returns
    /// true; the default has none.
    fn fencer(&mut self) -> Option<Fencer> {
        None
    }
}

/// A VMM's userfaultfd over guest memory, for post-copy.
#[derive(Debug)]
pub struct Userfault {
    /// The descriptor (registered minor + missing over every region).
    pub fd: std::os::fd::OwnedFd,
    /// Where each region of the spec starts in the address space the
    /// descriptor belongs to.
    pub host_addrs: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM that implements only the required methods.
    struct Minimal;

    impl SourceVm for Minimal {
        fn start_dirty_log(&mut self) -> Result<(), VmError> {
            Ok(())
        }
        fn sync_dirty_log(&mut self, _: &mut [u64]) -> Result<(), VmError> {
            Ok(())
        }
        fn stop_dirty_log(&mut self) -> Result<(), VmError> {
            Ok(())
        }
        fn pause(&mut self) -> Result<VmState, VmError> {
            Ok(VmState::default())
        }
        fn resume(&mut self) -> Result<(), VmError> {
            Ok(())
        }
        fn hand_off(&mut self, _: u64) -> Result<(), VmError> {
            Ok(())
        }
    }

    #[test]
    fn throttling_is_optional() {
        let e = Minimal.set_throttle(50).unwrap_err();
        assert!(matches!(e, VmError::Unsupported { op: "set_throttle" }));
        assert_eq!(e.to_string(), "the VM does not support set_throttle");
    }
}
