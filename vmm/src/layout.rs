//! The guest physical memory map.
//!
//! ```text
//! 0x0000_0000  unused (zero page)
//! 0x0000_1000  GDT: null, kernel code64 (0x08) / data (0x10), user code64
//!              (0x18, used as 0x1b) / data (0x20, used as 0x23), TSS (0x28)
//! 0x0000_2000  PML4
//! 0x0000_3000  PDPT
//! 0x0000_4000  page directories, one per GiB (2 MiB pages), up to 8 -> 8 GiB
//! 0x0000_C000  control block (see abi::CB_*)
//! 0x0000_D000  stack (grows down from 0x1_0000)
//! 0x0001_0000  guest code (entry point), at most 64 KiB
//! 0x0002_0000  disk DMA area: 16 pages, one per block of a disk command
//! 0x0003_0000  disk command list: u64 block index per DMA page
//! 0x0010_0000  version table: u32 per data page (sized for every page of RAM)
//! disk_table   disk version table: u32 per block of the disk write window,
//!              from the first 4 KiB boundary after the page table (only
//!              with a disk workload; absent, the layout is the one of old)
//! data_gpa     data pages: from the first 2 MiB boundary after the tables
//!              to the end of RAM
//! ```
//!
//! The layout is a pure function of the RAM size and the disk window, so
//! source, target and the oracle all derive the same one. All of RAM is identity-mapped with 2 MiB
//! user pages whose accessed and dirty bits are preset, so the CPU never
//! writes the page tables.
//!
//! The guest runs at CPL 3 with IOPL 3 (so `out` works): under PVM, the
//! paravirtual KVM of the project's nested test hosts, only guest user mode
//! runs natively; supervisor code at low addresses is emulated instruction by
//! instruction (~1000x slower). On VMX/SVM hardware both run natively.

use crate::abi;

/// Bytes per page the guest stamps (and per dirty-log bit).
pub const PAGE_BYTES: u64 = 4096;
/// Bytes per large page of the identity map.
pub const LARGE_PAGE_BYTES: u64 = 2 << 20;
/// Smallest RAM: the fixed area and table fit in 2 MiB, data needs 2 MiB more.
pub const MEM_BYTES_MIN: u64 = 4 << 20;
/// Largest RAM: `PD_COUNT_MAX` page directories of 1 GiB each.
pub const MEM_BYTES_MAX: u64 = abi::PD_COUNT_MAX << 30;
/// GDT entries (8 bytes each; the TSS descriptor takes two).
pub const GDT_ENTRIES: usize = 7;
/// User code selector (GDT index 3, RPL 3).
pub const USER_CS: u16 = 0x1b;
/// User data selector (GDT index 4, RPL 3).
pub const USER_DS: u16 = 0x23;
/// TSS selector (GDT index 5).
pub const TSS_SEL: u16 = 0x28;
/// The hot set of the dirty workload: this percentage of the data pages.
pub const HOT_SET_PCT: u64 = 10;
/// Largest disk write window: 16 Mi blocks of 4 KiB = 64 GiB, whose version
/// table takes 64 MiB of guest RAM (a 4 GiB window: 1 Mi blocks, 4 MiB).
/// Bigger images keep their front out of the window (`--disk-write-from-mib`).
pub const DISK_WINDOW_BLOCKS_MAX: u64 = 16 << 20;

// The fixed area: code, then the disk DMA pages, then the command list.
const _: () = assert!(abi::CODE_GPA + abi::CODE_BYTES_MAX <= abi::DISK_DMA_GPA);
const _: () = assert!(abi::DISK_DMA_GPA + abi::DISK_BATCH_MAX * PAGE_BYTES <= abi::DISK_LIST_GPA);

