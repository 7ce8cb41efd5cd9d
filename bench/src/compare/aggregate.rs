//! One row per (transport, streams) of a `ferry-bench compare` experiment:
//! median and min-max of each figure over the runs that completed and
//! verified, and the ratios of each transport's medians to tcp's at equal
//! streams.

use std::fmt;

use serde::Serialize;

use crate::migrate::report::BenchResult;
use crate::policies::aggregate::median;

/// The transport the ratios are taken against.
pub const BASELINE: &str = "tcp";

/// One run of the experiment: what was asked, and what came of it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Run {
    /// 1-based position in the order the runs were made.
    pub seq: u32,
    /// 1-based repetition.
    pub repeat: u32,
    /// The transport asked for.
    pub transport: String,
    /// Data streams asked for.
    pub streams: u32,
    /// The run's result, when the run itself did not break.
    pub result: Option<BenchResult>,
    /// Why the run broke (a daemon died, ferryd refused the transport, the
    /// engine ran another transport than the one asked for).
    pub error: Option<String>,
}

/// A transport asked for, and why it cannot run here (if so).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TransportStatus {
    /// The name as given.
    pub name: String,
    /// Why it did not run: no runs were made.
    pub unavailable: Option<String>,
}

impl TransportStatus {
    /// A transport that runs.
    pub fn runnable(name: &str) -> Self {
        TransportStatus {
            name: name.to_string(),
            unavailable: None,
        }
    }

    /// A transport that cannot run, and why.
    pub fn unavailable(name: &str, why: &str) -> Self {
        TransportStatus {
            name: name.to_string(),
            unavailable: Some(why.to_string()),
        }
    }
}

/// Median and range of one figure over a row's measured runs.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Spread {
    /// The median; the mean of the middle two for an even count.
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// How many values.
    pub n: u32,
}

/// The spread of `values`; `None` for none.
pub fn spread(values: &[f64]) -> Option<Spread> {
    let median = median(values)?;
    Some(Spread {
        median,
        min: values.iter().copied().fold(f64::INFINITY, f64::min),
        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        n: values.len() as u32,
    })
}

/// The aggregate of every run of one (transport, streams).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Row {
    /// The transport.
    pub transport: String,
    /// Data streams.
    pub streams: u32,
    /// Why the transport did not run at all (then every count is 0).
    pub unavailable: Option<String>,
    /// Runs made.
    pub runs: u32,
    /// Runs that broke (no result, or the wrong transport).
    pub broken: u32,
    /// Runs whose migration completed.
    pub completed: u32,
    /// Runs whose checks passed.
    pub verified: u32,
    /// Guest memory / total time, MiB/s.
    pub effective_mib_s: Option<Spread>,
    /// Downtime, ms.
    pub downtime_ms: Option<Spread>,
    /// Source ferryd CPU s per GiB of guest memory moved.
    pub source_cpu_s_per_gib: Option<Spread>,
    /// Target ferryd CPU s per GiB of guest memory moved.
    pub target_cpu_s_per_gib: Option<Spread>,
    /// Wire throughput / the raw link blast (absent with --no-blast).
    pub link_ratio: Option<Spread>,
    /// A run of the row used a software RDMA emulation (soft-RoCE,
    /// soft-iWARP; each run's `rdma` names the devices): the row's rates,
    /// CPU costs and ratios are not meaningful for RDMA hardware.
    pub software_emulation: bool,
}

/// One transport against [`BASELINE`] at equal streams: the ratio of
/// medians of each figure (`None` where either is missing or the
/// baseline's is 0).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Ratio {
    /// The transport.
    pub transport: String,
    /// What it is compared with ([`BASELINE`]).
    pub versus: String,
    /// Data streams of both.
    pub streams: u32,
    /// effective_mib_s, this / baseline: above 1 is faster.
    pub effective_mib_s: Option<f64>,
    /// downtime_ms, this / baseline: below 1 is shorter.
    pub downtime_ms: Option<f64>,
    /// Source CPU per GiB, this / baseline: below 1 is cheaper.
    pub source_cpu_s_per_gib: Option<f64>,
    /// Target CPU per GiB, this / baseline: below 1 is cheaper.
    pub target_cpu_s_per_gib: Option<f64>,
    /// link_ratio, this / baseline.
    pub link_ratio: Option<f64>,
}

