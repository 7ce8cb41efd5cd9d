//! Harness for tests that run the real `ferryd` and `ferry` binaries: a temp
//! state directory, a ferryd child killed in Drop, a `ferry` runner with a
//! deadline, and a fake VMM speaking the link protocol.
//!
//! End-to-end migrations add a second [`Ferryd`] with the same key
//! ([`Ferryd::start_with`] + `vmm_command` pointing at ferry-vmm) and migrate
//! between `a.listen()` and `b.listen()`.

#![allow(dead_code)]

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_daemon::api::Ping;
use ferry_daemon::client::Client;
use ferry_engine::link::{Link, LinkMsg, RegionSpec, Role, VmSpec, VmStats};
use ferry_engine::GuestMem;

pub const FERRYD: &str = env!("CARGO_BIN_EXE_ferryd");
pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
/// Everything a test waits for happens within this (ferryd answers in ms).
pub const DEADLINE: Duration = Duration::from_secs(15);

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("ferry-{tag}-{}", ferry_daemon::util::random_hex(6)));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a fresh key file (mode 0600) and returns its path.
pub fn write_key(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("key");
    let key = ferry_engine::Key::generate().expect("key");
    std::fs::write(&path, format!("{}\n", key.to_hex())).expect("write key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    path
}

/// A running ferryd, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Ferryd {
    pub dir: TempDir,
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub link_socket: PathBuf,
    pub log: PathBuf,
    pub ping: Ping,
    /// Its command line, to start it again ([`Ferryd::restart`]).
    args: Vec<std::ffi::OsString>,
}

/// Settings of a test ferryd beyond the defaults.
#[derive(Default)]
pub struct Opts {
    /// Key file to use (default: a fresh one in the state dir).
    pub key: Option<PathBuf>,
    /// `--vmm-command` (default: /bin/false: incoming VMMs fail).
    pub vmm_command: Option<PathBuf>,
    /// Extra flags.
    pub args: Vec<String>,
    /// `--listen` (default: `127.0.0.1:0`).
    pub listen: Option<String>,
    /// Environment of the first start only (not of [`Ferryd::restart`]).
    pub env: Vec<(String, String)>,
}

impl Ferryd {
    pub fn start() -> Self {
        Self::start_with(Opts::default())
    }

    pub fn start_with(opts: Opts) -> Self {
        let dir = TempDir::new("ferryd");
        let key = opts.key.unwrap_or_else(|| write_key(dir.path()));
        let log = dir.path().join("ferryd.log");
        let socket = dir.path().join("ferryd.sock");
        let link_socket = dir.path().join("link.sock");
        let vmm = opts
            .vmm_command
            .unwrap_or_else(|| PathBuf::from("/bin/false"));
        let listen = opts.listen.unwrap_or_else(|| "127.0.0.1:0".into());
        let mut args: Vec<std::ffi::OsString> = vec![
            "--state-dir".into(),
            dir.path().into(),
            "--key-file".into(),
            key.into(),
            "--listen".into(),
            listen.into(),
            "--log-level".into(),
            "debug".into(),
            "--vmm-command".into(),
            vmm.into(),
        ];
        args.extend(opts.args.into_iter().map(Into::into));
        let child = spawn_ferryd(&args, &log, &opts.env);
        let mut d = Ferryd {
            args,
            dir,
            child: Some(child),
            socket,
            link_socket,
            log,
            ping: Ping {
                version: String::new(),
                listen: String::new(),
                pid: 0,
                reserve_mib: 0,
                reserve_ready: false,
            },
        };
        d.ping = d.wait_ready();
        d
    }

