//! The link protocol between a VMM and its local ferryd.
//!
//! KVM ioctls work only in the process that created the VM, so the VMM keeps
//! the VM and answers a few requests; ferryd maps the same guest memory (a
//! memfd passed with `SCM_RIGHTS`) and moves the pages itself.
//!
//! ```text
//!  source VMM                ferryd (source)          ferryd (target)         target VMM
//!  Register{Source,spec}+fd ─▶
//!                         ◀─ Registered{vm_id}
//!                         ◀─ StartDirtyLog / SyncDirtyLog ...   (pre-copy rounds)
//!                         ◀─ Throttle{percent}  (optional: auto-converge slows the vCPUs)
//!                         ◀─ Pause  ─▶ Paused (state blob)
//!                                                      spawns ─▶ Register{Target{token}}
//!                                                             ◀─ Registered{vm_id, spec} + memfd
//!                                                             ─▶ Restore (state blob)
//!                                                             ◀─ Restored{verify}
//!                                     (COMMIT)                ─▶ Run ◀─ Running
//!                         ◀─ Quit   (hand-off recorded; the source VM stops for good)
//! ```
//!
//! Wire format of one message (all integers little-endian):
//!
//! ```text
//! +--------+----------+---------+------------------+-----------------+
//! | "FLNK" | json_len | bin_len | JSON (LinkMsg)   | binary payload  |
//! |  u32   |   u32    |   u32   | json_len bytes   | bin_len bytes   |
//! +--------+----------+---------+------------------+-----------------+
//! ```
//!
//! Throttling (`Throttle`) is the VMM's state, not the guest's: it is not in
//! the state blob, so a target VM starts at full speed, and a source VMM
//! drops it to 0 on `Resume` (the migration failed; the VM stays here).
//!
//! File descriptors ride as `SCM_RIGHTS` on the first bytes of a message. The
//! binary payload carries dirty bitmaps (u64 words, little-endian,
//! concatenated per region in spec order) and state blobs.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

/// Magic at the start of every link message: "FLNK".
pub const LINK_MAGIC: u32 = u32::from_le_bytes(*b"FLNK");
/// Cap on the JSON part of a message: specs and reports are a few KiB.
pub const LINK_JSON_BYTES_MAX: u32 = 1 << 20;
/// Cap on the binary part: a dirty bitmap of 1 TiB of guest RAM is
/// 1 TiB / 4 KiB / 8 = 32 MiB; state blobs are far smaller.
pub const LINK_BIN_BYTES_MAX: u32 = 32 << 20;
/// Cap on descriptors passed with one message (the memfd, maybe a uffd later).
pub const LINK_FDS_MAX: usize = 4;
/// Largest `Throttle` percentage: a vCPU throttled at 99% still runs 1% of
/// the time, so the guest always makes progress.
pub const THROTTLE_PCT_MAX: u8 = 99;

/// Errors of the link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Socket I/O failed.
    #[error("link I/O failed during {op}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the link.
    #[error("the link peer closed the connection")]
    Closed,
    /// A message broke the format (bad magic, over a cap, bad JSON).
    #[error("malformed link message: {0}")]
    Malformed(String),
    /// The peer answered with an error.
    #[error("the VMM reported an error: {0}")]
    Remote(String),
    /// The peer answered with a message we did not expect here.
    #[error("unexpected link message: expected {expected}, got {got}")]
    Unexpected {
        /// What we wanted.
        expected: &'static str,
        /// What came.
        got: String,
    },
}

/// One region of guest physical memory, backed by the memfd at `memfd_offset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionSpec {
    /// Guest physical address of the region's first byte (page aligned).
    pub gpa: u64,
    /// Size in bytes (page aligned).
    pub size: u64,
    /// Offset of the region in the memfd (page aligned).
    pub memfd_offset: u64,
}

/// Bytes of a disk block: the unit of disk dirty logging and disk transfer.
pub const DISK_BLOCK_BYTES: u64 = 4096;
/// Largest disk ferry migrates: what one link message's dirty bitmap can
/// cover (32 MiB of bitmap x 8 bits x 4 KiB = 1 TiB).
pub const DISK_BYTES_MAX: u64 = (LINK_BIN_BYTES_MAX as u64) * 8 * DISK_BLOCK_BYTES;

