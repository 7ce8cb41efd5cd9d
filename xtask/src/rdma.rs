//! `cargo xtask rdma`: the rdma transport tested where RDMA exists: inside
//! one QEMU guest with a soft-RoCE device (`scripts/rxe-vm.sh`), because the
//! kernels of our CI machines have no RDMA at all.
//!
//! ```text
//!  host:  cargo test -p ferry-transport --lib --test conformance --no-run
//!         cargo test -p ferry-bench --lib --no-run
//!         cargo build --release --bins
//!         <target>/xtask-rdma/guest.sh   (the parts below, as sh)
//!         scripts/rxe-vm.sh --timeout 600 -- sh guest.sh          one boot
//!  guest: rxe0 on 10.77.0.1, FERRY_RDMA_ADDR=10.77.0.1
//!         conformance  <conformance binary> rdma --nocapture --test-threads=1
//!         unit         <transport unit tests> rdma --nocapture --test-threads=1
//!         bench-probe  <ferry-bench unit tests> rdma: finds rxe0, calls it software
//!         rdma         ferry-bench migrate --transport rdma --listen-ip 10.77.0.1 ...
//!         tcp          the same migration over tcp, only when the rdma one
//!                      failed: tells a broken VM from a broken transport
//!         each part:   XTASK-RDMA-BEGIN <part> ... XTASK-RDMA-END <part> rc=N
//!         migrations:  XTASK-RDMA-JSON <part> <ferry-bench's JSON on one line>
//!  host:  the console, judged part by part from those lines
//! ```
//!
//! `FERRY_RDMA_ADDR` tells the rdma tests that a device is there: they run
//! and must pass. A filter that matches no test fails the part, so the stage
//! cannot pass without having tested rdma.
//!
//! Time, measured on a 2-core machine: the boot takes ~10 s under TCG and a
//! 64 MiB tcp migration in the guest ~17 s; the whole stage with warm builds
//! is about a minute. The timeouts below only catch hangs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::ci::{judge_migration, target_dir, Outcome};
use crate::sh;

/// The guest's RDMA address (scripts/rxe-vm.sh binds rxe0's netdev to it).
const GUEST_ADDR: &str = "10.77.0.1";
/// The guest: 2 GiB holds the 64 MiB VM, the target's 64 MiB reserve and
/// the blast buffers many times over; 2 vCPUs for source and target.
const GUEST_MEM_MIB: u32 = 2048;
const GUEST_CPUS: u32 = 2;
/// Deadline of the whole guest run (boot, every part, power-off), enforced by
/// the script around QEMU. The part deadlines below add up to more (240 +
/// 60 + 60 + 240 + 240 s) only when several parts hang; then this wins and
/// the console so far says which.
const VM_TIMEOUT_S: u64 = 600;
/// xtask's own deadline on the script, past the VM's: building the initrd
/// and QEMU's kill grace take seconds; this only catches a stuck script.
const SCRIPT_GRACE: Duration = Duration::from_secs(60);
/// The conformance suite caps each case at 60 s (CASE_DEADLINE); rdma under
/// TCG is slow, so a few minutes for the lot.
const CONFORMANCE_TIMEOUT_S: u64 = 240;
/// Unit tests are small.
const UNIT_TIMEOUT_S: u64 = 60;
/// ferry-bench's own cancel of a migration (--timeout-s), and the guest's
/// deadline on the whole ferry-bench run (start-up, warm-up, blasts, checks).
const MIGRATION_TIMEOUT_S: u64 = 120;
const BENCH_TIMEOUT_S: u64 = 240;
/// The migration: small, so TCG moves it in seconds; mixed pages (zero, lz4,
/// raw) over two streams.
const BENCH_ARGS: &[&str] = &["--mem-mib", "64", "--workload", "mixed", "--streams", "2"];

/// Markers the guest script prints.
const BEGIN: &str = "XTASK-RDMA-BEGIN ";
const END: &str = "XTASK-RDMA-END ";
const JSON: &str = "XTASK-RDMA-JSON ";

/// Why the VM cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    if !sh::succeeds(Command::new("qemu-system-x86_64").arg("--version")) {
        return Some("no qemu-system-x86_64 (Debian: qemu-system-x86)".into());
    }
    let has_kernel = std::fs::read_dir("/boot").is_ok_and(|d| {
        d.filter_map(|e| e.ok()).any(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("vmlinuz-") && n.ends_with("-amd64")
        })
    });
    if !has_kernel {
        return Some("no Debian kernel in /boot (Debian: linux-image-amd64)".into());
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("no /bin/busybox (Debian: busybox-static)".into());
    }
    None
}

