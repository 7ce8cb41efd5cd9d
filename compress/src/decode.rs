//! Page decoding, the receive side.

use crate::{Codec, DecodeError, PAGE_SIZE, PAYLOAD_BYTES_MAX};

/// Decodes one page payload into `out`.
///
/// [`Codec::Zero`]: `payload` must be empty. [`Codec::Raw`]: `payload` must be
/// exactly [`PAGE_SIZE`] bytes. [`Codec::Lz4`]: `payload` is at most
/// [`PAYLOAD_BYTES_MAX`] bytes and must decode to exactly [`PAGE_SIZE`] bytes;
/// short, long or malformed blocks, and bytes after the page is full, are
/// errors. Nothing is allocated and no input makes this panic. On error,
/// `out` holds unspecified bytes.
///
/// # Panics
///
/// If `out` is not exactly [`PAGE_SIZE`] bytes (a caller bug, not peer input).
pub fn decode(codec: Codec, payload: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    assert_eq!(out.len(), PAGE_SIZE, "decode output must be one page");
    let len = payload.len();
    match codec {
        Codec::Zero => {
            if len != 0 {
                return Err(DecodeError::ZeroPayload { len });
            }
            out.fill(0);
        }
        Codec::Raw => {
            if len != PAGE_SIZE {
                return Err(DecodeError::RawLength { len });
            }
            out.copy_from_slice(payload);
        }
        Codec::Lz4 => {
            if len > PAYLOAD_BYTES_MAX {
                return Err(DecodeError::Lz4TooLong { len });
            }
            // The safe decoder reads until the payload is exhausted and errors
            // on any write past `out`, so bytes after a full page are rejected.
            let decoded_len = lz4_flex::block::decompress_into(payload, out)
                .map_err(|source| DecodeError::Lz4Malformed { len, source })?;
            if decoded_len != PAGE_SIZE {
                return Err(DecodeError::Lz4Short { decoded_len });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_page() -> Vec<u8> {
        b"the quick brown fox jumps over the lazy dog. "
            .iter()
            .copied()
            .cycle()
            .take(PAGE_SIZE)
            .collect()
    }

    fn lz4(page: &[u8]) -> Vec<u8> {
        lz4_flex::block::compress(page)
    }

    #[test]
    fn zero_round_trip() {
        let mut out = vec![0xAA; PAGE_SIZE];
        decode(Codec::Zero, &[], &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
    }

    #[test]
    fn raw_round_trip() {
        let page = text_page();
        let mut out = vec![0; PAGE_SIZE];
        decode(Codec::Raw, &page, &mut out).unwrap();
        assert_eq!(out, page);
    }

    #[test]
    fn lz4_round_trip() {
        let page = text_page();
        let mut out = vec![0; PAGE_SIZE];
        decode(Codec::Lz4, &lz4(&page), &mut out).unwrap();
        assert_eq!(out, page);
    }

    #[test]
    fn zero_with_payload_is_rejected() {
        let mut out = vec![0; PAGE_SIZE];
        for len in [1, 7, PAGE_SIZE] {
            let err = decode(Codec::Zero, &vec![0; len], &mut out).unwrap_err();
            assert!(matches!(err, DecodeError::ZeroPayload { len: l } if l == len));
        }
    }

    #[test]
    fn raw_of_wrong_length_is_rejected() {
        let mut out = vec![0; PAGE_SIZE];
        for len in [0, 1, PAGE_SIZE - 1, PAGE_SIZE + 1, 2 * PAGE_SIZE] {
            let err = decode(Codec::Raw, &vec![1; len], &mut out).unwrap_err();
            assert!(matches!(err, DecodeError::RawLength { len: l } if l == len));
        }
    }

    #[test]
    fn lz4_longer_than_cap_is_rejected() {
        let mut out = vec![0; PAGE_SIZE];
        let err = decode(Codec::Lz4, &vec![0; PAYLOAD_BYTES_MAX + 1], &mut out).unwrap_err();
        assert!(matches!(err, DecodeError::Lz4TooLong { .. }));
    }

    #[test]
    fn lz4_empty_is_rejected() {
        let mut out = vec![0; PAGE_SIZE];
        let err = decode(Codec::Lz4, &[], &mut out).unwrap_err();
        assert!(matches!(err, DecodeError::Lz4Malformed { len: 0, .. }));
    }

    #[test]
    fn lz4_short_page_is_rejected() {
        let mut out = vec![0; PAGE_SIZE];
        let half = lz4(&text_page()[..PAGE_SIZE / 2]);
        let err = decode(Codec::Lz4, &half, &mut out).unwrap_err();
        assert!(
            matches!(err, DecodeError::Lz4Short { decoded_len } if decoded_len == PAGE_SIZE / 2)
        );
    }

    #[test]
    fn lz4_long_page_is_rejected() {
        let mut out = vec![0; PAGE_SIZE];
        let mut long = text_page();
        long.extend_from_slice(b"one byte more");
        let err = decode(Codec::Lz4, &lz4(&long), &mut out).unwrap_err();
        assert!(matches!(err, DecodeError::Lz4Malformed { .. }));
    }

    #[test]
    fn lz4_truncated_is_rejected() {
        let mut out = vec![0; PAGE_SIZE];
        let payload = lz4(&text_page());
        for cut in 1..payload.len() {
            assert!(
                decode(Codec::Lz4, &payload[..cut], &mut out).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn lz4_trailing_bytes_are_rejected() {
        let mut out = vec![0; PAGE_SIZE];
        let payload = lz4(&text_page());
        // A literal, a match, or garbage after a full page all write past it.
        for tail in [&[0x10, 0x41][..], &[0x00, 0x01, 0x00], &[0xFF; 8]] {
            let mut bad = payload.clone();
            bad.extend_from_slice(tail);
            assert!(decode(Codec::Lz4, &bad, &mut out).is_err(), "tail {tail:?}");
        }
    }

    #[test]
    fn lz4_bad_offsets_are_rejected() {
        let mut out = vec![0; PAGE_SIZE];
        // One literal then a match at offset 0, then at an offset before the start.
        for payload in [&[0x10, 0x41, 0x00, 0x00][..], &[0x10, 0x41, 0x05, 0x00]] {
            let err = decode(Codec::Lz4, payload, &mut out).unwrap_err();
            assert!(matches!(err, DecodeError::Lz4Malformed { .. }));
        }
    }

    #[test]
    fn lz4_literal_past_payload_is_rejected() {
        let mut out = vec![0; PAGE_SIZE];
        // Token announces 15 + 255 + 10 literals, none follow.
        let err = decode(Codec::Lz4, &[0xF0, 0xFF, 0x0A], &mut out).unwrap_err();
        assert!(matches!(err, DecodeError::Lz4Malformed { .. }));
    }

    #[test]
    #[should_panic(expected = "one page")]
    fn output_of_wrong_size_is_a_caller_bug() {
        let mut out = vec![0; PAGE_SIZE - 1];
        let _ = decode(Codec::Zero, &[], &mut out);
    }
}
