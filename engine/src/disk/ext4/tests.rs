use super::*;
use crate::disk::extents::data_extents;
use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const MIB: usize = 1 << 20;

/// An e2fsprogs tool, from PATH or the sbin directories PATH may lack.
fn tool(name: &str) -> Option<PathBuf> {
    let candidates = [
        PathBuf::from(name),
        Path::new("/usr/sbin").join(name),
        Path::new("/sbin").join(name),
    ];
    candidates
        .into_iter()
        .find(|path| Command::new(path).arg("-V").output().is_ok())
}

/// Returns from the test, saying why, when e2fsprogs is missing.
macro_rules! require_e2fsprogs {
    () => {
        if let Some(missing) = ["mkfs.ext4", "debugfs", "dumpe2fs"]
            .into_iter()
            .find(|name| tool(name).is_none())
        {
            eprintln!("skipped: {missing} (e2fsprogs) is not installed");
            return;
        }
    };
}

fn run(name: &str, args: &[&str]) -> String {
    let path = tool(name).unwrap_or_else(|| panic!("{name} is not installed"));
    let out = Command::new(&path).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{name} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A directory in the temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ferry-ext4-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            // xorshift64
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// `mkfs.ext4 -q -F -d <root> -b <bs> <opts> <img> <size>` with two 8 MiB
/// files and a few small ones, then `rm /a` with debugfs: its blocks stay
/// allocated in the image but are free in the file system.
fn build_image(scratch: &Scratch, block_bytes: u32, opts: &[&str], size: &str) -> PathBuf {
    let root = scratch.path("root");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("a"), random_bytes(8 * MIB, 1)).unwrap();
    std::fs::write(root.join("b"), random_bytes(8 * MIB, 2)).unwrap();
    std::fs::write(root.join("c"), random_bytes(5000, 3)).unwrap();
    std::fs::write(root.join("sub/d"), random_bytes(100_000, 4)).unwrap();
    let img = scratch.path("img");
    let bs = block_bytes.to_string();
    let mut args = vec!["-q", "-F", "-d", root.to_str().unwrap(), "-b", &bs];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[img.to_str().unwrap(), size]);
    run("mkfs.ext4", &args);
    run("debugfs", &["-w", "-R", "rm /a", img.to_str().unwrap()]);
    img
}

/// What `dumpe2fs` says: the independent oracle.
struct Dump {
    blocks: u64,
    block_bytes: u64,
    groups: u64,
    uninit_groups: u64,
    /// Per-group "Free blocks:" ranges, inclusive.
    free: Vec<(u64, u64)>,
}

fn dumpe2fs(img: &Path) -> Dump {
    let text = run("dumpe2fs", &[img.to_str().unwrap()]);
    let header = |key: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key}"));
        line[key.len()..].trim().parse().unwrap()
    };
    let mut dump = Dump {
        blocks: header("Block count:"),
        block_bytes: header("Block size:"),
        groups: 0,
        uninit_groups: 0,
        free: Vec::new(),
    };
    for line in text.lines() {
        // "Group 3: (Blocks ...", not "Group descriptor size:".
        if line
            .strip_prefix("Group ")
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        {
            dump.groups += 1;
            dump.uninit_groups += u64::from(line.contains("BLOCK_UNINIT"));
        }
        // Indented: the group's line, not the superblock's total.
        if let Some(ranges) = line.strip_prefix("  Free blocks: ") {
            for range in ranges.split(", ").filter(|r| !r.is_empty()) {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                dump.free.push((a.parse().unwrap(), b.parse().unwrap()));
            }
        }
    }
    dump
}

/// The used image blocks dumpe2fs implies, by the rules of `FsUsage`.
fn oracle_used(dump: &Dump) -> Vec<u64> {
    let mut fs_used = vec![true; dump.blocks as usize];
    for &(a, b) in &dump.free {
        fs_used[a as usize..=b as usize]
            .iter_mut()
            .for_each(|u| *u = false);
    }
    let fs_bytes = dump.blocks * dump.block_bytes;
    let image_blocks = fs_bytes.div_ceil(DISK_BLOCK_BYTES);
    let per_image = (DISK_BLOCK_BYTES / dump.block_bytes) as usize;
    let mut used = vec![0u64; image_blocks.div_ceil(64) as usize];
    for (i, chunk) in fs_used.chunks(per_image).enumerate() {
        let partial = chunk.len() < per_image;
        if partial || chunk.iter().any(|&u| u) {
            used[i / 64] |= 1 << (i % 64);
        }
    }
    used
}

