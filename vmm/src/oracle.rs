//! The stamp generator in Rust and the checks built on it: the test oracle.
//!
//! Every page the guest writes is a pure function of (page, version, kind).
//! The guest writes a page at version v (v counts the page's writes):
//!
//! - v == 1, the page's first write (the fill and mixed passes, or a zero-class
//!   page's first dirty write): the header and the whole body of the *full
//!   stamp* of (page, 1, kind);
//! - v >= 2, a rewrite (the dirty phase): the header of v and only body slot
//!   `v % 15`, which gets the bytes the full stamp of (page, v, kind) has
//!   there. A zero-kind rewrite changes the header only.
//!
//! The full stamp of (page, v, kind):
//!
//! ```text
//! offset    0  u64  PAGE_MAGIC ("FRRYPAGE")          header, 64 bytes,
//!           8  u64  data page number                 rewritten at every write
//!          16  u64  version (low 32 bits) | kind << 32
//!          24  u64  seed = mix(page * GOLDEN ^ (kind << 32 | version))
//!          32  4 x u64 zero
//!          64  body, 4032 bytes = 15 slots of 256 bytes + a 192-byte tail:
//!              slot s at 64 + 256 s (s < 15) = words 32 s.. / lines 4 s..
//!              tail at 3904 = words 480..504 / lines 60..63
//!                KIND_RANDOM: word i = mix(seed + (i + 1) * GOLDEN), i < 504
//!                KIND_TEXT:   line j = TEXT_TABLE[mix(seed + (j + 1) * GOLDEN) & 7], j < 63
//!                KIND_ZERO:   zeros
//! ```
//!
//! So a page at version v >= 1 holds: the header of v; in slot s, the slot s
//! of the full stamp of [`slot_version`]`(v, s)` = the latest v' <= v with
//! v' >= 2 and v' % 15 == s, or 1 when there is none; in the tail, the tail of
//! version 1. A rewrite changes ~16 header bytes and one 256-byte slot, which
//! is what an XOR-delta codec should find; a random-kind slot stays
//! incompressible on its own.
//!
//! `mix` is the splitmix64 finaliser. The version table (u32 per data page at
//! `Layout::table_gpa`) holds each page's version; version 0 means never
//! written, and the page must then be all zero. A page's class (which kind
//! the mixed and dirty workloads give it) is `mix(page ^ CLASS_SALT) % 100`:
//! below 40 zero, below 70 text, else random. A page keeps its kind for life.
//!
//! Disk blocks are stamped the same way ([`expected_block`]): a block at
//! version v is the random-kind page stamp of (block index, v) with the
//! magic "FRRYBLCK" instead of "FRRYPAGE", so consecutive versions differ in
//! the header and one slot; `crate::disk::check` checks them.
//!
//! [`check_memory`] never trusts the migration code: it needs only the memory.
//! A stale page (an older version than the table's), a torn page (a header of
//! one version with a slot of another) and a page of another index or kind
//! all fail [`check_page`].

use vm_memory::VolatileSlice;
use xxhash_rust::xxh3::Xxh3;

use crate::abi;
use crate::guest::TEXT_TABLE;
use crate::layout::{Layout, PAGE_BYTES};

const PAGE: usize = PAGE_BYTES as usize;
const HEADER: usize = abi::HEADER_BYTES as usize;
const SLOT: usize = abi::SLOT_BYTES as usize;
const SLOTS: usize = abi::BODY_SLOTS as usize;
/// Byte offset of the body tail, after the last slot.
const TAIL: usize = HEADER + SLOTS * SLOT;

const _: () = assert!(abi::SLOT_WORDS * 8 == abi::SLOT_BYTES);
const _: () = assert!(abi::SLOT_LINES * 64 == abi::SLOT_BYTES);
const _: () = assert!(abi::BODY_WORDS * 8 + abi::HEADER_BYTES == PAGE_BYTES);
const _: () = assert!(abi::BODY_LINES * 64 + abi::HEADER_BYTES == PAGE_BYTES);
const _: () = assert!(TAIL < PAGE && PAGE - TAIL < SLOT, "15 slots fill the body");

