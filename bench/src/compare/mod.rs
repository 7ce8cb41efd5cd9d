//! `ferry-bench compare`: every (transport, streams) pair, K times each, one
//! fresh testbed and one real migration per run (`migrate::run`, with the
//! link blast unless `--no-blast`), then a table, `compare.json` and a chart
//! (`compare.svg`, `compare.png`).
//!
//! ```text
//!  transports ─▶ runnable here? ─ no ─▶ a row "unavailable: <reason>"
//!                    │ yes
//!  for repeat k in 0..K: pairs in order(k) (streams-major; reversed on odd k)
//!      migrate::run (fresh ferryds + VMM, warm-up, blast, migration, checks,
//!                    ferryd CPU during the migration)
//!      ─▶ runs[] ─▶ compare.json rewritten (a broken-off experiment keeps
//!                   what it did)
//!  rows = aggregate(runs), ratios against tcp ─▶ table (stdout)
//!      + compare.json + compare.svg + compare.png
//! ```
//!
//! Order: within a repeat the pairs go streams-major, so the transports at
//! equal streams run back to back, and every odd repeat runs the list
//! backwards: drift on a shared machine (another tenant, thermal state, page
//! cache) then lands on each transport about equally instead of always
//! favouring the one that runs first.

pub mod aggregate;
pub mod bitmap;
pub mod chart;
pub mod transport;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::experiment::{check_warmup_s, first_duplicate, write_json};
use crate::migrate::{self, MigrateArgs, Transport};
use crate::procs;
use crate::ui::Ui;
use crate::workload::Workload;
use aggregate::{aggregate, ratios, Ratio, Row, Run, Table, TransportStatus};
use transport::TransportName;

/// A run's fixed cost: two ferryds and a VMM start, everything stops, in
/// about 5 s on a loaded 2-core machine.
const RUN_OVERHEAD_S: u64 = 5;
/// A slow figure for everything that scales with the guest: its first pass
/// (`fill`), two blasts and the migration, ~4 guest-sized passes at 512 MiB/s
/// or better here; so the estimate errs long.
const GUEST_PASS_MIB_S: u64 = 128;
/// Cap on --repeat: 100 repeats of 4 x 4 pairs is already hours.
const REPEAT_MAX: u32 = 100;
/// Cap on how many runs one experiment makes, so a mistyped list cannot
/// queue days of runs: 3 transports x 8 stream counts x 20 repeats.
const RUNS_MAX: u64 = 480;
/// The experiment's record in --out.
pub const JSON_FILE: &str = "compare.json";
/// The chart in --out, as SVG.
pub const SVG_FILE: &str = "compare.svg";
/// The chart in --out, as PNG.
pub const PNG_FILE: &str = "compare.png";

/// Options of `ferry-bench compare`.
#[derive(Clone, Debug, Args)]
pub struct CompareArgs {
    /// Comma-separated transports: tcp, uring, rdma (one this machine cannot
    /// run gets a row `unavailable: <reason>`; rdma needs an RDMA device
    /// that holds --listen-ip).
    #[arg(long, value_delimiter = ',', required = true)]
    pub transports: Vec<TransportName>,
    /// Comma-separated stream counts, each 1 to 64 (`1,2,4,8`).
    #[arg(long, value_delimiter = ',', required = true,
          value_parser = clap::value_parser!(u32).range(1..=crate::blast::STREAMS_MAX as i64))]
    pub streams: Vec<u32>,
    /// Guest memory in MiB.
    #[arg(long, value_parser = migrate::parse_mem_mib)]
    pub mem_mib: u64,
    /// Guest workload: `idle`, `fill`, `mixed`, or `dirty:<MiB/s>[:hot=<pct>][:fill]`.
    #[arg(long)]
    pub workload: Workload,
    /// Runs of each (transport, streams).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=REPEAT_MAX as i64))]
    pub repeat: u32,
    /// Where to write compare.json, compare.svg and compare.png (created if
    /// missing).
    #[arg(long, default_value = "ferry-compare")]
    pub out: PathBuf,
    /// For dirty workloads: seconds of dirtying before each migration.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_s: f64,
    /// Downtime budget (default: ferryd's).
    #[arg(long)]
    pub downtime_ms: Option<u64>,
    /// The engine gives up after this many seconds (default: ferryd's).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub time_max_s: Option<u64>,
    /// Skip the link blasts (link_ratio is then not measured).
    #[arg(long)]
    pub no_blast: bool,
    /// Run each ferryd in its own network namespace, joined by a veth pair
    /// (root only).
    #[arg(long)]
    pub netns: bool,
    /// With --netns: shape the veth pair to this rate with tc tbf.
    #[arg(long, requires = "netns", value_parser = clap::value_parser!(u64).range(1..))]
    pub link_rate_mib_s: Option<u64>,
    /// IP address every run's ferryds listen on (as `migrate --listen-ip`):
    /// for rdma, an address of the RDMA device. Not with --netns.
    #[arg(long, value_name = "IP", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST),
          conflicts_with = "netns")]
    pub listen_ip: IpAddr,
    /// TrueType font for the PNG's text (default: DejaVu Sans or Liberation
    /// Sans where distributions keep them; without one the PNG has no text).
    #[arg(long)]
    pub font: Option<PathBuf>,
    /// Print the experiment (as in compare.json) on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Keep each run's scratch directory with the daemons' and VMM's logs.
    #[arg(long)]
    pub keep_logs: bool,
    /// Where ferryd and ferry-vmm are (default: next to ferry-bench).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

