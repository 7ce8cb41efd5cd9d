use super::*;
use proptest::prelude::*;

#[test]
fn header_round_trip_and_crc() {
    let payload = b"hello";
    let crc = frame_crc(FrameKind::Control, 0, 5, 7, payload);
    let h = FrameHeader {
        kind: FrameKind::Control,
        stream: 0,
        len: 5,
        seq: 7,
        crc,
    };
    assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
    assert_ne!(
        crc,
        frame_crc(FrameKind::Control, 0, 5, 8, payload),
        "seq is covered"
    );
    assert_ne!(
        crc,
        frame_crc(FrameKind::Control, 0, 5, 7, b"hellp"),
        "payload is covered"
    );
}

#[test]
fn header_rejects_bad_values() {
    let good = FrameHeader {
        kind: FrameKind::Ack,
        stream: 1,
        len: ACK_BYTES as u32,
        seq: 1,
        crc: 0,
    }
    .encode();
    let mut b = good;
    b[0] = 0;
    assert!(matches!(FrameHeader::decode(&b), Err(WireError::Magic(_))));
    for kind in [0u8, 5, 9, 14, 19, 25, 255] {
        let mut b = good;
        b[2] = kind;
        assert!(matches!(FrameHeader::decode(&b), Err(WireError::UnknownKind(k)) if k == kind));
    }
    let mut b = good;
    b[3] = 1;
    assert!(matches!(
        FrameHeader::decode(&b),
        Err(WireError::Reserved { .. })
    ));
    let mut b = good;
    b[8..12].copy_from_slice(&(ACK_BYTES as u32 + 1).to_le_bytes());
    assert!(matches!(
        FrameHeader::decode(&b),
        Err(WireError::Oversized { .. })
    ));
    let mut b = good;
    b[2] = FrameKind::Pages as u8;
    b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        FrameHeader::decode(&b),
        Err(WireError::Oversized { .. })
    ));
}

#[test]
fn page_entry_checks_codec_lengths() {
    let mut v = Vec::new();
    PageEntry {
        page: 9,
        codec: Codec::Raw,
        len: 4096,
        crc: 5,
    }
    .encode_into(&mut v);
    assert_eq!(PageEntry::decode(&v).unwrap().page, 9);
    for (codec, len, ok) in [
        (Codec::Zero, 0, true),
        (Codec::Zero, 1, false),
        (Codec::Raw, 4095, false),
        (Codec::Lz4, 0, false),
        (Codec::Lz4, 4096, true),
        (Codec::Lz4, 4097, false),
        (Codec::Xor, 0, true),
        (Codec::Xor, 4097, false),
        (Codec::XorLz4, 0, false),
        (Codec::Xor, 1, true),
        (Codec::XorLz4, 4096, true),
        (Codec::XorLz4, 4097, false),
    ] {
        let mut v = Vec::new();
        PageEntry {
            page: 1,
            codec,
            len,
            crc: 0,
        }
        .encode_into(&mut v);
        assert_eq!(PageEntry::decode(&v).is_ok(), ok, "{codec:?} {len}");
    }
    let mut v = Vec::new();
    PageEntry {
        page: 1,
        codec: Codec::Zero,
        len: 0,
        crc: 0,
    }
    .encode_into(&mut v);
    v[8] = 0;
    assert!(PageEntry::decode(&v).is_err());
    v[8] = 200;
    assert!(PageEntry::decode(&v).is_err());
}

#[test]
fn control_messages_round_trip() {
    let m = ControlMsg::Prepare {
        streams: vec![StreamTotals {
            last_seq: 3,
            pages: 100,
        }],
        state_len: 10,
        state_crc: 1,
        progress: 5,
        postcopy: true,
        grace_ms: 60_000,
        checkpoint_ms: 1000,
    };
    assert_eq!(decode_control(&encode_control(&m)).unwrap(), m);
    let m = ControlMsg::Checkpoint {
        id: 7,
        pages: 3,
        state_len: 100,
        state_crc: 9,
        progress: 42,
    };
    assert_eq!(decode_control(&encode_control(&m)).unwrap(), m);
    // A peer that predates post-copy sends neither `mode` nor `postcopy`.
    let old = br#"{"type":"prepare","streams":[],"state_len":0,"state_crc":0,"progress":0}"#;
    assert!(matches!(
        decode_control(old).unwrap(),
        ControlMsg::Prepare {
            postcopy: false,
            grace_ms: 0,
            checkpoint_ms: 0,
            ..
        }
    ));
    // Nor does it say whether it checkpoints.
    let old = br#"{"type":"prepared","verify":{"checked":false,"mem_hash":"","pages_checked":0,"pages_bad":0,"verify_ms":0}}"#;
    assert!(matches!(
        decode_control(old),
        Ok(ControlMsg::Prepared {
            checkpoints: false,
            ..
        })
    ));
    for m in ["precopy", "postcopy", "hybrid"] {
        assert_eq!(m.parse::<Mode>().unwrap().name(), m);
    }
    assert!("pre-copy".parse::<Mode>().is_err());
    assert!(decode_control(b"{\"type\":\"nope\"}").is_err());
    assert!(decode_control(b"\xff").is_err());
}

proptest! {
    #[test]
    fn header_decode_never_panics(b in proptest::array::uniform24(any::<u8>())) {
        let _ = FrameHeader::decode(&b);
    }

    #[test]
    fn entry_decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..32)) {
        let _ = PageEntry::decode(&b);
    }

    #[test]
    fn ack_round_trip(stream in any::<u16>(), round in any::<u32>(), seq in any::<u64>()) {
        let a = Ack { stream, round, seq };
        prop_assert_eq!(Ack::decode(&a.encode()).unwrap(), a);
    }
}