fn check_against_dumpe2fs(img: &Path, block_bytes: u32) -> FsUsage {
    let dump = dumpe2fs(img);
    let file = File::open(img).unwrap();
    let usage = used_blocks(&file).unwrap();
    assert_eq!(u64::from(usage.block_size), dump.block_bytes);
    assert_eq!(usage.block_size, block_bytes);
    assert_eq!(usage.groups, dump.groups);
    assert_eq!(
        usage.uninit_groups, dump.uninit_groups,
        "BLOCK_UNINIT groups"
    );
    assert_eq!(
        usage.fs_image_blocks,
        (dump.blocks * dump.block_bytes).div_ceil(DISK_BLOCK_BYTES)
    );
    let want = oracle_used(&dump);
    if usage.used != want {
        let differ: Vec<u64> = (0..usage.fs_image_blocks)
            .filter(|&b| usage.is_used(b) != (want[(b / 64) as usize] >> (b % 64) & 1 == 1))
            .take(20)
            .collect();
        panic!(
            "used image blocks differ from dumpe2fs at {differ:?} (ours used: {:?})",
            differ.iter().map(|&b| usage.is_used(b)).collect::<Vec<_>>()
        );
    }
    let popcount: u64 = usage.used.iter().map(|w| u64::from(w.count_ones())).sum();
    assert_eq!(usage.used_blocks, popcount);

    // The deleted 8 MiB file: still allocated in the image, unused by the fs.
    let len = file.metadata().unwrap().len();
    if len.is_multiple_of(DISK_BLOCK_BYTES) {
        let allocated_unused: u64 = data_extents(&file)
            .unwrap()
            .iter()
            .flat_map(|&(first, count)| first..first + count)
            .filter(|&b| b < usage.fs_image_blocks && !usage.is_used(b))
            .count() as u64;
        assert!(
            allocated_unused >= 2000,
            "only {allocated_unused} allocated blocks are unused"
        );
    }
    usage
}

fn check_config(name: &str, block_bytes: u32, opts: &[&str], size: &str) -> FsUsage {
    let scratch = Scratch::new(name);
    let img = build_image(&scratch, block_bytes, opts, size);
    check_against_dumpe2fs(&img, block_bytes)
}

#[test]
fn four_k_default_matches_dumpe2fs() {
    require_e2fsprogs!();
    check_config("4k", 4096, &[], "256M");
}

#[test]
fn four_k_small_groups_partial_last_group_matches_dumpe2fs() {
    require_e2fsprogs!();
    let usage = check_config("4k-g", 4096, &["-g", "8192"], "200M");
    assert_eq!(usage.groups, 7);
    assert!(
        usage.uninit_groups > 0,
        "the BLOCK_UNINIT path went untested"
    );
}

#[test]
fn four_k_without_64bit_matches_dumpe2fs() {
    require_e2fsprogs!();
    check_config("4k-no64", 4096, &["-O", "^64bit", "-g", "8192"], "160M");
}

#[test]
fn two_k_matches_dumpe2fs() {
    require_e2fsprogs!();
    check_config("2k", 2048, &[], "96M");
}

#[test]
fn one_k_default_matches_dumpe2fs() {
    require_e2fsprogs!();
    let usage = check_config("1k", 1024, &[], "64M");
    assert!(
        usage.uninit_groups > 0,
        "the BLOCK_UNINIT path went untested"
    );
}

#[test]
fn one_k_without_64bit_partial_last_group_matches_dumpe2fs() {
    require_e2fsprogs!();
    check_config("1k-no64", 1024, &["-O", "^64bit"], "100M");
}

#[test]
fn one_k_meta_bg_matches_dumpe2fs() {
    require_e2fsprogs!();
    // 64 groups of 1 MiB, 16 descriptors a block: 4 meta groups.
    let usage = check_config(
        "1k-meta",
        1024,
        &["-O", "meta_bg,^resize_inode", "-g", "1024"],
        "64M",
    );
    assert_eq!(usage.groups, 64);
}

#[test]
fn four_k_meta_bg_without_64bit_matches_dumpe2fs() {
    require_e2fsprogs!();
    // 256 groups of 1 MiB, 128 descriptors a block: 2 meta groups.
    check_config(
        "4k-meta",
        4096,
        &["-O", "meta_bg,^resize_inode,^64bit", "-g", "256"],
        "256M",
    );
}

