//! End-to-end tests of the VMM under real KVM: the guest's stamps against the
//! Rust oracle, dirty logging, pause/resume, and restore into a second VM.
//! Each test skips with a printed reason where /dev/kvm is missing.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{boot, kvm_or_skip, wait_for};
use ferry_vmm::abi;
use ferry_vmm::layout::PAGE_BYTES;
use ferry_vmm::machine::{Lifecycle, Machine, MachineError};
use ferry_vmm::mem::GuestRam;
use ferry_vmm::oracle::{check_memory, read_versions};
use vm_memory::Bytes;

#[test]
fn every_workload_passes_the_oracle() {
    if !kvm_or_skip("every_workload_passes_the_oracle") {
        return;
    }
    for (workload, phase) in [
        ("idle", abi::PHASE_IDLE),
        ("fill", abi::PHASE_IDLE),
        ("mixed", abi::PHASE_IDLE),
        ("dirty:64", abi::PHASE_DIRTY),
        ("dirty:64:hot=80", abi::PHASE_DIRTY),
    ] {
        let mut m = boot(workload, 64);
        wait_for(&m, phase, 20);
        m.pause().unwrap();
        let l = *m.layout();
        let r = m.check();
        assert_eq!(
            (r.pages_checked, r.pages_bad),
            (l.data_pages, 0),
            "{workload}: {:?}",
            r.first_faults
        );
        match workload {
            "idle" => assert_eq!(r.pages_stamped, 0),
            "fill" => assert_eq!(r.pages_stamped, l.data_pages),
            _ => {
                let pct = r.pages_stamped * 100 / l.data_pages;
                assert!((55..=65).contains(&pct), "{workload}: {pct}% stamped");
            }
        }
        // One flipped byte is one bad page: in a stamped page, or in a zero page.
        let victim = (0..l.data_pages)
            .find(|&p| (read_versions(&m.ram().all(), &l)[p as usize] > 0) == (workload != "idle"))
            .unwrap();
        let gpa = l.data_page_gpa(victim) + 1000;
        let b: u8 = m.ram().all().read_obj(gpa as usize).unwrap();
        m.ram().all().write_obj(b ^ 0x40, gpa as usize).unwrap();
        let r = check_memory(&m.ram().all(), &l);
        assert_eq!(r.pages_bad, 1, "{workload}");
    }
}

#[test]
fn dirty_log_reports_every_page_the_guest_wrote() {
    if !kvm_or_skip("dirty_log_reports_every_page_the_guest_wrote") {
        return;
    }
    let mut m = boot("dirty:64", 64);
    wait_for(&m, abi::PHASE_DIRTY, 1);
    m.pause().unwrap();
    let l = *m.layout();
    m.start_dirty_log().unwrap();
    m.sync_dirty_log().unwrap();
    let before = read_versions(&m.ram().all(), &l);
    m.resume().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    m.pause().unwrap();
    let bitmap = m.sync_dirty_log().unwrap();
    let after = read_versions(&m.ram().all(), &l);
    assert_eq!(bitmap.len() as u64, (l.mem_bytes / PAGE_BYTES).div_ceil(64));
    let dirty =
        |gpa: u64| bitmap[(gpa / PAGE_BYTES / 64) as usize] >> (gpa / PAGE_BYTES % 64) & 1 == 1;
    let changed: Vec<u64> = (0..l.data_pages)
        .filter(|&p| before[p as usize] != after[p as usize])
        .collect();
    assert!(changed.len() > 100, "only {} pages changed", changed.len());
    for &p in &changed {
        assert!(
            dirty(l.data_page_gpa(p)),
            "data page {p} written but not in the dirty log"
        );
        assert!(
            dirty(l.table_gpa + p * 4),
            "version table entry of page {p} not in the dirty log"
        );
    }
    assert!(dirty(abi::CB_GPA), "control block not in the dirty log");
    let bits: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
    assert!(
        bits >= changed.len() as u64 && bits <= changed.len() as u64 + 64,
        "{bits} bits for {} pages",
        changed.len()
    );
    // Re-armed: a paused guest dirties nothing.
    let again = m.sync_dirty_log().unwrap();
    assert_eq!(again.iter().map(|w| w.count_ones()).sum::<u32>(), 0);
    m.stop_dirty_log().unwrap();
    assert!(
        m.sync_dirty_log().is_err(),
        "sync without logging is an error"
    );
}

#[test]
fn pause_resume_and_restore_into_a_second_vm() {
    if !kvm_or_skip("pause_resume_and_restore_into_a_second_vm") {
        return;
    }
    let mut a = boot("dirty:32:hot=50", 64);
    wait_for(&a, abi::PHASE_DIRTY, 1);
    let mut latencies = Vec::new();
    let mut last = 0;
    for _ in 0..5 {
        let p = a.pause().unwrap();
        assert!(p.progress > last, "progress must advance between pauses");
        assert_eq!(
            a.pause().unwrap().blob,
            p.blob,
            "a second pause returns the same state"
        );
        last = p.progress;
        latencies.push(p.latency);
        a.resume().unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    latencies.sort();
    eprintln!("pause latencies: {latencies:?}");
    assert!(
        latencies[2] < Duration::from_millis(5),
        "median pause latency {:?}",
        latencies[2]
    );

    let paused = a.pause().unwrap();
    assert_eq!(a.check().pages_bad, 0);
    let ram =
        Arc::new(GuestRam::from_memfd(a.ram().memfd_dup().unwrap(), a.ram().bytes()).unwrap());
    let mut b = Machine::attach(a.config().clone(), ram).unwrap();
    assert!(
        matches!(b.run(), Err(MachineError::Lifecycle { .. })),
        "cannot run before restore"
    );
    b.restore(&paused.blob).unwrap();
    assert_eq!(b.lifecycle(), Lifecycle::Ready);
    b.run().unwrap();
    let t0 = Instant::now();
    while b.counters().unwrap().progress < paused.progress + 20 {
        assert!(
            b.failure().is_none(),
            "restored guest failed: {:?}",
            b.failure()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "restored guest makes no progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let p = b.pause().unwrap();
    assert!(p.progress > paused.progress);
    let r = b.check();
    assert_eq!(r.pages_bad, 0, "{:?}", r.first_faults);
    assert!(matches!(
        b.restore(&paused.blob),
        Err(MachineError::Lifecycle { .. })
    ));
}

#[test]
fn restore_rejects_foreign_and_damaged_blobs() {
    if !kvm_or_skip("restore_rejects_foreign_and_damaged_blobs") {
        return;
    }
    let mut a = boot("idle", 64);
    wait_for(&a, abi::PHASE_IDLE, 1);
    let blob = a.pause().unwrap().blob;
    let small = boot("idle", 32);
    let ram = Arc::new(
        GuestRam::from_memfd(small.ram().memfd_dup().unwrap(), small.ram().bytes()).unwrap(),
    );
    let mut b = Machine::attach(small.config().clone(), ram).unwrap();
    assert!(
        matches!(b.restore(&blob), Err(MachineError::Mismatch(_))),
        "blob of another RAM size"
    );
    let mut v2 = blob.clone();
    v2[4] = 9;
    let e = b.restore(&v2).unwrap_err();
    assert!(e.to_string().contains("version 9"), "{e}");
    assert!(b.restore(&blob[..blob.len() - 3]).is_err());
    assert!(b.restore(b"").is_err());
    assert_eq!(b.lifecycle(), Lifecycle::Created);
}