/// The experiment's settings, as recorded in compare.json.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// The command line that ran it.
    pub command: String,
    /// Transports, in the order given, each with why it could not run.
    pub transports: Vec<TransportStatus>,
    /// Stream counts, in the order given.
    pub streams: Vec<u32>,
    /// Guest memory.
    pub mem_mib: u64,
    /// The guest's workload.
    pub workload: String,
    /// Runs per pair.
    pub repeat: u32,
    /// Warm-up of dirty guests.
    pub warmup_s: f64,
    /// Downtime budget (None: ferryd's).
    pub downtime_ms: Option<u64>,
    /// The engine's time limit (None: ferryd's).
    pub time_max_s: Option<u64>,
    /// Whether the link blasts were skipped.
    pub no_blast: bool,
    /// "loopback" or "netns".
    pub path: String,
    /// veth shaping with --netns.
    pub link_rate_mib_s: Option<u64>,
    /// The ferryds' listen address without --netns.
    pub listen_ip: IpAddr,
    /// CPUs this process may run on.
    pub cpus: usize,
    /// `uname -r`.
    pub kernel: String,
    /// The font of the PNG's text (None: the PNG has no text).
    pub png_font: Option<PathBuf>,
}

/// Everything an experiment produced: compare.json.
#[derive(Clone, Debug, Serialize)]
pub struct Experiment {
    /// Settings.
    pub config: Config,
    /// False when Ctrl-C ended it early.
    pub finished: bool,
    /// Every run, in the order made.
    pub runs: Vec<Run>,
    /// One per (transport, streams), transports and streams in the order
    /// given.
    pub rows: Vec<Row>,
    /// Each other transport against tcp at equal streams.
    pub ratios: Vec<Ratio>,
}

impl Experiment {
    /// Every run completed and verified (unavailable transports made no
    /// runs and do not count).
    pub fn all_verified(&self) -> bool {
        self.finished
            && self.runs.iter().all(|r| {
                r.error.is_none() && r.result.as_ref().is_some_and(|b| b.completed && b.verified)
            })
    }

    /// The table of rows and ratios.
    pub fn table(&self) -> Table<'_> {
        Table {
            rows: &self.rows,
            ratios: &self.ratios,
        }
    }
}

/// The pairs of repeat `k` (0-based): streams-major, so the transports at
/// equal streams run back to back, forward on even `k` and backward on odd.
pub fn order<T: Copy>(k: u32, transports: &[T], streams: &[u32]) -> Vec<(T, u32)> {
    let mut pairs: Vec<(T, u32)> = streams
        .iter()
        .flat_map(|&s| transports.iter().map(move |&t| (t, s)))
        .collect();
    if k % 2 == 1 {
        pairs.reverse();
    }
    pairs
}

