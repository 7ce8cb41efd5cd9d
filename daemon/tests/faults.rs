//! Fault injection end to end: two real ferryds on loopback with a shared
//! key, a real ferry-vmm guest under KVM, and faults from outside: kill -9 of
//! the target ferryd or of the VMM it spawned, a cancel, a cut link
//! (nftables), hostile connections on the target's data port, a peer without
//! the key.
//!
//! After every fault the test checks, without asking the migration code, that
//! the VM still runs on exactly one host:
//!
//! ```text
//!  source: its ferry-vmm process lives, `ferry vm list` shows it running,
//!          and its guest's progress counter advances over ~1 s
//!  target: no live process names the target's link socket (so no ferry-vmm
//!          it spawned is left, stopped or not), the ones it spawned are
//!          reaped, and its `ferry vm list` holds no such VM
//! ```
//!
//! Timing comes from states, never from sleeps: a pre-copy that cannot end
//! (`--downtime-ms 1` never fits: the estimate includes a 5 ms switchover
//! cost) holds the source in `active`; a target VMM stopped with SIGSTOP once
//! registered holds the source in `committing` (paused guest, PREPARE sent,
//! waiting for PREPARED); a target VMM command that sleeps 2 s before exec
//! holds the source in `setup`.
//!
//! Skips with a printed reason when /dev/kvm or ferry-vmm is missing (and the
//! link-cut test when `nft` or 127.0.0.2 is unusable).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Ferryd, Opts, TempDir};
use ferry_daemon::api::{VmInfo, VmState};
use ferry_engine::source::SourceConfig;
use ferry_engine::wire::handshake::{self, Hello};
use ferry_engine::wire::{frame_crc, FrameHeader, FrameKind, WireError, HEADER_BYTES};
use ferry_engine::{Key, Snapshot, Status};
use ferry_transport::tcp::TcpTransport;
use ferry_transport::Transport;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The VM's name on both hosts.
const VM: &str = "guest";
/// Pre-copy that stays `active` until cancelled or broken: the guest dirties
/// 32 MiB/s, the link is capped at 16 MiB/s, and no estimate fits 1 ms.
const ENDLESS: &[&str] = &[
    "--bandwidth-mib-s",
    "16",
    "--downtime-ms",
    "1",
    "--rounds-max",
    "1000",
    "--time-max-s",
    "120",
];
const ENDLESS_WORKLOAD: &str = "dirty:32";
/// Pre-copy that converges after ~2 s: ~50 MiB of non-zero pages at 24 MiB/s,
/// then an idle guest.
const CONVERGING: &[&str] = &["--bandwidth-mib-s", "24"];
const CONVERGING_WORKLOAD: &str = "mixed";
/// How often state is polled: transitions are caught within a few ms.
const POLL: Duration = Duration::from_millis(5);

fn probe() -> Option<PathBuf> {
    common::kvm_vmm()
}

// ---------------------------------------------------------------- processes

/// Live (not zombie) processes whose command line contains `needle`.
fn procs_with(needle: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
                && proc_stat(pid).is_some_and(|(state, _)| state != 'Z')
        })
        .collect()
}

/// State letter and parent pid from /proc/PID/stat (None once reaped).
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold spaces and parentheses.
    let mut rest = s.rsplit_once(')')?.1.split_whitespace();
    let state = rest.next()?.chars().next()?;
    Some((state, rest.next()?.parse().ok()?))
}

fn signal(pid: i32, sig: Signal) {
    kill(Pid::from_raw(pid), sig).unwrap_or_else(|e| panic!("{sig} to {pid}: {e}"));
}

/// Polls `f` until it returns `Some`, or panics with `what()` past `limit`.
fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>, what: impl Fn() -> String) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {}", what());
        std::thread::sleep(POLL);
    }
}

