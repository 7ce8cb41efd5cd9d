//! End to end: two real ferryds and the real ferry-vmm under KVM, over
//! loopback. Skips with a printed reason where /dev/kvm or the ferry-vmm
//! binary is missing. ferry-vmm is `$FERRY_VMM`, else the one next to the
//! ferryd under test (present after a workspace build).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Ferryd, Opts, TempDir};
use ferry_daemon::api::VmInfo;
use ferry_engine::{Snapshot, Status};

fn probe() -> Option<PathBuf> {
    common::kvm_vmm()
}

/// Kills processes on drop: the source VMM we start, and the target VMMs the
/// ferryds spawned (they outlive a stopped ferryd by design).
struct Reaper {
    children: Vec<Child>,
    pids: Vec<i32>,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for &pid in &self.pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Pids of the target VMMs `d` started, from its log.
fn spawned_pids(d: &Ferryd) -> Vec<i32> {
    d.log_text()
        .lines()
        .filter_map(|l| {
            l.split("started (pid ")
                .nth(1)?
                .split(',')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn vm(d: &Ferryd, name: &str) -> Option<VmInfo> {
    d.client().get(&format!("/api/v1/vms/{name}")).ok()
}

fn wait_vm(d: &Ferryd, name: &str, state: &str) -> VmInfo {
    let deadline = Instant::now() + common::DEADLINE;
    loop {
        if let Some(v) = vm(d, name).filter(|v| serde_json::to_value(v.state).unwrap() == state) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never {state}: {:?}\n{}",
            vm(d, name),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn migrate(from: &Ferryd, to: &Ferryd, name: &str) -> Snapshot {
    migrate_with(from, to, name, &[])
}

fn migrate_with(from: &Ferryd, to: &Ferryd, name: &str, extra: &[&str]) -> Snapshot {
    let mut args = vec![
        "migrate",
        name,
        "--to",
        to.listen(),
        "--streams",
        "2",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = from.ferry(&args);
    let snap: Snapshot = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", common::stderr(&o), from.log_text()));
    assert_eq!(
        snap.status,
        Status::Completed,
        "{snap:?}\n{}",
        to.log_text()
    );
    assert_eq!(o.status.code(), Some(0));
    snap
}

#[test]
fn migrates_there_and_back() {
    let Some(vmm) = probe() else { return };
    let keys = TempDir::new("e2e-key");
    let key = common::write_key(keys.path());
    let opts = || Opts {
        key: Some(key.clone()),
        vmm_command: Some(vmm.clone()),
        ..Opts::default()
    };
    let (a, b) = (Ferryd::start_with(opts()), Ferryd::start_with(opts()));
    let mut reaper = Reaper {
        children: Vec::new(),
        pids: Vec::new(),
    };
    let source = Command::new(&vmm)
        .arg("--link")
        .arg(&a.link_socket)
        .args(["--name", "e2e", "--mem-mib", "16", "--workload", "mixed"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(a.dir.path().join("source-vmm.log")).unwrap())
        .spawn()
        .expect("start ferry-vmm");
    reaper.children.push(source);
    wait_vm(&a, "e2e", "running");

    let there = migrate(&a, &b, "e2e");
    reaper.pids.extend(spawned_pids(&b));
    assert_eq!(there.epoch, 1);
    assert_eq!(wait_vm(&a, "e2e", "migrated-away").epoch, 1);
    let on_b = wait_vm(&b, "e2e", "running");
    assert_eq!(on_b.epoch, 1);

    let back = migrate(&b, &a, "e2e");
    reaper.pids.extend(spawned_pids(&a));
    assert_eq!(back.epoch, 2);
    let first = wait_vm(&a, "e2e", "running");
    assert_eq!(first.epoch, 2);
    assert_eq!(wait_vm(&b, "e2e", "migrated-away").epoch, 2);
    // The guest keeps running after two hops.
    std::thread::sleep(Duration::from_millis(300));
    let later = vm(&a, "e2e").unwrap();
    assert!(later.progress > first.progress, "{first:?} then {later:?}");
    let incoming: Vec<Snapshot> = a.client().get("/api/v1/migrations").unwrap();
    assert!(incoming
        .iter()
        .any(|s| s.role == "target" && s.status == Status::Completed));
}

/// Post-copy with the real VMM: its vCPU faults on guest memory behind a
/// userfaultfd, ferryd serves the faults; then back with hybrid, whose
/// capped pre-copy cannot keep up with the guest.
#[test]
fn postcopy_there_and_hybrid_back() {
    let Some(vmm) = probe() else { return };
    let keys = TempDir::new("e2e-key");
    let key = common::write_key(keys.path());
    let opts = || Opts {
        key: Some(key.clone()),
        vmm_command: Some(vmm.clone()),
        ..Opts::default()
    };
    let (a, b) = (Ferryd::start_with(opts()), Ferryd::start_with(opts()));
    let mut reaper = Reaper {
        children: Vec::new(),
        pids: Vec::new(),
    };
    let source = Command::new(&vmm)
        .arg("--link")
        .arg(&a.link_socket)
        .args(["--name", "pc", "--mem-mib", "64", "--workload", "dirty:64"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(a.dir.path().join("source-vmm.log")).unwrap())
        .spawn()
        .expect("start ferry-vmm");
    reaper.children.push(source);
    wait_vm(&a, "pc", "running");
    // Let the workload dirty memory before it moves.
    std::thread::sleep(Duration::from_millis(500));

    let there = migrate_with(&a, &b, "pc", &["--mode", "postcopy"]);
    reaper.pids.extend(spawned_pids(&b));
    let pc = there.postcopy.clone().expect("post-copy figures");
    assert_eq!(pc.switch_after_round, 0);
    assert!(pc.stale_pages > 0, "{pc:?}");
    let verify = there.verify.clone().expect("the target VMM's check");
    assert!(
        verify.checked && verify.pages_checked > 0 && verify.pages_bad == 0,
        "{verify:?}"
    );
    // The target side saw the guest's faults.
    let incoming: Vec<Snapshot> = b.client().get("/api/v1/migrations").unwrap();
    let t = incoming
        .iter()
        .find(|s| s.role == "target")
        .expect("target record");
    let tpc = t.postcopy.clone().expect("target post-copy figures");
    assert!(tpc.faults > 0, "{tpc:?}");
    assert_eq!(
        tpc.demand_pages + tpc.background_pages,
        tpc.stale_pages,
        "{tpc:?}"
    );
    let on_b = wait_vm(&b, "pc", "running");
    assert_eq!(on_b.epoch, 1);
    assert_eq!(wait_vm(&a, "pc", "migrated-away").epoch, 1);

    // XOR-delta off: its patches would let pre-copy of this guest converge
    // within the budget at 16 MiB/s, and the point here is the switch.
    let back = migrate_with(
        &b,
        &a,
        "pc",
        &[
            "--mode",
            "hybrid",
            "--bandwidth-mib-s",
            "16",
            "--xor-cache-mib",
            "0",
        ],
    );
    reaper.pids.extend(spawned_pids(&a));
    let pc = back
        .postcopy
        .clone()
        .unwrap_or_else(|| panic!("hybrid did not switch to post-copy: {:#?}", back.rounds));
    assert!(pc.switch_after_round >= 2, "{pc:?}");
    let verify = back.verify.clone().expect("the target VMM's check");
    assert!(
        verify.pages_checked > 0 && verify.pages_bad == 0,
        "{verify:?}"
    );
    let first = wait_vm(&a, "pc", "running");
    assert_eq!(first.epoch, 2);
    std::thread::sleep(Duration::from_millis(300));
    let later = vm(&a, "pc").unwrap();
    assert!(later.progress > first.progress, "{first:?} then {later:?}");
}

#[test]
fn shutdown_cancels_a_running_migration() {
    let Some(vmm) = probe() else { return };
    let keys = TempDir::new("e2e-key");
    let key = common::write_key(keys.path());
    let opts = || Opts {
        key: Some(key.clone()),
        vmm_command: Some(vmm.clone()),
        ..Opts::default()
    };
    let (mut a, b) = (Ferryd::start_with(opts()), Ferryd::start_with(opts()));
    let mut reaper = Reaper {
        children: Vec::new(),
        pids: Vec::new(),
    };
    let source = Command::new(&vmm)
        .arg("--link")
        .arg(&a.link_socket)
        .args(["--name", "slow", "--mem-mib", "64", "--workload", "mixed"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ferry-vmm");
    reaper.children.push(source);
    wait_vm(&a, "slow", "running");
    // 64 MiB at 5 MiB/s: still copying when the signal comes.
    let o = a.ferry(&[
        "migrate",
        "slow",
        "--to",
        b.listen(),
        "--bandwidth-mib-s",
        "5",
        "--detach",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let id = common::stdout(&o).trim().to_string();
    wait_vm(&b, "slow", "incoming");
    reaper.pids.extend(spawned_pids(&b));
    let status = a.stop().expect("ferryd stops");
    assert!(status.success());
    a.wait_log(&[&id, "cancelled", "keeps running here"]);
    b.wait_log(&["receiving VM slow", "failed"]);
    assert!(
        vm(&b, "slow").is_none(),
        "the target dropped the half-received VM"
    );
}
