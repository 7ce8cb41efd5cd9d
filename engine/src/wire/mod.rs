//! The wire protocol between a source and a target ferry.
//!
//! A session is one control stream (index 0) and N data streams (1..=N),
//! each a transport connection. Every connection starts with the handshake
//! of [`handshake`]; after it, everything is a frame:
//!
//! ```text
//!  0      2     3      4        6          8          12               20      24
//!  +------+-----+------+--------+----------+----------+----------------+-------+
//!  | F7E1 | kind| flags| stream | reserved | len (u32)| seq (u64)      | crc32c|
//!  +------+-----+------+--------+----------+----------+----------------+-------+
//!  followed by `len` payload bytes; crc32c covers bytes 0..20 and the payload.
//! ```
//!
//! All integers are little-endian. `seq` counts the frames of one stream from
//! 1, without gaps; a receiver rejects any other value. Every length is
//! checked against a per-kind cap before anything is allocated.
//!
//! A `Pages` frame's payload is a table of [`PageEntry`]s; the page bytes
//! follow the frame, outside the frame CRC, each covered by its entry's own
//! CRC. That lets raw pages go from the source's guest memory (writev) straight
//! into the target's guest memory (recv) with one copy on each side.
//!
//! The exchange:
//!
//! ```text
//!  source                                                     target
//!  ── handshake on control + N data connections ─────────────────────▶
//!  Control(Spec{spec, epoch, streams})                       ─▶  create memory, start VMM
//!                                                            ◀─  Control(SpecAck)
//!  Pages, Pages, ..., RoundEnd(1)     (each data stream)     ─▶  apply
//!                                                            ◀─  Ack{stream, seq, round} (control)
//!  ... dirty rounds 2..k ...
//!  [guest paused] final Pages, RoundEnd(final)               ─▶
//!  State(blob)                                               ─▶
//!  Control(Prepare{last seq and pages per stream, state crc}) ─▶ check totals, restore VMM
//!                                                            ◀─  Control(Prepared{verify})
//!  [hand-off recorded: epoch+1]  Control(Commit{epoch})      ─▶  run the VM
//!                                                            ◀─  Control(Committed)
//!  Either side, any time before COMMIT: Control(Abort{reason}) ─ the VM stays on the source.
//! ```

pub mod crc;
pub mod handshake;
pub mod parse;

use ferry_compress::{Codec, PAGE_SIZE, PAYLOAD_BYTES_MAX};
use ferry_transport::{Conn, Seg, TransportError};
use serde::{Deserialize, Serialize};

use crate::link::{VerifyReport, VmSpec};

/// Protocol version spoken here. A peer with another version is refused.
pub const PROTOCOL_VERSION: u16 = 1;
/// First two bytes of every frame.
pub const FRAME_MAGIC: u16 = 0xF7E1;
/// Bytes of a frame header.
pub const HEADER_BYTES: usize = 24;
/// Cap on data streams per session: far more than any NIC needs
/// (64 x ~3 GB/s per TCP stream), small enough to bound per-session state.
pub const STREAMS_MAX: u16 = 64;
/// Cap on pages per `Pages` frame: 64 x 4 KiB = 256 KiB of guest memory per
/// frame keeps one writev under IOV_MAX (1 + 2 x 64 iovecs) and amortises the
/// 24-byte header to 0.01%.
pub const PAGES_PER_FRAME_MAX: usize = 64;
/// Cap on a control frame's JSON payload: specs and reports are a few KiB.
pub const CONTROL_BYTES_MAX: usize = 1 << 20;
/// Cap on a `Stale` bitmap: one bit per page of 1 TiB of guest memory.
pub const STALE_BYTES_MAX: usize = (1 << 40) / 4096 / 8;

/// How the VM moves (`--mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Pre-copy rounds, then stop-and-copy: the VM runs on the target only
    /// with all of its memory there.
    #[default]
    Precopy,
    /// The VM moves right after its device state; memory follows (demand
    /// faults on a priority stream, the rest pushed in the background).
    Postcopy,
    /// Pre-copy rounds first; switch to post-copy when pre-copy does not
    /// converge (or stop-and-copy when it does).
    Hybrid,
}

impl Mode {
    /// The name used on command lines and in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Hybrid => "hybrid",
        }
    }
    /// Whether the session carries a priority stream (post-copy may happen).
    pub fn may_postcopy(self) -> bool {
        self != Mode::Precopy
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "precopy" => Ok(Mode::Precopy),
            "postcopy" => Ok(Mode::Postcopy),
            "hybrid" => Ok(Mode::Hybrid),
            other => Err(format!(
                "unknown mode {other:?} (precopy, postcopy or hybrid)"
            )),
        }
    }
}

