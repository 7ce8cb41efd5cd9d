//! `ferry-bench policies`: every (workload, policy) pair, K times each, one
//! fresh testbed and one real migration per run (`migrate::run` with
//! `--no-blast` under a bandwidth cap), then a table, `policies.json` and a
//! chart.
//!
//! ```text
//!  for repeat in 1..=K, for workload, for policy:
//!      migrate::run (fresh ferryds + VMM, warm-up, capped migration, checks)
//!      ─▶ runs[] ─▶ policies.json rewritten (a broken-off experiment keeps
//!                   what it did)
//!  rows = aggregate(runs) ─▶ table (stdout) + policies.json + policies.svg
//! ```
//!
//! Repeats are the outer loop so that drift on the machine spreads over all
//! pairs instead of landing on one. A run that does not complete is a result,
//! not an error: it is checked as "stayed on source".

pub mod aggregate;
pub mod chart;
pub mod workload;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::experiment::{check_warmup_s, first_duplicate, write_json};
use crate::migrate::{self, MigrateArgs, Policy, Transport};
use crate::procs;
use crate::ui::Ui;
use aggregate::{aggregate, Row, Run, Table};
use workload::WorkloadSpec;

/// A run's fixed cost before migrating: two ferryds and a VMM start, and
/// everything stops, in about 5 s on a loaded 2-core machine.
const RUN_OVERHEAD_S: u64 = 5;
/// The guest's first pass writes all of its memory; 256 MiB/s is a slow
/// guest on this machine, so the estimate errs long.
const FIRST_PASS_MIB_S: u64 = 256;
/// Cap on --repeat: 100 repeats of one pair is already hours.
const REPEAT_MAX: u32 = 100;
/// The experiment's files in --out.
pub const JSON_FILE: &str = "policies.json";
/// The chart's file in --out.
pub const CHART_FILE: &str = "policies.svg";

/// Options of `ferry-bench policies`.
#[derive(Clone, Debug, Args)]
pub struct PoliciesArgs {
    /// Guest memory in MiB.
    #[arg(long, value_parser = migrate::parse_mem_mib)]
    pub mem_mib: u64,
    /// Comma-separated workloads: ferry-vmm's (`idle`, `fill`, `mixed`,
    /// `dirty:<MiB/s>[:hot=<pct>][:fill]`) or `dirty:<F>x[:hot=<pct>][:fill]`, a dirty rate
    /// of F times --bandwidth-mib-s (`dirty:0.5x,dirty:1.5x:hot=90`).
    #[arg(long, value_delimiter = ',', required = true)]
    pub workloads: Vec<WorkloadSpec>,
    /// Comma-separated policies; include `baseline` for the ratio columns.
    #[arg(long, value_enum, value_delimiter = ',', required = true)]
    pub policies: Vec<Policy>,
    /// Bandwidth cap of every migration, MiB/s.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub bandwidth_mib_s: u64,
    /// Runs of each (workload, policy).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=REPEAT_MAX as i64))]
    pub repeat: u32,
    /// Where to write policies.json and policies.svg (created if missing).
    #[arg(long, default_value = "ferry-policies")]
    pub out: PathBuf,
    /// Downtime budget (default: ferryd's).
    #[arg(long)]
    pub downtime_ms: Option<u64>,
    /// Downtime a policy may spend to force convergence (default: ferryd's).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub downtime_max_ms: Option<u64>,
    /// The engine gives up after this many seconds; bounds every run.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub time_max_s: u64,
    /// The engine gives up after this many rounds (default: ferryd's).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds_max: Option<u32>,
    /// XOR-delta cache in MiB, 0 = off (default: ferryd's).
    #[arg(long)]
    pub xor_cache_mib: Option<u64>,
    /// Data streams.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=crate::blast::STREAMS_MAX as i64))]
    pub streams: u32,
    /// For dirty workloads: seconds of dirtying before each migration.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_s: f64,
    /// Print the experiment (as in policies.json) on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Keep each run's scratch directory with the daemons' and VMM's logs.
    #[arg(long)]
    pub keep_logs: bool,
    /// Where ferryd and ferry-vmm are (default: next to ferry-bench).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

/// The experiment's settings, as recorded in policies.json.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// Guest memory.
    pub mem_mib: u64,
    /// Bandwidth cap.
    pub bandwidth_mib_s: u64,
    /// Runs per pair.
    pub repeat: u32,
    /// Streams.
    pub streams: u32,
    /// Downtime budget (None: ferryd's).
    pub downtime_ms: Option<u64>,
    /// Forced-convergence downtime cap (None: ferryd's).
    pub downtime_max_ms: Option<u64>,
    /// The engine's time limit.
    pub time_max_s: u64,
    /// The engine's round limit (None: ferryd's).
    pub rounds_max: Option<u32>,
    /// XOR-delta cache (None: ferryd's).
    pub xor_cache_mib: Option<u64>,
    /// Warm-up of dirty guests.
    pub warmup_s: f64,
    /// Workloads as given, and what each ran as.
    pub workloads: Vec<(String, String)>,
    /// Policies.
    pub policies: Vec<Policy>,
}

