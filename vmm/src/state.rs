//! The state blob a paused VM hands to ferry and a target VM restores.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "FVMS"
//!      4     4  format version (STATE_VERSION), u32 LE
//!      8     4  total length of the blob in bytes, u32 LE
//!     12     4  vCPU count, u32 LE (1..=VCPUS_MAX)
//!     16     4  device section length d, u32 LE (<= DEVICE_BYTES_MAX)
//!     20     d  device state, JSON (DeviceState)
//!   20+d   872  per vCPU: kvm_regs (144) | kvm_sregs (312) | kvm_fpu (416), raw
//!  len-8     8  xxh3-64 of every byte before it, u64 LE
//! ```
//!
//! The kvm_* structs are stored as their raw x86-64 `repr(C)` bytes: both
//! ends are the same VMM on the same architecture, and the format version
//! changes if that ever stops being true. Every length is checked before use;
//! a bad blob is an error, never a panic.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use serde::{Deserialize, Serialize};

/// "FVMS".
pub const STATE_MAGIC: [u8; 4] = *b"FVMS";
/// Format version of the blob.
pub const STATE_VERSION: u32 = 1;
/// Cap on vCPUs in one blob.
pub const VCPUS_MAX: u32 = 256;
/// Cap on the device section: a few hundred bytes of JSON today.
pub const DEVICE_BYTES_MAX: u32 = 64 << 10;
const FIXED_BYTES: usize = 20;
const TRAILER_BYTES: usize = 8;
const REGS_BYTES: usize = std::mem::size_of::<kvm_regs>();
const SREGS_BYTES: usize = std::mem::size_of::<kvm_sregs>();
const FPU_BYTES: usize = std::mem::size_of::<kvm_fpu>();
/// Bytes of one vCPU record.
pub const VCPU_BYTES: usize = REGS_BYTES + SREGS_BYTES + FPU_BYTES;
const _: () = assert!(REGS_BYTES == 144 && SREGS_BYTES == 312 && FPU_BYTES == 416);

/// Errors decoding a blob.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The blob is not one of ours, or of another format version.
    #[error("state blob rejected: {0}")]
    Format(String),
    /// The blob's length disagrees with its contents.
    #[error("state blob of {got} bytes is malformed: {what}")]
    Length {
        /// Bytes received.
        got: usize,
        /// What is inconsistent.
        what: String,
    },
    /// The device section is not valid JSON for [`DeviceState`].
    #[error("state blob device section is invalid: {0}")]
    Device(#[source] serde_json::Error),
}

/// VMM device state: what the VMM itself (not the vCPU) needs to continue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// The workload (its command-line form); sets the pacing.
    pub workload: String,
    /// Dirty pages per guest batch (mirrors the control block).
    pub batch_pages: u64,
    /// Guest RAM the state belongs to.
    pub mem_bytes: u64,
}

/// The architectural state of one vCPU.
#[derive(Clone, Copy, Default)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER.
    pub sregs: kvm_sregs,
    /// x87 / SSE state.
    pub fpu: kvm_fpu,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .field("cr3", &format_args!("{:#x}", self.sregs.cr3))
            .finish()
    }
}

/// A whole VM's state.
#[derive(Clone, Debug)]
pub struct VmStateBlob {
    /// Device state.
    pub device: DeviceState,
    /// One entry per vCPU, by id.
    pub vcpus: Vec<VcpuState>,
}

/// Marker for the kvm_* structs stored raw.
///
/// # Safety
/// Implementors are `repr(C)`, contain only integers and integer arrays, and
/// have no implicit padding, so every byte is initialised and every bit
/// pattern is a valid value.
unsafe trait Pod: Copy + Default {}
// SAFETY: kvm_regs is 18 u64 fields, repr(C), no padding (size 144 asserted).
unsafe impl Pod for kvm_regs {}
// SAFETY: kvm_sregs is repr(C) of kvm_segment / kvm_dtable (integers with
// explicit padding fields) and u64s; size 312 asserted, no implicit padding.
unsafe impl Pod for kvm_sregs {}
// SAFETY: kvm_fpu is repr(C) of u8/u16/u32/u64 and byte arrays with explicit
// pad fields; size 416 asserted, no implicit padding.
unsafe impl Pod for kvm_fpu {}

