//! `--disk-gib`: the source VM's disk image, made in the run itself, and the
//! checks of the target's copy that do not trust the migration code.
//!
//! ```text
//!  raw (default): a sparse image of G GiB with U GiB written in 4 MiB
//!      extents spread over it (random data, every 16th block zero)
//!  ext4 (--disk-fs ext4): mkfs.ext4 -d over a directory of U GiB of files
//!      (random data), then every other file deleted with debugfs, so the
//!      file system frees half of the data blocks the image still holds;
//!      with guest disk writes, the file system leaves the image's last
//!      256 MiB to them (the guest never writes into the file system)
//!  checks: raw: the source VMM's disk hash at the pause == the target
//!      VMM's before it ran; ext4: e2fsck -fn of the target image, and
//!      every surviving file (debugfs cat) identical on both images;
//!      always: the guest's block stamps, checked by the target VMM
//! ```

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde::Serialize;

use super::report::Check;

/// Bytes of a disk block.
const BLOCK: u64 = 4096;
/// Extents of the raw image, and files of the ext4 image: 4 MiB each.
const EXTENT_BYTES: u64 = 4 << 20;
/// With guest disk writes into an ext4 image: the tail left to them.
const GUEST_WINDOW_MIB: u64 = 256;

/// A file system to put in the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFs {
    /// ext4, made by mkfs.ext4 (e2fsprogs).
    Ext4,
}

/// The image a run made.
#[derive(Clone, Debug)]
pub struct Image {
    /// Where it is.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// The file system in it, if any.
    pub fs: Option<DiskFs>,
    /// Bytes the file system spans (0 without one).
    pub fs_bytes: u64,
    /// Files left in the file system (the others were deleted).
    pub files: Vec<String>,
    /// Bytes of the deleted files.
    pub deleted_bytes: u64,
    /// Where the guest's disk writes start, MiB.
    pub write_from_mib: u64,
}

/// Splitmix64: fast, incompressible filler.
fn fill_random(buf: &mut [u8], seed: &mut u64) {
    for chunk in buf.chunks_exact_mut(8) {
        *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
}

/// Random data with every 16th block zero (a zero block inside an
/// allocated extent must go as a zero entry and stay a hole on the target).
fn extent_data(buf: &mut [u8], seed: &mut u64) {
    fill_random(buf, seed);
    for (i, block) in buf.chunks_exact_mut(BLOCK as usize).enumerate() {
        if i % 16 == 15 {
            block.fill(0);
        }
    }
}

/// Allocated bytes of `path` (st_blocks).
pub fn allocated_bytes(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?
        .blocks()
        * 512)
}

/// Makes the image in `dir`: `bytes` big, `used` bytes of data.
pub fn make_image(
    dir: &Path,
    bytes: u64,
    used: u64,
    fs: Option<DiskFs>,
    guest_writes: bool,
) -> Result<Image> {
    if bytes == 0 || !bytes.is_multiple_of(1 << 20) {
        bail!("the disk must be a whole number of MiB");
    }
    if used > bytes {
        bail!("--disk-used-gib is larger than --disk-gib");
    }
    let path = dir.join("disk.img");
    let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    file.set_len(bytes)?;
    let mut seed = 0x5eed_d15c_u64;
    match fs {
        None => {
            let n = used.div_ceil(EXTENT_BYTES);
            let mut buf = vec![0u8; EXTENT_BYTES as usize];
            if let Some(per) = bytes.checked_div(n) {
                // Spread evenly, each extent on a 4 MiB boundary.
                let stride = per / EXTENT_BYTES * EXTENT_BYTES;
                for i in 0..n {
                    let len = (used - i * EXTENT_BYTES).min(EXTENT_BYTES) as usize;
                    extent_data(&mut buf[..len], &mut seed);
                    file.write_all_at(&buf[..len], i * stride)?;
                }
            }
            file.sync_all()?;
            Ok(Image {
                path,
                bytes,
                fs: None,
                fs_bytes: 0,
                files: Vec::new(),
                deleted_bytes: 0,
                write_from_mib: 0,
            })
        }
        Some(DiskFs::Ext4) => {
            drop(file);
            let window = if guest_writes {
                GUEST_WINDOW_MIB << 20
            } else {
                0
            };
            let fs_bytes = bytes
                .checked_sub(window)
                .filter(|&b| b >= 64 << 20)
                .context("the disk is too small for an ext4 file system and the guest's window")?;
            if used > fs_bytes * 8 / 10 {
                bail!(
                    "--disk-used-gib must leave the file system room: at most 80% of its {} MiB",
                    fs_bytes >> 20
                );
            }
            let staging = dir.join("fs-files");
            std::fs::create_dir_all(&staging)?;
            let n = used.div_ceil(EXTENT_BYTES);
            let mut buf = vec![0u8; EXTENT_BYTES as usize];
            let mut names = Vec::new();
            for i in 0..n {
                let len = (used - i * EXTENT_BYTES).min(EXTENT_BYTES) as usize;
                fill_random(&mut buf[..len], &mut seed);
                let name = format!("f{i:05}");
                let mut f = File::create(staging.join(&name))?;
                f.write_all(&buf[..len])?;
                names.push((name, len as u64));
            }
            run(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096", "-d"])
                .arg(&staging)
                .arg(&path)
                .arg(format!("{}k", fs_bytes >> 10)))?;
            std::fs::remove_dir_all(&staging)?;
            // Delete every other file: the file system frees their blocks,
            // the image keeps them allocated.
            let cmds = dir.join("debugfs.cmds");
            let mut script = String::new();
            let (mut files, mut deleted_bytes) = (Vec::new(), 0);
            for (i, (name, len)) in names.into_iter().enumerate() {
                if i % 2 == 1 {
                    script.push_str(&format!("rm /{name}\n"));
                    deleted_bytes += len;
                } else {
                    files.push(name);
                }
            }
            std::fs::write(&cmds, script)?;
            run(Command::new("debugfs")
                .arg("-w")
                .arg("-f")
                .arg(&cmds)
                .arg(&path))?;
            fsck(&path).context("the image ferry-bench made does not pass e2fsck")?;
            Ok(Image {
                path,
                bytes,
                fs: Some(DiskFs::Ext4),
                fs_bytes,
                files,
                deleted_bytes,
                write_from_mib: fs_bytes >> 20,
            })
        }
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| {
        format!(
            "cannot run {:?} (is e2fsprogs installed?)",
            cmd.get_program()
        )
    })?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// e2fsck -fn: a read-only full check.
fn fsck(path: &Path) -> Result<()> {
    run(Command::new("e2fsck").arg("-fn").arg(path)).map(|_| ())
}

/// Hash of one file inside an ext4 image, read with debugfs.
fn file_hash(image: &Path, name: &str) -> Result<u64> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat /{name}"))
        .arg(image)
        .output()
        .context("cannot run debugfs")?;
    if !out.status.success() || out.stdout.is_empty() {
        bail!("debugfs cannot read /{name} from {}", image.display());
    }
    Ok(xxhash(&out.stdout))
}

