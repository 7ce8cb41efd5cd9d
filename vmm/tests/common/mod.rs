//! Shared helpers of the KVM tests.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use ferry_vmm::config::{VmmConfig, Workload};
use ferry_vmm::machine::Machine;

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
    let mut m = Machine::boot(cfg).unwrap();
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
