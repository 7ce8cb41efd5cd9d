//! Feeds arbitrary bytes to the frame parser: header checks, CRCs, the page
//! table and every page codec. It must return an error, never panic or
//! allocate by what the input claims.
//!
//! Half of the inputs get their CRCs fixed up first (the frame CRC, and each
//! page entry's CRC over the bytes that follow), so the fuzzer gets past the
//! checksums into the table and codec paths instead of stopping at the first
//! CRC check.
#![no_main]

use ferry_engine::wire::parse::parse_frame;
use ferry_engine::wire::{frame_crc, FrameKind, HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_frame(data, 1 << 20);
    if data.len() < HEADER_BYTES {
        return;
    }
    let mut buf = data.to_vec();
    let len = u32::from_le_bytes(buf[8..12].try_into().unwrap()) as usize;
    let Some(kind) = FrameKind::from_u8(buf[2]) else { return };
    let end = (HEADER_BYTES + len).min(buf.len());
    if kind == FrameKind::Pages {
        let mut at = end;
        for e in (HEADER_BYTES..end).step_by(16) {
            if e + 16 > end {
                break;
            }
            let n = u16::from_le_bytes([buf[e + 10], buf[e + 11]]) as usize;
            let stop = (at + n).min(buf.len());
            let crc = crc32c::crc32c(&buf[at..stop]);
            buf[e + 12..e + 16].copy_from_slice(&crc.to_le_bytes());
            at = stop;
        }
    }
    let stream = u16::from_le_bytes([buf[4], buf[5]]);
    let seq = u64::from_le_bytes(buf[12..20].try_into().unwrap());
    let crc = frame_crc(kind, stream, len as u32, seq, &buf[HEADER_BYTES..end]);
    buf[20..24].copy_from_slice(&crc.to_le_bytes());
    let _ = parse_frame(&buf, 1 << 20);
});
