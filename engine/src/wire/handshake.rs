//! The handshake that opens every connection of a session: an HMAC-SHA256
//! challenge-response over the pair's pre-shared key, in both directions.
//!
//! ```text
//!  connector (source)                              acceptor (target)
//!                      ◀── Challenge{version, nonce_a}
//!  Hello{version, session, stream, streams, vm,
//!        nonce_c, mac_c} ──▶        mac_c = HMAC(key, "ferry-hello-v1" nonce_a nonce_c session stream streams vm)
//!                      ◀── Welcome{mac_a}   mac_a = HMAC(key, "ferry-welcome-v1" nonce_c nonce_a session stream)
//!                      ◀── or Refuse{reason} (bad MAC, version, or a session claim we refuse)
//! ```
//!
//! Fresh nonces on both sides make a recorded exchange useless to replay.
//! A peer without the key is refused before any page is read or written.

use ferry_transport::Conn;

use super::{recv_frame, send_frame, FrameKind, WireError, PROTOCOL_VERSION, STREAMS_MAX};
use crate::key::{random_bytes, Key};

/// Bytes of a nonce.
const NONCE_BYTES: usize = 32;
/// Cap on a VM name in the hello (bytes of UTF-8).
pub const VM_NAME_BYTES_MAX: usize = 255;

/// What a connector says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Session id, chosen at random by the source.
    pub session: [u8; 16],
    /// This connection's index: 0 = control, 1..=streams = data.
    pub stream: u16,
    /// Data streams in the session.
    pub streams: u16,
    /// Name of the VM being migrated.
    pub vm: String,
}