/// The test binaries to run in the guest.
struct TestBins {
    conformance: PathBuf,
    unit: PathBuf,
    bench: PathBuf,
}

/// Builds the transport's unit and conformance test binaries and
/// ferry-bench's unit tests (its RDMA device probe); their paths from
/// cargo's JSON messages.
fn build_test_bins() -> Result<TestBins> {
    let out = sh::output(sh::cargo().args([
        "test",
        "-p",
        "ferry-transport",
        "--lib",
        "--test",
        "conformance",
        "--no-run",
        "--message-format=json",
    ]))?;
    let (conformance, unit) = test_executables(&out);
    let (_, bench) = test_executables(&sh::output(sh::cargo().args([
        "test",
        "-p",
        "ferry-bench",
        "--lib",
        "--no-run",
        "--message-format=json",
    ]))?);
    Ok(TestBins {
        conformance: conformance.context("cargo reported no conformance test binary")?,
        unit: unit.context("cargo reported no unit test binary of ferry-transport")?,
        bench: bench.context("cargo reported no unit test binary of ferry-bench")?,
    })
}

/// From cargo's JSON messages: the `conformance` integration test binary
/// and the library's unit test binary, when built.
fn test_executables(messages: &str) -> (Option<PathBuf>, Option<PathBuf>) {
    let (mut conformance, mut unit) = (None, None);
    for line in messages.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(exe) = v["executable"].as_str() else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let kinds = v["target"]["kind"].as_array().cloned().unwrap_or_default();
        if v["target"]["name"] == "conformance" && kinds.iter().any(|k| k == "test") {
            conformance = Some(PathBuf::from(exe));
        } else if kinds.iter().any(|k| k == "lib") {
            unit = Some(PathBuf::from(exe));
        }
    }
    (conformance, unit)
}

/// Single-quotes `s` for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script the guest runs: every part, with its markers; exits non-zero
/// when any part failed.
fn guest_script(bins: &TestBins, bench: &Path) -> String {
    let q = |p: &Path| sh_quote(&p.display().to_string());
    let bench_args = BENCH_ARGS.join(" ");
    format!(
        r#"#!/bin/sh
# Written by `cargo xtask rdma`; runs inside scripts/rxe-vm.sh's guest.
export FERRY_RDMA_ADDR={GUEST_ADDR}
# A console log, not a terminal: no live progress lines from ferry-bench.
export CI=true
failed=0
part() {{
    part_name=$1; shift
    echo "{BEGIN}$part_name"
    "$@"
    part_rc=$?
    echo "{END}$part_name rc=$part_rc"
    [ "$part_rc" -eq 0 ] || failed=1
    return "$part_rc"
}}
# ferry-bench's JSON on one marker line (its progress goes to stderr).
bench() {{
    bench_name=$1; shift
    timeout -s INT -k 15 {BENCH_TIMEOUT_S} {bench} migrate "$@" --timeout-s {MIGRATION_TIMEOUT_S} --json >/tmp/bench-$bench_name.json
    bench_rc=$?
    echo "{JSON}$bench_name $(tr -d '\n' </tmp/bench-$bench_name.json)"
    return "$bench_rc"
}}
echo "guest: $(uname -r), $(nproc) CPUs, $(rdma link 2>&1 | head -1)"
part conformance timeout -k 5 {CONFORMANCE_TIMEOUT_S} {conformance} rdma --nocapture --test-threads=1
part unit timeout -k 5 {UNIT_TIMEOUT_S} {unit} rdma --nocapture --test-threads=1
part bench-probe timeout -k 5 {UNIT_TIMEOUT_S} {bench_tests} rdma --nocapture --test-threads=1
if ! part rdma bench rdma --transport rdma --listen-ip {GUEST_ADDR} {bench_args}; then
    part tcp bench tcp --transport tcp --listen-ip {GUEST_ADDR} {bench_args}
    # The control's verdict is a diagnosis, not a result of its own.
    failed=1
fi
exit "$failed"
"#,
        bench = q(bench),
        conformance = q(&bins.conformance),
        unit = q(&bins.unit),
        bench_tests = q(&bins.bench),
    )
}

/// One part's lines and verdict, from the console.
#[derive(Debug, Default)]
struct Part {
    lines: Vec<String>,
    rc: Option<i32>,
    json: Option<String>,
}

