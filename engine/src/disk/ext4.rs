//! The blocks an ext2/3/4 file system in a raw image marks used, read from its
//! block-group bitmaps (`--disk-fs-aware`).
//!
//! The bulk phase intersects this with the image's allocated
//! [extents](super::extents): a block the file system freed (a deleted file)
//! still has storage in the image but need not travel. Anything this module
//! does not understand is an error, and the caller falls back to extents
//! alone, logging the error as the reason.
//!
//! ```text
//!  fs block      0 (4 KiB) / 1 (1 KiB)     first_data_block + 1
//!  byte 0   1024 |                          |
//!  [boot  ][superblock][.....][group descriptor table][reserved GDT]
//!
//!  group g = [first_data_block + g * blocks_per_group, + blocks_per_group)
//!  [backup superblock + GDT (sparse_super: g = 0, 1, powers of 3, 5, 7)]
//!  [block bitmap][inode bitmap][inode table]  (flex_bg: packed in the first
//!  [data ...........................]         group of each flex group)
//!
//!  descriptor (32 bytes, or s_desc_size >= 64 with the 64bit feature):
//!  0x00 block bitmap  0x04 inode bitmap  0x08 inode table  0x0C free blocks
//!  0x12 flags (0x2 BLOCK_UNINIT)  0x18 bitmap csum  0x1E descriptor csum
//!  0x20.. the high halves of the same fields (64bit)
//! ```
//!
//! Everything is read with `pread` (the file's offset does not move) and
//! nothing is ever written. Every number from the image is checked before it
//! sizes an allocation or indexes anything: the file system must fit in the
//! image, which must fit in [`DISK_BYTES_MAX`], and allocations are the `used`
//! bitmap (1 bit per image block) plus three file-system blocks of buffer.
//!
//! **BLOCK_UNINIT groups** have no bitmap on disk; their free space is implied.
//! This module computes their used blocks the way e2fsprogs does
//! (`ext2fs_reserve_super_and_bgd` plus the group's own bitmaps and inode
//! table), which is a superset of what the kernel's `ext4_init_block_bitmap`
//! marks, and the tests check the result against `dumpe2fs`. They are counted
//! in [`FsUsage::uninit_groups`].
//!
//! Checksums are verified where the file system has them (superblock, group
//! descriptors, block bitmaps with `metadata_csum`; descriptors with
//! `gdt_csum`), and each initialised group's bitmap must agree with its
//! descriptor's free-block count.
//!
//! Refused (Unsupported): a file system that is mounted or was not cleanly
//! unmounted (its bitmaps may be stale: `needs_recovery`, or `s_state` without
//! "valid" or with "errors"), bigalloc, snapshots, compression, a journal
//! device, block sizes other than 1, 2 and 4 KiB, and any feature bit this
//! module does not know.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::link::{DISK_BLOCK_BYTES, DISK_BYTES_MAX};

/// Where the primary superblock starts, whatever the block size.
const SUPERBLOCK_OFFSET_BYTES: u64 = 1024;
const SUPERBLOCK_BYTES: usize = 1024;
const MAGIC: u16 = 0xEF53;

/// Block sizes handled: 1024 << 0..=2. Larger ones would put several image
/// blocks in one fs block, which the marking below does not do.
const LOG_BLOCK_SIZE_MAX: u32 = 2;
const _: () = assert!(1024 << LOG_BLOCK_SIZE_MAX == DISK_BLOCK_BYTES);

/// mke2fs refuses fewer blocks per group; the bitmap of one block caps it at
/// 8 * block size. With 256, a 1 TiB image of 1 KiB blocks has 4 Mi groups.
const BLOCKS_PER_GROUP_MIN: u64 = 256;

const STATE_VALID_FS: u16 = 0x1;
const STATE_ERROR_FS: u16 = 0x2;

const COMPAT_SPARSE_SUPER2: u32 = 0x200;

const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_MMP: u32 = 0x100;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_EA_INODE: u32 = 0x400;
const INCOMPAT_DIRDATA: u32 = 0x1000;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const INCOMPAT_CASEFOLD: u32 = 0x20000;
/// Incompatible features that do not change where blocks are or how the
/// bitmaps say so.
const INCOMPAT_HANDLED: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_DIRDATA
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD;

