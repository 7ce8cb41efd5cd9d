//! What the engine needs from a VMM: one small trait per side.
//!
//! A VMM that links the library implements these directly; ferryd implements
//! them over the link protocol ([`crate::link`]) for VMMs in other processes
//! ([`crate::linkvm`]). Required methods have no default bodies.

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
    /// Stops the vCPUs at a consistent point and returns their state.
    fn pause(&mut self) -> Result<VmState, VmError>;
    /// Runs the vCPUs again: the migration failed or was cancelled.
    fn resume(&mut self) -> Result<(), VmError>;
    /// The hand-off is committed: the VM now runs elsewhere; stop for good.
    fn hand_off(&mut self, epoch: u64) -> Result<(), VmError>;
}

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
}