/// Errors of the layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The RAM size does not fit the layout.
    #[error(
        "guest RAM of {mem_bytes} bytes is not supported: it must be a multiple of 2 MiB \
         between {MEM_BYTES_MIN} and {MEM_BYTES_MAX} bytes"
    )]
    Size {
        /// The requested size.
        mem_bytes: u64,
    },
    /// The disk version table does not fit.
    #[error(
        "a disk write window of {window_blocks} blocks does not fit {mem_bytes} bytes of guest \
         RAM: its version table takes 4 bytes per block, and the window is at most \
         {DISK_WINDOW_BLOCKS_MAX} blocks"
    )]
    DiskWindow {
        /// RAM size.
        mem_bytes: u64,
        /// Blocks in the window.
        window_blocks: u64,
    },
}

/// Where everything lives for one RAM size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Total guest RAM (one slot at GPA 0).
    pub mem_bytes: u64,
    /// GPA of the version table.
    pub table_gpa: u64,
    /// GPA of the disk version table (0 when there is none).
    pub disk_table_gpa: u64,
    /// Entries of the disk version table: blocks of the disk write window.
    pub disk_table_blocks: u64,
    /// GPA of data page 0 (2 MiB aligned).
    pub data_gpa: u64,
    /// Number of data pages.
    pub data_pages: u64,
    /// Pages in the dirty workload's hot set (at least 1).
    pub hot_pages: u64,
}

impl Layout {
    /// The layout of `mem_bytes` of RAM without a disk version table.
    pub fn new(mem_bytes: u64) -> Result<Self, LayoutError> {
        Self::with_disk_table(mem_bytes, 0)
    }

    /// The layout of `mem_bytes` of RAM with a disk version table of
    /// `disk_table_blocks` entries (0: none, the layout of [`Layout::new`]).
    pub fn with_disk_table(mem_bytes: u64, disk_table_blocks: u64) -> Result<Self, LayoutError> {
        if !(MEM_BYTES_MIN..=MEM_BYTES_MAX).contains(&mem_bytes)
            || !mem_bytes.is_multiple_of(LARGE_PAGE_BYTES)
        {
            return Err(LayoutError::Size { mem_bytes });
        }
        let window_err = LayoutError::DiskWindow {
            mem_bytes,
            window_blocks: disk_table_blocks,
        };
        if disk_table_blocks > DISK_WINDOW_BLOCKS_MAX {
            return Err(window_err);
        }
        // The table is sized for every page of RAM (an upper bound on data
        // pages), which keeps the computation free of a fixed point.
        let table_end = abi::VERSION_TABLE_GPA + mem_bytes / PAGE_BYTES * 4;
        let (disk_table_gpa, tables_end) = match disk_table_blocks {
            0 => (0, table_end),
            n => {
                let gpa = table_end.next_multiple_of(PAGE_BYTES);
                (gpa, gpa + n * 4)
            }
        };
        let data_gpa = tables_end.next_multiple_of(LARGE_PAGE_BYTES);
        if data_gpa >= mem_bytes {
            return Err(match disk_table_blocks {
                0 => LayoutError::Size { mem_bytes },
                _ => window_err,
            });
        }
        let data_pages = (mem_bytes - data_gpa) / PAGE_BYTES;
        let layout = Layout {
            mem_bytes,
            table_gpa: abi::VERSION_TABLE_GPA,
            disk_table_gpa,
            disk_table_blocks,
            data_gpa,
            data_pages,
            hot_pages: (data_pages * HOT_SET_PCT / 100).max(1),
        };
        assert!(layout.table_gpa + layout.data_pages * 4 <= layout.data_gpa);
        assert!(abi::DISK_LIST_GPA + abi::DISK_BATCH_MAX * 8 <= layout.table_gpa);
        assert!(
            layout.disk_table_blocks == 0
                || (layout.disk_table_gpa >= table_end
                    && layout.disk_table_gpa + layout.disk_table_blocks * 4 <= layout.data_gpa)
        );
        Ok(layout)
    }

    /// GPA of data page `page`.
    pub fn data_page_gpa(&self, page: u64) -> u64 {
        assert!(page < self.data_pages, "data page {page} out of range");
        self.data_gpa + page * PAGE_BYTES
    }

