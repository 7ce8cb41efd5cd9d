//! Whole migrations of a VM with a disk, in one process: the in-process
//! transport, an in-memory guest that also writes blocks of a real image
//! file, and the target writing a real sparse image with io_uring.
//!
//! What every test checks: when the VM runs on the target, the target's
//! image holds exactly the source image's bytes at the pause, holes stay
//! holes; when it does not, the target left no image behind.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_engine::link::{DiskSpec, RegionSpec, VmSpec};
use ferry_engine::memvm::{mem_crc, MemSourceVm, MemTargetVm, TargetLog};
use ferry_engine::source::{migrate_out, DiskSource, SourceConfig};
use ferry_engine::target::{migrate_in, Acceptor, TargetConfig};
use ferry_engine::{Cancel, GuestMem, Key, Metrics, MigrationError, Snapshot};
use ferry_transport::inproc::InProcTransport;
use ferry_transport::Transport;

const MIB: u64 = 1 << 20;

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ferry-disk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A sparse image of `mib` MiB: 1 MiB extents of random data every 8 MiB,
/// one extent of written zeros, holes elsewhere. Returns the allocated
/// 4 KiB blocks that hold data.
fn make_image(path: &Path, mib: u64) -> u64 {
    let f = File::create(path).unwrap();
    f.set_len(mib * MIB).unwrap();
    let mut x = 0x1234_5678_9abc_def1_u64;
    let mut data = vec![0u8; MIB as usize];
    let mut blocks = 0;
    for i in (0..mib).step_by(8) {
        for w in data.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&data, i * MIB).unwrap();
        blocks += 256;
    }
    // Allocated, but zero: sent as zero entries, a hole on the target.
    f.write_all_at(&vec![0u8; MIB as usize], 3 * MIB).unwrap();
    f.sync_all().unwrap();
    blocks
}

fn spec(mem_mib: u64, disk_bytes: u64) -> VmSpec {
    VmSpec {
        name: "vm0".into(),
        regions: vec![RegionSpec {
            gpa: 0,
            size: mem_mib * MIB,
            memfd_offset: 0,
        }],
        vcpus: 1,
        vmm_config: serde_json::json!({}),
        disk: Some(DiskSpec { bytes: disk_bytes }),
    }
}

struct Run {
    result: Result<u64, MigrationError>,
    target: Result<(u32, Option<PathBuf>), String>,
    source_vm: MemSourceVm,
    source_mem: Arc<GuestMem>,
    snapshot: Snapshot,
}

fn migrate(
    scratch: &Path,
    disk_mib: u64,
    page_rate: u64,
    block_rate: u64,
    cfg: SourceConfig,
) -> Run {
    migrate_cancel(scratch, disk_mib, page_rate, block_rate, cfg, Cancel::new())
}

/// [`migrate`], with a cancel flag for the target side.
fn migrate_cancel(
    scratch: &Path,
    disk_mib: u64,
    page_rate: u64,
    block_rate: u64,
    cfg: SourceConfig,
    target_cancel: Cancel,
) -> Run {
    let t = InProcTransport::new();
    let key = Key::generate().unwrap();
    let image = scratch.join("source.img");
    make_image(&image, disk_mib);
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .unwrap(),
    );
    let spec = spec(16, disk_mib * MIB);
    let mem = Arc::new(GuestMem::create(&spec).unwrap());
    let mut vm = MemSourceVm::new(mem.clone(), page_rate, 7);
    vm.attach_disk(file.clone(), block_rate);
    let mut listener = t.listen("target").unwrap();
    let acceptor = Arc::new(Acceptor::new(key.clone()));
    let disk_dir = scratch.join("target");
    let target = std::thread::spawn(move || -> Result<(u32, Option<PathBuf>), String> {
        loop {
            let conn = listener
                .accept(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?
                .ok_or("no session")?;
            if let Some(session) = acceptor.admit(conn).map_err(|e| e.to_string())? {
                let metrics = Arc::new(Metrics::new("m1", "vm0", "target", "source"));
                let cfg = TargetConfig {
                    io_timeout: Duration::from_secs(5),
                    prefault: false,
                    disk_dir: Some(disk_dir),
                    cancel: target_cancel,
                    ..TargetConfig::default()
                };
                let log = Arc::new(Mutex::new(TargetLog::default()));
                let out = migrate_in(session, &cfg, metrics, |_, mem, disk| {
                    assert!(disk.is_some(), "the target VMM gets the new image");
                    Ok(MemTargetVm::new(mem, log))
                })
                .map_err(|e| e.to_string())?;
                return Ok((mem_crc(&out.mem), out.disk_path));
            }
        }
    });
    let metrics = Arc::new(Metrics::new("m1", "vm0", "source", "target"));
    let cfg = SourceConfig {
        disk: Some(DiskSource {
            file,
            fs_aware: false,
        }),
        ..cfg
    };
    let result = migrate_out(
        &t,
        "target",
        &key,
        &spec,
        7,
        mem.clone(),
        &mut vm,
        &cfg,
        metrics.clone(),
        &Cancel::new(),
    )
    .map(|o| o.epoch);
    Run {
        result,
        target: target.join().unwrap(),
        source_vm: vm,
        source_mem: mem,
        snapshot: metrics.snapshot(),
    }
}

