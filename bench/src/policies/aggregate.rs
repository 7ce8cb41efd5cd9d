//! One row per (workload, policy) of a `ferry-bench policies` experiment:
//! success rate, medians over the completed runs, and ratios against the
//! `baseline` policy on the same workload.

use std::fmt;

use serde::Serialize;

use crate::migrate::report::BenchResult;
use crate::migrate::Policy;

/// One run of the experiment: what was asked, and what came of it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Run {
    /// The workload as given on the command line (`dirty:1.5x`).
    pub workload: String,
    /// What the guest ran (`dirty:96`).
    pub workload_resolved: String,
    /// The policy asked for.
    pub policy: Policy,
    /// 1-based repetition.
    pub repeat: u32,
    /// The run's result, when the run itself did not break.
    pub result: Option<BenchResult>,
    /// Why the run broke (a daemon died, a timeout of ferry-bench's own).
    pub error: Option<String>,
}

/// The aggregate of every run of one (workload, policy).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Row {
    /// The workload as given.
    pub workload: String,
    /// The policy.
    pub policy: Policy,
    /// Runs made.
    pub runs: u32,
    /// Runs whose migration completed.
    pub completed: u32,
    /// Runs whose checks passed (completed and verified on the target, or
    /// not completed and the VM stayed on the source).
    pub verified: u32,
    /// completed / runs.
    pub success_rate: f64,
    /// Median total time of the completed runs.
    pub total_time_ms_median: Option<f64>,
    /// Median downtime of the completed runs.
    pub downtime_ms_median: Option<f64>,
    /// Largest downtime of the completed runs.
    pub downtime_ms_max: Option<u64>,
    /// Median bytes on the wire of the completed runs.
    pub transferred_bytes_median: Option<f64>,
    /// Median rounds of the completed runs.
    pub rounds_median: Option<f64>,
    /// transferred_bytes_median / the baseline row's (same workload).
    pub bytes_vs_baseline: Option<f64>,
    /// total_time_ms_median / the baseline row's (same workload).
    pub time_vs_baseline: Option<f64>,
}

/// The median; the mean of the middle two for an even count; `None` for
/// no values.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// `a / b` when both exist and `b` is not 0.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// One row without its baseline ratios.
fn row(workload: &str, policy: Policy, runs: &[&Run]) -> Row {
    let results: Vec<&BenchResult> = runs.iter().filter_map(|r| r.result.as_ref()).collect();
    let done: Vec<&BenchResult> = results.iter().copied().filter(|r| r.completed).collect();
    let med =
        |f: fn(&BenchResult) -> u64| median(&done.iter().map(|r| f(r) as f64).collect::<Vec<_>>());
    let n = runs.len() as u32;
    let completed = done.len() as u32;
    Row {
        workload: workload.to_string(),
        policy,
        runs: n,
        completed,
        verified: results.iter().filter(|r| r.verified).count() as u32,
        success_rate: if n == 0 {
            0.0
        } else {
            f64::from(completed) / f64::from(n)
        },
        total_time_ms_median: med(|r| r.total_time_ms),
        downtime_ms_median: med(|r| r.downtime_ms),
        downtime_ms_max: done.iter().map(|r| r.downtime_ms).max(),
        transferred_bytes_median: med(|r| r.transferred_bytes),
        rounds_median: med(|r| u64::from(r.iterations)),
        bytes_vs_baseline: None,
        time_vs_baseline: None,
    }
}

/// The rows of an experiment, workloads in `workloads` order and policies in
/// `policies` order within each. A (workload, policy) with no runs yet still
/// has a row (0 runs). Ratios are against the `baseline` row of the same
/// workload, medians over completed runs on both sides: `None` when
/// `baseline` was not run or never completed, or this row never completed.
pub fn aggregate(runs: &[Run], workloads: &[String], policies: &[Policy]) -> Vec<Row> {
    let mut rows = Vec::with_capacity(workloads.len() * policies.len());
    for w in workloads {
        let of = |p: Policy| -> Vec<&Run> {
            runs.iter()
                .filter(|r| &r.workload == w && r.policy == p)
                .collect()
        };
        let base = row(w, Policy::Baseline, &of(Policy::Baseline));
        let base_ran = policies.contains(&Policy::Baseline);
        for &p in policies {
            let mut r = row(w, p, &of(p));
            if base_ran {
                r.bytes_vs_baseline =
                    ratio(r.transferred_bytes_median, base.transferred_bytes_median);
                r.time_vs_baseline = ratio(r.total_time_ms_median, base.total_time_ms_median);
            }
            rows.push(r);
        }
    }
    rows
}

