//! `cargo xtask ci`: every check the project runs, stage by stage.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{deps, junit, kvm_unavailable, rdma, sh};

/// One end-to-end migration of the CI run.
struct E2eRun {
    mem_mib: u32,
    workload: &'static str,
    netns: bool,
    /// More `ferry-bench migrate` flags.
    extra: &'static [&'static str],
    /// Whether the migration must complete (else it must give up and the
    /// VM must be verified still running on the source).
    complete: bool,
    /// Whether it must have switched to post-copy.
    postcopy: bool,
}

/// Small guests, so the stage takes about a minute and a half on 2 cores:
/// an idle guest (zero pages), a mixed one (zero, lz4 and raw pages), a
/// dirtying one (several rounds), the mixed one again across two network
/// namespaces (root only), a hot-set guest outrunning a capped link under
/// the default adaptive policy (hot pages held, XOR-delta), and a guest at
/// 6x a capped link under the baseline policy, which must give up and leave
/// the VM running on the source. Two carry a disk: a raw image with
/// scattered extents that the guest keeps writing (block stamps, disk hash
/// on both sides), and an ext4 image with deleted files moved file-system
/// aware (e2fsck and every file compared on the target); the give-up run
/// has a disk too, which the target must not keep. One runs both ferryds on
/// the io_uring transport. Two move the guest post-copy: straight after its
/// state, and (hybrid) after pre-copy rounds that cannot keep up with a
/// capped link.
const E2E_RUNS: &[E2eRun] = &[
    E2eRun {
        mem_mib: 256,
        workload: "idle",
        netns: false,
        extra: &[],
        complete: true,
        postcopy: false,
    },
    E2eRun {
        mem_mib: 512,
        workload: "mixed",
        netns: false,
        extra: &[],
        complete: true,
        postcopy: false,
    },
    E2eRun {
        mem_mib: 256,
        workload: "dirty:50",
        netns: false,
        extra: &[
            "--disk-gib",
            "0.5",
            "--disk-used-gib",
            "0.125",
            "--disk-write-mib-s",
            "20",
        ],
        complete: true,
        postcopy: false,
    },
    E2eRun {
        mem_mib: 128,
        workload: "mixed",
        netns: false,
        extra: &[
            "--disk-gib",
            "0.5",
            "--disk-used-gib",
            "0.125",
            "--disk-fs",
            "ext4",
            "--disk-fs-aware",
            "--disk-write-mib-s",
            "10",
        ],
        complete: true,
        postcopy: false,
    },
    E2eRun {
        mem_mib: 256,
        workload: "mixed",
        netns: true,
        extra: &[],
        complete: true,
        postcopy: false,
    },
    E2eRun {
        mem_mib: 256,
        workload: "dirty:50",
        netns: false,
        extra: &["--transport", "uring"],
        complete: true,
        postcopy: false,
    },
    E2eRun {
        mem_mib: 256,
        workload: "dirty:64",
        netns: false,
        extra: &["--mode", "postcopy"],
        complete: true,
        postcopy: true,
    },
    E2eRun {
        mem_mib: 128,
        workload: "dirty:96:fill",
        netns: false,
        extra: &["--mode", "hybrid", "--bandwidth-mib-s", "48", "--no-blast"],
        complete: true,
        postcopy: true,
    },
    E2eRun {
        mem_mib: 256,
        workload: "dirty:96:hot=90:fill",
        netns: false,
        extra: &["--bandwidth-mib-s", "64", "--no-blast"],
        complete: true,
        postcopy: false,
    },
    E2eRun {
        mem_mib: 128,
        workload: "dirty:192:fill",
        netns: false,
        extra: &[
            "--bandwidth-mib-s",
            "32",
            "--no-blast",
            "--policy",
            "baseline",
            "--time-max-s",
            "8",
            "--disk-gib",
            "0.25",
            "--disk-used-gib",
            "0.0625",
        ],
        complete: false,
        postcopy: false,
    },
];
/// ferry-bench's own deadline for a migration in CI; a 512 MiB guest
/// migrates in seconds, so minutes mean a hang.
const E2E_MIGRATION_TIMEOUT_S: u64 = 180;
/// xtask's deadline for a whole ferry-bench run (start-up, warm-up, link
/// blast, migration, checks).
const E2E_RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// How a stage ended, with a note for the summary.
pub enum Outcome {
    /// Passed.
    Ok(String),
    /// Not run here, and why.
    Skipped(String),
    /// Failed, and why.
    Failed(String),
}

