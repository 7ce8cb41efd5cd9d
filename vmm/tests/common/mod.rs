//! Shared helpers of the KVM tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_vmm::config::{DiskConfig, GuestWorkload, VmmConfig, Workload};
use ferry_vmm::disk::Disk;
use ferry_vmm::machine::Machine;
use ferry_vmm::mem::GuestRam;

/// Whether /dev/kvm can be used; prints the reason to skip otherwise.
pub fn kvm_or_skip(test: &str) -> bool {
    match kvm_ioctls::Kvm::new() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP {test}: /dev/kvm is not usable here ({e})");
            false
        }
    }
}

/// Boots and runs a VM.
pub fn boot(workload: &str, mem_mib: u64) -> Machine {
    let w: Workload = workload.parse().unwrap();
    let cfg = VmmConfig::new(w, mem_mib << 20, 16, true).unwrap();
    let mut m = Machine::boot(cfg, None).unwrap();
    m.run().unwrap();
    m
}

/// Waits until the guest reports `phase` (a `PHASE_*`) and `progress` at least `min_progress`.
pub fn wait_for(m: &Machine, phase: u64, min_progress: u64) {
    let t0 = Instant::now();
    loop {
        let c = m.counters().unwrap();
        if c.phase == phase && c.progress >= min_progress {
            return;
        }
        assert!(m.failure().is_none(), "guest failed: {:?}", m.failure());
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "guest stuck at {c:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A sparse raw image in the temp directory, removed on drop.
pub struct TempImage {
    pub path: PathBuf,
}

impl TempImage {
    /// A new all-hole image of `bytes`.
    pub fn new(name: &str, bytes: u64) -> Self {
        let path =
            std::env::temp_dir().join(format!("ferry-vmm-test-{}-{name}.img", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(bytes).unwrap();
        TempImage { path }
    }

    /// A copy of `from` (its current contents) as a new image.
    pub fn copy_of(name: &str, from: &Path) -> Self {
        let img = TempImage::new(name, 0);
        std::fs::copy(from, &img.path).unwrap();
        img
    }

    /// The image file, read-write (to read or poke blocks behind the VMM).
    pub fn open_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap()
    }

    /// The image, opened as a disk.
    pub fn open(&self) -> Disk {
        Disk::open(&self.path).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Boots and runs a VM with `image` as its disk, the guest writing from
/// `write_from_mib` on.
pub fn boot_with_disk(
    workload: &str,
    mem_mib: u64,
    image: &TempImage,
    write_from_mib: u64,
) -> Machine {
    let w: GuestWorkload = workload.parse().unwrap();
    let disk = image.open();
    let dc = DiskConfig::new(disk.bytes(), write_from_mib).unwrap();
    let cfg = VmmConfig::with_disk(w, mem_mib << 20, 16, true, Some(dc)).unwrap();
    let mut m = Machine::boot(cfg, Some(disk)).unwrap();
    m.run().unwrap();
    m
}

/// A private copy of `m`'s RAM (a memfd of its own, as a target receives).
pub fn copy_ram(m: &Machine) -> Arc<GuestRam> {
    let bytes = m.ram().bytes();
    let ram = GuestRam::create(bytes).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..bytes).step_by(buf.len()) {
        m.ram()
            .slice(off, buf.len() as u64)
            .unwrap()
            .copy_to(&mut buf[..]);
        ram.write_bytes(off, &buf).unwrap();
    }
    Arc::new(ram)
}

/// Waits until the guest has written at least `blocks` disk blocks.
pub fn wait_for_blocks(m: &Machine, blocks: u64) {
    let t0 = Instant::now();
    loop {
        let c = m.counters().unwrap();
        if c.blocks_written >= blocks {
            return;
        }
        assert!(m.failure().is_none(), "guest failed: {:?}", m.failure());
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "guest stuck at {c:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