const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_BTREE_DIR: u32 = 0x4;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_GDT_CSUM: u32 = 0x10;
const RO_COMPAT_DIR_NLINK: u32 = 0x20;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;
const RO_COMPAT_HAS_SNAPSHOT: u32 = 0x80;
const RO_COMPAT_QUOTA: u32 = 0x100;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const RO_COMPAT_READONLY: u32 = 0x1000;
const RO_COMPAT_PROJECT: u32 = 0x2000;
const RO_COMPAT_SHARED_BLOCKS: u32 = 0x4000;
const RO_COMPAT_VERITY: u32 = 0x8000;
const RO_COMPAT_ORPHAN_PRESENT: u32 = 0x10000;
/// Read-only-compatible features that do not change block allocation. Not
/// snapshots, bigalloc, nor replica (0x800) or any bit not named here.
const RO_COMPAT_HANDLED: u32 = RO_COMPAT_SPARSE_SUPER
    | RO_COMPAT_LARGE_FILE
    | RO_COMPAT_BTREE_DIR
    | RO_COMPAT_HUGE_FILE
    | RO_COMPAT_GDT_CSUM
    | RO_COMPAT_DIR_NLINK
    | RO_COMPAT_EXTRA_ISIZE
    | RO_COMPAT_QUOTA
    | RO_COMPAT_METADATA_CSUM
    | RO_COMPAT_READONLY
    | RO_COMPAT_PROJECT
    | RO_COMPAT_SHARED_BLOCKS
    | RO_COMPAT_VERITY
    | RO_COMPAT_ORPHAN_PRESENT;

/// s_checksum_type for crc32c, the only one defined.
const CHECKSUM_TYPE_CRC32C: u8 = 1;

const DESC_BYTES_MIN: usize = 32;
const DESC_BYTES_MIN_64BIT: usize = 64;
const DESC_BYTES_MAX: usize = 1024;
/// The high half of the block bitmap checksum ends here; shorter descriptors
/// keep only the low 16 bits.
const DESC_BITMAP_CSUM_HI_END: usize = 0x3A;
const DESC_CHECKSUM_AT: usize = 0x1E;
const BG_BLOCK_UNINIT: u16 = 0x2;

/// Blocks an ext2/3/4 file system in a raw image marks used, in 4 KiB image blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsUsage {
    /// Image blocks (4 KiB) the file system spans: [0, fs_image_blocks).
    /// Blocks of the image past it are not the file system's: the caller
    /// copies them by extents.
    pub fs_image_blocks: u64,
    /// Bit i set: image block i (< fs_image_blocks) holds used fs data or
    /// metadata. u64 words, little-endian bit order (bit i of word i/64),
    /// length fs_image_blocks.div_ceil(64). An image block is used if any of
    /// its fs blocks is; a last image block the file system covers only in
    /// part is always used (the rest of it is not the file system's).
    pub used: Vec<u64>,
    /// File system block size in bytes (1024, 2048 or 4096).
    pub block_size: u32,
    /// Block groups.
    pub groups: u64,
    /// Groups flagged BLOCK_UNINIT, whose used blocks were computed rather
    /// than read (see the module documentation).
    pub uninit_groups: u64,
    /// Used image blocks (popcount of `used`).
    pub used_blocks: u64,
}

impl FsUsage {
    /// Whether image block `image_block` holds used fs data or metadata;
    /// false past the file system.
    pub fn is_used(&self, image_block: u64) -> bool {
        image_block < self.fs_image_blocks
            && self.used[(image_block / 64) as usize] & (1 << (image_block % 64)) != 0
    }
}

/// Why the bitmaps of an image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// Reading the image failed.
    #[error("reading the file system's metadata from the image failed: {0}")]
    Io(#[from] std::io::Error),
    /// No ext2/3/4 superblock (no magic, image too small).
    #[error("the image holds no ext2/3/4 file system: {0}")]
    NotExt4(String),
    /// A feature or state whose bitmaps this module does not read.
    #[error("the ext2/3/4 file system is not one whose bitmaps ferry reads: {0}")]
    Unsupported(String),
    /// Metadata that contradicts itself or the image.
    #[error("the ext2/3/4 file system's metadata is inconsistent: {0}")]
    Corrupt(String),
}

use Ext4Error::{Corrupt, NotExt4, Unsupported};