/// A run's result, unless the run broke (no result, or the engine ran
/// another transport than the one asked for).
fn unbroken(r: &Run) -> Option<&BenchResult> {
    r.result.as_ref().filter(|_| r.error.is_none())
}

/// A run's figures count when it completed and verified: a run that lost
/// pages must not look fast.
fn measured(r: &Run) -> Option<&BenchResult> {
    unbroken(r).filter(|b| b.completed && b.verified)
}

fn row(transport: &str, streams: u32, runs: &[&Run]) -> Row {
    let results: Vec<&BenchResult> = runs.iter().copied().filter_map(unbroken).collect();
    let good: Vec<&BenchResult> = runs.iter().copied().filter_map(measured).collect();
    let of = |f: &dyn Fn(&BenchResult) -> Option<f64>| {
        spread(&good.iter().filter_map(|b| f(b)).collect::<Vec<_>>())
    };
    let cpu = |b: &BenchResult| b.cpu.clone();
    Row {
        transport: transport.to_string(),
        streams,
        unavailable: None,
        runs: runs.len() as u32,
        broken: (runs.len() - results.len()) as u32,
        completed: results.iter().filter(|b| b.completed).count() as u32,
        verified: results.iter().filter(|b| b.verified).count() as u32,
        effective_mib_s: of(&|b| Some(b.effective_mib_s)),
        downtime_ms: of(&|b| Some(b.downtime_ms as f64)),
        source_cpu_s_per_gib: of(&|b| cpu(b).and_then(|c| c.source_s_per_gib)),
        target_cpu_s_per_gib: of(&|b| cpu(b).and_then(|c| c.target_s_per_gib)),
        // Without a blast the ratio reads 0: not a figure.
        link_ratio: of(&|b| (b.link.bytes > 0).then_some(b.link_ratio)),
        software_emulation: results
            .iter()
            .any(|b| b.rdma.as_ref().is_some_and(|r| r.software_emulation)),
    }
}

/// The rows, transports in `transports` order and streams in `streams`
/// order within each. `unavailable` transports get rows with only their
/// reason; a runnable pair with no runs yet still has a row (0 runs).
pub fn aggregate(runs: &[Run], transports: &[TransportStatus], streams: &[u32]) -> Vec<Row> {
    let mut rows = Vec::with_capacity(transports.len() * streams.len());
    for t in transports {
        for &s in streams {
            let of: Vec<&Run> = runs
                .iter()
                .filter(|r| r.transport == t.name && r.streams == s)
                .collect();
            let mut r = row(&t.name, s, &of);
            if let Some(why) = &t.unavailable {
                debug_assert!(of.is_empty(), "runs of unavailable {}", t.name);
                r.unavailable = Some(why.clone());
            }
            rows.push(r);
        }
    }
    rows
}

/// `a / b` of two medians when both exist and `b` is not 0.
fn ratio(a: Option<Spread>, b: Option<Spread>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b.median != 0.0 => Some(a.median / b.median),
        _ => None,
    }
}

/// Every other transport's rows against [`BASELINE`]'s at the same
/// streams; none when the baseline is not among the rows or a transport
/// is unavailable.
pub fn ratios(rows: &[Row]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for r in rows
        .iter()
        .filter(|r| r.transport != BASELINE && r.unavailable.is_none())
    {
        let Some(b) = rows
            .iter()
            .find(|b| b.transport == BASELINE && b.streams == r.streams && b.unavailable.is_none())
        else {
            continue;
        };
        out.push(Ratio {
            transport: r.transport.clone(),
            versus: BASELINE.to_string(),
            streams: r.streams,
            effective_mib_s: ratio(r.effective_mib_s, b.effective_mib_s),
            downtime_ms: ratio(r.downtime_ms, b.downtime_ms),
            source_cpu_s_per_gib: ratio(r.source_cpu_s_per_gib, b.source_cpu_s_per_gib),
            target_cpu_s_per_gib: ratio(r.target_cpu_s_per_gib, b.target_cpu_s_per_gib),
            link_ratio: ratio(r.link_ratio, b.link_ratio),
        });
    }
    out
}