/// Kills on drop, even when a test fails: the source VMM, and every process
/// whose command line names one of the pair's link sockets (the target VMMs
/// ferryd spawned: stopped, orphaned or not).
struct Guard {
    source: Option<Child>,
    needles: Vec<String>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for needle in &self.needles {
            for pid in procs_with(needle) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if let Some(c) = &mut self.source {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether the link-fault tests can run: a target on 127.0.0.2 and
/// nftables rules of both kinds (prints why not, and the test skips).
fn nft_on_127_0_0_2() -> bool {
    if let Err(e) = std::net::TcpListener::bind("127.0.0.2:0") {
        eprintln!("SKIP: cannot bind 127.0.0.2: {e}");
        return false;
    }
    let probe_dir = TempDir::new("faults-nft");
    for rule in [NftTable::drop_to, NftTable::reset_to] {
        if let Err(e) = rule("127.0.0.2:9", probe_dir.path()) {
            eprintln!("SKIP: nftables unusable here: {e}");
            return false;
        }
    }
    true
}

/// Deletes an nftables table on drop.
struct NftTable(String);

impl NftTable {
    /// Drops every packet to `addr` (`127.0.0.2:port`) at input: to the
    /// sender it looks like a dead link, not a refused one.
    fn drop_to(addr: &str, dir: &Path) -> Result<Self, String> {
        Self::add(addr, dir, "drop")
    }

    /// Drops every packet to and from `addr`: a partition, both ways.
    fn partition(addr: &str, dir: &Path) -> Result<Self, String> {
        let (ip, port) = addr.rsplit_once(':').ok_or("no port")?;
        Self::add(
            addr,
            dir,
            &format!("drop\n  ip saddr {ip} tcp sport {port} drop"),
        )
    }

    /// Answers every packet to `addr` with a TCP reset: established
    /// connections break at once, new ones are refused.
    fn reset_to(addr: &str, dir: &Path) -> Result<Self, String> {
        Self::add(addr, dir, "reject with tcp reset")
    }

    /// A table whose input chain applies `verdict` to TCP packets to `addr`.
    fn add(addr: &str, dir: &Path, verdict: &str) -> Result<Self, String> {
        let (ip, port) = addr.rsplit_once(':').ok_or("no port")?;
        let name = format!("ferry_faults_{}", ferry_daemon::util::random_hex(6));
        let rules = format!(
            "table inet {name} {{\n chain input {{\n  type filter hook input priority -100; policy accept;\n  \
             ip daddr {ip} tcp dport {port} {verdict}\n }}\n}}\n"
        );
        let file = dir.join(format!("{name}.nft"));
        std::fs::write(&file, rules).map_err(|e| e.to_string())?;
        let o = Command::new("nft")
            .arg("-f")
            .arg(&file)
            .output()
            .map_err(|e| format!("cannot run nft: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "nft -f failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Ok(NftTable(name))
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

// -------------------------------------------------------------------- world

/// What a test needs besides the defaults.
#[derive(Default)]
struct Setup {
    mem_mib: u64,
    workload: &'static str,
    /// The target ferryd's `--listen` (default 127.0.0.1:0).
    target_listen: Option<String>,
    /// The target VMM command sleeps this long before exec'ing ferry-vmm.
    target_vmm_delay_s: Option<u32>,
    /// The source ferryd gets a key of its own instead of the shared one.
    source_wrong_key: bool,
    /// Environment of the target ferryd's first start (test hooks).
    target_env: Vec<(String, String)>,
}

/// Two ferryds and a guest registered with the source one. Fields drop in
/// order: the guard first, so no VMM outlives a failed test.
struct World {
    guard: Guard,
    src: Ferryd,
    dst: Ferryd,
    dir: TempDir,
    key: PathBuf,
    started: Instant,
}

impl World {
    fn start(vmm: &Path, s: Setup) -> World {
        let started = Instant::now();
        let dir = TempDir::new("faults");
        let key = common::write_key(dir.path());
        let report = dir.path().join("target-report.jsonl");
        let mut dst_args = Vec::new();
        let dst_vmm = match s.target_vmm_delay_s {
            Some(secs) => {
                dst_args.extend([
                    "--vmm-arg".to_string(),
                    "-c".into(),
                    "--vmm-arg".into(),
                    format!("sleep {secs}; exec \"$0\" \"$@\""),
                    "--vmm-arg".into(),
                    vmm.display().to_string(),
                ]);
                PathBuf::from("/bin/sh")
            }
            None => vmm.to_path_buf(),
        };
        dst_args.extend([
            "--vmm-arg".to_string(),
            "--report".into(),
            "--vmm-arg".into(),
            report.display().to_string(),
        ]);
        let dst = Ferryd::start_with(Opts {
            key: Some(key.clone()),
            vmm_command: Some(dst_vmm),
            args: dst_args,
            listen: s.target_listen,
            env: s.target_env,
        });
        let src = Ferryd::start_with(Opts {
            key: (!s.source_wrong_key).then(|| key.clone()),
            vmm_command: Some(vmm.to_path_buf()),
            ..Opts::default()
        });
        let needles = [&dst.link_socket, &src.link_socket]
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let mut w = World {
            guard: Guard {
                source: None,
                needles,
            },
            src,
            dst,
            dir,
            key,
            started,
        };
        let child = Command::new(vmm)
            .arg("--link")
            .arg(&w.src.link_socket)
            .args(["--name", VM, "--mem-mib", &s.mem_mib.to_string()])
            .args(["--workload", s.workload])
            .arg("--report")
            .arg(w.dir.path().join("source-report.jsonl"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(w.dir.path().join("source-vmm.log")).expect("log"))
            .spawn()
            .expect("start ferry-vmm");
        w.guard.source = Some(child);
        wait_for(
            common::DEADLINE,
            || vm(&w.src, VM).filter(|v| v.state == VmState::Running),
            || format!("{VM} never registered; source log:\n{}", w.src.log_text()),
        );
        w
    }

    /// `ferry migrate VM --to dst --streams 2 --detach extra...`; the id.
    fn migrate(&self, extra: &[&str]) -> String {
        let mut args = vec![
            "migrate",
            VM,
            "--to",
            self.dst.listen(),
            "--streams",
            "2",
            "--detach",
        ];
        args.extend_from_slice(extra);
        let o = self.src.ferry(&args);
        assert!(o.status.success(), "{}", common::stderr(&o));
        common::stdout(&o).trim().to_string()
    }

    /// Waits until the source's migration `id` satisfies `ok`.
    fn wait_source(&self, id: &str, what: &str, ok: impl Fn(&Snapshot) -> bool) -> Snapshot {
        self.wait_source_for(id, what, common::DEADLINE, ok)
    }

    fn wait_source_for(
        &self,
        id: &str,
        what: &str,
        limit: Duration,
        ok: impl Fn(&Snapshot) -> bool,
    ) -> Snapshot {
        wait_for(
            limit,
            || snapshot(&self.src, id).filter(|s| ok(s)),
            || {
                format!(
                    "migration {id} never {what}: {:?}\nsource log:\n{}\ntarget log:\n{}",
                    snapshot(&self.src, id),
                    self.src.log_text(),
                    self.dst.log_text()
                )
            },
        )
    }

    /// Waits for the target's side of the migration to be `active` (the
    /// target VMM registered and SPEC_ACK went out); returns the live
    /// processes it spawned.
    fn wait_target_active(&self) -> Vec<i32> {
        wait_for(
            common::DEADLINE,
            || incoming(&self.dst).filter(|s| s.status == Status::Active),
            || format!("target never active; log:\n{}", self.dst.log_text()),
        );
        let pids = self.target_vmms();
        assert_eq!(pids.len(), 1, "one target VMM: {pids:?}");
        pids
    }

    /// Live processes naming the target's link socket: the VMMs it spawned.
    fn target_vmms(&self) -> Vec<i32> {
        procs_with(&self.dst.link_socket.display().to_string())
    }

    fn source_vmm_alive(&mut self) -> bool {
        let c = self.guard.source.as_mut().expect("source VMM started");
        c.try_wait().expect("wait").is_none()
    }

    /// The VM runs on the source, by three witnesses that are not the
    /// migration code: its VMM process, `ferry vm list`, its progress counter.
    fn assert_runs_on_source(&mut self) {
        assert!(self.source_vmm_alive(), "the source VMM died");
        // The migration's end shows a moment before its VM is back.
        wait_for(
            common::DEADLINE,
            || vm(&self.src, VM).filter(|v| v.state == VmState::Running),
            || {
                format!(
                    "{VM} is not running on the source: {:?}",
                    vm_list(&self.src)
                )
            },
        );
        assert_progresses(&self.src);
        assert!(self.source_vmm_alive(), "the source VMM died");
    }

    /// The target holds no VM: no live process it spawned is left, the ones
    /// it spawned (`spawned`) were reaped if it still runs, and its VM list
    /// has no such VM.
    fn assert_target_clean(&self, spawned: &[i32]) {
        wait_for(
            common::DEADLINE,
            || self.target_vmms().is_empty().then_some(()),
            || format!("target VMMs left: {:?}", self.target_vmms()),
        );
        let Some(ferryd) = self.dst.pid() else {
            return; // killed: its orphans are init's to reap
        };
        for &pid in spawned {
            wait_for(
                common::DEADLINE,
                || (proc_stat(pid).map(|(_, ppid)| ppid) != Some(ferryd)).then_some(()),
                || format!("target VMM {pid} is not reaped: {:?}", proc_stat(pid)),
            );
        }
        wait_for(
            common::DEADLINE,
            || {
                vm_list(&self.dst)
                    .iter()
                    .all(|v| v.name != VM)
                    .then_some(())
            },
            || format!("the target still lists {VM}: {:?}", vm_list(&self.dst)),
        );
        let s = incoming(&self.dst).expect("the target saw the migration");
        assert!(
            matches!(s.status, Status::Failed | Status::Cancelled),
            "{s:?}"
        );
    }

    fn report(&self, which: &str, event: &str) -> serde_json::Value {
        let path = self.dir.path().join(format!("{which}-report.jsonl"));
        wait_for(
            common::DEADLINE,
            || {
                let text = std::fs::read_to_string(&path).ok()?;
                text.lines()
                    .rev()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .find(|v| v["event"] == event)
            },
            || format!("no {event:?} event in {}", path.display()),
        )
    }

    /// Pause and resume events in the source VMM's own report, in order.
    /// (It writes "paused", with the memory hash, when it resumes or quits.)
    fn source_pauses(&self) -> Vec<String> {
        let path = self.dir.path().join("source-report.jsonl");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["event"].as_str().map(String::from))
            .filter(|e| e == "paused" || e == "resumed")
            .collect()
    }

    /// The source VMM says it paused (the switchover) and resumed.
    fn assert_paused_then_resumed(&self) {
        self.report("source", "resumed");
        assert_eq!(self.source_pauses(), ["paused", "resumed"]);
    }

    /// The source VMM says its guest was never paused.
    fn assert_never_paused(&self) {
        assert_eq!(self.source_pauses(), Vec::<String>::new());
    }

    fn done(&self, test: &str) {
        eprintln!("{test}: {:.1} s", self.started.elapsed().as_secs_f64());
    }
}

fn snapshot(d: &Ferryd, id: &str) -> Option<Snapshot> {
    d.client().get(&format!("/api/v1/migrations/{id}")).ok()
}

/// The target side of the (only) incoming migration.
fn incoming(d: &Ferryd) -> Option<Snapshot> {
    let all: Vec<Snapshot> = d.client().get("/api/v1/migrations").ok()?;
    all.into_iter().find(|s| s.role == "target")
}

fn vm(d: &Ferryd, name: &str) -> Option<VmInfo> {
    d.client().get(&format!("/api/v1/vms/{name}")).ok()
}

/// `ferry vm list --json`.
fn vm_list(d: &Ferryd) -> Vec<VmInfo> {
    let o = d.ferry(&["vm", "list", "--json"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    serde_json::from_slice(&o.stdout).expect("vm list JSON")
}

/// The guest's progress counter (null while ferryd talks to the VMM).
fn progress(d: &Ferryd) -> u64 {
    wait_for(
        common::DEADLINE,
        || vm(d, VM)?.progress,
        || format!("no progress for {VM}: {:?}", vm(d, VM)),
    )
}

fn assert_progresses(d: &Ferryd) {
    let before = progress(d);
    std::thread::sleep(Duration::from_secs(1));
    let after = progress(d);
    assert!(after > before, "the guest is stuck at {before} -> {after}");
}

fn running(s: &Snapshot) -> bool {
    !s.status.is_final() && s.status != Status::Unknown
}

// -------------------------------------------------------------------- tests

/// kill -9 of the target ferryd in pre-copy: the source sees its streams
/// break and resumes; the orphaned target VMM exits on its link's EOF.
#[test]
fn target_ferryd_killed_during_precopy() {
    let Some(vmm) = probe() else { return };
    let mut w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: ENDLESS_WORKLOAD,
            ..Setup::default()
        },
    );
    let id = w.migrate(ENDLESS);
    w.wait_source(&id, "copied pages", |s| {
        s.status == Status::Active && s.guest_bytes > 0
    });
    let spawned = w.wait_target_active();
    w.dst.kill9();
    let s = w.wait_source(&id, "failed", |s| s.status == Status::Failed);
    eprintln!("source: {:?}", s.error);
    assert_eq!(s.epoch, 0, "no hand-off was recorded");
    w.src.wait_log(&[&id, "keeps running here"]);
    w.assert_runs_on_source();
    w.assert_target_clean(&spawned);
    w.assert_never_paused();
    w.done("target_ferryd_killed_during_precopy");
}

/// Post-copy flags for the take-back tests: a capped push keeps post-copy
/// going for seconds; checkpoints every 200 ms; the target's lease is half
/// of `grace_s`.
fn takeback_args(grace_s: &'static str) -> Vec<&'static str> {
    vec![
        "--mode",
        "postcopy",
        "--bandwidth-mib-s",
        "4",
        "--checkpoint-ms",
        "200",
        "--postcopy-grace-s",
        grace_s,
    ]
}

/// Waits until migration `id` is in post-copy with `n` checkpoints applied
/// on the source; returns the target VMM's pid.
fn wait_checkpoints(w: &World, id: &str, n: u64) -> i32 {
    let s = w.wait_source(id, "post-copy", |s| s.status == Status::Postcopy);
    assert_eq!(s.epoch, 1, "the hand-off was recorded before COMMIT");
    w.wait_source(id, "checkpointed", |s| {
        s.postcopy.as_ref().is_some_and(|p| p.checkpoints >= n)
    });
    let spawned = w.target_vmms();
    assert_eq!(spawned.len(), 1, "{spawned:?}");
    spawned[0]
}

/// The source took the VM back after a lost post-copy: the target's guest
/// was stopped first (its VMM is gone), the source VMM rolled back to a
/// checkpoint whose memory passes the guest's own stamp check and runs
/// again with a new epoch, from a progress no earlier than the switch.
fn assert_taken_back(w: &mut World, s: &Snapshot, target_vmm: i32, how: &str) {
    assert!(
        proc_stat(target_vmm).is_none_or(|(state, _)| state == 'Z'),
        "the source took the VM back while the target VMM {target_vmm} still runs"
    );
    assert_eq!(s.status, Status::Failed, "{s:?}");
    let error = s.error.clone().unwrap_or_default();
    assert!(error.contains(how), "{error}");
    assert!(error.contains("runs here again from checkpoint"), "{error}");
    assert_eq!(s.epoch, 2, "ownership came back with a new epoch");
    let pc = s.postcopy.clone().expect("post-copy figures");
    let from = pc.taken_back_from.expect("taken back");
    assert!(
        from >= 1,
        "rolled back to a checkpoint, not the switch: {pc:?}"
    );
    let rolled = w.report("source", "rolled_back");
    let verify = &rolled["verify"];
    assert!(
        verify["checked"] == true
            && verify["pages_checked"].as_u64() > Some(0)
            && verify["pages_bad"] == 0,
        "the checkpoint's memory fails the guest's stamp check: {rolled}"
    );
    let at = rolled["progress"].as_u64().expect("progress");
    assert_eq!(at, s.guest_progress_at_pause, "{rolled}");
    w.assert_runs_on_source();
    let listed = vm(&w.src, VM).expect("listed");
    assert_eq!(listed.epoch, 2, "{listed:?}");
    assert!(
        progress(&w.src) > at,
        "the guest runs on from the checkpoint"
    );
}

/// A post-copy (grace `grace_s`) with 2 checkpoints applied, then kill -9
/// of the target ferryd; returns once its leased VMM has exited too, with
/// the migration's id and that VMM's pid.
fn kill_target_ferryd_in_postcopy(vmm: &Path, grace_s: &'static str) -> (World, String, i32) {
    let mut w = World::start(
        vmm,
        Setup {
            mem_mib: 128,
            workload: ENDLESS_WORKLOAD,
            ..Setup::default()
        },
    );
    let id = w.migrate(&takeback_args(grace_s));
    let target_vmm = wait_checkpoints(&w, &id, 2);
    w.dst.kill9();
    wait_for(
        common::DEADLINE,
        || {
            proc_stat(target_vmm)
                .is_none_or(|(s, _)| s == 'Z')
                .then_some(())
        },
        || format!("the target VMM {target_vmm} outlived its ferryd"),
    );
    (w, id, target_vmm)
}

/// kill -9 of the target ferryd during post-copy. Its VMM, whose guest
/// runs under a lease, exits as its link closes; the source hears nothing
/// more, and once the grace has passed since the last word it took the VM
/// back from the last checkpoint the target sent.
#[test]
fn target_ferryd_killed_during_postcopy_the_source_takes_the_vm_back() {
    let Some(vmm) = probe() else { return };
    let (mut w, id, target_vmm) = kill_target_ferryd_in_postcopy(&vmm, "4");
    let s = w.wait_source(&id, "taken back", |s| s.status.is_final());
    assert_taken_back(&mut w, &s, target_vmm, "could not reconnect");
    w.done("target_ferryd_killed_during_postcopy_the_source_takes_the_vm_back");
}

/// kill -9 of the target ferryd during post-copy, started again at once as
/// a service manager would: its VMM (leased) exited with it, so the new
/// ferryd finds the VMM it recorded with `committing` gone and says
/// `fenced` when the source reconnects; the source takes the VM back from
/// the last checkpoint then, not after its grace (60 s here) of silence.
#[test]
fn target_ferryd_killed_during_postcopy_and_restarted_the_source_takes_the_vm_back_at_once() {
    let Some(vmm) = probe() else { return };
    let (mut w, id, target_vmm) = kill_target_ferryd_in_postcopy(&vmm, "60");
    w.dst.restart();
    let s = w.wait_source(&id, "taken back", |s| s.status.is_final());
    assert_taken_back(
        &mut w,
        &s,
        target_vmm,
        "the target stopped its guest for good",
    );
    w.dst
        .wait_log(&["is gone: its guest is stopped for good (fenced)"]);
    w.done(
        "target_ferryd_killed_during_postcopy_and_restarted_the_source_takes_the_vm_back_at_once",
    );
}

/// kill -9 of the target VMM during post-copy: the target ferryd sees it
/// gone, says FENCED, and the source takes the VM back at once (its grace
/// of 60 s never comes into it).
#[test]
fn target_vmm_killed_during_postcopy_the_source_takes_the_vm_back_at_once() {
    let Some(vmm) = probe() else { return };
    let mut w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: ENDLESS_WORKLOAD,
            ..Setup::default()
        },
    );
    let id = w.migrate(&takeback_args("60"));
    let target_vmm = wait_checkpoints(&w, &id, 2);
    signal(target_vmm, Signal::SIGKILL);
    let s = w.wait_source(&id, "taken back", |s| s.status.is_final());
    assert_taken_back(&mut w, &s, target_vmm, "the target stopped");
    let target_side = incoming(&w.dst).expect("the target saw it");
    assert_eq!(target_side.status, Status::Failed, "{target_side:?}");
    w.done("target_vmm_killed_during_postcopy_the_source_takes_the_vm_back_at_once");
}

/// The link goes silent during post-copy for longer than the grace: the
/// target, whose checkpoints go unacknowledged, stops its guest when its
/// lease (half the grace) runs out; the source takes the VM back once the
/// whole grace has passed. At no moment do both run it.
#[test]
fn postcopy_partition_past_the_grace_the_source_takes_the_vm_back() {
    let Some(vmm) = probe() else { return };
    if !nft_on_127_0_0_2() {
        return;
    }
    let mut w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: ENDLESS_WORKLOAD,
            target_listen: Some("127.0.0.2:0".into()),
            ..Setup::default()
        },
    );
    let id = w.migrate(&takeback_args("4"));
    let target_vmm = wait_checkpoints(&w, &id, 2);
    let rule = NftTable::partition(w.dst.listen(), w.dir.path()).expect("nft rule");
    let s = w.wait_source(&id, "taken back", |s| s.status.is_final());
    assert_taken_back(&mut w, &s, target_vmm, "could not reconnect");
    drop(rule);
    let t = wait_for(
        common::DEADLINE,
        || incoming(&w.dst).filter(|s| s.status.is_final()),
        || format!("the target never ended:\n{}", w.dst.log_text()),
    );
    let error = t.error.unwrap_or_default();
    assert!(error.contains("no checkpoint acknowledged"), "{error}");
    w.assert_target_clean(&[target_vmm]);
    w.done("postcopy_partition_past_the_grace_the_source_takes_the_vm_back");
}

/// The hand-off records under the source's state directory.
fn handoff_records(d: &Ferryd) -> Vec<String> {
    std::fs::read_dir(d.dir.path().join("handoffs"))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

/// kill -9 of the source ferryd during post-copy, started again at once:
/// the source VMM (paused, holding the memfd) registers its VM again, the
/// new ferryd finds the hand-off its predecessor recorded, resumes the
/// post-copy with the target (which waited, its guest running under a
/// lease), pushes what the target lacks, and hands the VM off.
#[test]
fn source_ferryd_killed_during_postcopy_a_restarted_one_finishes_it() {
    let Some(vmm) = probe() else { return };
    let mut w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: ENDLESS_WORKLOAD,
            ..Setup::default()
        },
    );
    let id = w.migrate(&takeback_args("6"));
    wait_checkpoints(&w, &id, 2);
    let mut records = handoff_records(&w.src);
    records.sort();
    let want = ["ckpt", "json", "pages"].map(|e| format!("{id}.{e}"));
    assert_eq!(records, want, "hand-off, checkpoint and its pages recorded");
    w.src.kill9();
    w.src.restart();
    let s = w.wait_source(&id, "finished by the new ferryd", |s| s.status.is_final());
    assert_eq!(s.status, Status::Completed, "{s:?}");
    assert_eq!(s.epoch, 1, "{s:?}");
    w.src
        .wait_log(&["came back paused; finishing its post-copy hand-off"]);
    let t = wait_for(
        common::DEADLINE,
        || incoming(&w.dst).filter(|s| s.status.is_final()),
        || format!("the target never ended:\n{}", w.dst.log_text()),
    );
    assert_eq!(t.status, Status::Completed, "{t:?}");
    let verify = t.verify.clone().expect("the target VMM's check");
    assert!(
        verify.checked && verify.pages_checked > 0 && verify.pages_bad == 0,
        "{verify:?}"
    );
    w.src.wait_log(&["post-copy resumed"]);
    let on_target = wait_for(
        common::DEADLINE,
        || vm(&w.dst, VM).filter(|v| v.state == VmState::Running),
        || format!("not running on the target:\n{}", w.dst.log_text()),
    );
    assert_eq!(on_target.epoch, 1);
    assert_progresses(&w.dst);
    // The source VMM was handed off: it quit, and nothing is left behind.
    wait_for(
        common::DEADLINE,
        || (!w.source_vmm_alive()).then_some(()),
        || "the source VMM still runs".into(),
    );
    assert_eq!(handoff_records(&w.src), Vec::<String>::new());
    w.done("source_ferryd_killed_during_postcopy_a_restarted_one_finishes_it");
}

/// kill -9 of the source ferryd during post-copy while the target is cut
/// off for good: the target's guest stops when its lease runs out; the
/// restarted source ferryd cannot reach it, and once the grace has passed
/// it takes the VM back from the last checkpoint its predecessor recorded
/// (state from the journal, memory from the memfd the VMM kept).
#[test]
fn source_ferryd_killed_and_target_cut_off_a_restarted_one_takes_the_vm_back() {
    let Some(vmm) = probe() else { return };
    if !nft_on_127_0_0_2() {
        return;
    }
    let mut w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: ENDLESS_WORKLOAD,
            target_listen: Some("127.0.0.2:0".into()),
            ..Setup::default()
        },
    );
    let id = w.migrate(&takeback_args("4"));
    let target_vmm = wait_checkpoints(&w, &id, 2);
    let rule = NftTable::partition(w.dst.listen(), w.dir.path()).expect("nft rule");
    w.src.kill9();
    w.src.restart();
    let s = w.wait_source(&id, "taken back", |s| s.status.is_final());
    assert_taken_back(&mut w, &s, target_vmm, "could not reconnect");
    drop(rule);
    assert_eq!(handoff_records(&w.src), Vec::<String>::new());
    w.done("source_ferryd_killed_and_target_cut_off_a_restarted_one_takes_the_vm_back");
}

/// kill -9 of the source ferryd during pre-copy, started again: the guest
/// never stopped; its VMM registers it again with the new ferryd, which
/// lists it running (no hand-off was recorded), and the target, whose
/// source vanished, cleans up.
#[test]
fn source_ferryd_killed_during_precopy_the_vm_registers_again() {
    let Some(vmm) = probe() else { return };
    let mut w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: ENDLESS_WORKLOAD,
            ..Setup::default()
        },
    );
    let id = w.migrate(ENDLESS);
    w.wait_source(&id, "active", |s| s.status == Status::Active);
    let spawned = w.wait_target_active();
    w.src.kill9();
    w.src.restart();
    wait_for(
        common::DEADLINE,
        || vm(&w.src, VM).filter(|v| v.state == VmState::Running),
        || format!("{VM} never registered again:\n{}", w.src.log_text()),
    );
    w.assert_runs_on_source();
    w.assert_never_paused();
    assert!(snapshot(&w.src, &id).is_none(), "nothing to finish");
    w.assert_target_clean(&spawned);
    w.done("source_ferryd_killed_during_precopy_the_vm_registers_again");
}

