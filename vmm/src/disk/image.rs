//! The disk image: a raw file of 4 KiB blocks, read and written with
//! positional I/O (pread / pwrite), plus the disk dirty log.
//!
//! The VMM does its I/O through an open file description of its own and
//! hands ferryd another one: status flags live in the description, so
//! ferryd may set O_DIRECT on its descriptor (or seek it) without breaking
//! the VMM's buffered, unaligned I/O. A source opens the image twice; a
//! target reopens the descriptor ferryd passed through /proc/self/fd.
//!
//! The image is used buffered. An O_DIRECT read writes back dirty
//! page-cache pages of its range first, and an O_DIRECT write invalidates
//! them, so a block whose pwrite() returned before its bit was set is what
//! ferryd reads after the sync, and what ferryd wrote is what a target reads.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use ferry_engine::link::{DiskSpec, DISK_BLOCK_BYTES, DISK_BYTES_MAX};
use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use xxhash_rust::xxh3::Xxh3;

use super::DiskError;
use crate::bitmap::AtomicBitmap;

/// Bytes of a block.
pub const BLOCK_BYTES: usize = DISK_BLOCK_BYTES as usize;
/// Bytes per read of [`Disk::hash`]: 1 MiB = 256 blocks per pread().
const HASH_READ_BYTES: u64 = 1 << 20;

/// A disk block number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockIndex(pub u64);

impl BlockIndex {
    /// Byte offset of the block in the image.
    pub fn offset(self) -> u64 {
        self.0 * DISK_BLOCK_BYTES
    }
}

/// Reading whole blocks.
pub trait BlockRead {
    /// Blocks of the disk.
    fn blocks(&self) -> u64;
    /// Reads block `block` into `out`.
    fn read_block(&self, block: BlockIndex, out: &mut [u8; BLOCK_BYTES]) -> Result<(), DiskError>;
}

/// Writing whole blocks.
pub trait BlockWrite {
    /// Writes `data` to block `block`; it is in the image when this returns.
    fn write_block(&self, block: BlockIndex, data: &[u8; BLOCK_BYTES]) -> Result<(), DiskError>;
}

/// A block of all zeros, as a hole reads.
fn is_zero(block: &[u8]) -> bool {
    block.iter().all(|&b| b == 0)
}

/// The disk hash: xxh3-64 over (block index u64 LE, content) of every
/// non-zero block in index order, as 16 lowercase hex digits. Zero blocks
/// and holes add nothing, so the hash does not depend on what is allocated.
#[derive(Default)]
pub struct DiskHasher {
    hasher: Xxh3,
    last: Option<u64>,
}

impl DiskHasher {
    /// Adds block `index` (indices strictly increasing).
    pub fn block(&mut self, index: u64, data: &[u8]) {
        assert_eq!(data.len(), BLOCK_BYTES);
        assert!(self.last.is_none_or(|l| l < index), "blocks out of order");
        self.last = Some(index);
        if !is_zero(data) {
            self.hasher.update(&index.to_le_bytes());
            self.hasher.update(data);
        }
    }

    /// The hash.
    pub fn finish(&self) -> String {
        format!("{:016x}", self.hasher.digest())
    }
}

/// The hash of [`DiskHasher`] over every block of `disk`, read one by one
/// (for in-memory disks; [`Disk::hash`] visits only allocated extents).
pub fn hash_all(disk: &impl BlockRead) -> Result<String, DiskError> {
    let mut h = DiskHasher::default();
    let mut buf = Box::new([0u8; BLOCK_BYTES]);
    for b in 0..disk.blocks() {
        disk.read_block(BlockIndex(b), &mut buf)?;
        h.block(b, &buf[..]);
    }
    Ok(h.finish())
}

/// The VM's disk: the image and its dirty log.
#[derive(Debug)]
pub struct Disk {
    /// The VMM's own description: all its I/O and seeks.
    file: File,
    /// The description ferryd gets (source) or gave (target).
    link_file: File,
    name: String,
    bytes: u64,
    log: AtomicBitmap,
    logging: AtomicBool,
}