/// The VM's disk: a raw image file the VMM owns, migrated block by block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Size of the image in bytes (a multiple of [`DISK_BLOCK_BYTES`], at
    /// most [`DISK_BYTES_MAX`]).
    pub bytes: u64,
}

impl DiskSpec {
    /// Blocks of the disk.
    pub fn blocks(&self) -> u64 {
        self.bytes / DISK_BLOCK_BYTES
    }

    /// Checks the size.
    pub fn validate(&self) -> Result<(), String> {
        if self.bytes == 0
            || !self.bytes.is_multiple_of(DISK_BLOCK_BYTES)
            || self.bytes > DISK_BYTES_MAX
        {
            return Err(format!(
                "disk of {} bytes: must be a non-zero multiple of {DISK_BLOCK_BYTES} up to {DISK_BYTES_MAX}",
                self.bytes
            ));
        }
        Ok(())
    }
}

/// What a target needs to recreate the VM: memory layout, vCPUs, and the
/// VMM's own opaque configuration (passed back to the target VMM unchanged).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmSpec {
    /// A human name, unique per ferryd ("vm0").
    pub name: String,
    /// Guest RAM regions, in the order dirty bitmaps are concatenated.
    pub regions: Vec<RegionSpec>,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// VMM-private configuration, opaque to ferry.
    pub vmm_config: serde_json::Value,
    /// The VM's disk, when it has one that moves with it. A source VMM sends
    /// the image's descriptor as the second fd of `Register`; a target VMM
    /// gets the new image's as the second fd of `Registered`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskSpec>,
}

impl VmSpec {
    /// Total guest RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
}

/// Which side a registering VMM is on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    /// A running VM that may be migrated away. The memfd comes with the message.
    Source,
    /// A VMM that ferryd spawned to receive an incoming migration; the token
    /// was on its command line. ferryd answers with the spec and the memfd.
    Target {
        /// The token ferryd gave the VMM.
        token: String,
    },
    /// A VMM whose ferryd went away registers its VM again with the new
    /// one (spec and memfd as for `Source`). A paused VM may be in the
    /// middle of a migration the old ferryd recorded: the new one finishes
    /// it (or resumes the VM when none was recorded).
    Reattach {
        /// Whether the VM's vCPUs are paused.
        paused: bool,
        /// Whether the VM is a post-copy target whose memory has not all
        /// arrived (its ferryd died before the end): it cannot be called
        /// migrated.
        #[serde(default)]
        postcopy: bool,
    },
}

/// Result of the target VMM's independent check of restored memory (the
/// test oracle: it never trusts the migration code).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Whether the VMM checked at all (checking is optional in production).
    pub checked: bool,
    /// Hash of all guest memory (hex), comparable with the source's.
    pub mem_hash: String,
    /// Pages whose stamps were checked.
    pub pages_checked: u64,
    /// Pages whose stamp or content was wrong (0 for a correct migration).
    pub pages_bad: u64,
    /// Time the check took, excluded from the reported downtime.
    pub verify_ms: u64,
    /// Hash of the disk image (hex; empty without a disk), comparable with
    /// the source's: see the VMM's oracle for what it covers.
    #[serde(default)]
    pub disk_hash: String,
    /// Disk blocks whose stamps were checked.
    #[serde(default)]
    pub blocks_checked: u64,
    /// Disk blocks whose stamp or content was wrong.
    #[serde(default)]
    pub blocks_bad: u64,
}

/// Live numbers a VMM reports about its guest.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmStats {
    /// The guest's own progress counter.
    pub progress: u64,
    /// Whether vCPUs are running now.
    pub running: bool,
    /// Workload phase as the guest reports it (VMM-specific).
    pub phase: String,
    /// vCPU throttle in effect, percent (0: full speed; absent from VMMs
    /// that predate `Throttle`).
    #[serde(default)]
    pub throttle_pct: u8,
}

