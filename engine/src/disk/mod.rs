//! The VM's disk: which blocks hold data, and moving blocks with io_uring.
//!
//! - [`extents`]: the image's allocated extents (SEEK_DATA / SEEK_HOLE).
//! - [`ext4`]: the blocks an ext4 file system in the image marks used.
//! - [`uring`]: batched, O_DIRECT block reads and writes on an io_uring.
//! - [`numa`]: which CPUs are near the image's device, for the ring threads.

pub mod ext4;
pub mod extents;
pub mod numa;
pub mod uring;

use std::fs::File;

/// What the bulk phase sends of a disk, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BulkSelection {
    /// Blocks to send as (first, count), ascending.
    pub runs: Vec<(u64, u64)>,
    /// Blocks the image has allocated.
    pub allocated_blocks: u64,
    /// Blocks in `runs`.
    pub bulk_blocks: u64,
    /// `extents`, `ext4`, or `extents (<why not ext4>)`.
    pub selection: String,
}

/// The blocks of a `blocks`-block image the bulk phase must send: its
/// allocated extents (holes read as zero, and the target's new image is
/// all holes), and with `fs_aware` only those an ext4 file system in the
/// image marks used (blocks past the file system's end count as used). A
/// file system the parser does not take falls back to the extents, with
/// the reason in `selection` and the log.
pub fn select_bulk(file: &File, blocks: u64, fs_aware: bool) -> std::io::Result<BulkSelection> {
    let extents: Vec<(u64, u64)> = extents::data_extents(file)?
        .into_iter()
        .filter(|&(f, _)| f < blocks)
        .map(|(f, c)| (f, c.min(blocks - f)))
        .collect();
    let allocated_blocks = extents::extent_blocks(&extents);
    let mut sel = BulkSelection {
        allocated_blocks,
        ..Default::default()
    };
    if !fs_aware {
        sel.runs = extents;
        sel.selection = "extents".into();
    } else {
        match ext4::used_blocks(file) {
            Ok(fs) => {
                for &(f, c) in &extents {
                    intersect_used(&fs, f, c, &mut sel.runs);
                }
                sel.selection = "ext4".into();
            }
            Err(e) => {
                tracing::info!("disk: not file-system aware, sending allocated extents: {e}");
                sel.runs = extents;
                sel.selection = format!("extents ({e})");
            }
        }
    }
    sel.bulk_blocks = extents::extent_blocks(&sel.runs);
    Ok(sel)
}

/// Appends to `out` the runs of `first..first + count` the file system
/// uses; blocks past its end all count.
fn intersect_used(fs: &ext4::FsUsage, first: u64, count: u64, out: &mut Vec<(u64, u64)>) {
    let used = |b: u64| b >= fs.fs_image_blocks || fs.used[(b / 64) as usize] >> (b % 64) & 1 == 1;
    let end = first + count;
    let mut b = first;
    while b < end {
        while b < end && !used(b) {
            b += 1;
        }
        let start = b;
        while b < end && used(b) {
            b += 1;
        }
        if b > start {
            out.push((start, b - start));
        }
    }
}