impl Hello {
    /// The session id as hex.
    pub fn session_hex(&self) -> String {
        self.session.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Runs `f` over the bytes the connector's MAC covers, in order.
    fn hello_parts<R>(&self, nonce_a: &[u8], nonce_c: &[u8], f: impl FnOnce(&[&[u8]]) -> R) -> R {
        f(&[
            b"ferry-hello-v1",
            nonce_a,
            nonce_c,
            &self.session,
            &self.stream.to_le_bytes(),
            &self.streams.to_le_bytes(),
            self.vm.as_bytes(),
        ])
    }

    /// Runs `f` over the bytes the acceptor's MAC covers, in order.
    fn welcome_parts<R>(&self, nonce_a: &[u8], nonce_c: &[u8], f: impl FnOnce(&[&[u8]]) -> R) -> R {
        f(&[
            b"ferry-welcome-v1",
            nonce_c,
            nonce_a,
            &self.session,
            &self.stream.to_le_bytes(),
        ])
    }
}

fn expect_kind(got: FrameKind, want: FrameKind, payload: &[u8]) -> Result<(), WireError> {
    if got == FrameKind::Refuse {
        return Err(WireError::Refused(
            String::from_utf8_lossy(payload).into_owned(),
        ));
    }
    if got != want {
        return Err(WireError::Unexpected {
            kind: got,
            context: "handshake",
        });
    }
    Ok(())
}

/// Connector side. Returns once the acceptor proved it holds the key too.
pub fn connect(conn: &mut dyn Conn, key: &Key, hello: &Hello) -> Result<(), WireError> {
    assert!(hello.vm.len() <= VM_NAME_BYTES_MAX, "VM name over the cap");
    let (h, p) = recv_frame(conn)?;
    expect_kind(h.kind, FrameKind::Challenge, &p)?;
    if p.len() != 4 + NONCE_BYTES {
        return Err(WireError::Malformed {
            what: "challenge",
            detail: format!("{} bytes", p.len()),
        });
    }
    let version = u16::from_le_bytes([p[0], p[1]]);
    if version != PROTOCOL_VERSION {
        return Err(WireError::Refusing(format!(
            "the peer speaks protocol version {version}, we speak {PROTOCOL_VERSION}"
        )));
    }
    let nonce_a = &p[4..];
    let nonce_c: [u8; NONCE_BYTES] = random_bytes();
    let mut out = Vec::with_capacity(8 + 16 + 2 * NONCE_BYTES + 32 + hello.vm.len());
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.extend_from_slice(&hello.stream.to_le_bytes());
    out.extend_from_slice(&hello.streams.to_le_bytes());
    out.extend_from_slice(&(hello.vm.len() as u16).to_le_bytes());
    out.extend_from_slice(&hello.session);
    out.extend_from_slice(&nonce_c);
    out.extend_from_slice(&hello.hello_parts(nonce_a, &nonce_c, |parts| key.mac(parts)));
    out.extend_from_slice(hello.vm.as_bytes());
    send_frame(conn, FrameKind::Hello, hello.stream, 0, &out)?;
    let (h, p) = recv_frame(conn)?;
    expect_kind(h.kind, FrameKind::Welcome, &p)?;
    if !hello.welcome_parts(nonce_a, &nonce_c, |parts| key.verify(parts, &p)) {
        return Err(WireError::Refusing(
            "the peer could not prove it holds the key".into(),
        ));
    }
    Ok(())
}

/// Acceptor side: challenges, checks the hello, asks `admit` whether this
/// connection may join (e.g. not a second claim on a running session), then
/// welcomes or refuses. Every refusal tells the peer why and returns the error.
pub fn accept(
    conn: &mut dyn Conn,
    key: &Key,
    admit: impl FnOnce(&Hello) -> Result<(), String>,
) -> Result<Hello, WireError> {
    let nonce_a: [u8; NONCE_BYTES] = random_bytes();
    let mut ch = Vec::with_capacity(4 + NONCE_BYTES);
    ch.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    ch.extend_from_slice(&[0, 0]);
    ch.extend_from_slice(&nonce_a);
    send_frame(conn, FrameKind::Challenge, 0, 0, &ch)?;
    let (h, p) = recv_frame(conn)?;
    expect_kind(h.kind, FrameKind::Hello, &p)?;
    let result = parse_hello(&p, key, &nonce_a).and_then(|(hello, nonce_c)| {
        admit(&hello)?;
        Ok((hello, nonce_c))
    });
    match result {
        Ok((hello, nonce_c)) => {
            send_frame(
                conn,
                FrameKind::Welcome,
                hello.stream,
                0,
                &hello.welcome_parts(&nonce_a, &nonce_c, |parts| key.mac(parts)),
            )?;
            Ok(hello)
        }
        Err(reason) => {
            let _ = send_frame(conn, FrameKind::Refuse, 0, 0, reason.as_bytes());
            Err(WireError::Refusing(reason))
        }
    }
}

fn parse_hello(p: &[u8], key: &Key, nonce_a: &[u8]) -> Result<(Hello, Vec<u8>), String> {
    const FIXED: usize = 8 + 16 + NONCE_BYTES + 32;
    if p.len() < FIXED {
        return Err(format!("malformed hello ({} bytes)", p.len()));
    }
    let u16_at = |i: usize| u16::from_le_bytes([p[i], p[i + 1]]);
    let (version, stream, streams, vm_len) = (u16_at(0), u16_at(2), u16_at(4), u16_at(6) as usize);
    if version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})"
        ));
    }
    if p.len() != FIXED + vm_len || vm_len > VM_NAME_BYTES_MAX {
        return Err(format!(
            "malformed hello ({} bytes for a {vm_len}-byte name)",
            p.len()
        ));
    }
    let session: [u8; 16] = p[8..24].try_into().expect("16 bytes");
    let nonce_c = &p[24..24 + NONCE_BYTES];
    let mac = &p[24 + NONCE_BYTES..FIXED];
    let vm = std::str::from_utf8(&p[FIXED..]).map_err(|_| "VM name is not UTF-8".to_string())?;
    let hello = Hello {
        session,
        stream,
        streams,
        vm: vm.to_string(),
    };
    // Check the MAC before believing any field.
    if !hello.hello_parts(nonce_a, nonce_c, |parts| key.verify(parts, mac)) {
        return Err("authentication failed: the peer does not hold this ferryd's key".into());
    }
    if streams == 0 || streams > STREAMS_MAX || stream > streams {
        return Err(format!(
            "stream {stream} of {streams} is out of range (1..={STREAMS_MAX} streams)"
        ));
    }
    Ok((hello, nonce_c.to_vec()))
}
