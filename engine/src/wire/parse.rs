//! Parsing frames from a byte buffer: the same checks the receive path makes
//! on a stream, as a pure function for fuzzing and tests.

use ferry_compress::{decode, Codec, PAGE_SIZE};

use super::{frame_crc, FrameHeader, FrameKind, PageEntry, WireError, HEADER_BYTES};

/// One frame parsed from a buffer; for `Pages`, the entries and their
/// decoded pages.
#[derive(Debug)]
pub struct Parsed {
    /// The header.
    pub header: FrameHeader,
    /// Entries of a `Pages` frame (empty otherwise).
    pub entries: Vec<PageEntry>,
    /// Bytes consumed from the buffer.
    pub consumed: usize,
}

fn short(what: &'static str, need: usize, have: usize) -> WireError {
    WireError::Malformed {
        what,
        detail: format!("need {need} bytes, have {have}"),
    }
}

/// Parses and fully checks the frame at the start of `buf`: header, CRC,
/// and for `Pages` every entry, its CRC and its codec (decoding compressed
/// pages). `pages` bounds the page index. Never panics on any input.
pub fn parse_frame(buf: &[u8], pages: u64) -> Result<Parsed, WireError> {
    let hb: &[u8; HEADER_BYTES] = buf
        .get(..HEADER_BYTES)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| short("frame header", HEADER_BYTES, buf.len()))?;
    let header = FrameHeader::decode(hb)?;
    let end = HEADER_BYTES + header.len as usize;
    let payload = buf
        .get(HEADER_BYTES..end)
        .ok_or_else(|| short("frame payload", end, buf.len()))?;
    if frame_crc(header.kind, header.stream, header.len, header.seq, payload) != header.crc {
        return Err(WireError::Crc(header.kind));
    }
    let mut entries = Vec::new();
    let mut at = end;
    if matches!(header.kind, FrameKind::Pages | FrameKind::Blocks) {
        if payload.is_empty() || !payload.len().is_multiple_of(PageEntry::BYTES) {
            return Err(WireError::Malformed {
                what: "page table",
                detail: format!("{} bytes", payload.len()),
            });
        }
        let mut page = [0u8; PAGE_SIZE];
        for raw in payload.chunks_exact(PageEntry::BYTES) {
            let e = PageEntry::decode(raw)?;
            if e.page >= pages {
                return Err(WireError::Malformed {
                    what: "page entry",
                    detail: format!("page {} out of range", e.page),
                });
            }
            let data = buf
                .get(at..at + e.len as usize)
                .ok_or_else(|| short("page data", at + e.len as usize, buf.len()))?;
            if crc32c::crc32c(data) != e.crc && e.codec != Codec::Zero {
                return Err(WireError::Malformed {
                    what: "page data",
                    detail: format!("CRC mismatch on page {}", e.page),
                });
            }
            decode(e.codec, data, &mut page).map_err(|err| WireError::Malformed {
                what: "page data",
                detail: err.to_string(),
            })?;
            at += e.len as usize;
            entries.push(e);
        }
    }
    Ok(Parsed {
        header,
        entries,
        consumed: at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages_frame(entries: &[(PageEntry, Vec<u8>)]) -> Vec<u8> {
        let mut table = Vec::new();
        for (e, _) in entries {
            e.encode_into(&mut table);
        }
        let crc = frame_crc(FrameKind::Pages, 1, table.len() as u32, 1, &table);
        let h = FrameHeader {
            kind: FrameKind::Pages,
            stream: 1,
            len: table.len() as u32,
            seq: 1,
            crc,
        };
        let mut out = h.encode().to_vec();
        out.extend_from_slice(&table);
        for (_, d) in entries {
            out.extend_from_slice(d);
        }
        out
    }

    #[test]
    fn parses_a_valid_frame_and_rejects_truncation() {
        let raw = vec![7u8; PAGE_SIZE];
        let lz = lz4_page();
        let f = pages_frame(&[
            (
                PageEntry {
                    page: 0,
                    codec: Codec::Zero,
                    len: 0,
                    crc: 0,
                },
                vec![],
            ),
            (
                PageEntry {
                    page: 1,
                    codec: Codec::Raw,
                    len: PAGE_SIZE as u16,
                    crc: crc32c::crc32c(&raw),
                },
                raw,
            ),
            (
                PageEntry {
                    page: 2,
                    codec: Codec::Lz4,
                    len: lz.len() as u16,
                    crc: crc32c::crc32c(&lz),
                },
                lz,
            ),
        ]);
        let p = parse_frame(&f, 10).unwrap();
        assert_eq!(p.entries.len(), 3);
        assert_eq!(p.consumed, f.len());
        for cut in [0, 10, 24, 40, f.len() - 1] {
            assert!(parse_frame(&f[..cut], 10).is_err(), "cut at {cut}");
        }
        assert!(parse_frame(&f, 2).is_err(), "page 2 out of range");
        let mut bad = f.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(parse_frame(&bad, 10).is_err(), "page CRC");
    }

    fn lz4_page() -> Vec<u8> {
        let mut enc = ferry_compress::PageEncoder::default();
        let page = [b'a'; PAGE_SIZE];
        let mut out = Vec::new();
        assert_eq!(enc.compress(&page, &mut out), Codec::Lz4);
        out
    }
}