/// Reads the superblock (offset 1024), the group descriptor table (32- or
/// 64-byte descriptors, 64bit feature; meta_bg placement too) and every
/// group's block bitmap, read-only (pread; never write), and returns the
/// 4 KiB image blocks the file system uses.
pub fn used_blocks(file: &File) -> Result<FsUsage, Ext4Error> {
    let image_bytes = super::extents::image_bytes(file)?;
    if image_bytes < SUPERBLOCK_OFFSET_BYTES + SUPERBLOCK_BYTES as u64 {
        return Err(NotExt4(format!(
            "an image of {image_bytes} bytes is too small to hold a superblock"
        )));
    }
    let mut sb = [0u8; SUPERBLOCK_BYTES];
    file.read_exact_at(&mut sb, SUPERBLOCK_OFFSET_BYTES)?;
    let geo = Geometry::parse(&sb, image_bytes)?;

    let mut marks = Marks::new(&geo);
    let mut desc_block = vec![0u8; geo.block_bytes as usize];
    let mut bitmap = Bitmap::new(geo.block_bytes);
    let mut uninit_groups = 0;
    for index in 0..geo.desc_blocks {
        let at = geo.desc_block_location(index);
        geo.read_block(file, at, &mut desc_block, "group descriptor block")?;
        let groups = index * geo.descs_per_block..geo.groups.min((index + 1) * geo.descs_per_block);
        for (group, raw) in groups.zip(desc_block.chunks_exact(geo.desc_bytes)) {
            let desc = geo.parse_desc(group, raw)?;
            if desc.uninit {
                uninit_groups += 1;
            } else {
                geo.read_block(file, desc.block_bitmap, bitmap.bytes_mut(), "block bitmap")?;
                geo.check_bitmap(group, &desc, bitmap.bytes_mut())?;
                mark_bitmap(&geo, group, &desc, &mut bitmap, &mut marks)?;
            }
            // What e2fsprogs marks for a BLOCK_UNINIT group; for an
            // initialised one, the bitmap already says so.
            geo.mark_super_and_descriptors(group, &mut marks);
            marks.mark(desc.block_bitmap, desc.block_bitmap + 1);
            marks.mark(desc.inode_bitmap, desc.inode_bitmap + 1);
            marks.mark(desc.inode_table, desc.inode_table + geo.inode_table_blocks);
        }
    }
    Ok(marks.finish(&geo, uninit_groups))
}

/// What the superblock says about where things are, checked.
#[derive(Debug)]
struct Geometry {
    /// 1024, 2048 or 4096.
    block_bytes: u64,
    /// log2(DISK_BLOCK_BYTES / block_bytes): fs block >> this = image block.
    image_shift: u32,
    /// s_blocks_count: the file system is fs blocks [0, blocks).
    blocks: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    groups: u64,
    desc_bytes: usize,
    descs_per_block: u64,
    desc_blocks: u64,
    inode_table_blocks: u64,
    reserved_gdt_blocks: u64,
    /// s_first_meta_bg, with the meta_bg feature.
    first_meta_bg: Option<u64>,
    backups: Backups,
    checksum: Checksum,
}

/// Which groups hold a superblock backup (and, without meta_bg, a GDT copy).
#[derive(Debug)]
enum Backups {
    All,
    /// sparse_super: 0, 1 and powers of 3, 5 and 7.
    Sparse,
    /// sparse_super2: 0 and the two groups named in s_backup_bgs.
    Two([u64; 2]),
}

#[derive(Debug)]
enum Checksum {
    None,
    /// gdt_csum: crc16 over uuid, group number and descriptor.
    Crc16 {
        uuid: [u8; 16],
    },
    /// metadata_csum: crc32c from this seed.
    Crc32c {
        seed: u32,
    },
}