/// Every message of the link protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LinkMsg {
    /// VMM -> ferryd, first message. A source VMM sends its memfd with it.
    Register {
        /// Source or target.
        role: Role,
        /// The VM (for a target: ignored, ferryd sends the spec).
        spec: Option<VmSpec>,
    },
    /// ferryd -> VMM: accepted. A target VMM receives the spec and the memfd.
    Registered {
        /// ferryd's id for this VM.
        vm_id: String,
        /// For a target VMM: the VM to recreate.
        spec: Option<VmSpec>,
    },
    /// ferryd -> VMM: start dirty logging (all pages count as dirty once).
    StartDirtyLog,
    /// ferryd -> VMM: stop dirty logging (migration over or failed).
    StopDirtyLog,
    /// ferryd -> VMM: return and clear the dirty log. Reply: `DirtyLog`.
    SyncDirtyLog,
    /// ferryd -> VMM: return the dirty log without clearing it (the pages
    /// stay for the next `SyncDirtyLog`). Reply: `DirtyLog`, or `Error` when
    /// the VMM cannot read it without clearing.
    PeekDirtyLog,
    /// ferryd -> VMM: return and clear the disk's dirty log (one bit per
    /// [`DISK_BLOCK_BYTES`] block, u64 words LE, blocks written since the
    /// last call or since `StartDirtyLog`). Reply: `DirtyLog`, or `Error`
    /// when the VM has no disk. `StartDirtyLog` / `StopDirtyLog` start and
    /// stop disk logging together with memory logging.
    SyncDiskLog,
    /// VMM -> ferryd: the dirty bitmap is the binary payload.
    DirtyLog,
    /// ferryd -> VMM: stop the vCPUs at a consistent point. Reply: `Paused`.
    Pause,
    /// VMM -> ferryd: paused; the state blob is the binary payload.
    Paused {
        /// The guest's progress counter at the pause.
        progress: u64,
    },
    /// ferryd -> VMM: run the vCPUs again (a failed or cancelled migration),
    /// at full speed: any `Throttle` ends here.
    Resume,
    /// ferryd -> VMM: the VM now belongs to another host; stop for good.
    Quit {
        /// Why, for the VMM's log.
        reason: String,
    },
    /// ferryd -> target VMM: load this state (binary payload) into a new VM
    /// over the memfd. Reply: `Restored`.
    Restore,
    /// target VMM -> ferryd: ready to run.
    Restored {
        /// The VMM's own check of the memory it got.
        verify: VerifyReport,
    },
    /// ferryd -> target VMM: load this state (binary payload) for a
    /// post-copy start: register guest memory with a userfaultfd (minor and
    /// missing faults), drop the VMM's own page mappings so that every first
    /// touch faults, and pass the descriptor. Reply: `PostcopyReady` + uffd.
    /// Memory is not checked now: it is not all here yet.
    RestorePostcopy,
    /// target VMM -> ferryd: ready to run post-copy; the userfaultfd is the
    /// descriptor. The VMM keeps its own copy open until `PostcopyDone`, so
    /// that a dead ferryd leaves faulting vCPUs waiting, never reading pages
    /// that did not arrive.
    PostcopyReady {
        /// Where each region of the spec is mapped in the VMM, for the
        /// userfaultfd's ioctls (they act on the VMM's address space).
        host_addrs: Vec<u64>,
    },
    /// ferryd -> target VMM: every page is here; close the userfaultfd and
    /// check the memory. Reply: `Verified`.
    PostcopyDone,
    /// target VMM -> ferryd: the check taken at `PostcopyDone`.
    Verified {
        /// The VMM's own check of its memory (paused for the check).
        verify: VerifyReport,
    },
    /// ferryd -> source VMM, post-copy take-back: the paused VM's vCPU and
    /// device state become this state (binary payload), a checkpoint of the
    /// target whose pages ferryd wrote into guest memory. Reply: `Ok`; the
    /// VM runs again on `Resume`.
    Rollback,
    /// ferryd -> target VMM: COMMIT arrived; start the vCPUs.
    Run,
    /// ferryd -> VMM: report live numbers. Reply: `Stats`.
    GetStats,
    /// ferryd -> source VMM: let each vCPU run only `100 - percent`% of wall
    /// time (auto-converge, like QEMU's cpu-throttle); 0 runs at full speed.
    /// Reply: `Ok`, or `Error` when `percent` exceeds [`THROTTLE_PCT_MAX`].
    /// `Resume` resets it to 0.
    Throttle {
        /// Share of wall time the vCPUs sleep, 0..=[`THROTTLE_PCT_MAX`].
        percent: u8,
    },
    /// VMM -> ferryd: live numbers.
    Stats(VmStats),
    /// Either way: done, nothing to report.
    Ok,
    /// Either way: the request failed.
    Error {
        /// Sentence-style reason.
        message: String,
    },
}