/// Frame kinds. 0 is reserved as invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Handshake: the acceptor's challenge.
    Challenge = 1,
    /// Handshake: the connector's authenticated hello.
    Hello = 2,
    /// Handshake: the acceptor's proof.
    Welcome = 3,
    /// Handshake refused; payload is the reason (UTF-8).
    Refuse = 4,
    /// A JSON [`ControlMsg`] (control stream).
    Control = 10,
    /// The paused VM's state blob (control stream).
    State = 11,
    /// Acknowledgement of applied frames (control stream, target to source).
    Ack = 12,
    /// Post-copy switch: the pages whose copy on the target is not current,
    /// one bit per page, u64 words LE (control stream, before PREPARE).
    Stale = 13,
    /// A table of [`PageEntry`]s followed by the page bytes (data streams).
    Pages = 20,
    /// End of a round on this stream (data streams).
    RoundEnd = 21,
    /// Disk blocks: the same table and payload layout as `Pages`, where an
    /// entry's `page` is a 4 KiB block index of the disk (data streams).
    Blocks = 22,
    /// Post-copy: pages the target's guest is waiting for, u64 LE page
    /// indices (the priority stream, target to source).
    Request = 23,
    /// Post-copy checkpoint (control stream, target to source): n u64 LE
    /// page indices, then those n pages' bytes, all under the frame CRC.
    CheckpointPages = 24,
}

impl FrameKind {
    /// Parses a kind byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Challenge,
            2 => Self::Hello,
            3 => Self::Welcome,
            4 => Self::Refuse,
            10 => Self::Control,
            11 => Self::State,
            12 => Self::Ack,
            13 => Self::Stale,
            20 => Self::Pages,
            21 => Self::RoundEnd,
            22 => Self::Blocks,
            23 => Self::Request,
            24 => Self::CheckpointPages,
            _ => return None,
        })
    }

    /// Largest payload a frame of this kind may carry.
    pub fn payload_cap(self) -> usize {
        match self {
            Self::Challenge | Self::Welcome => 64,
            Self::Hello => 512,
            Self::Refuse => 1024,
            Self::Control => CONTROL_BYTES_MAX,
            Self::State => crate::vm::STATE_BYTES_MAX,
            Self::Ack => ACK_BYTES,
            Self::Pages | Self::Blocks => PAGES_PER_FRAME_MAX * PageEntry::BYTES,
            Self::RoundEnd => 4,
            Self::Stale => STALE_BYTES_MAX,
            Self::Request => PAGES_PER_FRAME_MAX * 8,
            Self::CheckpointPages => PAGES_PER_FRAME_MAX * (8 + PAGE_SIZE),
        }
    }
}

/// Errors of the wire format and the exchange.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The underlying transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The first bytes were not a frame.
    #[error("bad frame magic {0:#06x}")]
    Magic(u16),
    /// An unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Flags or reserved bits we do not know.
    #[error("frame of kind {kind:?} has unknown flags {flags:#04x} or reserved bits set")]
    Reserved {
        /// The kind.
        kind: FrameKind,
        /// The flags.
        flags: u8,
    },
    /// A payload over its kind's cap.
    #[error("frame of kind {kind:?} announces {len} payload bytes, over its cap of {cap}")]
    Oversized {
        /// The kind.
        kind: FrameKind,
        /// The announced length.
        len: u32,
        /// The cap.
        cap: usize,
    },
    /// CRC mismatch on a header or a control payload.
    #[error("CRC mismatch on a frame of kind {0:?}")]
    Crc(FrameKind),
    /// The frame's sequence number is not the next one.
    #[error("stream {stream}: expected seq {expected}, got {got}")]
    Sequence {
        /// The stream.
        stream: u16,
        /// What we expected.
        expected: u64,
        /// What came.
        got: u64,
    },
    /// A frame arrived on a stream it does not belong to.
    #[error("frame of kind {kind:?} is not allowed here ({context})")]
    Unexpected {
        /// The kind.
        kind: FrameKind,
        /// Where we were.
        context: &'static str,
    },
    /// A payload did not parse.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What we were parsing.
        what: &'static str,
        /// Why it failed.
        detail: String,
    },
    /// The peer broke the exchange (a message out of order, a count that
    /// does not add up).
    #[error("{0}")]
    Violation(String),
    /// The peer refused the handshake.
    #[error("the peer refused the connection: {0}")]
    Refused(String),
    /// Our side refused the handshake (the peer was told why).
    #[error("refused the connection: {0}")]
    Refusing(String),
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// The kind.
    pub kind: FrameKind,
    /// Stream index (0 = control).
    pub stream: u16,
    /// Payload bytes that follow.
    pub len: u32,
    /// Sequence number within the stream.
    pub seq: u64,
    /// CRC32C over header bytes 0..20 and the payload.
    pub crc: u32,
}

