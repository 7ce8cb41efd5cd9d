//! The VM's disk: a raw image file, a paravirtual doorbell the guest drives,
//! a dirty log of written blocks, and the checks of the guest's stamps.
//!
//! ```text
//!  guest                                 VMM (vCPU thread, at the exit)
//!  stamp block i into DMA page i
//!  DISK_LIST[i] = block, version += 1
//!  CB_DISK_COUNT = n  (n <= 16)
//!  out DISK_PORT, DISK_CMD_WRITE  ────▶  for i < n: pwrite(page i, block i)
//!                                                  then set block i's dirty bit
//!  out DISK_PORT, DISK_CMD_READ   ────▶  for i < n: pread(block i) into page i
//!                                                  (logged as a VMM write to RAM)
//!  (every exit)                   ◀────  CB_DISK_DUE = writes due by now
//! ```
//!
//! The VMM completes a whole command inside the exit, before the vCPU can
//! park, so at every point where a pause can land the image holds exactly
//! the versions in the guest's disk version table, and every written block
//! whose bit a sync cleared was in the image before that sync returned.
//!
//! - [`image`]: the image file ([`Disk`]): block I/O, its dirty log, and the
//!   allocation-independent hash.
//! - [`check`]: the oracle of the guest's block stamps.
//! - [`doorbell`]: the exit handler of `DISK_PORT`.
//! - [`pacing`]: how many block writes are due at an exit.

pub mod check;
pub mod doorbell;
pub mod image;
pub mod pacing;

pub use image::{BlockIndex, BlockRead, BlockWrite, Disk, BLOCK_BYTES};

/// Errors of the disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Opening or inspecting the image failed.
    #[error("cannot {op} the disk image {path}: {source}")]
    Open {
        /// What we were doing.
        op: &'static str,
        /// The image (or the descriptor, for a target).
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The image's size is unusable.
    #[error("the disk image {path} is {bytes} bytes: {why}")]
    Size {
        /// The image.
        path: String,
        /// Its size.
        bytes: u64,
        /// What is wrong with it.
        why: String,
    },
    /// A block read or write failed.
    #[error("cannot {op} disk block {block}: {source}")]
    Io {
        /// `read` or `write`.
        op: &'static str,
        /// The block.
        block: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A block outside the disk.
    #[error("disk block {block} is outside the disk of {blocks} blocks")]
    OutOfRange {
        /// The block.
        block: u64,
        /// Blocks of the disk.
        blocks: u64,
    },
    /// Hashing the image failed.
    #[error("cannot hash the disk image: {0}")]
    Hash(#[source] std::io::Error),
    /// The disk dirty log was asked for while logging is off.
    #[error("disk dirty logging is off (StartDirtyLog first)")]
    LogOff,
    /// The guest's command is malformed.
    #[error("invalid disk command from the guest: {0}")]
    Command(String),
    /// Guest memory of a command.
    #[error(transparent)]
    Mem(#[from] crate::mem::MemError),
}

const _: () = assert!(
    crate::abi::DISK_READ_EVERY.is_power_of_two()
        && crate::abi::DISK_READ_MASK == crate::abi::DISK_READ_EVERY - 1
);