/// One group's descriptor, locations checked to lie inside the file system.
#[derive(Debug)]
struct Desc {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    free_blocks: u64,
    /// BLOCK_UNINIT and a checksum feature to make the flag count (without
    /// one, e2fsprogs and the kernel ignore it and read the bitmap).
    uninit: bool,
    bitmap_csum: u32,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Geometry {
    fn parse(sb: &[u8; SUPERBLOCK_BYTES], image_bytes: u64) -> Result<Self, Ext4Error> {
        let magic = le16(sb, 0x38);
        if magic != MAGIC {
            return Err(NotExt4(format!(
                "superblock magic is {magic:#06x}, not {MAGIC:#06x}"
            )));
        }
        let compat = le32(sb, 0x5C);
        let incompat = le32(sb, 0x60);
        let ro_compat = le32(sb, 0x64);
        let uuid: [u8; 16] = std::array::from_fn(|i| sb[0x68 + i]);

        let checksum = if ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
            let kind = sb[0x175];
            if kind != CHECKSUM_TYPE_CRC32C {
                return Err(Unsupported(format!(
                    "metadata checksum type {kind} is not crc32c"
                )));
            }
            let stored = le32(sb, 0x3FC);
            let computed = ext4_crc32c(!0, &sb[..0x3FC]);
            if stored != computed {
                return Err(Corrupt(format!(
                    "superblock checksum is {stored:#010x}, its contents give {computed:#010x}"
                )));
            }
            let seed = if incompat & INCOMPAT_CSUM_SEED != 0 {
                le32(sb, 0x270)
            } else {
                ext4_crc32c(!0, &uuid)
            };
            Checksum::Crc32c { seed }
        } else if ro_compat & RO_COMPAT_GDT_CSUM != 0 {
            Checksum::Crc16 { uuid }
        } else {
            Checksum::None
        };

        let rev_level = le32(sb, 0x4C);
        if rev_level > 1 {
            return Err(Unsupported(format!("revision level {rev_level}")));
        }
        check_features(incompat, ro_compat)?;
        let state = le16(sb, 0x3A);
        if state & STATE_VALID_FS == 0 || state & STATE_ERROR_FS != 0 {
            return Err(Unsupported(format!(
                "its state is {state:#x}: mounted, not cleanly unmounted or with errors, so the bitmaps may be stale"
            )));
        }

        let log_block_size = le32(sb, 0x18);
        if log_block_size > LOG_BLOCK_SIZE_MAX {
            return Err(Unsupported(format!(
                "block size 1024 << {log_block_size}: only 1, 2 and 4 KiB are handled"
            )));
        }
        let log_cluster_size = le32(sb, 0x1C);
        if log_cluster_size != log_block_size {
            return Err(Corrupt(format!(
                "cluster size 1024 << {log_cluster_size} differs from block size 1024 << {log_block_size} without bigalloc"
            )));
        }
        let block_bytes = 1024u64 << log_block_size;
        let first_data_block = u64::from(le32(sb, 0x14));
        let expected_first = u64::from(block_bytes == 1024);
        if first_data_block != expected_first {
            return Err(Corrupt(format!(
                "first data block is {first_data_block}, not {expected_first} for {block_bytes}-byte blocks"
            )));
        }

        let is_64bit = incompat & INCOMPAT_64BIT != 0;
        let blocks_hi = if is_64bit {
            u64::from(le32(sb, 0x150))
        } else {
            0
        };
        let blocks = blocks_hi << 32 | u64::from(le32(sb, 0x4));
        if blocks <= first_data_block {
            return Err(Corrupt(format!(
                "block count {blocks} leaves no blocks for groups"
            )));
        }
        // Saturating: an absurd count only has to compare as too large.
        let fs_bytes = blocks.saturating_mul(block_bytes);
        if fs_bytes > image_bytes {
            return Err(Corrupt(format!(
                "the file system of {blocks} blocks of {block_bytes} bytes is larger than the image of {image_bytes} bytes"
            )));
        }
        if fs_bytes > DISK_BYTES_MAX {
            return Err(Unsupported(format!(
                "the file system of {fs_bytes} bytes is larger than the {DISK_BYTES_MAX} bytes a disk may have"
            )));
        }

        let blocks_per_group = u64::from(le32(sb, 0x20));
        let clusters_per_group = u64::from(le32(sb, 0x24));
        let bits_per_bitmap = 8 * block_bytes;
        if !(BLOCKS_PER_GROUP_MIN..=bits_per_bitmap).contains(&blocks_per_group)
            || !blocks_per_group.is_multiple_of(8)
        {
            return Err(Corrupt(format!(
                "{blocks_per_group} blocks per group: must be a multiple of 8 in {BLOCKS_PER_GROUP_MIN}..={bits_per_bitmap}"
            )));
        }
        if clusters_per_group != blocks_per_group {
            return Err(Corrupt(format!(
                "{clusters_per_group} clusters per group differ from {blocks_per_group} blocks per group without bigalloc"
            )));
        }
        let groups = (blocks - first_data_block).div_ceil(blocks_per_group);

        let inodes_per_group = u64::from(le32(sb, 0x28));
        let inode_bytes = if rev_level == 0 {
            128
        } else {
            u64::from(le16(sb, 0x58))
        };
        if !inode_bytes.is_power_of_two() || !(128..=block_bytes).contains(&inode_bytes) {
            return Err(Corrupt(format!("inode size {inode_bytes}")));
        }
        if inodes_per_group == 0 || inodes_per_group > bits_per_bitmap {
            return Err(Corrupt(format!("{inodes_per_group} inodes per group")));
        }
        let inodes = u64::from(le32(sb, 0x0));
        if inodes != inodes_per_group * groups {
            return Err(Corrupt(format!(
                "{inodes} inodes are not {inodes_per_group} per group in {groups} groups"
            )));
        }
        let inode_table_blocks = (inodes_per_group * inode_bytes).div_ceil(block_bytes);

        let desc_bytes = if is_64bit {
            let size = usize::from(le16(sb, 0xFE));
            if !size.is_power_of_two()
                || !(DESC_BYTES_MIN_64BIT..=DESC_BYTES_MAX).contains(&size)
                || size as u64 > block_bytes
            {
                return Err(Corrupt(format!(
                    "group descriptor size {size} with the 64bit feature"
                )));
            }
            size
        } else {
            DESC_BYTES_MIN
        };
        let descs_per_block = block_bytes / desc_bytes as u64;
        let desc_blocks = groups.div_ceil(descs_per_block);

        let reserved_gdt_blocks = u64::from(le16(sb, 0xCE));
        if reserved_gdt_blocks > block_bytes / 4 {
            return Err(Corrupt(format!(
                "{reserved_gdt_blocks} reserved GDT blocks"
            )));
        }
        let first_meta_bg = if incompat & INCOMPAT_META_BG != 0 {
            let first = u64::from(le32(sb, 0x104));
            if first > desc_blocks {
                return Err(Corrupt(format!(
                    "first meta block group {first} is past the {desc_blocks} descriptor blocks"
                )));
            }
            Some(first)
        } else {
            None
        };
        let backups = if compat & COMPAT_SPARSE_SUPER2 != 0 {
            Backups::Two([u64::from(le32(sb, 0x24C)), u64::from(le32(sb, 0x250))])
        } else if ro_compat & RO_COMPAT_SPARSE_SUPER != 0 {
            Backups::Sparse
        } else {
            Backups::All
        };

        Ok(Self {
            block_bytes,
            image_shift: LOG_BLOCK_SIZE_MAX - log_block_size,
            blocks,
            first_data_block,
            blocks_per_group,
            groups,
            desc_bytes,
            descs_per_block,
            desc_blocks,
            inode_table_blocks,
            reserved_gdt_blocks,
            first_meta_bg,
            backups,
            checksum,
        })
    }

