//! The two hosts of one run: a scratch directory with a key, optionally a
//! namespace pair, a target and a source ferryd, and the source VMM.
//! Dropping a [`Testbed`] stops everything in reverse order of start.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::api::Client;
use crate::blast::{self, BlastResult};
use crate::netns::{self, NetnsPair};
use crate::procs::{self, ChildGuard, TempDir, POLL};
use crate::ui::Ui;
use ferry_daemon::api::VmInfo;

/// ferryd answers its first ping within milliseconds of starting; 20 s
/// covers a cold start on a loaded 2-core machine.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(20);
/// The port each ferryd listens on inside its own namespace.
const NETNS_PORT: u16 = 7070;
/// The VM's name on both hosts.
pub const VM_NAME: &str = "vm0";
/// Deadline for blast-recv to report its address.
/// Memory mode touches every page of its buffers first: up to ~11 µs a page
/// on memory this machine never had, so 6 s per 2 GiB; allow ten times that.
const BLAST_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Slowest link the blast deadline allows for: 1 MiB/s, plus a fixed 30 s.
const BLAST_MIB_S_MIN: u64 = 1;

/// Paths of the programs a run starts.
#[derive(Clone, Debug)]
pub struct Programs {
    /// ferryd.
    pub ferryd: PathBuf,
    /// ferry-vmm.
    pub vmm: PathBuf,
    /// This ferry-bench (for the blast subcommands).
    pub bench: PathBuf,
}

impl Programs {
    /// Finds ferryd and ferry-vmm in `dir`, or next to this executable.
    pub fn find(dir: Option<&Path>) -> Result<Self> {
        let bench = std::env::current_exe().context("cannot locate the ferry-bench executable")?;
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => bench
                .parent()
                .context("the ferry-bench executable has no parent directory")?
                .to_path_buf(),
        };
        let find = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if !p.is_file() {
                bail!(
                    "cannot find {name} in {} (build it with `cargo build --release --bins`, \
                     or point --bin-dir at it)",
                    dir.display()
                );
            }
            Ok(p)
        };
        Ok(Programs {
            ferryd: find("ferryd")?,
            vmm: find("ferry-vmm")?,
            bench,
        })
    }
}

/// One ferryd of the pair.
#[derive(Debug)]
pub struct Daemon {
    /// Its API.
    pub api: Client,
    /// The address it listens on for migrations.
    pub listen: SocketAddr,
    /// Its directory (sockets, state, log).
    pub dir: PathBuf,
    /// The namespace it runs in, if any.
    pub netns: Option<String>,
    child: ChildGuard,
}

impl Daemon {
    /// Whether the process still runs; fails with its log tail if not.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.child.ensure_running()
    }

    /// Its process id (ferryd's own, also under `ip netns exec`, which
    /// execs it).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The link socket VMMs register on.
    pub fn link_socket(&self) -> PathBuf {
        self.dir.join("link.sock")
    }

    /// The last lines of its log, for an error message.
    pub fn log_tail_suffix(&self) -> String {
        self.child.log_tail_suffix()
    }
}

/// Everything one run started. Fields drop in declaration order: the VMM,
/// then the daemons, then the namespaces, then the scratch directory.
#[derive(Debug)]
pub struct Testbed {
    /// The source VMM, once started.
    pub vmm: Option<ChildGuard>,
    /// The source ferryd.
    pub src: Daemon,
    /// The target ferryd.
    pub tgt: Daemon,
    /// The namespace pair, with `--netns`.
    pub netns: Option<NetnsPair>,
    /// The scratch directory.
    pub dir: TempDir,
    /// The VMM's JSON-lines report.
    pub report: PathBuf,
    programs: Programs,
    /// How the source ferryd was started (to start it again).
    src_start: (SocketAddr, Option<String>, Vec<String>),
    tgt_start: (Option<String>, Vec<String>),
}

