//! The crate's error type.

use crate::{Codec, PAGE_SIZE};

/// Why a page payload from the peer was rejected. Encoding cannot fail (an
/// incompressible page is sent raw), so this is the crate's only error type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The codec byte is not a known [`Codec`](crate::Codec).
    #[error("Codec id {id} is not a known page codec.")]
    UnknownCodec {
        /// The id as received.
        id: u8,
    },
    /// A zero page came with a payload.
    #[error("Zero page has a payload of {len} bytes; it must be empty.")]
    ZeroPayload {
        /// Length of the payload as received.
        len: usize,
    },
    /// A raw page payload is not exactly one page.
    #[error("Raw page payload is {len} bytes; it must be exactly {PAGE_SIZE}.")]
    RawLength {
        /// Length of the payload as received.
        len: usize,
    },
    /// An LZ4 payload is longer than [`PAYLOAD_BYTES_MAX`](crate::PAYLOAD_BYTES_MAX).
    #[error("LZ4 page payload is {len} bytes, more than the cap of {max} bytes.", max = crate::PAYLOAD_BYTES_MAX)]
    Lz4TooLong {
        /// Length of the payload as received.
        len: usize,
    },
    /// An LZ4 payload is not a valid block, or decodes to more than one page.
    #[error("LZ4 page payload of {len} bytes is malformed or decodes to more than a page.")]
    Lz4Malformed {
        /// Length of the payload as received.
        len: usize,
        /// What the LZ4 decoder found.
        #[source]
        source: lz4_flex::block::DecompressError,
    },
    /// An LZ4 payload decodes to less than one page.
    #[error("LZ4 page payload decodes to {decoded_len} bytes; it must be exactly {PAGE_SIZE}.")]
    Lz4Short {
        /// Bytes the payload decoded to.
        decoded_len: usize,
    },
    /// [`decode`](crate::decode) was given a delta codec, which needs the
    /// receiver's previous version of the page.
    #[error("Codec {codec:?} is a delta against the page's previous version; decode it with decode_delta.")]
    DeltaNeedsBase {
        /// The delta codec as received.
        codec: Codec,
    },
    /// [`decode_delta`](crate::decode_delta) was given a codec that is not a delta.
    #[error("Codec {codec:?} is not a delta codec; decode it with decode.")]
    NotADelta {
        /// The codec as received.
        codec: Codec,
    },
    /// A [`Codec::Xor`] or [`Codec::XorLz4`] payload is longer than
    /// [`PAYLOAD_BYTES_MAX`](crate::PAYLOAD_BYTES_MAX).
    #[error("{codec:?} page payload is {len} bytes, more than the cap of {max} bytes.", max = crate::PAYLOAD_BYTES_MAX)]
    DeltaTooLong {
        /// The codec as received.
        codec: Codec,
        /// Length of the payload as received.
        len: usize,
    },
    /// An XOR delta breaks a rule of the [`xor`](crate::xor) format.
    #[error("XOR delta of {len} bytes is malformed at byte {at}: {fault}.")]
    XorMalformed {
        /// Length of the delta.
        len: usize,
        /// Offset in the delta of the varint or changed run that breaks the rule.
        at: usize,
        /// Which rule.
        fault: DeltaFault,
    },
    /// An XOR+LZ4 payload is not a valid LZ4 block, or decodes to more than
    /// [`PAYLOAD_BYTES_MAX`](crate::PAYLOAD_BYTES_MAX) bytes.
    #[error("XOR+LZ4 page payload of {len} bytes is malformed or decodes to more than {max} bytes.", max = crate::PAYLOAD_BYTES_MAX)]
    XorLz4Malformed {
        /// Length of the payload as received.
        len: usize,
        /// What the LZ4 decoder found.
        #[source]
        source: lz4_flex::block::DecompressError,
    },
    /// An XOR+LZ4 payload is not shorter than the delta it decodes to; the
    /// sender uses [`Codec::XorLz4`] only when LZ4 saves bytes.
    #[error("XOR+LZ4 page payload of {len} bytes decodes to a delta of only {delta_len} bytes.")]
    XorLz4NotSmaller {
        /// Length of the payload as received.
        len: usize,
        /// Length of the delta it decoded to.
        delta_len: usize,
    },
}

/// Which rule of the [`xor`](crate::xor) delta format a delta breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaFault {
    /// The delta ends inside a varint.
    #[error("the delta ends inside a varint")]
    VarintTruncated,
    /// A varint has a redundant zero high byte (`0x80 0x00` for 0).
    #[error("a varint has a redundant zero high byte")]
    VarintOverlong,
    /// A varint is longer than 2 bytes; no field of the format needs more.
    #[error("a varint is longer than 2 bytes")]
    VarintTooLong,
    /// A record other than the first has an unchanged run of 0 bytes: it
    /// should have been part of the previous changed run.
    #[error("a record after the first has an empty unchanged run")]
    AdjacentRuns,
    /// A changed run of 0 bytes.
    #[error("a changed run is empty")]
    EmptyRun,
    /// A run ends past the end of the page.
    #[error("a run ends past the end of the page")]
    PastPageEnd,
    /// The delta ends inside a run's changed bytes.
    #[error("the delta ends inside a changed run")]
    RunTruncated,
}
