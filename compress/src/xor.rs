//! XOR-delta page codec ([`Codec::Xor`], [`Codec::XorLz4`]): send only the
//! bytes of a page that changed since the version the receiver already holds,
//! like QEMU's XBZRLE. The sender keeps that version in a [`DeltaCache`].
//!
//! # Format
//!
//! A delta is a sequence of records. Each record skips `skip` unchanged bytes
//! of the page, then replaces the next `len` bytes with the `len` bytes that
//! follow (the new bytes themselves, so decoding is a copy, not an XOR):
//!
//! ```text
//!   record:  ┌───────────┬──────────┬──────────────────────────┐
//!            │ skip:uleb │ len:uleb │ len bytes of the new page │
//!            └───────────┴──────────┴──────────────────────────┘
//!
//!   page:    │◀─ skip ─▶│◀── len ──▶│◀─ skip ─▶│◀─ len ─▶│ ... unchanged to the end
//!             unchanged   replaced    unchanged  replaced
//! ```
//!
//! Offsets accumulate: a record's `skip` counts from the end of the previous
//! record's run (from 0 for the first). The delta ends after the last record;
//! bytes after the last run are unchanged. The empty delta means the page is
//! unchanged. Example: bytes 10..12 and 4094..4096 changed to `AB` and `YZ`:
//! `0A 02 'A' 'B'  F2 1F 02 'Y' 'Z'` (skip 10, len 2; skip 4082, len 2).
//!
//! Rules; [`xor_decode`] rejects a delta that breaks any (see [`DeltaFault`]):
//!
//! - `skip` and `len` are ULEB128 varints (7 bits per byte, low group first,
//!   high bit = more follows) of at most 2 bytes, without a redundant zero high
//!   byte. 2 bytes hold 0..16383, more than any field of a 4096-byte page needs.
//! - `len >= 1`: an empty run is never needed, since the delta simply ends.
//! - `skip >= 1` in every record but the first: two adjacent runs are one run.
//! - Every run ends within the page.
//! - The delta ends exactly at the end of a record (no trailing bytes).
//! - A delta is at most [`PAYLOAD_BYTES_MAX`] bytes.
//!
//! Every field thus has one spelling, but the delta of a pair of pages is not
//! unique: an encoder may send unchanged bytes inside a run. [`xor_encode`]
//! does that for gaps of 1 or 2 unchanged bytes between changed bytes, where a
//! new record header would cost as much as the gap.
//!
//! [`Codec::XorLz4`] is an LZ4 block (as [`Codec::Lz4`]) of such a delta,
//! used when shorter than the delta; see [`decode_delta`](crate::decode_delta).

mod cache;
pub mod fingerprint;
mod scan;

pub use cache::{DeltaCache, DeltaOutcome, DeltaStats};

use crate::{Codec, DecodeError, DeltaFault, PAGE_SIZE, PAYLOAD_BYTES_MAX};

/// Bytes of a ULEB128 varint of `value`, for values the format allows.
fn varint_len(value: usize) -> usize {
    debug_assert!(value <= PAGE_SIZE);
    if value < 0x80 {
        1
    } else {
        2
    }
}

fn put_varint(out: &mut Vec<u8>, value: usize) {
    debug_assert!(value <= PAGE_SIZE);
    if value < 0x80 {
        out.push(value as u8);
    } else {
        out.extend_from_slice(&[(value as u8 & 0x7F) | 0x80, (value >> 7) as u8]);
    }
}

/// Reads a varint at `*at`, advancing `*at` past it.
fn read_varint(delta: &[u8], at: &mut usize) -> Result<usize, DeltaFault> {
    let low = *delta.get(*at).ok_or(DeltaFault::VarintTruncated)?;
    if low & 0x80 == 0 {
        *at += 1;
        return Ok(usize::from(low));
    }
    let high = *delta.get(*at + 1).ok_or(DeltaFault::VarintTruncated)?;
    if high & 0x80 != 0 {
        return Err(DeltaFault::VarintTooLong);
    }
    if high == 0 {
        return Err(DeltaFault::VarintOverlong);
    }
    *at += 2;
    Ok(usize::from(low & 0x7F) | usize::from(high) << 7)
}