#[test]
fn gdt_csum_matches_dumpe2fs() {
    require_e2fsprogs!();
    let usage = check_config(
        "gdt-csum",
        4096,
        &["-O", "^metadata_csum,uninit_bg", "-g", "8192"],
        "128M",
    );
    assert!(
        usage.uninit_groups > 0,
        "the BLOCK_UNINIT path went untested"
    );
}

#[test]
fn no_checksums_no_journal_matches_dumpe2fs() {
    require_e2fsprogs!();
    let opts = ["-O", "^has_journal,^metadata_csum,^flex_bg,^64bit"];
    let usage = check_config("ext2ish", 1024, &opts, "64M");
    assert_eq!(usage.uninit_groups, 0);
}

#[test]
fn sparse_super2_matches_dumpe2fs() {
    require_e2fsprogs!();
    check_config(
        "sparse2",
        4096,
        &["-O", "sparse_super2", "-g", "8192"],
        "128M",
    );
}

#[test]
fn without_sparse_super_matches_dumpe2fs() {
    require_e2fsprogs!();
    check_config(
        "nosparse",
        1024,
        &["-O", "^sparse_super,^resize_inode"],
        "64M",
    );
}

#[test]
fn partial_trailing_image_block_is_used() {
    require_e2fsprogs!();
    // 65537 blocks of 1 KiB: the last 4 KiB image block holds one fs block.
    let usage = check_config("odd", 1024, &[], "65537K");
    assert_eq!(usage.fs_image_blocks, 16385);
    assert!(usage.is_used(16384));
}

#[test]
fn non_ext4_files_are_not_ext4() {
    let scratch = Scratch::new("notext4");
    for (name, bytes) in [
        ("empty", Vec::new()),
        ("tiny", vec![0xEF; 100]),
        ("zeros", vec![0; MIB]),
        ("random", random_bytes(MIB, 5)),
    ] {
        let path = scratch.path(name);
        std::fs::write(&path, bytes).unwrap();
        let err = used_blocks(&File::open(&path).unwrap()).unwrap_err();
        assert!(matches!(err, Ext4Error::NotExt4(_)), "{name}: {err}");
    }
}

#[test]
fn truncated_images_are_errors() {
    require_e2fsprogs!();
    let scratch = Scratch::new("truncated");
    let img = build_image(&scratch, 1024, &[], "64M");
    for len in [(64 << 20) - 1, 1 << 20, 8192, 2048] {
        File::options()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(len)
            .unwrap();
        let err = used_blocks(&File::open(&img).unwrap()).unwrap_err();
        assert!(matches!(err, Ext4Error::Corrupt(_)), "{len} bytes: {err}");
    }
    File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(1500)
        .unwrap();
    let err = used_blocks(&File::open(&img).unwrap()).unwrap_err();
    assert!(matches!(err, Ext4Error::NotExt4(_)), "{err}");
}

#[test]
fn unreadable_descriptor_is_an_io_error() {
    require_e2fsprogs!();
    let scratch = Scratch::new("writeonly");
    let img = build_image(&scratch, 4096, &[], "64M");
    let write_only = File::options().write(true).open(&img).unwrap();
    assert!(matches!(used_blocks(&write_only), Err(Ext4Error::Io(_))));
}

/// Writes `bytes` at `at`, runs `f`, and puts the old bytes back.
fn with_poke<T>(file: &File, at: u64, bytes: &[u8], f: impl FnOnce() -> T) -> T {
    let mut old = vec![0; bytes.len()];
    file.read_exact_at(&mut old, at).unwrap();
    file.write_all_at(bytes, at).unwrap();
    let result = f();
    file.write_all_at(&old, at).unwrap();
    result
}

fn read_byte(file: &File, at: u64) -> u8 {
    let mut byte = [0];
    file.read_exact_at(&mut byte, at).unwrap();
    byte[0]
}

/// Whatever `used_blocks` answers for a damaged image, it answers without
/// panicking, and an answer it gives keeps its own invariants.
fn check_answer(file: &File) -> Result<FsUsage, Ext4Error> {
    let result = used_blocks(file);
    if let Ok(usage) = &result {
        assert_eq!(usage.used.len() as u64, usage.fs_image_blocks.div_ceil(64));
        assert!(usage.fs_image_blocks <= file.metadata().unwrap().len().div_ceil(DISK_BLOCK_BYTES));
        assert!(usage.uninit_groups <= usage.groups);
        let popcount: u64 = usage.used.iter().map(|w| u64::from(w.count_ones())).sum();
        assert_eq!(usage.used_blocks, popcount);
    }
    result
}

