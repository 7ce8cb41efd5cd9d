// The contract between the VMM and the guest code: addresses, control block
// offsets, event codes and stamp constants.
//
// This file is the single source of truth for both sides: the crate includes
// it as `abi`, and build.rs turns every `pub const NAME: TYPE = LITERAL;` line
// into `.set NAME, LITERAL` for the assembler. Keep every value a plain integer
// literal (no expressions) so that the build script can translate it.

/// GPA of the GDT (null, code64, data, TSS placeholder).
pub const GDT_GPA: u64 = 0x1000;
/// GPA of the PML4 table.
pub const PML4_GPA: u64 = 0x2000;
/// GPA of the PDPT.
pub const PDPT_GPA: u64 = 0x3000;
/// GPA of the first page directory; up to `PD_COUNT_MAX` follow, one per GiB.
pub const PD_GPA: u64 = 0x4000;
/// Page directories available: 8 x 1 GiB of 2 MiB pages = 8 GiB of RAM.
pub const PD_COUNT_MAX: u64 = 8;
/// GPA of the control block shared by the VMM and the guest.
pub const CB_GPA: u64 = 0xC000;
/// Initial stack pointer; the stack grows down into 0xD000..0x10000.
pub const STACK_TOP: u64 = 0x10000;
/// GPA where the guest code is loaded; also its entry point.
pub const CODE_GPA: u64 = 0x10000;
/// Bytes reserved for the guest code (0x10000..0x20000).
pub const CODE_BYTES_MAX: u64 = 0x10000;
/// GPA of the disk DMA area: `DISK_BATCH_MAX` pages (0x20000..0x30000). The
/// guest stamps block i of a command into page i before a write doorbell; the
/// VMM fills page i from the image on a read doorbell.
pub const DISK_DMA_GPA: u64 = 0x20000;
/// GPA of the disk command list: u64 disk block index per DMA page, entries
/// 0..CB_DISK_COUNT of the current command.
pub const DISK_LIST_GPA: u64 = 0x30000;
/// GPA of the version table: one u32 per data page.
pub const VERSION_TABLE_GPA: u64 = 0x100000;

/// Control block: "FERRYCB1", written by the VMM.
pub const CB_MAGIC: u64 = 0x00;
/// Control block: workload (`WORKLOAD_*`), written by the VMM.
pub const CB_WORKLOAD: u64 = 0x08;
/// Control block: GPA of data page 0.
pub const CB_DATA_GPA: u64 = 0x10;
/// Control block: number of data pages.
pub const CB_DATA_PAGES: u64 = 0x18;
/// Control block: GPA of the version table.
pub const CB_TABLE_GPA: u64 = 0x20;
/// Control block: pages the dirty workload writes between two exits.
pub const CB_BATCH_PAGES: u64 = 0x28;
/// Control block: percentage of dirty writes into the hot set (0: uniform).
pub const CB_HOT_PCT: u64 = 0x30;
/// Control block: pages in the hot set (10% of data pages, spread evenly:
/// hot page k is data page k * (data pages / hot pages)).
pub const CB_HOT_PAGES: u64 = 0x38;
/// Control block: the guest's progress counter, +1 at every exit.
pub const CB_PROGRESS: u64 = 0x40;
/// Control block: current phase (`PHASE_*`), written by the guest.
pub const CB_PHASE: u64 = 0x48;
/// Control block: next page of the fill / mixed pass.
pub const CB_CURSOR: u64 = 0x50;
/// Control block: state of the guest's page-choosing PRNG.
pub const CB_PRNG: u64 = 0x58;
/// Control block: page writes since boot (a full write or a rewrite: 1 each).
pub const CB_PAGES_WRITTEN: u64 = 0x60;
/// Control block: first disk block of the guest's write window.
pub const CB_DISK_FIRST_BLOCK: u64 = 0x68;
/// Control block: blocks in the write window (0: no disk workload).
pub const CB_DISK_WINDOW_BLOCKS: u64 = 0x70;
/// Control block: GPA of the disk version table (u32 per window block).
pub const CB_DISK_TABLE_GPA: u64 = 0x78;
/// Control block: block writes due by now, written by the VMM at every exit
/// (the guest writes while CB_DISK_WRITTEN < CB_DISK_DUE).
pub const CB_DISK_DUE: u64 = 0x80;
/// Control block: block writes since boot, counted by the guest before the
/// doorbell that carries them.
pub const CB_DISK_WRITTEN: u64 = 0x88;
/// Control block: blocks in the current disk command (1..=DISK_BATCH_MAX).
pub const CB_DISK_COUNT: u64 = 0x90;
/// Control block: state of the guest's block-choosing PRNG.
pub const CB_DISK_PRNG: u64 = 0x98;
/// Control block: blocks read back and checked since boot.
pub const CB_DISK_READ: u64 = 0xA0;
/// Control block: write doorbells since boot (every DISK_READ_EVERY-th is
/// preceded by a read-back check).
pub const CB_DISK_BATCHES: u64 = 0xA8;
/// Control block: the block whose read-back stamp was wrong (EV_DISK_BAD).
pub const CB_DISK_BAD_BLOCK: u64 = 0xB0;

/// Magic of the control block: "FERRYCB1" little-endian.
pub const CB_MAGIC_VALUE: u64 = 0x3142435952524546;

/// Workload: loop and exit, memory stays zero.
pub const WORKLOAD_IDLE: u64 = 1;
/// Workload: stamp every data page once (incompressible), then idle.
pub const WORKLOAD_FILL: u64 = 2;
/// Workload: stamp pages by class (zero / text / random), then idle.
pub const WORKLOAD_MIXED: u64 = 3;
/// Workload: mixed, then keep rewriting random pages (header + one slot
/// each) at a paced rate of pages.
pub const WORKLOAD_DIRTY: u64 = 4;
/// Workload: fill, then keep rewriting random pages like `WORKLOAD_DIRTY`,
/// every page incompressible.
pub const WORKLOAD_DIRTY_FILL: u64 = 5;