/// Post-copy without checkpoints, the link cut for longer than the
/// source's grace: the source gives up (status `unknown`, the VM paused
/// here, its hand-off record kept) while the target keeps the guest and
/// waits (its own grace is 60 s). With the link back, `ferry migrate
/// --resume ID` finishes it from the record: the target sends the pages
/// it lacks, and the VM runs there, whole.
#[test]
fn postcopy_left_unknown_is_finished_by_hand_with_resume() {
    let Some(vmm) = probe() else { return };
    if !nft_on_127_0_0_2() {
        return;
    }
    let mut w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: ENDLESS_WORKLOAD,
            target_listen: Some("127.0.0.2:0".into()),
            ..Setup::default()
        },
    );
    let id = w.migrate(&[
        "--mode",
        "postcopy",
        "--bandwidth-mib-s",
        "4",
        "--checkpoint-ms",
        "0",
        "--postcopy-grace-s",
        "5",
    ]);
    w.wait_source(&id, "post-copy", |s| s.status == Status::Postcopy);
    let rule = NftTable::partition(w.dst.listen(), w.dir.path()).expect("nft rule");
    let s = w.wait_source_for(&id, "unknown", Duration::from_secs(60), |s| {
        s.status == Status::Unknown
    });
    assert!(s.error.unwrap_or_default().contains("post-copy"));
    drop(rule);
    assert_eq!(vm(&w.src, VM).map(|v| v.state), Some(VmState::Paused));
    assert_eq!(handoff_records(&w.src), [format!("{id}.json")]);
    // Nothing else can be resumed.
    let o = w
        .src
        .ferry(&["migrate", "--resume", "00112233445566778899aabbccddeeff"]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    let o = w.src.ferry(&["migrate", "--resume", &id, "--json"]);
    assert!(
        o.status.success(),
        "{}\n{}",
        common::stderr(&o),
        w.src.log_text()
    );
    let s = snapshot(&w.src, &id).expect("listed");
    assert_eq!(s.status, Status::Completed, "{s:?}");
    let t = wait_for(
        common::DEADLINE,
        || incoming(&w.dst).filter(|s| s.status.is_final()),
        || format!("the target never ended:\n{}", w.dst.log_text()),
    );
    assert_eq!(t.status, Status::Completed, "{t:?}");
    let verify = t.verify.clone().expect("the target VMM's check");
    assert!(
        verify.checked && verify.pages_checked > 0 && verify.pages_bad == 0,
        "{verify:?}"
    );
    wait_for(
        common::DEADLINE,
        || vm(&w.dst, VM).filter(|v| v.state == VmState::Running),
        || format!("not running on the target:\n{}", w.dst.log_text()),
    );
    assert_progresses(&w.dst);
    wait_for(
        common::DEADLINE,
        || (!w.source_vmm_alive()).then_some(()),
        || "the source VMM still runs".into(),
    );
    assert_eq!(handoff_records(&w.src), Vec::<String>::new());
    w.done("postcopy_left_unknown_is_finished_by_hand_with_resume");
}