impl LinkMsg {
    /// Short name for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            LinkMsg::Register { .. } => "register",
            LinkMsg::Registered { .. } => "registered",
            LinkMsg::StartDirtyLog => "start_dirty_log",
            LinkMsg::StopDirtyLog => "stop_dirty_log",
            LinkMsg::SyncDirtyLog => "sync_dirty_log",
            LinkMsg::PeekDirtyLog => "peek_dirty_log",
            LinkMsg::SyncDiskLog => "sync_disk_log",
            LinkMsg::DirtyLog => "dirty_log",
            LinkMsg::Pause => "pause",
            LinkMsg::Paused { .. } => "paused",
            LinkMsg::Resume => "resume",
            LinkMsg::Quit { .. } => "quit",
            LinkMsg::Restore => "restore",
            LinkMsg::Rollback => "rollback",
            LinkMsg::Restored { .. } => "restored",
            LinkMsg::RestorePostcopy => "restore_postcopy",
            LinkMsg::PostcopyReady { .. } => "postcopy_ready",
            LinkMsg::PostcopyDone => "postcopy_done",
            LinkMsg::Verified { .. } => "verified",
            LinkMsg::Run => "run",
            LinkMsg::GetStats => "get_stats",
            LinkMsg::Throttle { .. } => "throttle",
            LinkMsg::Stats(_) => "stats",
            LinkMsg::Ok => "ok",
            LinkMsg::Error { .. } => "error",
        }
    }
}

/// A received message with its binary payload and descriptors.
#[derive(Debug)]
pub struct Received {
    /// The message.
    pub msg: LinkMsg,
    /// The binary payload (empty when none).
    pub bin: Vec<u8>,
    /// Descriptors that came with it.
    pub fds: Vec<OwnedFd>,
}

/// One end of a link: a unix stream socket speaking [`LinkMsg`].
#[derive(Debug)]
pub struct Link {
    sock: UnixStream,
}

const HEADER_BYTES: usize = 12;

impl Link {
    /// Wraps a connected unix stream.
    pub fn new(sock: UnixStream) -> Self {
        Link { sock }
    }

    /// Connects to ferryd's link socket at `path`.
    pub fn connect(path: &std::path::Path) -> Result<Self, LinkError> {
        let sock = UnixStream::connect(path).map_err(|source| LinkError::Io {
            op: "connect",
            source,
        })?;
        Ok(Link { sock })
    }