struct Stage {
    name: &'static str,
    took: Duration,
    outcome: Outcome,
}

/// The target directory cargo uses (honours CARGO_TARGET_DIR and config).
pub fn target_dir() -> Result<PathBuf> {
    let out = sh::output(sh::cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let v: serde_json::Value =
        serde_json::from_str(&out).context("cargo metadata printed invalid JSON")?;
    let dir = v["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    Ok(PathBuf::from(dir))
}

fn stage(stages: &mut Vec<Stage>, name: &'static str, f: impl FnOnce() -> Result<Outcome>) {
    println!("\n==> [{}] {name}", stages.len() + 1);
    let start = Instant::now();
    let outcome = f().unwrap_or_else(|e| Outcome::Failed(format!("{e:#}")));
    let took = start.elapsed();
    let (word, note) = match &outcome {
        Outcome::Ok(n) => ("ok", n.as_str()),
        Outcome::Skipped(n) => ("skipped", n.as_str()),
        Outcome::Failed(n) => ("FAILED", n.as_str()),
    };
    let note = if note.is_empty() {
        String::new()
    } else {
        format!(": {note}")
    };
    println!("<== {name} {word} in {}{note}", sh::secs(took));
    stages.push(Stage {
        name,
        took,
        outcome,
    });
}

fn ok(r: Result<()>) -> Result<Outcome> {
    r.map(|()| Outcome::Ok(String::new()))
}

/// Runs every stage (a failure does not stop the later ones, so one run
/// shows every problem), then prints a summary line.
pub fn run() -> Result<()> {
    let start = Instant::now();
    let mut stages = Vec::new();
    stage(&mut stages, "system packages", || {
        deps::ensure().map(Outcome::Ok)
    });
    stage(&mut stages, "fmt", || {
        ok(sh::run(sh::cargo().args(["fmt", "--all", "--", "--check"])))
    });
    stage(&mut stages, "clippy", || {
        ok(sh::run(sh::cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])))
    });
    stage(&mut stages, "docs", || {
        ok(sh::run(
            sh::cargo()
                .args(["doc", "--workspace", "--no-deps"])
                .env("RUSTDOCFLAGS", "-Dwarnings"),
        ))
    });
    stage(&mut stages, "tests", tests);
    let kvm = kvm_unavailable();
    stage(&mut stages, "release build", || match &kvm {
        Some(why) => Ok(Outcome::Skipped(format!(
            "only the end-to-end stage needs it, and {why}"
        ))),
        None => ok(sh::run(sh::cargo().args(["build", "--release", "--bins"]))),
    });
    let built = stages
        .last()
        .is_some_and(|s| matches!(s.outcome, Outcome::Ok(_)));
    stage(&mut stages, "end-to-end", || match &kvm {
        Some(why) => Ok(Outcome::Skipped(why.clone())),
        None if !built => Ok(Outcome::Failed("not run: the release build failed".into())),
        None => end_to_end(),
    });
    stage(&mut stages, "fault campaign", || match &kvm {
        Some(why) => Ok(Outcome::Skipped(why.clone())),
        None if !built => Ok(Outcome::Failed("not run: the release build failed".into())),
        None => fault_campaign(),
    });
    // After the end-to-end stage, not beside it: its emulated CPUs would
    // take both cores from the end-to-end migrations, whose give-up run
    // and downtime figures depend on timing. It needs no KVM on the host
    // (the guest's KVM is emulated) and builds what it runs.
    stage(
        &mut stages,
        "rdma (soft-RoCE VM)",
        || match rdma::unavailable() {
            Some(why) => Ok(Outcome::Skipped(why)),
            None => rdma::stage(),
        },
    );

    let parts: Vec<String> = stages
        .iter()
        .map(|s| {
            let word = match s.outcome {
                Outcome::Ok(_) => "ok",
                Outcome::Skipped(_) => "skipped",
                Outcome::Failed(_) => "FAILED",
            };
            format!("{} {word} {}", s.name, sh::secs(s.took))
        })
        .collect();
    let failed: Vec<&Stage> = stages
        .iter()
        .filter(|s| matches!(s.outcome, Outcome::Failed(_)))
        .collect();
    println!();
    for s in &failed {
        if let Outcome::Failed(why) = &s.outcome {
            println!("xtask ci: {} failed: {why}", s.name);
        }
    }
    let verdict = if failed.is_empty() { "ok" } else { "FAILED" };
    println!(
        "xtask ci: {verdict} in {} ({})",
        sh::secs(start.elapsed()),
        parts.join(", ")
    );
    if !failed.is_empty() {
        bail!("{} of {} stages failed", failed.len(), stages.len());
    }
    Ok(())
}

