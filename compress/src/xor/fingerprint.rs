//! Chunk fingerprints of the version of each page the receiver holds: the
//! second base of a delta, for pages whose content the [`DeltaCache`] does
//! not hold.
//!
//! [`DeltaCache`]: super::DeltaCache
//!
//! A cached page costs 4 KiB; its fingerprints cost [`BYTES_PER_PAGE`]
//! (128 bytes: one keyed 64-bit hash per [`CHUNK_BYTES`]-byte chunk), so the
//! fingerprints of *every* page fit in 1/32 of guest memory. A page re-sent
//! without its old content cached is then encoded as a patch: the chunks
//! whose hash changed, sent whole, in the [XOR-delta format](super) (whose
//! runs carry new bytes, so the receiver cannot tell a patch from a delta).
//! A guest that rewrote a few cache lines of a page re-sends about 512 bytes
//! instead of 4 KiB, even when the page's first re-send finds no cached copy,
//! which in a guest with cold pages dirtied once is most of them.
//!
//! # Why a hash is safe here
//!
//! An unchanged chunk is skipped on hash equality, so a collision would leave
//! the receiver an old chunk. Three things make that harmless:
//!
//! - the hash is XXH3-64 keyed with a random seed per cache (per migration),
//!   so neither the guest nor anyone else can aim for a collision: a changed
//!   chunk keeps its hash with probability 2^-64;
//! - the sender puts in the page entry the CRC32C of the *new* page, which the
//!   receiver checks after applying the patch: a collision that slipped
//!   through the hash is caught (a further 2^-32), and the migration fails
//!   with the VM still on the source, before COMMIT, rather than move a wrong
//!   page;
//! - ferry-bench's verification hashes all of guest memory on both sides.
//!
//! # Memory
//!
//! A table of `pages` × 16 hashes and a bitmap of valid entries, allocated
//! zeroed on first use (the kernel backs only what is written). Entries are
//! 128 bytes, so one 4 KiB memory page holds the entries of 32 consecutive
//! guest pages: an encoder that owns whole 2 MiB chunks of guest memory
//! backs only its own share even though each encoder's table spans all of it.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{put_varint, varint_len};
use crate::PAGE_SIZE;

/// Bytes per fingerprinted chunk: a changed chunk is sent whole.
pub const CHUNK_BYTES: usize = 256;

/// Chunks per page.
const CHUNKS: usize = PAGE_SIZE / CHUNK_BYTES;

/// Bytes of fingerprints per page.
pub const BYTES_PER_PAGE: usize = CHUNKS * 8;

/// Fingerprints of the pages `0..pages`; see the [module docs](self).
pub(super) struct Fingerprints {
    pages: u64,
    seed: u64,
    /// Allocated on first use.
    store: Option<FpStore>,
}

struct FpStore {
    /// `CHUNKS` hashes per page.
    hashes: Box<[u64]>,
    /// Bit `pfn` set: the page's hashes are those of what the receiver holds.
    valid: Box<[u64]>,
}

impl Fingerprints {
    /// Fingerprints for pages `0..pages`, keyed with a random seed.
    pub(super) fn new(pages: u64) -> Self {
        // RandomState draws its keys from the OS's random source.
        let seed = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            pages,
        );
        Self {
            pages,
            seed,
            store: None,
        }
    }

    /// Bytes the table takes once every page has an entry.
    pub(super) fn bytes_for(pages: u64) -> u64 {
        pages * BYTES_PER_PAGE as u64 + pages.div_ceil(64) * 8
    }

    fn store(&mut self) -> &mut FpStore {
        let pages = self.pages as usize;
        self.store.get_or_insert_with(|| FpStore {
            hashes: vec![0; pages * CHUNKS].into_boxed_slice(),
            valid: vec![0; pages.div_ceil(64)].into_boxed_slice(),
        })
    }

    fn hash(&self, chunk: &[u8]) -> u64 {
        xxh3_64_with_seed(chunk, self.seed)
    }

    /// Whether page `pfn` has fingerprints.
    pub(super) fn contains(&self, pfn: u64) -> bool {
        pfn < self.pages
            && self
                .store
                .as_ref()
                .is_some_and(|s| s.valid[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0)
    }

    /// Records `page` as what the receiver now holds of `pfn` (no-op for a
    /// page outside the table).
    pub(super) fn record(&mut self, pfn: u64, page: &[u8]) {
        if pfn >= self.pages {
            return;
        }
        let mut hashes = [0u64; CHUNKS];
        for (h, chunk) in hashes.iter_mut().zip(page.chunks_exact(CHUNK_BYTES)) {
            *h = self.hash(chunk);
        }
        let s = self.store();
        let at = pfn as usize * CHUNKS;
        s.hashes[at..at + CHUNKS].copy_from_slice(&hashes);
        s.valid[(pfn / 64) as usize] |= 1 << (pfn % 64);
    }

    /// Drops the entry of `pfn`: the receiver's version is no longer known.
    pub(super) fn forget(&mut self, pfn: u64) {
        if pfn < self.pages {
            if let Some(s) = &mut self.store {
                s.valid[(pfn / 64) as usize] &= !(1 << (pfn % 64));
            }
        }
    }

    /// Drops every entry.
    pub(super) fn clear(&mut self) {
        if let Some(s) = &mut self.store {
            s.valid.fill(0);
        }
    }

    /// Encodes `new` as a patch of page `pfn` (the chunks whose hash
    /// changed, in the delta format) and appends it to `out` if the page has
    /// fingerprints and the patch is at most `limit` bytes; returns its
    /// length. Records `new`'s fingerprints for `pfn` in every case (the
    /// caller sends `new` in some form), as [`record`](Self::record).
    pub(super) fn patch(
        &mut self,
        pfn: u64,
        new: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Option<usize> {
        if pfn >= self.pages {
            return None;
        }
        let known = self.contains(pfn);
        let mut hashes = [0u64; CHUNKS];
        for (h, chunk) in hashes.iter_mut().zip(new.chunks_exact(CHUNK_BYTES)) {
            *h = self.hash(chunk);
        }
        let s = self.store();
        let at = pfn as usize * CHUNKS;
        let old: [u64; CHUNKS] = s.hashes[at..at + CHUNKS]
            .try_into()
            .expect("one page of hashes");
        s.hashes[at..at + CHUNKS].copy_from_slice(&hashes);
        s.valid[(pfn / 64) as usize] |= 1 << (pfn % 64);
        if !known {
            return None;
        }
        let start = out.len();
        // End of the previous run, in chunks.
        let mut pos = 0;
        let mut c = 0;
        while c < CHUNKS {
            if hashes[c] == old[c] {
                c += 1;
                continue;
            }
            let first = c;
            while c < CHUNKS && hashes[c] != old[c] {
                c += 1;
            }
            let (skip, len) = ((first - pos) * CHUNK_BYTES, (c - first) * CHUNK_BYTES);
            if out.len() - start + varint_len(skip) + varint_len(len) + len > limit {
                out.truncate(start);
                return None;
            }
            put_varint(out, skip);
            put_varint(out, len);
            out.extend_from_slice(&new[first * CHUNK_BYTES..c * CHUNK_BYTES]);
            pos = c;
        }
        Some(out.len() - start)
    }
}