impl FrameHeader {
    /// Encodes the header; `crc` must already cover the payload (see [`frame_crc`]).
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..2].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        b[2] = self.kind as u8;
        b[3] = 0;
        b[4..6].copy_from_slice(&self.stream.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..20].copy_from_slice(&self.seq.to_le_bytes());
        b[20..24].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header (magic, kind, flags, reserved, length cap).
    /// The CRC is checked by the caller once the payload is read.
    pub fn decode(b: &[u8; HEADER_BYTES]) -> Result<Self, WireError> {
        let magic = u16::from_le_bytes([b[0], b[1]]);
        if magic != FRAME_MAGIC {
            return Err(WireError::Magic(magic));
        }
        let kind = FrameKind::from_u8(b[2]).ok_or(WireError::UnknownKind(b[2]))?;
        if b[3] != 0 || b[6] != 0 || b[7] != 0 {
            return Err(WireError::Reserved { kind, flags: b[3] });
        }
        let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if len as usize > kind.payload_cap() {
            return Err(WireError::Oversized {
                kind,
                len,
                cap: kind.payload_cap(),
            });
        }
        Ok(FrameHeader {
            kind,
            stream: u16::from_le_bytes([b[4], b[5]]),
            len,
            seq: u64::from_le_bytes(b[12..20].try_into().expect("8 bytes")),
            crc: u32::from_le_bytes([b[20], b[21], b[22], b[23]]),
        })
    }
}

/// CRC32C of a header (bytes 0..20 of its encoding, crc field excluded) and payload.
pub fn frame_crc(kind: FrameKind, stream: u16, len: u32, seq: u64, payload: &[u8]) -> u32 {
    let h = FrameHeader {
        kind,
        stream,
        len,
        seq,
        crc: 0,
    }
    .encode();
    crc32c::crc32c_append(crc32c::crc32c(&h[..20]), payload)
}

/// One page in a `Pages` frame's table (16 bytes on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageEntry {
    /// Page index across the VM's regions.
    pub page: u64,
    /// How the bytes are encoded.
    pub codec: Codec,
    /// Bytes that follow for this page (0 for zero pages).
    pub len: u16,
    /// CRC32C of those bytes (0 for zero pages).
    pub crc: u32,
}

impl PageEntry {
    /// Bytes of an encoded entry.
    pub const BYTES: usize = 16;

    /// Appends the encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.page.to_le_bytes());
        out.push(self.codec as u8);
        out.push(0);
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
    }

    /// Decodes and checks one entry: known codec, reserved byte zero, and a
    /// length the codec allows.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let bad = |detail: String| WireError::Malformed {
            what: "page entry",
            detail,
        };
        if b.len() != Self::BYTES {
            return Err(bad(format!("{} bytes", b.len())));
        }
        let codec = Codec::try_from(b[8]).map_err(|_| bad(format!("unknown codec {}", b[8])))?;
        if b[9] != 0 {
            return Err(bad("reserved byte set".into()));
        }
        let e = PageEntry {
            page: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            codec,
            len: u16::from_le_bytes([b[10], b[11]]),
            crc: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        };
        let ok = match codec {
            Codec::Zero => e.len == 0,
            Codec::Raw => e.len as usize == PAGE_SIZE,
            Codec::Lz4 | Codec::XorLz4 => e.len > 0 && (e.len as usize) <= PAYLOAD_BYTES_MAX,
            // An empty delta: the page did not change.
            Codec::Xor => (e.len as usize) <= PAYLOAD_BYTES_MAX,
        };
        if !ok {
            return Err(bad(format!(
                "{} payload bytes for codec {:?}",
                e.len, codec
            )));
        }
        Ok(e)
    }
}

/// Bytes of an `Ack` payload: stream u16, pad u16, round u32, seq u64.
pub const ACK_BYTES: usize = 16;

