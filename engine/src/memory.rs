//! Guest memory as ferry sees it: the VMM's memfd, mapped shared.
//!
//! Pages are numbered by [`PageIndex`]: the index of a page in the
//! concatenation of the VM's regions in spec order. Source and target share
//! the spec, so an index means the same page on both sides, and a dirty bitmap
//! (concatenated per region) indexes the same way.
//!
//! Guest memory is only ever touched through [`VolatileSlice`]s: the guest may
//! write a page while we read it, so no `&[u8]` over guest memory is formed.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use vm_memory::{FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

use crate::link::{RegionSpec, VmSpec};

/// Bytes per guest page. ferry moves 4 KiB pages; huge pages are split.
pub const PAGE_SIZE: usize = 4096;
/// Cap on guest RAM one migration handles: 1 TiB. Keeps every page count in
/// range of the u64 arithmetic below and the bitmaps of the link protocol.
pub const GUEST_BYTES_MAX: u64 = 1 << 40;

/// Index of a page across all regions, in spec order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageIndex(pub u64);

/// Errors of guest memory handling.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The spec describes memory we cannot map.
    #[error("invalid memory layout: {0}")]
    Layout(String),
    /// memfd_create / ftruncate / mmap failed.
    #[error("cannot {op} guest memory: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

struct Region {
    spec: RegionSpec,
    first_page: u64,
    pages: u64,
    map: MmapRegion,
}

/// Guest RAM mapped from a memfd, shared with the VMM.
pub struct GuestMem {
    regions: Vec<Region>,
    pages: u64,
    file: File,
}

impl std::fmt::Debug for GuestMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMem")
            .field("pages", &self.pages)
            .field("regions", &self.regions.len())
            .finish()
    }
}

// SAFETY: every region is mapped when the GuestMem is made and unmapped only
// when it drops; mappings never move.
unsafe impl ferry_transport::MappedMemory for GuestMem {
    fn ranges(&self) -> Vec<(*mut u8, usize)> {
        self.regions
            .iter()
            .map(|r| (r.map.as_ptr(), r.map.size()))
            .collect()
    }
}

impl GuestMem {
    /// Creates a fresh, zeroed memfd for `spec` and maps it (the target side).
    pub fn create(spec: &VmSpec) -> Result<Self, MemoryError> {
        check_layout(&spec.regions)?;
        let size = spec
            .regions
            .iter()
            .map(|r| r.memfd_offset + r.size)
            .max()
            .unwrap_or(0);
        let fd =
            nix::sys::memfd::memfd_create(c"ferry-guest", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .map_err(|e| MemoryError::Os {
                op: "create",
                source: e.into(),
            })?;
        let file = File::from(fd);
        file.set_len(size)
            .map_err(|source| MemoryError::Os { op: "size", source })?;
        Self::map(file, &spec.regions)
    }

    /// Maps an existing memfd (the source side, or a VMM).
    pub fn from_memfd(fd: OwnedFd, regions: &[RegionSpec]) -> Result<Self, MemoryError> {
        check_layout(regions)?;
        let file = File::from(fd);
        let len = file
            .metadata()
            .map_err(|source| MemoryError::Os { op: "stat", source })?
            .len();
        if let Some(r) = regions.iter().find(|r| r.memfd_offset + r.size > len) {
            return Err(MemoryError::Layout(format!(
                "region at {:#x} ends past the memfd ({} bytes)",
                r.gpa, len
            )));
        }
        Self::map(file, regions)
    }

    fn map(file: File, specs: &[RegionSpec]) -> Result<Self, MemoryError> {
        let mut regions = Vec::with_capacity(specs.len());
        let mut first_page = 0;
        for spec in specs {
            let dup = file
                .try_clone()
                .map_err(|source| MemoryError::Os { op: "dup", source })?;
            let size = usize::try_from(spec.size)
                .map_err(|_| MemoryError::Layout("region larger than the address space".into()))?;
            let map = MmapRegion::from_file(FileOffset::new(dup, spec.memfd_offset), size)
                .map_err(|e| MemoryError::Os {
                    op: "map",
                    source: std::io::Error::other(e),
                })?;
            let pages = spec.size / PAGE_SIZE as u64;
            regions.push(Region {
                spec: spec.clone(),
                first_page,
                pages,
                map,
            });
            first_page += pages;
        }
        Ok(GuestMem {
            regions,
            pages: first_page,
            file,
        })
    }

    /// Number of pages in all regions.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Total bytes of guest RAM.
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE as u64
    }

