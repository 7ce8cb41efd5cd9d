//! The image's allocated extents, from `lseek(SEEK_DATA / SEEK_HOLE)`.
//!
//! The bulk phase copies only blocks that hold data; a hole reads as zeros
//! on the target as well, so it need not travel. Extents are in whole
//! [`DISK_BLOCK_BYTES`] blocks: a byte extent that starts or ends inside a
//! block takes the whole block.
//!
//! ```text
//!  bytes   |data..|   hole   |.data|  hole  |data|
//!  blocks  [ 0  ][ 1  ][ 2  ][ 3  ][ 4  ][ 5  ][ 6  ]
//!  result  (0, 2)            (3, 1)       (5, 2)      rounded outward
//! ```
//!
//! Seeking moves the offset of the open file description, which a `dup`
//! shares, so the walk runs on a second open of the same file through
//! `/proc/self/fd/N`: other users of the caller's descriptor (an io_uring
//! reading at explicit offsets, a VMM doing `read`) see no change.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::link::DISK_BLOCK_BYTES;

/// Allocated extents of `file` in whole 4 KiB blocks: (first_block, count),
/// ascending, non-overlapping, adjacent ones merged; byte extents not on block
/// boundaries are rounded outward.
///
/// Uses `lseek(SEEK_DATA / SEEK_HOLE)` on a second open of the file (through
/// `/proc/self/fd/N`), so the offset of `file` is untouched. A file system
/// without `SEEK_DATA` (`EINVAL`) gives one extent covering the whole file, as
/// does a block device. A size that is not a whole number of blocks is an
/// [`io::ErrorKind::InvalidInput`] error.
pub fn data_extents(file: &File) -> io::Result<Vec<(u64, u64)>> {
    let own = reopen(file)?;
    let size_bytes = (&own).seek(SeekFrom::End(0))?;
    extents_with(size_bytes, |offset_bytes, whence| {
        let offset = i64::try_from(offset_bytes).map_err(|_| Errno::EOVERFLOW)?;
        let found = lseek(&own, offset, whence)?;
        u64::try_from(found).map_err(|_| Errno::EOVERFLOW)
    })
}

/// Sum of the counts.
pub fn extent_blocks(extents: &[(u64, u64)]) -> u64 {
    extents.iter().map(|&(_, count)| count).sum()
}

/// Size in bytes of the file or block device behind `file`, without moving
/// its offset.
pub(super) fn image_bytes(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    // A block device's metadata says 0 bytes; seeking to its end says more.
    (&reopen(file)?).seek(SeekFrom::End(0))
}

/// A second open file description of the same file, read-only, with its own
/// offset. (`try_clone` is a `dup` and would share the caller's offset.)
fn reopen(file: &File) -> io::Result<File> {
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("reopening the image through {path}: {e}")))
}

/// The walk, over a `seek` that answers `lseek(offset, whence)`: separate so
/// that tests can feed it what a file system might answer.
fn extents_with(
    size_bytes: u64,
    mut seek: impl FnMut(u64, Whence) -> nix::Result<u64>,
) -> io::Result<Vec<(u64, u64)>> {
    if !size_bytes.is_multiple_of(DISK_BLOCK_BYTES) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "image of {size_bytes} bytes ends in a partial block: its size must be a multiple of {DISK_BLOCK_BYTES}"
            ),
        ));
    }
    let size_blocks = size_bytes / DISK_BLOCK_BYTES;
    let whole_file = || {
        if size_blocks == 0 {
            Vec::new()
        } else {
            vec![(0, size_blocks)]
        }
    };

    let mut extents: Vec<(u64, u64)> = Vec::new();
    let mut offset_bytes = 0;
    while offset_bytes < size_bytes {
        let data_bytes = match seek(offset_bytes, Whence::SeekData) {
            Ok(found) => found,
            // No data at or after the offset.
            Err(Errno::ENXIO) => break,
            // No SEEK_DATA here: everything may be data.
            Err(Errno::EINVAL) => return Ok(whole_file()),
            Err(e) => return Err(e.into()),
        };
        // The file may have grown since it was measured; what lies past the
        // measured size is not ours to report.
        if data_bytes >= size_bytes {
            break;
        }
        if data_bytes < offset_bytes {
            return Err(seek_went_back("SEEK_DATA", offset_bytes, data_bytes));
        }
        let hole_bytes = match seek(data_bytes, Whence::SeekHole) {
            Ok(found) => found.min(size_bytes),
            // Shrunk under us between the two calls: the data ended.
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL) => return Ok(whole_file()),
            Err(e) => return Err(e.into()),
        };
        if hole_bytes <= data_bytes {
            return Err(seek_went_back("SEEK_HOLE", data_bytes, hole_bytes));
        }
        push_merged(
            &mut extents,
            data_bytes / DISK_BLOCK_BYTES,
            hole_bytes.div_ceil(DISK_BLOCK_BYTES),
        );
        offset_bytes = hole_bytes;
    }
    debug_assert!(is_canonical(&extents, size_blocks));
    Ok(extents)
}