/// kill -9 of the source VMM during post-copy: the guest runs on the
/// target, and its memory is a memfd the source ferryd maps too, so every
/// page it still needs is served from there and the migration completes.
#[test]
fn source_vmm_killed_during_postcopy_loses_nothing() {
    let Some(vmm) = probe() else { return };
    let mut w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: ENDLESS_WORKLOAD,
            ..Setup::default()
        },
    );
    let id = w.migrate(&["--mode", "postcopy", "--bandwidth-mib-s", "16"]);
    w.wait_source(&id, "post-copy", |s| s.status == Status::Postcopy);
    let c = w.guard.source.as_mut().expect("source VMM");
    signal(c.id() as i32, Signal::SIGKILL);
    let _ = c.wait();
    let s = w.wait_source(&id, "completed", |s| s.status.is_final());
    assert_eq!(s.status, Status::Completed, "{s:?}");
    let verify = s.verify.clone().expect("the target VMM's check");
    assert!(
        verify.checked && verify.pages_checked > 0 && verify.pages_bad == 0,
        "{verify:?}"
    );
    let on_target = wait_for(
        common::DEADLINE,
        || vm(&w.dst, VM).filter(|v| v.state == VmState::Running),
        || format!("not running on the target:\n{}", w.dst.log_text()),
    );
    assert_eq!(on_target.epoch, 1);
    w.done("source_vmm_killed_during_postcopy_loses_nothing");
}