/// The splitmix64 finaliser.
pub fn mix(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(abi::MIX1);
    z = (z ^ (z >> 27)).wrapping_mul(abi::MIX2);
    z ^ (z >> 31)
}

/// Seed of a page's body stream.
pub fn page_seed(page: u64, version: u32, kind: u64) -> u64 {
    mix(page.wrapping_mul(abi::GOLDEN) ^ (kind << 32 | u64::from(version)))
}

/// The kind the mixed and dirty workloads give `page`.
pub fn class_of(page: u64) -> u64 {
    match mix(page ^ abi::CLASS_SALT) % 100 {
        p if p < abi::CLASS_ZERO_BELOW_PCT => abi::KIND_ZERO,
        p if p < abi::CLASS_TEXT_BELOW_PCT => abi::KIND_TEXT,
        _ => abi::KIND_RANDOM,
    }
}

/// The body slot the write of `version` changes: None for the first write
/// (version 1, the whole page) and for version 0 (never written).
pub fn slot_of(version: u32) -> Option<usize> {
    (version >= 2).then(|| (version % abi::BODY_SLOTS as u32) as usize)
}

/// The version whose data slot `slot` holds in a page at `version` (>= 1):
/// the latest rewrite v' <= version with `slot_of(v') == Some(slot)`, or the
/// first write (1) when no rewrite reached the slot yet.
pub fn slot_version(version: u32, slot: usize) -> u32 {
    assert!(version >= 1, "a page at version 0 holds no version");
    assert!(slot < SLOTS, "slot {slot} out of range");
    let back = (i64::from(version) - slot as i64).rem_euclid(SLOTS as i64);
    let v = i64::from(version) - back;
    if v >= 2 {
        v as u32
    } else {
        1
    }
}

/// Fills `out` (whole 64-byte lines) with the body stream of `seed` for
/// `kind`, from the byte `body_offset` of the body on: the bytes a full
/// stamp has there.
fn fill_body(kind: u64, seed: u64, body_offset: usize, out: &mut [u8]) {
    debug_assert!(body_offset.is_multiple_of(64) && out.len().is_multiple_of(64));
    match kind {
        abi::KIND_RANDOM => {
            let mut state = seed.wrapping_add((body_offset as u64 / 8).wrapping_mul(abi::GOLDEN));
            for w in out.chunks_exact_mut(8) {
                state = state.wrapping_add(abi::GOLDEN);
                w.copy_from_slice(&mix(state).to_le_bytes());
            }
        }
        abi::KIND_TEXT => {
            let mut state = seed.wrapping_add((body_offset as u64 / 64).wrapping_mul(abi::GOLDEN));
            for line in out.chunks_exact_mut(64) {
                state = state.wrapping_add(abi::GOLDEN);
                let i = (mix(state) & 7) as usize * 64;
                line.copy_from_slice(&TEXT_TABLE[i..i + 64]);
            }
        }
        _ => out.fill(0),
    }
}

fn write_header(magic: u64, page: u64, version: u32, kind: u64, out: &mut [u8; PAGE]) {
    out[0..8].copy_from_slice(&magic.to_le_bytes());
    out[8..16].copy_from_slice(&page.to_le_bytes());
    out[16..24].copy_from_slice(&(kind << 32 | u64::from(version)).to_le_bytes());
    out[24..32].copy_from_slice(&page_seed(page, version, kind).to_le_bytes());
    out[32..HEADER].fill(0);
}

