//! Page decoding, the receive side.

use crate::{xor_decode, Codec, DecodeError, PAGE_SIZE, PAYLOAD_BYTES_MAX};

/// Decodes one page payload into `out`.
///
/// [`Codec::Zero`]: `payload` must be empty. [`Codec::Raw`]: `payload` must be
/// exactly [`PAGE_SIZE`] bytes. [`Codec::Lz4`]: `payload` is at most
/// [`PAYLOAD_BYTES_MAX`] bytes and must decode to exactly [`PAGE_SIZE`] bytes;
/// short, long or malformed blocks, and bytes after the page is full, are
/// errors. The delta codecs [`Codec::Xor`] and [`Codec::XorLz4`] are
/// rejected with [`DecodeError::DeltaNeedsBase`]: they need the page's
/// previous version, see [`decode_delta`]. Nothing is allocated and no input
/// makes this panic. On error, `out` holds unspecified bytes.
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
        Codec::Xor | Codec::XorLz4 => return Err(DecodeError::DeltaNeedsBase { codec }),
    }
    Ok(())
}

/// Applies one delta payload to `page`, which holds the page's previous
/// version (the one the sender's [`DeltaCache`](crate::DeltaCache) held) and
/// becomes the new version.
///
/// [`Codec::Xor`]: `payload` is a delta as [`xor_decode`] describes.
/// [`Codec::XorLz4`]: `payload` is at most [`PAYLOAD_BYTES_MAX`] bytes, an
/// LZ4 block that decodes to a delta of at most [`PAYLOAD_BYTES_MAX`] bytes
/// and longer than `payload` (the sender uses LZ4 only when it saves bytes).
/// Other codecs are rejected with [`DecodeError::NotADelta`]; see [`decode`].
///
/// The payload is checked in full before `page` is written: on error `page`
/// is unchanged. Nothing is allocated (a 4 KiB stack buffer holds the LZ4
/// output) and no input makes this panic.
///
/// # Panics
///
/// If `page` is not exactly [`PAGE_SIZE`] bytes (a caller bug, not peer input).
pub fn decode_delta(codec: Codec, payload: &[u8], page: &mut [u8]) -> Result<(), DecodeError> {
    assert_eq!(page.len(), PAGE_SIZE, "decode_delta page must be one page");
    let len = payload.len();
    match codec {
        Codec::Xor => xor_decode(payload, page),
        Codec::XorLz4 => {
            if len > PAYLOAD_BYTES_MAX {
                return Err(DecodeError::DeltaTooLong { codec, len });
            }
            let mut delta = [0u8; PAYLOAD_BYTES_MAX];
            // As for Lz4: the safe decoder errors on any write past `delta`.
            let delta_len = lz4_flex::block::decompress_into(payload, &mut delta)
                .map_err(|source| DecodeError::XorLz4Malformed { len, source })?;
            if delta_len <= len {
                return Err(DecodeError::XorLz4NotSmaller { len, delta_len });
            }
            xor_decode(&delta[..delta_len], page)
        }
        Codec::Zero | Codec::Lz4 | Codec::Raw => Err(DecodeError::NotADelta { codec }),
    }
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
    fn delta_codecs_need_decode_delta() {
        let mut out = vec![0; PAGE_SIZE];
        for codec in [Codec::Xor, Codec::XorLz4] {
            let err = decode(codec, &[], &mut out).unwrap_err();
            assert!(matches!(err, DecodeError::DeltaNeedsBase { codec: c } if c == codec));
        }
        for codec in [Codec::Zero, Codec::Lz4, Codec::Raw] {
            let err = decode_delta(codec, &[], &mut out).unwrap_err();
            assert!(matches!(err, DecodeError::NotADelta { codec: c } if c == codec));
        }
    }

    /// A delta that writes `fill` over the whole page in 64-byte runs: long
    /// and very compressible.
    fn striped_delta(fill: u8) -> Vec<u8> {
        let mut delta = Vec::new();
        for k in 0..PAGE_SIZE / 128 {
            delta.extend_from_slice(&[if k == 0 { 0 } else { 64 }, 64]);
            delta.extend_from_slice(&[fill; 64]);
        }
        delta
    }

    #[test]
    fn xor_lz4_round_trip() {
        let delta = striped_delta(9);
        let payload = lz4(&delta);
        assert!(payload.len() < delta.len());
        let mut page = vec![1; PAGE_SIZE];
        decode_delta(Codec::XorLz4, &payload, &mut page).unwrap();
        for (i, &b) in page.iter().enumerate() {
            assert_eq!(b, if i % 128 < 64 { 9 } else { 1 }, "byte {i}");
        }
    }

    #[test]
    fn xor_lz4_must_be_smaller_than_its_delta() {
        let mut page = vec![1; PAGE_SIZE];
        for delta in [&[][..], &[0, 1, 5], &[3, 4, 1, 2, 3, 4]] {
            let err = decode_delta(Codec::XorLz4, &lz4(delta), &mut page).unwrap_err();
            assert!(matches!(err, DecodeError::XorLz4NotSmaller { .. }), "{err}");
        }
        assert!(page.iter().all(|&b| b == 1));
    }

    #[test]
    fn xor_lz4_caps_payload_and_delta() {
        let mut page = vec![1; PAGE_SIZE];
        let err = decode_delta(Codec::XorLz4, &vec![0; PAYLOAD_BYTES_MAX + 1], &mut page);
        assert!(matches!(
            err,
            Err(DecodeError::DeltaTooLong {
                codec: Codec::XorLz4,
                ..
            })
        ));
        // A delta of one byte more than the cap: an LZ4 of it is rejected as
        // malformed (it overflows the buffer) whatever the delta says.
        let mut delta = striped_delta(9);
        delta.resize(PAYLOAD_BYTES_MAX + 1, 0);
        let err = decode_delta(Codec::XorLz4, &lz4(&delta), &mut page);
        assert!(
            matches!(err, Err(DecodeError::XorLz4Malformed { .. })),
            "{err:?}"
        );
        // A bad delta inside good LZ4 is the delta's error.
        let err = decode_delta(Codec::XorLz4, &lz4(&[0u8; 64]), &mut page);
        assert!(
            matches!(err, Err(DecodeError::XorMalformed { .. })),
            "{err:?}"
        );
        assert!(page.iter().all(|&b| b == 1));
    }

    #[test]
    #[should_panic(expected = "one page")]
    fn delta_page_of_wrong_size_is_a_caller_bug() {
        let mut page = vec![0; PAGE_SIZE + 1];
        let _ = decode_delta(Codec::Xor, &[], &mut page);
    }

    #[test]
    #[should_panic(expected = "one page")]
    fn output_of_wrong_size_is_a_caller_bug() {
        let mut out = vec![0; PAGE_SIZE - 1];
        let _ = decode(Codec::Zero, &[], &mut out);
    }
}