/// The rows and ratios as text, one line each.
pub struct Table<'a> {
    /// The rows.
    pub rows: &'a [Row],
    /// The ratios.
    pub ratios: &'a [Ratio],
}

/// "median (min-max)" with `decimals`, or "-".
fn cell(s: Option<Spread>, decimals: usize) -> String {
    match s {
        None => "-".to_string(),
        Some(s) if s.n == 1 => format!("{:.decimals$}", s.median),
        Some(s) => format!(
            "{:.decimals$} ({:.decimals$}-{:.decimals$})",
            s.median, s.min, s.max
        ),
    }
}

fn times(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}x"))
}

impl fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tw = self
            .rows
            .iter()
            .map(|r| r.transport.len())
            .max()
            .unwrap_or(0)
            .max("transport".len());
        // Column widths fit "median (min-max)" of typical figures.
        // The last column unpadded: no trailing blanks.
        writeln!(
            f,
            "{:<tw$}  {:>7}  {:>8}  {:<22}  {:<15}  {:<21}  {:<21}  link ratio",
            "transport",
            "streams",
            "verified",
            "effective MiB/s",
            "downtime ms",
            "src cpu s/GiB",
            "tgt cpu s/GiB",
        )?;
        let mut said = Vec::new();
        for r in self.rows {
            if let Some(why) = &r.unavailable {
                // One line per unavailable transport, not one per streams.
                if !said.contains(&&r.transport) {
                    said.push(&r.transport);
                    writeln!(f, "{:<tw$}  {:>7}  unavailable: {why}", r.transport, "all")?;
                }
                continue;
            }
            writeln!(
                f,
                "{:<tw$}  {:>7}  {:>8}  {:<22}  {:<15}  {:<21}  {:<21}  {}",
                r.transport,
                r.streams,
                format!("{}/{}", r.verified, r.runs),
                cell(r.effective_mib_s, 0),
                cell(r.downtime_ms, 0),
                cell(r.source_cpu_s_per_gib, 3),
                cell(r.target_cpu_s_per_gib, 3),
                cell(r.link_ratio, 2),
            )?;
        }
        let mut noted = Vec::new();
        for r in self.rows.iter().filter(|r| r.software_emulation) {
            if !noted.contains(&&r.transport) {
                noted.push(&r.transport);
                writeln!(
                    f,
                    "NOTE: {} ran on a software RDMA emulation (soft-RoCE or soft-iWARP): its \
                     rates, CPU costs and ratios are not meaningful for RDMA hardware",
                    r.transport
                )?;
            }
        }
        for x in self.ratios {
            writeln!(
                f,
                "{}/{} at {} streams: effective {}, downtime {}, src cpu {}, tgt cpu {}, link ratio {}",
                x.transport,
                x.versus,
                x.streams,
                times(x.effective_mib_s),
                times(x.downtime_ms),
                times(x.source_cpu_s_per_gib),
                times(x.target_cpu_s_per_gib),
                times(x.link_ratio),
            )?;
        }
        write!(
            f,
            "median (min-max) over runs that completed and verified; cpu: the ferryd \
             processes' user + system time during the migration per GiB of guest memory moved"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::cpu::CpuUse;
    use crate::migrate::report::Link;

    /// A completed, verified run with these figures.
    fn run(transport: &str, streams: u32, eff: f64, down: u64, cpu: (f64, f64)) -> Run {
        Run {
            seq: 1,
            repeat: 1,
            transport: transport.into(),
            streams,
            result: Some(BenchResult {
                completed: true,
                verified: true,
                effective_mib_s: eff,
                downtime_ms: down,
                link_ratio: eff / 1000.0,
                link: Link {
                    bytes: 1 << 20,
                    streams,
                    ms: 1,
                },
                cpu: Some(CpuUse {
                    source_s_per_gib: Some(cpu.0),
                    target_s_per_gib: Some(cpu.1),
                    ..CpuUse::default()
                }),
                ..BenchResult::default()
            }),
            error: None,
        }
    }

    fn with(mut r: Run, f: impl FnOnce(&mut BenchResult)) -> Run {
        f(r.result.as_mut().unwrap());
        r
    }

    #[test]
    fn spreads() {
        assert_eq!(spread(&[]), None);
        let s = spread(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 10.0, 4));
        let s = spread(&[7.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (7.0, 7.0, 7.0, 1));
    }

    #[test]
    fn rows_count_and_spread_only_verified_completed_runs() {
        let runs = vec![
            run("tcp", 1, 1000.0, 3, (0.5, 0.4)),
            run("tcp", 1, 1200.0, 5, (0.7, 0.6)),
            run("tcp", 1, 1100.0, 4, (0.6, 0.5)),
            // Completed but did not verify: counted, not measured.
            with(run("tcp", 1, 9999.0, 0, (0.0, 0.0)), |b| b.verified = false),
            // Did not complete, stayed on the source: verified, not measured.
            with(run("tcp", 1, 1.0, 0, (9.0, 9.0)), |b| b.completed = false),
            Run {
                result: None,
                error: Some("boom".into()),
                ..run("tcp", 1, 0.0, 0, (0.0, 0.0))
            },
            // The engine ran another transport: broken, whatever it measured.
            Run {
                error: Some("asked for tcp, the engine ran uring".into()),
                ..run("tcp", 1, 5000.0, 1, (0.1, 0.1))
            },
            run("tcp", 2, 2000.0, 2, (0.3, 0.2)),
        ];
        let rows = aggregate(&runs, &[TransportStatus::runnable("tcp")], &[1, 2, 4]);
        assert_eq!(rows.len(), 3);
        let r = &rows[0];
        assert_eq!((r.runs, r.broken, r.completed, r.verified), (7, 2, 4, 4));
        let e = r.effective_mib_s.unwrap();
        assert_eq!((e.median, e.min, e.max, e.n), (1100.0, 1000.0, 1200.0, 3));
        assert_eq!(r.downtime_ms.unwrap().median, 4.0);
        assert_eq!(r.source_cpu_s_per_gib.unwrap().max, 0.7);
        assert_eq!(r.target_cpu_s_per_gib.unwrap().min, 0.4);
        assert_eq!(r.link_ratio.unwrap().median, 1.1);
        assert_eq!(rows[1].effective_mib_s.unwrap().n, 1);
        // No runs yet: a row of zeros and no figures.
        assert_eq!((rows[2].runs, rows[2].effective_mib_s), (0, None));
    }

    #[test]
    fn missing_cpu_or_blast_leaves_those_figures_out() {
        let runs = vec![
            with(run("tcp", 4, 1000.0, 3, (0.5, 0.4)), |b| b.cpu = None),
            with(run("tcp", 4, 1000.0, 3, (0.5, 0.4)), |b| {
                b.link = Link::default();
                b.link_ratio = 0.0;
            }),
        ];
        let rows = aggregate(&runs, &[TransportStatus::runnable("tcp")], &[4]);
        assert_eq!(rows[0].source_cpu_s_per_gib.unwrap().n, 1);
        assert_eq!(rows[0].link_ratio.unwrap().n, 1);
        assert_eq!(rows[0].effective_mib_s.unwrap().n, 2);
    }

    #[test]
    fn ratios_against_tcp_at_equal_streams() {
        let runs = vec![
            run("tcp", 1, 1000.0, 4, (0.5, 0.4)),
            run("tcp", 4, 2000.0, 0, (0.4, 0.4)),
            run("uring", 1, 1500.0, 2, (0.25, 0.5)),
            run("uring", 4, 2200.0, 3, (0.2, 0.2)),
            run("uring", 8, 2200.0, 3, (0.2, 0.2)),
        ];
        let ts = [
            TransportStatus::runnable("tcp"),
            TransportStatus::runnable("uring"),
            TransportStatus::unavailable("rdma", "not built"),
        ];
        let rows = aggregate(&runs, &ts, &[1, 4, 8]);
        assert_eq!(rows.len(), 9);
        assert!(rows[6..]
            .iter()
            .all(|r| r.unavailable.as_deref() == Some("not built") && r.runs == 0));
        let x = ratios(&rows);
        // uring at 1, 4 and 8 streams; tcp has no figures at 8.
        assert_eq!(x.len(), 3);
        assert_eq!(
            (x[0].transport.as_str(), x[0].versus.as_str()),
            ("uring", "tcp")
        );
        assert_eq!(x[0].effective_mib_s, Some(1.5));
        assert_eq!(x[0].downtime_ms, Some(0.5));
        assert_eq!(x[0].source_cpu_s_per_gib, Some(0.5));
        assert_eq!(x[0].target_cpu_s_per_gib, Some(1.25));
        assert_eq!(x[1].effective_mib_s, Some(1.1));
        // tcp's downtime median is 0: no ratio.
        assert_eq!(x[1].downtime_ms, None);
        assert_eq!((x[2].streams, x[2].effective_mib_s), (8, None));

        // Without tcp, no ratios.
        let rows = aggregate(&runs, &[TransportStatus::runnable("uring")], &[1]);
        assert!(ratios(&rows).is_empty());
    }

    #[test]
    fn table_has_a_line_per_row_one_per_unavailable_transport_and_the_ratios() {
        let runs = vec![
            run("tcp", 1, 1000.0, 4, (0.5, 0.4)),
            run("tcp", 1, 1200.0, 6, (0.7, 0.6)),
            run("uring", 1, 1500.0, 2, (0.25, 0.5)),
        ];
        let ts = [
            TransportStatus::runnable("tcp"),
            TransportStatus::runnable("uring"),
            TransportStatus::unavailable("rdma", "no rdma transport yet"),
        ];
        let rows = aggregate(&runs, &ts, &[1, 2]);
        let x = ratios(&rows);
        let t = Table {
            rows: &rows,
            ratios: &x,
        }
        .to_string();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{t}");
        assert!(
            lines[0].starts_with("transport  streams  verified  effective MiB/s"),
            "{t}"
        );
        assert!(
            lines[1].starts_with("tcp              1       2/2  1100 (1000-1200)"),
            "{t}"
        );
        assert!(lines[1].contains("0.600 (0.500-0.700)"), "{t}");
        assert!(
            lines[2].starts_with("tcp              2       0/0  -"),
            "{t}"
        );
        assert!(lines[3].contains("1500 "), "{t}");
        assert_eq!(
            lines.iter().filter(|l| l.contains("unavailable")).count(),
            1,
            "{t}"
        );
        assert!(
            lines[5].starts_with("rdma           all  unavailable: no rdma transport yet"),
            "{t}"
        );
        assert!(
            t.contains("uring/tcp at 1 streams: effective 1.36x, downtime 0.40x, src cpu 0.42x"),
            "{t}"
        );
        assert!(!t.contains("NOTE"), "{t}");
    }

    #[test]
    fn rdma_on_a_software_emulation_gets_a_note() {
        let mut soft = run("rdma", 1, 300.0, 9, (2.0, 2.0));
        if let Some(b) = soft.result.as_mut() {
            b.rdma = Some(crate::rdma::RdmaNote {
                devices: vec!["rxe0".into()],
                software_emulation: true,
                note: String::new(),
            });
        }
        let runs = vec![run("tcp", 1, 1000.0, 4, (0.5, 0.4)), soft.clone(), soft];
        let ts = [
            TransportStatus::runnable("tcp"),
            TransportStatus::runnable("rdma"),
        ];
        let rows = aggregate(&runs, &ts, &[1, 2]);
        assert_eq!(
            rows.iter()
                .map(|r| (r.transport.as_str(), r.streams, r.software_emulation))
                .collect::<Vec<_>>(),
            [
                ("tcp", 1, false),
                ("tcp", 2, false),
                ("rdma", 1, true),
                ("rdma", 2, false)
            ]
        );
        let x = ratios(&rows);
        let t = Table {
            rows: &rows,
            ratios: &x,
        }
        .to_string();
        assert_eq!(
            t.matches("NOTE: rdma ran on a software RDMA emulation")
                .count(),
            1,
            "{t}"
        );
        let v = serde_json::to_value(&rows[2]).unwrap();
        assert_eq!(v["software_emulation"], true);
    }
}