impl Disk {
    /// Opens an existing image read-write (a source VMM, or standalone). Its
    /// size must be a non-zero multiple of 4 KiB, at most ferry's cap.
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let name = path.display().to_string();
        let err = |op| {
            let name = name.clone();
            move |source| DiskError::Open {
                op,
                path: name,
                source,
            }
        };
        let open = || OpenOptions::new().read(true).write(true).open(path);
        let file = open().map_err(err("open"))?;
        let meta = file.metadata().map_err(err("stat"))?;
        if !meta.is_file() {
            return Err(DiskError::Size {
                path: name,
                bytes: meta.len(),
                why: "not a regular file (a raw image file is needed)".into(),
            });
        }
        let link_file = open().map_err(err("open"))?;
        Self::new(file, link_file, name, meta.len())
    }

    /// A disk over a descriptor ferryd passed (a target VMM): its size is
    /// the spec's. The image is not read or written here: ferryd fills it
    /// during the migration, and [`Self::check_size`] checks it at restore.
    pub fn from_fd(fd: OwnedFd, bytes: u64) -> Result<Self, DiskError> {
        let raw = fd.as_raw_fd();
        let name = format!("(descriptor {raw} from ferryd)");
        let link_file = File::from(fd);
        let proc_path = format!("/proc/self/fd/{raw}");
        let file = match OpenOptions::new().read(true).write(true).open(&proc_path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(
                    "cannot reopen the disk image through {proc_path} ({e}); sharing ferryd's \
                     descriptor, which must then stay without O_DIRECT"
                );
                link_file.try_clone().map_err(|source| DiskError::Open {
                    op: "dup",
                    path: name.clone(),
                    source,
                })?
            }
        };
        Self::new(file, link_file, name, bytes)
    }

    fn new(file: File, link_file: File, name: String, bytes: u64) -> Result<Self, DiskError> {
        if (DiskSpec { bytes }).validate().is_err() {
            return Err(DiskError::Size {
                path: name,
                bytes,
                why: format!(
                    "it must be a non-zero multiple of {DISK_BLOCK_BYTES} bytes, at most \
                     {DISK_BYTES_MAX} ({} GiB)",
                    DISK_BYTES_MAX >> 30
                ),
            });
        }
        Ok(Disk {
            file,
            link_file,
            name,
            bytes,
            log: AtomicBitmap::new(bytes / DISK_BLOCK_BYTES),
            logging: AtomicBool::new(false),
        })
    }

    /// Bytes of the disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The image's descriptor for ferryd (a description of its own).
    pub fn raw_fd(&self) -> RawFd {
        self.link_file.as_raw_fd()
    }

    /// Checks that the image still has the disk's size.
    pub fn check_size(&self) -> Result<(), DiskError> {
        let have = self
            .file
            .metadata()
            .map_err(|source| DiskError::Open {
                op: "stat",
                path: self.name.clone(),
                source,
            })?
            .len();
        if have != self.bytes {
            return Err(DiskError::Size {
                path: self.name.clone(),
                bytes: have,
                why: format!("the VM's disk is {} bytes", self.bytes),
            });
        }
        Ok(())
    }

    /// Starts the dirty log, empty: ferryd copies the image after this
    /// returns, so only later writes need to be logged. Idempotent: a
    /// second start clears nothing.
    pub fn start_log(&self) {
        if !self.logging() {
            self.log.clear();
            self.logging.store(true, Ordering::SeqCst);
        }
    }

    /// Stops the dirty log.
    pub fn stop_log(&self) {
        self.logging.store(false, Ordering::SeqCst);
    }

    /// Whether the dirty log is on.
    pub fn logging(&self) -> bool {
        self.logging.load(Ordering::SeqCst)
    }

    /// Returns and clears the blocks written since the last sync (or since
    /// the log started): u64 words, bit per block, block 0 in bit 0 of word 0.
    pub fn sync_log(&self) -> Result<Vec<u64>, DiskError> {
        if !self.logging() {
            return Err(DiskError::LogOff);
        }
        Ok(self.log.take())
    }

    fn check_block(&self, block: BlockIndex) -> Result<(), DiskError> {
        match block.0 < self.blocks() {
            true => Ok(()),
            false => Err(DiskError::OutOfRange {
                block: block.0,
                blocks: self.blocks(),
            }),
        }
    }

    /// The blocks of the image's allocated extents (SEEK_DATA / SEEK_HOLE),
    /// merged and in order; all blocks where the file system cannot tell.
    /// Seeks the VMM's own description, whose offset no I/O uses.
    pub fn data_extents(&self) -> Result<Vec<Range<u64>>, DiskError> {
        let all = std::iter::once(0..self.blocks()).collect();
        let file = &self.file;
        let mut extents: Vec<Range<u64>> = Vec::new();
        let mut off = 0u64;
        while off < self.bytes {
            let data = match lseek(file, off as i64, Whence::SeekData) {
                Ok(d) => d as u64,
                Err(Errno::ENXIO) => break,
                Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(all),
                Err(e) => return Err(DiskError::Hash(e.into())),
            };
            if data >= self.bytes {
                break;
            }
            let hole = match lseek(file, data as i64, Whence::SeekHole) {
                Ok(h) => (h as u64).min(self.bytes),
                Err(e) => return Err(DiskError::Hash(e.into())),
            };
            assert!(hole > data, "SEEK_HOLE at {hole} before data at {data}");
            let r = data / DISK_BLOCK_BYTES..hole.div_ceil(DISK_BLOCK_BYTES);
            match extents.last_mut() {
                Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
                _ => extents.push(r),
            }
            off = hole;
        }
        Ok(extents)
    }

    /// The [`DiskHasher`] hash of the image, reading only its allocated
    /// extents (a hole and an allocated zero block hash the same).
    pub fn hash(&self) -> Result<String, DiskError> {
        let mut h = DiskHasher::default();
        let mut buf = vec![0u8; HASH_READ_BYTES as usize];
        for extent in self.data_extents()? {
            let mut block = extent.start;
            while block < extent.end {
                let n = (extent.end - block).min(HASH_READ_BYTES / DISK_BLOCK_BYTES);
                let chunk = &mut buf[..(n * DISK_BLOCK_BYTES) as usize];
                self.file
                    .read_exact_at(chunk, block * DISK_BLOCK_BYTES)
                    .map_err(DiskError::Hash)?;
                for (i, data) in chunk.chunks_exact(BLOCK_BYTES).enumerate() {
                    h.block(block + i as u64, data);
                }
                block += n;
            }
        }
        Ok(h.finish())
    }
}

