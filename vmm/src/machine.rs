//! One VM: RAM, KVM VM, one vCPU thread, and its lifecycle.
//!
//! ```text
//!   boot ──────────────────────────────┐
//!   attach ─▶ Created ─restore─▶ Ready ─run─▶ Running ◀─resume/run─▶ Paused
//!                                  └──────────pause──────────────────▲
//! ```
//!
//! `boot` writes the boot image into fresh RAM and is Ready at once; `attach`
//! (a migration target) creates the VM over received RAM without touching it
//! and waits for a state blob. Invalid transitions are errors.
//!
//! A VM may have a disk ([`crate::disk`]): a source's is the image it was
//! given; a target's is the new image ferryd fills, which the VM reads only
//! from `restore` on (its size is checked there).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::link::{VmStats, THROTTLE_PCT_MAX};
use kvm_bindings::kvm_fpu;

use crate::config::{ConfigError, GuestWorkload, VmmConfig, Workload};
use crate::disk::check::{self as disk_check, DiskCheckReport};
use crate::disk::doorbell::DiskPort;
use crate::disk::{Disk, DiskError};
use crate::guest::{self, GuestCounters};
use crate::kvm::{self, KvmError, Vm};
use crate::layout::Layout;
use crate::mem::{GuestRam, MemError};
use crate::oracle::{self, CheckReport};
use crate::state::{DeviceState, StateError, VcpuState, VmStateBlob};
use crate::vcpu::{Pacing, VcpuError, VcpuHandle};

/// Errors of a VM.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Guest RAM.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// KVM.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A state blob.
    #[error(transparent)]
    State(#[from] StateError),
    /// The disk.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A disk request to a VM without one.
    #[error("this VM has no disk")]
    NoDisk,
    /// The state blob belongs to another VM.
    #[error("state blob does not fit this VM: {0}")]
    Mismatch(String),
    /// The request is not valid in the current lifecycle state.
    #[error("cannot {op} a VM that is {state:?}")]
    Lifecycle {
        /// The request.
        op: &'static str,
        /// Where the VM is.
        state: Lifecycle,
    },
    /// Starting the vCPU thread failed.
    #[error("cannot start the vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A throttle percentage over the cap.
    #[error("cannot throttle the vCPU by {percent}%: the range is 0..={THROTTLE_PCT_MAX}")]
    Throttle {
        /// The requested percentage.
        percent: u8,
    },
}

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// Created over received RAM; no vCPU state yet.
    Created,
    /// vCPU state loaded; never run here.
    Ready,
    /// Running.
    Running,
    /// Paused at a consistent point.
    Paused,
}

/// A pause: the state blob, the progress counter, and how long it took.
#[derive(Clone, Debug)]
pub struct PausedVm {
    /// The encoded state blob.
    pub blob: Vec<u8>,
    /// The guest's progress counter at the pause.
    pub progress: u64,
    /// From the request to the parked vCPU.
    pub latency: Duration,
}

/// One VM.
#[derive(Debug)]
pub struct Machine {
    config: VmmConfig,
    layout: Layout,
    workload: GuestWorkload,
    vm: Arc<Vm>,
    disk: Option<Arc<Disk>>,
    vcpu: VcpuHandle,
    lifecycle: Lifecycle,
    paused: Option<PausedVm>,
}

impl Machine {
    /// A new VM over fresh RAM, booted (Ready) and not yet running, with
    /// `disk` when its config has one.
    pub fn boot(config: VmmConfig, disk: Option<Disk>) -> Result<Self, MachineError> {
        let ram = Arc::new(GuestRam::create(config.mem_bytes)?);
        let mut m = Self::new(config, ram, disk, true)?;
        guest::write_boot_image(
            m.ram(),
            &m.layout,
            m.workload,
            m.config.batch_pages,
            m.config.disk.as_ref(),
        )?;
        if m.workload.memory != Workload::Idle {
            // Giving the memfd its pages before the guest runs makes its first
            // touch of each page ~5x cheaper on nested hosts (no host
            // allocation inside the guest's fault): a 2 GiB fill takes ~2 s
            // here plus ~4 s in the guest instead of ~37 s. (A background
            // populate racing the guest measured slower.) Idle RAM stays
            // unallocated.
            let t0 = Instant::now();
            m.ram().populate();
            tracing::debug!(
                "populated {} MiB in {:?}",
                m.config.mem_bytes >> 20,
                t0.elapsed()
            );
        }
        m.lifecycle = Lifecycle::Ready;
        Ok(m)
    }