/// kill -9 of the target VMM in pre-copy: the target finds out at PREPARE
/// (restore fails), aborts, reaps the VMM; the source resumes.
#[test]
fn target_vmm_killed_during_precopy() {
    let Some(vmm) = probe() else { return };
    let mut w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: CONVERGING_WORKLOAD,
            ..Setup::default()
        },
    );
    let id = w.migrate(CONVERGING);
    let spawned = w.wait_target_active();
    w.wait_source(&id, "copied pages", |s| {
        s.status == Status::Active && s.guest_bytes > 0
    });
    signal(spawned[0], Signal::SIGKILL);
    let s = snapshot(&w.src, &id).expect("snapshot");
    assert_eq!(s.status, Status::Active, "killed during pre-copy: {s:?}");
    let s = w.wait_source(&id, "failed", |s| s.status == Status::Failed);
    eprintln!("source: {:?}", s.error);
    let error = s.error.unwrap_or_default();
    assert!(error.contains("aborted"), "{error}");
    // Today the target notices at PREPARE, after the source paused; noticing
    // the dead VMM earlier (before any pause) would be fine too.
    let pauses = w.source_pauses();
    assert!(
        pauses.is_empty() || pauses == ["paused", "resumed"],
        "{pauses:?}"
    );
    w.assert_runs_on_source();
    w.assert_target_clean(&spawned);
    w.dst
        .wait_log(&["target VMM of", &spawned[0].to_string(), "exited"]);
    w.done("target_vmm_killed_during_precopy");
}

/// kill -9 of the target ferryd in the switchover, before COMMIT: the target
/// VMM is stopped once registered, so the target ferryd hangs in its restore
/// and the source sits in `committing` (guest paused, PREPARE sent, waiting
/// for PREPARED). The kill comes there; the source must resume the guest.
#[test]
fn target_ferryd_killed_in_switchover_before_commit() {
    let Some(vmm) = probe() else { return };
    let mut w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: CONVERGING_WORKLOAD,
            ..Setup::default()
        },
    );
    let id = w.migrate(CONVERGING);
    let spawned = w.wait_target_active();
    signal(spawned[0], Signal::SIGSTOP);
    w.wait_source(&id, "committing", |s| s.status == Status::Committing);
    assert_eq!(vm(&w.src, VM).expect("vm").state, VmState::Migrating);
    w.dst.kill9();
    let s = w.wait_source(&id, "failed", |s| s.status == Status::Failed);
    eprintln!("source: {:?}", s.error);
    assert_eq!(s.epoch, 0, "no hand-off was recorded");
    // The stopped VMM now finds its ferryd gone and must exit by itself.
    signal(spawned[0], Signal::SIGCONT);
    w.assert_paused_then_resumed();
    w.assert_runs_on_source();
    w.assert_target_clean(&spawned);
    w.done("target_ferryd_killed_in_switchover_before_commit");
}