/// The target's acknowledgement: every frame of `stream` up to `seq` is
/// applied to guest memory, which completes `round` on that stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The data stream.
    pub stream: u16,
    /// The round that ended.
    pub round: u32,
    /// Last applied frame.
    pub seq: u64,
}

impl Ack {
    /// Encodes the payload.
    pub fn encode(&self) -> [u8; ACK_BYTES] {
        let mut b = [0u8; ACK_BYTES];
        b[0..2].copy_from_slice(&self.stream.to_le_bytes());
        b[4..8].copy_from_slice(&self.round.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    /// Decodes a payload.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        if b.len() != ACK_BYTES || b[2] != 0 || b[3] != 0 {
            return Err(WireError::Malformed {
                what: "ack",
                detail: format!("{} bytes", b.len()),
            });
        }
        Ok(Ack {
            stream: u16::from_le_bytes([b[0], b[1]]),
            round: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            seq: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        })
    }
}

/// Per-stream totals the source announces in PREPARE.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamTotals {
    /// Seq of the stream's last frame (its final RoundEnd).
    pub last_seq: u64,
    /// Page and block entries sent on the stream over the whole migration.
    pub pages: u64,
}

/// Messages on the control stream (JSON in a `Control` frame).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMsg {
    /// Source: the VM to receive.
    Spec {
        /// Its layout and VMM config.
        spec: VmSpec,
        /// The epoch it runs with on the source.
        epoch: u64,
        /// How it moves. With post-copy possible, the last data connection
        /// is the priority stream (demand pages), not a pre-copy stream.
        #[serde(default)]
        mode: Mode,
    },
    /// Target: memory and VMM are ready; send pages.
    SpecAck,
    /// Source: everything is sent; check and get ready to run.
    Prepare {
        /// Totals per data stream, index 0 = stream 1.
        streams: Vec<StreamTotals>,
        /// Length of the state blob sent before.
        state_len: u64,
        /// CRC32C of the state blob.
        state_crc: u32,
        /// Guest progress counter at the pause.
        progress: u64,
        /// The switch is to post-copy: a `Stale` frame came before, and
        /// the VM runs on the target before all of its memory is there.
        #[serde(default)]
        postcopy: bool,
        /// Post-copy: how long the source waits for a lost target before it
        /// takes the VM back, ms. The target stops its guest for good after
        /// half of it without a committed checkpoint (0: no checkpoints,
        /// no take-back).
        #[serde(default)]
        grace_ms: u64,
        /// Post-copy: the interval between the target's checkpoints, ms
        /// (0: none).
        #[serde(default)]
        checkpoint_ms: u64,
    },
    /// Target: holds everything; the VMM restored the state.
    Prepared {
        /// The target VMM's own check of the memory.
        verify: VerifyReport,
        /// Post-copy: the target will send checkpoints and holds its guest
        /// under a lease (the source may take a lost target's VM back).
        #[serde(default)]
        checkpoints: bool,
    },
    /// Source: the hand-off is recorded; run the VM with this epoch.
    Commit {
        /// The new epoch.
        epoch: u64,
    },
    /// Target: the VM runs here now.
    Committed,
    /// Source, post-copy: every stale page was pushed (data streams up to
    /// `round`); whatever the target still misses it must request.
    PushDone {
        /// The post-copy round's number (its `RoundEnd`s).
        round: u32,
    },
    /// Source, first frame of a new session after a post-copy connection
    /// broke: it continues migration `session` (the target answers
    /// `Resumed` and a `Stale` frame of the pages it still lacks, or ABORT).
    Resume {
        /// The id (hex) of the session being resumed.
        session: String,
    },
    /// Target: the post-copy continues on this session.
    Resumed,
    /// Target, answer to `Resume` of a migration that has ended here: how
    /// it ended. A source that lost track of the migration (its ferryd
    /// restarted) learns from it who owns the VM.
    Concluded {
        /// How the migration ended on the target.
        outcome: Conclusion,
    },
    /// Target, answer to `Resume` of a migration still running here that
    /// has not seen its connection break yet (it will, within its I/O
    /// timeout): try again.
    Busy {
        /// Why.
        reason: String,
    },
    /// Target, post-copy: every page is here; the source may let go.
    PostcopyDone {
        /// The target VMM's check of the memory, taken now.
        verify: VerifyReport,
    },
    /// Source, post-copy: answer to `PostcopyDone`. The source let go of
    /// the VM for good (it will never take it back); the target's guest
    /// needs no checkpoints and no lease any more.
    Released,
    /// Target, post-copy: checkpoint `id` is complete. Before it came its
    /// `CheckpointPages` frames (`pages` pages in all: the pages the guest
    /// wrote since the last acknowledged checkpoint) and a `State` frame
    /// with the vCPU and device state of the same instant.
    Checkpoint {
        /// Increasing, never reused.
        id: u64,
        /// Pages in its `CheckpointPages` frames.
        pages: u64,
        /// Length of its state blob.
        state_len: u64,
        /// CRC32C of its state blob.
        state_crc: u32,
        /// The guest's progress counter at the checkpoint.
        progress: u64,
    },
    /// Source, post-copy: checkpoint `id` is applied to the source's copy of
    /// guest memory; a take-back would resume from it.
    CheckpointAck {
        /// The checkpoint.
        id: u64,
    },
    /// Target, post-copy: its guest is stopped for good (its VMM is gone or
    /// was killed); the source takes the VM back from the last checkpoint.
    Fenced {
        /// Why.
        reason: String,
    },
    /// Either side: the migration stops; the VM stays on the source.
    Abort {
        /// Why.
        reason: String,
    },
}