    fn wait_ready(&mut self) -> Ping {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(p) = self.client().get::<Ping>("/api/v1/ping") {
                return p;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "ferryd exited ({status}) before answering; log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "ferryd did not come up; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    /// The TCP data listener, `127.0.0.1:port`.
    pub fn listen(&self) -> &str {
        &self.ping.listen
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has a line containing all of `parts`.
    pub fn wait_log(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let text = self.log_text();
            if let Some(line) = text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?}; log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `ferry --socket <ours> args...`.
    pub fn ferry(&self, args: &[&str]) -> Output {
        let mut all = vec!["--socket", self.socket.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        ferry(&all)
    }

    /// ferryd's process id (`None` once stopped or killed).
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Starts it again after [`Self::kill9`] or [`Self::stop`], with the
    /// same state directory, sockets and flags, on the port it listened on
    /// (as a service with a configured port would: peers find it there);
    /// its log goes on in the same file.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "ferryd still runs");
        if let Some(i) = self.args.iter().position(|a| a == "--listen") {
            self.args[i + 1] = self.ping.listen.clone().into();
        }
        self.child = Some(spawn_ferryd(&self.args, &self.log, &[]));
        self.ping = self.wait_ready();
    }

    /// Waits until ferryd exits by itself (a test hook killed it) and
    /// reaps it.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        let child = self.child.as_mut().expect("ferryd runs");
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "ferryd did not exit; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL (a crash: no shutdown path runs) and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

/// Starts ferryd with `args`, its stderr appended to `log`.
fn spawn_ferryd(args: &[std::ffi::OsString], log: &Path, env: &[(String, String)]) -> Child {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(FERRYD)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn ferryd")
}

impl Drop for Ferryd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `ferry args...` with a deadline (killed past it).
pub fn ferry(args: &[&str]) -> Output {
    run_with_deadline(Command::new(FERRY).args(args).env_remove("FERRY_SOCKET"))
}

pub fn run_with_deadline(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let (mut out, mut err) = (
        child.stdout.take().expect("stdout"),
        child.stderr.take().expect("stderr"),
    );
    let t_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let t_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("command did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().expect("stdout"),
        stderr: t_err.join().expect("stderr"),
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A spec of one region of `mib` MiB.
pub fn spec(name: &str, mib: u64) -> VmSpec {
    VmSpec {
        name: name.into(),
        regions: vec![RegionSpec {
            gpa: 0,
            size: mib << 20,
            memfd_offset: 0,
        }],
        vcpus: 1,
        vmm_config: serde_json::json!({"fake": true}),
        disk: None,
    }
}

/// A fake source VMM: registers `spec` with a fresh memfd and answers
/// requests (stats with progress 42, Ok to anything else) until the link
/// closes or [`FakeVmm::hang_up`] is called.
pub struct FakeVmm {
    pub reply: LinkMsg,
    link: Link,
    thread: Option<JoinHandle<()>>,
    _mem: GuestMem,
}

impl FakeVmm {
    /// Registers; `Err(message)` when ferryd refuses.
    pub fn register(link_socket: &Path, spec: &VmSpec) -> Result<FakeVmm, String> {
        let mem = GuestMem::create(spec).expect("guest memory");
        let mut link = Link::connect(link_socket).expect("connect link");
        link.set_timeout(Some(DEADLINE)).expect("timeout");
        let msg = LinkMsg::Register {
            role: Role::Source,
            spec: Some(spec.clone()),
        };
        link.send(&msg, &[], &[mem.memfd().as_raw_fd()])
            .expect("send register");
        let reply = link.recv().expect("registration reply").msg;
        if let LinkMsg::Error { message } = reply {
            return Err(message);
        }
        let mut serving = link.try_clone().expect("clone link");
        serving.set_timeout(None).expect("timeout");
        let thread = std::thread::spawn(move || serve(&mut serving));
        Ok(FakeVmm {
            reply,
            link,
            thread: Some(thread),
            _mem: mem,
        })
    }

    /// Closes the link as a dying VMM would.
    pub fn hang_up(mut self) {
        self.link.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        self.link.shutdown();
    }
}

fn serve(link: &mut Link) {
    while let Ok(r) = link.recv() {
        let reply = match r.msg {
            LinkMsg::GetStats => LinkMsg::Stats(VmStats {
                progress: 42,
                running: true,
                phase: "idle".into(),
                throttle_pct: 0,
            }),
            LinkMsg::Quit { .. } => {
                let _ = link.send(&LinkMsg::Ok, &[], &[]);
                return;
            }
            _ => LinkMsg::Ok,
        };
        if link.send(&reply, &[], &[]).is_err() {
            return;
        }
    }
}

/// The ferry-vmm to test with and a usable /dev/kvm, or `None` after printing
/// why the test skips.
pub fn kvm_vmm() -> Option<PathBuf> {
    let vmm = std::env::var_os("FERRY_VMM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(FERRYD).with_file_name("ferry-vmm"));
    if !vmm.exists() {
        eprintln!(
            "SKIP: no ferry-vmm at {} (build the workspace, or set FERRY_VMM)",
            vmm.display()
        );
        return None;
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!("SKIP: /dev/kvm is not usable here: {e}");
        return None;
    }
    Some(vmm)
}
