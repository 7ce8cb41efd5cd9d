//! The source side of a migration: pre-copy rounds and the switchover.
use std::num::NonZeroU32;
use std::time::Duration;

use ferry_transport::Transport;

use crate::link::VmSpec;
use crate::{Cancel, GuestMem, Key, Metrics, MigrationError, SourceVm};

/// Settings of an outgoing migration.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Data streams (TCP connections) besides the control stream.
    pub streams: NonZeroU32,
    /// Downtime budget: stop-and-copy once the estimate fits.
    pub downtime_ms: u64,
    /// Cap on the send rate; `None` sends as fast as the link goes.
    pub bandwidth_mib_s: Option<u64>,
    /// Give up (VM stays on the source) after this many rounds.
    pub rounds_max: u32,
    /// Give up after this long.
    pub time_max: Duration,
    /// Deadline for connecting and the handshake.
    pub connect_timeout: Duration,
    /// A peer silent for this long is dead.
    pub io_timeout: Duration,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            streams: NonZeroU32::new(4).expect("4 is not zero"),
            downtime_ms: 300,
            bandwidth_mib_s: None,
            rounds_max: 30,
            time_max: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
        }
    }
}

/// A committed migration.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The epoch the VM now runs with on the target.
    pub epoch: u64,
}

/// Migrates the VM to `to`. On `Ok` the VM runs on the target and
/// [`SourceVm::hand_off`] was called. On any error but
/// [`MigrationError::CommitUnknown`], the VM was resumed here.
#[allow(clippy::too_many_arguments)]
pub fn migrate_out(
    transport: &dyn Transport,
    to: &str,
    key: &Key,
    spec: &VmSpec,
    epoch: u64,
    mem: &GuestMem,
    vm: &mut dyn SourceVm,
    cfg: &SourceConfig,
    metrics: &Metrics,
    cancel: &Cancel,
) -> Result<Outcome, MigrationError> {
    let _ = (transport, to, key, spec, epoch, mem, vm, cfg, metrics, cancel);
    Err(MigrationError::Invalid("not built yet".into()))
}