/// Everything an experiment produced: policies.json.
#[derive(Clone, Debug, Serialize)]
pub struct Experiment {
    /// Settings.
    pub config: Config,
    /// False when Ctrl-C ended it early.
    pub finished: bool,
    /// Every run, in the order made.
    pub runs: Vec<Run>,
    /// One per (workload, policy).
    pub rows: Vec<Row>,
}

impl Experiment {
    /// Every run's checks passed (whether or not it completed).
    pub fn all_verified(&self) -> bool {
        self.finished
            && self
                .runs
                .iter()
                .all(|r| r.result.as_ref().is_some_and(|b| b.verified))
    }

    /// The table of rows.
    pub fn table(&self) -> Table<'_> {
        Table(&self.rows)
    }
}

/// Rough upper bound of one run in seconds: start-up, the guest's first
/// pass and warm-up, and at most --time-max-s of migrating.
fn run_estimate_s(args: &PoliciesArgs) -> u64 {
    RUN_OVERHEAD_S + args.mem_mib / FIRST_PASS_MIB_S + args.warmup_s.ceil() as u64 + args.time_max_s
}

/// `migrate` options for one run.
fn migrate_args(
    args: &PoliciesArgs,
    workload: crate::workload::Workload,
    p: Policy,
) -> MigrateArgs {
    MigrateArgs {
        mem_mib: args.mem_mib,
        workload,
        transport: Transport::Tcp,
        listen_ip: std::net::Ipv4Addr::LOCALHOST.into(),
        streams: args.streams,
        downtime_ms: args.downtime_ms,
        bandwidth_mib_s: Some(args.bandwidth_mib_s),
        policy: Some(p),
        mode: ferry_engine::Mode::Precopy,
        checkpoint_ms: None,
        downtime_max_ms: args.downtime_max_ms,
        xor_cache_mib: args.xor_cache_mib,
        time_max_s: Some(args.time_max_s),
        rounds_max: args.rounds_max,
        no_blast: true,
        warmup_s: args.warmup_s,
        netns: false,
        no_reserve: false,
        link_rate_mib_s: None,
        // migrate adds its grace past --time-max-s.
        timeout_s: args.time_max_s,
        json: false,
        keep_logs: args.keep_logs,
        bin_dir: args.bin_dir.clone(),
        disk_gib: None,
        disk_used_gib: 0.0,
        disk_fs: None,
        disk_fs_aware: false,
        disk_write_mib_s: None,
    }
}

/// Runs the experiment, writing policies.json after every run and the chart
/// at the end. `Err` only when the experiment cannot start or write its
/// files; broken runs are recorded and the experiment goes on.
pub fn run(args: &PoliciesArgs, ui: &mut Ui) -> Result<Experiment> {
    let resolved = resolve(args)?;
    let labels: Vec<String> = args.workloads.iter().map(ToString::to_string).collect();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let total = labels.len() as u64 * args.policies.len() as u64 * u64::from(args.repeat);
    ui.step(&format!(
        "{total} runs ({} workloads x {} policies x {} repeats), each at most about {} s: \
         up to {} min",
        labels.len(),
        args.policies.len(),
        args.repeat,
        run_estimate_s(args),
        (total * run_estimate_s(args)).div_ceil(60)
    ));
    let mut exp = Experiment {
        config: Config {
            mem_mib: args.mem_mib,
            bandwidth_mib_s: args.bandwidth_mib_s,
            repeat: args.repeat,
            streams: args.streams,
            downtime_ms: args.downtime_ms,
            downtime_max_ms: args.downtime_max_ms,
            time_max_s: args.time_max_s,
            rounds_max: args.rounds_max,
            xor_cache_mib: args.xor_cache_mib,
            warmup_s: args.warmup_s,
            workloads: labels
                .iter()
                .zip(&resolved)
                .map(|(l, w)| (l.clone(), w.to_string()))
                .collect(),
            policies: args.policies.clone(),
        },
        finished: false,
        runs: Vec::new(),
        rows: Vec::new(),
    };
    let started = Instant::now();
    'all: for repeat in 1..=args.repeat {
        for (label, &workload) in labels.iter().zip(&resolved) {
            for &p in &args.policies {
                ui.step(&format!(
                    "run {}/{total}: {label} ({workload}) with {p}, repeat {repeat}/{}, {:.0} s in",
                    exp.runs.len() + 1,
                    args.repeat,
                    started.elapsed().as_secs_f64()
                ));
                let r = migrate::run(&migrate_args(args, workload, p), ui);
                ui.end_live();
                let (result, error) = match r {
                    Ok(b) => {
                        ui.step(&format!(
                            "run {}: {}, {}",
                            exp.runs.len() + 1,
                            b.status,
                            if b.verified {
                                "verified"
                            } else {
                                "NOT verified"
                            }
                        ));
                        (Some(b), None)
                    }
                    Err(e) => {
                        ui.step(&format!("run {} broke: {e:#}", exp.runs.len() + 1));
                        (None, Some(format!("{e:#}")))
                    }
                };
                exp.runs.push(Run {
                    workload: label.clone(),
                    workload_resolved: workload.to_string(),
                    policy: p,
                    repeat,
                    result,
                    error,
                });
                exp.rows = aggregate(&exp.runs, &labels, &args.policies);
                write_json(&args.out, JSON_FILE, &exp)?;
                if procs::interrupted() {
                    break 'all;
                }
            }
        }
    }
    exp.finished = !procs::interrupted();
    exp.rows = aggregate(&exp.runs, &labels, &args.policies);
    write_json(&args.out, JSON_FILE, &exp)?;
    let title = format!(
        "ferry-bench policies: {} MiB guest, capped at {} MiB/s, {} run(s) per bar{}",
        args.mem_mib,
        args.bandwidth_mib_s,
        args.repeat,
        if exp.finished { "" } else { " (interrupted)" }
    );
    chart::write(
        &args.out.join(CHART_FILE),
        &title,
        &exp.rows,
        &labels,
        &args.policies,
    )?;
    ui.step(&format!(
        "wrote {} and {} in {}",
        JSON_FILE,
        CHART_FILE,
        args.out.display()
    ));
    Ok(exp)
}