impl BlockRead for Disk {
    fn blocks(&self) -> u64 {
        self.bytes / DISK_BLOCK_BYTES
    }

    fn read_block(&self, block: BlockIndex, out: &mut [u8; BLOCK_BYTES]) -> Result<(), DiskError> {
        self.check_block(block)?;
        self.file
            .read_exact_at(out, block.offset())
            .map_err(|source| DiskError::Io {
                op: "read",
                block: block.0,
                source,
            })
    }
}

impl BlockWrite for Disk {
    /// pwrite(), then the dirty bit (while logging): see the module docs.
    fn write_block(&self, block: BlockIndex, data: &[u8; BLOCK_BYTES]) -> Result<(), DiskError> {
        self.check_block(block)?;
        self.file
            .write_all_at(data, block.offset())
            .map_err(|source| DiskError::Io {
                op: "write",
                block: block.0,
                source,
            })?;
        if self.logging() {
            self.log.set(block.0);
        }
        Ok(())
    }
}

/// A disk in memory, for tests of what reads and writes blocks.
#[derive(Debug)]
pub struct MemDisk {
    data: std::sync::Mutex<Vec<u8>>,
}

impl MemDisk {
    /// A zeroed disk of `blocks` blocks.
    pub fn new(blocks: u64) -> Self {
        MemDisk {
            data: std::sync::Mutex::new(vec![0u8; blocks as usize * BLOCK_BYTES]),
        }
    }

    fn range(&self, block: BlockIndex) -> Result<Range<usize>, DiskError> {
        let blocks = self.blocks();
        if block.0 >= blocks {
            return Err(DiskError::OutOfRange {
                block: block.0,
                blocks,
            });
        }
        let start = block.offset() as usize;
        Ok(start..start + BLOCK_BYTES)
    }
}

