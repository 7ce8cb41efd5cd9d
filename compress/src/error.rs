//! The crate's error type.

use crate::PAGE_SIZE;

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
}
