//! The KVM side of a VM: the VM fd, its one memory slot, dirty logging, and
//! the vCPU state of a fresh boot straight into long mode.
//!
//! Dirty logging uses KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 when the kernel has
//! it (enabled at VM creation, without INITIALLY_SET): `KVM_GET_DIRTY_LOG`
//! then only reads the bitmap and `KVM_CLEAR_DIRTY_LOG` re-protects exactly
//! the pages returned. Without it, `KVM_GET_DIRTY_LOG` reads and re-arms in
//! one call.

use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, kvm_regs, kvm_segment, kvm_sregs,
    kvm_userspace_memory_region, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::{ioctl::ioctl_with_ref, ioctl_iowr_nr};

use crate::abi;
use crate::layout::{GDT_ENTRIES, PAGE_BYTES, TSS_SEL, USER_CS, USER_DS};
use crate::mem::GuestRam;

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// The one memory slot: all of RAM at GPA 0.
const SLOT: u32 = 0;

/// Errors of KVM operations.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Ioctl {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}

/// A VM with its memory slot. Holds the RAM so the slot's host mapping
/// outlives the VM.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    ram: Arc<GuestRam>,
    manual_protect: bool,
    dirty_logging: Mutex<bool>,
}

impl Vm {
    /// Creates a VM over `ram` (one slot at GPA 0). Never touches guest memory.
    pub fn new(ram: Arc<GuestRam>) -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(ioctl("open /dev/kvm"))?;
        let fd = kvm.create_vm().map_err(ioctl("create VM"))?;
        let flags = fd.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
        let manual_protect = flags > 0 && flags as u32 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0;
        if manual_protect {
            let cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
                ..Default::default()
            };
            fd.enable_cap(&cap)
                .map_err(ioctl("enable manual dirty log protect"))?;
        }
        let vm = Vm {
            kvm,
            fd,
            ram,
            manual_protect,
            dirty_logging: Mutex::new(false),
        };
        vm.set_slot(false)?;
        Ok(vm)
    }

    fn set_slot(&self, log_dirty: bool) -> Result<(), KvmError> {
        let region = kvm_userspace_memory_region {
            slot: SLOT,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: self.ram.bytes(),
            userspace_addr: self.ram.host_addr(),
        };
        // SAFETY: the region is the live MAP_SHARED mapping of `self.ram`,
        // exactly `ram.bytes()` long; `self` holds an Arc to it, so the
        // mapping outlives the VM and its slot.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(ioctl("set memory slot"))
    }

    /// The guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Whether KVM_CLEAR_DIRTY_LOG (manual protect) is in use.
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// Creates vCPU `id` with the host's supported CPUID (KVM refuses
    /// EFER.LME without long mode in the guest CPUID).
    pub fn create_vcpu(&self, id: u64) -> Result<VcpuFd, KvmError> {
        let vcpu = self.fd.create_vcpu(id).map_err(ioctl("create vCPU"))?;
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("get supported CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(ioctl("set CPUID"))?;
        Ok(vcpu)
    }

    /// Turns dirty logging on or off (re-sets the slot's flags). Idempotent.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), KvmError> {
        let mut logging = self.dirty_logging.lock().expect("dirty log lock");
        if *logging != on {
            self.set_slot(on)?;
            *logging = on;
        }
        Ok(())
    }

    /// Whether dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        *self.dirty_logging.lock().expect("dirty log lock")
    }

    /// Returns the pages written since the last sync (or since logging
    /// started) without re-arming them: they stay in the log for the next
    /// [`Self::sync_dirty_log`]. Only with manual protect, where
    /// KVM_GET_DIRTY_LOG just copies the log out; without it KVM clears the
    /// log as it reads, so this refuses.
    pub fn peek_dirty_log(&self) -> Result<Vec<u64>, KvmError> {
        let logging = self.dirty_logging.lock().expect("dirty log lock");
        if !*logging || !self.manual_protect {
            return Err(KvmError::Ioctl {
                op: "peek dirty log",
                source: kvm_ioctls::Error::new(if *logging {
                    libc::EOPNOTSUPP
                } else {
                    libc::ENOENT
                }),
            });
        }
        let bitmap = self
            .fd
            .get_dirty_log(SLOT, self.ram.bytes() as usize)
            .map_err(ioctl("get dirty log"))?;
        drop(logging);
        Ok(bitmap)
    }

    /// Returns the pages written since the last call (or since logging
    /// started) and re-arms logging for them: u64 words, one bit per 4 KiB
    /// page of the slot, page 0 in bit 0 of word 0.
    pub fn sync_dirty_log(&self) -> Result<Vec<u64>, KvmError> {
        let logging = self.dirty_logging.lock().expect("dirty log lock");
        if !*logging {
            return Err(KvmError::Ioctl {
                op: "get dirty log",
                source: kvm_ioctls::Error::new(libc::ENOENT),
            });
        }
        let mut bitmap = self
            .fd
            .get_dirty_log(SLOT, self.ram.bytes() as usize)
            .map_err(ioctl("get dirty log"))?;
        if self.manual_protect {
            let pages = self.ram.bytes() / PAGE_BYTES;
            let clear = kvm_clear_dirty_log {
                slot: SLOT,
                num_pages: u32::try_from(pages).expect("RAM is capped at 8 GiB"),
                first_page: 0,
                __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: bitmap.as_mut_ptr().cast(),
                },
            };
            // SAFETY: `clear` names our slot and its full page range, and
            // points at `bitmap`, which holds one bit for each of those pages
            // and lives across the call; KVM only reads it.
            let rc = unsafe { ioctl_with_ref(&self.fd, KVM_CLEAR_DIRTY_LOG(), &clear) };
            if rc != 0 {
                return Err(KvmError::Ioctl {
                    op: "clear dirty log",
                    source: kvm_ioctls::Error::last(),
                });
            }
        }
        drop(logging);
        Ok(bitmap)
    }
}

/// Special registers of a fresh boot: long mode, paging on, flat 64-bit
/// user segments (CPL 3; see `layout` for why). `base` comes from the vCPU so fields we do not set keep KVM's
/// defaults.
pub fn boot_sregs(base: kvm_sregs) -> kvm_sregs {
    const CR0_PE: u64 = 1 << 0;
    const CR0_MP: u64 = 1 << 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_NE: u64 = 1 << 5;
    const CR0_WP: u64 = 1 << 16;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = seg(USER_DS, 0x3, 0, 1);
    let mut s = base;
    s.cs = seg(USER_CS, 0xb, 1, 0);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.tr = kvm_segment {
        limit: 0x67,
        selector: TSS_SEL,
        type_: 0xb,
        s: 0,
        db: 0,
        g: 0,
        dpl: 0,
        ..data
    };
    s.gdt.base = abi::GDT_GPA;
    s.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    s.cr3 = abi::PML4_GPA;
    s.cr4 = CR4_PAE;
    s.efer = EFER_LME | EFER_LMA;
    s
}

/// General registers of a fresh boot: entry point, stack, RFLAGS with
/// bit 1 and IOPL 3 (the CPL 3 guest may use `out`), interrupts off.
pub fn boot_regs() -> kvm_regs {
    const RFLAGS_FIXED: u64 = 1 << 1;
    const RFLAGS_IOPL3: u64 = 3 << 12;
    kvm_regs {
        rip: abi::CODE_GPA,
        rsp: abi::STACK_TOP,
        rflags: RFLAGS_FIXED | RFLAGS_IOPL3,
        ..Default::default()
    }
}
