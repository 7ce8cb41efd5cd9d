//! The stamp generator in Rust and the checks built on it: the test oracle.
//!
//! Every page the guest writes is a pure function of (page, version, kind):
//!
//! ```text
//! offset  0  u64  PAGE_MAGIC ("FRRYPAGE")
//!         8  u64  data page number
//!        16  u64  version (low 32 bits) | kind << 32
//!        24  u64  seed = mix(page * GOLDEN ^ (kind << 32 | version))
//!        32  4 x u64 zero
//!        64  body, 4032 bytes:
//!              KIND_RANDOM: word i = mix(seed + (i + 1) * GOLDEN), i < 504
//!              KIND_TEXT:   line j = TEXT_TABLE[mix(seed + (j + 1) * GOLDEN) & 7], j < 63
//!              KIND_ZERO:   zeros
//! ```
//!
//! `mix` is the splitmix64 finaliser. The version table (u32 per data page at
//! `Layout::table_gpa`) holds each page's version; version 0 means never
//! written, and the page must then be all zero. A page's class (which kind
//! the mixed and dirty workloads give it) is `mix(page ^ CLASS_SALT) % 100`:
//! below 40 zero, below 70 text, else random.
//!
//! [`check_memory`] never trusts the migration code: it needs only the memory.

use vm_memory::VolatileSlice;
use xxhash_rust::xxh3::Xxh3;

use crate::abi;
use crate::guest::TEXT_TABLE;
use crate::layout::{Layout, PAGE_BYTES};

const PAGE: usize = PAGE_BYTES as usize;

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

/// Fills `out` with the page the guest writes for (page, version, kind).
pub fn expected_page(page: u64, version: u32, kind: u64, out: &mut [u8; PAGE]) {
    out.fill(0);
    let seed = page_seed(page, version, kind);
    out[0..8].copy_from_slice(&abi::PAGE_MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&page.to_le_bytes());
    out[16..24].copy_from_slice(&(kind << 32 | u64::from(version)).to_le_bytes());
    out[24..32].copy_from_slice(&seed.to_le_bytes());
    let body = &mut out[abi::HEADER_BYTES as usize..];
    match kind {
        abi::KIND_RANDOM => {
            let mut state = seed;
            for w in body.chunks_exact_mut(8) {
                state = state.wrapping_add(abi::GOLDEN);
                w.copy_from_slice(&mix(state).to_le_bytes());
            }
        }
        abi::KIND_TEXT => {
            let mut state = seed;
            for line in body.chunks_exact_mut(64) {
                state = state.wrapping_add(abi::GOLDEN);
                let i = (mix(state) & 7) as usize * 64;
                line.copy_from_slice(&TEXT_TABLE[i..i + 64]);
            }
        }
        _ => {}
    }
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

    #[test]
    fn check_page_accepts_stamps_and_rejects_damage() {
        let (mut page, mut scratch) = ([0u8; PAGE], [0u8; PAGE]);
        assert_eq!(check_page(3, 0, &page, &mut scratch), Ok(()));
        for kind in [abi::KIND_ZERO, abi::KIND_TEXT, abi::KIND_RANDOM] {
            expected_page(7, 5, kind, &mut page);
            assert_eq!(check_page(7, 5, &page, &mut scratch), Ok(()));
            assert!(
                check_page(7, 4, &page, &mut scratch).is_err(),
                "stale version"
            );
            assert!(check_page(8, 5, &page, &mut scratch).is_err(), "wrong page");
            assert!(check_page(7, 0, &page, &mut scratch).is_err(), "not zero");
            page[4000] ^= 1;
            assert!(matches!(
                check_page(7, 5, &page, &mut scratch),
                Err(PageFault::Body { offset: 4000, .. })
            ));
        }
    }
}