fn xxhash(data: &[u8]) -> u64 {
    // FNV-1a over 8-byte words: enough to compare two copies.
    let mut h = 0xcbf2_9ce4_8422_2325_u64;
    for w in data.chunks(8) {
        let mut b = [0u8; 8];
        b[..w.len()].copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The ext4 checks of the target's copy: e2fsck clean, and every file that
/// survived the deletions identical on both images.
pub fn check_ext4(image: &Image, target: &Path) -> Check {
    if let Err(e) = fsck(target) {
        return Check::new(false, format!("e2fsck -fn of the target image: {e:#}"));
    }
    for name in &image.files {
        match (file_hash(&image.path, name), file_hash(target, name)) {
            (Ok(a), Ok(b)) if a == b => {}
            (Ok(_), Ok(_)) => return Check::new(false, format!("/{name} differs on the target")),
            (Err(e), _) | (_, Err(e)) => return Check::new(false, format!("{e:#}")),
        }
    }
    Check::new(
        true,
        format!(
            "e2fsck -fn clean; {} files identical on both images",
            image.files.len()
        ),
    )
}

/// The disk figures of a run.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct DiskResult {
    /// Image size.
    pub bytes: u64,
    /// The file system made in it ("none", "ext4").
    pub fs: String,
    /// `--disk-fs-aware` was asked for.
    pub fs_aware: bool,
    /// How the engine chose the bulk blocks.
    pub selection: String,
    /// Allocated bytes of the source image before the migration.
    pub source_allocated_bytes: u64,
    /// Bytes of files deleted from the file system (still allocated).
    pub deleted_bytes: u64,
    /// Blocks the engine found allocated, and the bulk phase sent.
    pub allocated_blocks: u64,
    /// Blocks the bulk phase queued.
    pub bulk_blocks: u64,
    /// Block entries sent in dirty rounds and the final round.
    pub dirty_round_blocks: u64,
    /// Bytes of `Blocks` frames on the wire.
    pub wire_bytes: u64,
    /// wire_bytes / ((allocated_blocks + dirty_round_blocks) x 4 KiB).
    pub wire_ratio: f64,
    /// Block entries by codec.
    pub blocks: u64,
    /// Zero blocks.
    pub blocks_zero: u64,
    /// lz4 blocks.
    pub blocks_lz4: u64,
    /// Raw blocks.
    pub blocks_raw: u64,
    /// XOR-delta blocks.
    pub blocks_xor: u64,
    /// Blocks sent again.
    pub resent_blocks: u64,
    /// Allocated bytes of the target's image.
    pub target_allocated_bytes: u64,
    /// Guest disk writes asked for, MiB/s.
    pub guest_write_mib_s: Option<u32>,
    /// Blocks whose stamps the target VMM checked, and how many were bad.
    pub blocks_checked: u64,
    /// Bad ones.
    pub blocks_bad: u64,
    /// The image was read / written with O_DIRECT (source side).
    pub direct_io: bool,
}
