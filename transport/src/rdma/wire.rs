//! What the two ends of an RDMA stream tell each other: the side-channel
//! hello, and the messages on the queue pair (a type and a value in the
//! 32-bit immediate, a small payload for two of them).

use std::io;

use super::verbs::Endpoint;

/// First bytes of a hello; the digit is the version.
pub const MAGIC: &[u8; 8] = b"FERRYRD1";
/// Bytes of a hello.
pub const HELLO_BYTES: usize = 64;
/// Byte each side writes on the side channel once its QP is ready to receive.
pub const READY: u8 = b'R';

/// One side's half of the set-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Where to connect.
    pub endpoint: Endpoint,
    /// Whether this side routes with a global header (RoCE).
    pub global: bool,
    /// DATA messages this side can hold at once (the sender's first credits).
    pub credits: u16,
    /// Largest DATA message this side receives.
    pub slot_bytes: u32,
}

impl Hello {
    /// The 64-byte encoding (integers little-endian).
    pub fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut b = [0u8; HELLO_BYTES];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.endpoint.qpn.to_le_bytes());
        b[12..16].copy_from_slice(&self.endpoint.psn.to_le_bytes());
        b[16..32].copy_from_slice(&self.endpoint.gid);
        b[32..34].copy_from_slice(&self.endpoint.lid.to_le_bytes());
        b[34] = self.endpoint.mtu;
        b[35] = u8::from(self.global);
        b[36..38].copy_from_slice(&self.credits.to_le_bytes());
        b[38..42].copy_from_slice(&self.slot_bytes.to_le_bytes());
        b
    }

    /// Parses and checks a peer's hello.
    pub fn decode(b: &[u8; HELLO_BYTES]) -> io::Result<Hello> {
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        if &b[0..8] != MAGIC {
            return Err(bad(format!(
                "the peer does not speak ferry's rdma transport (hello starts {:?}, want {:?})",
                String::from_utf8_lossy(&b[0..8]),
                String::from_utf8_lossy(MAGIC)
            )));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[16..32]);
        let hello = Hello {
            endpoint: Endpoint {
                qpn: u32_at(8),
                psn: u32_at(12),
                gid,
                lid: u16::from_le_bytes([b[32], b[33]]),
                mtu: b[34],
            },
            global: b[35] & 1 == 1,
            credits: u16::from_le_bytes([b[36], b[37]]),
            slot_bytes: u32_at(38),
        };
        if hello.endpoint.qpn == 0 || hello.endpoint.qpn >= 1 << 24 {
            return Err(bad(format!(
                "queue pair number {} out of range",
                hello.endpoint.qpn
            )));
        }
        if hello.endpoint.psn >= 1 << 24 {
            return Err(bad(format!(
                "packet sequence number {} out of range",
                hello.endpoint.psn
            )));
        }
        if !(1..=5).contains(&hello.endpoint.mtu) {
            return Err(bad(format!(
                "MTU code {} out of range 1..=5",
                hello.endpoint.mtu
            )));
        }
        if !(1..=1024).contains(&hello.credits) {
            return Err(bad(format!(
                "{} receive credits, want 1..=1024",
                hello.credits
            )));
        }
        if !(4096..=(1 << 20)).contains(&hello.slot_bytes) {
            return Err(bad(format!(
                "receive slots of {} bytes, want 4 KiB..=1 MiB",
                hello.slot_bytes
            )));
        }
        Ok(hello)
    }
}

/// Message types, in the top four bits of the immediate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Msg {
    /// Stream bytes in the payload; the value returns DATA credits.
    Data = 1,
    /// The value returns DATA credits.
    Credit = 2,
    /// A run of guest memory is ready to be written into the receiver
    /// (payload: [`Rts`]).
    Rts = 3,
    /// The receiver grants a piece of the announced run (payload: [`Cts`]).
    Cts = 4,
    /// RDMA WRITE WITH IMMEDIATE: the granted piece has landed; the value
    /// is the grant's token.
    Written = 5,
    /// The sender shut the stream down: nothing follows.
    Fin = 6,
}

/// Bits of the immediate left for the value.
pub const VALUE_BITS: u32 = 28;
/// Mask of the value.
pub const VALUE_MASK: u32 = (1 << VALUE_BITS) - 1;

/// The immediate of a message.
pub fn imm(msg: Msg, value: u32) -> u32 {
    ((msg as u32) << VALUE_BITS) | (value & VALUE_MASK)
}

