//! ferry-vmm: a minimal KVM VMM whose guest runs ferry's own workload code.
//!
//! It is the reference integration of the link protocol and the test oracle
//! of migrations: the guest stamps every page it writes so that any page can
//! be checked ([`oracle`]) without trusting the migration code.
//!
//! - [`abi`]: addresses, control block offsets and stamp constants shared with
//!   the guest assembly (guest/workload.S).
//! - [`layout`]: the guest physical memory map and the boot page tables.
//! - [`config`]: workloads and the `vmm_config` a target VMM receives.
//! - [`mem`]: guest RAM, one memfd mapped shared.
//! - [`disk`]: the disk image, its doorbell, dirty log, pacing and oracle.
//! - [`bitmap`]: the lock-free dirty bitmap of the disk and of VMM writes.
//! - [`kvm`]: the VM, its memory slot, dirty logging and boot vCPU state.
//! - [`vcpu`]: the vCPU thread, pacing, and pausing at consistent points.
//! - [`state`]: the versioned state blob ("FVMS").
//! - [`oracle`]: the stamp generator in Rust, memory checks and hashes.
//! - [`machine`]: one VM with its lifecycle (boot / restore / run / pause).
//! - [`link_server`]: serving ferryd's requests over the link.

/// The VMM/guest contract; see guest/workload.S for the other side.
///
/// build.rs turns each constant into a `.set` for the assembler, so this file
/// holds only plain `pub const` items.
pub mod abi;
pub mod bitmap;
pub mod config;
pub mod disk;
pub mod guest;
pub mod kvm;
pub mod layout;
pub mod link_server;
pub mod machine;
pub mod mem;
pub mod oracle;
pub mod report;
pub mod state;
pub mod vcpu;
