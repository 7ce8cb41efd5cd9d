//! Child processes, the scratch directory and Ctrl-C, all cleaned up by Drop.
//!
//! Every child runs in its own process group, so that a Ctrl-C at the
//! terminal reaches only ferry-bench (which then cleans up in order) and so
//! that stopping a child also stops what it spawned (a target ferryd's VMM).
//! Each child also gets `PR_SET_PDEATHSIG = SIGKILL`: if ferry-bench itself
//! is killed outright, the children do not outlive it.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;

/// How long a child gets between SIGTERM and SIGKILL. ferryd and ferry-vmm
/// shut down in milliseconds; 3 s covers a loaded 2-core machine.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// Poll period of every wait loop: short enough that Ctrl-C feels immediate.
pub const POLL: Duration = Duration::from_millis(50);
/// Lines of each log printed when something goes wrong.
const LOG_TAIL_LINES: usize = 15;
/// Bytes read from the end of a log to find those lines.
const LOG_TAIL_BYTES: u64 = 16 << 10;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set a flag that every wait loop checks, so the
/// run unwinds through its Drop guards. A second signal kills at once
/// (`SA_RESETHAND`); the children then die by their parent-death signal.
pub fn catch_interrupts() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESETHAND,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; no other code in this process installs handlers
        // for these signals.
        unsafe { signal::sigaction(sig, &action) }
            .with_context(|| format!("cannot install a handler for {sig}"))?;
    }
    Ok(())
}

/// Whether Ctrl-C (or SIGTERM) arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails with "interrupted" once Ctrl-C arrived; called in every wait loop.
pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d`, in [`POLL`] steps, failing early on Ctrl-C.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep(POLL.min(end - now));
    }
}

/// A child process that is stopped (with everything in its process group)
/// when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    log: Option<PathBuf>,
    exit: Option<ExitStatus>,
}

impl ChildGuard {
    /// Starts `cmd` in a new process group with a parent-death signal.
    /// stdout and stderr go to `log` (appended), or stay as `cmd` set them
    /// when `log` is `None`.
    pub fn spawn(name: &str, mut cmd: Command, log: Option<&Path>) -> Result<Self> {
        if let Some(log) = log {
            let out = File::options()
                .create(true)
                .append(true)
                .open(log)
                .with_context(|| format!("cannot create log file {}", log.display()))?;
            let err = out
                .try_clone()
                .context("cannot duplicate a log file handle")?;
            cmd.stdout(out).stderr(err);
        }
        cmd.stdin(Stdio::null()).process_group(0);
        // SAFETY: the closure runs in the child between fork and exec and only
        // calls prctl(2), which is async-signal-safe; it touches no memory of
        // the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({program})"))?;
        Ok(ChildGuard {
            name: name.into(),
            child,
            log: log.map(Path::to_path_buf),
            exit: None,
        })
    }

    /// What the child is called in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's pid (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's stdout, when it was piped.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Its exit status, if it has exited (reaps it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            self.exit = self
                .child
                .try_wait()
                .with_context(|| format!("cannot wait for {}", self.name))?;
        }
        Ok(self.exit)
    }

    /// Fails (with the log tail) if the child has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(st) = self.try_wait()? {
            bail!(
                "{} exited unexpectedly ({st}){}",
                self.name,
                self.log_tail_suffix()
            );
        }
        Ok(())
    }

    /// Waits up to `timeout` for the child to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= end {
                return Ok(None);
            }
            sleep(POLL)?;
        }
    }

    /// The last lines of the child's log, formatted to follow an error message.
    pub fn log_tail_suffix(&self) -> String {
        match &self.log {
            Some(p) => match tail(p, LOG_TAIL_LINES) {
                Ok(t) if !t.is_empty() => {
                    format!("; last lines of {}:\n{}", p.display(), indent(&t))
                }
                _ => format!("; see {}", p.display()),
            },
            None => String::new(),
        }
    }

    /// Stops the child and its group: SIGTERM, a grace period, SIGKILL.
    pub fn stop(&mut self) {
        // Signal the group only while its leader is unreaped: a reaped pid
        // (and so the group id) may be reused by an unrelated process.
        if self.exit.is_some() {
            return;
        }
        let pgid = Pid::from_raw(-(self.child.id() as i32));
        let _ = signal::kill(pgid, Signal::SIGTERM);
        let end = Instant::now() + TERM_GRACE;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                // Whatever it spawned into its group goes too.
                let _ = signal::kill(pgid, Signal::SIGKILL);
                self.exit = Some(st);
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = signal::kill(pgid, Signal::SIGKILL);
        self.exit = self.child.wait().ok();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `n` lines of a text file.
pub fn tail(path: &Path, n: usize) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    Ok(lines[lines.len().saturating_sub(n)..].join("\n"))
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads JSON lines from a file; lines that do not parse are skipped (a
/// writer may be in the middle of one).
pub fn read_json_lines(path: &Path) -> Result<Vec<serde_json::Value>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut out = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if let Ok(v) = serde_json::from_str(&line) {
            out.push(v);
        }
    }
    Ok(out)
}

/// A private scratch directory, removed when dropped unless kept.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates `$TMPDIR/ferry-bench-<pid>-<random>` with mode 0700.
    pub fn new() -> Result<Self> {
        let rand: [u8; 4] = ferry_engine::key::random_bytes();
        let name = format!(
            "ferry-bench-{}-{:02x}{:02x}{:02x}{:02x}",
            std::process::id(),
            rand[0],
            rand[1],
            rand[2],
            rand[3]
        );
        let path = std::env::temp_dir().join(name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("cannot create scratch directory {}", path.display()))?;
        Ok(TempDir { path, keep: false })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory (and its logs) after the run.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("ferry-bench: logs kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_guard_kills_the_whole_group() {
        // A shell that starts a grandchild in its group, then waits.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & echo $! ; wait"])
            .stdout(Stdio::piped());
        let mut g = ChildGuard::spawn("sh", cmd, None).unwrap();
        let mut line = String::new();
        BufReader::new(g.take_stdout().unwrap())
            .read_line(&mut line)
            .unwrap();
        let grandchild: i32 = line.trim().parse().unwrap();
        assert!(g.try_wait().unwrap().is_none());
        drop(g);
        // The grandchild was in the group: it is gone (or a zombie of init).
        std::thread::sleep(Duration::from_millis(100));
        let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "grandchild still alive: {stat}"
        );
    }

    #[test]
    fn ensure_running_reports_exit_with_log_tail() {
        let dir = TempDir::new().unwrap();
        let log = dir.path().join("x.log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo boom-line; exit 3"]);
        let mut g = ChildGuard::spawn("thing", cmd, Some(&log)).unwrap();
        assert!(g.wait_timeout(Duration::from_secs(10)).unwrap().is_some());
        let e = g.ensure_running().unwrap_err().to_string();
        assert!(e.contains("thing exited unexpectedly"), "{e}");
        assert!(e.contains("boom-line"), "{e}");
    }

    #[test]
    fn temp_dir_is_removed_unless_kept() {
        let d = TempDir::new().unwrap();
        let p = d.path().to_path_buf();
        assert!(p.is_dir());
        drop(d);
        assert!(!p.exists());
    }

    #[test]
    fn json_lines_skip_partial_lines() {
        let d = TempDir::new().unwrap();
        let p = d.path().join("r.jsonl");
        std::fs::write(&p, "{\"event\":\"registered\"}\n{\"event\":\"pa").unwrap();
        let v = read_json_lines(&p).unwrap();
        assert_eq!(v.len(), 1);
        assert!(read_json_lines(&d.path().join("none")).unwrap().is_empty());
    }
}