/// The target ferryd dies right after its VMM started the guest, before it
/// told the source (COMMITTED) or recorded how the migration ended (the
/// test hook FERRYD_TEST_CRASH_AFTER_RUN): COMMIT is in doubt. Starts a
/// world with the hook and waits for the crash; the source keeps the VM
/// paused and asks the target how COMMIT ended.
fn crash_starting_the_guest(vmm: &Path) -> (World, String, i32) {
    let mut w = World::start(
        vmm,
        Setup {
            mem_mib: 128,
            workload: CONVERGING_WORKLOAD,
            target_env: vec![("FERRYD_TEST_CRASH_AFTER_RUN".into(), "1".into())],
            ..Setup::default()
        },
    );
    let id = w.migrate(CONVERGING);
    let spawned = w.wait_target_active();
    let status = w.dst.wait_exit();
    eprintln!("target ferryd: {status}");
    w.dst.wait_log(&["FERRYD_TEST_CRASH_AFTER_RUN"]);
    // The guest runs on the target, its ferryd is gone: the source holds
    // its copy paused and keeps asking.
    std::thread::sleep(Duration::from_millis(500));
    let s = snapshot(&w.src, &id).expect("the source lists the migration");
    assert_eq!(s.status, Status::Committing, "{s:?}");
    assert_eq!(vm(&w.src, VM).expect("vm").state, VmState::Migrating);
    assert!(w.source_vmm_alive());
    (w, id, spawned[0])
}

/// COMMIT in doubt (above), and the guest's VMM lives on: the restarted
/// target ferryd finds it registered again under the pid it recorded with
/// `committing`, says `completed`, and the source hands the VM off. The VM
/// runs on the target in the same VMM, and the source VMM has quit.
#[test]
fn target_ferryd_killed_starting_the_guest_a_restarted_one_completes_it() {
    let Some(vmm) = probe() else { return };
    let (mut w, id, target_vmm) = crash_starting_the_guest(&vmm);
    w.dst.restart();
    let s = w.wait_source(&id, "completed", |s| s.status == Status::Completed);
    assert_eq!(s.epoch, 1, "{s:?}");
    w.dst.wait_log(&["runs here (epoch 1)"]);
    let v = wait_for(
        common::DEADLINE,
        || vm(&w.dst, VM).filter(|v| v.state == VmState::Running),
        || format!("{VM} is not running on the target: {:?}", vm_list(&w.dst)),
    );
    assert_eq!(v.epoch, 1, "{v:?}");
    assert_progresses(&w.dst);
    assert_eq!(w.target_vmms(), vec![target_vmm], "the same VMM runs it");
    wait_for(
        common::DEADLINE,
        || (!w.source_vmm_alive()).then_some(()),
        || "the source VMM did not quit".into(),
    );
    let away = vm(&w.src, VM).expect("the source lists where it went");
    assert_eq!(away.state, VmState::MigratedAway, "{away:?}");
    assert_eq!(away.epoch, 1, "{away:?}");
    w.done("target_ferryd_killed_starting_the_guest_a_restarted_one_completes_it");
}

/// COMMIT in doubt (above), and the guest's VMM is killed too while no
/// ferryd watches it: the restarted target ferryd finds the recorded VMM
/// gone and says `fenced`, and the source runs the VM again from the
/// switch (what the guest did on the target is lost, as in a take-back).
#[test]
fn target_ferryd_and_vmm_killed_starting_the_guest_the_source_takes_the_vm_back() {
    let Some(vmm) = probe() else { return };
    let (mut w, id, target_vmm) = crash_starting_the_guest(&vmm);
    signal(target_vmm, Signal::SIGKILL);
    wait_for(
        common::DEADLINE,
        || w.target_vmms().is_empty().then_some(()),
        || format!("target VMMs left: {:?}", w.target_vmms()),
    );
    w.dst.restart();
    let s = w.wait_source(&id, "failed", |s| s.status == Status::Failed);
    let error = s.error.clone().unwrap_or_default();
    assert!(error.contains("runs here again from the switch"), "{error}");
    assert_eq!(s.epoch, 2, "ownership comes back with a new epoch: {s:?}");
    w.dst.wait_log(&["fenced"]);
    w.assert_paused_then_resumed();
    w.assert_runs_on_source();
    assert!(vm(&w.dst, VM).is_none(), "{:?}", vm_list(&w.dst));
    w.done("target_ferryd_and_vmm_killed_starting_the_guest_the_source_takes_the_vm_back");
}

/// `ferry cancel` while the source waits for the target's SPEC_ACK (the
/// target VMM command sleeps 2 s before starting): honoured once setup ends.
#[test]
fn cancel_during_setup() {
    let Some(vmm) = probe() else { return };
    let mut w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: ENDLESS_WORKLOAD,
            target_vmm_delay_s: Some(2),
            ..Setup::default()
        },
    );
    let id = w.migrate(ENDLESS);
    // The target's VMM command is sleeping: the source is still in setup.
    wait_for(
        common::DEADLINE,
        || (!w.target_vmms().is_empty()).then_some(()),
        || "the target never started its VMM command".into(),
    );
    let spawned = w.target_vmms();
    let s = snapshot(&w.src, &id).expect("snapshot");
    assert_eq!(s.status, Status::Setup, "{s:?}");
    let t = Instant::now();
    let o = w.src.ferry(&["cancel", &id]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let s = w.wait_source(&id, "cancelled", |s| s.status.is_final());
    eprintln!("cancel in setup took effect after {:?}", t.elapsed());
    assert_eq!(s.status, Status::Cancelled, "{s:?}");
    w.assert_runs_on_source();
    w.assert_target_clean(&spawned);
    w.assert_never_paused();
    w.done("cancel_during_setup");
}

/// `ferry cancel` in pre-copy.
#[test]
fn cancel_during_precopy() {
    let Some(vmm) = probe() else { return };
    let mut w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: ENDLESS_WORKLOAD,
            ..Setup::default()
        },
    );
    let id = w.migrate(ENDLESS);
    let spawned = w.wait_target_active();
    w.wait_source(&id, "copied pages", |s| {
        s.status == Status::Active && s.guest_bytes > 0
    });
    let o = w.src.ferry(&["cancel", &id]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let s = w.wait_source(&id, "cancelled", |s| s.status.is_final());
    assert_eq!(s.status, Status::Cancelled, "{s:?}");
    w.assert_runs_on_source();
    w.assert_target_clean(&spawned);
    w.assert_never_paused();
    w.done("cancel_during_precopy");
}

/// `ferry cancel` in the switchover: the guest is paused on the source and
/// PREPARE is out (the stopped target VMM holds the target in its restore).
/// The source must resume the guest; the target, once its VMM runs again,
/// reads the ABORT and throws the VM away.
#[test]
fn cancel_during_switchover() {
    let Some(vmm) = probe() else { return };
    let mut w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: CONVERGING_WORKLOAD,
            ..Setup::default()
        },
    );
    let id = w.migrate(CONVERGING);
    let spawned = w.wait_target_active();
    signal(spawned[0], Signal::SIGSTOP);
    w.wait_source(&id, "committing", |s| s.status == Status::Committing);
    let o = w.src.ferry(&["cancel", &id]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let s = w.wait_source(&id, "cancelled", |s| s.status.is_final());
    assert_eq!(s.status, Status::Cancelled, "{s:?}");
    assert_eq!(s.epoch, 0, "no hand-off was recorded");
    signal(spawned[0], Signal::SIGCONT);
    w.assert_paused_then_resumed();
    w.assert_runs_on_source();
    w.assert_target_clean(&spawned);
    w.done("cancel_during_switchover");
}