    fn group_first_block(&self, group: u64) -> u64 {
        debug_assert!(group < self.groups);
        self.first_data_block + group * self.blocks_per_group
    }

    /// Blocks of `group`: all but the last group are full.
    fn group_blocks(&self, group: u64) -> u64 {
        (self.blocks - self.group_first_block(group)).min(self.blocks_per_group)
    }

    /// e2fsprogs' `ext2fs_bg_has_super`.
    fn has_super(&self, group: u64) -> bool {
        fn is_power_of(mut n: u64, base: u64) -> bool {
            // As test_root: 1 = base^0 does not count (groups 0, 1 are special cased).
            while n >= base {
                if n == base {
                    return true;
                }
                if !n.is_multiple_of(base) {
                    return false;
                }
                n /= base;
            }
            false
        }
        match self.backups {
            _ if group == 0 => true,
            Backups::All => true,
            Backups::Two(groups) => groups.contains(&group),
            Backups::Sparse => {
                group == 1
                    || (group % 2 == 1
                        && (is_power_of(group, 3)
                            || is_power_of(group, 5)
                            || is_power_of(group, 7)))
            }
        }
    }

    /// Descriptor blocks kept in the old layout, right after each superblock.
    fn old_desc_blocks(&self) -> u64 {
        match self.first_meta_bg {
            Some(first) => first,
            None => self.desc_blocks + self.reserved_gdt_blocks,
        }
    }

    /// Where descriptor block `index` of the primary table is (the kernel's
    /// `descriptor_loc`): after the superblock, or with meta_bg, in the first
    /// group of its meta group, after that group's superblock backup if any.
    fn desc_block_location(&self, index: u64) -> u64 {
        debug_assert!(index < self.desc_blocks);
        match self.first_meta_bg {
            Some(first) if index >= first => {
                let group = index * self.descs_per_block;
                self.group_first_block(group) + u64::from(self.has_super(group))
            }
            _ => self.first_data_block + 1 + index,
        }
    }

