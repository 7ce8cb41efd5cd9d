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

/// The one I/O port the guest talks to; the byte written is an `EV_*` code.
pub const EXIT_PORT: u64 = 0xF0;
/// Event: one idle loop done (the VMM sleeps ~1 ms).
pub const EV_IDLE: u64 = 1;
/// Event: one dirty batch done (the VMM paces to the configured rate).
pub const EV_BATCH: u64 = 2;
/// Event: `CHECKPOINT_PAGES` pages of a fill / mixed pass done (no sleep).
pub const EV_CHECKPOINT: u64 = 3;
/// Event: the control block is invalid; the guest halts.
pub const EV_BAD_CONFIG: u64 = 0xEE;