/// Splits an immediate; `None` for an unknown type.
pub fn parse_imm(imm: u32) -> Option<(Msg, u32)> {
    let value = imm & VALUE_MASK;
    let msg = match imm >> VALUE_BITS {
        1 => Msg::Data,
        2 => Msg::Credit,
        3 => Msg::Rts,
        4 => Msg::Cts,
        5 => Msg::Written,
        6 => Msg::Fin,
        _ => return None,
    };
    Some((msg, value))
}

/// Payload of [`Msg::Rts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rts {
    /// Bytes in the run.
    pub len: u64,
}

impl Rts {
    /// Payload bytes.
    pub const BYTES: usize = 8;

    /// Encodes.
    pub fn encode(&self) -> [u8; Self::BYTES] {
        self.len.to_le_bytes()
    }

    /// Decodes a payload of exactly [`Rts::BYTES`].
    pub fn decode(b: &[u8]) -> Option<Rts> {
        let len = u64::from_le_bytes(b.try_into().ok()?);
        (len > 0).then_some(Rts { len })
    }
}

/// Payload of [`Msg::Cts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cts {
    /// Offset of the piece in the announced run.
    pub off: u64,
    /// Where to write it (the receiver's virtual address).
    pub addr: u64,
    /// Bytes in the piece.
    pub len: u32,
    /// Remote key of the memory at `addr`.
    pub rkey: u32,
    /// Echoed in the WRITTEN immediate.
    pub token: u32,
}

impl Cts {
    /// Payload bytes.
    pub const BYTES: usize = 28;

    /// Encodes.
    pub fn encode(&self) -> [u8; Self::BYTES] {
        let mut b = [0u8; Self::BYTES];
        b[0..8].copy_from_slice(&self.off.to_le_bytes());
        b[8..16].copy_from_slice(&self.addr.to_le_bytes());
        b[16..20].copy_from_slice(&self.len.to_le_bytes());
        b[20..24].copy_from_slice(&self.rkey.to_le_bytes());
        b[24..28].copy_from_slice(&self.token.to_le_bytes());
        b
    }

    /// Decodes a payload of exactly [`Cts::BYTES`].
    pub fn decode(b: &[u8]) -> Option<Cts> {
        if b.len() != Self::BYTES {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4"));
        let cts = Cts {
            off: u64_at(0),
            addr: u64_at(8),
            len: u32_at(16),
            rkey: u32_at(20),
            token: u32_at(24),
        };
        (cts.len > 0 && cts.token <= VALUE_MASK).then_some(cts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            endpoint: Endpoint {
                qpn: 0x11,
                psn: 0xabcdef,
                gid: [7; 16],
                lid: 3,
                mtu: 3,
            },
            global: true,
            credits: 32,
            slot_bytes: 32 << 10,
        }
    }

    #[test]
    fn hello_round_trips_and_bad_ones_are_refused() {
        let h = hello();
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let mut b = h.encode();
        b[0] = b'X';
        assert!(Hello::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("does not speak"));
        for (field, value) in [
            (8usize, 0u32),
            (8, 1 << 24),
            (12, 1 << 24),
            (38, 100),
            (38, 2 << 20),
        ] {
            let mut b = h.encode();
            b[field..field + 4].copy_from_slice(&value.to_le_bytes());
            assert!(Hello::decode(&b).is_err(), "field {field} = {value}");
        }
        let mut b = h.encode();
        b[34] = 9;
        assert!(Hello::decode(&b).is_err());
        let mut b = h.encode();
        b[36..38].copy_from_slice(&0u16.to_le_bytes());
        assert!(Hello::decode(&b).is_err());
    }

    #[test]
    fn immediates_and_payloads_round_trip() {
        for msg in [
            Msg::Data,
            Msg::Credit,
            Msg::Rts,
            Msg::Cts,
            Msg::Written,
            Msg::Fin,
        ] {
            assert_eq!(parse_imm(imm(msg, 12345)), Some((msg, 12345)));
            assert_eq!(parse_imm(imm(msg, VALUE_MASK)), Some((msg, VALUE_MASK)));
        }
        assert_eq!(parse_imm(0), None);
        assert_eq!(parse_imm(0xF000_0000), None);
        let c = Cts {
            off: 1 << 33,
            addr: 0x7f00_0000_1000,
            len: 256 << 10,
            rkey: 0xdead,
            token: 77,
        };
        assert_eq!(Cts::decode(&c.encode()), Some(c));
        assert_eq!(Cts::decode(&c.encode()[..20]), None);
        assert_eq!(Cts::decode(&Cts { len: 0, ..c }.encode()), None);
        assert_eq!(Rts::decode(&Rts { len: 9 }.encode()), Some(Rts { len: 9 }));
        assert_eq!(Rts::decode(&[0; 8]), None);
        assert_eq!(Rts::decode(&[1; 9]), None);
    }
}