/// Phase: the guest has not reached its first loop yet.
pub const PHASE_BOOT: u64 = 0;
/// Phase: writing every page (fill).
pub const PHASE_FILL: u64 = 1;
/// Phase: writing pages by class (mixed).
pub const PHASE_MIXED: u64 = 2;
/// Phase: idling.
pub const PHASE_IDLE: u64 = 3;
/// Phase: rewriting random pages (dirty).
pub const PHASE_DIRTY: u64 = 4;

/// Page kind: header, then zeros.
pub const KIND_ZERO: u64 = 1;
/// Page kind: header, then 64-byte lines of the text table.
pub const KIND_TEXT: u64 = 2;
/// Page kind: header, then a splitmix64 stream.
pub const KIND_RANDOM: u64 = 3;

/// Page stamp magic: "FRRYPAGE" little-endian.
pub const PAGE_MAGIC: u64 = 0x4547415059525246;
/// Bytes of the page header; the body follows.
pub const HEADER_BYTES: u64 = 64;
/// u64 words of the body: (4096 - 64) / 8.
pub const BODY_WORDS: u64 = 504;
/// 64-byte text lines of the body: (4096 - 64) / 64.
pub const BODY_LINES: u64 = 63;
/// Bytes of one body slot, the unit a dirty-phase rewrite changes.
pub const SLOT_BYTES: u64 = 256;
/// u64 words of a slot: 256 / 8.
pub const SLOT_WORDS: u64 = 32;
/// 64-byte text lines of a slot: 256 / 64.
pub const SLOT_LINES: u64 = 4;
/// Slots in the body: 15 x 256 = 3840 of its 4032 bytes; the last 192 bytes
/// (the tail) are written only by a page's first, full write. A rewrite at
/// version v changes slot v % 15.
pub const BODY_SLOTS: u64 = 15;

/// Disk block stamp magic: "FRRYBLCK" little-endian. A block is stamped like
/// a random-kind page whose page number is the disk block index.
pub const BLOCK_MAGIC: u64 = 0x4B434C4259525246;

/// splitmix64 increment (the golden ratio).
pub const GOLDEN: u64 = 0x9E3779B97F4A7C15;
/// splitmix64 first multiplier.
pub const MIX1: u64 = 0xBF58476D1CE4E5B9;
/// splitmix64 second multiplier.
pub const MIX2: u64 = 0x94D049BB133111EB;
/// Salt of the page class hash.
pub const CLASS_SALT: u64 = 0x2545F4914F6CDD1D;
/// Class hash below this percentage: zero page.
pub const CLASS_ZERO_BELOW_PCT: u64 = 40;
/// Class hash below this (and not zero): text page; otherwise random.
pub const CLASS_TEXT_BELOW_PCT: u64 = 70;

/// Fill and mixed passes exit every this many pages (a power of two). On a
/// nested (PVM) host 64 first-touch page writes take ~450 µs and an exit
/// ~140 µs, so this bounds the pause latency during those passes to well
/// under 1 ms while exits cost ~25% of the pass (32 pages measured a 2 GiB
/// fill 60% slower). On hardware both are a few µs.
pub const CHECKPOINT_PAGES: u64 = 64;
/// `CHECKPOINT_PAGES - 1`, for the guest's mask test.
pub const CHECKPOINT_MASK: u64 = 63;

/// The guest's event port; the byte written is an `EV_*` code.
pub const EXIT_PORT: u64 = 0xF0;
/// Event: one idle loop done (the VMM sleeps ~1 ms).
pub const EV_IDLE: u64 = 1;
/// Event: one dirty batch done (the VMM paces to the configured rate).
pub const EV_BATCH: u64 = 2;
/// Event: `CHECKPOINT_PAGES` pages of a fill / mixed pass done (no sleep).
pub const EV_CHECKPOINT: u64 = 3;
/// Event: a block read back from the disk has the wrong stamp (its index is
/// in CB_DISK_BAD_BLOCK); the guest halts.
pub const EV_DISK_BAD: u64 = 4;
/// Event: the control block is invalid; the guest halts.
pub const EV_BAD_CONFIG: u64 = 0xEE;

/// The disk doorbell: the byte written is a `DISK_CMD_*`; the command is
/// CB_DISK_COUNT blocks, block i being entry i of the list at DISK_LIST_GPA
/// with its data in DMA page i. The VMM completes the whole command before
/// the guest runs again.
pub const DISK_PORT: u64 = 0xF1;
/// Disk command: write DMA page i to list entry i's block, in list order.
pub const DISK_CMD_WRITE: u64 = 1;
/// Disk command: read list entry i's block into DMA page i.
pub const DISK_CMD_READ: u64 = 2;
/// Blocks per disk command: 16 x 4 KiB = 64 KiB, like a dirty batch of
/// pages. A doorbell is an exit (~140 µs on a nested host), so batching cuts
/// the exits of a paced disk workload 16-fold; the VMM's 16 pwrite()s of
/// 4 KiB into the page cache keep a pause waiting well under 1 ms.
pub const DISK_BATCH_MAX: u64 = 16;
/// Write doorbells per read-back check: one in 4 (a read of up to
/// DISK_BATCH_MAX random stamped blocks, headers checked in the guest).
pub const DISK_READ_EVERY: u64 = 4;
/// `DISK_READ_EVERY - 1`, for the guest's mask test.
pub const DISK_READ_MASK: u64 = 3;
