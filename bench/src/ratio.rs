//! `ferry-bench postcopy-ratio`: post-copy's total time against the time
//! ferry takes to push all of guest memory once, measured in one
//! experiment.
//!
//! The push-once reference is pre-copy's first round (the bulk round: every
//! page read, encoded, sent and written once, by the same pipeline, with
//! the same guest running), so the ratio shows what post-copy costs beyond
//! moving the memory (demand faults, checkpoints, the background push's
//! order), not what lz4 or the link cost both. Runs come in pairs, a
//! pre-copy and a post-copy of fresh VMs with the same options, in turns
//! (pre-copy first in even pairs, post-copy first in odd ones), so a
//! machine that drifts slower or faster during the experiment favours
//! neither mode.
//!
//! ```text
//! for pair k in 0..K: [precopy, postcopy] (reversed on odd k)
//!     migrate::run (fresh ferryds + VMM, warm-up, migration, checks)
//!     ─▶ runs[] ─▶ postcopy-ratio.json rewritten
//! pair ratio = postcopy total_time_ms / precopy rounds[0].ms
//! summary: median (min-max) of each figure, median of the pair ratios
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use crate::compare::aggregate::{spread, Spread};
use crate::experiment::{check_warmup_s, write_json};
use crate::migrate::report::BenchResult;
use crate::migrate::{self, MigrateArgs, Transport};
use crate::procs;
use crate::ui::Ui;
use crate::workload::Workload;

/// The experiment's record in --out.
pub const JSON_FILE: &str = "postcopy-ratio.json";
/// Cap on --pairs.
const PAIRS_MAX: u32 = 50;

/// Options of `ferry-bench postcopy-ratio`.
#[derive(Clone, Debug, Args)]
pub struct RatioArgs {
    /// Guest memory in MiB.
    #[arg(long, value_parser = migrate::parse_mem_mib)]
    pub mem_mib: u64,
    /// Guest workload: `idle`, `fill`, `mixed`, or `dirty:<MiB/s>[:hot=<pct>][:fill]`.
    #[arg(long)]
    pub workload: Workload,
    /// Data streams of every migration.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=crate::blast::STREAMS_MAX as i64))]
    pub streams: u32,
    /// Pairs of runs (one pre-copy and one post-copy each).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=PAIRS_MAX as i64))]
    pub pairs: u32,
    /// Post-copy checkpoint interval in ms (0: none; default: ferryd's).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub checkpoint_ms: Option<u64>,
    /// For dirty workloads: seconds of dirtying before each migration.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_s: f64,
    /// Where to write postcopy-ratio.json (created if missing).
    #[arg(long, default_value = "ferry-postcopy-ratio")]
    pub out: PathBuf,
    /// Print the experiment (as in postcopy-ratio.json) on stdout instead
    /// of the table.
    #[arg(long)]
    pub json: bool,
    /// Keep each run's scratch directory with the daemons' and VMM's logs.
    #[arg(long)]
    pub keep_logs: bool,
    /// Where ferryd and ferry-vmm are (default: next to ferry-bench).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

/// One migration of the experiment.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    /// 1-based, in the order run.
    pub seq: u32,
    /// The pair it belongs to (1-based).
    pub pair: u32,
    /// "precopy" or "postcopy".
    pub mode: String,
    /// What `ferry-bench migrate` reported (None if the run broke).
    pub result: Option<BenchResult>,
    /// Why the run broke or does not count.
    pub error: Option<String>,
}

/// One pair's figures (None where a run of it broke).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Pair {
    /// 1-based.
    pub pair: u32,
    /// Pre-copy's bulk round: all memory pushed once.
    pub bulk_ms: Option<u64>,
    /// Pre-copy's total time.
    pub precopy_ms: Option<u64>,
    /// Post-copy's total time.
    pub postcopy_ms: Option<u64>,
    /// postcopy_ms / bulk_ms.
    pub ratio: Option<f64>,
}

/// The experiment's summary.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Pre-copy's bulk round, ms.
    pub bulk_ms: Option<Spread>,
    /// Pre-copy's total time, ms.
    pub precopy_ms: Option<Spread>,
    /// Post-copy's total time, ms.
    pub postcopy_ms: Option<Spread>,
    /// Each whole pair's post-copy over its bulk round.
    pub ratio: Option<Spread>,
    /// Post-copy's fault latency p99, µs.
    pub fault_p99_us: Option<Spread>,
}