    /// The region specs, in page-index order.
    pub fn region_specs(&self) -> Vec<RegionSpec> {
        self.regions.iter().map(|r| r.spec.clone()).collect()
    }

    /// The memfd behind the mapping (to pass to a VMM).
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Raw descriptor of the memfd.
    pub fn memfd_raw(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// The page at `index`, or `None` past the end.
    pub fn page(&self, index: PageIndex) -> Option<VolatileSlice<'_>> {
        self.pages_slice(index, 1)
    }

    /// `count` consecutive pages starting at `index`, when they lie in one
    /// region (`None` otherwise or past the end).
    pub fn pages_slice(&self, index: PageIndex, count: u64) -> Option<VolatileSlice<'_>> {
        let region = self.region_of(index)?;
        let rel = index.0 - region.first_page;
        if count == 0 || rel + count > region.pages {
            return None;
        }
        region
            .map
            .get_slice(rel as usize * PAGE_SIZE, count as usize * PAGE_SIZE)
            .ok()
    }

    /// How many pages from `index` to the end of its region.
    pub fn pages_left_in_region(&self, index: PageIndex) -> u64 {
        self.region_of(index)
            .map_or(0, |r| r.first_page + r.pages - index.0)
    }

    fn region_of(&self, index: PageIndex) -> Option<&Region> {
        // Few regions (usually one or two): a linear scan beats a search.
        self.regions
            .iter()
            .find(|r| index.0 >= r.first_page && index.0 < r.first_page + r.pages)
    }

    /// Runs of pages (first, count) that have memory behind them in the
    /// memfd, ascending. Every other page is a hole: zero, never written, and
    /// reading it through a mapping would allocate it. Found with
    /// SEEK_DATA/SEEK_HOLE; on failure (a file system without them) the
    /// whole of each region is reported as data.
    pub fn data_runs(&self) -> Vec<(u64, u64)> {
        let fd = self.file.as_raw_fd();
        let page = PAGE_SIZE as i64;
        let mut runs = Vec::new();
        for r in &self.regions {
            let start = r.spec.memfd_offset as i64;
            let end = start + r.spec.size as i64;
            let mut off = start;
            while off < end {
                // SAFETY: lseek on a descriptor we own; it only moves the file
                // offset, which nothing else in ferry uses.
                let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
                if data < 0 {
                    if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                        break; // no data past `off`
                    }
                    runs.push((
                        r.first_page + ((off - start) / page) as u64,
                        ((end - off) / page) as u64,
                    ));
                    break;
                }
                if data >= end {
                    break;
                }
                // SAFETY: as above.
                let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) }.clamp(data, end);
                let first = (data - start) / page;
                let last = (hole - start + page - 1) / page; // exclusive, rounded up
                runs.push((r.first_page + first as u64, (last - first) as u64));
                off = hole.max(data + 1);
            }
        }
        runs
    }

    /// Gives physical memory for every page up front (MADV_POPULATE_WRITE), so
    /// receiving the first copy of a page does not take a page fault. Best
    /// effort: a kernel without it just faults later.
    pub fn prefault(&self) {
        for r in &self.regions {
            // SAFETY: the range is exactly this region's live shared mapping;
            // MADV_POPULATE_WRITE only faults pages in, it never changes contents.
            let rc = unsafe {
                libc::madvise(
                    r.map.as_ptr().cast(),
                    r.map.size(),
                    23, /* MADV_POPULATE_WRITE */
                )
            };
            if rc != 0 {
                tracing::debug!(
                    "MADV_POPULATE_WRITE failed: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

fn check_layout(regions: &[RegionSpec]) -> Result<(), MemoryError> {
    if regions.is_empty() {
        return Err(MemoryError::Layout("no memory regions".into()));
    }
    let page = PAGE_SIZE as u64;
    let mut total = 0u64;
    for r in regions {
        if r.size == 0 || r.gpa % page != 0 || r.size % page != 0 || r.memfd_offset % page != 0 {
            return Err(MemoryError::Layout(format!(
                "region {:#x}+{:#x} (memfd offset {:#x}) is empty or not page aligned",
                r.gpa, r.size, r.memfd_offset
            )));
        }
        total = total.saturating_add(r.size);
    }
    if total > GUEST_BYTES_MAX {
        return Err(MemoryError::Layout(format!(
            "{total} bytes of guest RAM is over the {GUEST_BYTES_MAX}-byte cap"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn spec(regions: Vec<RegionSpec>) -> VmSpec {
        VmSpec {
            name: "t".into(),
            regions,
            vcpus: 1,
            vmm_config: serde_json::Value::Null,
            disk: None,
        }
    }

    #[test]
    fn index_spans_regions_and_shares_the_memfd() {
        let s = spec(vec![
            RegionSpec {
                gpa: 0,
                size: 8 * 4096,
                memfd_offset: 0,
            },
            RegionSpec {
                gpa: 1 << 32,
                size: 4 * 4096,
                memfd_offset: 8 * 4096,
            },
        ]);
        let a = GuestMem::create(&s).unwrap();
        assert_eq!(a.pages(), 12);
        a.page(PageIndex(9))
            .unwrap()
            .write_obj(0xabcd_u64, 8)
            .unwrap();
        let fd = a.memfd().try_clone_to_owned().unwrap();
        let b = GuestMem::from_memfd(fd, &s.regions).unwrap();
        assert_eq!(
            b.page(PageIndex(9)).unwrap().read_obj::<u64>(8).unwrap(),
            0xabcd
        );
        assert!(a.page(PageIndex(12)).is_none());
        assert!(
            a.pages_slice(PageIndex(6), 3).is_none(),
            "crosses a region boundary"
        );
        assert_eq!(a.pages_left_in_region(PageIndex(6)), 2);
    }

    #[test]
    fn reserve_hands_out_zeroed_memory_that_fits_and_refills() {
        let r = Reserve::new(16 * 4096);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !r.ready() {
            assert!(std::time::Instant::now() < deadline, "reserve never filled");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let too_big = spec(vec![RegionSpec {
            gpa: 0,
            size: 32 * 4096,
            memfd_offset: 0,
        }]);
        assert!(r.take(&too_big).is_none());
        let two = spec(vec![
            RegionSpec {
                gpa: 0,
                size: 4096,
                memfd_offset: 0,
            },
            RegionSpec {
                gpa: 1 << 30,
                size: 4096,
                memfd_offset: 4096,
            },
        ]);
        assert!(r.take(&two).is_none(), "only single-region layouts");
        let fits = spec(vec![RegionSpec {
            gpa: 0,
            size: 8 * 4096,
            memfd_offset: 0,
        }]);
        let m = r.take(&fits).unwrap();
        assert_eq!(m.pages(), 8);
        assert!(m.page(PageIndex(8)).is_none());
        assert_eq!(
            m.page(PageIndex(7)).unwrap().read_obj::<u64>(4088).unwrap(),
            0
        );
        assert!(!r.ready());
        assert!(r.take(&fits).is_none(), "taken once");
        r.refill();
        while !r.ready() {
            assert!(
                std::time::Instant::now() < deadline,
                "reserve never refilled"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn data_runs_find_written_pages_only() {
        let s = spec(vec![
            RegionSpec {
                gpa: 0,
                size: 64 * 4096,
                memfd_offset: 0,
            },
            RegionSpec {
                gpa: 1 << 32,
                size: 64 * 4096,
                memfd_offset: 64 * 4096,
            },
        ]);
        let m = GuestMem::create(&s).unwrap();
        assert_eq!(m.data_runs(), vec![]);
        for p in [3u64, 4, 5, 40, 64, 127] {
            m.page(PageIndex(p)).unwrap().write_obj(1u8, 7).unwrap();
        }
        assert_eq!(m.data_runs(), vec![(3, 3), (40, 1), (64, 1), (127, 1)]);
    }

    #[test]
    fn rejects_bad_layouts() {
        assert!(GuestMem::create(&spec(vec![])).is_err());
        assert!(GuestMem::create(&spec(vec![RegionSpec {
            gpa: 1,
            size: 4096,
            memfd_offset: 0
        }]))
        .is_err());
    }
}

/// Pre-faulted, zeroed guest memory that a target host keeps ready for the
/// next incoming migration (`ferryd --reserve-mib`), like a hugepage pool:
/// the first touch of fresh memory costs page faults (about 2 µs per 4 KiB
/// page here, 11 µs for memory the host never gave this machine before), and
/// a reserve moves that cost out of the migration. One memfd is kept; a
/// migration that fits takes it (shrunk to size) and a new one is filled in the
/// background.
#[derive(Debug)]
pub struct Reserve {
    bytes: u64,
    slot: std::sync::Mutex<Option<GuestMem>>,
    filling: std::sync::atomic::AtomicBool,
}

impl Reserve {
    /// A reserve of `bytes`, filled in the background from now on.
    pub fn new(bytes: u64) -> std::sync::Arc<Self> {
        let r = std::sync::Arc::new(Reserve {
            bytes,
            slot: std::sync::Mutex::new(None),
            filling: Default::default(),
        });
        r.refill();
        r
    }

    /// Bytes the reserve holds when full.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether filled memory is waiting.
    pub fn ready(&self) -> bool {
        self.slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Fills a new reserve in the background unless one is there. Call it
    /// when an incoming migration is over: filling zeroes and faults in the
    /// whole reserve, which would compete with a migration for the CPUs.
    pub fn refill(self: &std::sync::Arc<Self>) {
        use std::sync::atomic::Ordering::SeqCst;
        if self.ready() || self.filling.swap(true, SeqCst) {
            return;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("ferry-reserve".into())
            .spawn(move || {
                let spec = VmSpec {
                    name: "reserve".into(),
                    regions: vec![RegionSpec {
                        gpa: 0,
                        size: me.bytes,
                        memfd_offset: 0,
                    }],
                    vcpus: 1,
                    vmm_config: serde_json::Value::Null,
                    disk: None,
                };
                match GuestMem::create(&spec) {
                    Ok(mem) => {
                        // Faults in the pages and this mapping's page tables, so
                        // the receivers take no fault at all.
                        mem.prefault();
                        *me.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(mem);
                    }
                    Err(e) => tracing::warn!("cannot fill the memory reserve: {e}"),
                }
                me.filling.store(false, SeqCst);
            });
        if let Err(e) = spawned {
            self.filling.store(false, SeqCst);
            tracing::warn!("cannot start filling the memory reserve: {e}");
        }
    }

    /// Takes the reserve for `spec` when it is filled and the spec is one
    /// region at memfd offset 0 that fits (what ferry-vmm and most VMMs
    /// make). Call [`Self::refill`] once the migration is over.
    pub fn take(self: &std::sync::Arc<Self>, spec: &VmSpec) -> Option<GuestMem> {
        check_layout(&spec.regions).ok()?;
        let [region] = spec.regions.as_slice() else {
            return None;
        };
        if region.memfd_offset != 0 || region.size > self.bytes {
            return None;
        }
        let mut mem = self.slot.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        // Shrinking the memfd frees the pages past the region; the mapping
        // stays larger, but nothing reads past `pages`.
        mem.file.set_len(region.size).ok()?;
        let r = mem.regions.first_mut()?;
        r.spec = region.clone();
        r.pages = region.size / PAGE_SIZE as u64;
        mem.pages = r.pages;
        Some(mem)
    }
}