impl BlockRead for MemDisk {
    fn blocks(&self) -> u64 {
        (self.data.lock().expect("mem disk lock").len() / BLOCK_BYTES) as u64
    }

    fn read_block(&self, block: BlockIndex, out: &mut [u8; BLOCK_BYTES]) -> Result<(), DiskError> {
        let r = self.range(block)?;
        out.copy_from_slice(&self.data.lock().expect("mem disk lock")[r]);
        Ok(())
    }
}

impl BlockWrite for MemDisk {
    fn write_block(&self, block: BlockIndex, data: &[u8; BLOCK_BYTES]) -> Result<(), DiskError> {
        let r = self.range(block)?;
        self.data.lock().expect("mem disk lock")[r].copy_from_slice(data);
        Ok(())
    }
}

/// An image file that reads fail on: `read_block` errors with EIO. For
/// tests of the error paths of what reads a disk.
#[derive(Debug)]
pub struct BrokenDisk {
    /// Blocks it claims to have.
    pub blocks: u64,
}

impl BlockRead for BrokenDisk {
    fn blocks(&self) -> u64 {
        self.blocks
    }

    fn read_block(&self, block: BlockIndex, _out: &mut [u8; BLOCK_BYTES]) -> Result<(), DiskError> {
        Err(DiskError::Io {
            op: "read",
            block: block.0,
            source: std::io::Error::from(ErrorKind::Other),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_image(name: &str, bytes: u64) -> std::path::PathBuf {
        let p =
            std::env::temp_dir().join(format!("ferry-vmm-disk-{}-{name}.img", std::process::id()));
        let f = File::create(&p).unwrap();
        f.set_len(bytes).unwrap();
        p
    }

    #[test]
    fn open_refuses_bad_sizes_and_missing_files() {
        for (name, bytes) in [("empty", 0), ("odd", 4097), ("short", 100)] {
            let p = temp_image(name, bytes);
            let e = Disk::open(&p).unwrap_err();
            assert!(matches!(e, DiskError::Size { .. }), "{name}: {e}");
            assert!(e.to_string().contains("multiple of 4096"), "{e}");
            std::fs::remove_file(p).unwrap();
        }
        let e = Disk::open(Path::new("/nonexistent/ferry.img")).unwrap_err();
        assert!(matches!(e, DiskError::Open { op: "open", .. }), "{e}");
        let e = Disk::open(Path::new("/dev/null")).unwrap_err();
        assert!(e.to_string().contains("regular file"), "{e}");
    }

    #[test]
    fn blocks_round_trip_and_the_log_records_writes_while_on() {
        let p = temp_image("rw", 64 * 4096);
        let d = Disk::open(&p).unwrap();
        assert_eq!(d.blocks(), 64);
        let mut data = [0u8; BLOCK_BYTES];
        data[7] = 7;
        assert!(matches!(d.sync_log(), Err(DiskError::LogOff)));
        d.write_block(BlockIndex(3), &data).unwrap();
        d.start_log();
        assert_eq!(
            d.sync_log().unwrap(),
            [0],
            "writes before the start are not logged"
        );
        d.write_block(BlockIndex(5), &data).unwrap();
        d.write_block(BlockIndex(63), &data).unwrap();
        assert_eq!(d.sync_log().unwrap(), [1 << 5 | 1 << 63]);
        assert_eq!(d.sync_log().unwrap(), [0], "a sync clears");
        let mut back = [0u8; BLOCK_BYTES];
        d.read_block(BlockIndex(63), &mut back).unwrap();
        assert_eq!(back, data);
        assert!(matches!(
            d.write_block(BlockIndex(64), &data),
            Err(DiskError::OutOfRange { block: 64, .. })
        ));
        assert!(d.read_block(BlockIndex(64), &mut back).is_err());
        d.stop_log();
        d.write_block(BlockIndex(6), &data).unwrap();
        assert!(matches!(d.sync_log(), Err(DiskError::LogOff)));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn the_hash_ignores_allocation_and_sees_content() {
        let blocks = 512u64;
        let (a, b) = (temp_image("sparse", blocks * 4096), temp_image("dense", 0));
        // b: every block allocated, zeros included.
        let mut f = OpenOptions::new().write(true).open(&b).unwrap();
        f.write_all(&vec![0u8; (blocks * 4096) as usize]).unwrap();
        drop(f);
        let (da, db) = (Disk::open(&a).unwrap(), Disk::open(&b).unwrap());
        let extents = da.data_extents().unwrap();
        assert!(
            extents.iter().map(|r| r.end - r.start).sum::<u64>() < blocks,
            "a new sparse file has holes: {extents:?}"
        );
        assert_eq!(da.hash().unwrap(), db.hash().unwrap(), "empty images");
        let mem = MemDisk::new(blocks);
        let mut data = [0u8; BLOCK_BYTES];
        for (i, blk) in [0u64, 1, 200, 511].into_iter().enumerate() {
            data[i] = 0xa5;
            for d in [&da as &dyn BlockWrite, &db, &mem] {
                d.write_block(BlockIndex(blk), &data).unwrap();
            }
        }
        // An allocated zero block in the sparse image changes nothing.
        da.write_block(BlockIndex(300), &[0u8; BLOCK_BYTES])
            .unwrap();
        let h = da.hash().unwrap();
        assert_eq!(h, db.hash().unwrap());
        assert_eq!(h, hash_all(&mem).unwrap());
        assert_eq!(h, hash_all(&da).unwrap());
        // One changed byte, or the same content at another index, differs.
        data[4095] = 1;
        db.write_block(BlockIndex(511), &data).unwrap();
        assert_ne!(h, db.hash().unwrap());
        // The same contents, the last one at block 510 instead of 511.
        let moved = MemDisk::new(blocks);
        let mut buf = [0u8; BLOCK_BYTES];
        for (from, to) in [(0, 0), (1, 1), (200, 200), (511, 510)] {
            mem.read_block(BlockIndex(from), &mut buf).unwrap();
            moved.write_block(BlockIndex(to), &buf).unwrap();
        }
        assert_ne!(h, hash_all(&moved).unwrap());
        std::fs::remove_file(a).unwrap();
        std::fs::remove_file(b).unwrap();
    }

    #[test]
    fn a_target_disk_checks_its_size_at_restore_only() {
        let p = temp_image("target", 8 * 4096);
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let d = Disk::from_fd(OwnedFd::from(f), 16 * 4096).unwrap();
        assert!(matches!(d.check_size(), Err(DiskError::Size { .. })));
        let f = File::open(&p).unwrap();
        assert!(Disk::from_fd(OwnedFd::from(f), 4095).is_err());
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn o_direct_on_ferryds_descriptor_leaves_the_vmms_io_alone() {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let p = temp_image("direct", 16 * 4096);
        let src = Disk::open(&p).unwrap();
        // What ferryd received: a descriptor of src's link description.
        let theirs = OwnedFd::from(src.link_file.try_clone().unwrap());
        let target = Disk::from_fd(theirs, 16 * 4096).unwrap();
        for d in [&src, &target] {
            let flags = OFlag::from_bits_truncate(fcntl(&d.link_file, FcntlArg::F_GETFL).unwrap());
            if fcntl(&d.link_file, FcntlArg::F_SETFL(flags | OFlag::O_DIRECT)).is_err() {
                eprintln!("SKIP: no O_DIRECT on this file system");
                return;
            }
            // An unaligned buffer: EINVAL under O_DIRECT, fine buffered.
            let mut buf = vec![0u8; BLOCK_BYTES + 1];
            let block: &mut [u8; BLOCK_BYTES] = (&mut buf[1..]).try_into().unwrap();
            block[0] = 9;
            d.write_block(BlockIndex(2), block).unwrap();
            d.read_block(BlockIndex(2), block).unwrap();
            assert_eq!(block[0], 9);
            d.hash().unwrap();
        }
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_broken_disk_fails_every_read() {
        let d = BrokenDisk { blocks: 4 };
        assert!(hash_all(&d).is_err());
    }
}
