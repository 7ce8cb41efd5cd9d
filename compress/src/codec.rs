//! Wire codec ids.

use crate::DecodeError;

/// How one page is encoded on the wire. The discriminant is the wire id;
/// 0 is reserved invalid so a zeroed header never decodes.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    /// The page is all zeroes; the payload is empty.
    Zero = 1,
    /// LZ4 block format (no size prefix, no frame); decodes to exactly one page.
    Lz4 = 2,
    /// The page itself; the payload is exactly [`PAGE_SIZE`](crate::PAGE_SIZE) bytes.
    Raw = 3,
    /// An XOR delta against the version of the page the receiver holds (the
    /// format is in [`xor`](crate::xor)); at most
    /// [`PAYLOAD_BYTES_MAX`](crate::PAYLOAD_BYTES_MAX) bytes, may be empty
    /// (the page is unchanged). Decoded by [`decode_delta`](crate::decode_delta).
    Xor = 4,
    /// LZ4 block of an XOR delta, sent when shorter than the delta itself; at
    /// most [`PAYLOAD_BYTES_MAX`](crate::PAYLOAD_BYTES_MAX) bytes both before
    /// and after decompression. Decoded by [`decode_delta`](crate::decode_delta).
    XorLz4 = 5,
}

impl Codec {
    /// Whether the payload is a delta against the receiver's previous version
    /// of the page ([`Codec::Xor`], [`Codec::XorLz4`]).
    pub fn is_delta(self) -> bool {
        matches!(self, Codec::Xor | Codec::XorLz4)
    }
}

impl From<Codec> for u8 {
    fn from(codec: Codec) -> u8 {
        codec as u8
    }
}

impl TryFrom<u8> for Codec {
    type Error = DecodeError;

    fn try_from(id: u8) -> Result<Self, Self::Error> {
        match id {
            1 => Ok(Codec::Zero),
            2 => Ok(Codec::Lz4),
            3 => Ok(Codec::Raw),
            4 => Ok(Codec::Xor),
            5 => Ok(Codec::XorLz4),
            _ => Err(DecodeError::UnknownCodec { id }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ids_round_trip() {
        let all = [
            Codec::Zero,
            Codec::Lz4,
            Codec::Raw,
            Codec::Xor,
            Codec::XorLz4,
        ];
        for codec in all {
            assert_eq!(Codec::try_from(u8::from(codec)).unwrap(), codec);
        }
    }

    #[test]
    fn wire_ids_are_stable() {
        let ids = [
            (Codec::Zero, 1),
            (Codec::Lz4, 2),
            (Codec::Raw, 3),
            (Codec::Xor, 4),
            (Codec::XorLz4, 5),
        ];
        for (codec, id) in ids {
            assert_eq!(u8::from(codec), id);
            assert_eq!(codec.is_delta(), id >= 4);
        }
    }

    #[test]
    fn unknown_ids_are_rejected() {
        for id in std::iter::once(0).chain(6..=u8::MAX) {
            match Codec::try_from(id) {
                Err(DecodeError::UnknownCodec { id: got }) => assert_eq!(got, id),
                other => panic!("id {id}: expected UnknownCodec, got {other:?}"),
            }
        }
    }
}
