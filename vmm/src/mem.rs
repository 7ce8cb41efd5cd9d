//! Guest RAM: one memfd, mapped `MAP_SHARED`, registered as one KVM slot at
//! GPA 0. ferryd maps the same memfd, so every access here goes through
//! vm-memory's volatile accessors, never through a `&[u8]` over guest memory.
//!
//! KVM's dirty log sees only the guest's own writes. What the VMM writes
//! into a running guest's memory (a disk read's DMA pages, the disk pacing
//! word of the control block) goes through the `*_logged` writers, which
//! mark the pages in a bitmap of their own that the memory dirty log ORs in,
//! as a real VMM logs its devices' DMA.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

use crate::bitmap::AtomicBitmap;
use crate::layout::PAGE_BYTES;

/// Errors of guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// Creating, sizing, or inspecting the memfd failed.
    #[error("cannot {op} the guest memfd: {source}")]
    Memfd {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Mapping the memfd failed.
    #[error("cannot map {bytes} bytes of guest memory: {source}")]
    Map {
        /// The size.
        bytes: u64,
        /// The cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The memfd is smaller than the RAM it should hold.
    #[error("the guest memfd holds {have} bytes, {want} needed")]
    TooSmall {
        /// Size of the memfd.
        have: u64,
        /// Size of the RAM.
        want: u64,
    },
    /// Registering guest RAM with a userfaultfd (post-copy) failed.
    #[error("cannot register guest memory with a userfaultfd for post-copy: {0}")]
    Userfault(String),
    /// An access fell outside guest RAM.
    #[error("guest access at {gpa:#x} (+{bytes}) is outside guest RAM")]
    OutOfRange {
        /// Where.
        gpa: u64,
        /// How many bytes.
        bytes: u64,
    },
}

/// Guest RAM mapped from a memfd.
#[derive(Debug)]
pub struct GuestRam {
    file: File,
    map: MmapRegion,
    bytes: u64,
    /// Pages the VMM wrote through the `*_logged` writers.
    host_dirty: AtomicBitmap,
}

impl GuestRam {
    /// Creates a zeroed memfd of `bytes` and maps it (a source VMM).
    pub fn create(bytes: u64) -> Result<Self, MemError> {
        let fd = nix::sys::memfd::memfd_create(
            c"ferry-vmm-guest",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(|e| MemError::Memfd {
            op: "create",
            source: e.into(),
        })?;
        let file = File::from(fd);
        file.set_len(bytes)
            .map_err(|source| MemError::Memfd { op: "size", source })?;
        Self::map(file, bytes)
    }

    /// Maps the first `bytes` of an existing memfd (a target VMM, or a second
    /// VM over the same memory).
    pub fn from_memfd(fd: OwnedFd, bytes: u64) -> Result<Self, MemError> {
        let file = File::from(fd);
        let have = file
            .metadata()
            .map_err(|source| MemError::Memfd { op: "stat", source })?
            .len();
        if have < bytes {
            return Err(MemError::TooSmall { have, want: bytes });
        }
        Self::map(file, bytes)
    }

    fn map(file: File, bytes: u64) -> Result<Self, MemError> {
        let size = usize::try_from(bytes).map_err(|_| MemError::OutOfRange { gpa: 0, bytes })?;
        let dup = file
            .try_clone()
            .map_err(|source| MemError::Memfd { op: "dup", source })?;
        let map = MmapRegion::from_file(FileOffset::new(dup, 0), size)
            .map_err(|source| MemError::Map { bytes, source })?;
        Ok(GuestRam {
            file,
            map,
            bytes,
            host_dirty: AtomicBitmap::new(bytes / PAGE_BYTES),
        })
    }

    /// Bytes of RAM.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The memfd, to pass to ferryd.
    pub fn memfd_raw(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// A duplicate of the memfd (for a second VM over the same memory).
    pub fn memfd_dup(&self) -> Result<OwnedFd, MemError> {
        let f = self
            .file
            .try_clone()
            .map_err(|source| MemError::Memfd { op: "dup", source })?;
        Ok(OwnedFd::from(f))
    }

    /// Host address of GPA 0, for the KVM memory slot.
    pub fn host_addr(&self) -> u64 {
        self.map.as_ptr() as u64
    }

    /// Allocates every page of the memfd now (MADV_POPULATE_WRITE) instead
    /// of at the guest's first touch. Contents are unchanged. Best effort: a
    /// kernel without it just allocates on demand.
    pub fn populate(&self) {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        // SAFETY: the range is exactly our live shared mapping;
        // MADV_POPULATE_WRITE faults pages in and never changes contents.
        let rc = unsafe {
            libc::madvise(
                self.map.as_ptr().cast(),
                self.map.size(),
                MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            tracing::debug!(
                "MADV_POPULATE_WRITE failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// Post-copy start: registers this mapping with a new userfaultfd for
    /// minor faults (a page in the memfd but not mapped here) and missing
    /// ones (a page not in the memfd at all), then drops every page from
    /// this mapping's page tables, so that each first touch, by a vCPU
    /// through KVM or by the VMM itself, waits until ferryd has written the
    /// page (through its own mapping) and mapped it with `UFFDIO_CONTINUE`.
    /// The memfd's contents are unchanged.
    ///
    /// Faults from the kernel (KVM's) must reach the handler, so the
    /// descriptor is not user-mode only: that needs root, `CAP_SYS_PTRACE`,
    /// or `vm.unprivileged_userfaultfd = 1`.
    pub fn register_userfault(&self) -> Result<userfaultfd::Uffd, MemError> {
        use userfaultfd::{FeatureFlags, RegisterMode, UffdBuilder};
        let err =
            |what: &str, e: &dyn std::fmt::Debug| MemError::Userfault(format!("{what}: {e:?}"));
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            // UFFD_FEATURE_MINOR_SHMEM (Linux 5.14), which the crate has no
            // name for.
            .require_features(FeatureFlags::from_bits_retain(1 << 10))
            .create()
            .map_err(|e| err("creating the userfaultfd (minor faults on shmem)", &e))?;
        let start = self.map.as_ptr().cast::<libc::c_void>();
        uffd.register_with_mode(
            start,
            self.map.size(),
            RegisterMode::MISSING | RegisterMode::MINOR,
        )
        .map_err(|e| err("registering guest memory", &e))?;
        // SAFETY: the range is exactly our live shared mapping. For shared
        // memory MADV_DONTNEED only drops this mapping's page-table entries;
        // the pages stay in the memfd, and the next touch faults them back
        // in (now through the userfaultfd).
        let rc = unsafe { libc::madvise(start, self.map.size(), libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(err(
                "unmapping guest pages (MADV_DONTNEED)",
                &std::io::Error::last_os_error(),
            ));
        }
        Ok(uffd)
    }

    /// `bytes` of guest memory at `gpa`.
    pub fn slice(&self, gpa: u64, bytes: u64) -> Result<VolatileSlice<'_>, MemError> {
        let err = || MemError::OutOfRange { gpa, bytes };
        let end = gpa.checked_add(bytes).ok_or_else(err)?;
        if end > self.bytes {
            return Err(err());
        }
        self.map
            .get_slice(gpa as usize, bytes as usize)
            .map_err(|_| err())
    }

    /// All of guest memory.
    pub fn all(&self) -> VolatileSlice<'_> {
        self.map.as_volatile_slice()
    }

    /// Reads a u64 at `gpa` (volatile).
    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemError> {
        self.slice(gpa, 8)?
            .read_obj(0)
            .map_err(|_| MemError::OutOfRange { gpa, bytes: 8 })
    }

    /// Writes a u64 at `gpa` (volatile).
    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), MemError> {
        self.slice(gpa, 8)?
            .write_obj(value, 0)
            .map_err(|_| MemError::OutOfRange { gpa, bytes: 8 })
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write_bytes(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        self.slice(gpa, data.len() as u64)?.copy_from(data);
        Ok(())
    }

    /// [`Self::write_u64`], then marks the page in [`Self::host_dirty`].
    pub fn write_u64_logged(&self, gpa: u64, value: u64) -> Result<(), MemError> {
        self.write_u64(gpa, value)?;
        self.mark_written(gpa, 8);
        Ok(())
    }

    /// [`Self::write_bytes`], then marks the pages in [`Self::host_dirty`].
    pub fn write_bytes_logged(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        self.write_bytes(gpa, data)?;
        self.mark_written(gpa, data.len() as u64);
        Ok(())
    }

    /// Marks the pages of a completed write (in range: checked by the write).
    fn mark_written(&self, gpa: u64, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let first = gpa / PAGE_BYTES;
        let last = (gpa + bytes - 1) / PAGE_BYTES;
        self.host_dirty.set_range(first, last - first + 1);
    }

    /// Pages the VMM wrote through the `*_logged` writers (bit per 4 KiB
    /// page from GPA 0), for the memory dirty log to OR in.
    pub fn host_dirty(&self) -> &AtomicBitmap {
        &self.host_dirty
    }
}