/// Encodes the delta from `old` to `new` (both one page) and appends it to
/// `out`; returns its length.
///
/// Returns `None`, with `out` as it was, if the delta would be longer than
/// `limit` or than [`PAYLOAD_BYTES_MAX`] (a delta that long is rejected by
/// the decoder and never beats sending the page). Gives up as soon as the
/// limit is certain to be exceeded, so a fully changed page costs one scan
/// and no copy. An unchanged page encodes to the empty delta, `Some(0)`.
///
/// Allocates only if `out` must grow.
///
/// # Panics
///
/// If `old` or `new` is not exactly [`PAGE_SIZE`] bytes.
pub fn xor_encode(old: &[u8], new: &[u8], out: &mut Vec<u8>, limit: usize) -> Option<usize> {
    assert_eq!(old.len(), PAGE_SIZE, "xor_encode old must be one page");
    assert_eq!(new.len(), PAGE_SIZE, "xor_encode new must be one page");
    let limit = limit.min(PAYLOAD_BYTES_MAX);
    let base = out.len();
    // End of the previous run, and delta bytes written.
    let (mut pos, mut written) = (0, 0);
    while let Some(start) = scan::next_diff(old, new, pos) {
        debug_assert!(pos == 0 || start >= pos + scan::GAP_BYTES_MIN);
        let budget = limit - written;
        let bound = (start + budget + scan::GAP_BYTES_MIN).min(PAGE_SIZE);
        let Some(end) = scan::run_end(old, new, start, bound) else {
            out.truncate(base);
            return None;
        };
        let (skip, len) = (start - pos, end - start);
        if varint_len(skip) + varint_len(len) + len > budget {
            out.truncate(base);
            return None;
        }
        put_varint(out, skip);
        put_varint(out, len);
        out.extend_from_slice(&new[start..end]);
        written = out.len() - base;
        pos = end;
    }
    debug_assert!(written <= limit);
    Some(written)
}

/// Applies `delta` (the format is in the [module docs](self)) to `page`,
/// which holds the version the delta was made against and becomes the new
/// version.
///
/// The whole delta is checked before the first byte of `page` is written, so
/// on error `page` is unchanged. Nothing is allocated and no input makes this
/// panic.
///
/// # Panics
///
/// If `page` is not exactly [`PAGE_SIZE`] bytes (a caller bug, not peer input).
pub fn xor_decode(delta: &[u8], page: &mut [u8]) -> Result<(), DecodeError> {
    assert_eq!(page.len(), PAGE_SIZE, "xor_decode page must be one page");
    if delta.len() > PAYLOAD_BYTES_MAX {
        return Err(DecodeError::DeltaTooLong {
            codec: Codec::Xor,
            len: delta.len(),
        });
    }
    // Parsing costs a few branches per record; checking first makes the
    // error path leave the page alone, which callers would otherwise buy
    // with a 4 KiB scratch copy per page.
    for_each_run(delta, |_, _| {})?;
    for_each_run(delta, |offset, bytes| {
        page[offset..offset + bytes.len()].copy_from_slice(bytes);
    })
}

/// Parses `delta`, calling `apply(page_offset, new_bytes)` per run, in order;
/// every run passed lies within the page. Stops at the first broken rule.
fn for_each_run(delta: &[u8], mut apply: impl FnMut(usize, &[u8])) -> Result<(), DecodeError> {
    let malformed = |at, fault| DecodeError::XorMalformed {
        len: delta.len(),
        at,
        fault,
    };
    // Read position in the delta, and end of the previous run in the page.
    let (mut at, mut pos) = (0, 0);
    while at < delta.len() {
        let record_at = at;
        let skip = read_varint(delta, &mut at).map_err(|fault| malformed(record_at, fault))?;
        if skip == 0 && record_at > 0 {
            return Err(malformed(record_at, DeltaFault::AdjacentRuns));
        }
        let len_at = at;
        let len = read_varint(delta, &mut at).map_err(|fault| malformed(len_at, fault))?;
        if len == 0 {
            return Err(malformed(len_at, DeltaFault::EmptyRun));
        }
        // No overflow: pos <= PAGE_SIZE and each varint < 2^14.
        let start = pos + skip;
        let end = start + len;
        if end > PAGE_SIZE {
            return Err(malformed(record_at, DeltaFault::PastPageEnd));
        }
        let bytes = delta
            .get(at..at + len)
            .ok_or_else(|| malformed(at, DeltaFault::RunTruncated))?;
        apply(start, bytes);
        at += len;
        pos = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