/// Rough upper bound of one run in seconds.
fn run_estimate_s(args: &CompareArgs) -> u64 {
    RUN_OVERHEAD_S + args.mem_mib.div_ceil(GUEST_PASS_MIB_S) + args.warmup_s.ceil() as u64
}

/// `migrate` options for one run.
fn migrate_args(args: &CompareArgs, transport: Transport, streams: u32) -> MigrateArgs {
    MigrateArgs {
        mem_mib: args.mem_mib,
        workload: args.workload,
        transport,
        listen_ip: args.listen_ip,
        streams,
        downtime_ms: args.downtime_ms,
        bandwidth_mib_s: None,
        policy: None,
        mode: ferry_engine::Mode::Precopy,
        checkpoint_ms: None,
        downtime_max_ms: None,
        xor_cache_mib: None,
        time_max_s: args.time_max_s,
        rounds_max: None,
        no_blast: args.no_blast,
        warmup_s: args.warmup_s,
        netns: args.netns,
        no_reserve: false,
        link_rate_mib_s: args.link_rate_mib_s,
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

/// Checks the lists; returns every transport's status and the runnable ones.
fn resolve(args: &CompareArgs) -> Result<(Vec<TransportStatus>, Vec<Transport>)> {
    check_warmup_s(args.warmup_s)?;
    if let Some(d) = first_duplicate(&args.transports) {
        bail!("--transports names {d} twice");
    }
    if let Some(d) = first_duplicate(&args.streams) {
        bail!("--streams names {d} twice");
    }
    let mut statuses = Vec::new();
    let mut runnable = Vec::new();
    for name in &args.transports {
        match name.availability() {
            Ok(t) => {
                statuses.push(TransportStatus::runnable(name.as_str()));
                runnable.push(t);
            }
            Err(why) => statuses.push(TransportStatus::unavailable(name.as_str(), &why)),
        }
    }
    if runnable.is_empty() {
        let why: Vec<String> = statuses
            .iter()
            .map(|s| format!("{}: {}", s.name, s.unavailable.as_deref().unwrap_or("?")))
            .collect();
        bail!("none of --transports can run here ({})", why.join("; "));
    }
    let total = runnable.len() as u64 * args.streams.len() as u64 * u64::from(args.repeat);
    if total > RUNS_MAX {
        bail!("{total} runs asked for; at most {RUNS_MAX} in one experiment");
    }
    Ok((statuses, runnable))
}

/// The name ferry-bench uses for a transport (as in `--transports`).
fn transport_name(t: Transport) -> String {
    clap::ValueEnum::to_possible_value(&t)
        .map(|v| v.get_name().to_string())
        .unwrap_or_else(|| format!("{t:?}").to_lowercase())
}

/// Runs the experiment, writing compare.json after every run and the charts
/// at the end. `Err` only when the experiment cannot start or write its
/// files; broken runs are recorded and the experiment goes on.
pub fn run(args: &CompareArgs, ui: &mut Ui) -> Result<Experiment> {
    let (statuses, runnable) = resolve(args)?;
    // An explicit --font that does not load is an error before any run.
    let font = bitmap::find_font(args.font.as_deref())?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    for s in statuses.iter().filter(|s| s.unavailable.is_some()) {
        ui.step(&format!(
            "{}: unavailable: {}",
            s.name,
            s.unavailable.as_deref().unwrap_or_default()
        ));
    }
    let per_repeat = runnable.len() * args.streams.len();
    let total = per_repeat as u64 * u64::from(args.repeat);
    ui.step(&format!(
        "{total} runs ({} transports x {} stream counts x {} repeats), each roughly {} s: \
         about {} min",
        runnable.len(),
        args.streams.len(),
        args.repeat,
        run_estimate_s(args),
        (total * run_estimate_s(args)).div_ceil(60)
    ));
    let mut exp = Experiment {
        config: Config {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            transports: statuses.clone(),
            streams: args.streams.clone(),
            mem_mib: args.mem_mib,
            workload: args.workload.to_string(),
            repeat: args.repeat,
            warmup_s: args.warmup_s,
            downtime_ms: args.downtime_ms,
            time_max_s: args.time_max_s,
            no_blast: args.no_blast,
            path: if args.netns { "netns" } else { "loopback" }.into(),
            link_rate_mib_s: args.link_rate_mib_s,
            listen_ip: args.listen_ip,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            png_font: font.as_ref().map(|f| f.path.clone()),
        },
        finished: false,
        runs: Vec::new(),
        rows: Vec::new(),
        ratios: Vec::new(),
    };
    let started = Instant::now();
    'all: for k in 0..args.repeat {
        for (t, s) in order(k, &runnable, &args.streams) {
            let name = transport_name(t);
            let seq = exp.runs.len() as u32 + 1;
            ui.step(&format!(
                "run {seq}/{total}: {name} x{s} streams, repeat {}/{} ({}), {:.0} s in",
                k + 1,
                args.repeat,
                if k % 2 == 0 { "forward" } else { "backward" },
                started.elapsed().as_secs_f64()
            ));
            let r = migrate::run(&migrate_args(args, t, s), ui);
            ui.end_live();
            let (result, error) = match r {
                // The engine's word on what it ran: until ferryd takes a
                // transport per migration, asking for one it did not run
                // must not pass as a measurement of it.
                Ok(b) if b.transport != name => {
                    let e = format!("asked for {name}, the source engine ran {:?}", b.transport);
                    (Some(b), Some(e))
                }
                Ok(b) => (Some(b), None),
                Err(e) => (None, Some(format!("{e:#}"))),
            };
            ui.step(&format!(
                "run {seq}: {}",
                match (&result, &error) {
                    (_, Some(e)) => format!("broke: {e}"),
                    (Some(b), None) => format!(
                        "{}, {}, {:.0} MiB/s",
                        b.status,
                        if b.verified {
                            "verified"
                        } else {
                            "NOT verified"
                        },
                        b.effective_mib_s
                    ),
                    (None, None) => "no result".into(),
                }
            ));
            exp.runs.push(Run {
                seq,
                repeat: k + 1,
                transport: name,
                streams: s,
                result,
                error,
            });
            exp.rows = aggregate(&exp.runs, &statuses, &args.streams);
            exp.ratios = ratios(&exp.rows);
            write_json(&args.out, JSON_FILE, &exp)?;
            if procs::interrupted() {
                break 'all;
            }
        }
    }
    exp.finished = !procs::interrupted();
    exp.rows = aggregate(&exp.runs, &statuses, &args.streams);
    exp.ratios = ratios(&exp.rows);
    write_json(&args.out, JSON_FILE, &exp)?;
    let title = format!(
        "ferry-bench compare: {} MiB {} guest over {}, {} run(s) per point (median, min-max){}",
        args.mem_mib,
        args.workload,
        exp.config.path,
        args.repeat,
        if exp.finished { "" } else { " (interrupted)" }
    );
    let c = chart::Chart {
        title: &title,
        rows: &exp.rows,
        transports: &statuses,
        streams: &args.streams,
    };
    chart::write_svg(&args.out.join(SVG_FILE), &c)?;
    chart::write_png(&args.out.join(PNG_FILE), &c, font.as_ref().map(|f| &f.font))?;
    ui.step(&format!(
        "wrote {JSON_FILE}, {SVG_FILE} and {PNG_FILE} in {}",
        args.out.display()
    ));
    match &font {
        Some(f) => ui.step(&format!("{PNG_FILE}'s text is set in {}", f.path.display())),
        None => ui.step(&format!(
            "{PNG_FILE} has no text: no font at {} (give one with --font); {SVG_FILE} has all of it",
            bitmap::FONT_PATHS.join(", ")
        )),
    }
    Ok(exp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        c: CompareArgs,
    }

    fn parse(args: &[&str]) -> Result<CompareArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("ferry-bench").chain(args.iter().copied())).map(|c| c.c)
    }

    const BASE: [&str; 8] = [
        "--transports",
        "tcp,uring,rdma",
        "--streams",
        "1,2,4,8",
        "--mem-mib",
        "256",
        "--workload",
        "fill",
    ];

    fn with(flag: &str, v: &str) -> Vec<String> {
        let mut a: Vec<&str> = BASE.to_vec();
        match a.iter().position(|x| *x == flag) {
            Some(i) => a[i + 1] = v,
            None => a.extend([flag, v]),
        }
        a.iter().map(|s| s.to_string()).collect()
    }

    fn parse_owned(a: &[String]) -> Result<CompareArgs, clap::Error> {
        parse(&a.iter().map(String::as_str).collect::<Vec<_>>())
    }

    #[test]
    fn parses_lists_and_defaults() {
        let a = parse(&BASE).unwrap();
        let names: Vec<&str> = a.transports.iter().map(TransportName::as_str).collect();
        assert_eq!(names, ["tcp", "uring", "rdma"]);
        assert_eq!(a.streams, [1, 2, 4, 8]);
        assert_eq!((a.mem_mib, a.repeat, a.warmup_s), (256, 3, 2.0));
        assert_eq!(a.out, PathBuf::from("ferry-compare"));
        assert!(!a.no_blast && !a.netns && !a.json);
        assert_eq!(a.listen_ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        let (statuses, runnable) = resolve(&a).unwrap();
        // uring runs where io_uring works (it does on our CI machines),
        // rdma where an RDMA device works (in `cargo xtask rdma`'s VM).
        let here = |t| crate::compare::transport::machine_reason(t).is_none();
        let (uring_here, rdma_here) = (here(Transport::Uring), here(Transport::Rdma));
        let want: Vec<Transport> = [
            (Transport::Tcp, true),
            (Transport::Uring, uring_here),
            (Transport::Rdma, rdma_here),
        ]
        .into_iter()
        .filter_map(|(t, ok)| ok.then_some(t))
        .collect();
        assert_eq!(runnable, want);
        assert_eq!(statuses.len(), 3);
        assert_eq!(statuses[0], TransportStatus::runnable("tcp"));
        assert_eq!(statuses[1].unavailable.is_none(), uring_here);
        assert_eq!(statuses[2].unavailable.is_none(), rdma_here);
        let m = migrate_args(&a, Transport::Rdma, 2);
        assert_eq!(m.listen_ip, a.listen_ip);
        let m = migrate_args(&a, Transport::Tcp, 8);
        assert_eq!(
            (m.streams, m.transport, m.mem_mib),
            (8, Transport::Tcp, 256)
        );
        assert!(!m.no_blast && !m.no_reserve && m.bandwidth_mib_s.is_none());
        assert_eq!(m.workload.to_string(), "fill");
    }

    #[test]
    fn rejects_bad_arguments() {
        for (flag, v) in [
            ("--transports", "tcp,carrier-pigeon"),
            ("--transports", ""),
            ("--streams", "0"),
            ("--streams", "1,65"),
            ("--streams", "1,x"),
            ("--mem-mib", "3"),
            ("--workload", "spin"),
            ("--repeat", "0"),
            ("--repeat", "101"),
            // Needs --netns.
            ("--link-rate-mib-s", "100"),
        ] {
            assert!(parse_owned(&with(flag, v)).is_err(), "{flag} {v} parsed");
        }
        // --netns brings its own addresses.
        let mut both = with("--listen-ip", "10.77.0.1");
        both.push("--netns".into());
        assert!(parse_owned(&both).is_err());
        // Parsed, but refused before any run.
        for (flag, v) in [
            ("--transports", "tcp,tcp"),
            ("--streams", "1,2,1"),
            ("--warmup-s", "4000"),
        ] {
            let a = parse_owned(&with(flag, v)).unwrap();
            assert!(resolve(&a).is_err(), "{flag} {v} accepted");
        }
        // 8 stream counts x 100 repeats: over the cap on runs.
        let mut many = with("--streams", "1,2,3,4,5,6,7,8");
        many.extend(["--repeat".to_string(), "100".to_string()]);
        let e = resolve(&parse_owned(&many).unwrap())
            .unwrap_err()
            .to_string();
        // 800 runs per transport that can run here (tcp at least).
        assert!(
            [" 800 runs", "1600 runs", "2400 runs"]
                .iter()
                .any(|n| e.contains(n)),
            "{e}"
        );
        // rdma alone where no RDMA device works: nothing to run, and why.
        let a = parse_owned(&with("--transports", "rdma")).unwrap();
        if crate::compare::transport::machine_reason(Transport::Rdma).is_some() {
            let e = resolve(&a).unwrap_err().to_string();
            assert!(
                e.contains("none of --transports can run here (rdma: "),
                "{e}"
            );
        }
    }

    #[test]
    fn order_alternates_and_keeps_equal_streams_together() {
        let ts = ["tcp", "uring"];
        let fwd = order(0, &ts, &[1, 4]);
        assert_eq!(fwd, [("tcp", 1), ("uring", 1), ("tcp", 4), ("uring", 4)]);
        let back = order(1, &ts, &[1, 4]);
        assert_eq!(back, [("uring", 4), ("tcp", 4), ("uring", 1), ("tcp", 1)]);
        assert_eq!(order(2, &ts, &[1, 4]), fwd);
        // Over an even number of repeats every pair holds each position
        // once forward and once backward: the mean position is the same for all.
        let n = fwd.len();
        for p in &fwd {
            let pos = |k| order(k, &ts, &[1, 4]).iter().position(|q| q == p).unwrap();
            assert_eq!(pos(0) + pos(1), n - 1);
        }
        assert!(order::<&str>(0, &[], &[1]).is_empty());
    }

    #[test]
    fn names_round_trip_and_estimate_adds_up() {
        assert_eq!(transport_name(Transport::Tcp), "tcp");
        let a = parse(&BASE).unwrap();
        // 256 MiB at 128 MiB/s: 2 s; 2 s warm-up.
        assert_eq!(run_estimate_s(&a), RUN_OVERHEAD_S + 2 + 2);
    }

    #[test]
    fn experiment_json_has_the_documented_shape() {
        let a = parse(&BASE).unwrap();
        let (statuses, _) = resolve(&a).unwrap();
        let runs = vec![Run {
            seq: 1,
            repeat: 1,
            transport: "tcp".into(),
            streams: 1,
            result: Some(crate::migrate::report::BenchResult {
                transport: "tcp".into(),
                completed: true,
                verified: true,
                effective_mib_s: 1000.0,
                ..Default::default()
            }),
            error: None,
        }];
        let rows = aggregate(&runs, &statuses, &a.streams);
        let exp = Experiment {
            config: Config {
                command: "ferry-bench compare ...".into(),
                transports: statuses,
                streams: a.streams.clone(),
                mem_mib: 256,
                workload: "fill".into(),
                repeat: 1,
                warmup_s: 2.0,
                downtime_ms: None,
                time_max_s: None,
                no_blast: false,
                path: "loopback".into(),
                link_rate_mib_s: None,
                listen_ip: Ipv4Addr::LOCALHOST.into(),
                cpus: 2,
                kernel: "6.1".into(),
                png_font: None,
            },
            finished: true,
            ratios: ratios(&rows),
            rows,
            runs,
        };
        assert!(exp.all_verified());
        let dir = crate::procs::TempDir::new().unwrap();
        write_json(dir.path(), JSON_FILE, &exp).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(JSON_FILE)).unwrap())
                .unwrap();
        assert_eq!(v["config"]["transports"][2]["name"], "rdma");
        assert_eq!(v["config"]["listen_ip"], "127.0.0.1");
        assert_eq!(v["runs"][0]["result"]["effective_mib_s"], 1000.0);
        assert_eq!(v["rows"].as_array().unwrap().len(), 12);
        assert_eq!(v["rows"][0]["effective_mib_s"]["median"], 1000.0);
        assert_eq!(v["rows"][0]["effective_mib_s"]["n"], 1);
        assert!(v["rows"][0]["source_cpu_s_per_gib"].is_null());
        // No uring run here: any uring/tcp ratio has nothing to divide.
        assert!(v["ratios"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["effective_mib_s"].is_null()));
        assert!(!dir.path().join(format!("{JSON_FILE}.tmp")).exists());

        let mut broken = exp.clone();
        broken.runs[0].error = Some("asked for tcp, the source engine ran \"x\"".into());
        assert!(!broken.all_verified());
    }
}
