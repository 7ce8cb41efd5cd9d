//! The disk under real KVM: the guest's stamped block writes against the
//! disk oracle, the disk dirty log, pacing, and a restore with a good and a
//! stale image. Each test skips with a printed reason where /dev/kvm is
//! missing.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::{boot_with_disk, copy_ram, kvm_or_skip, wait_for, wait_for_blocks, TempImage};
use ferry_vmm::abi;
use ferry_vmm::disk::check::{check_disk, read_disk_versions, BlockFault};
use ferry_vmm::disk::BLOCK_BYTES;
use ferry_vmm::layout::PAGE_BYTES;
use ferry_vmm::machine::{Machine, MachineError};
use ferry_vmm::oracle::expected_block;

const MIB: u64 = 1 << 20;

/// The guest's disk version table.
fn versions(m: &Machine) -> Vec<u32> {
    read_disk_versions(&m.ram().all(), m.layout())
}

fn window_first(m: &Machine) -> u64 {
    m.config().disk.as_ref().unwrap().window_first_block
}

#[test]
fn stamped_blocks_pass_the_oracle_and_a_poked_block_is_caught() {
    if !kvm_or_skip("stamped_blocks_pass_the_oracle_and_a_poked_block_is_caught") {
        return;
    }
    // 32 MiB image; the guest writes from 4 MiB on. The front holds a
    // pattern (a "file system") that must survive.
    let img = TempImage::new("oracle", 32 * MIB);
    let front = vec![0x5au8; (4 * MIB) as usize];
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img.path)
        .unwrap()
        .write_all_at(&front, 0)
        .unwrap();
    // fill+disk:20 = 5120 block writes per second.
    let mut m = boot_with_disk("fill+disk:20", 64, &img, 4);
    wait_for(&m, abi::PHASE_IDLE, 1);
    let (t0, w0) = (Instant::now(), m.counters().unwrap().blocks_written);
    std::thread::sleep(Duration::from_secs(1));
    let rate = (m.counters().unwrap().blocks_written - w0) as f64 / t0.elapsed().as_secs_f64();
    eprintln!("disk:20: {rate:.0} block writes/s (5120 expected)");
    assert!((2500.0..8000.0).contains(&rate), "{rate:.0} blocks/s");
    m.pause().unwrap();

    let c = m.counters().unwrap();
    let v = versions(&m);
    assert_eq!(
        v.len() as u64,
        28 * MIB / 4096,
        "one entry per window block"
    );
    assert_eq!(
        v.iter().map(|&x| u64::from(x)).sum::<u64>(),
        c.blocks_written,
        "every write counted in the table"
    );
    assert!(c.blocks_read > 0, "the guest reads blocks back");
    let stamped = v.iter().filter(|&&x| x > 0).count() as u64;
    let r = m.check_disk().unwrap();
    assert_eq!(
        (r.blocks_checked, r.blocks_bad),
        (stamped, 0),
        "{:?}",
        r.first_faults
    );
    assert_eq!(m.check().pages_bad, 0);
    let mut head = vec![0u8; front.len()];
    img.open_file().read_exact_at(&mut head, 0).unwrap();
    assert!(head == front, "the front of the image was written");

    // Poke: one bit in a stamped block's body; the header of another.
    let hash = m.disk_hash().unwrap().unwrap();
    let first = window_first(&m);
    let mut stamped_blocks = (0..v.len() as u64).filter(|&w| v[w as usize] > 0);
    let (a, b) = (
        first + stamped_blocks.next().unwrap(),
        first + stamped_blocks.next().unwrap(),
    );
    let f = img.open_file();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, a * 4096 + 3000).unwrap();
    f.write_all_at(&[byte[0] ^ 4], a * 4096 + 3000).unwrap();
    f.write_all_at(&[0xff], b * 4096 + 16).unwrap();
    let r = m.check_disk().unwrap();
    assert_eq!(r.blocks_bad, 2, "{:?}", r.first_faults);
    assert!(matches!(
        r.first_faults[0],
        BlockFault::Body { block, offset: 3000, .. } if block == a
    ));
    assert!(matches!(r.first_faults[1], BlockFault::Header { block, .. } if block == b));
    assert_ne!(m.disk_hash().unwrap().unwrap(), hash);
}

