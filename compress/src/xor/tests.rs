use super::*;

fn page(fill: u8) -> Vec<u8> {
    vec![fill; PAGE_SIZE]
}

fn encode(old: &[u8], new: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let len = xor_encode(old, new, &mut out, PAYLOAD_BYTES_MAX).expect("fits");
    assert_eq!(len, out.len());
    out
}

fn fault(delta: &[u8]) -> (usize, DeltaFault) {
    let mut page = page(7);
    match xor_decode(delta, &mut page) {
        Err(DecodeError::XorMalformed { len, at, fault }) => {
            assert_eq!(len, delta.len());
            assert!(page.iter().all(|&b| b == 7), "page written on error");
            (at, fault)
        }
        other => panic!("{delta:?}: expected XorMalformed, got {other:?}"),
    }
}

#[test]
fn module_doc_example() {
    let old = page(0);
    let mut new = old.clone();
    new[10..12].copy_from_slice(b"AB");
    new[4094..].copy_from_slice(b"YZ");
    let delta = encode(&old, &new);
    assert_eq!(delta, b"\x0A\x02AB\xF2\x1F\x02YZ");
    let mut back = old.clone();
    xor_decode(&delta, &mut back).unwrap();
    assert_eq!(back, new);
}

#[test]
fn unchanged_page_is_the_empty_delta() {
    let mut out = vec![1, 2, 3];
    assert_eq!(xor_encode(&page(5), &page(5), &mut out, 0), Some(0));
    assert_eq!(out, [1, 2, 3]);
    let mut back = page(5);
    xor_decode(&[], &mut back).unwrap();
    assert_eq!(back, page(5));
}

#[test]
fn appends_after_existing_bytes() {
    let mut new = page(0);
    new[0] = 1;
    let mut out = vec![9, 9];
    assert_eq!(xor_encode(&page(0), &new, &mut out, 100), Some(3));
    assert_eq!(out, [9, 9, 0, 1, 1]);
}

#[test]
fn fully_changed_page_overflows_and_leaves_out_alone() {
    let mut out = vec![1, 2, 3];
    for limit in [0, 100, PAGE_SIZE, usize::MAX] {
        assert_eq!(xor_encode(&page(0), &page(1), &mut out, limit), None);
        assert_eq!(out, [1, 2, 3]);
    }
}

#[test]
fn limit_is_exact() {
    let mut new = page(0);
    for (k, at) in [100, 900, 2000, 3000].into_iter().enumerate() {
        new[at..at + 200].fill(k as u8 + 1);
    }
    let n = encode(&page(0), &new).len();
    let mut out = Vec::new();
    assert_eq!(xor_encode(&page(0), &new, &mut out, n), Some(n));
    out.clear();
    assert_eq!(xor_encode(&page(0), &new, &mut out, n - 1), None);
    assert!(out.is_empty());
    // Cut off in the middle of the first run and of the last one.
    assert_eq!(xor_encode(&page(0), &new, &mut out, 50), None);
    assert_eq!(xor_encode(&page(0), &new, &mut out, n - 100), None);
    assert!(out.is_empty());
}

#[test]
fn largest_delta_is_at_the_cap() {
    // Changed from byte 3 on: skip 3 (1 byte), len 4093 (2 bytes) = 4096.
    let mut new = page(0);
    new[3..].fill(1);
    assert_eq!(encode(&page(0), &new).len(), PAYLOAD_BYTES_MAX);
    new[2] = 1;
    assert_eq!(
        xor_encode(&page(0), &new, &mut Vec::new(), usize::MAX),
        None
    );
}

#[test]
fn short_gaps_are_merged() {
    let old = page(0);
    let mut new = old.clone();
    new[10] = 1;
    new[13] = 1; // gap of 2: one record
    assert_eq!(encode(&old, &new), [10, 4, 1, 0, 0, 1]);
    new[13] = 0;
    new[14] = 1; // gap of 3: two records
    assert_eq!(encode(&old, &new), [10, 1, 1, 3, 1, 1]);
}

#[test]
fn varint_boundaries() {
    for value in [0, 1, 127, 128, 129, 4095, 4096] {
        let mut buf = Vec::new();
        put_varint(&mut buf, value);
        assert_eq!(buf.len(), varint_len(value));
        let mut at = 0;
        assert_eq!(read_varint(&buf, &mut at), Ok(value));
        assert_eq!(at, buf.len());
    }
    let mut at = 0;
    assert_eq!(read_varint(&[0xFF, 0x7F], &mut at), Ok(16383));
}

#[test]
fn run_to_the_page_end_is_accepted() {
    let mut p = page(0);
    xor_decode(&[0xFF, 0x1F, 1, 9], &mut p).unwrap();
    assert_eq!(p[PAGE_SIZE - 1], 9);
    let mut whole = vec![0x00, 0x80, 0x20];
    whole.extend_from_slice(&page(3)[..PAGE_SIZE - 3]);
    // skip 0, len 4096 does not fit in a PAYLOAD_BYTES_MAX delta.
    assert!(xor_decode(&whole, &mut p).is_err());
}

#[test]
fn malformed_deltas_are_rejected_where_they_break() {
    use DeltaFault::*;
    let cases: &[(&[u8], usize, DeltaFault)] = &[
        (&[0x80], 0, VarintTruncated),
        (&[0x00], 1, VarintTruncated),
        (&[0x00, 0x81], 1, VarintTruncated),
        (&[0x80, 0x00, 1, 1], 0, VarintOverlong),
        (&[0x00, 0x81, 0x00], 1, VarintOverlong),
        (&[0x80, 0x80, 0x01, 1, 1], 0, VarintTooLong),
        (&[0x00, 1, 5, 0x00, 1, 6], 3, AdjacentRuns),
        (&[0x05, 0x00], 1, EmptyRun),
        (&[0xFF, 0x1F, 2, 1, 1], 0, PastPageEnd),
        (&[0x80, 0x20, 1, 1], 0, PastPageEnd),
        (&[0x00, 1, 1, 0xFF, 0x1F, 1, 1], 3, PastPageEnd),
        (&[0xFF, 0x7F, 0xFF, 0x7F], 0, PastPageEnd),
        (&[0x00, 3, 1, 2], 2, RunTruncated),
        (&[0x00, 1, 5, 0x01], 4, VarintTruncated),
    ];
    for &(delta, at, want) in cases {
        assert_eq!(fault(delta), (at, want), "delta {delta:?}");
    }
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut new = page(0);
    new[100..110].fill(4);
    let good = encode(&page(0), &new);
    for tail in [&[0u8][..], &[1], &[0x80], &[1, 1]] {
        let mut bad = good.clone();
        bad.extend_from_slice(tail);
        fault(&bad);
    }
}

#[test]
fn too_long_delta_is_rejected_before_parsing() {
    let mut p = page(0);
    let err = xor_decode(&vec![0; PAYLOAD_BYTES_MAX + 1], &mut p).unwrap_err();
    assert!(
        matches!(err, DecodeError::DeltaTooLong { codec: Codec::Xor, len } if len == PAYLOAD_BYTES_MAX + 1)
    );
}

#[test]
#[should_panic(expected = "one page")]
fn encode_of_short_page_is_a_caller_bug() {
    xor_encode(&page(0)[1..], &page(0)[1..], &mut Vec::new(), 10);
}
