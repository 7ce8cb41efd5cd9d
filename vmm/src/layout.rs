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
//! 0x0010_0000  version table: u32 per data page
//! data_gpa     data pages: from the first 2 MiB boundary after the table
//!              (sized for every page of RAM) to the end of RAM
//! ```
//!
//! The layout is a pure function of the RAM size, so source, target and the
//! oracle all derive the same one. All of RAM is identity-mapped with 2 MiB
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
}

/// Where everything lives for one RAM size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Total guest RAM (one slot at GPA 0).
    pub mem_bytes: u64,
    /// GPA of the version table.
    pub table_gpa: u64,
    /// GPA of data page 0 (2 MiB aligned).
    pub data_gpa: u64,
    /// Number of data pages.
    pub data_pages: u64,
    /// Pages in the dirty workload's hot set (at least 1).
    pub hot_pages: u64,
}

impl Layout {
    /// The layout of `mem_bytes` of RAM.
    pub fn new(mem_bytes: u64) -> Result<Self, LayoutError> {
        if !(MEM_BYTES_MIN..=MEM_BYTES_MAX).contains(&mem_bytes)
            || !mem_bytes.is_multiple_of(LARGE_PAGE_BYTES)
        {
            return Err(LayoutError::Size { mem_bytes });
        }
        // The table is sized for every page of RAM (an upper bound on data
        // pages), which keeps the computation free of a fixed point.
        let table_bytes = mem_bytes / PAGE_BYTES * 4;
        let data_gpa = (abi::VERSION_TABLE_GPA + table_bytes).next_multiple_of(LARGE_PAGE_BYTES);
        if data_gpa >= mem_bytes {
            return Err(LayoutError::Size { mem_bytes });
        }
        let data_pages = (mem_bytes - data_gpa) / PAGE_BYTES;
        let layout = Layout {
            mem_bytes,
            table_gpa: abi::VERSION_TABLE_GPA,
            data_gpa,
            data_pages,
            hot_pages: (data_pages * HOT_SET_PCT / 100).max(1),
        };
        assert!(layout.table_gpa + layout.data_pages * 4 <= layout.data_gpa);
        assert!(abi::CODE_GPA + abi::CODE_BYTES_MAX <= layout.table_gpa);
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
    fn rejects_bad_sizes() {
        for bad in [0, 2 << 20, (64 << 20) + 4096, (8 << 30) + (2 << 20)] {
            assert!(Layout::new(bad).is_err(), "{bad}");
        }
    }
}
