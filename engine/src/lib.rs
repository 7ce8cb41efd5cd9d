//! ferry's migration engine: the library a VMM links to migrate a running
//! KVM guest, and the core of `ferryd`.
//!
//! - [`memory`]: guest RAM mapped from the VMM's memfd, addressed by [`PageIndex`].
//! - [`vm`]: the two traits a VMM implements ([`SourceVm`], [`TargetVm`]).
//! - [`link`]: the unix-socket protocol between a VMM process and ferryd;
//!   [`linkvm`] implements the traits over it.
//! - [`wire`]: the frame protocol between two hosts (handshake, frames, acks,
//!   PREPARE/COMMIT).
//! - [`source`] / [`target`]: the migration state machines and data pipelines.
//! - [`metrics`]: a query-migrate style context per migration.
//! - [`policy`]: when pre-copy stops, which pages a round sends, throttling.
//! - [`numa`]: which CPUs each pipeline stage runs on (near guest memory,
//!   the NIC, the disk), and pinning.
//!
//! Entry points: [`source::migrate_out`] on the source, and on the target an
//! [`target::Acceptor`] that authenticates connections into sessions plus
//! [`target::migrate_in`] that receives one.

pub mod bitmap;
pub mod disk;
pub mod error;
pub mod key;
pub mod link;
pub mod linkvm;
pub mod memory;
pub mod memvm;
pub mod metrics;
pub mod numa;
pub mod policy;
pub mod postcopy;
pub mod source;
pub mod target;
pub mod vm;
pub mod wire;

pub use error::MigrationError;
pub use key::Key;
pub use memory::{GuestMem, PageIndex, PAGE_SIZE};
pub use metrics::{Metrics, Snapshot, Status};
pub use vm::{SourceVm, TargetVm, Userfault, VmError, VmState};
pub use wire::Mode;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A cancellation flag shared between whoever may cancel and the migration.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A new, unset flag.
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks the migration to stop; before COMMIT the VM stays on the source.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