/// Every packet to the target's data port is dropped mid pre-copy: the
/// source must give up within its io timeout and resume. Once the rule is
/// gone, the target gets the source's ABORT and throws the VM away.
#[test]
fn cut_link_fails_within_the_io_timeout() {
    let Some(vmm) = probe() else { return };
    if !nft_on_127_0_0_2() {
        return;
    }
    let mut w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: ENDLESS_WORKLOAD,
            target_listen: Some("127.0.0.2:0".into()),
            ..Setup::default()
        },
    );
    let id = w.migrate(ENDLESS);
    let spawned = w.wait_target_active();
    w.wait_source(&id, "copied pages", |s| {
        s.status == Status::Active && s.guest_bytes > 0
    });
    let rule = NftTable::drop_to(w.dst.listen(), w.dir.path()).expect("nft rule");
    let cut = Instant::now();
    let io_timeout = SourceConfig::default().io_timeout;
    let s = w.wait_source_for(&id, "failed", io_timeout * 3, |s| s.status.is_final());
    let took = cut.elapsed();
    drop(rule);
    eprintln!("link cut: source failed after {took:?}: {:?}", s.error);
    assert_eq!(s.status, Status::Failed, "{s:?}");
    w.assert_runs_on_source();
    w.assert_never_paused();
    let t = Instant::now();
    w.assert_target_clean(&spawned);
    eprintln!("link restored: target clean after {:?}", t.elapsed());
    // The send deadline starts once the socket buffers are full (< 1 s here).
    assert!(
        took <= io_timeout + Duration::from_secs(5),
        "the source noticed the dead link after {took:?}, io timeout {io_timeout:?}"
    );
    w.done("cut_link_fails_within_the_io_timeout");
}

/// Every connection of a post-copy reset by the network for 1.5 s (nft
/// `reject with tcp reset`, and new connections refused meanwhile): the
/// guest keeps running on the target, the source reconnects once the rule
/// is gone, the target says which pages it still lacks, and the migration
/// completes with every page stamp good.
#[test]
fn postcopy_resumes_after_the_network_resets_its_connections() {
    let Some(vmm) = probe() else { return };
    if !nft_on_127_0_0_2() {
        return;
    }
    let w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: ENDLESS_WORKLOAD,
            target_listen: Some("127.0.0.2:0".into()),
            ..Setup::default()
        },
    );
    let id = w.migrate(&["--mode", "postcopy", "--bandwidth-mib-s", "16"]);
    w.wait_source(&id, "post-copy", |s| s.status == Status::Postcopy);
    let rule = NftTable::reset_to(w.dst.listen(), w.dir.path()).expect("nft rule");
    std::thread::sleep(Duration::from_millis(1500));
    drop(rule);
    let s = w.wait_source(&id, "completed", |s| s.status.is_final());
    assert_eq!(s.status, Status::Completed, "{s:?}");
    let pc = s.postcopy.clone().expect("post-copy figures");
    assert!(pc.reconnects >= 1, "{pc:?}");
    let verify = s.verify.clone().expect("the target VMM's check");
    assert!(
        verify.checked && verify.pages_checked > 0 && verify.pages_bad == 0,
        "{verify:?}"
    );
    // The guest runs on the target and only there.
    let on_target = wait_for(
        common::DEADLINE,
        || vm(&w.dst, VM).filter(|v| v.state == VmState::Running),
        || format!("not running on the target:\n{}", w.dst.log_text()),
    );
    assert_eq!(on_target.epoch, 1);
    assert!(
        !w.source_pauses().iter().any(|e| e == "resumed"),
        "the source resumed: {:?}",
        w.source_pauses()
    );
    w.done("postcopy_resumes_after_the_network_resets_its_connections");
}

/// A post-copy whose link goes silent (nft drops every packet, as a dead
/// cable would) for longer than the source's io timeout: the source notices
/// the silence, reconnects once the link is back, and the migration
/// completes with every page stamp good.
#[test]
fn postcopy_resumes_after_a_silent_link() {
    let Some(vmm) = probe() else { return };
    if !nft_on_127_0_0_2() {
        return;
    }
    let w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: ENDLESS_WORKLOAD,
            target_listen: Some("127.0.0.2:0".into()),
            ..Setup::default()
        },
    );
    let id = w.migrate(&["--mode", "postcopy", "--bandwidth-mib-s", "8"]);
    w.wait_source(&id, "post-copy", |s| s.status == Status::Postcopy);
    let rule = NftTable::drop_to(w.dst.listen(), w.dir.path()).expect("nft rule");
    let io_timeout = SourceConfig::default().io_timeout;
    std::thread::sleep(io_timeout + Duration::from_secs(2));
    drop(rule);
    let s = w.wait_source_for(&id, "completed", io_timeout * 4, |s| s.status.is_final());
    assert_eq!(s.status, Status::Completed, "{s:?}");
    let pc = s.postcopy.clone().expect("post-copy figures");
    assert!(pc.reconnects >= 1, "{pc:?}");
    let verify = s.verify.clone().expect("the target VMM's check");
    assert!(
        verify.pages_checked > 0 && verify.pages_bad == 0,
        "{verify:?}"
    );
    assert!(!w.source_pauses().iter().any(|e| e == "resumed"));
    w.done("postcopy_resumes_after_a_silent_link");
}

// ------------------------------------------------------- hostile connections

/// One frame with a valid CRC, built by hand.
fn raw_frame(kind: FrameKind, stream: u16, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let crc = frame_crc(kind, stream, len, 0, payload);
    let mut b = FrameHeader {
        kind,
        stream,
        len,
        seq: 0,
        crc,
    }
    .encode()
    .to_vec();
    b.extend_from_slice(payload);
    b
}

/// A frame header announcing `len` bytes (the CRC is not checked first).
fn raw_header(kind: u8, len: u32) -> Vec<u8> {
    let mut h = vec![0xE1, 0xF7, kind, 0, 0, 0, 0, 0];
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&[0; 12]);
    h
}

fn read_frame(s: &mut TcpStream) -> (FrameHeader, Vec<u8>) {
    let mut hb = [0u8; HEADER_BYTES];
    s.read_exact(&mut hb).expect("frame header");
    let h = FrameHeader::decode(&hb).expect("valid header");
    let mut p = vec![0u8; h.len as usize];
    s.read_exact(&mut p).expect("frame payload");
    assert_eq!(frame_crc(h.kind, h.stream, h.len, h.seq, &p), h.crc);
    (h, p)
}

fn data_conn(d: &Ferryd) -> (TcpStream, String) {
    let s = TcpStream::connect(d.listen()).expect("connect to the data port");
    s.set_read_timeout(Some(common::DEADLINE)).expect("timeout");
    let me = s.local_addr().expect("local address").to_string();
    (s, me)
}