/// Checks the lists and resolves every workload against the cap.
fn resolve(args: &PoliciesArgs) -> Result<Vec<crate::workload::Workload>> {
    check_warmup_s(args.warmup_s)?;
    let labels: Vec<String> = args.workloads.iter().map(ToString::to_string).collect();
    if let Some(d) = first_duplicate(&labels) {
        bail!("--workloads names {d} twice");
    }
    if let Some(d) = first_duplicate(&args.policies) {
        bail!("--policies names {d} twice");
    }
    let resolved = args
        .workloads
        .iter()
        .map(|w| w.resolve(args.bandwidth_mib_s))
        .collect::<Result<Vec<_>, String>>()
        .map_err(|e| anyhow::anyhow!("--workloads: {e}"))?;
    let as_run: Vec<String> = resolved.iter().map(ToString::to_string).collect();
    if let Some(d) = first_duplicate(&as_run) {
        bail!("two entries of --workloads both run as {d}");
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        p: PoliciesArgs,
    }

    fn parse(args: &[&str]) -> Result<PoliciesArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("ferry-bench").chain(args.iter().copied())).map(|c| c.p)
    }

    const BASE: [&str; 8] = [
        "--mem-mib",
        "128",
        "--workloads",
        "dirty:0.5x,dirty:3x,dirty:1.5x:hot=90,fill",
        "--policies",
        "baseline,adaptive,hot-defer",
        "--bandwidth-mib-s",
        "64",
    ];

    #[test]
    fn parses_lists_and_defaults() {
        let a = parse(&BASE).unwrap();
        assert_eq!(a.workloads.len(), 4);
        assert_eq!(
            a.policies,
            [Policy::Baseline, Policy::Adaptive, Policy::HotDefer]
        );
        assert_eq!((a.repeat, a.time_max_s, a.streams), (1, 30, 4));
        let w: Vec<String> = resolve(&a)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(w, ["dirty:32", "dirty:192", "dirty:96:hot=90", "fill"]);
        let m = migrate_args(&a, resolve(&a).unwrap()[0], Policy::Adaptive);
        assert!(m.no_blast);
        assert_eq!((m.bandwidth_mib_s, m.time_max_s), (Some(64), Some(30)));
        assert_eq!(m.policy, Some(Policy::Adaptive));
    }

    #[test]
    fn rejects_bad_lists() {
        let with = |flag: &str, v: &str| {
            let mut a: Vec<&str> = BASE.to_vec();
            let i = a.iter().position(|x| *x == flag).unwrap();
            a[i + 1] = v;
            a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
        };
        for (flag, v) in [
            ("--policies", "baseline,fastest"),
            ("--policies", ""),
            ("--workloads", "dirty:0x"),
            ("--workloads", "spin"),
            ("--bandwidth-mib-s", "0"),
        ] {
            let a = with(flag, v);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            assert!(parse(&a).is_err(), "{flag} {v} parsed");
        }
        // Parsed, but refused before any run.
        for (flag, v) in [
            ("--workloads", "dirty:1x,dirty:1x"),
            ("--workloads", "dirty:1x,dirty:64"),
            ("--workloads", "dirty:0.001x"),
            ("--policies", "mp,mp"),
        ] {
            let a = with(flag, v);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            assert!(resolve(&parse(&a).unwrap()).is_err(), "{flag} {v} accepted");
        }
    }

    #[test]
    fn estimate_counts_every_part() {
        // 128 MiB: the first pass rounds to 0 s; 2 s warm-up; 30 s limit.
        let a = parse(&BASE).unwrap();
        assert_eq!(run_estimate_s(&a), RUN_OVERHEAD_S + 2 + 30);
        let mut big = a.clone();
        big.mem_mib = 1024;
        assert_eq!(run_estimate_s(&big), RUN_OVERHEAD_S + 4 + 2 + 30);
    }
}