/// Applies to `out` the guest's write of `page` at `version` (>= 1), as
/// guest/workload.S does it: header, then the whole body (version 1) or one
/// slot (a rewrite). Repeating it for versions 1..=v builds the page of
/// version v step by step: the model [`expected_page`] is checked against.
pub fn apply_write(page: u64, version: u32, kind: u64, out: &mut [u8; PAGE]) {
    assert!(version >= 1, "the guest's first write is version 1");
    write_header(abi::PAGE_MAGIC, page, version, kind, out);
    let seed = page_seed(page, version, kind);
    match slot_of(version) {
        None => fill_body(kind, seed, 0, &mut out[HEADER..]),
        Some(_) if kind == abi::KIND_ZERO => {}
        Some(s) => fill_body(kind, seed, s * SLOT, &mut out[HEADER + s * SLOT..][..SLOT]),
    }
}

/// Fills `out` with the page the guest has written after its writes of
/// `page` at versions 1..=`version` (all zero for version 0).
pub fn expected_page(page: u64, version: u32, kind: u64, out: &mut [u8; PAGE]) {
    if version == 0 {
        out.fill(0);
        return;
    }
    expected_stamp(abi::PAGE_MAGIC, page, version, kind, out);
}

/// Fills `out` with disk block `block` at `version` (>= 1): the stamp of a
/// random-kind page numbered `block`, with [`abi::BLOCK_MAGIC`]. The guest
/// computes it whole at every write (see crate::disk::check).
pub fn expected_block(block: u64, version: u32, out: &mut [u8; PAGE]) {
    assert!(version >= 1, "a block's first write is version 1");
    expected_stamp(abi::BLOCK_MAGIC, block, version, abi::KIND_RANDOM, out);
}

/// The content after writes 1..=`version` (>= 1) of the stamp numbered
/// `page` (a data page, or a disk block) with `magic`.
fn expected_stamp(magic: u64, page: u64, version: u32, kind: u64, out: &mut [u8; PAGE]) {
    write_header(magic, page, version, kind, out);
    for s in 0..SLOTS {
        // A zero-kind page's slots are zero whichever version wrote them.
        let v = slot_version(version, s);
        let range = HEADER + s * SLOT..HEADER + (s + 1) * SLOT;
        fill_body(kind, page_seed(page, v, kind), s * SLOT, &mut out[range]);
    }
    fill_body(
        kind,
        page_seed(page, 1, kind),
        TAIL - HEADER,
        &mut out[TAIL..],
    );
}

/// Why a page failed its check.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PageFault {
    /// Version 0 in the table, but the page is not all zero.
    #[error("page {page} has version 0 but is not zero")]
    NotZero {
        /// Data page number.
        page: u64,
    },
    /// The header is not a stamp of this page at the table's version.
    #[error("page {page}: bad header (table version {version}): {what}")]
    Header {
        /// Data page number.
        page: u64,
        /// Version from the table.
        version: u32,
        /// What is wrong.
        what: &'static str,
    },
    /// The header is right but the body differs from the generator.
    #[error("page {page} (version {version}, kind {kind}): body differs at byte {offset}")]
    Body {
        /// Data page number.
        page: u64,
        /// Version.
        version: u32,
        /// Kind.
        kind: u64,
        /// First differing byte.
        offset: usize,
    },
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Checks one data page against its version table entry. `scratch` is
/// reused for the expected content.
pub fn check_page(
    page: u64,
    version: u32,
    bytes: &[u8; PAGE],
    scratch: &mut [u8; PAGE],
) -> Result<(), PageFault> {
    if version == 0 {
        return match bytes.iter().all(|&b| b == 0) {
            true => Ok(()),
            false => Err(PageFault::NotZero { page }),
        };
    }
    let header = |what| PageFault::Header {
        page,
        version,
        what,
    };
    if u64_at(bytes, 0) != abi::PAGE_MAGIC {
        return Err(header("no magic"));
    }
    if u64_at(bytes, 8) != page {
        return Err(header("wrong page number"));
    }
    let ver_kind = u64_at(bytes, 16);
    if ver_kind as u32 != version {
        return Err(header("version differs from the table"));
    }
    let kind = ver_kind >> 32;
    if !matches!(kind, abi::KIND_ZERO | abi::KIND_TEXT | abi::KIND_RANDOM) {
        return Err(header("unknown kind"));
    }
    // The fill workload stamps every page random; mixed and dirty by class.
    if kind != class_of(page) && kind != abi::KIND_RANDOM {
        return Err(header("kind is not the page's class"));
    }
    expected_page(page, version, kind, scratch);
    match bytes.iter().zip(scratch.iter()).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(offset) if offset < abi::HEADER_BYTES as usize => Err(header("bad seed or padding")),
        Some(offset) => Err(PageFault::Body {
            page,
            version,
            kind,
            offset,
        }),
    }
}