/// The experiment's settings, as recorded.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// The command line that ran it.
    pub command: String,
    /// Guest memory.
    pub mem_mib: u64,
    /// The guest's workload.
    pub workload: String,
    /// Streams of every migration.
    pub streams: u32,
    /// Pairs asked for.
    pub pairs: u32,
    /// The post-copy checkpoint interval asked for (None: ferryd's).
    pub checkpoint_ms: Option<u64>,
    /// Warm-up of dirty guests.
    pub warmup_s: f64,
    /// CPUs this process may run on.
    pub cpus: usize,
}

/// Everything the experiment produced: postcopy-ratio.json.
#[derive(Clone, Debug, Serialize)]
pub struct Experiment {
    /// Settings.
    pub config: Config,
    /// False when Ctrl-C ended it early.
    pub finished: bool,
    /// Every run, in the order made.
    pub runs: Vec<Run>,
    /// One per pair begun.
    pub pairs: Vec<Pair>,
    /// Over whole pairs.
    pub summary: Summary,
}

impl Experiment {
    /// Every run completed and verified.
    pub fn all_verified(&self) -> bool {
        self.finished
            && self.runs.iter().all(|r| {
                r.error.is_none() && r.result.as_ref().is_some_and(|b| b.completed && b.verified)
            })
    }
}

/// The modes of pair `k` (0-based), in the order they run.
pub fn order(k: u32) -> [ferry_engine::Mode; 2] {
    use ferry_engine::Mode::{Postcopy, Precopy};
    if k.is_multiple_of(2) {
        [Precopy, Postcopy]
    } else {
        [Postcopy, Precopy]
    }
}

fn mode_name(m: ferry_engine::Mode) -> &'static str {
    match m {
        ferry_engine::Mode::Precopy => "precopy",
        ferry_engine::Mode::Postcopy => "postcopy",
        ferry_engine::Mode::Hybrid => "hybrid",
    }
}