/// A hello speaking protocol `version`, correctly authenticated.
fn hello_v(version: u16, key: &Key, nonce_a: &[u8], h: &Hello) -> Vec<u8> {
    let nonce_c: [u8; 32] = ferry_engine::key::random_bytes();
    let mac = key.mac(&[
        b"ferry-hello-v1",
        nonce_a,
        &nonce_c,
        &h.session,
        &h.stream.to_le_bytes(),
        &h.streams.to_le_bytes(),
        h.vm.as_bytes(),
    ]);
    let mut p = Vec::new();
    for v in [version, h.stream, h.streams, h.vm.len() as u16] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p.extend_from_slice(&h.session);
    p.extend_from_slice(&nonce_c);
    p.extend_from_slice(&mac);
    p.extend_from_slice(h.vm.as_bytes());
    p
}

/// Garbage, truncated, oversized, unknown-kind and wrong-version frames and a
/// second claim on the running session, all sent to the target's data port
/// while a real migration runs (held open by a stopped target VMM): each is
/// refused with its own WARN, and the migration still completes, verified by
/// the VMMs' own reports.
#[test]
fn hostile_connections_do_not_disturb_a_migration() {
    let Some(vmm) = probe() else { return };
    let mut w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: CONVERGING_WORKLOAD,
            ..Setup::default()
        },
    );
    let key = Key::from_file(&w.key).expect("key");
    let id = w.migrate(CONVERGING);
    let spawned = w.wait_target_active();
    // The session cannot finish while its VMM is stopped: every probe below
    // lands while it runs, whatever the machine's speed.
    signal(spawned[0], Signal::SIGSTOP);
    let at = snapshot(&w.src, &id).expect("snapshot").status;
    let dst = &w.dst;

    let mut garbage = vec![0u8; 4096];
    getrandom::fill(&mut garbage).expect("random");
    garbage[..2].copy_from_slice(b"GE");
    let hello = raw_frame(FrameKind::Hello, 0, &[7; 100]);
    let raw_cases: [(&str, Vec<u8>, &str); 4] = [
        ("garbage", garbage, "bad frame magic"),
        (
            "truncated",
            hello[..HEADER_BYTES + 40].to_vec(),
            "transport failed during handshake",
        ),
        ("oversized", raw_header(2, 1 << 20), "over its cap of 512"),
        ("unknown kind", raw_header(99, 0), "unknown frame kind 99"),
    ];
    for (what, bytes, reason) in raw_cases {
        let (mut s, me) = data_conn(dst);
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(Shutdown::Write);
        let line = dst.wait_log(&["WARN", "refused", &me, reason]);
        eprintln!("{what}: {line}");
    }

    // Wrong version: a well-formed, authenticated hello saying version 2.
    let (mut s, me) = data_conn(dst);
    let (h, challenge) = read_frame(&mut s);
    assert_eq!(h.kind, FrameKind::Challenge);
    let hello = Hello {
        session: ferry_engine::key::random_bytes(),
        stream: 0,
        streams: 2,
        vm: VM.into(),
    };
    let payload = hello_v(2, &key, &challenge[4..], &hello);
    s.write_all(&raw_frame(FrameKind::Hello, 0, &payload))
        .expect("send hello");
    let (h, reason) = read_frame(&mut s);
    let reason = String::from_utf8_lossy(&reason).into_owned();
    assert_eq!(h.kind, FrameKind::Refuse, "{reason}");
    assert!(reason.contains("protocol version 2"), "{reason}");
    let line = dst.wait_log(&["WARN", "refused", &me, "protocol version 2"]);
    eprintln!("wrong version: {line}");

    // A second connection claiming stream 1 of the running session, with the key.
    let session: [u8; 16] = hex::decode(&id)
        .expect("the migration id is the session id in hex")
        .try_into()
        .expect("16 bytes");
    let claim = Hello {
        session,
        stream: 1,
        streams: 2,
        vm: VM.into(),
    };
    let mut conn = TcpTransport::new()
        .connect(dst.listen(), common::DEADLINE)
        .expect("connect");
    conn.set_timeout(Some(common::DEADLINE)).expect("timeout");
    match handshake::connect(&mut *conn, &key, &claim) {
        Err(WireError::Refused(r)) => assert!(r.contains("already running"), "{r}"),
        other => panic!("a second claim on session {id} got {other:?}"),
    }
    drop(conn);
    let line = dst.wait_log(&["WARN", "refused", &id, "already running"]);
    eprintln!("second claim: {line}");

    let still = snapshot(&w.src, &id).expect("snapshot");
    assert!(running(&still), "probes started in {at:?}, then {still:?}");
    eprintln!(
        "probes landed while the source was {at:?} .. {:?}",
        still.status
    );
    signal(spawned[0], Signal::SIGCONT);
    let s = w.wait_source(&id, "completed", |s| s.status.is_final());
    assert_eq!(s.status, Status::Completed, "{s:?}\n{}", w.dst.log_text());
    assert_eq!(s.epoch, 1);

    // The VMMs' own word: the target's memory is the source's at the pause.
    let paused = w.report("source", "paused");
    let restored = w.report("target", "restored");
    assert_eq!(restored["pages_bad"], 0, "{restored}");
    assert!(restored["pages_checked"].as_u64() > Some(0), "{restored}");
    assert_eq!(
        restored["mem_hash"], paused["mem_hash"],
        "{restored} vs {paused}"
    );
    // And the VM now runs on the target only.
    let listed = vm_list(&w.dst);
    let on_dst = listed.iter().find(|v| v.name == VM).expect("listed");
    assert_eq!((on_dst.state, on_dst.epoch), (VmState::Running, 1));
    assert_progresses(&w.dst);
    assert_eq!(w.target_vmms(), spawned, "the target VMM runs the guest");
    wait_for(
        common::DEADLINE,
        || (!w.source_vmm_alive()).then_some(()),
        || "the source VMM did not quit".into(),
    );
    assert_eq!(vm(&w.src, VM).expect("record").state, VmState::MigratedAway);
    let incoming: Vec<Snapshot> = w.dst.client().get("/api/v1/migrations").expect("list");
    assert_eq!(incoming.len(), 1, "{incoming:?}");
    w.done("hostile_connections_do_not_disturb_a_migration");
}

/// A source ferryd without the pair's key: refused at the handshake, before
/// any page moves; the target never starts a VMM.
#[test]
fn peer_without_the_key_is_refused_before_any_page() {
    let Some(vmm) = probe() else { return };
    let mut w = World::start(
        &vmm,
        Setup {
            mem_mib: 128,
            workload: CONVERGING_WORKLOAD,
            source_wrong_key: true,
            ..Setup::default()
        },
    );
    let o = w.src.ferry(&[
        "migrate",
        VM,
        "--to",
        w.dst.listen(),
        "--streams",
        "2",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", common::stderr(&o));
    let s: Snapshot = serde_json::from_slice(&o.stdout).expect("snapshot JSON");
    assert_eq!(s.status, Status::Failed, "{s:?}");
    let error = s.error.clone().unwrap_or_default();
    assert!(error.contains("authentication failed"), "{error}");
    assert_eq!((s.guest_bytes, s.transferred_bytes), (0, 0), "{s:?}");
    let line = w
        .dst
        .wait_log(&["WARN", "refused", "does not hold this ferryd's key"]);
    eprintln!("target: {line}");
    w.assert_runs_on_source();
    assert!(w.target_vmms().is_empty());
    let log = w.dst.log_text();
    assert!(!log.contains("target VMM for"), "{log}");
    assert!(vm_list(&w.dst).is_empty());
    let incoming: Vec<Snapshot> = w.dst.client().get("/api/v1/migrations").expect("list");
    assert!(incoming.is_empty(), "{incoming:?}");
    w.assert_never_paused();
    w.done("peer_without_the_key_is_refused_before_any_page");
}