#[test]
fn every_poked_metadata_byte_is_an_error_with_metadata_csum() {
    require_e2fsprogs!();
    let scratch = Scratch::new("poke-csum");
    let img = build_image(&scratch, 1024, &[], "64M");
    let file = File::options().read(true).write(true).open(&img).unwrap();
    let usage = used_blocks(&file).unwrap();
    // 1 KiB blocks: superblock in block 1, 64-byte descriptors from block 2.
    let descs_end = 2048 + usage.groups * 64;
    for at in 1024..descs_end {
        let poked = read_byte(&file, at) ^ 0xFF;
        let result = with_poke(&file, at, &[poked], || check_answer(&file));
        assert!(result.is_err(), "byte {at} poked went unnoticed");
    }
    // Group 0's block bitmap: its checksum notices a flipped bit.
    let mut desc = [0u8; 64];
    file.read_exact_at(&mut desc, 2048).unwrap();
    let bitmap_at = u64::from(le32(&desc, 0)) * 1024;
    for at in [bitmap_at, bitmap_at + 100, bitmap_at + 1023] {
        let poked = read_byte(&file, at) ^ 0x10;
        let result = with_poke(&file, at, &[poked], || check_answer(&file));
        assert!(
            matches!(result, Err(Ext4Error::Corrupt(_))),
            "bitmap byte {at}"
        );
    }
    assert_eq!(used_blocks(&file).unwrap(), usage);
}

/// A file system without checksums, where damage reaches the checks of
/// counts and locations.
fn unchecked_image(scratch: &Scratch) -> PathBuf {
    build_image(
        scratch,
        1024,
        &["-O", "^has_journal,^metadata_csum,^64bit"],
        "64M",
    )
}

#[test]
fn every_poked_metadata_byte_without_checksums_is_handled() {
    require_e2fsprogs!();
    let scratch = Scratch::new("poke-plain");
    let img = unchecked_image(&scratch);
    let file = File::options().read(true).write(true).open(&img).unwrap();
    let usage = used_blocks(&file).unwrap();
    let descs_end = 2048 + usage.groups * 32;
    for at in 1024..descs_end {
        let old = read_byte(&file, at);
        for poked in [0, 0xFF, old ^ 1, old ^ 0x80] {
            let _ = with_poke(&file, at, &[poked], || check_answer(&file));
        }
    }
    assert_eq!(used_blocks(&file).unwrap(), usage);
}