fn pod_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` has no padding, so all size_of::<T>() bytes behind the
    // reference are initialised; the slice borrows `v`.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

fn pod_read<T: Pod>(bytes: &[u8]) -> T {
    assert_eq!(bytes.len(), std::mem::size_of::<T>());
    // SAFETY: the length matches (asserted), any bit pattern is a valid `T`
    // (`Pod`), and read_unaligned has no alignment requirement.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

impl VmStateBlob {
    /// Encodes the blob.
    pub fn encode(&self) -> Vec<u8> {
        let device = serde_json::to_vec(&self.device).expect("DeviceState serialises");
        assert!(
            device.len() <= DEVICE_BYTES_MAX as usize,
            "device state over its cap"
        );
        assert!(!self.vcpus.is_empty() && self.vcpus.len() <= VCPUS_MAX as usize);
        let total = FIXED_BYTES + device.len() + self.vcpus.len() * VCPU_BYTES + TRAILER_BYTES;
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&(total as u32).to_le_bytes());
        out.extend_from_slice(&(self.vcpus.len() as u32).to_le_bytes());
        out.extend_from_slice(&(device.len() as u32).to_le_bytes());
        out.extend_from_slice(&device);
        for v in &self.vcpus {
            out.extend_from_slice(pod_bytes(&v.regs));
            out.extend_from_slice(pod_bytes(&v.sregs));
            out.extend_from_slice(pod_bytes(&v.fpu));
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        assert_eq!(out.len(), total);
        out
    }

    /// Decodes and checks a blob from a peer.
    pub fn decode(blob: &[u8]) -> Result<Self, StateError> {
        let len_err = |what: String| StateError::Length {
            got: blob.len(),
            what,
        };
        if blob.len() < FIXED_BYTES + TRAILER_BYTES {
            return Err(len_err("shorter than the fixed header".into()));
        }
        if blob[0..4] != STATE_MAGIC {
            return Err(StateError::Format(format!(
                "bad magic {:02x?}, expected \"FVMS\"",
                &blob[0..4]
            )));
        }
        let version = u32_at(blob, 4);
        if version != STATE_VERSION {
            return Err(StateError::Format(format!(
                "format version {version}, this VMM reads version {STATE_VERSION}"
            )));
        }
        let total = u32_at(blob, 8) as usize;
        if total != blob.len() {
            return Err(len_err(format!("header says {total} bytes")));
        }
        let vcpus = u32_at(blob, 12);
        let device_len = u32_at(blob, 16);
        if vcpus == 0 || vcpus > VCPUS_MAX || device_len > DEVICE_BYTES_MAX {
            return Err(len_err(format!("{vcpus} vCPUs, {device_len} device bytes")));
        }
        let want = FIXED_BYTES + device_len as usize + vcpus as usize * VCPU_BYTES + TRAILER_BYTES;
        if want != blob.len() {
            return Err(len_err(format!("contents need {want} bytes")));
        }
        let (body, trailer) = blob.split_at(blob.len() - TRAILER_BYTES);
        let sum = u64::from_le_bytes(trailer.try_into().expect("8 bytes"));
        if xxhash_rust::xxh3::xxh3_64(body) != sum {
            return Err(StateError::Format("checksum mismatch".into()));
        }
        let dev_end = FIXED_BYTES + device_len as usize;
        let device: DeviceState =
            serde_json::from_slice(&blob[FIXED_BYTES..dev_end]).map_err(StateError::Device)?;
        let vcpus = body[dev_end..]
            .chunks_exact(VCPU_BYTES)
            .map(|rec| VcpuState {
                regs: pod_read(&rec[..REGS_BYTES]),
                sregs: pod_read(&rec[REGS_BYTES..REGS_BYTES + SREGS_BYTES]),
                fpu: pod_read(&rec[REGS_BYTES + SREGS_BYTES..]),
            })
            .collect();
        Ok(VmStateBlob { device, vcpus })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmStateBlob {
        let mut v = VcpuState::default();
        v.regs.rip = 0x10042;
        v.regs.r15 = u64::MAX;
        v.sregs.cr3 = 0x2000;
        v.sregs.cs.l = 1;
        v.fpu.mxcsr = 0x1f80;
        VmStateBlob {
            device: DeviceState {
                workload: "dirty:8".into(),
                batch_pages: 16,
                mem_bytes: 64 << 20,
            },
            vcpus: vec![v],
        }
    }

    #[test]
    fn round_trip() {
        let blob = sample().encode();
        let back = VmStateBlob::decode(&blob).unwrap();
        assert_eq!(back.device, sample().device);
        assert_eq!(back.vcpus[0].regs.rip, 0x10042);
        assert_eq!(back.vcpus[0].regs.r15, u64::MAX);
        assert_eq!(back.vcpus[0].sregs.cs.l, 1);
        assert_eq!(back.vcpus[0].fpu.mxcsr, 0x1f80);
        assert_eq!(back.encode(), blob);
    }

    #[test]
    fn rejects_wrong_version_length_and_damage() {
        let blob = sample().encode();
        let mut v2 = blob.clone();
        v2[4] = 2;
        assert!(matches!(
            VmStateBlob::decode(&v2),
            Err(StateError::Format(_))
        ));
        assert!(matches!(
            VmStateBlob::decode(&blob[..blob.len() - 1]),
            Err(StateError::Length { .. })
        ));
        let mut longer = blob.clone();
        longer.push(0);
        assert!(VmStateBlob::decode(&longer).is_err());
        let mut flipped = blob.clone();
        flipped[100] ^= 1;
        assert!(matches!(
            VmStateBlob::decode(&flipped),
            Err(StateError::Format(_))
        ));
        for n in 0..blob.len() {
            assert!(VmStateBlob::decode(&blob[..n]).is_err());
        }
        assert!(VmStateBlob::decode(b"XXXX").is_err());
        let mut huge = blob.clone();
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(VmStateBlob::decode(&huge).is_err());
    }
}
