//! The link protocol end to end: this test plays ferryd against two real
//! `ferry-vmm` processes (source, then a `--restore` target), moves memory
//! into a fresh memfd itself, and checks the target's verification against
//! the source's memory hash.

mod common;

use std::os::unix::net::UnixListener;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use ferry_engine::link::{DiskSpec, Link, LinkMsg, Role, VmSpec};
use ferry_engine::memory::{GuestMem, PageIndex};

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ferry-vmm"))
        .args(args)
        .spawn()
        .unwrap()
}

fn accept(l: &UnixListener) -> Link {
    let (s, _) = l.accept().unwrap();
    let link = Link::new(s);
    link.set_timeout(Some(Duration::from_secs(20))).unwrap();
    link
}

fn events(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn wait_exit(mut c: Child) -> i32 {
    let t0 = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "VMM did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn migrate_through_a_fake_ferryd() {
    if !common::kvm_or_skip("migrate_through_a_fake_ferryd") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ferry-vmm-link-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("link.sock");
    let (src_report, dst_report) = (dir.join("src.jsonl"), dir.join("dst.jsonl"));
    let listener = UnixListener::bind(&sock).unwrap();
    let sock_s = sock.to_str().unwrap();

    // Source registers with its memfd.
    let src = spawn(&[
        "--mem-mib",
        "64",
        "--workload",
        "dirty:32",
        "--link",
        sock_s,
        "--report",
        src_report.to_str().unwrap(),
    ]);
    let mut s = accept(&listener);
    let reg = s.recv().unwrap();
    let LinkMsg::Register {
        role: Role::Source,
        spec: Some(spec),
    } = reg.msg.clone()
    else {
        panic!("unexpected {:?}", reg.msg)
    };
    assert_eq!(reg.fds.len(), 1, "no disk: the memfd alone");
    assert_eq!(spec.disk, None);
    assert_eq!(spec.vmm_config["workload"], "dirty:32");
    s.send(
        &LinkMsg::Registered {
            vm_id: "vm-1".into(),
            spec: None,
        },
        &[],
        &[],
    )
    .unwrap();
    let src_mem = GuestMem::from_memfd(reg.fds.into_iter().next().unwrap(), &spec.regions).unwrap();

    // Pre-copy-ish: dirty logging, a few syncs, stats, a bad request.
    assert_eq!(
        s.call(&LinkMsg::StartDirtyLog, &[]).unwrap().msg,
        LinkMsg::Ok
    );
    std::thread::sleep(Duration::from_millis(200));
    let r = s.call(&LinkMsg::SyncDirtyLog, &[]).unwrap();
    assert_eq!(r.msg, LinkMsg::DirtyLog);
    assert_eq!(r.bin.len() as u64, spec.mem_bytes() / 4096 / 8);
    assert!(
        r.bin.iter().any(|&b| b != 0),
        "the running guest dirtied nothing"
    );
    let LinkMsg::Stats(st) = s.call(&LinkMsg::GetStats, &[]).unwrap().msg else {
        panic!()
    };
    assert!(st.running && st.progress > 0);
    assert_eq!(st.throttle_pct, 0);
    assert!(
        s.call(&LinkMsg::Ok, &[]).is_err(),
        "a reply is not a request"
    );
    let e = s.call(&LinkMsg::SyncDiskLog, &[]).unwrap_err();
    assert!(e.to_string().contains("no disk"), "{e}");

    // Auto-converge: throttle the source; out-of-range values are refused.
    assert_eq!(
        s.call(&LinkMsg::Throttle { percent: 50 }, &[]).unwrap().msg,
        LinkMsg::Ok
    );
    let e = s
        .call(&LinkMsg::Throttle { percent: 100 }, &[])
        .unwrap_err();
    assert!(e.to_string().contains("100%"), "{e}");
    let LinkMsg::Stats(st) = s.call(&LinkMsg::GetStats, &[]).unwrap().msg else {
        panic!()
    };
    assert_eq!(st.throttle_pct, 50);

    // Pause: state blob; the source hashes memory in the background.
    let paused = s.call(&LinkMsg::Pause, &[]).unwrap();
    let LinkMsg::Paused { progress } = paused.msg else {
        panic!("{:?}", paused.msg)
    };
    let blob = paused.bin;

    // "Migrate" the memory into a fresh memfd, as ferryd would on the target.
    let dst_mem = GuestMem::create(&spec).unwrap();
    let mut buf = vec![0u8; 4096];
    for p in 0..src_mem.pages() {
        src_mem.page(PageIndex(p)).unwrap().copy_to(&mut buf[..]);
        dst_mem.page(PageIndex(p)).unwrap().copy_from(&buf[..]);
    }

    // Target: registers with its token, gets the spec and the memfd.
    let dst = spawn(&[
        "--restore",
        "--link",
        sock_s,
        "--token",
        "t0k3n",
        "--report",
        dst_report.to_str().unwrap(),
    ]);
    let mut t = accept(&listener);
    let reg = t.recv().unwrap();
    assert_eq!(
        reg.msg,
        LinkMsg::Register {
            role: Role::Target {
                token: "t0k3n".into()
            },
            spec: None
        }
    );
    let msg = LinkMsg::Registered {
        vm_id: "vm-1".into(),
        spec: Some(VmSpec { ..spec.clone() }),
    };
    t.send(&msg, &[], &[dst_mem.memfd_raw()]).unwrap();
    assert!(
        t.call(&LinkMsg::Run, &[]).is_err(),
        "Run before Restore is refused"
    );
    assert!(
        t.call(&LinkMsg::Restore, b"FVMS-garbage").is_err(),
        "a bad blob is refused"
    );
    let LinkMsg::Restored { verify } = t.call(&LinkMsg::Restore, &blob).unwrap().msg else {
        panic!()
    };
    assert!(verify.checked);
    assert_eq!(verify.pages_bad, 0);
    assert!(verify.pages_checked > 15000);

    // Hand-off: quit the source; its report holds the hash taken at pause.
    let r = s
        .call(
            &LinkMsg::Quit {
                reason: "migrated".into(),
            },
            &[],
        )
        .unwrap();
    assert_eq!(r.msg, LinkMsg::Ok);
    assert_eq!(wait_exit(src), 0);
    let ev = events(&src_report);
    let kinds: Vec<&str> = ev.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["registered", "throttled", "paused", "quit"]);
    assert_eq!(ev[1]["percent"], 50);
    assert_eq!(
        ev[2]["mem_hash"],
        verify.mem_hash.as_str(),
        "target memory differs from the source's"
    );
    assert_eq!(ev[2]["progress"], progress);
    assert_eq!(ev[2]["disk_hash"], "", "no disk, no disk hash");
    assert_eq!((verify.disk_hash.as_str(), verify.blocks_checked), ("", 0));

    // The target runs and can be migrated again on the same link.
    assert_eq!(t.call(&LinkMsg::Run, &[]).unwrap().msg, LinkMsg::Ok);
    let t0 = Instant::now();
    loop {
        let LinkMsg::Stats(st) = t.call(&LinkMsg::GetStats, &[]).unwrap().msg else {
            panic!()
        };
        assert!(st.running, "target not running: {st:?}");
        if st.progress > progress + 10 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "target makes no progress"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let LinkMsg::Stats(st) = t.call(&LinkMsg::GetStats, &[]).unwrap().msg else {
        panic!()
    };
    assert_eq!(st.throttle_pct, 0, "the throttle does not migrate");
    assert_eq!(
        t.call(&LinkMsg::StartDirtyLog, &[]).unwrap().msg,
        LinkMsg::Ok
    );
    assert_eq!(
        t.call(&LinkMsg::Throttle { percent: 60 }, &[]).unwrap().msg,
        LinkMsg::Ok
    );
    assert_eq!(
        t.call(&LinkMsg::SyncDirtyLog, &[]).unwrap().msg,
        LinkMsg::DirtyLog
    );
    let LinkMsg::Paused { progress: p2 } = t.call(&LinkMsg::Pause, &[]).unwrap().msg else {
        panic!()
    };
    assert!(p2 > progress);
    assert_eq!(t.call(&LinkMsg::Resume, &[]).unwrap().msg, LinkMsg::Ok);
    let LinkMsg::Stats(st) = t.call(&LinkMsg::GetStats, &[]).unwrap().msg else {
        panic!()
    };
    assert_eq!(st.throttle_pct, 0, "Resume ends the throttle");
    assert!(st.running);
    assert_eq!(
        t.call(
            &LinkMsg::Quit {
                reason: "done".into()
            },
            &[]
        )
        .unwrap()
        .msg,
        LinkMsg::Ok
    );
    assert_eq!(wait_exit(dst), 0);
    let kinds: Vec<String> = events(&dst_report)
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        kinds,
        [
            "registered",
            "restored",
            "running",
            "throttled",
            "paused",
            "resumed",
            "quit"
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Copies `bytes` from `from` to `to` in 1 MiB chunks, skipping zero
/// chunks (the target image starts sparse), as ferryd's disk copy would.
fn copy_image(from: &std::fs::File, to: &std::fs::File, bytes: u64) {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..bytes).step_by(buf.len()) {
        from.read_exact_at(&mut buf, off).unwrap();
        if buf.iter().any(|&b| b != 0) {
            to.write_all_at(&buf, off).unwrap();
        }
    }
}

/// A VM with a disk: the image's descriptor rides with Register, the disk
/// log reports the guest's writes, the target gets its image with
/// Registered and verifies it against the guest's table after Restore.
#[test]
fn migrate_a_vm_with_a_disk_through_a_fake_ferryd() {
    if !common::kvm_or_skip("migrate_a_vm_with_a_disk_through_a_fake_ferryd") {
        return;
    }
    use std::os::unix::fs::MetadataExt;

    let dir = std::env::temp_dir().join(format!("ferry-vmm-disk-link-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("link.sock");
    let (src_report, dst_report) = (dir.join("src.jsonl"), dir.join("dst.jsonl"));
    let (src_img, dst_img) = (dir.join("src.img"), dir.join("dst.img"));
    let disk_bytes: u64 = 16 << 20;
    std::fs::File::create(&src_img)
        .unwrap()
        .set_len(disk_bytes)
        .unwrap();
    let listener = UnixListener::bind(&sock).unwrap();
    let sock_s = sock.to_str().unwrap();

    let src = spawn(&[
        "--mem-mib",
        "32",
        "--workload",
        "dirty:8+disk:20",
        "--disk",
        src_img.to_str().unwrap(),
        "--disk-write-from-mib",
        "2",
        "--link",
        sock_s,
        "--report",
        src_report.to_str().unwrap(),
    ]);
    let mut s = accept(&listener);
    let reg = s.recv().unwrap();
    let LinkMsg::Register {
        role: Role::Source,
        spec: Some(spec),
    } = reg.msg.clone()
    else {
        panic!("unexpected {:?}", reg.msg)
    };
    assert_eq!(spec.disk, Some(DiskSpec { bytes: disk_bytes }));
    assert_eq!(spec.vmm_config["disk"]["window_first_block"], 512);
    assert_eq!(reg.fds.len(), 2, "the memfd and the image");
    let mut fds = reg.fds.into_iter();
    let memfd = fds.next().unwrap();
    let src_disk = std::fs::File::from(fds.next().unwrap());
    let (a, b) = (
        src_disk.metadata().unwrap(),
        std::fs::metadata(&src_img).unwrap(),
    );
    assert_eq!(
        (a.dev(), a.ino()),
        (b.dev(), b.ino()),
        "the second fd is the image"
    );
    s.send(
        &LinkMsg::Registered {
            vm_id: "vm-d".into(),
            spec: None,
        },
        &[],
        &[],
    )
    .unwrap();
    let src_mem = GuestMem::from_memfd(memfd, &spec.regions).unwrap();

    // Logging: the disk log fills while the guest writes; bits only in the window.
    let e = s.call(&LinkMsg::SyncDiskLog, &[]).unwrap_err();
    assert!(e.to_string().contains("logging is off"), "{e}");
    assert_eq!(
        s.call(&LinkMsg::StartDirtyLog, &[]).unwrap().msg,
        LinkMsg::Ok
    );
    std::thread::sleep(Duration::from_millis(300));
    let r = s.call(&LinkMsg::SyncDiskLog, &[]).unwrap();
    assert_eq!(r.msg, LinkMsg::DirtyLog);
    assert_eq!(r.bin.len() as u64, disk_bytes / 4096 / 8);
    let bits = |bin: &[u8]| -> Vec<u64> {
        (0..bin.len() as u64 * 8)
            .filter(|&i| bin[(i / 8) as usize] >> (i % 8) & 1 == 1)
            .collect()
    };
    let logged = bits(&r.bin);
    assert!(
        logged.len() > 200,
        "{} blocks logged in 300 ms",
        logged.len()
    );
    assert!(
        logged.iter().all(|&b| b >= 512),
        "a write before the window"
    );

    // Pause; the last syncs; "ferryd" copies memory and the image.
    let paused = s.call(&LinkMsg::Pause, &[]).unwrap();
    let LinkMsg::Paused { .. } = paused.msg else {
        panic!("{:?}", paused.msg)
    };
    let blob = paused.bin;
    s.call(&LinkMsg::SyncDirtyLog, &[]).unwrap();
    s.call(&LinkMsg::SyncDiskLog, &[]).unwrap();
    let r = s.call(&LinkMsg::SyncDiskLog, &[]).unwrap();
    assert!(bits(&r.bin).is_empty(), "a paused guest writes no blocks");
    assert_eq!(
        s.call(&LinkMsg::StopDirtyLog, &[]).unwrap().msg,
        LinkMsg::Ok
    );
    let dst_mem = GuestMem::create(&spec).unwrap();
    let mut buf = vec![0u8; 4096];
    for p in 0..src_mem.pages() {
        src_mem.page(PageIndex(p)).unwrap().copy_to(&mut buf[..]);
        dst_mem.page(PageIndex(p)).unwrap().copy_from(&buf[..]);
    }
    let dst_disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&dst_img)
        .unwrap();
    dst_disk.set_len(disk_bytes).unwrap();
    copy_image(&src_disk, &dst_disk, disk_bytes);

    // A target whose Registered lacks the image refuses to start.
    let bad = spawn(&["--restore", "--link", sock_s, "--token", "no-disk"]);
    let mut t = accept(&listener);
    t.recv().unwrap();
    let msg = LinkMsg::Registered {
        vm_id: "vm-d".into(),
        spec: Some(spec.clone()),
    };
    t.send(&msg, &[], &[dst_mem.memfd_raw()]).unwrap();
    assert_ne!(wait_exit(bad), 0, "a target without its image must fail");

    // The real target: memfd and image.
    let dst = spawn(&[
        "--restore",
        "--link",
        sock_s,
        "--token",
        "t0k3n",
        "--report",
        dst_report.to_str().unwrap(),
    ]);
    let mut t = accept(&listener);
    t.recv().unwrap();
    t.send(&msg, &[], &[dst_mem.memfd_raw(), dst_disk.as_raw_fd()])
        .unwrap();
    let LinkMsg::Restored { verify } = t.call(&LinkMsg::Restore, &blob).unwrap().msg else {
        panic!()
    };
    assert!(verify.checked);
    assert_eq!((verify.pages_bad, verify.blocks_bad), (0, 0));
    assert!(verify.blocks_checked > 500, "{verify:?}");

    // The source's hashes at pause match the target's at restore.
    s.call(
        &LinkMsg::Quit {
            reason: "migrated".into(),
        },
        &[],
    )
    .unwrap();
    assert_eq!(wait_exit(src), 0);
    let ev = events(&src_report);
    let paused = ev.iter().find(|e| e["event"] == "paused").unwrap();
    assert_eq!(paused["mem_hash"], verify.mem_hash.as_str());
    assert_eq!(paused["disk_hash"], verify.disk_hash.as_str());
    assert_eq!(verify.disk_hash.len(), 16);
    assert!(paused["blocks_written"].as_u64().unwrap() >= verify.blocks_checked);
    let restored = events(&dst_report)
        .into_iter()
        .find(|e| e["event"] == "restored")
        .unwrap();
    assert_eq!(restored["disk_hash"], verify.disk_hash.as_str());
    assert_eq!(restored["blocks_checked"], verify.blocks_checked);

    // The target runs and writes its own image, and logs it.
    let before = std::fs::read(&dst_img).unwrap();
    assert_eq!(t.call(&LinkMsg::Run, &[]).unwrap().msg, LinkMsg::Ok);
    assert_eq!(
        t.call(&LinkMsg::StartDirtyLog, &[]).unwrap().msg,
        LinkMsg::Ok
    );
    std::thread::sleep(Duration::from_millis(300));
    let r = t.call(&LinkMsg::SyncDiskLog, &[]).unwrap();
    assert!(!bits(&r.bin).is_empty(), "the target guest writes its disk");
    let LinkMsg::Stats(st) = t.call(&LinkMsg::GetStats, &[]).unwrap().msg else {
        panic!()
    };
    assert!(st.running, "{st:?}");
    assert_ne!(std::fs::read(&dst_img).unwrap(), before);
    t.call(
        &LinkMsg::Quit {
            reason: "done".into(),
        },
        &[],
    )
    .unwrap();
    assert_eq!(wait_exit(dst), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// ferryd dies while a request is served: the reply cannot be sent (here
/// ferryd shut its side for reading, so the send fails with EPIPE every
/// time). The VMM treats that as a closed link, keeps its guest, and
/// registers it again with the ferryd that comes back, in the state the
/// lost request left it. (Before, the failed send ended the VMM, and the
/// guest with it.)
#[test]
fn a_reply_lost_to_a_dead_ferryd_is_a_closed_link_not_the_end() {
    if !common::kvm_or_skip("a_reply_lost_to_a_dead_ferryd_is_a_closed_link_not_the_end") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ferry-vmm-lost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("link.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut vmm = spawn(&[
        "--mem-mib",
        "16",
        "--workload",
        "dirty:8",
        "--link",
        sock.to_str().unwrap(),
        "--reattach-s",
        "20",
    ]);
    // Registers (first as a source, then again), is confirmed, and gets
    // `request`, whose reply it cannot send.
    listener.set_nonblocking(true).unwrap();
    let mut lose_reply_to = |request: LinkMsg| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(status) = vmm.try_wait().unwrap() {
                        panic!("the VMM exited ({status}) instead of registering again");
                    }
                    assert!(Instant::now() < deadline, "the VMM never registered");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        let reader = stream.try_clone().unwrap();
        let mut s = Link::new(stream);
        s.set_timeout(Some(Duration::from_secs(20))).unwrap();
        let reg = s.recv().unwrap();
        let registered = LinkMsg::Registered {
            vm_id: "vm-1".into(),
            spec: None,
        };
        s.send(&registered, &[], &[]).unwrap();
        reader.shutdown(std::net::Shutdown::Read).unwrap();
        s.send(&request, &[], &[]).unwrap();
        reg.msg
    };
    let first = lose_reply_to(LinkMsg::StartDirtyLog);
    assert!(
        matches!(
            first,
            LinkMsg::Register {
                role: Role::Source,
                ..
            }
        ),
        "{first:?}"
    );
    let second = lose_reply_to(LinkMsg::Pause);
    assert!(
        matches!(
            second,
            LinkMsg::Register {
                role: Role::Reattach { paused: false, .. },
                ..
            }
        ),
        "the VMM lives on, its guest running: {second:?}"
    );
    let third = lose_reply_to(LinkMsg::Resume);
    assert!(
        matches!(
            third,
            LinkMsg::Register {
                role: Role::Reattach { paused: true, .. },
                ..
            }
        ),
        "the lost pause paused the guest: {third:?}"
    );
    assert!(vmm.try_wait().unwrap().is_none(), "the VMM exited");
    let _ = vmm.kill();
    let _ = vmm.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}