#[test]
fn the_disk_log_reports_written_blocks_and_clears_on_sync() {
    if !kvm_or_skip("the_disk_log_reports_written_blocks_and_clears_on_sync") {
        return;
    }
    let img = TempImage::new("log", 16 * MIB);
    // Memory idle; disk:40 = 10240 block writes per second into 15 MiB.
    let mut m = boot_with_disk("disk:40", 16, &img, 1);
    wait_for_blocks(&m, 100);
    m.pause().unwrap();
    assert!(
        matches!(m.sync_disk_log(), Err(MachineError::Disk(_))),
        "sync before StartDirtyLog"
    );
    m.start_dirty_log().unwrap();
    let blocks = 16 * MIB / 4096;
    let empty = m.sync_disk_log().unwrap();
    assert_eq!(empty.len() as u64, blocks / 64);
    assert!(empty.iter().all(|&w| w == 0), "a new log is empty");
    m.sync_dirty_log().unwrap();
    let before = versions(&m);
    m.resume().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    m.pause().unwrap();
    let after = versions(&m);
    let log = m.sync_disk_log().unwrap();
    let first = window_first(&m);
    let logged: BTreeSet<u64> = (0..blocks)
        .filter(|&b| log[(b / 64) as usize] >> (b % 64) & 1 == 1)
        .collect();
    let written: BTreeSet<u64> = (0..after.len())
        .filter(|&w| after[w] != before[w])
        .map(|w| first + w as u64)
        .collect();
    assert!(written.len() > 500, "only {} blocks written", written.len());
    assert_eq!(logged, written, "the log is exactly the written blocks");
    // The memory log has the guest's table entries and the DMA pages (the
    // guest's stamps; the VMM's reads into them are logged by the VMM).
    let mem = m.sync_dirty_log().unwrap();
    let dirty =
        |gpa: u64| mem[(gpa / PAGE_BYTES / 64) as usize] >> (gpa / PAGE_BYTES % 64) & 1 == 1;
    for &b in &written {
        assert!(dirty(m.layout().disk_table_gpa + (b - first) * 4));
    }
    assert!(dirty(abi::DISK_DMA_GPA) && dirty(abi::CB_GPA));
    // Cleared: a paused guest writes nothing.
    assert!(m.sync_disk_log().unwrap().iter().all(|&w| w == 0));
    m.stop_dirty_log().unwrap();
    assert!(m.sync_disk_log().is_err(), "sync after StopDirtyLog");
    // The image still took every write while the log was off.
    let r = m.check_disk().unwrap();
    assert_eq!(r.blocks_bad, 0, "{:?}", r.first_faults);
}

#[test]
fn a_vm_without_a_disk_refuses_disk_requests() {
    if !kvm_or_skip("a_vm_without_a_disk_refuses_disk_requests") {
        return;
    }
    let mut m = common::boot("idle", 16);
    m.pause().unwrap();
    m.start_dirty_log().unwrap();
    assert!(matches!(m.sync_disk_log(), Err(MachineError::NoDisk)));
    assert!(m.check_disk().is_none() && m.disk_hash().is_none());
}