    /// e2fsprogs' `ext2fs_reserve_super_and_bgd` for one group: its
    /// superblock backup, GDT copy and reserved GDT, or its meta_bg
    /// descriptor block.
    fn mark_super_and_descriptors(&self, group: u64, marks: &mut Marks) {
        let first = self.group_first_block(group);
        let has_super = self.has_super(group);
        if has_super {
            marks.mark(first, first + 1);
        }
        let meta_group = group / self.descs_per_block;
        match self.first_meta_bg {
            Some(first_meta_bg) if meta_group >= first_meta_bg => {
                let in_meta = group % self.descs_per_block;
                if in_meta == 0 || in_meta == 1 || in_meta == self.descs_per_block - 1 {
                    let at = first + u64::from(has_super);
                    marks.mark(at, (at + 1).min(self.blocks));
                }
            }
            _ if has_super => {
                let at = first + 1;
                marks.mark(
                    at.min(self.blocks),
                    (at + self.old_desc_blocks()).min(self.blocks),
                );
            }
            _ => {}
        }
    }

    /// Reads fs block `block` into `buf` (one block long), after checking it
    /// lies inside the file system (and so inside the image).
    fn read_block(
        &self,
        file: &File,
        block: u64,
        buf: &mut [u8],
        what: &str,
    ) -> Result<(), Ext4Error> {
        debug_assert_eq!(buf.len() as u64, self.block_bytes);
        if block >= self.blocks {
            return Err(Corrupt(format!(
                "{what} at block {block} is past the {} blocks",
                self.blocks
            )));
        }
        file.read_exact_at(buf, block * self.block_bytes)?;
        Ok(())
    }

    fn parse_desc(&self, group: u64, raw: &[u8]) -> Result<Desc, Ext4Error> {
        debug_assert_eq!(raw.len(), self.desc_bytes);
        self.check_desc_checksum(group, raw)?;
        let wide = self.desc_bytes >= DESC_BYTES_MIN_64BIT;
        let field = |lo: usize, hi: usize| {
            let high = if wide { u64::from(le32(raw, hi)) } else { 0 };
            high << 32 | u64::from(le32(raw, lo))
        };
        let free_hi = if wide { u64::from(le16(raw, 0x2C)) } else { 0 };
        let bitmap_csum_hi = if self.desc_bytes >= DESC_BITMAP_CSUM_HI_END {
            le16(raw, 0x38)
        } else {
            0
        };
        let flags = le16(raw, 0x12);
        let desc = Desc {
            block_bitmap: field(0x0, 0x20),
            inode_bitmap: field(0x4, 0x24),
            inode_table: field(0x8, 0x28),
            free_blocks: free_hi << 16 | u64::from(le16(raw, 0xC)),
            uninit: flags & BG_BLOCK_UNINIT != 0 && !matches!(self.checksum, Checksum::None),
            bitmap_csum: u32::from(bitmap_csum_hi) << 16 | u32::from(le16(raw, 0x18)),
        };
        // Inside the file system and not on the primary superblock (the
        // kernel's ext4_check_descriptors); flex_bg may put them in any group.
        let inside = |what: &str, first: u64, count: u64| {
            if first <= self.first_data_block || first.saturating_add(count) > self.blocks {
                return Err(Corrupt(format!(
                    "group {group}'s {what} at block {first} (+{count}) is outside blocks {}..{}",
                    self.first_data_block + 1,
                    self.blocks
                )));
            }
            Ok(())
        };
        inside("block bitmap", desc.block_bitmap, 1)?;
        inside("inode bitmap", desc.inode_bitmap, 1)?;
        inside("inode table", desc.inode_table, self.inode_table_blocks)?;
        Ok(desc)
    }

    fn check_desc_checksum(&self, group: u64, raw: &[u8]) -> Result<(), Ext4Error> {
        // Group numbers are 32-bit on disk; the checksum covers them so.
        // (Fewer than 2^30 groups: the file system fits in DISK_BYTES_MAX.)
        debug_assert!(group <= u64::from(u32::MAX));
        let group_le = (group as u32).to_le_bytes();
        let rest = &raw[DESC_CHECKSUM_AT + 2..];
        let computed = match self.checksum {
            Checksum::None => return Ok(()),
            Checksum::Crc32c { seed } => {
                let crc = ext4_crc32c(seed, &group_le);
                let crc = ext4_crc32c(crc, &raw[..DESC_CHECKSUM_AT]);
                let crc = ext4_crc32c(crc, &[0, 0]);
                (ext4_crc32c(crc, rest) & 0xFFFF) as u16
            }
            Checksum::Crc16 { uuid } => {
                let crc = crc16(!0, &uuid);
                let crc = crc16(crc, &group_le);
                let crc = crc16(crc, &raw[..DESC_CHECKSUM_AT]);
                crc16(crc, rest)
            }
        };
        let stored = le16(raw, DESC_CHECKSUM_AT);
        if stored != computed {
            return Err(Corrupt(format!(
                "group {group}'s descriptor checksum is {stored:#06x}, its contents give {computed:#06x}"
            )));
        }
        Ok(())
    }

