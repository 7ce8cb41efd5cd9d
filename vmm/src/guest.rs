//! The guest image: code assembled by build.rs from guest/workload.S, plus
//! the boot data the VMM writes before the first run (GDT, page tables,
//! control block). A restored VM gets none of this: its memory arrives as is.

use crate::abi;
use crate::config::{DiskConfig, GuestWorkload, Workload};
use crate::layout::Layout;
use crate::mem::{GuestRam, MemError};

/// The flat guest binary, loaded at [`abi::CODE_GPA`] and entered at its
/// first byte.
pub static GUEST_CODE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/workload.bin"));

/// The guest's text lines (8 x 64 bytes), the same file the assembler embeds.
pub static TEXT_TABLE: &[u8; 512] = include_bytes!("../guest/text_lines.txt");

const _: () = assert!(TEXT_TABLE.len() == 8 * 64);

/// Phase of the guest, from the control block.
pub fn phase_name(phase: u64) -> &'static str {
    match phase {
        abi::PHASE_BOOT => "boot",
        abi::PHASE_FILL => "fill",
        abi::PHASE_MIXED => "mixed",
        abi::PHASE_IDLE => "idle",
        abi::PHASE_DIRTY => "dirty",
        _ => "unknown",
    }
}

/// Writes the boot image of a new VM into zeroed RAM: GDT, identity page
/// tables, code, and the control block for `workload` (with its disk window
/// on `disk` when it has a disk part).
pub fn write_boot_image(
    ram: &GuestRam,
    layout: &Layout,
    workload: GuestWorkload,
    batch_pages: u64,
    disk: Option<&DiskConfig>,
) -> Result<(), MemError> {
    assert!(
        GUEST_CODE.len() as u64 <= abi::CODE_BYTES_MAX,
        "guest code too large"
    );
    assert_eq!(ram.bytes(), layout.mem_bytes);
    for (i, desc) in Layout::gdt().iter().enumerate() {
        ram.write_u64(abi::GDT_GPA + i as u64 * 8, *desc)?;
    }
    for (gpa, entry) in layout.page_table_entries() {
        ram.write_u64(gpa, entry)?;
    }
    ram.write_bytes(abi::CODE_GPA, GUEST_CODE)?;
    let hot_pct = match workload.memory {
        Workload::Dirty { hot_pct, .. } => u64::from(hot_pct),
        _ => 0,
    };
    let (disk_first, disk_window) = match (workload.disk, disk) {
        (Some(_), Some(d)) => (d.window_first_block, d.window_blocks()),
        _ => (0, 0),
    };
    assert_eq!(
        disk_window, layout.disk_table_blocks,
        "disk table sized for the window"
    );
    let cb = [
        (abi::CB_WORKLOAD, workload.memory.code()),
        (abi::CB_DATA_GPA, layout.data_gpa),
        (abi::CB_DATA_PAGES, layout.data_pages),
        (abi::CB_TABLE_GPA, layout.table_gpa),
        (abi::CB_BATCH_PAGES, batch_pages),
        (abi::CB_HOT_PCT, hot_pct),
        (abi::CB_HOT_PAGES, layout.hot_pages),
        (abi::CB_PROGRESS, 0),
        (abi::CB_PHASE, abi::PHASE_BOOT),
        (abi::CB_CURSOR, 0),
        (abi::CB_PRNG, 0x5eed_f00d_cafe_d00d),
        (abi::CB_PAGES_WRITTEN, 0),
        (abi::CB_DISK_FIRST_BLOCK, disk_first),
        (abi::CB_DISK_WINDOW_BLOCKS, disk_window),
        (abi::CB_DISK_TABLE_GPA, layout.disk_table_gpa),
        (abi::CB_DISK_DUE, 0),
        (abi::CB_DISK_WRITTEN, 0),
        (abi::CB_DISK_COUNT, 0),
        (abi::CB_DISK_PRNG, 0xd15c_0b1e_55ed_f00d),
        (abi::CB_DISK_READ, 0),
        (abi::CB_DISK_BATCHES, 0),
        (abi::CB_DISK_BAD_BLOCK, 0),
        // Last: the guest refuses to start on a control block without magic.
        (abi::CB_MAGIC, abi::CB_MAGIC_VALUE),
    ];
    for (off, value) in cb {
        ram.write_u64(abi::CB_GPA + off, value)?;
    }
    Ok(())
}

/// Live counters of the guest, read from its control block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestCounters {
    /// Progress counter (+1 per exit).
    pub progress: u64,
    /// `abi::PHASE_*`.
    pub phase: u64,
    /// Pages written since boot.
    pub pages_written: u64,
    /// Disk blocks written since boot.
    pub blocks_written: u64,
    /// Disk blocks read back and checked by the guest since boot.
    pub blocks_read: u64,
}

/// Reads the guest's counters (volatile; the guest may be running).
pub fn counters(ram: &GuestRam) -> Result<GuestCounters, MemError> {
    Ok(GuestCounters {
        progress: ram.read_u64(abi::CB_GPA + abi::CB_PROGRESS)?,
        phase: ram.read_u64(abi::CB_GPA + abi::CB_PHASE)?,
        pages_written: ram.read_u64(abi::CB_GPA + abi::CB_PAGES_WRITTEN)?,
        blocks_written: ram.read_u64(abi::CB_GPA + abi::CB_DISK_WRITTEN)?,
        blocks_read: ram.read_u64(abi::CB_GPA + abi::CB_DISK_READ)?,
    })
}
