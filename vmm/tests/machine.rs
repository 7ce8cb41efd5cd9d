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
use ferry_vmm::oracle::{check_memory, class_of, read_versions, slot_of};
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
    let mut b = Machine::attach(a.config().clone(), ram, None).unwrap();
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
    let mut b = Machine::attach(small.config().clone(), ram, None).unwrap();
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

/// Pages the guest rewrites per second, over `window`.
fn pages_per_s(m: &Machine, window: Duration) -> f64 {
    let (t0, w0) = (Instant::now(), m.counters().unwrap().pages_written);
    std::thread::sleep(window);
    let w1 = m.counters().unwrap().pages_written;
    assert!(m.failure().is_none(), "guest failed: {:?}", m.failure());
    (w1 - w0) as f64 / t0.elapsed().as_secs_f64()
}

#[test]
fn throttle_slows_a_dirty_guest_and_resume_lifts_it() {
    if !kvm_or_skip("throttle_slows_a_dirty_guest_and_resume_lifts_it") {
        return;
    }
    // dirty:100 = 25600 page rewrites per second (1600 exits per second).
    let mut m = boot("dirty:100", 64);
    wait_for(&m, abi::PHASE_DIRTY, 1);
    let window = Duration::from_secs(1);
    let full = pages_per_s(&m, window);
    m.set_throttle(75).unwrap();
    assert_eq!(m.stats().unwrap().throttle_pct, 75);
    std::thread::sleep(Duration::from_millis(50));
    let slow = pages_per_s(&m, window);
    eprintln!("pages/s: full {full:.0}, throttled at 75% {slow:.0}");
    // Expected: 25600 and 6400. The margins absorb a busy 2-core host.
    assert!(full > 5_000.0, "unthrottled guest wrote {full:.0} pages/s");
    assert!(slow > 0.0, "a throttled guest still runs");
    assert!(
        slow < full * 0.7,
        "75% throttle: {slow:.0} vs {full:.0} pages/s"
    );
    assert!(matches!(
        m.set_throttle(100),
        Err(MachineError::Throttle { percent: 100 })
    ));
    assert_eq!(m.throttle_pct(), 75, "a refused value changes nothing");

    // A failed migration: pause, resume; the guest runs at full speed again.
    m.pause().unwrap();
    assert_eq!(m.throttle_pct(), 75, "pausing keeps the throttle");
    m.resume().unwrap();
    assert_eq!(m.stats().unwrap().throttle_pct, 0);
    let after = pages_per_s(&m, window);
    eprintln!("pages/s after resume {after:.0}");
    assert!(
        after > slow * 2.0,
        "after resume {after:.0} vs {slow:.0} pages/s"
    );
    m.pause().unwrap();
    let r = m.check();
    assert_eq!(r.pages_bad, 0, "{:?}", r.first_faults);
}

#[test]
fn a_throttled_idle_guest_still_pauses_at_once() {
    if !kvm_or_skip("a_throttled_idle_guest_still_pauses_at_once") {
        return;
    }
    let mut m = boot("idle", 16);
    wait_for(&m, abi::PHASE_IDLE, 1);
    m.set_throttle(99).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let p = m.pause().unwrap();
    // At 99% the vCPU sleeps ~1 s per 10 ms slice; a pause cuts the sleep.
    assert!(
        p.latency < Duration::from_millis(200),
        "pause took {:?}",
        p.latency
    );
    m.resume().unwrap();
    wait_for(&m, abi::PHASE_IDLE, p.progress + 5);
}