    /// Deadline for receives (`None`: wait forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), LinkError> {
        self.sock
            .set_read_timeout(timeout)
            .map_err(|source| LinkError::Io {
                op: "set timeout",
                source,
            })
    }

    /// A second handle on the same socket.
    pub fn try_clone(&self) -> Result<Link, LinkError> {
        let sock = self.sock.try_clone().map_err(|source| LinkError::Io {
            op: "clone",
            source,
        })?;
        Ok(Link { sock })
    }

    /// Whether the peer hung up (checked without reading or blocking).
    pub fn peer_gone(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one live pollfd, count 1, zero timeout: poll only reports.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        rc > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// The process at the other end (SO_PEERCRED).
    pub fn peer_pid(&self) -> Result<i32, LinkError> {
        nix::sys::socket::getsockopt(&self.sock, nix::sys::socket::sockopt::PeerCredentials)
            .map(|c| c.pid())
            .map_err(|e| LinkError::Io {
                op: "SO_PEERCRED",
                source: e.into(),
            })
    }

    /// Shuts the socket down both ways.
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Sends one message with an optional binary payload and descriptors.
    pub fn send(&mut self, msg: &LinkMsg, bin: &[u8], fds: &[RawFd]) -> Result<(), LinkError> {
        let json = serde_json::to_vec(msg).map_err(|e| LinkError::Malformed(e.to_string()))?;
        let json_len = u32::try_from(json.len())
            .ok()
            .filter(|&n| n <= LINK_JSON_BYTES_MAX);
        let bin_len = u32::try_from(bin.len())
            .ok()
            .filter(|&n| n <= LINK_BIN_BYTES_MAX);
        let (Some(json_len), Some(bin_len)) = (json_len, bin_len) else {
            return Err(LinkError::Malformed(format!(
                "message too large to send ({} JSON bytes, {} binary bytes)",
                json.len(),
                bin.len()
            )));
        };
        assert!(
            fds.len() <= LINK_FDS_MAX,
            "too many fds for one link message"
        );
        let mut header = [0u8; HEADER_BYTES];
        header[0..4].copy_from_slice(&LINK_MAGIC.to_le_bytes());
        header[4..8].copy_from_slice(&json_len.to_le_bytes());
        header[8..12].copy_from_slice(&bin_len.to_le_bytes());
        if fds.is_empty() {
            self.write_all_parts(&[&header, &json, bin])
        } else {
            // The descriptors ride on the header; the rest follows as plain bytes.
            let iov = [IoSlice::new(&header)];
            let cmsg = [ControlMessage::ScmRights(fds)];
            let mut sent = loop {
                match sendmsg::<()>(
                    self.sock.as_raw_fd(),
                    &iov,
                    &cmsg,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                ) {
                    Ok(n) => break n,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        return Err(LinkError::Io {
                            op: "sendmsg",
                            source: e.into(),
                        })
                    }
                }
            };
            while sent < HEADER_BYTES {
                sent += self
                    .sock
                    .write(&header[sent..])
                    .map_err(|source| LinkError::Io { op: "send", source })?;
            }
            self.write_all_parts(&[&json, bin])
        }
    }

    fn write_all_parts(&mut self, parts: &[&[u8]]) -> Result<(), LinkError> {
        for p in parts {
            self.sock
                .write_all(p)
                .map_err(|source| LinkError::Io { op: "send", source })?;
        }
        Ok(())
    }

    /// Receives one message. Errors on EOF, bad magic, caps, or bad JSON.
    pub fn recv(&mut self) -> Result<Received, LinkError> {
        let mut header = [0u8; HEADER_BYTES];
        let mut fds = Vec::new();
        let mut got = {
            let mut cmsg_buf = nix::cmsg_space!([RawFd; LINK_FDS_MAX]);
            let mut iov = [IoSliceMut::new(&mut header)];
            let msg = loop {
                match recvmsg::<()>(
                    self.sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg_buf),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) {
                    Ok(m) => break m,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        return Err(LinkError::Io {
                            op: "recvmsg",
                            source: e.into(),
                        })
                    }
                }
            };
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: the kernel just installed `fd` in our table
                            // for us (SCM_RIGHTS); nothing else owns it.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
            }
            msg.bytes
        };
        if got == 0 {
            return Err(LinkError::Closed);
        }
        while got < HEADER_BYTES {
            let n = self
                .sock
                .read(&mut header[got..])
                .map_err(|source| LinkError::Io { op: "recv", source })?;
            if n == 0 {
                return Err(LinkError::Malformed(
                    "link closed inside a message header".into(),
                ));
            }
            got += n;
        }
        let field =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        if field(0) != LINK_MAGIC {
            return Err(LinkError::Malformed(format!(
                "bad magic {:#010x}",
                field(0)
            )));
        }
        let (json_len, bin_len) = (field(4), field(8));
        if json_len > LINK_JSON_BYTES_MAX || bin_len > LINK_BIN_BYTES_MAX {
            return Err(LinkError::Malformed(format!(
                "message over the caps ({json_len} JSON bytes, {bin_len} binary bytes)"
            )));
        }
        let mut json = vec![0u8; json_len as usize];
        let mut bin = vec![0u8; bin_len as usize];
        self.sock
            .read_exact(&mut json)
            .and_then(|_| self.sock.read_exact(&mut bin))
            .map_err(|source| LinkError::Io { op: "recv", source })?;
        let msg: LinkMsg = serde_json::from_slice(&json)
            .map_err(|e| LinkError::Malformed(format!("bad JSON: {e}")))?;
        Ok(Received { msg, bin, fds })
    }

    /// Sends a request and waits for its reply. A `LinkMsg::Error` reply
    /// becomes [`LinkError::Remote`].
    pub fn call(&mut self, msg: &LinkMsg, bin: &[u8]) -> Result<Received, LinkError> {
        self.send(msg, bin, &[])?;
        let r = self.recv()?;
        if let LinkMsg::Error { message } = r.msg {
            return Err(LinkError::Remote(message));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_fd_and_payload() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Link::new(a), Link::new(b));
        let file = std::fs::File::open("/dev/null").unwrap();
        let spec = VmSpec {
            name: "vm0".into(),
            regions: vec![RegionSpec {
                gpa: 0,
                size: 1 << 20,
                memfd_offset: 0,
            }],
            vcpus: 1,
            vmm_config: serde_json::json!({"workload": "idle"}),
            disk: None,
        };
        let msg = LinkMsg::Register {
            role: Role::Source,
            spec: Some(spec),
        };
        a.send(&msg, b"bits", &[file.as_raw_fd()]).unwrap();
        let r = b.recv().unwrap();
        assert_eq!(r.msg, msg);
        assert_eq!(r.bin, b"bits");
        assert_eq!(r.fds.len(), 1);
    }

    #[test]
    fn throttle_and_stats_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Link::new(a), Link::new(b));
        let stats = LinkMsg::Stats(VmStats {
            progress: 7,
            running: true,
            phase: "dirty".into(),
            throttle_pct: 40,
        });
        for msg in [
            LinkMsg::Throttle { percent: 0 },
            LinkMsg::Throttle {
                percent: THROTTLE_PCT_MAX,
            },
            stats,
        ] {
            a.send(&msg, &[], &[]).unwrap();
            assert_eq!(b.recv().unwrap().msg, msg);
        }
        assert_eq!(LinkMsg::Throttle { percent: 1 }.kind(), "throttle");
        let json = serde_json::to_value(LinkMsg::Throttle { percent: 75 }).unwrap();
        assert_eq!(json, serde_json::json!({"type": "throttle", "percent": 75}));
        // Stats from a VMM that predates throttling still parse.
        let old = r#"{"type":"stats","progress":3,"running":false,"phase":"idle"}"#;
        let LinkMsg::Stats(s) = serde_json::from_str(old).unwrap() else {
            panic!("not stats")
        };
        assert_eq!(s.throttle_pct, 0);
        // A percentage that is not a u8 is malformed, not truncated.
        assert!(serde_json::from_str::<LinkMsg>(r#"{"type":"throttle","percent":300}"#).is_err());
        assert!(serde_json::from_str::<LinkMsg>(r#"{"type":"throttle"}"#).is_err());
    }

    #[test]
    fn rejects_bad_magic_and_caps() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut b = Link::new(b);
        (&a).write_all(b"XXXX\0\0\0\0\0\0\0\0").unwrap();
        assert!(matches!(b.recv(), Err(LinkError::Malformed(_))));
        let mut h = Vec::new();
        h.extend_from_slice(&LINK_MAGIC.to_le_bytes());
        h.extend_from_slice(&(LINK_JSON_BYTES_MAX + 1).to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        (&a).write_all(&h).unwrap();
        assert!(matches!(b.recv(), Err(LinkError::Malformed(_))));
        drop(a);
        assert!(matches!(b.recv(), Err(LinkError::Closed)));
    }
}
