//! What a source keeps outside its own process so that a restarted daemon
//! can finish a migration its predecessor had handed off.
//!
//! Guest memory survives the death of the source daemon (the VMM holds
//! the memfd), and so does the paused VM's vCPU state (the VMM holds it).
//! What dies with the daemon is the migration itself: where the VM went,
//! whether COMMIT went out, and the device state of the last checkpoint the
//! target sent back. A [`Journal`] records exactly that, at two moments:
//!
//! - [`Journal::hand_off`], before COMMIT goes out. A journal that cannot
//!   record it fails the migration before COMMIT (the VM resumes here):
//!   without the record a restarted daemon would find a paused VM and not
//!   know whether the target runs it.
//! - [`Journal::checkpoint_pages`] and [`Journal::checkpoint`], around each
//!   checkpoint applied to the source's memory: first its pages, then the
//!   record `applying` (with its state), then the pages are written into
//!   guest memory, then the record `applied`. A daemon that dies in between
//!   leaves memory that is part one checkpoint, part the next; a restarted
//!   one writes the recorded pages again ([`Journal::load_checkpoint_pages`])
//!   and goes on from that checkpoint. A journal that does not keep pages
//!   leaves memory "torn" then: the migration may go on once the target
//!   sends a later checkpoint (which carries the torn one's pages), but the
//!   VM cannot be taken back from it.
//!
//! A restarted daemon hands both records to [`super::recover_out`], which
//! asks the target how the migration ended (RESUME, answered with RESUMED
//! or CONCLUDED) and finishes it: serve the rest of a post-copy, hand the
//! VM off, resume it here, or take it back from the checkpoint.
//!
//! The records need to survive the daemon's process, not the host: the
//! host going down takes the memfd with it. Writing them to the page cache
//! (no fsync) is enough.

use serde::{Deserialize, Serialize};

/// A migration handed off (COMMIT sent or about to be).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandOff {
    /// The session (hex), which is also the migration's id on both hosts.
    pub session: String,
    /// The VM's name.
    pub vm: String,
    /// The target's address.
    pub to: String,
    /// The transport's name (`tcp`, `uring`, `rdma`).
    pub transport: String,
    /// Data streams (without the priority stream).
    pub streams: u16,
    /// The epoch COMMIT gives the VM on the target.
    pub epoch: u64,
    /// A post-copy switch: the target runs the VM before it holds all of
    /// its memory.
    pub postcopy: bool,
    /// Post-copy with checkpoints: a lost target's VM may be taken back.
    pub take_back: bool,
    /// Post-copy: how long after the target was last heard from the VM may
    /// be taken back, ms.
    pub grace_ms: u64,
    /// Post-copy: RELEASED was sent (recorded again just before). The
    /// target may run its guest without a lease from then on, so silence
    /// no longer means it stopped: only its word (FENCED, CONCLUDED
    /// `fenced`) lets the VM be taken back.
    #[serde(default)]
    pub released: bool,
}

/// A checkpoint the target sent back, as applied to the source's memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// The checkpoint's id.
    pub id: u64,
    /// False while its pages are being written (memory is torn until it is
    /// recorded again with `applied` true).
    pub applied: bool,
    /// The guest's progress counter at the checkpoint.
    pub progress: u64,
    /// The vCPU and device state.
    pub state: Vec<u8>,
}

/// Where a source records hand-offs and checkpoints (a daemon's state
/// directory). See the module docs for when each is called.
pub trait Journal: Send + Sync + std::fmt::Debug {
    /// The migration is about to send COMMIT. An error fails it first.
    fn hand_off(&self, h: &HandOff) -> std::io::Result<()>;
    /// A checkpoint of migration `session` is being applied (`applied`
    /// false) or was applied (true). An error stops it from being applied
    /// (or acknowledged).
    fn checkpoint(&self, session: &str, c: &CheckpointRecord) -> std::io::Result<()>;
    /// The pages of checkpoint `id` of migration `session` (page indices,
    /// and 4 KiB of data each, in order), before they are written into
    /// guest memory. The default keeps nothing. An error stops the
    /// checkpoint from being applied.
    fn checkpoint_pages(
        &self,
        session: &str,
        id: u64,
        pages: &[u64],
        data: &[u8],
    ) -> std::io::Result<()> {
        let _ = (session, id, pages, data);
        Ok(())
    }
    /// The pages [`Self::checkpoint_pages`] kept for checkpoint `id`, if
    /// it kept them.
    fn load_checkpoint_pages(
        &self,
        session: &str,
        id: u64,
    ) -> std::io::Result<Option<(Vec<u64>, Vec<u8>)>> {
        let _ = (session, id);
        Ok(None)
    }
}