/// A migration by hand: the target gets a copy of the RAM and of the image
/// at the pause. With the right image it checks clean, runs on and keeps
/// writing and reading; with a stale one the oracle and the guest's own
/// read-back checks both catch it.
#[test]
fn restore_with_the_image_runs_on_and_a_stale_image_is_caught() {
    if !kvm_or_skip("restore_with_the_image_runs_on_and_a_stale_image_is_caught") {
        return;
    }
    let img = TempImage::new("src", 8 * MIB);
    let mut a = boot_with_disk("dirty:8+disk:40", 32, &img, 0);
    wait_for(&a, abi::PHASE_DIRTY, 1);
    wait_for_blocks(&a, 2000);
    // Pauses land between commands, and stay short.
    let mut latencies = Vec::new();
    for _ in 0..5 {
        latencies.push(a.pause().unwrap().latency);
        assert_eq!(a.check_disk().unwrap().blocks_bad, 0);
        a.resume().unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    latencies.sort();
    eprintln!("pause latencies with a disk workload: {latencies:?}");
    assert!(latencies[2] < Duration::from_millis(5), "{latencies:?}");

    a.pause().unwrap();
    let stale = TempImage::copy_of("stale", &img.path);
    a.resume().unwrap();
    wait_for_blocks(&a, a.counters().unwrap().blocks_written + 3000);
    let paused = a.pause().unwrap();
    let src_hash = a.disk_hash().unwrap().unwrap();
    let written = a.counters().unwrap().blocks_written;

    // The good image.
    let good = TempImage::copy_of("good", &img.path);
    let mut b = Machine::attach(a.config().clone(), copy_ram(&a), Some(good.open())).unwrap();
    b.restore(&paused.blob).unwrap();
    let r = b.check_disk().unwrap();
    assert_eq!(r.blocks_bad, 0, "{:?}", r.first_faults);
    assert!(r.blocks_checked > 1000);
    assert_eq!(b.disk_hash().unwrap().unwrap(), src_hash);
    let read0 = b.counters().unwrap().blocks_read;
    b.run().unwrap();
    wait_for_blocks(&b, written + 2000);
    let t0 = Instant::now();
    while b.counters().unwrap().blocks_read < read0 + 100 {
        assert!(b.failure().is_none(), "{:?}", b.failure());
        assert!(t0.elapsed() < Duration::from_secs(10), "no read-backs");
        std::thread::sleep(Duration::from_millis(5));
    }
    b.pause().unwrap();
    assert!(b.failure().is_none(), "{:?}", b.failure());
    let r = b.check_disk().unwrap();
    assert_eq!(r.blocks_bad, 0, "{:?}", r.first_faults);
    assert_eq!(b.check().pages_bad, 0);
    assert_eq!(
        a.disk_hash().unwrap().unwrap(),
        src_hash,
        "the source image is not the target's"
    );

    // The stale image: thousands of blocks a version or more behind.
    let mut c = Machine::attach(a.config().clone(), copy_ram(&a), Some(stale.open())).unwrap();
    c.restore(&paused.blob).unwrap();
    let r = c.check_disk().unwrap();
    eprintln!(
        "stale image: {} of {} blocks bad",
        r.blocks_bad, r.blocks_checked
    );
    assert!(r.blocks_bad > 100, "{r:?}");
    assert!(matches!(r.first_faults[0], BlockFault::Header { .. }));
    c.run().unwrap();
    let t0 = Instant::now();
    let why = loop {
        if let Some(why) = c.failure() {
            break why;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the guest did not notice its stale disk"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    eprintln!("stale image: {why}");
    assert!(why.contains("read disk block"), "{why}");
    let st = c.stats().unwrap();
    assert!(!st.running && st.phase == "failed", "{st:?}");
}

#[test]
fn a_target_refuses_an_image_of_another_size() {
    if !kvm_or_skip("a_target_refuses_an_image_of_another_size") {
        return;
    }
    let img = TempImage::new("size-src", 4 * MIB);
    let mut a = boot_with_disk("disk:1", 16, &img, 0);
    let paused = a.pause().unwrap();
    // The image passed to a target is the spec's size until ferryd is done;
    // a shorter one is refused at restore, not at attach.
    let short = TempImage::new("size-dst", 4 * MIB);
    let disk = short.open();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&short.path)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let mut b = Machine::attach(a.config().clone(), copy_ram(&a), Some(disk)).unwrap();
    let e = b.restore(&paused.blob).unwrap_err();
    assert!(e.to_string().contains("is 1048576 bytes"), "{e}");
    // Without its disk, the VM is not even created.
    assert!(matches!(
        Machine::attach(a.config().clone(), copy_ram(&a), None),
        Err(MachineError::Mismatch(_))
    ));
}

#[test]
fn a_block_is_the_closed_form_of_its_version() {
    if !kvm_or_skip("a_block_is_the_closed_form_of_its_version") {
        return;
    }
    // Few blocks, many writes each: every slot of many blocks is rewritten
    // several times, so the guest's slot_version arithmetic is exercised.
    let img = TempImage::new("closed-form", 4 * MIB);
    let mut m = boot_with_disk("disk:40", 16, &img, 4 * MIB / MIB - 1);
    wait_for_blocks(&m, 20_000);
    m.pause().unwrap();
    let v = versions(&m);
    let vmax = *v.iter().max().unwrap();
    assert!(vmax >= 3 * abi::BODY_SLOTS as u32, "max version {vmax}");
    let first = window_first(&m);
    let f = img.open_file();
    let (mut got, mut want) = ([0u8; BLOCK_BYTES], [0u8; BLOCK_BYTES]);
    for (w, &ver) in v.iter().enumerate().filter(|(_, &x)| x > 0) {
        let block = first + w as u64;
        f.read_exact_at(&mut got, block * 4096).unwrap();
        expected_block(block, ver, &mut want);
        assert!(got == want, "block {block} at version {ver}");
    }
    let r = check_disk(&img.open(), first, &v);
    assert_eq!(r.blocks_bad, 0);
}

/// Block writes per second over `window`.
fn blocks_per_s(m: &Machine, window: Duration) -> f64 {
    let (t0, w0) = (Instant::now(), m.counters().unwrap().blocks_written);
    std::thread::sleep(window);
    let w1 = m.counters().unwrap().blocks_written;
    assert!(m.failure().is_none(), "guest failed: {:?}", m.failure());
    (w1 - w0) as f64 / t0.elapsed().as_secs_f64()
}

#[test]
fn throttling_slows_the_disk_writes_and_resume_lifts_it() {
    if !kvm_or_skip("throttling_slows_the_disk_writes_and_resume_lifts_it") {
        return;
    }
    let img = TempImage::new("throttle", 16 * MIB);
    // disk:20 = 5120 block writes per second.
    let mut m = boot_with_disk("disk:20", 16, &img, 0);
    wait_for_blocks(&m, 100);
    let window = Duration::from_secs(1);
    let full = blocks_per_s(&m, window);
    m.set_throttle(75).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let slow = blocks_per_s(&m, window);
    m.pause().unwrap();
    m.resume().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let after = blocks_per_s(&m, window);
    eprintln!("blocks/s: full {full:.0}, throttled at 75% {slow:.0}, resumed {after:.0}");
    // Expected 5120, 1280, 5120; the margins absorb a busy 2-core host.
    assert!(full > 2500.0, "{full:.0}");
    assert!(slow > 0.0 && slow < full * 0.6, "{slow:.0} vs {full:.0}");
    assert!(after > slow * 2.0, "{after:.0} vs {slow:.0}");
    m.pause().unwrap();
    assert_eq!(m.check_disk().unwrap().blocks_bad, 0);
}