/// The rows as a table, one line each.
pub struct Table<'a>(pub &'a [Row]);

/// `-` for a missing figure, else `f` of it.
fn or_dash<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

impl fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: f64 = (1u64 << 20) as f64;
        let w = self
            .0
            .iter()
            .map(|r| r.workload.len())
            .max()
            .unwrap_or(0)
            .max("workload".len());
        writeln!(
            f,
            "{:<w$}  {:<13}  {:>4}  {:>9}  {:>8}  {:>7}  {:>8}  {:>8}  {:>8}  {:>6}  {:>7}  {:>7}",
            "workload",
            "policy",
            "runs",
            "completed",
            "verified",
            "time s",
            "down ms",
            "down max",
            "MiB sent",
            "rounds",
            "bytes x",
            "time x",
        )?;
        for r in self.0 {
            writeln!(
                f,
                "{:<w$}  {:<13}  {:>4}  {:>9}  {:>8}  {:>7}  {:>8}  {:>8}  {:>8}  {:>6}  {:>7}  {:>7}",
                r.workload,
                r.policy.name(),
                r.runs,
                format!("{}/{} {:>3.0}%", r.completed, r.runs, r.success_rate * 100.0),
                format!("{}/{}", r.verified, r.runs),
                or_dash(r.total_time_ms_median, |v| format!("{:.1}", v / 1000.0)),
                or_dash(r.downtime_ms_median, |v| format!("{v:.0}")),
                or_dash(r.downtime_ms_max, |v| v.to_string()),
                or_dash(r.transferred_bytes_median, |v| format!("{:.1}", v / MIB)),
                or_dash(r.rounds_median, |v| format!("{v}")),
                or_dash(r.bytes_vs_baseline, |v| format!("{v:.2}")),
                or_dash(r.time_vs_baseline, |v| format!("{v:.2}")),
            )?;
        }
        write!(
            f,
            "time, downtime, MiB and rounds: medians over completed runs; \
             x: against baseline on the same workload"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run of `policy` on `workload`: `Some((time_ms, downtime_ms, MiB,
    /// rounds))` for a completed run, `None` for one that gave up.
    fn run(workload: &str, policy: Policy, done: Option<(u64, u64, u64, u32)>) -> Run {
        let result = match done {
            Some((t, d, mib, rounds)) => BenchResult {
                completed: true,
                verified: true,
                total_time_ms: t,
                downtime_ms: d,
                transferred_bytes: mib << 20,
                iterations: rounds,
                ..BenchResult::default()
            },
            // A failed run's figures must not leak into the medians.
            None => BenchResult {
                verified: true,
                total_time_ms: 99_999,
                downtime_ms: 0,
                transferred_bytes: 999 << 20,
                iterations: 30,
                ..BenchResult::default()
            },
        };
        Run {
            workload: workload.into(),
            workload_resolved: workload.into(),
            policy,
            repeat: 1,
            result: Some(result),
            error: None,
        }
    }

    fn broken(workload: &str, policy: Policy) -> Run {
        Run {
            result: None,
            error: Some("the source ferryd died".into()),
            ..run(workload, policy, None)
        }
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[5.0]), Some(5.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[1.0, 1.0, 100.0]), Some(1.0));
    }

    #[test]
    fn rows_take_medians_over_completed_runs_and_ratios_against_baseline() {
        use Policy::{Adaptive, Baseline};
        let runs = vec![
            run("w", Baseline, Some((1000, 10, 100, 3))),
            run("w", Baseline, Some((3000, 30, 300, 5))),
            run("w", Baseline, None),
            run("w", Adaptive, Some((500, 50, 50, 2))),
            run("w", Adaptive, Some((700, 90, 70, 2))),
            run("w", Adaptive, Some((600, 20, 60, 3))),
            broken("w", Adaptive),
        ];
        let rows = aggregate(&runs, &["w".into()], &[Baseline, Adaptive]);
        assert_eq!(rows.len(), 2);
        let b = &rows[0];
        assert_eq!((b.runs, b.completed, b.verified), (3, 2, 3));
        assert!((b.success_rate - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(b.total_time_ms_median, Some(2000.0));
        assert_eq!(b.downtime_ms_median, Some(20.0));
        assert_eq!(b.downtime_ms_max, Some(30));
        assert_eq!(b.transferred_bytes_median, Some((200u64 << 20) as f64));
        assert_eq!(b.rounds_median, Some(4.0));
        assert_eq!(
            (b.bytes_vs_baseline, b.time_vs_baseline),
            (Some(1.0), Some(1.0))
        );
        let a = &rows[1];
        // The broken run counts as a run, neither completed nor verified.
        assert_eq!((a.runs, a.completed, a.verified), (4, 3, 3));
        assert_eq!(a.success_rate, 0.75);
        assert_eq!(a.total_time_ms_median, Some(600.0));
        assert_eq!(a.downtime_ms_median, Some(50.0));
        assert_eq!(a.downtime_ms_max, Some(90));
        assert_eq!(a.rounds_median, Some(2.0));
        assert_eq!(a.bytes_vs_baseline, Some(60.0 / 200.0));
        assert_eq!(a.time_vs_baseline, Some(0.3));
    }

    #[test]
    fn no_ratio_without_a_completed_baseline() {
        use Policy::{Adaptive, Baseline, Mp};
        let runs = vec![
            // w1: baseline never completes; w2: adaptive never completes.
            run("w1", Baseline, None),
            run("w1", Adaptive, Some((500, 50, 50, 2))),
            run("w2", Baseline, Some((1000, 10, 100, 3))),
            run("w2", Adaptive, None),
        ];
        let ws = ["w1".to_string(), "w2".to_string()];
        let rows = aggregate(&runs, &ws, &[Baseline, Adaptive]);
        let (b1, a1, b2, a2) = (&rows[0], &rows[1], &rows[2], &rows[3]);
        assert_eq!((b1.completed, b1.total_time_ms_median), (0, None));
        assert_eq!(b1.downtime_ms_max, None);
        assert_eq!((a1.bytes_vs_baseline, a1.time_vs_baseline), (None, None));
        assert_eq!(a1.total_time_ms_median, Some(500.0));
        assert_eq!(b2.time_vs_baseline, Some(1.0));
        assert_eq!((a2.bytes_vs_baseline, a2.time_vs_baseline), (None, None));

        // Baseline not among the policies: no ratios, even with its runs present.
        let rows = aggregate(&runs, &ws, &[Adaptive]);
        assert!(rows.iter().all(|r| r.bytes_vs_baseline.is_none()));

        // A pair with no runs yet still has a row.
        let rows = aggregate(&runs, &ws, &[Mp]);
        assert_eq!((rows[0].runs, rows[0].success_rate), (0, 0.0));
    }

    #[test]
    fn table_shows_dashes_for_missing_figures() {
        use Policy::{Adaptive, Baseline};
        let runs = vec![
            run("dirty:3x", Baseline, None),
            run("dirty:3x", Adaptive, Some((2500, 40, 300, 4))),
        ];
        let rows = aggregate(&runs, &["dirty:3x".into()], &[Baseline, Adaptive]);
        let t = Table(&rows).to_string();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("workload  policy"), "{t}");
        assert!(lines[1].starts_with("dirty:3x  baseline"), "{t}");
        assert!(lines[1].contains("0/1   0%"), "{t}");
        assert!(lines[1].trim_end().ends_with("-        -"), "{t}");
        assert!(lines[2].contains("1/1 100%"), "{t}");
        assert!(lines[2].contains("2.5"), "{t}");
        assert!(lines[2].contains("300.0"), "{t}");
    }
}