    /// metadata_csum's bitmap checksum covers blocks_per_group bits.
    fn check_bitmap(&self, group: u64, desc: &Desc, bitmap: &[u8]) -> Result<(), Ext4Error> {
        let Checksum::Crc32c { seed } = self.checksum else {
            return Ok(());
        };
        let mut computed = ext4_crc32c(seed, &bitmap[..(self.blocks_per_group / 8) as usize]);
        if self.desc_bytes < DESC_BITMAP_CSUM_HI_END {
            computed &= 0xFFFF;
        }
        if computed != desc.bitmap_csum {
            return Err(Corrupt(format!(
                "group {group}'s block bitmap checksum is {:#010x}, the bitmap gives {computed:#010x}",
                desc.bitmap_csum
            )));
        }
        Ok(())
    }
}

fn check_features(incompat: u32, ro_compat: u32) -> Result<(), Ext4Error> {
    if incompat & INCOMPAT_RECOVER != 0 {
        return Err(Unsupported(
            "needs_recovery is set: the journal holds updates not yet written to the bitmaps (mounted, or not cleanly unmounted), so they may be stale".into(),
        ));
    }
    if incompat & INCOMPAT_JOURNAL_DEV != 0 {
        return Err(Unsupported(
            "the image is an external journal device".into(),
        ));
    }
    if incompat & INCOMPAT_COMPRESSION != 0 {
        return Err(Unsupported("the compression feature".into()));
    }
    if ro_compat & RO_COMPAT_BIGALLOC != 0 {
        return Err(Unsupported(
            "bigalloc: the bitmaps count clusters, not blocks".into(),
        ));
    }
    if ro_compat & RO_COMPAT_HAS_SNAPSHOT != 0 {
        return Err(Unsupported("snapshots (has_snapshot)".into()));
    }
    let unknown = incompat & !INCOMPAT_HANDLED;
    if unknown != 0 {
        return Err(Unsupported(format!(
            "incompatible feature bits {unknown:#x}"
        )));
    }
    let unknown = ro_compat & !RO_COMPAT_HANDLED;
    if unknown != 0 {
        return Err(Unsupported(format!(
            "read-only compatible feature bits {unknown:#x}"
        )));
    }
    Ok(())
}