    /// Number of page directories the identity map needs.
    pub fn pd_count(&self) -> u64 {
        self.mem_bytes.div_ceil(1 << 30)
    }

    /// The boot page tables as (GPA, entry) pairs: `PML4[0] -> PDPT`,
    /// `PDPT[i] -> PD i`, and 2 MiB identity entries covering all of RAM.
    pub fn page_table_entries(&self) -> Vec<(u64, u64)> {
        const PRESENT_WRITABLE: u64 = 0x1 | 0x2 | 0x4; // present, writable, user
        const ACCESSED_DIRTY: u64 = 0x20 | 0x40;
        const LARGE: u64 = 0x80;
        let mut entries = vec![(abi::PML4_GPA, abi::PDPT_GPA | PRESENT_WRITABLE)];
        for pd in 0..self.pd_count() {
            let pd_gpa = abi::PD_GPA + pd * PAGE_BYTES;
            entries.push((abi::PDPT_GPA + pd * 8, pd_gpa | PRESENT_WRITABLE | 0x20));
        }
        for i in 0..self.mem_bytes / LARGE_PAGE_BYTES {
            let entry = (i * LARGE_PAGE_BYTES) | PRESENT_WRITABLE | ACCESSED_DIRTY | LARGE;
            entries.push((abi::PD_GPA + i * 8, entry));
        }
        entries
    }

    /// The GDT: null, kernel code64 (0x08) and data (0x10), user code64
    /// (0x18) and data (0x20), and a busy 64-bit TSS descriptor (0x28, 16
    /// bytes; never loaded from memory, the VMM sets TR directly).
    pub fn gdt() -> [u64; GDT_ENTRIES] {
        [
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x00af_fb00_0000_ffff,
            0x00cf_f300_0000_ffff,
            0x0000_8b00_0000_0067,
            0,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_of_common_sizes() {
        let l = Layout::new(64 << 20).unwrap();
        assert_eq!(l.data_gpa, 2 << 20);
        assert_eq!(l.data_pages, (62 << 20) / 4096);
        let l = Layout::new(2 << 30).unwrap();
        assert_eq!(l.data_gpa, 4 << 20);
        let l = Layout::new(8 << 30).unwrap();
        assert_eq!(l.data_gpa, 10 << 20);
        assert_eq!(l.pd_count(), 8);
        assert!(l
            .page_table_entries()
            .iter()
            .all(|&(gpa, _)| gpa < abi::CB_GPA));
    }

    #[test]
    fn a_disk_table_goes_between_the_page_table_and_the_data() {
        // No table: the layout of old, whatever the constructor.
        assert_eq!(
            Layout::with_disk_table(64 << 20, 0).unwrap(),
            Layout::new(64 << 20).unwrap()
        );
        // 64 MiB of RAM: the page table ends at 1 MiB + 64 KiB.
        let l = Layout::with_disk_table(64 << 20, 1000).unwrap();
        assert_eq!(l.disk_table_gpa, 0x110000);
        assert_eq!(l.data_gpa, 2 << 20, "a small table fits the old gap");
        // A 4 GiB window: 4 MiB of table pushes the data up.
        let l = Layout::with_disk_table(64 << 20, 1 << 20).unwrap();
        assert_eq!(l.data_gpa, 6 << 20);
        assert_eq!(l.data_pages, (58 << 20) / 4096);
        // Too big for the RAM, or over the cap.
        assert!(matches!(
            Layout::with_disk_table(4 << 20, 1 << 20),
            Err(LayoutError::DiskWindow { .. })
        ));
        assert!(Layout::with_disk_table(8 << 30, DISK_WINDOW_BLOCKS_MAX).is_ok());
        assert!(Layout::with_disk_table(8 << 30, DISK_WINDOW_BLOCKS_MAX + 1).is_err());
    }

    #[test]
    fn rejects_bad_sizes() {
        for bad in [0, 2 << 20, (64 << 20) + 4096, (8 << 30) + (2 << 20)] {
            assert!(Layout::new(bad).is_err(), "{bad}");
        }
    }
}
