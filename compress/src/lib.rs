//! Page codecs for ferry: zero detection, LZ4 and raw pages.
//!
//! Pure functions over one guest page ([`PAGE_SIZE`] bytes), no I/O, no threads.
//! The engine's send path per dirty page is:
//!
//! ```text
//!   guest page ──is_zero_guest──▶ zero? ──yes──▶ Codec::Zero, empty payload
//!                                    │no
//!                 PageEncoder::should_try? ──no──▶ Codec::Raw, page sent as is (no staging copy)
//!                                    │yes
//!                 copy out (staged, private) ──PageEncoder::compress──▶ Codec::Lz4 | Codec::Raw
//! ```
//!
//! and the receive path is one call to [`decode`] per page, which checks every
//! payload against the codec's exact size and never allocates.
//!
//! With a [`DeltaCache`] (one per encoder thread), a staged page is first
//! offered to [`DeltaCache::encode`]: on a hit its changes since the last send
//! go as [`Codec::Xor`] or [`Codec::XorLz4`]; on a miss or overflow it goes
//! on to `compress` as above, and the cache holds it either way. The receiver
//! applies a delta to the page it holds with [`decode_delta`]. The delta
//! format is in [`xor`].
//!
//! Wire codec ids are [`Codec`]; 0 is reserved invalid.

mod codec;
mod decode;
mod encoder;
mod error;
mod probe;
pub mod xor;
mod zero;

pub use codec::Codec;
pub use decode::{decode, decode_delta};
pub use encoder::{EncoderConfig, EncoderStats, PageEncoder};
pub use error::{DecodeError, DeltaFault};
pub use xor::{xor_decode, xor_encode, DeltaCache, DeltaOutcome, DeltaStats};
pub use zero::{is_zero, is_zero_guest};

/// Size of one guest page, the unit of every codec.
pub const PAGE_SIZE: usize = 4096;

/// Cap on any page payload a decoder or frame parser accepts, for every codec:
/// a raw page is exactly this long, and an LZ4 payload or XOR delta longer
/// than the page it encodes is never produced (see
/// [`EncoderConfig::lz4_bytes_max`], [`xor_encode`]). An XOR+LZ4 payload is
/// capped both before and after decompression.
pub const PAYLOAD_BYTES_MAX: usize = PAGE_SIZE;

/// Default upper bound of an LZ4 payload that [`PageEncoder::compress`] returns:
/// 7/8 of a page = 3584 bytes. Below a 1/8 saving the decoder's work is not
/// worth the bytes saved on the wire.
pub const LZ4_BYTES_MAX_DEFAULT: usize = PAGE_SIZE * 7 / 8;

#[cfg(test)]
#[path = "testdata.rs"]
mod testdata;