#[test]
fn random_pokes_never_panic() {
    require_e2fsprogs!();
    let scratch = Scratch::new("poke-random");
    let img = unchecked_image(&scratch);
    let file = File::options().read(true).write(true).open(&img).unwrap();
    let usage = used_blocks(&file).unwrap();
    let pokes = proptest::collection::vec((1024u64..8192, any::<u8>()), 1..8);
    let mut runner = TestRunner::new(Config {
        cases: 256,
        ..Config::default()
    });
    runner
        .run(&pokes, |pokes| {
            let mut old = Vec::new();
            for &(at, byte) in &pokes {
                old.push((at, read_byte(&file, at)));
                file.write_all_at(&[byte], at).unwrap();
            }
            let _ = check_answer(&file);
            for &(at, byte) in old.iter().rev() {
                file.write_all_at(&[byte], at).unwrap();
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(used_blocks(&file).unwrap(), usage);
}

#[test]
fn damaged_fields_give_the_right_error() {
    require_e2fsprogs!();
    let scratch = Scratch::new("fields");
    let img = unchecked_image(&scratch);
    let file = File::options().read(true).write(true).open(&img).unwrap();
    let sb = |field: u64| 1024 + field;
    let le = |v: u32| v.to_le_bytes();
    let incompat = read_u32(&file, sb(0x60));
    let ro_compat = read_u32(&file, sb(0x64));
    let blocks = u64::from(read_u32(&file, sb(0x4)));
    /// What is damaged, where, the bytes written there, the error expected.
    type Case = (&'static str, u64, Vec<u8>, fn(&Ext4Error) -> bool);
    let cases: Vec<Case> = vec![
        ("magic", sb(0x38), vec![0x53, 0xEE], |e| {
            matches!(e, NotExt4(_))
        }),
        (
            "block count past the image",
            sb(0x4),
            le(0xFFFF_FFF0).to_vec(),
            |e| matches!(e, Corrupt(_)),
        ),
        ("block count zero", sb(0x4), le(0).to_vec(), |e| {
            matches!(e, Corrupt(_))
        }),
        ("block size 8 KiB", sb(0x18), le(3).to_vec(), |e| {
            matches!(e, Unsupported(_))
        }),
        ("block size absurd", sb(0x18), le(40).to_vec(), |e| {
            matches!(e, Unsupported(_))
        }),
        (
            "bigalloc",
            sb(0x64),
            le(ro_compat | RO_COMPAT_BIGALLOC).to_vec(),
            |e| matches!(e, Unsupported(_)),
        ),
        (
            "unknown ro_compat",
            sb(0x64),
            le(ro_compat | 0x4000_0000).to_vec(),
            |e| matches!(e, Unsupported(_)),
        ),
        (
            "needs_recovery",
            sb(0x60),
            le(incompat | INCOMPAT_RECOVER).to_vec(),
            |e| matches!(e, Unsupported(m) if m.contains("needs_recovery")),
        ),
        (
            "unknown incompat",
            sb(0x60),
            le(incompat | 0x1000_0000).to_vec(),
            |e| matches!(e, Unsupported(_)),
        ),
        ("not clean", sb(0x3A), vec![0, 0], |e| {
            matches!(e, Unsupported(_))
        }),
        ("errors", sb(0x3A), vec![3, 0], |e| {
            matches!(e, Unsupported(_))
        }),
        ("blocks per group 7", sb(0x20), le(7).to_vec(), |e| {
            matches!(e, Corrupt(_))
        }),
        (
            "blocks per group huge",
            sb(0x20),
            le(1 << 30).to_vec(),
            |e| matches!(e, Corrupt(_)),
        ),
        ("inodes per group", sb(0x28), le(u32::MAX).to_vec(), |e| {
            matches!(e, Corrupt(_))
        }),
        ("first data block", sb(0x14), le(0).to_vec(), |e| {
            matches!(e, Corrupt(_))
        }),
        // Descriptors: 32 bytes each from block 2.
        (
            "bitmap past the fs",
            2048,
            le(blocks as u32 + 5).to_vec(),
            |e| matches!(e, Corrupt(_)),
        ),
        ("bitmap on the superblock", 2048, le(1).to_vec(), |e| {
            matches!(e, Corrupt(_))
        }),
        (
            "inode table past the fs",
            2048 + 32 + 8,
            le(blocks as u32 - 1).to_vec(),
            |e| matches!(e, Corrupt(_)),
        ),
        ("free count", 2048 + 0xC, vec![0, 0], |e| {
            matches!(e, Corrupt(_))
        }),
    ];
    for (what, at, bytes, expected) in cases {
        let result = with_poke(&file, at, &bytes, || check_answer(&file));
        match result {
            Err(e) => assert!(expected(&e), "{what}: unexpected error {e}"),
            Ok(_) => panic!("{what}: no error"),
        }
    }
    used_blocks(&file).unwrap();
}

fn read_u32(file: &File, at: u64) -> u32 {
    let mut b = [0; 4];
    file.read_exact_at(&mut b, at).unwrap();
    u32::from_le_bytes(b)
}

#[test]
fn checksums_match_their_definitions() {
    // CRC-32C check value, and ext4's form of it without the inversions.
    assert_eq!(!ext4_crc32c(!0, b"123456789"), 0xE306_9283);
    // CRC-16/ARC check value (initial 0): Linux's crc16.
    assert_eq!(crc16(0, b"123456789"), 0xBB3D);
}

fn naive_runs(words: &[u64], bits: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for i in (0..bits).filter(|&i| words[(i / 64) as usize] >> (i % 64) & 1 == 1) {
        match runs.last_mut() {
            Some(run) if run.1 == i => run.1 += 1,
            _ => runs.push((i, i + 1)),
        }
    }
    runs
}

proptest! {
    #[test]
    fn runs_match_naive(words in proptest::collection::vec(
        prop_oneof![Just(0u64), Just(!0u64), any::<u64>()], 1..6), cut in 0u64..64) {
        let bits = (words.len() as u64 * 64).saturating_sub(cut);
        let mut runs = Vec::new();
        for_each_run(&words, bits, |a, b| runs.push((a, b)));
        prop_assert_eq!(runs, naive_runs(&words, bits));
    }

    #[test]
    fn set_bits_matches_naive(first in 0u64..320, len in 0u64..320) {
        let end = (first + len).min(320);
        let mut words = vec![0u64; 5];
        set_bits(&mut words, first, end);
        for i in 0..320 {
            prop_assert_eq!(words[(i / 64) as usize] >> (i % 64) & 1 == 1, (first..end).contains(&i));
        }
    }
}