    /// A VM over existing RAM (a migration target, or a second VM over the
    /// same memfd), with `disk` when its config has one. Neither guest memory
    /// nor the disk is touched.
    pub fn attach(
        config: VmmConfig,
        ram: Arc<GuestRam>,
        disk: Option<Disk>,
    ) -> Result<Self, MachineError> {
        Self::new(config, ram, disk, false)
    }

    fn new(
        config: VmmConfig,
        ram: Arc<GuestRam>,
        disk: Option<Disk>,
        boot: bool,
    ) -> Result<Self, MachineError> {
        let layout = config.layout()?;
        let workload = config.workload()?;
        if ram.bytes() != config.mem_bytes {
            return Err(MachineError::Mismatch(format!(
                "RAM of {} bytes, config says {}",
                ram.bytes(),
                config.mem_bytes
            )));
        }
        match (&config.disk, &disk) {
            (None, None) => {}
            (Some(c), Some(d)) if c.bytes == d.bytes() => {}
            (c, d) => {
                return Err(MachineError::Mismatch(format!(
                    "the config's disk is {:?} bytes, the image given is {:?}",
                    c.as_ref().map(|c| c.bytes),
                    d.as_ref().map(|d| d.bytes())
                )))
            }
        }
        let disk = disk.map(Arc::new);
        let port = disk.clone().map(|d| DiskPort::new(ram.clone(), d));
        let vm = Arc::new(Vm::new(ram)?);
        let vcpu_fd = vm.create_vcpu(0)?;
        let boot_state = if boot {
            // The fresh vCPU's own sregs carry KVM's defaults for what we keep.
            let base = vcpu_fd.get_sregs().map_err(|source| VcpuError::Kvm {
                op: "get sregs",
                source,
            })?;
            let fpu = kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            };
            Some(VcpuState {
                regs: kvm::boot_regs(),
                sregs: kvm::boot_sregs(base),
                fpu,
            })
        } else {
            None
        };
        let pacing = pacing_of(config.batch_pages, &workload);
        let vcpu = VcpuHandle::spawn(vcpu_fd, pacing, port).map_err(MachineError::Thread)?;
        if let Some(state) = boot_state {
            vcpu.restore(state, pacing)?;
        }
        Ok(Machine {
            config,
            layout,
            workload,
            vm,
            disk,
            vcpu,
            lifecycle: Lifecycle::Created,
            paused: None,
        })
    }

    fn pacing(&self) -> Pacing {
        pacing_of(self.config.batch_pages, &self.workload)
    }

    fn lifecycle_err(&self, op: &'static str) -> MachineError {
        MachineError::Lifecycle {
            op,
            state: self.lifecycle,
        }
    }

    /// Loads a state blob (from [`Machine::pause`], possibly of another
    /// process). Created or Ready only.
    pub fn restore(&mut self, blob: &[u8]) -> Result<(), MachineError> {
        if !matches!(self.lifecycle, Lifecycle::Created | Lifecycle::Ready) {
            return Err(self.lifecycle_err("restore"));
        }
        let state = VmStateBlob::decode(blob)?;
        let dev = &state.device;
        if dev.mem_bytes != self.config.mem_bytes || state.vcpus.len() != 1 {
            return Err(MachineError::Mismatch(format!(
                "blob is for {} bytes and {} vCPUs, this VM has {} bytes and 1 vCPU",
                dev.mem_bytes,
                state.vcpus.len(),
                self.config.mem_bytes
            )));
        }
        let workload: GuestWorkload = dev.workload.parse()?;
        if workload.disk.is_some() && self.config.disk.is_none() {
            return Err(MachineError::Mismatch(format!(
                "blob's workload {workload} writes to a disk; this VM has none"
            )));
        }
        if let Some(d) = &self.disk {
            d.check_size()?;
        }
        self.workload = workload;
        self.config.batch_pages = dev.batch_pages;
        self.config.workload = dev.workload.clone();
        self.vcpu.restore(state.vcpus[0], self.pacing())?;
        self.lifecycle = Lifecycle::Ready;
        Ok(())
    }

    /// Post-copy take-back: loads `blob` (a checkpoint of the target,
    /// whose pages ferryd wrote into memory) into the paused VM. It stays
    /// paused until `resume`.
    pub fn rollback(&mut self, blob: &[u8]) -> Result<(), MachineError> {
        if self.lifecycle != Lifecycle::Paused {
            return Err(self.lifecycle_err("rollback"));
        }
        let state = VmStateBlob::decode(blob)?;
        let dev = &state.device;
        if dev.mem_bytes != self.config.mem_bytes
            || state.vcpus.len() != 1
            || dev.workload != self.config.workload
        {
            return Err(MachineError::Mismatch(format!(
                "checkpoint is for {} bytes, {} vCPUs and workload {}; this VM has {} bytes, \
                 1 vCPU and workload {}",
                dev.mem_bytes,
                state.vcpus.len(),
                dev.workload,
                self.config.mem_bytes,
                self.config.workload
            )));
        }
        self.vcpu.restore(state.vcpus[0], self.pacing())?;
        // The state of the pause is not this VM's any more.
        self.paused = None;
        Ok(())
    }

    /// Runs the guest: from Ready or Paused; no-op when running.
    pub fn run(&mut self) -> Result<(), MachineError> {
        match self.lifecycle {
            Lifecycle::Running => Ok(()),
            Lifecycle::Ready | Lifecycle::Paused => {
                self.vcpu.run()?;
                self.paused = None;
                self.lifecycle = Lifecycle::Running;
                Ok(())
            }
            Lifecycle::Created => Err(self.lifecycle_err("run")),
        }
    }

    /// Resumes a paused guest (a failed migration); no-op when running.
    /// Either way the guest runs at full speed again: the throttle that
    /// helped the migration converge ends with it.
    pub fn resume(&mut self) -> Result<(), MachineError> {
        match self.lifecycle {
            Lifecycle::Paused | Lifecycle::Running => {
                self.vcpu.set_throttle(0);
                self.run()
            }
            _ => Err(self.lifecycle_err("resume")),
        }
    }

    /// Lets the vCPU run only `100 - percent`% of wall time (0: full
    /// speed); see [`crate::vcpu`]. Not part of the state blob: a restored
    /// VM starts at full speed.
    pub fn set_throttle(&mut self, percent: u8) -> Result<(), MachineError> {
        if percent > THROTTLE_PCT_MAX {
            return Err(MachineError::Throttle { percent });
        }
        self.vcpu.set_throttle(percent);
        Ok(())
    }

    /// The throttle in effect, percent.
    pub fn throttle_pct(&self) -> u8 {
        self.vcpu.throttle_pct()
    }

    /// Parks the vCPU at the guest's next exit and returns the state. A
    /// second pause returns the same state.
    pub fn pause(&mut self) -> Result<PausedVm, MachineError> {
        if let Some(p) = &self.paused {
            return Ok(p.clone());
        }
        if self.lifecycle == Lifecycle::Created {
            return Err(self.lifecycle_err("pause"));
        }
        let t0 = Instant::now();
        let vcpu = self.vcpu.pause()?;
        let latency = t0.elapsed();
        let device = DeviceState {
            workload: self.config.workload.clone(),
            batch_pages: self.config.batch_pages,
            mem_bytes: self.config.mem_bytes,
        };
        let blob = VmStateBlob {
            device,
            vcpus: vec![vcpu],
        }
        .encode();
        let progress = self.counters()?.progress;
        let p = PausedVm {
            blob,
            progress,
            latency,
        };
        self.paused = Some(p.clone());
        self.lifecycle = Lifecycle::Paused;
        Ok(p)
    }

    /// Starts dirty logging of memory and, with a disk, of disk blocks.
    /// Pages the VMM wrote before count as dirty with all the others.
    /// Idempotent: a second start clears nothing.
    pub fn start_dirty_log(&self) -> Result<(), MachineError> {
        if !self.vm.dirty_logging() {
            self.ram().host_dirty().clear();
        }
        self.vm.set_dirty_logging(true)?;
        if let Some(d) = &self.disk {
            d.start_log();
        }
        Ok(())
    }

    /// Returns and re-arms the dirty log (u64 words, bit per 4 KiB page):
    /// the guest's writes (KVM's log) and the VMM's own into guest memory.
    pub fn sync_dirty_log(&self) -> Result<Vec<u64>, MachineError> {
        let mut bitmap = self.vm.sync_dirty_log()?;
        self.ram().host_dirty().take_into(&mut bitmap);
        Ok(bitmap)
    }

    /// The dirty log without re-arming it (manual protect only).
    pub fn peek_dirty_log(&self) -> Result<Vec<u64>, MachineError> {
        let mut bitmap = self.vm.peek_dirty_log()?;
        self.ram().host_dirty().peek_into(&mut bitmap);
        Ok(bitmap)
    }

    /// Returns and clears the disk's dirty log (u64 words, bit per 4 KiB
    /// block): blocks written since the last sync or since logging started.
    pub fn sync_disk_log(&self) -> Result<Vec<u64>, MachineError> {
        Ok(self.disk.as_ref().ok_or(MachineError::NoDisk)?.sync_log()?)
    }

    /// Stops dirty logging of memory and disk.
    pub fn stop_dirty_log(&self) -> Result<(), MachineError> {
        if let Some(d) = &self.disk {
            d.stop_log();
        }
        Ok(self.vm.set_dirty_logging(false)?)
    }

    /// The guest's counters.
    pub fn counters(&self) -> Result<GuestCounters, MachineError> {
        Ok(guest::counters(self.ram())?)
    }

    /// Live numbers for ferryd.
    pub fn stats(&self) -> Result<VmStats, MachineError> {
        let c = self.counters()?;
        let phase = match self.vcpu.failure() {
            Some(_) => "failed".to_string(),
            None => guest::phase_name(c.phase).to_string(),
        };
        Ok(VmStats {
            progress: c.progress,
            running: self.vcpu.running(),
            phase,
            throttle_pct: self.vcpu.throttle_pct(),
        })
    }

    /// Why the guest failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.vcpu.failure()
    }

    /// Runs the oracle over all data pages (meaningful while paused).
    pub fn check(&self) -> CheckReport {
        oracle::check_memory(&self.ram().all(), &self.layout)
    }

    /// xxh3-64 of all guest memory (meaningful while paused).
    pub fn mem_hash(&self) -> String {
        oracle::mem_hash(&self.ram().all())
    }

    /// Runs the disk oracle over the guest's write window (meaningful while
    /// paused, and on a target after restore); None without a disk.
    pub fn check_disk(&self) -> Option<DiskCheckReport> {
        let disk = self.disk.as_ref()?;
        let first = self
            .config
            .disk
            .as_ref()
            .map_or(0, |d| d.window_first_block);
        let versions = disk_check::read_disk_versions(&self.ram().all(), &self.layout);
        Some(disk_check::check_disk(disk.as_ref(), first, &versions))
    }

    /// The allocation-independent hash of the disk image (meaningful while
    /// paused); None without a disk.
    pub fn disk_hash(&self) -> Option<Result<String, MachineError>> {
        let disk = self.disk.as_ref()?;
        Some(disk.hash().map_err(MachineError::from))
    }

    /// The disk, if the VM has one.
    pub fn disk(&self) -> Option<&Arc<Disk>> {
        self.disk.as_ref()
    }

    /// The RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        self.vm.ram()
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// The configuration (for `VmSpec::vmm_config`).
    pub fn config(&self) -> &VmmConfig {
        &self.config
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Where the VM is in its life.
    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle
    }
}

/// The pacing of `workload`'s memory and disk parts.
fn pacing_of(batch_pages: u64, workload: &GuestWorkload) -> Pacing {
    Pacing::new(
        batch_pages,
        workload.memory.dirty_bytes_per_s(),
        workload.disk.map(|d| d.blocks_per_s()),
    )
}