/// Unit, integration and doc tests: nextest when installed (then doc tests
/// with cargo test, which nextest does not run), else cargo test.
fn tests() -> Result<Outcome> {
    if sh::succeeds(sh::cargo().args(["nextest", "--version"])) {
        let report = target_dir()?.join("nextest/default/junit.xml");
        // A report left by an earlier run must not be taken for this one's.
        let _ = std::fs::remove_file(&report);
        if let Err(e) =
            sh::run(sh::cargo().args(["nextest", "run", "--workspace", "--no-fail-fast"]))
        {
            let why = match junit::failures(&report) {
                Ok(f) if !f.is_empty() => format!(
                    "{e:#}; {} failing, and why:\n{}",
                    f.len(),
                    junit::render(&f).trim_end()
                ),
                Ok(_) => format!("{e:#}"),
                Err(r) => format!("{e:#} (no failures read from the JUnit report: {r})"),
            };
            return Ok(Outcome::Failed(why));
        }
        sh::run(sh::cargo().args(["test", "--workspace", "--doc"]))?;
        Ok(Outcome::Ok("cargo-nextest, then doc tests".into()))
    } else {
        sh::run(sh::cargo().args(["test", "--workspace", "--no-fail-fast"]))?;
        Ok(Outcome::Ok(
            "cargo test (cargo-nextest not installed)".into(),
        ))
    }
}

/// Why namespaces cannot be used here, if they cannot.
fn netns_unavailable() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if !sh::succeeds(Command::new("ip").args(["netns", "list"])) {
        return Some("`ip netns` does not work here".into());
    }
    None
}

fn end_to_end() -> Result<Outcome> {
    let bench = target_dir()?.join("release").join("ferry-bench");
    let netns = netns_unavailable();
    let mut done = 0;
    let mut failures = Vec::new();
    let mut notes = Vec::new();
    for run in E2E_RUNS {
        let name = format!(
            "{} MiB {}{}{}",
            run.mem_mib,
            run.workload,
            if run.netns { " across namespaces" } else { "" },
            if run.extra.is_empty() {
                String::new()
            } else {
                format!(" ({})", run.extra.join(" "))
            }
        );
        if run.netns {
            if let Some(why) = &netns {
                println!("e2e {name}: skipped ({why})");
                notes.push(format!("{name} skipped: {why}"));
                continue;
            }
        }
        let mut c = Command::new(&bench);
        c.arg("migrate")
            .args([
                "--mem-mib",
                &run.mem_mib.to_string(),
                "--workload",
                run.workload,
            ])
            .args([
                "--timeout-s",
                &E2E_MIGRATION_TIMEOUT_S.to_string(),
                "--json",
            ]);
        if run.netns {
            c.arg("--netns");
        }
        c.args(run.extra);
        match e2e_one(&mut c, run.complete, run.postcopy) {
            Ok(line) => {
                println!("e2e {name}: {line}");
                done += 1;
            }
            Err(e) => {
                println!("e2e {name}: FAILED: {e:#}");
                failures.push(name);
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} migrations failed: {}",
            failures.len(),
            done + failures.len(),
            failures.join(", ")
        );
    }
    notes.insert(0, format!("{done} migrations verified"));
    Ok(Outcome::Ok(notes.join("; ")))
}

/// The faults the CI campaign injects, in the phases it aims at: every
/// fault a migration is built to survive there (the full campaign, with
/// the fault no migration can survive, is `ferry-bench faults --cases 60`;
/// docs/benchmarks.md). Each pair runs once, in this order.
const CAMPAIGN_FAULTS: &str = "kill-src-ferryd,kill-dst-ferryd,kill-dst-vmm,cut-long";
const CAMPAIGN_PHASES: &str = "switchover,postcopy";
const CAMPAIGN_CASES: u32 = 8;
/// xtask's deadline for the campaign (a case takes 5-25 s).
const CAMPAIGN_TIMEOUT: Duration = Duration::from_secs(600);