/// Result of [`check_memory`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Data pages checked (all of them).
    pub pages_checked: u64,
    /// Data pages that failed.
    pub pages_bad: u64,
    /// Data pages with a version above 0 (stamped at least once).
    pub pages_stamped: u64,
    /// The first few failures, for the log.
    pub first_faults: Vec<PageFault>,
}

/// How many failures [`CheckReport`] keeps.
pub const FAULTS_KEPT: usize = 8;

/// Reads the version table of `layout` out of `mem`.
pub fn read_versions(mem: &VolatileSlice, layout: &Layout) -> Vec<u32> {
    let mut raw = vec![0u8; layout.data_pages as usize * 4];
    let table = mem
        .subslice(layout.table_gpa as usize, raw.len())
        .expect("layout fits memory");
    table.copy_to(&mut raw[..]);
    raw.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

/// Checks every data page of `mem` (all of guest RAM, GPA 0 first): each
/// must be zero with version 0, or a valid stamp at its table version.
pub fn check_memory(mem: &VolatileSlice, layout: &Layout) -> CheckReport {
    assert_eq!(
        mem.len() as u64,
        layout.mem_bytes,
        "memory and layout disagree"
    );
    let versions = read_versions(mem, layout);
    let mut report = CheckReport::default();
    let mut page_buf = Box::new([0u8; PAGE]);
    let mut scratch = Box::new([0u8; PAGE]);
    for (page, &version) in versions.iter().enumerate() {
        let page = page as u64;
        let gpa = layout.data_page_gpa(page) as usize;
        mem.subslice(gpa, PAGE)
            .expect("layout fits memory")
            .copy_to(&mut page_buf[..]);
        report.pages_checked += 1;
        report.pages_stamped += u64::from(version > 0);
        if let Err(fault) = check_page(page, version, &page_buf, &mut scratch) {
            report.pages_bad += 1;
            if report.first_faults.len() < FAULTS_KEPT {
                report.first_faults.push(fault);
            }
        }
    }
    report
}

/// xxh3-64 of all of `mem`, as 16 lowercase hex digits. The source VMM (at
/// pause) and the target VMM (at restore) compute the same function.
pub fn mem_hash(mem: &VolatileSlice) -> String {
    const CHUNK: usize = 1 << 20;
    let mut hasher = Xxh3::new();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0;
    while off < mem.len() {
        let n = CHUNK.min(mem.len() - off);
        mem.subslice(off, n)
            .expect("in range")
            .copy_to(&mut buf[..n]);
        hasher.update(&buf[..n]);
        off += n;
    }
    format!("{:016x}", hasher.digest())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_matches_known_splitmix() {
        // splitmix64 seeded with 0: first output 0xe220a8397b1dcdaf.
        assert_eq!(mix(abi::GOLDEN), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn classes_are_roughly_40_30_30() {
        let n = 100_000;
        let mut counts = [0u64; 4];
        for p in 0..n {
            counts[class_of(p) as usize] += 1;
        }
        let pct = |k: u64| counts[k as usize] * 100 / n;
        assert!((38..=42).contains(&pct(abi::KIND_ZERO)), "{counts:?}");
        assert!((28..=32).contains(&pct(abi::KIND_TEXT)), "{counts:?}");
        assert!((28..=32).contains(&pct(abi::KIND_RANDOM)), "{counts:?}");
    }

    #[test]
    fn text_pages_compress_and_random_pages_do_not() {
        let mut page = [0u8; PAGE];
        for p in 0..64 {
            expected_page(p, 1, abi::KIND_TEXT, &mut page);
            let n = lz4_flex::block::compress(&page).len();
            assert!(n <= PAGE / 4, "text page {p} compressed to {n} bytes");
            expected_page(p, 1, abi::KIND_RANDOM, &mut page);
            let n = lz4_flex::block::compress(&page).len();
            assert!(n >= PAGE - 64, "random page {p} compressed to {n} bytes");
        }
    }

    /// A page of each class, for tests that need a valid (page, kind) pair.
    fn page_of_class(kind: u64) -> u64 {
        (0..)
            .find(|&p| class_of(p) == kind)
            .expect("every class occurs")
    }

    const KINDS: [u64; 3] = [abi::KIND_ZERO, abi::KIND_TEXT, abi::KIND_RANDOM];

    #[test]
    fn check_page_accepts_stamps_and_rejects_damage() {
        let (mut page, mut scratch) = ([0u8; PAGE], [0u8; PAGE]);
        assert_eq!(check_page(3, 0, &page, &mut scratch), Ok(()));
        for kind in KINDS {
            let p = page_of_class(kind);
            expected_page(p, 5, kind, &mut page);
            assert_eq!(check_page(p, 5, &page, &mut scratch), Ok(()));
            assert!(
                check_page(p, 4, &page, &mut scratch).is_err(),
                "stale version"
            );
            assert!(
                check_page(p + 1, 5, &page, &mut scratch).is_err(),
                "wrong page"
            );
            assert!(check_page(p, 0, &page, &mut scratch).is_err(), "not zero");
            page[4000] ^= 1;
            assert!(matches!(
                check_page(p, 5, &page, &mut scratch),
                Err(PageFault::Body { offset: 4000, .. })
            ));
        }
    }

    #[test]
    fn slot_versions_follow_the_rewrites() {
        assert_eq!((slot_of(0), slot_of(1)), (None, None));
        assert_eq!(
            (slot_of(2), slot_of(15), slot_of(31)),
            (Some(2), Some(0), Some(1))
        );
        assert_eq!(slot_version(1, 0), 1);
        assert_eq!(slot_version(1, 14), 1);
        assert_eq!(slot_version(5, 3), 3);
        assert_eq!(slot_version(5, 5), 5);
        assert_eq!(slot_version(5, 6), 1, "not rewritten yet");
        assert_eq!(slot_version(5, 1), 1, "version 1 is the full write");
        assert_eq!(slot_version(16, 1), 16);
        assert_eq!(slot_version(16, 2), 2);
        assert_eq!(slot_version(17, 1), 16);
        assert_eq!(slot_version(30, 0), 30);
        assert_eq!(slot_version(44, 0), 30);
        for v in 1..200u32 {
            for s in 0..SLOTS {
                let w = slot_version(v, s);
                assert!(w <= v && (w == 1 || slot_of(w) == Some(s)), "v {v} s {s}");
                assert!((w + 1..=v).all(|x| slot_of(x) != Some(s)), "v {v} s {s}");
            }
        }
    }

    #[test]
    fn step_by_step_writes_match_the_closed_form() {
        let (mut built, mut want) = (Box::new([0u8; PAGE]), Box::new([0u8; PAGE]));
        for kind in KINDS {
            for p in [page_of_class(kind), 1000 + page_of_class(kind)] {
                built.fill(0);
                for v in 1..=70 {
                    apply_write(p, v, kind, &mut built);
                    expected_page(p, v, kind, &mut want);
                    assert_eq!(built[..], want[..], "page {p} kind {kind} version {v}");
                }
            }
        }
    }

    #[test]
    fn a_rewrite_changes_the_header_and_one_slot_only() {
        let (mut old, mut new) = ([0u8; PAGE], [0u8; PAGE]);
        for kind in KINDS {
            let p = page_of_class(kind);
            for v in 2..=40u32 {
                expected_page(p, v - 1, kind, &mut old);
                expected_page(p, v, kind, &mut new);
                let s = slot_of(v).expect("a rewrite");
                let slot = HEADER + s * SLOT..HEADER + (s + 1) * SLOT;
                let changed: Vec<usize> = (0..PAGE).filter(|&i| old[i] != new[i]).collect();
                assert!(
                    changed
                        .iter()
                        .all(|&i| (16..32).contains(&i) || slot.contains(&i)),
                    "kind {kind} v {v}: bytes outside the header and slot {s} changed"
                );
                let in_slot = changed.iter().filter(|&&i| slot.contains(&i)).count();
                match kind {
                    abi::KIND_ZERO => assert_eq!(in_slot, 0, "v {v}"),
                    // 256 random bytes: ~1 in 256 equal by chance.
                    abi::KIND_RANDOM => assert!(in_slot >= 230, "v {v}: {in_slot}"),
                    _ => {}
                }
            }
        }
        // A random slot alone stays incompressible; a text slot compresses.
        expected_page(
            page_of_class(abi::KIND_RANDOM),
            7,
            abi::KIND_RANDOM,
            &mut new,
        );
        let slot = &new[HEADER + 7 * SLOT..][..SLOT];
        assert!(lz4_flex::block::compress(slot).len() >= SLOT);
    }

    #[test]
    fn check_page_catches_stale_and_torn_pages() {
        let (mut page, mut older, mut scratch) = ([0u8; PAGE], [0u8; PAGE], [0u8; PAGE]);
        for kind in [abi::KIND_TEXT, abi::KIND_RANDOM] {
            let p = page_of_class(kind);
            for v in [2u32, 9, 20, 47] {
                expected_page(p, v, kind, &mut page);
                expected_page(p, v - 1, kind, &mut older);
                assert_eq!(check_page(p, v, &page, &mut scratch), Ok(()));
                // Stale: the target kept the previous version.
                assert!(matches!(
                    check_page(p, v, &older, &mut scratch),
                    Err(PageFault::Header { .. })
                ));
                // Torn: the new header over the old slot (the slot's lines
                // were copied before the guest's write, the header after).
                let s = slot_of(v).expect("a rewrite");
                let slot = HEADER + s * SLOT..HEADER + (s + 1) * SLOT;
                let mut torn = page;
                torn[slot.clone()].copy_from_slice(&older[slot.clone()]);
                match check_page(p, v, &torn, &mut scratch) {
                    Err(PageFault::Body { offset, .. }) => assert!(slot.contains(&offset)),
                    other => panic!("torn page passed: {other:?}"),
                }
                // Torn the other way: the old header over the new slot.
                let mut torn = older;
                torn[slot.clone()].copy_from_slice(&page[slot.clone()]);
                assert!(check_page(p, v, &torn, &mut scratch).is_err());
                assert!(check_page(p, v - 1, &torn, &mut scratch).is_err());
                // A slot of another version (a delta applied to the wrong base).
                let mut wrong_base = page;
                let s2 = (s + 1) % SLOTS;
                let other = HEADER + s2 * SLOT..HEADER + (s2 + 1) * SLOT;
                expected_page(p, v + 1, kind, &mut older);
                wrong_base[other.clone()].copy_from_slice(&older[other.clone()]);
                assert!(check_page(p, v, &wrong_base, &mut scratch).is_err());
            }
        }
    }

    #[test]
    fn check_page_rejects_a_wrong_index_or_kind() {
        let (mut page, mut scratch) = ([0u8; PAGE], [0u8; PAGE]);
        let p = page_of_class(abi::KIND_TEXT);
        // A valid stamp of another page (a page sent to the wrong index).
        expected_page(p, 3, abi::KIND_TEXT, &mut page);
        let q = (p + 1..).find(|&q| class_of(q) == abi::KIND_TEXT).unwrap();
        assert!(matches!(
            check_page(q, 3, &page, &mut scratch),
            Err(PageFault::Header {
                what: "wrong page number",
                ..
            })
        ));
        // A self-consistent stamp of the wrong kind for its class.
        let z = page_of_class(abi::KIND_ZERO);
        expected_page(z, 3, abi::KIND_TEXT, &mut page);
        assert!(matches!(
            check_page(z, 3, &page, &mut scratch),
            Err(PageFault::Header {
                what: "kind is not the page's class",
                ..
            })
        ));
        // The fill workload's random stamp is valid on a page of any class.
        expected_page(z, 1, abi::KIND_RANDOM, &mut page);
        assert_eq!(check_page(z, 1, &page, &mut scratch), Ok(()));
        // A kind field changed in place breaks the seed.
        expected_page(p, 3, abi::KIND_TEXT, &mut page);
        page[20] = abi::KIND_RANDOM as u8;
        assert!(check_page(p, 3, &page, &mut scratch).is_err());
    }

    /// A whole memory image built the way the guest builds it: the oracle
    /// passes it, then finds exactly the pages a bad migration damaged.
    #[test]
    fn check_memory_finds_stale_and_torn_pages_in_an_image() {
        let layout = Layout::new(8 << 20).unwrap();
        let mut image = vec![0u8; layout.mem_bytes as usize];
        let mut versions = vec![0u32; layout.data_pages as usize];
        let mut buf = Box::new([0u8; PAGE]);
        let mut x = 7u64;
        // mixed, then 5000 dirty rewrites into the first 100 pages.
        for p in 0..layout.data_pages {
            if class_of(p) != abi::KIND_ZERO {
                versions[p as usize] = 1;
            }
        }
        for _ in 0..5000 {
            x = mix(x.wrapping_add(abi::GOLDEN));
            versions[(x % 100) as usize] += 1;
        }
        let write_image = |image: &mut Vec<u8>, versions: &[u32], buf: &mut [u8; PAGE]| {
            for (p, &v) in versions.iter().enumerate() {
                let p = p as u64;
                expected_page(p, v, class_of(p), buf);
                let gpa = layout.data_page_gpa(p) as usize;
                image[gpa..gpa + PAGE].copy_from_slice(&buf[..]);
                let t = layout.table_gpa as usize + p as usize * 4;
                image[t..t + 4].copy_from_slice(&v.to_le_bytes());
            }
        };
        write_image(&mut image, &versions, &mut buf);
        let check =
            |image: &mut Vec<u8>| check_memory(&VolatileSlice::from(&mut image[..]), &layout);
        let r = check(&mut image);
        assert_eq!(
            (r.pages_bad, r.pages_checked),
            (0, layout.data_pages),
            "{:?}",
            r.first_faults
        );
        assert!(r.pages_stamped > layout.data_pages / 2);

        // Stale: page a keeps version v - 1 while the table says v.
        let a = (0..100)
            .find(|&p| class_of(p) == abi::KIND_RANDOM && versions[p as usize] > 2)
            .unwrap();
        let va = versions[a as usize];
        expected_page(a, va - 1, abi::KIND_RANDOM, &mut buf);
        let gpa = layout.data_page_gpa(a) as usize;
        image[gpa..gpa + PAGE].copy_from_slice(&buf[..]);
        // Torn: page b has its header at v but slot(v) still at v - 1.
        let b = (a + 1..100)
            .find(|&p| class_of(p) == abi::KIND_TEXT && versions[p as usize] > 2)
            .unwrap();
        let vb = versions[b as usize];
        expected_page(b, vb - 1, abi::KIND_TEXT, &mut buf);
        let s = slot_of(vb).unwrap();
        let gpa = layout.data_page_gpa(b) as usize + HEADER + s * SLOT;
        image[gpa..gpa + SLOT].copy_from_slice(&buf[HEADER + s * SLOT..][..SLOT]);
        let r = check(&mut image);
        assert_eq!(r.pages_bad, 2, "{:?}", r.first_faults);
        assert!(matches!(r.first_faults[0], PageFault::Header { page, .. } if page == a));
        assert!(matches!(r.first_faults[1], PageFault::Body { page, .. } if page == b));
    }
}