/// How a migration ended on the target (see `ControlMsg::Concluded`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Conclusion {
    /// It ended before COMMIT took effect: the VM never ran on the target,
    /// it is the source's.
    Aborted,
    /// The VM runs on the target with `epoch` and needs nothing more from
    /// the source.
    Completed {
        /// The epoch it runs with.
        epoch: u64,
    },
    /// Post-copy: the target's guest was stopped for good (its lease ran
    /// out or its VMM died); the source takes the VM back from the last
    /// checkpoint it applied.
    Fenced,
}

/// Writes one frame with a small owned payload.
pub fn send_frame(
    conn: &mut dyn Conn,
    kind: FrameKind,
    stream: u16,
    seq: u64,
    payload: &[u8],
) -> Result<(), WireError> {
    let len = u32::try_from(payload.len()).expect("payload under the kind cap");
    assert!(
        payload.len() <= kind.payload_cap(),
        "our own frame over its cap"
    );
    let crc = frame_crc(kind, stream, len, seq, payload);
    let header = FrameHeader {
        kind,
        stream,
        len,
        seq,
        crc,
    }
    .encode();
    conn.send(&[Seg::Bytes(&header), Seg::Bytes(payload)])?;
    Ok(())
}

/// Reads one whole frame (header and payload, CRC checked). Not for `Pages`
/// frames, whose page bytes follow outside the payload.
pub fn recv_frame(conn: &mut dyn Conn) -> Result<(FrameHeader, Vec<u8>), WireError> {
    let mut hb = [0u8; HEADER_BYTES];
    conn.recv_exact(&mut hb)?;
    let h = FrameHeader::decode(&hb)?;
    let mut payload = vec![0u8; h.len as usize];
    conn.recv_exact(&mut payload)?;
    if frame_crc(h.kind, h.stream, h.len, h.seq, &payload) != h.crc {
        return Err(WireError::Crc(h.kind));
    }
    Ok((h, payload))
}

/// Reads the next whole frame of a stream that carries only `kind` frames
/// with id `stream`, numbered on from `*seq` (updated), CRC checked;
/// returns its payload.
pub fn recv_next(
    conn: &mut dyn Conn,
    kind: FrameKind,
    stream: u16,
    seq: &mut u64,
    context: &'static str,
) -> Result<Vec<u8>, WireError> {
    let (h, payload) = recv_frame(conn)?;
    if h.kind != kind || h.stream != stream {
        return Err(WireError::Unexpected {
            kind: h.kind,
            context,
        });
    }
    if h.seq != *seq + 1 {
        return Err(WireError::Sequence {
            stream,
            expected: *seq + 1,
            got: h.seq,
        });
    }
    *seq = h.seq;
    Ok(payload)
}

/// Encodes a control message.
pub fn encode_control(msg: &ControlMsg) -> Vec<u8> {
    let v = serde_json::to_vec(msg).expect("control messages always serialise");
    assert!(
        v.len() <= CONTROL_BYTES_MAX,
        "our own control message over its cap"
    );
    v
}

/// Decodes a control message.
pub fn decode_control(payload: &[u8]) -> Result<ControlMsg, WireError> {
    serde_json::from_slice(payload).map_err(|e| WireError::Malformed {
        what: "control message",
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests;