/// Appends blocks [first, end), merging with the last extent when they touch
/// or overlap (rounding outward can make two byte extents share a block).
fn push_merged(extents: &mut Vec<(u64, u64)>, first: u64, end: u64) {
    debug_assert!(first < end);
    if let Some(last) = extents.last_mut() {
        let last_end = last.0 + last.1;
        debug_assert!(first >= last.0, "extents must come in ascending order");
        if first <= last_end {
            last.1 = end.max(last_end) - last.0;
            return;
        }
    }
    extents.push((first, end - first));
}

/// Ascending, non-empty, non-touching, inside the file.
fn is_canonical(extents: &[(u64, u64)], size_blocks: u64) -> bool {
    extents
        .iter()
        .all(|&(first, count)| count > 0 && first + count <= size_blocks)
        && extents.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0)
}

fn seek_went_back(what: &str, from_bytes: u64, to_bytes: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("lseek({what}) from byte {from_bytes} answered {to_bytes}, which lies behind it"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::FileExt;
    use std::path::PathBuf;

    use proptest::prelude::*;

    const BLOCK: u64 = DISK_BLOCK_BYTES;

    /// A file in the temp dir, removed on drop.
    struct TempFile {
        path: PathBuf,
        file: File,
    }

    impl TempFile {
        fn new(name: &str, len_bytes: u64) -> Self {
            use std::sync::atomic::{AtomicU64, Ordering};
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "ferry-extents-{}-{}-{name}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .unwrap();
            file.set_len(len_bytes).unwrap();
            Self { path, file }
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Whether the temp dir's file system reports holes at 4 KiB granularity
    /// (tmpfs, ext4): only there are exact answers to be expected; elsewhere
    /// the answer must still cover every written block.
    fn exact_holes(file: &File) -> bool {
        use nix::sys::statfs::{fstatfs, EXT4_SUPER_MAGIC, TMPFS_MAGIC};
        match fstatfs(file) {
            Ok(fs) => [EXT4_SUPER_MAGIC, TMPFS_MAGIC].contains(&fs.filesystem_type()),
            Err(_) => false,
        }
    }

    /// The naive answer: every block a write touched, merged.
    fn oracle(writes: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut blocks: Vec<u64> = writes
            .iter()
            .flat_map(|&(at, len)| at / BLOCK..(at + len).div_ceil(BLOCK))
            .collect();
        blocks.sort_unstable();
        blocks.dedup();
        let mut extents: Vec<(u64, u64)> = Vec::new();
        for b in blocks {
            match extents.last_mut() {
                Some(last) if last.0 + last.1 == b => last.1 += 1,
                _ => extents.push((b, 1)),
            }
        }
        extents
    }

    fn covers(extents: &[(u64, u64)], block: u64) -> bool {
        extents
            .iter()
            .any(|&(first, count)| (first..first + count).contains(&block))
    }

    fn check_writes(writes: &[(u64, u64)], len_bytes: u64) {
        let t = TempFile::new("writes", len_bytes);
        for &(at, len) in writes {
            t.file.write_all_at(&vec![0xA5; len as usize], at).unwrap();
        }
        let got = data_extents(&t.file).unwrap();
        let want = oracle(writes);
        assert!(is_canonical(&got, len_bytes / BLOCK), "{got:?}");
        assert_eq!(extent_blocks(&got), got.iter().map(|e| e.1).sum::<u64>());
        if exact_holes(&t.file) {
            assert_eq!(got, want);
        } else {
            for &(first, count) in &want {
                for b in first..first + count {
                    assert!(
                        covers(&got, b),
                        "block {b} written but not reported: {got:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn sparse_file_with_unaligned_writes() {
        let writes = [
            (0, 1),                   // block 0
            (10 * BLOCK + 100, 5000), // blocks 10-11
            (100 * BLOCK - 1, 2),     // blocks 99-100
            (1 << 20, 8192),          // blocks 256-257
            (258 * BLOCK, 1),         // 258: merges with the previous
            (4095 * BLOCK, BLOCK),    // the last block
        ];
        check_writes(&writes, 4096 * BLOCK);
    }

    #[test]
    fn empty_sparse_gigabyte_has_no_extents() {
        let t = TempFile::new("empty", 1 << 30);
        let got = data_extents(&t.file).unwrap();
        if exact_holes(&t.file) {
            assert_eq!(got, []);
        } else {
            assert!(got.is_empty() || got == [(0, (1 << 30) / BLOCK)], "{got:?}");
        }
    }

    #[test]
    fn zero_length_file_has_no_extents() {
        let t = TempFile::new("zero", 0);
        assert_eq!(data_extents(&t.file).unwrap(), []);
    }

    #[test]
    fn fully_written_file_is_one_extent() {
        let t = TempFile::new("full", 0);
        (&t.file).write_all(&vec![1; 64 * BLOCK as usize]).unwrap();
        assert_eq!(data_extents(&t.file).unwrap(), [(0, 64)]);
        assert_eq!(extent_blocks(&[(0, 64)]), 64);
    }

    #[test]
    fn partial_last_block_is_invalid_input() {
        let t = TempFile::new("partial", 3 * BLOCK + 1);
        let err = data_extents(&t.file).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn caller_offset_is_untouched() {
        let t = TempFile::new("offset", 0);
        (&t.file).write_all(&[7; 3 * BLOCK as usize]).unwrap();
        t.file.set_len(1 << 20).unwrap();
        let dup = t.file.try_clone().unwrap();
        (&t.file).seek(SeekFrom::Start(1234)).unwrap();
        assert_eq!(data_extents(&dup).unwrap()[0], (0, 3));
        assert_eq!((&t.file).stream_position().unwrap(), 1234);
        let mut byte = [0];
        (&dup).read_exact(&mut byte).unwrap();
        assert_eq!(byte, [7]);
    }

    #[test]
    fn image_bytes_of_a_regular_file() {
        let t = TempFile::new("size", 5 * BLOCK);
        assert_eq!(image_bytes(&t.file).unwrap(), 5 * BLOCK);
    }

    #[test]
    fn no_seek_data_gives_the_whole_file() {
        let got = extents_with(8 * BLOCK, |_, _| Err(Errno::EINVAL)).unwrap();
        assert_eq!(got, [(0, 8)]);
        assert_eq!(extents_with(0, |_, _| Err(Errno::EINVAL)).unwrap(), []);
    }

    #[test]
    fn seek_errors_are_reported() {
        let err = extents_with(8 * BLOCK, |_, _| Err(Errno::EIO)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        // A hole before the data it was asked from is a broken answer, not a loop.
        let err = extents_with(8 * BLOCK, |at, whence| match whence {
            Whence::SeekData => Ok(at + BLOCK),
            _ => Ok(at),
        })
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let err = extents_with(8 * BLOCK, |_, whence| match whence {
            // Data at 0 again after the extent [0, 1) was walked.
            Whence::SeekData => Ok(0),
            _ => Ok(BLOCK),
        })
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn growth_past_the_measured_size_is_ignored() {
        // Data found beyond the size measured first, and a hole beyond it.
        let got = extents_with(4 * BLOCK, |at, whence| match whence {
            Whence::SeekData if at == 0 => Ok(2 * BLOCK),
            Whence::SeekData => Ok(100 * BLOCK),
            _ => Ok(100 * BLOCK + 1),
        })
        .unwrap();
        assert_eq!(got, [(2, 2)]);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        #[test]
        fn matches_naive_oracle(writes in proptest::collection::vec((0u64..512 * BLOCK, 1u64..3 * BLOCK), 0..12)) {
            let len_bytes = 520 * BLOCK;
            check_writes(&writes, len_bytes);
        }
    }
}