/// ext4's crc32c: Castagnoli, continued from `seed`, with neither the initial
/// nor the final inversion (Linux's `crc32c(seed, data, len)`).
fn ext4_crc32c(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// Linux's `crc16` (CRC-16/ARC polynomial, reflected, no final inversion),
/// which gdt_csum uses. Bitwise: descriptors are few and short.
fn crc16(mut crc: u16, data: &[u8]) -> u16 {
    for &byte in data {
        crc ^= u16::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// One fs block read as a bitmap: the bytes, and the same as u64 words.
struct Bitmap {
    bytes: Vec<u8>,
    words: Vec<u64>,
}

impl Bitmap {
    fn new(block_bytes: u64) -> Self {
        Self {
            bytes: vec![0; block_bytes as usize],
            words: vec![0; block_bytes as usize / 8],
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// Bit i of the on-disk bitmap (bit i % 8 of byte i / 8) is bit i % 64 of
    /// word i / 64 when the words are read little-endian.
    fn words(&mut self) -> &[u64] {
        for (word, bytes) in self.words.iter_mut().zip(self.bytes.chunks_exact(8)) {
            *word = u64::from_le_bytes(std::array::from_fn(|i| bytes[i]));
        }
        &self.words
    }
}

/// Marks the runs of set bits of an initialised group's bitmap, after
/// checking its count against the descriptor's.
fn mark_bitmap(
    geo: &Geometry,
    group: u64,
    desc: &Desc,
    bitmap: &mut Bitmap,
    marks: &mut Marks,
) -> Result<(), Ext4Error> {
    let first = geo.group_first_block(group);
    let group_blocks = geo.group_blocks(group);
    let mut used = 0;
    for_each_run(bitmap.words(), group_blocks, |start, end| {
        used += end - start;
        marks.mark(first + start, first + end);
    });
    let free = group_blocks - used;
    if free != desc.free_blocks {
        return Err(Corrupt(format!(
            "group {group}'s block bitmap has {free} free blocks, its descriptor says {}",
            desc.free_blocks
        )));
    }
    Ok(())
}

/// Calls `f(start, end)` for each maximal run of set bits in bits [0, bits).
fn for_each_run(words: &[u64], bits: u64, mut f: impl FnMut(u64, u64)) {
    debug_assert!(bits <= words.len() as u64 * 64);
    let mut i = 0;
    while i < bits {
        // The next set bit at or after i.
        let rest = words[(i / 64) as usize] >> (i % 64);
        if rest == 0 {
            i = (i / 64 + 1) * 64;
            continue;
        }
        i += u64::from(rest.trailing_zeros());
        if i >= bits {
            break;
        }
        let start = i;
        // The next clear bit after it: shifting in zeros reads as "set" and
        // sends the search on to the next word.
        loop {
            let rest = !words[(i / 64) as usize] >> (i % 64);
            if rest == 0 {
                i = (i / 64 + 1) * 64;
                if i >= bits {
                    break;
                }
            } else {
                i += u64::from(rest.trailing_zeros());
                break;
            }
        }
        let end = i.min(bits);
        f(start, end);
        i = end;
    }
}

/// Sets bits [first, end) of `words`.
fn set_bits(words: &mut [u64], first: u64, end: u64) {
    debug_assert!(first <= end && end <= words.len() as u64 * 64);
    let mut i = first;
    while i < end {
        let word = i / 64;
        let lo = i % 64;
        let hi = (end - word * 64).min(64);
        let width = hi - lo;
        let mask = if width == 64 {
            !0
        } else {
            ((1u64 << width) - 1) << lo
        };
        words[word as usize] |= mask;
        i = word * 64 + hi;
    }
}

/// The `used` bitmap being built, in image blocks.
struct Marks {
    used: Vec<u64>,
    image_shift: u32,
    fs_blocks: u64,
}

impl Marks {
    fn new(geo: &Geometry) -> Self {
        let fs_image_blocks = fs_image_blocks(geo);
        // At most DISK_BYTES_MAX / 4096 / 8 bytes (32 MiB): checked in parse.
        Self {
            used: vec![0; fs_image_blocks.div_ceil(64) as usize],
            image_shift: geo.image_shift,
            fs_blocks: geo.blocks,
        }
    }

    /// Marks fs blocks [first, end) used: every image block they touch.
    fn mark(&mut self, first: u64, end: u64) {
        // Callers check what comes from the image before asking.
        assert!(
            first <= end && end <= self.fs_blocks,
            "marking fs blocks {first}..{end} of {}",
            self.fs_blocks
        );
        if first == end {
            return;
        }
        let image_first = first >> self.image_shift;
        let image_end = ((end - 1) >> self.image_shift) + 1;
        set_bits(&mut self.used, image_first, image_end);
    }

    fn finish(mut self, geo: &Geometry, uninit_groups: u64) -> FsUsage {
        let fs_image_blocks = fs_image_blocks(geo);
        if !(geo.blocks * geo.block_bytes).is_multiple_of(DISK_BLOCK_BYTES) {
            // The last image block holds bytes past the file system.
            set_bits(&mut self.used, fs_image_blocks - 1, fs_image_blocks);
        }
        let used_blocks = self.used.iter().map(|w| u64::from(w.count_ones())).sum();
        debug_assert!(used_blocks <= fs_image_blocks);
        debug_assert!(
            self.used.last().is_none_or(
                |&w| fs_image_blocks.is_multiple_of(64) || w >> (fs_image_blocks % 64) == 0
            ),
            "no bits past fs_image_blocks"
        );
        FsUsage {
            fs_image_blocks,
            used: self.used,
            block_size: geo.block_bytes as u32,
            groups: geo.groups,
            uninit_groups,
            used_blocks,
        }
    }
}

fn fs_image_blocks(geo: &Geometry) -> u64 {
    (geo.blocks * geo.block_bytes).div_ceil(DISK_BLOCK_BYTES)
}

#[cfg(test)]
mod tests;