/// `migrate` options for one run: no link blast (the ratio does not use
/// it, and it would warm or cool the machine between runs).
fn migrate_args(args: &RatioArgs, mode: ferry_engine::Mode) -> MigrateArgs {
    MigrateArgs {
        mem_mib: args.mem_mib,
        workload: args.workload,
        transport: Transport::Tcp,
        listen_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        streams: args.streams,
        downtime_ms: None,
        bandwidth_mib_s: None,
        policy: None,
        mode,
        checkpoint_ms: args.checkpoint_ms,
        downtime_max_ms: None,
        xor_cache_mib: None,
        time_max_s: None,
        rounds_max: None,
        no_blast: true,
        warmup_s: args.warmup_s,
        netns: false,
        no_reserve: false,
        link_rate_mib_s: None,
        timeout_s: 600,
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

/// A run's result if it completed and verified.
fn good(r: &Run) -> Option<&BenchResult> {
    r.result
        .as_ref()
        .filter(|b| r.error.is_none() && b.completed && b.verified)
}

/// The pairs' figures from the runs so far.
pub fn pairs(runs: &[Run]) -> Vec<Pair> {
    let last = runs.iter().map(|r| r.pair).max().unwrap_or(0);
    (1..=last)
        .map(|pair| {
            let of = |mode: &str| {
                runs.iter()
                    .find(|r| r.pair == pair && r.mode == mode)
                    .and_then(good)
            };
            let pre = of("precopy");
            let post = of("postcopy");
            let bulk_ms = pre.and_then(|b| b.rounds.first()).map(|r| r.ms);
            let postcopy_ms = post.map(|b| b.total_time_ms);
            let ratio = match (postcopy_ms, bulk_ms) {
                (Some(p), Some(b)) if b > 0 => Some(p as f64 / b as f64),
                _ => None,
            };
            Pair {
                pair,
                bulk_ms,
                precopy_ms: pre.map(|b| b.total_time_ms),
                postcopy_ms,
                ratio,
            }
        })
        .collect()
}

/// The summary over whole pairs (both runs good).
pub fn summarize(runs: &[Run], pairs: &[Pair]) -> Summary {
    let whole: Vec<&Pair> = pairs.iter().filter(|p| p.ratio.is_some()).collect();
    let over = |f: &dyn Fn(&Pair) -> Option<f64>| {
        spread(&whole.iter().filter_map(|p| f(p)).collect::<Vec<f64>>())
    };
    let p99: Vec<f64> = runs
        .iter()
        .filter(|r| r.mode == "postcopy" && whole.iter().any(|p| p.pair == r.pair))
        .filter_map(good)
        .filter_map(|b| b.postcopy.as_ref())
        .map(|s| s.fault_latency_p99_us as f64)
        .collect();
    Summary {
        bulk_ms: over(&|p| p.bulk_ms.map(|v| v as f64)),
        precopy_ms: over(&|p| p.precopy_ms.map(|v| v as f64)),
        postcopy_ms: over(&|p| p.postcopy_ms.map(|v| v as f64)),
        ratio: over(&|p| p.ratio),
        fault_p99_us: spread(&p99),
    }
}

/// Runs the experiment, writing postcopy-ratio.json after every run. `Err`
/// only when it cannot start or write its file; broken runs are recorded
/// and the experiment goes on.
pub fn run(args: &RatioArgs, ui: &mut Ui) -> Result<Experiment> {
    check_warmup_s(args.warmup_s)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let total = 2 * args.pairs;
    ui.step(&format!(
        "{total} runs ({} pairs of a pre-copy and a post-copy of a {} MiB {} guest)",
        args.pairs, args.mem_mib, args.workload
    ));
    let mut exp = Experiment {
        config: Config {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            mem_mib: args.mem_mib,
            workload: args.workload.to_string(),
            streams: args.streams,
            pairs: args.pairs,
            checkpoint_ms: args.checkpoint_ms,
            warmup_s: args.warmup_s,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        },
        finished: false,
        runs: Vec::new(),
        pairs: Vec::new(),
        summary: Summary::default(),
    };
    'all: for k in 0..args.pairs {
        for mode in order(k) {
            let seq = exp.runs.len() as u32 + 1;
            let name = mode_name(mode);
            ui.step(&format!("run {seq}/{total}: pair {}, {name}", k + 1));
            let (result, error) = match migrate::run(&migrate_args(args, mode), ui) {
                Ok(b) if !(b.completed && b.verified) => {
                    let e = format!(
                        "{}{}",
                        b.status,
                        if b.verified { "" } else { ", not verified" }
                    );
                    (Some(b), Some(e))
                }
                Ok(b) => (Some(b), None),
                Err(e) => (None, Some(format!("{e:#}"))),
            };
            ui.end_live();
            ui.step(&format!(
                "run {seq}: {}",
                match (&result, &error) {
                    (_, Some(e)) => format!("broke: {e}"),
                    (Some(b), None) => format!(
                        "{} ms{}",
                        b.total_time_ms,
                        b.rounds
                            .first()
                            .filter(|_| mode == ferry_engine::Mode::Precopy)
                            .map(|r| format!(" (bulk round {} ms)", r.ms))
                            .unwrap_or_default()
                    ),
                    (None, None) => "no result".into(),
                }
            ));
            exp.runs.push(Run {
                seq,
                pair: k + 1,
                mode: name.into(),
                result,
                error,
            });
            exp.pairs = pairs(&exp.runs);
            exp.summary = summarize(&exp.runs, &exp.pairs);
            write_json(&args.out, JSON_FILE, &exp)?;
            if procs::interrupted() {
                break 'all;
            }
        }
    }
    exp.finished = !procs::interrupted();
    write_json(&args.out, JSON_FILE, &exp)?;
    ui.step(&format!("wrote {JSON_FILE} in {}", args.out.display()));
    Ok(exp)
}

fn ms(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn cell(s: &Option<Spread>, digits: usize) -> String {
    match s {
        Some(s) => format!(
            "{:.d$} ({:.d$}-{:.d$}, n={})",
            s.median,
            s.min,
            s.max,
            s.n,
            d = digits
        ),
        None => "-".into(),
    }
}

impl fmt::Display for Experiment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "post-copy against one push of all memory: {} MiB {} guest, {} streams{}",
            c.mem_mib,
            c.workload,
            c.streams,
            if self.finished { "" } else { " (interrupted)" }
        )?;
        writeln!(
            f,
            "{:>4}  {:>9}  {:>11}  {:>11}  {:>6}",
            "pair", "bulk ms", "precopy ms", "postcopy ms", "ratio"
        )?;
        for p in &self.pairs {
            writeln!(
                f,
                "{:>4}  {:>9}  {:>11}  {:>11}  {:>6}",
                p.pair,
                ms(p.bulk_ms),
                ms(p.precopy_ms),
                ms(p.postcopy_ms),
                p.ratio.map_or("-".into(), |r| format!("{r:.2}"))
            )?;
        }
        let s = &self.summary;
        writeln!(f, "median (min-max) over whole pairs:")?;
        writeln!(f, "  bulk round      {} ms", cell(&s.bulk_ms, 0))?;
        writeln!(f, "  pre-copy total  {} ms", cell(&s.precopy_ms, 0))?;
        writeln!(f, "  post-copy total {} ms", cell(&s.postcopy_ms, 0))?;
        writeln!(f, "  fault p99       {} us", cell(&s.fault_p99_us, 0))?;
        write!(f, "  ratio           {}", cell(&s.ratio, 2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use ferry_engine::metrics::RoundLog;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        r: RatioArgs,
    }

    fn parse(args: &[&str]) -> Result<RatioArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("ferry-bench").chain(args.iter().copied())).map(|c| c.r)
    }

    fn result(mode: &str, total: u64, bulk: Option<u64>) -> BenchResult {
        BenchResult {
            mode: mode.into(),
            completed: true,
            verified: true,
            total_time_ms: total,
            rounds: bulk
                .map(|ms| RoundLog {
                    round: 1,
                    ms,
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    fn run(seq: u32, pair: u32, mode: &str, r: Option<BenchResult>) -> Run {
        Run {
            seq,
            pair,
            mode: mode.into(),
            result: r,
            error: None,
        }
    }

    #[test]
    fn parses_and_refuses() {
        let a = parse(&["--mem-mib", "2048", "--workload", "dirty:200"]).unwrap();
        assert_eq!((a.streams, a.pairs, a.checkpoint_ms), (4, 5, None));
        let m = migrate_args(&a, ferry_engine::Mode::Postcopy);
        assert!(m.no_blast && m.mode == ferry_engine::Mode::Postcopy);
        assert_eq!((m.mem_mib, m.streams), (2048, 4));
        for bad in [
            &[
                "--mem-mib",
                "2048",
                "--workload",
                "dirty:200",
                "--pairs",
                "0",
            ][..],
            &[
                "--mem-mib",
                "2048",
                "--workload",
                "dirty:200",
                "--pairs",
                "51",
            ],
            &["--mem-mib", "2048", "--workload", "spin"],
            &["--workload", "fill"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn pairs_alternate_their_order() {
        use ferry_engine::Mode::{Postcopy, Precopy};
        assert_eq!(order(0), [Precopy, Postcopy]);
        assert_eq!(order(1), [Postcopy, Precopy]);
        assert_eq!(order(2), order(0));
    }

    #[test]
    fn ratios_come_from_whole_pairs_only() {
        let mut broken = result("postcopy", 9999, None);
        broken.verified = false;
        let runs = vec![
            run(1, 1, "precopy", Some(result("precopy", 2300, Some(2000)))),
            run(2, 1, "postcopy", Some(result("postcopy", 2400, None))),
            run(3, 2, "postcopy", Some(result("postcopy", 2600, None))),
            run(4, 2, "precopy", Some(result("precopy", 2200, Some(2000)))),
            run(5, 3, "precopy", Some(result("precopy", 2100, Some(1800)))),
            run(6, 3, "postcopy", Some(broken)),
            run(7, 4, "precopy", None),
        ];
        let p = pairs(&runs);
        assert_eq!(p.len(), 4);
        assert_eq!(p[0].ratio, Some(1.2));
        assert_eq!(p[1].ratio, Some(1.3));
        assert_eq!(
            (p[2].bulk_ms, p[2].postcopy_ms, p[2].ratio),
            (Some(1800), None, None)
        );
        assert_eq!((p[3].bulk_ms, p[3].ratio), (None, None));
        let s = summarize(&runs, &p);
        let r = s.ratio.unwrap();
        assert_eq!(r.n, 2);
        assert!((r.median - 1.25).abs() < 1e-9, "{r:?}");
        assert_eq!((r.min, r.max), (1.2, 1.3));
        // The half pair's bulk round is left out.
        assert_eq!(s.bulk_ms.unwrap().min, 2000.0);
        assert_eq!(s.postcopy_ms.unwrap().median, 2500.0);
        let exp = Experiment {
            config: Config {
                command: "ferry-bench postcopy-ratio".into(),
                mem_mib: 2048,
                workload: "dirty:200".into(),
                streams: 4,
                pairs: 4,
                checkpoint_ms: None,
                warmup_s: 2.0,
                cpus: 2,
            },
            finished: true,
            runs,
            pairs: p,
            summary: s,
        };
        assert!(!exp.all_verified());
        let text = exp.to_string();
        assert!(
            text.contains("ratio           1.25 (1.20-1.30, n=2)"),
            "{text}"
        );
        assert!(
            text.contains("   3       1800         2100            -       -"),
            "{text}"
        );
    }
}
