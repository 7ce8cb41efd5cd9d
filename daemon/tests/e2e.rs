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
    let o = from.ferry(&[
        "migrate",
        name,
        "--to",
        to.listen(),
        "--streams",
        "2",
        "--json",
    ]);
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