/// A command, run inside `netns` when given.
fn command_in(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let prefix = NetnsPair::exec_prefix(ns);
            let mut c = Command::new(&prefix[0]);
            c.args(&prefix[1..]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

impl Testbed {
    /// Makes the scratch directory and key, the namespaces (with `netns`),
    /// and starts the target ferryd, then the source ferryd, both on
    /// `transport`. Without namespaces both listen on `listen_ip`.
    pub fn start(
        programs: Programs,
        use_netns: bool,
        link_rate_mib_s: Option<u64>,
        target_reserve_mib: Option<u64>,
        transport: &str,
        listen_ip: IpAddr,
        ui: &Ui,
    ) -> Result<Self> {
        let dir = TempDir::new()?;
        let key_file = dir.path().join("ferry.key");
        write_key(&key_file)?;
        let pair = if use_netns {
            let tag = format!("ferry-bench-{}", std::process::id());
            let pair = NetnsPair::create(&tag)?;
            ui.step(&format!(
                "namespaces {} ({}) and {} ({}) joined by a veth pair",
                pair.src,
                netns::SRC_ADDR,
                pair.tgt,
                netns::TGT_ADDR
            ));
            if let Some(r) = link_rate_mib_s {
                pair.limit_rate(r)?;
                ui.step(&format!("veth shaped to {r} MiB/s with tc tbf"));
            }
            Some(pair)
        } else {
            None
        };
        let (src_addr, tgt_addr, src_ns, tgt_ns) = match &pair {
            Some(p) => (
                SocketAddr::new(IpAddr::V4(netns::SRC_ADDR), NETNS_PORT),
                SocketAddr::new(IpAddr::V4(netns::TGT_ADDR), NETNS_PORT),
                Some(p.src.clone()),
                Some(p.tgt.clone()),
            ),
            // Port 0: each ferryd binds a free port and reports it on ping.
            None => {
                let any_port = SocketAddr::new(listen_ip, 0);
                (any_port, any_port, None, None)
            }
        };
        // Both ferryds move bytes with the transport under test.
        let mut reserve: Vec<String> = vec!["--transport".into(), transport.into()];
        if let Some(m) = target_reserve_mib {
            reserve.extend(["--reserve-mib".to_string(), m.to_string()]);
        }
        let src_extra: Vec<String> = vec!["--transport".into(), transport.into()];
        let tgt = start_daemon(
            &programs,
            &dir,
            "target",
            tgt_addr,
            tgt_ns.clone(),
            &key_file,
            &reserve,
        )?;
        ui.step(&format!("target ferryd listening on {}", tgt.listen));
        let src = start_daemon(
            &programs,
            &dir,
            "source",
            src_addr,
            src_ns.clone(),
            &key_file,
            &src_extra,
        )?;
        ui.step(&format!("source ferryd listening on {}", src.listen));
        let report = dir.path().join("vmm-report.jsonl");
        Ok(Testbed {
            vmm: None,
            src,
            tgt,
            netns: pair,
            dir,
            report,
            programs,
            src_start: (src_addr, src_ns, src_extra),
            tgt_start: (tgt_ns, reserve),
        })
    }

    /// Starts the target ferryd again after it died, on the address it
    /// listened on (sources that ask find it there), with the same sockets
    /// and state directory.
    pub fn restart_target(&mut self) -> Result<()> {
        let (ns, extra) = self.tgt_start.clone();
        let key_file = self.dir.path().join("ferry.key");
        self.tgt = start_daemon(
            &self.programs,
            &self.dir,
            "target",
            self.tgt.listen,
            ns,
            &key_file,
            &extra,
        )?;
        Ok(())
    }

    /// Starts the source ferryd again, as before, on the same sockets and
    /// state directory (after it died: what a service manager does). Its
    /// log goes on in the same file.
    pub fn restart_source(&mut self) -> Result<()> {
        let (addr, ns, extra) = self.src_start.clone();
        let key_file = self.dir.path().join("ferry.key");
        self.src = start_daemon(
            &self.programs,
            &self.dir,
            "source",
            addr,
            ns,
            &key_file,
            &extra,
        )?;
        Ok(())
    }

    /// Starts the source ferry-vmm with `workload` and waits until the
    /// source ferryd lists it.
    pub fn start_vmm(
        &mut self,
        mem_mib: u64,
        workload: &str,
        extra: &[String],
        ui: &Ui,
    ) -> Result<()> {
        let mut cmd = command_in(self.src.netns.as_deref(), &self.programs.vmm);
        cmd.args(extra);
        cmd.arg("--mem-mib")
            .arg(mem_mib.to_string())
            .arg("--workload")
            .arg(workload)
            .arg("--link")
            .arg(self.src.link_socket())
            .arg("--name")
            .arg(VM_NAME)
            .arg("--report")
            .arg(&self.report);
        let log = self.dir.path().join("vmm-source.log");
        self.vmm = Some(ChildGuard::spawn("source ferry-vmm", cmd, Some(&log))?);
        // Allocating and registering guest memory is quick; a cold 2-core
        // machine may need a few seconds per GiB.
        let timeout = Duration::from_secs(30 + mem_mib / 256);
        let start = Instant::now();
        loop {
            self.ensure_running()?;
            if self.src.api.vm(VM_NAME)?.is_some() {
                ui.step(&format!(
                    "{VM_NAME} registered with the source ferryd ({mem_mib} MiB, {workload})"
                ));
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{VM_NAME} did not register with the source ferryd within {} s{}",
                    timeout.as_secs(),
                    self.vmm_log_suffix()
                );
            }
            procs::sleep(POLL)?;
        }
    }

    /// Where the target ferryd writes incoming disk images.
    pub fn target_disk_dir(&self) -> PathBuf {
        self.tgt.dir.join("state").join("disks")
    }

    /// The source VM as the source ferryd sees it.
    pub fn source_vm(&self) -> Result<VmInfo> {
        self.src
            .api
            .vm(VM_NAME)?
            .with_context(|| format!("the source ferryd no longer lists {VM_NAME}"))
    }

    /// Fails (with a log tail) if a daemon or the source VMM died.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.src.ensure_running()?;
        self.tgt.ensure_running()?;
        if let Some(v) = &mut self.vmm {
            v.ensure_running()?;
        }
        Ok(())
    }

    fn vmm_log_suffix(&self) -> String {
        self.vmm
            .as_ref()
            .map(|v| v.log_tail_suffix())
            .unwrap_or_default()
    }

    /// The source VMM process.
    pub fn vmm_mut(&mut self) -> Result<&mut ChildGuard> {
        self.vmm
            .as_mut()
            .context("the source VMM was never started")
    }

    /// Waits until the target ferryd's memory reserve is filled.
    pub fn wait_target_reserve(&self, ui: &Ui) -> Result<()> {
        let start = Instant::now();
        loop {
            let p = self.tgt.api.ping()?;
            if p.reserve_ready || p.reserve_mib == 0 {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(120) {
                bail!(
                    "the target ferryd did not fill its {} MiB memory reserve within 120 s",
                    p.reserve_mib
                );
            }
            if start.elapsed() > Duration::from_secs(1)
                && start.elapsed() < Duration::from_millis(1100)
            {
                ui.step("waiting for the target's memory reserve");
            }
            procs::sleep(POLL)?;
        }
    }

    /// A raw TCP blast of `bytes` over `streams` from the source host to the
    /// target host: the link baseline.
    pub fn blast(&self, bytes: u64, streams: u32, mode: blast::Mode) -> Result<BlastResult> {
        let listen_ip = self.tgt.listen.ip();
        let mut recv_cmd = command_in(self.tgt.netns.as_deref(), &self.programs.bench);
        recv_cmd
            .arg("blast-recv")
            .arg("--listen")
            .arg(SocketAddr::new(listen_ip, 0).to_string())
            .arg("--streams")
            .arg(streams.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if mode == blast::Mode::Memory {
            recv_cmd.arg("--bytes").arg(bytes.to_string());
        }
        let mut recv = ChildGuard::spawn("blast receiver", recv_cmd, None)?;
        let out = recv
            .take_stdout()
            .context("blast receiver without stdout")?;
        // Reading the ready line blocks; do it on a thread so a receiver that
        // never answers costs a timeout, not a hang.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let _ = tx.send(blast::parse_ready(&mut r).map(|a| (a, r)));
        });
        let (addr, mut recv_out) = rx
            .recv_timeout(BLAST_READY_TIMEOUT)
            .context("the blast receiver did not start")??;

        let mut send_cmd = command_in(self.src.netns.as_deref(), &self.programs.bench);
        send_cmd
            .arg("blast-send")
            .arg("--to")
            .arg(addr.to_string())
            .arg("--bytes")
            .arg(bytes.to_string())
            .arg("--streams")
            .arg(streams.to_string())
            .arg("--mode")
            .arg(match mode {
                blast::Mode::Memory => "memory",
                blast::Mode::Hot => "hot",
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut send = ChildGuard::spawn("blast sender", send_cmd, None)?;
        let mut send_out = send.take_stdout().context("blast sender without stdout")?;
        let timeout = Duration::from_secs(30 + bytes / (BLAST_MIB_S_MIN << 20));
        let Some(status) = send.wait_timeout(timeout)? else {
            bail!(
                "the link blast did not finish within {} s",
                timeout.as_secs()
            );
        };
        let mut text = String::new();
        std::io::Read::read_to_string(&mut send_out, &mut text)
            .context("cannot read the blast result")?;
        if !status.success() {
            bail!("the link blast failed ({status})");
        }
        let result: BlastResult = serde_json::from_str(text.trim())
            .with_context(|| format!("the blast sender printed {:?}, not a result", text.trim()))?;
        // The receiver confirms the byte count on its way out.
        let mut line = String::new();
        let _ = recv_out.read_line(&mut line);
        if recv
            .wait_timeout(BLAST_READY_TIMEOUT)?
            .is_none_or(|s| !s.success())
        {
            bail!("the blast receiver did not finish cleanly");
        }
        Ok(result)
    }

    /// Keeps the scratch directory and logs.
    pub fn keep_logs(&mut self) {
        self.dir.keep();
    }
}

/// Writes a fresh key as 64 hex digits, mode 0600.
fn write_key(path: &Path) -> Result<()> {
    use std::io::Write;
    let key = ferry_engine::Key::generate().context("cannot generate a key")?;
    let mut f = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create key file {}", path.display()))?;
    writeln!(f, "{}", key.to_hex()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn start_daemon(
    programs: &Programs,
    scratch: &TempDir,
    role: &str,
    listen: SocketAddr,
    netns: Option<String>,
    key_file: &Path,
    extra: &[String],
) -> Result<Daemon> {
    let dir = scratch.path().join(role);
    let state = dir.join("state");
    std::fs::create_dir_all(&state)
        .with_context(|| format!("cannot create {}", state.display()))?;
    let control = dir.join("control.sock");
    let mut cmd = command_in(netns.as_deref(), &programs.ferryd);
    cmd.arg("--state-dir")
        .arg(&state)
        .arg("--control-socket")
        .arg(&control)
        .arg("--link-socket")
        .arg(dir.join("link.sock"))
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--key-file")
        .arg(key_file)
        .arg("--vmm-command")
        .arg(&programs.vmm)
        .args(extra);
    let log = dir.join("ferryd.log");
    let child = ChildGuard::spawn(&format!("{role} ferryd"), cmd, Some(&log))?;
    let mut d = Daemon {
        api: Client::new(&control),
        listen,
        dir,
        netns,
        child,
    };
    let start = Instant::now();
    loop {
        d.ensure_running()?;
        if control.exists() {
            if let Ok(p) = d.api.ping() {
                // The daemon's own word on where it listens (it resolves port 0).
                let a: SocketAddr = p.listen.parse().with_context(|| {
                    format!(
                        "{role} ferryd reports an unusable listen address {:?}",
                        p.listen
                    )
                })?;
                if a.port() == 0 || a.ip().is_unspecified() {
                    bail!("{role} ferryd reports listen address {a}, not a reachable one");
                }
                d.listen = a;
                return Ok(d);
            }
        }
        if start.elapsed() > DAEMON_START_TIMEOUT {
            bail!(
                "{role} ferryd did not answer on {} within {} s{}",
                control.display(),
                DAEMON_START_TIMEOUT.as_secs(),
                d.log_tail_suffix()
            );
        }
        procs::sleep(POLL)?;
    }
}