/// The guest's dirty-phase rewrites change only the header and one slot,
/// exactly as the oracle's model says, and the pages pass the oracle after
/// every slot was rewritten many times.
#[test]
fn dirty_rewrites_change_one_slot_and_pass_the_oracle() {
    if !kvm_or_skip("dirty_rewrites_change_one_slot_and_pass_the_oracle") {
        return;
    }
    // 16 MiB: ~340 hot pages at 25600 rewrites/s: ~75 versions/s per page.
    let mut m = boot("dirty:100:hot=100", 16);
    wait_for(&m, abi::PHASE_DIRTY, 1);
    std::thread::sleep(Duration::from_millis(700));
    m.pause().unwrap();
    let l = *m.layout();
    let r = m.check();
    assert_eq!(r.pages_bad, 0, "{:?}", r.first_faults);
    let before = read_versions(&m.ram().all(), &l);
    let vmax = *before.iter().max().unwrap();
    assert!(vmax >= 3 * abi::BODY_SLOTS as u32, "max version {vmax}");
    let ram = m.ram().clone();
    let read = |p: u64| {
        let mut b = vec![0u8; PAGE_BYTES as usize];
        ram.all()
            .read_slice(&mut b, l.data_page_gpa(p) as usize)
            .unwrap();
        b
    };
    // Hot page k is data page k * stride (spread over memory).
    let stride = l.data_pages / l.hot_pages;
    let hot: Vec<u64> = (0..l.hot_pages).map(|k| k * stride).collect();
    let old: Vec<Vec<u8>> = hot.iter().map(|&p| read(p)).collect();
    // A batch or two of rewrites: resume, and pause once one batch is done.
    let p0 = m.counters().unwrap().progress;
    m.resume().unwrap();
    let t0 = Instant::now();
    while m.counters().unwrap().progress == p0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no batch after resume"
        );
        std::hint::spin_loop();
    }
    m.pause().unwrap();
    let after = read_versions(&m.ram().all(), &l);
    let mut seen = [0usize; 4];
    for (k, &p) in hot.iter().enumerate() {
        let (v0, v1) = (before[p as usize], after[p as usize]);
        if v1 != v0 + 1 || v0 == 0 {
            continue;
        }
        let kind = class_of(p);
        seen[kind as usize] += 1;
        let slot = slot_of(v1).unwrap();
        let slot_bytes = abi::HEADER_BYTES as usize + slot * abi::SLOT_BYTES as usize;
        let slot_range = slot_bytes..slot_bytes + abi::SLOT_BYTES as usize;
        let new = read(p);
        let changed: Vec<usize> = (0..new.len()).filter(|&i| new[i] != old[k][i]).collect();
        assert!(
            changed
                .iter()
                .all(|&i| (16..32).contains(&i) || slot_range.contains(&i)),
            "page {p} (kind {kind}) v{v0}->v{v1}: changed outside header and slot {slot}: {:?}",
            &changed[..changed.len().min(8)]
        );
        if kind == abi::KIND_RANDOM {
            assert!(
                changed.len() > 200,
                "page {p}: only {} bytes",
                changed.len()
            );
        }
        if kind == abi::KIND_ZERO {
            assert!(changed.iter().all(|&i| i < 32), "page {p}");
        }
    }
    eprintln!("pages rewritten once, by kind (-, zero, text, random): {seen:?}");
    assert!(
        seen.iter().sum::<usize>() > 0,
        "no page was rewritten exactly once"
    );
    let r = m.check();
    assert_eq!(r.pages_bad, 0, "{:?}", r.first_faults);
}

#[test]
fn peeking_at_the_dirty_log_leaves_it_for_the_next_sync() {
    if !kvm_or_skip("peeking_at_the_dirty_log_leaves_it_for_the_next_sync") {
        return;
    }
    let mut m = boot("dirty:64", 64);
    wait_for(&m, abi::PHASE_DIRTY, 1);
    m.pause().unwrap();
    assert!(m.peek_dirty_log().is_err(), "peek with logging off");
    m.start_dirty_log().unwrap();
    m.sync_dirty_log().unwrap();
    m.resume().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    m.pause().unwrap();
    let count = |b: &[u64]| -> u64 { b.iter().map(|w| u64::from(w.count_ones())).sum() };
    let first = m.peek_dirty_log().unwrap();
    assert!(count(&first) > 100, "{} pages", count(&first));
    // A peek clears nothing: the same pages again, then the sync has them.
    assert_eq!(m.peek_dirty_log().unwrap(), first);
    assert_eq!(m.sync_dirty_log().unwrap(), first);
    // The sync did re-arm: a paused guest dirties nothing.
    assert_eq!(count(&m.peek_dirty_log().unwrap()), 0);
}
