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
            _ => Err(DecodeError::UnknownCodec { id }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ids_round_trip() {
        for codec in [Codec::Zero, Codec::Lz4, Codec::Raw] {
            assert_eq!(Codec::try_from(u8::from(codec)).unwrap(), codec);
        }
    }

    #[test]
    fn unknown_ids_are_rejected() {
        for id in std::iter::once(0).chain(4..=u8::MAX) {
            match Codec::try_from(id) {
                Err(DecodeError::UnknownCodec { id: got }) => assert_eq!(got, id),
                other => panic!("id {id}: expected UnknownCodec, got {other:?}"),
            }
        }
    }
}
