//! Running commands: echoed, timed, with CI-friendly cargo settings.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a timed-out command gets to clean up after SIGINT: ferry-bench
/// stops its daemons with a 3 s grace each.
const INTERRUPT_GRACE: Duration = Duration::from_secs(15);

/// Whether this is a CI run (`CI` set to anything but empty, `0` or `false`).
pub fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The workspace root: xtask lives one level below it.
pub fn root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The cargo that runs us (cargo sets `CARGO` for `cargo run`).
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    if is_ci() {
        // Plain logs: no colour codes, no progress bars.
        c.env("CARGO_TERM_COLOR", "never")
            .env("CARGO_TERM_PROGRESS_WHEN", "never");
    }
    c
}

/// A command's line as a person would type it.
pub fn show(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    if s.ends_with("/cargo") || s.ends_with("/cargo.exe") {
        s = "cargo".into();
    }
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&quote(a));
    }
    s
}

fn quote(a: &OsStr) -> String {
    let a = a.to_string_lossy();
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=./:,+@%".contains(c))
    {
        a.into_owned()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// Runs `c` with inherited stdio; fails unless it exits 0.
pub fn run(c: &mut Command) -> Result<()> {
    let line = show(c);
    println!("$ {line}");
    let st = c.status().with_context(|| format!("cannot run `{line}`"))?;
    check(&line, st)
}

/// Runs `c` and returns its stdout (stderr inherited); fails unless it exits 0.
pub fn output(c: &mut Command) -> Result<String> {
    let line = show(c);
    let out = c
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run `{line}`"))?;
    check(&line, out.status)?;
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed non-UTF-8"))
}

fn check(line: &str, st: ExitStatus) -> Result<()> {
    if !st.success() {
        bail!("`{line}` failed ({st})");
    }
    Ok(())
}

/// Whether `c` runs and exits 0, all output discarded.
pub fn succeeds(c: &mut Command) -> bool {
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `c` with stdout captured and stderr inherited, killing it after
/// `timeout`. Returns the exit status and stdout.
pub fn output_with_timeout(c: &mut Command, timeout: Duration) -> Result<(ExitStatus, String)> {
    // SIGINT first, so ferry-bench cleans up its children and namespaces.
    bounded(c, timeout, libc::SIGINT, false)
}

/// Runs `c`, printing its stdout as it comes and returning it with the exit
/// status (stderr inherited). After `deadline` it gets SIGTERM, then
/// SIGKILL. Only `c` itself: it stays in our process group so that Ctrl-C
/// reaches its children too, and a command with children must bound them
/// itself (scripts/rxe-vm.sh kills QEMU at its --timeout, before this).
pub fn tee_with_deadline(c: &mut Command, deadline: Duration) -> Result<(ExitStatus, String)> {
    bounded(c, deadline, libc::SIGTERM, true)
}

/// Runs `c` with stdout captured (and echoed as it comes with `tee`); after
/// `deadline` sends `signal`, then SIGKILL once [`INTERRUPT_GRACE`] passes.
fn bounded(
    c: &mut Command,
    deadline: Duration,
    signal: libc::c_int,
    tee: bool,
) -> Result<(ExitStatus, String)> {
    use std::io::{BufRead, Write};
    let line = show(c);
    println!("$ {line}");
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot run `{line}`"))?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        let mut r = std::io::BufReader::new(stdout);
        let mut buf = Vec::new();
        // Bytes, not lines of UTF-8: a serial console is not always valid text.
        while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let l = String::from_utf8_lossy(&buf);
            if tee {
                print!("{l}");
                let _ = std::io::stdout().flush();
            }
            all.push_str(&l);
            buf.clear();
        }
        all
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if start.elapsed() > deadline {
            let pid = child.id() as libc::pid_t;
            // SAFETY: kill(2) on our own unreaped child's pid; no memory is involved.
            unsafe { libc::kill(pid, signal) };
            let grace = Instant::now();
            while grace.elapsed() < INTERRUPT_GRACE && child.try_wait()?.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{line}` did not finish within {} s", deadline.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = reader.join().unwrap_or_default();
    Ok((status, out))
}

/// Seconds with one decimal.
pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_commands_as_typed() {
        let mut c = Command::new("/usr/bin/cargo");
        c.args(["doc", "--workspace", "it's here", ""]);
        assert_eq!(show(&c), r"cargo doc --workspace 'it'\''s here' ''");
    }
}