fn cfg() -> SourceConfig {
    SourceConfig {
        streams: 3.try_into().unwrap(),
        io_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        ..SourceConfig::default()
    }
}

fn same_content(a: &Path, b: &Path) {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(a.len(), b.len(), "image sizes differ");
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("images differ first in block {}", i / 4096);
    }
}

#[test]
fn a_disk_being_written_moves_intact_and_stays_sparse() {
    let s = Scratch::new("written");
    let r = migrate(&s.0, 64, 4000, 2000, cfg());
    assert_eq!(r.result.as_ref().ok(), Some(&8), "{:?}", r.result);
    let (crc, path) = r.target.expect("the target runs the VM");
    assert_eq!(crc, mem_crc(&r.source_mem));
    assert!(!r.source_vm.running());
    let path = path.expect("the image got its final name");
    assert_eq!(path, s.0.join("target").join("vm0.img"));
    // The guest stopped at the pause: the source image is as it was then.
    same_content(&s.0.join("source.img"), &path);
    let d = r.snapshot.disk.clone().expect("disk stats");
    assert_eq!(d.selection, "extents");
    assert!(
        d.blocks_zero >= 256,
        "the zero extent went as zero entries: {d:?}"
    );
    assert!(
        d.resent_blocks > 0
            || r.snapshot
                .rounds
                .iter()
                .any(|x| x.disk_blocks > 0 && x.round >= 2),
        "{d:?}"
    );
    let (src, tgt) = (
        std::fs::metadata(s.0.join("source.img")).unwrap().blocks() * 512,
        std::fs::metadata(&path).unwrap().blocks() * 512,
    );
    assert!(
        tgt < src,
        "zero blocks stayed holes: target {tgt} bytes, source {src}"
    );
    // No partial file is left next to it.
    let names: Vec<_> = std::fs::read_dir(s.0.join("target"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn an_idle_disk_sends_only_its_allocated_blocks() {
    let s = Scratch::new("idle");
    let r = migrate(&s.0, 128, 1000, 0, cfg());
    assert!(r.result.is_ok(), "{:?}", r.result);
    let (_, path) = r.target.unwrap();
    same_content(&s.0.join("source.img"), &path.unwrap());
    let d = r.snapshot.disk.clone().unwrap();
    // 16 data extents + the zero extent, 256 blocks each.
    assert_eq!(d.allocated_blocks, 17 * 256, "{d:?}");
    assert_eq!(d.bulk_blocks, d.allocated_blocks);
    assert_eq!(
        d.blocks, d.allocated_blocks,
        "nothing dirty, nothing re-sent"
    );
    // Raw blocks plus a 16-byte entry each, plus frame headers.
    let payload = 16 * 256 * 4096;
    assert!(
        d.wire_bytes >= payload && d.wire_bytes < payload * 101 / 100,
        "{d:?}"
    );
}

#[test]
fn a_target_that_cannot_take_the_disk_leaves_the_vm_on_the_source() {
    let s = Scratch::new("refused");
    std::fs::create_dir_all(s.0.join("target")).unwrap();
    std::fs::write(s.0.join("target").join("vm0.img"), b"someone else's").unwrap();
    let r = migrate(&s.0, 32, 1000, 500, cfg());
    let e = r.result.expect_err("the target refuses");
    assert!(e.to_string().contains("already exists"), "{e}");
    assert!(r.source_vm.running(), "the VM runs on the source again");
    assert!(r.target.is_err());
    let names: Vec<_> = std::fs::read_dir(s.0.join("target"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "only the file that was there: {names:?}");
    assert_eq!(
        std::fs::read(s.0.join("target").join("vm0.img")).unwrap(),
        b"someone else's"
    );
}

#[test]
fn a_migration_that_fails_midway_removes_the_partial_image() {
    let s = Scratch::new("midway");
    let source = s.0.join("source.img");
    let cancel = Cancel::new();
    let c2 = cancel.clone();
    // 64 MiB of disk at 16 MiB/s: the target is cancelled while blocks flow.
    let partial_seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = partial_seen.clone();
    let dir = s.0.join("target");
    let watcher = std::thread::spawn(move || {
        for _ in 0..200 {
            std::thread::sleep(Duration::from_millis(10));
            let partial = std::fs::read_dir(&dir).ok().and_then(|rd| {
                rd.filter_map(|e| e.ok())
                    .find(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            });
            if partial.is_some() {
                seen.store(true, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(500));
                break;
            }
        }
        c2.cancel();
    });
    let cfg = SourceConfig {
        bandwidth_mib_s: Some(16),
        ..cfg()
    };
    let r = migrate_cancel(&s.0, 128, 1000, 500, cfg, cancel);
    watcher.join().unwrap();
    assert!(
        partial_seen.load(std::sync::atomic::Ordering::SeqCst),
        "the image was being written"
    );
    assert!(r.result.is_err(), "{:?}", r.result);
    assert!(r.source_vm.running(), "the VM runs on the source again");
    assert!(r.target.is_err());
    let left: Vec<_> = std::fs::read_dir(s.0.join("target"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "the partial image is gone: {left:?}");
    assert!(std::fs::metadata(&source).unwrap().len() == 128 * MIB);
}
