//! The VM's disk: which blocks hold data, and moving blocks with io_uring.
//!
//! - [`extents`]: the image's allocated extents (SEEK_DATA / SEEK_HOLE).
//! - [`ext4`]: the blocks an ext4 file system in the image marks used.
//! - [`uring`]: batched, O_DIRECT block reads and writes on an io_uring.

pub mod ext4;
pub mod extents;
pub mod uring;
