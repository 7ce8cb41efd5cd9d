//! The pre-shared key of a ferryd pair and the HMAC challenge-response over it.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a key: 256 bits.
pub const KEY_BYTES: usize = 32;

/// A pre-shared key. Made by `ferry keygen`; kept in a file as 64 hex digits.
#[derive(Clone)]
pub struct Key([u8; KEY_BYTES]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading the file failed.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The content is not 64 hex digits.
    #[error("key file {path} does not hold 64 hex digits")]
    Format {
        /// The file.
        path: String,
    },
    /// The OS random source failed.
    #[error("cannot get random bytes: {0}")]
    Random(String),
}

impl Key {
    /// A fresh random key.
    pub fn generate() -> Result<Self, KeyError> {
        let mut k = [0u8; KEY_BYTES];
        getrandom::fill(&mut k).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Key(k))
    }

    /// Parses 64 hex digits (surrounding white space allowed).
    pub fn from_hex(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.len() != KEY_BYTES * 2 {
            return None;
        }
        let mut k = [0u8; KEY_BYTES];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Key(k))
    }

    /// Reads a key file.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let p = path.display().to_string();
        let s = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: p.clone(),
            source,
        })?;
        Self::from_hex(&s).ok_or(KeyError::Format { path: p })
    }

    /// The key as 64 hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// HMAC-SHA256 over the parts, in order.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    /// Checks a MAC in constant time.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        for p in parts {
            m.update(p);
        }
        m.verify_slice(tag).is_ok()
    }
}

/// Fresh random bytes for nonces and ids.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // getrandom only fails when the OS has no entropy source at all, which a
    // Linux host running KVM always has.
    getrandom::fill(&mut b).expect("the OS random source failed");
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_mac() {
        let k = Key::generate().unwrap();
        let k2 = Key::from_hex(&format!(" {}\n", k.to_hex())).unwrap();
        let tag = k.mac(&[b"a", b"b"]);
        assert!(k2.verify(&[b"a", b"b"], &tag));
        assert!(!k2.verify(&[b"ab", b""], &k.mac(&[b"a", b"c"])));
        assert!(Key::from_hex("xyz").is_none());
        assert!(Key::from_hex(&"g".repeat(64)).is_none());
    }
}
