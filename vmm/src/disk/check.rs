//! The oracle of the guest's disk writes.
//!
//! The guest keeps a version table in its RAM (u32 per block of its write
//! window, at `Layout::disk_table_gpa`): entry w counts the writes of disk
//! block `window_first_block + w`. A block at version v >= 1 must hold
//! [`expected_block`]`(block, v)`: the stamp of a random-kind page numbered
//! by the block, with the magic "FRRYBLCK" (see [`crate::oracle`]). Version
//! 0 means the guest never wrote the block; it holds whatever the image had
//! and is not checked.
//!
//! The table migrates with guest memory and the blocks with the disk, so a
//! target checks what it received against what the guest wrote without
//! trusting ferry: a lost, stale, torn or misplaced block fails.

use vm_memory::VolatileSlice;

use super::image::{BlockIndex, BlockRead, BLOCK_BYTES};
use crate::abi;
use crate::layout::Layout;
use crate::oracle::{expected_block, FAULTS_KEPT};

/// Why a block failed its check.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockFault {
    /// The header is not the stamp of this block at the table's version.
    #[error("disk block {block}: bad header (table version {version}): {what}")]
    Header {
        /// Disk block index.
        block: u64,
        /// Version from the table.
        version: u32,
        /// What is wrong.
        what: &'static str,
    },
    /// The header is right but the body differs from the generator.
    #[error("disk block {block} (version {version}): body differs at byte {offset}")]
    Body {
        /// Disk block index.
        block: u64,
        /// Version.
        version: u32,
        /// First differing byte.
        offset: usize,
    },
    /// The block could not be read.
    #[error("disk block {block} (version {version}): {message}")]
    Read {
        /// Disk block index.
        block: u64,
        /// Version.
        version: u32,
        /// The read error.
        message: String,
    },
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Checks disk block `block` against its table version (>= 1). `scratch`
/// is reused for the expected content.
pub fn check_block(
    block: u64,
    version: u32,
    bytes: &[u8; BLOCK_BYTES],
    scratch: &mut [u8; BLOCK_BYTES],
) -> Result<(), BlockFault> {
    assert!(version >= 1, "version 0 blocks are not checked");
    let header = |what| BlockFault::Header {
        block,
        version,
        what,
    };
    if u64_at(bytes, 0) != abi::BLOCK_MAGIC {
        return Err(header("no magic"));
    }
    if u64_at(bytes, 8) != block {
        return Err(header("wrong block number"));
    }
    let ver_kind = u64_at(bytes, 16);
    if ver_kind as u32 != version {
        return Err(header("version differs from the table"));
    }
    if ver_kind >> 32 != abi::KIND_RANDOM {
        return Err(header("kind is not random"));
    }
    expected_block(block, version, scratch);
    match bytes.iter().zip(scratch.iter()).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(offset) if offset < abi::HEADER_BYTES as usize => Err(header("bad seed or padding")),
        Some(offset) => Err(BlockFault::Body {
            block,
            version,
            offset,
        }),
    }
}

/// Result of [`check_disk`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskCheckReport {
    /// Blocks checked: those of the window with a version above 0.
    pub blocks_checked: u64,
    /// Blocks that failed.
    pub blocks_bad: u64,
    /// The first few failures, for the log.
    pub first_faults: Vec<BlockFault>,
}

