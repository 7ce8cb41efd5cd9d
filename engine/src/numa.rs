//! NUMA-aware placement of the migration pipeline's threads.
//!
//! On a machine with several NUMA nodes a thread that copies memory of
//! another node pays the interconnect on every cache line. So each stage runs
//! on the CPUs of the node that holds what it touches most:
//!
//! ```text
//!  source:  guest memory (node M) ──▶ encoders on M ──▶ senders on N ──▶ NIC (node N)
//!           disk's device (node D) ──▶ disk reader's ring thread on D
//!  target:  NIC (node N) ──▶ receivers on N ──▶ decoders on M ──▶ guest memory (node M)
//!           disk writer's ring thread on D ──▶ disk's device (node D)
//! ```
//!
//! The facts come from sysfs and the kernel: [`Topology::read`] reads
//! `/sys/devices/system/node` (each node's CPU list, memory, distance row);
//! [`probe`] finds the NIC behind a connection's local address
//! (`/sys/class/net/<if>/device/numa_node`), the node of a block device, and
//! where the guest memory's pages live (`move_pages` on a sample of pages).
//! A node without CPUs (memory only) hands its stages to the nearest node with
//! CPUs by distance. A stage whose anchor is unknown follows the other anchor
//! of its side (senders with an unknown NIC go near guest memory, which they
//! `writev` from), or stays unpinned.
//!
//! With one node (or one node with CPUs) pinning would only restrict the
//! scheduler: nothing is pinned unless the user forces a choice with a
//! [`PlacementPolicy`] (`auto`, `off`, `cpus:0-3,8`, `nodes:1`).
//!
//! The chosen [`Placement`] says per stage which CPUs and why; it lands in the
//! migration's [`Snapshot`](crate::Snapshot). Each pipeline thread pins itself
//! at start ([`Pinner::enter`]) and then allocates and writes its pooled
//! buffers ([`touched_buffer`]), so the kernel's first-touch policy puts their
//! pages on its node.
//!
//! Files: `cpus` (the kernel's list format), `topology`, `policy` (the user's
//! choice), `plan` (the rules), `pin` (affinity, first touch), [`probe`]
//! (NIC, block device, guest memory), `tests` (fake sysfs trees).

mod cpus;
mod pin;
mod plan;
mod policy;
pub mod probe;
#[cfg(test)]
mod tests;
mod topology;

use std::path::PathBuf;

pub use cpus::CpuList;
pub use pin::{current_affinity, pin_current_thread, touched_buffer, Pinner};
pub use plan::{Facts, Placement, Side, Stage, StagePlacement};
pub use policy::PlacementPolicy;
pub use probe::Device;
pub use topology::{Node, Topology};

/// Where sysfs is mounted on a real machine.
pub const SYS_ROOT: &str = "/sys";

/// Largest CPU id a list may name: the kernel's `NR_CPUS` ceiling (8192), so
/// a list expands to at most 8192 entries however it is written.
pub const CPU_ID_MAX: usize = 8191;
/// Largest NUMA node id: the kernel's `MAX_NUMNODES` ceiling (`NODES_SHIFT` 10).
pub const NODE_ID_MAX: u32 = 1023;
/// Distance sysfs reports from a node to itself (ACPI SLIT's local value);
/// other nodes default to twice that when a node has no `distance` file.
const LOCAL_DISTANCE: u32 = 10;

/// Errors of topology discovery, placement policies and pinning.
#[derive(Debug, thiserror::Error)]
pub enum NumaError {
    /// A sysfs file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A sysfs file holds something we cannot parse.
    #[error("malformed {path}: {detail}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A CPU (or node) list that is not in the kernel's list format.
    #[error("invalid list {input:?}: {detail} (expected a list like 0-3,8)")]
    List {
        /// The text.
        input: String,
        /// What is wrong.
        detail: String,
    },
    /// A placement policy string that is none of the accepted forms.
    #[error("invalid placement {input:?}: {detail} (expected auto, off, cpus:<list> such as cpus:0-3,8, or nodes:<list> such as nodes:1)")]
    Policy {
        /// The text.
        input: String,
        /// What is wrong.
        detail: String,
    },
    /// A forced CPU this machine does not have.
    #[error("CPU {cpu} does not exist on this machine (its CPUs: {known})")]
    UnknownCpu {
        /// The CPU.
        cpu: usize,
        /// The CPUs it has.
        known: CpuList,
    },
    /// A forced node this machine does not have.
    #[error("NUMA node {node} does not exist on this machine (its nodes: {known})")]
    UnknownNode {
        /// The node.
        node: u32,
        /// The nodes it has.
        known: String,
    },
    /// A forced node that has memory only.
    #[error("NUMA node {node} has no CPUs to run threads on")]
    NodeWithoutCpus {
        /// The node.
        node: u32,
    },
    /// `sched_setaffinity` / `sched_getaffinity` failed.
    #[error("cannot {op} CPUs {cpus}: {source}")]
    Affinity {
        /// "pin the thread to", "read the affinity of".
        op: &'static str,
        /// The CPUs concerned (empty when reading).
        cpus: CpuList,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}