/// The console with carriage returns and terminal escapes removed.
fn clean_line(l: &str) -> String {
    let mut out = String::with_capacity(l.len());
    let mut chars = l.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            // ESC [ ... final byte, or ESC and one more character.
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// The parts by name, in the order they began. A marker may follow other
/// output on its line (a program that ended without a newline); that output
/// stays with the part it came from.
fn parse_console(console: &str) -> Vec<(String, Part)> {
    let mut parts: Vec<(String, Part)> = Vec::new();
    let mut current: Option<usize> = None;
    for raw in console.lines() {
        let mut line = clean_line(raw);
        if let Some(at) = [BEGIN, END, JSON]
            .iter()
            .filter_map(|m| line.find(m))
            .min()
            .filter(|&at| at > 0)
        {
            if let Some(i) = current {
                parts[i].1.lines.push(line[..at].to_string());
            }
            line = line[at..].to_string();
        }
        if let Some(name) = line.strip_prefix(BEGIN) {
            parts.push((name.trim().to_string(), Part::default()));
            current = Some(parts.len() - 1);
        } else if let Some(rest) = line.strip_prefix(END) {
            let (name, rc) = rest.split_once(" rc=").unwrap_or((rest, ""));
            if let Some((_, p)) = parts.iter_mut().find(|(n, _)| n == name.trim()) {
                p.rc = rc.trim().parse().ok();
            }
            current = None;
        } else if let Some(rest) = line.strip_prefix(JSON) {
            let (name, json) = rest.split_once(' ').unwrap_or((rest, ""));
            if let Some((_, p)) = parts.iter_mut().find(|(n, _)| n == name) {
                p.json = Some(json.to_string());
            }
        } else if let Some(i) = current {
            parts[i].1.lines.push(line);
        }
    }
    parts
}

/// Passed and failed tests over a part's libtest summaries
/// ("test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 9 filtered out").
fn test_counts(lines: &[String]) -> Option<(u64, u64)> {
    let mut seen = None;
    for l in lines {
        let Some(rest) = l.split("test result: ").nth(1) else {
            continue;
        };
        let count = |what: &str| -> u64 {
            rest.split(';')
                .find_map(|f| f.trim().strip_suffix(what))
                .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
                .unwrap_or(0)
        };
        let (p, f) = seen.unwrap_or((0, 0));
        seen = Some((p + count(" passed"), f + count(" failed")));
    }
    seen
}

/// A test part's verdict: the summary, or why it failed.
fn judge_tests(name: &str, p: Option<&Part>) -> Result<String, String> {
    let Some(p) = p else {
        return Err(format!("{name}: did not run"));
    };
    let counts = test_counts(&p.lines);
    match (p.rc, counts) {
        (Some(0), Some((0, _))) => Err(format!(
            "{name}: no test matches `rdma` (the rdma tests are not in this build)"
        )),
        (Some(0), Some((n, _))) => Ok(format!("{name}: {n} passed")),
        (Some(0), None) => Ok(format!("{name}: passed")),
        (Some(124 | 137), _) => Err(format!("{name}: timed out")),
        (Some(rc), Some((n, f))) => Err(format!("{name}: {f} failed, {n} passed (exit {rc})")),
        (Some(rc), None) => Err(format!("{name}: exit {rc}")),
        (None, _) => Err(format!("{name}: did not finish")),
    }
}

/// A migration part's verdict, as the end-to-end stage judges its runs.
fn judge_bench(name: &str, p: Option<&Part>) -> Result<String, String> {
    let Some(p) = p else {
        return Err(format!("{name} migration: did not run"));
    };
    let json = p.json.as_deref().unwrap_or("");
    let exit = match p.rc {
        Some(rc) => format!("exit {rc}"),
        None => "did not finish".into(),
    };
    let mut line = judge_migration(p.rc == Some(0), &exit, json, true)
        .map_err(|e| format!("{name} migration: {e:#}"))?;
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(json) {
        if v["rdma"]["software_emulation"] == true {
            line.push_str(" (software RDMA emulation: the rates are not meaningful)");
        }
    }
    Ok(format!("{name} migration: {line}"))
}

/// The stage: builds, one VM run, the verdict of every part.
pub fn stage() -> Result<Outcome> {
    println!("==> test binaries");
    let bins = build_test_bins()?;
    println!("conformance: {}", bins.conformance.display());
    println!("unit tests:  {}", bins.unit.display());
    println!("==> release binaries");
    sh::run(sh::cargo().args(["build", "--release", "--bins"]))?;
    let target = target_dir()?;
    // The guest sees the host's files read-only, except /tmp, which is a
    // tmpfs of its own there: a checkout under /tmp (a CI clone) would be
    // invisible. So the binaries and the script go to a staging directory
    // under /var/tmp, the release binaries side by side as ferry-bench
    // expects (it finds ferryd and ferry-vmm next to itself).
    let stage = Staging::new()?;
    let copy = |from: &Path| -> Result<PathBuf> {
        let name = from.file_name().context("a binary has a file name")?;
        let to = stage.0.join(name);
        if std::fs::hard_link(from, &to).is_err() {
            std::fs::copy(from, &to)
                .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        }
        Ok(to)
    };
    for bin in ["ferryd", "ferry", "ferry-vmm"] {
        copy(&target.join("release").join(bin))?;
    }
    let bench = copy(&target.join("release").join("ferry-bench"))?;
    let bins = TestBins {
        conformance: copy(&bins.conformance)?,
        unit: copy(&bins.unit)?,
        bench: copy(&bins.bench)?,
    };
    let script = stage.0.join("guest.sh");
    std::fs::write(&script, guest_script(&bins, &bench))
        .with_context(|| format!("cannot write {}", script.display()))?;
    println!("==> one soft-RoCE VM: conformance, unit tests, an rdma migration");
    let boot = || -> Result<(std::process::ExitStatus, String)> {
        let mut c = Command::new(sh::root().join("scripts").join("rxe-vm.sh"));
        c.current_dir(sh::root())
            .args(["--mem", &GUEST_MEM_MIB.to_string()])
            .args(["--smp", &GUEST_CPUS.to_string()])
            .args(["--timeout", &VM_TIMEOUT_S.to_string()])
            .arg("--")
            .arg("sh")
            .arg(&script);
        let deadline = Duration::from_secs(VM_TIMEOUT_S) + SCRIPT_GRACE;
        sh::tee_with_deadline(&mut c, deadline)
    };
    let vm_start = std::time::Instant::now();
    let (mut status, mut console) = boot()?;
    let mut retried = None;
    // The emulated CPU's nested virtualization (ferry-vmm's KVM guest
    // inside the TCG guest) occasionally crashes the guest kernel, or hangs
    // it (once, before the guest VMM even registered): that is the
    // emulator, not ferry. Boot once more; a second crash or hang fails.
    let trouble = guest_panic(&console)
        .map(|p| format!("the guest kernel panicked ({p})"))
        .or_else(|| {
            (status.code() == Some(124))
                .then(|| format!("the VM hung: it did not finish within {VM_TIMEOUT_S} s"))
        });
    if let Some(panic) = trouble {
        println!("xtask rdma: {panic}; booting the VM once more");
        retried = Some(panic);
        (status, console) = boot()?;
    }
    let vm_took = sh::secs(vm_start.elapsed());
    let parts = parse_console(&console);
    let find = |n: &str| parts.iter().find(|(p, _)| p == n).map(|(_, p)| p);
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for r in [
        judge_tests("conformance", find("conformance")),
        judge_tests("unit tests", find("unit")),
        judge_tests("ferry-bench's rdma tests", find("bench-probe")),
        judge_bench("rdma", find("rdma")),
    ] {
        match r {
            Ok(s) => ok.push(s),
            Err(s) => failed.push(s),
        }
    }
    if find("tcp").is_some() {
        // The control ran because the rdma migration failed: say what it shows.
        failed.push(match judge_bench("tcp", find("tcp")) {
            Ok(s) => format!("{s}, so the VM and nested KVM work: rdma is what fails"),
            Err(s) => format!("{s}: the VM itself is broken too"),
        });
    }
    if status.code() == Some(124) {
        failed.push(format!("the VM did not finish within {VM_TIMEOUT_S} s"));
    } else if failed.is_empty() && !status.success() {
        failed.push(format!("scripts/rxe-vm.sh failed ({status})"));
    }
    if let Some(panic) = guest_panic(&console) {
        failed.push(format!("the guest kernel panicked: {panic}"));
    }
    ok.push(format!("the VM ran {vm_took}"));
    if let Some(first) = retried {
        ok.push(format!("after one retry: on the first boot, {first}"));
    }
    if failed.is_empty() {
        Ok(Outcome::Ok(ok.join("; ")))
    } else {
        let mut all = failed;
        all.extend(ok);
        Ok(Outcome::Failed(all.join("; ")))
    }
}

/// The guest kernel's panic message, if the console shows one. "Attempted
/// to kill init" is not one: it comes after the guest script has ended,
/// when init exits before the power-off lands.
fn guest_panic(console: &str) -> Option<String> {
    const PANIC: &str = "Kernel panic - not syncing: ";
    console.lines().find_map(|l| {
        let l = clean_line(l);
        let what = l[l.find(PANIC)? + PANIC.len()..].trim().to_string();
        (!what.starts_with("Attempted to kill init")).then_some(what)
    })
}

/// A directory under /var/tmp the guest can read, removed on drop.
struct Staging(PathBuf);

impl Staging {
    fn new() -> Result<Staging> {
        let dir = PathBuf::from(format!("/var/tmp/ferry-xtask-rdma-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Staging(dir))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `cargo xtask rdma` on its own: packages, then the stage.
pub fn run() -> Result<()> {
    let start = std::time::Instant::now();
    println!("==> system packages");
    println!("{}", crate::deps::ensure()?);
    if let Some(why) = unavailable() {
        bail!("cannot boot the soft-RoCE VM: {why}");
    }
    let outcome = stage()?;
    let took = sh::secs(start.elapsed());
    match outcome {
        Outcome::Ok(note) => {
            println!("xtask rdma: ok in {took}: {note}");
            Ok(())
        }
        Outcome::Failed(why) | Outcome::Skipped(why) => {
            println!("xtask rdma: FAILED in {took}: {why}");
            bail!("the rdma stage failed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_parts_and_test_counts() {
        let console = "\u{1b}c\u{1b}[?7l\u{1b}[2JSeaBIOS\r\n\
            XTASK-RDMA-BEGIN conformance\r\n\
            running 2 tests\r\n\
            test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 7 filtered out; finished in 1.2s\r\n\
            XTASK-RDMA-END conformance rc=0\r\n\
            XTASK-RDMA-BEGIN unit\r\n\
            test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 40 filtered out\r\n\
            XTASK-RDMA-END unit rc=0\r\n\
            XTASK-RDMA-BEGIN rdma\r\n\
            \u{1b}[Kround 1, 3 MiB sentXTASK-RDMA-JSON rdma {\"status\": \"failed\", \"verified\": true}\r\n\
            XTASK-RDMA-END rdma rc=1\r\n\
            XTASK-RDMA-BEGIN tcp\r\n";
        let parts = parse_console(console);
        let names: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["conformance", "unit", "rdma", "tcp"]);
        let p = |n: &str| parts.iter().find(|(x, _)| x == n).map(|(_, p)| p);
        assert_eq!(test_counts(&p("conformance").unwrap().lines), Some((2, 0)));
        assert_eq!(
            judge_tests("conformance", p("conformance")),
            Ok("conformance: 2 passed".into())
        );
        let e = judge_tests("unit tests", p("unit")).unwrap_err();
        assert!(e.contains("no test matches `rdma`"), "{e}");
        assert_eq!(
            p("rdma").unwrap().json.as_deref(),
            Some("{\"status\": \"failed\", \"verified\": true}")
        );
        assert!(judge_bench("rdma", p("rdma")).is_err());
        assert_eq!(p("rdma").unwrap().lines, ["round 1, 3 MiB sent"]);
        assert_eq!(p("tcp").unwrap().rc, None);
        assert!(judge_tests("missing", None).is_err());
        let failing = vec![
            "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out".into(),
        ];
        assert_eq!(test_counts(&failing), Some((1, 2)));
        assert_eq!(clean_line("a\u{1b}[0mb\r"), "ab");
    }

    #[test]
    fn guest_panics_are_found_but_not_the_one_at_power_off() {
        let crash =
            "[   36.6] Kernel panic - not syncing: corrupted stack end detected inside scheduler\n";
        assert_eq!(
            guest_panic(&format!("boot\n{crash}more")).as_deref(),
            Some("corrupted stack end detected inside scheduler")
        );
        let off =
            "[    7.1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00007f00\n";
        assert_eq!(guest_panic(off), None);
        assert_eq!(guest_panic("all fine\n"), None);
    }

    #[test]
    fn guest_script_quotes_paths_and_runs_every_part() {
        let bins = TestBins {
            conformance: "/t/debug/deps/conformance-1".into(),
            unit: "/t/debug/deps/ferry_transport-2".into(),
            bench: "/t/debug/deps/ferry_bench-3".into(),
        };
        let s = guest_script(&bins, Path::new("/t/it's/ferry-bench"));
        assert!(s.contains("export FERRY_RDMA_ADDR=10.77.0.1\n"), "{s}");
        assert!(s.contains(r"'/t/it'\''s/ferry-bench' migrate"), "{s}");
        assert!(s.contains(
            "part conformance timeout -k 5 240 '/t/debug/deps/conformance-1' rdma --nocapture --test-threads=1"
        ));
        assert!(s.contains(
            "part rdma bench rdma --transport rdma --listen-ip 10.77.0.1 --mem-mib 64 --workload mixed --streams 2"
        ));
    }
}