/// `ferry-bench faults --strict` over [`CAMPAIGN_FAULTS`] x
/// [`CAMPAIGN_PHASES`]: every case must survive.
fn fault_campaign() -> Result<Outcome> {
    if !sh::succeeds(Command::new("nft").args(["list", "tables"])) {
        return Ok(Outcome::Skipped("nftables is not usable here".into()));
    }
    let bench = target_dir()?.join("release").join("ferry-bench");
    let mut c = Command::new(&bench);
    c.args([
        "faults",
        "--cases",
        &CAMPAIGN_CASES.to_string(),
        "--seed",
        "1",
        "--faults",
        CAMPAIGN_FAULTS,
        "--phases",
        CAMPAIGN_PHASES,
        "--strict",
    ]);
    let (status, out) = sh::output_with_timeout(&mut c, CAMPAIGN_TIMEOUT)?;
    println!("{}", out.trim_end());
    if !status.success() {
        bail!("ferry-bench faults ({status}): not every case survived");
    }
    let line = out
        .lines()
        .find(|l| l.starts_with("survived"))
        .unwrap_or("survived")
        .to_string();
    Ok(Outcome::Ok(line))
}

/// Runs one `ferry-bench migrate --json`; returns its summary line.
fn e2e_one(c: &mut Command, complete: bool, postcopy: bool) -> Result<String> {
    let (status, out) = sh::output_with_timeout(c, E2E_RUN_TIMEOUT)?;
    let line = judge_migration(status.success(), &status.to_string(), &out, complete)?;
    if !postcopy {
        return Ok(line);
    }
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    let p = &v["postcopy"];
    if !p.is_object() {
        bail!("it never switched to post-copy: {line}");
    }
    Ok(format!(
        "{line}; post-copy after round {}: {} stale pages, {} faults (p99 {} us)",
        p["switch_after_round"], p["stale_pages"], p["faults"], p["fault_latency_p99_us"]
    ))
}

pub fn judge_migration(exit_ok: bool, exit: &str, out: &str, complete: bool) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(out.trim()).with_context(|| {
        format!(
            "ferry-bench ({exit}) printed no JSON result: {:?}",
            out.trim()
        )
    })?;
    let verified = v["verified"].as_bool() == Some(true);
    let completed = v["status"] == "completed";
    // ferry-bench exits non-zero when the migration did not complete.
    let as_expected = if complete {
        completed && exit_ok
    } else {
        !completed && v["checks"]["stayed_on_source"]["ok"] == true
    };
    if !(verified && as_expected) {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        let failed_checks: Vec<String> = v["checks"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, c)| c["ok"] != true)
                    .map(|(k, c)| format!("{k} ({})", c["detail"].as_str().unwrap_or("?")))
                    .collect()
            })
            .unwrap_or_default();
        bail!(
            "status {}, verified {verified}{}{}",
            v["status"],
            v["error"]
                .as_str()
                .map(|e| format!(", error: {e}"))
                .unwrap_or_default(),
            if failed_checks.is_empty() {
                String::new()
            } else {
                format!(", failed checks: {}", failed_checks.join(", "))
            }
        );
    }
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    if !complete {
        return Ok(format!(
            "gave up as it must after {} rounds and {:.0} ms ({}); the VM verified running on the source",
            v["iterations"],
            f("total_time_ms"),
            v["error"].as_str().unwrap_or("no error given")
        ));
    }
    let link = if f("link_mib_s") > 0.0 {
        format!(
            " ({:.0}% of the {:.0} MiB/s link)",
            f("link_ratio") * 100.0,
            f("link_mib_s")
        )
    } else {
        String::new()
    };
    Ok(format!(
        "verified; {:.0} ms total, {:.0} ms downtime, {} rounds, {:.0} MiB/s wire{link}, policy {}",
        f("total_time_ms"),
        f("downtime_ms"),
        v["iterations"],
        f("throughput_mib_s"),
        v["policy"].as_str().unwrap_or("?")
    ))
}
