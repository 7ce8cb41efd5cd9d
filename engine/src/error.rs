//! The engine's error type: a variant per operation, context in fields.

use ferry_transport::TransportError;

use crate::link::LinkError;
use crate::memory::MemoryError;
use crate::vm::VmError;
use crate::wire::WireError;

/// Why a migration failed. Unless the variant says otherwise, a source-side
/// error means the VM was resumed on the source (nothing lost), and a
/// target-side error means the received VM was thrown away.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Moving bytes failed (peer died, link cut, timeout).
    #[error("transport failed during {phase}: {source}")]
    Transport {
        /// What the migration was doing.
        phase: &'static str,
        /// The cause.
        #[source]
        source: TransportError,
    },
    /// The peer sent something that breaks the protocol.
    #[error("protocol error during {phase}: {source}")]
    Protocol {
        /// What the migration was doing.
        phase: &'static str,
        /// The cause.
        #[source]
        source: WireError,
    },
    /// The peer could not prove it holds the pre-shared key (or we could not).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// At PREPARE the target found it does not hold everything the source sent.
    #[error("the target does not hold the whole VM: {0}")]
    Incomplete(String),
    /// The peer refused or aborted the migration, with its reason.
    #[error("the peer aborted the migration: {0}")]
    PeerAborted(String),
    /// The VMM failed a request.
    #[error("VMM failed: {0}")]
    Vm(#[from] VmError),
    /// The local ferryd's link to the VMM failed.
    #[error("VMM link failed: {0}")]
    Link(#[from] LinkError),
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// Pre-copy did not converge within its limits; the VM stays on the source.
    #[error("pre-copy did not converge: {0}")]
    NotConverged(String),
    /// The user cancelled.
    #[error("cancelled")]
    Cancelled,
    /// A setting or request was invalid.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// COMMIT was sent and its fate is unknown: the target decides. The
    /// source VM stays paused (never resumed) so it cannot run twice.
    #[error("commit outcome unknown: {0}; the VM stays paused on the source until the target's answer is known")]
    CommitUnknown(String),
    /// Post-copy broke off after COMMIT: the VM runs on the target, whose
    /// guest waits for the pages it lacks; the source keeps the VM paused
    /// and its memory, so that the pages can still be served.
    #[error("post-copy broke off: {0}; the VM runs on the target, the source keeps it paused with its memory")]
    PostcopyBroken(String),
    /// Post-copy lost its target (gone past the grace, or its guest stopped
    /// for good): the source runs the VM again from the last checkpoint the
    /// target sent back. Guest time since that checkpoint is lost.
    #[error("post-copy failed: {0}")]
    TakenBack(String),
    /// Target side: the guest here was stopped for good during post-copy
    /// (lease ran out, or an error here); the source takes the VM back.
    #[error("post-copy stopped here: {0}; the source takes the VM back from its last checkpoint")]
    Fenced(String),
}