/// Reads the disk version table of `layout` out of `mem` (empty without one).
pub fn read_disk_versions(mem: &VolatileSlice, layout: &Layout) -> Vec<u32> {
    let mut raw = vec![0u8; layout.disk_table_blocks as usize * 4];
    if raw.is_empty() {
        return Vec::new();
    }
    mem.subslice(layout.disk_table_gpa as usize, raw.len())
        .expect("layout fits memory")
        .copy_to(&mut raw[..]);
    raw.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

/// Checks every block of the window starting at `first_block` whose entry
/// in `versions` is above 0. A read error counts the block as bad.
pub fn check_disk(disk: &impl BlockRead, first_block: u64, versions: &[u32]) -> DiskCheckReport {
    let mut report = DiskCheckReport::default();
    let mut buf = Box::new([0u8; BLOCK_BYTES]);
    let mut scratch = Box::new([0u8; BLOCK_BYTES]);
    for (w, &version) in versions.iter().enumerate() {
        if version == 0 {
            continue;
        }
        let block = first_block + w as u64;
        report.blocks_checked += 1;
        let r = match disk.read_block(BlockIndex(block), &mut buf) {
            Ok(()) => check_block(block, version, &buf, &mut scratch),
            Err(e) => Err(BlockFault::Read {
                block,
                version,
                message: e.to_string(),
            }),
        };
        if let Err(fault) = r {
            report.blocks_bad += 1;
            if report.first_faults.len() < FAULTS_KEPT {
                report.first_faults.push(fault);
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::image::{BlockWrite, BrokenDisk, MemDisk};
    use crate::oracle::{expected_page, mix, slot_of};

    const HEADER: usize = abi::HEADER_BYTES as usize;
    const SLOT: usize = abi::SLOT_BYTES as usize;

    #[test]
    fn a_block_is_a_random_page_stamp_with_its_own_magic() {
        let (mut block, mut page) = ([0u8; BLOCK_BYTES], [0u8; BLOCK_BYTES]);
        for (b, v) in [(0u64, 1u32), (12345, 2), (1 << 30, 77)] {
            expected_block(b, v, &mut block);
            expected_page(b, v, abi::KIND_RANDOM, &mut page);
            assert_eq!(&block[..8], b"FRRYBLCK");
            assert_eq!(block[8..], page[8..], "block {b} v{v}");
        }
    }

    #[test]
    fn a_rewrite_changes_the_header_and_one_slot() {
        let (mut old, mut new) = ([0u8; BLOCK_BYTES], [0u8; BLOCK_BYTES]);
        for v in 2..=40u32 {
            expected_block(99, v - 1, &mut old);
            expected_block(99, v, &mut new);
            let s = slot_of(v).expect("a rewrite");
            let slot = HEADER + s * SLOT..HEADER + (s + 1) * SLOT;
            let changed: Vec<usize> = (0..BLOCK_BYTES).filter(|&i| old[i] != new[i]).collect();
            assert!(
                changed
                    .iter()
                    .all(|&i| (16..32).contains(&i) || slot.contains(&i)),
                "v {v}: bytes outside the header and slot {s} changed"
            );
            assert!(changed.len() >= 230, "v {v}: {} bytes", changed.len());
        }
    }

    #[test]
    fn check_block_accepts_stamps_and_rejects_damage() {
        let (mut b, mut older, mut scratch) =
            ([0u8; BLOCK_BYTES], [0u8; BLOCK_BYTES], [0u8; BLOCK_BYTES]);
        expected_block(500, 9, &mut b);
        assert_eq!(check_block(500, 9, &b, &mut scratch), Ok(()));
        let header = |r| matches!(r, Err(BlockFault::Header { .. }));
        assert!(header(check_block(500, 8, &b, &mut scratch)), "stale table");
        assert!(header(check_block(501, 9, &b, &mut scratch)), "wrong block");
        // Stale: the image kept version 8.
        expected_block(500, 8, &mut older);
        assert!(header(check_block(500, 9, &older, &mut scratch)));
        // Torn: the new header over the old slot.
        let s = slot_of(9).unwrap();
        let slot = HEADER + s * SLOT..HEADER + (s + 1) * SLOT;
        let mut torn = b;
        torn[slot.clone()].copy_from_slice(&older[slot.clone()]);
        assert!(matches!(
            check_block(500, 9, &torn, &mut scratch),
            Err(BlockFault::Body { offset, .. }) if slot.contains(&offset)
        ));
        // A memory page stamp is not a block stamp.
        expected_page(500, 9, abi::KIND_RANDOM, &mut older);
        assert!(header(check_block(500, 9, &older, &mut scratch)));
        // One flipped bit in the tail.
        let mut flipped = b;
        flipped[4095] ^= 0x10;
        assert!(matches!(
            check_block(500, 9, &flipped, &mut scratch),
            Err(BlockFault::Body { offset: 4095, .. })
        ));
        // Zeros: never written as far as the image knows.
        assert!(header(check_block(500, 9, &[0; BLOCK_BYTES], &mut scratch)));
    }

    /// A disk written the way the guest writes it passes; the blocks a bad
    /// migration damaged are found; unwritten blocks are not looked at.
    #[test]
    fn check_disk_finds_damaged_blocks_and_skips_unwritten_ones() {
        let (first, window) = (16u64, 200usize);
        let disk = MemDisk::new(first + window as u64);
        let mut versions = vec![0u32; window];
        let mut x = 3u64;
        let mut buf = [0u8; BLOCK_BYTES];
        for _ in 0..3000 {
            x = mix(x.wrapping_add(abi::GOLDEN));
            let w = (x % 150) as usize; // blocks 150.. stay unwritten
            versions[w] += 1;
            expected_block(first + w as u64, versions[w], &mut buf);
            disk.write_block(BlockIndex(first + w as u64), &buf)
                .unwrap();
        }
        // Junk outside the window and in unwritten blocks is not checked.
        disk.write_block(BlockIndex(0), &[0xee; BLOCK_BYTES])
            .unwrap();
        disk.write_block(BlockIndex(first + 180), &[0xee; BLOCK_BYTES])
            .unwrap();
        let r = check_disk(&disk, first, &versions);
        let stamped = versions.iter().filter(|&&v| v > 0).count() as u64;
        assert_eq!(
            (r.blocks_checked, r.blocks_bad),
            (stamped, 0),
            "{:?}",
            r.first_faults
        );
        assert!(stamped > 140);

        // Block a loses its last write; block b is moved to b + 1.
        let a = (0..150).find(|&w| versions[w] > 2).unwrap();
        expected_block(first + a as u64, versions[a] - 1, &mut buf);
        disk.write_block(BlockIndex(first + a as u64), &buf)
            .unwrap();
        let b = (a + 1..149)
            .find(|&w| versions[w] > 0 && versions[w + 1] > 0)
            .unwrap();
        disk.read_block(BlockIndex(first + b as u64), &mut buf)
            .unwrap();
        disk.write_block(BlockIndex(first + b as u64 + 1), &buf)
            .unwrap();
        let r = check_disk(&disk, first, &versions);
        assert_eq!(r.blocks_bad, 2, "{:?}", r.first_faults);
        assert!(
            matches!(r.first_faults[0], BlockFault::Header { block, .. } if block == first + a as u64)
        );
        assert!(
            matches!(r.first_faults[1], BlockFault::Header { block, what: "wrong block number", .. } if block == first + b as u64 + 1)
        );
    }

    #[test]
    fn unreadable_blocks_are_bad() {
        let r = check_disk(&BrokenDisk { blocks: 8 }, 2, &[0, 1, 0, 4]);
        assert_eq!((r.blocks_checked, r.blocks_bad), (2, 2));
        assert!(matches!(
            r.first_faults[0],
            BlockFault::Read { block: 3, .. }
        ));
        assert!(r.first_faults[1].to_string().contains("disk block 5"));
    }
}
