//! The chart of a `ferry-bench policies` experiment: one SVG with three
//! panels of grouped bars, a group per workload and a bar per policy —
//! median total time and median bytes on the wire (completed runs only; a
//! group without a completed run shows "none"), and the share of runs that
//! completed.
//!
//! SVG only: plotters' SVG backend writes text as `<text>` elements and
//! estimates its extent, so no font library or system font is needed.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::aggregate::Row;
use crate::migrate::Policy;

/// Width of the image; each panel gets a third of the height below the title.
const WIDTH_PX: u32 = 1100;
const HEIGHT_PX: u32 = 1000;
const TITLE_PX: u32 = 40;
/// Right margin of every panel, where the legend goes.
const LEGEND_PX: u32 = 150;
/// Share of a group's width left empty between groups.
const GROUP_GAP: f64 = 0.2;
const FONT: &str = "sans-serif";

/// One color per policy, the same in every chart (indexed as `Policy::ALL`).
const COLORS: [RGBColor; 6] = [
    RGBColor(0x55, 0x55, 0x55),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
];

fn color(p: Policy) -> RGBColor {
    let i = Policy::ALL.iter().position(|q| *q == p).unwrap_or(0);
    COLORS[i % COLORS.len()]
}

/// One panel: a title, a unit, and the figure of a row.
struct Metric {
    title: &'static str,
    unit: &'static str,
    value: fn(&Row) -> Option<f64>,
    format: fn(f64) -> String,
}

const METRICS: [Metric; 3] = [
    Metric {
        title: "total time, median of completed runs",
        unit: "s",
        value: |r| r.total_time_ms_median.map(|v| v / 1000.0),
        format: |v| format!("{v:.1}"),
    },
    Metric {
        title: "bytes on the wire, median of completed runs",
        unit: "MiB",
        value: |r| r.transferred_bytes_median.map(|v| v / (1u64 << 20) as f64),
        format: |v| format!("{v:.0}"),
    },
    Metric {
        title: "runs completed",
        unit: "%",
        value: |r| (r.runs > 0).then_some(r.success_rate * 100.0),
        format: |v| format!("{v:.0}"),
    },
];

/// Writes the chart of `rows` (workloads in `workloads` order, policies in
/// `policies` order) to `path`.
pub fn write(
    path: &Path,
    title: &str,
    rows: &[Row],
    workloads: &[String],
    policies: &[Policy],
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let root = SVGBackend::new(path, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (head, body) = root.split_vertically(TITLE_PX);
    head.draw(&Text::new(
        title.to_string(),
        (10, 10),
        (FONT, 18).into_font().color(&BLACK),
    ))
    .map_err(|e| err(&e))?;
    for (panel, metric) in body.split_evenly((3, 1)).iter().zip(&METRICS) {
        draw_panel(&root, panel, metric, rows, workloads, policies).map_err(|e| err(&e))?;
    }
    draw_legend(&root, policies).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn draw_panel(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    panel: &DrawingArea<SVGBackend<'_>, Shift>,
    metric: &Metric,
    rows: &[Row],
    workloads: &[String],
    policies: &[Policy],
) -> DrawResult {
    let find = |w: &str, p: Policy| rows.iter().find(|r| r.workload == w && r.policy == p);
    let y_max = rows
        .iter()
        .filter_map(metric.value)
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let groups = workloads.len().max(1) as f64;
    let mut chart = ChartBuilder::on(panel)
        .caption(metric.title, (FONT, 15))
        .margin(10)
        .margin_right(LEGEND_PX)
        .x_label_area_size(28)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..groups, 0.0..y_max * 1.15)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(metric.unit)
        .y_max_light_lines(1)
        .y_label_formatter(&|v| tick(*v))
        .label_style((FONT, 12))
        .draw()?;

    let bar_w = (1.0 - GROUP_GAP) / policies.len().max(1) as f64;
    let label_style =
        TextStyle::from((FONT, 11).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (pi, &p) in policies.iter().enumerate() {
        let bars: Vec<(f64, f64)> = workloads
            .iter()
            .enumerate()
            .filter_map(|(wi, w)| {
                let x0 = wi as f64 + GROUP_GAP / 2.0 + pi as f64 * bar_w;
                find(w, p).and_then(metric.value).map(|v| (x0, v))
            })
            .collect();
        let c = color(p);
        chart.draw_series(
            bars.iter()
                .map(|&(x0, v)| Rectangle::new([(x0, 0.0), (x0 + bar_w * 0.9, v)], c.filled())),
        )?;
        chart.draw_series(bars.iter().map(|&(x0, v)| {
            Text::new(
                (metric.format)(v),
                (x0 + bar_w * 0.45, v),
                label_style.clone(),
            )
        }))?;
        // A group this policy ran in but never completed: say so.
        let none: Vec<f64> = workloads
            .iter()
            .enumerate()
            .filter(|(_, w)| find(w, p).is_some_and(|r| r.runs > 0 && metric.value(r).is_none()))
            .map(|(wi, _)| wi as f64 + GROUP_GAP / 2.0 + pi as f64 * bar_w)
            .collect();
        chart.draw_series(none.iter().map(|&x0| {
            Text::new(
                "none",
                (x0 + bar_w * 0.45, 0.0),
                label_style.clone().color(&c),
            )
        }))?;
    }
    // Workload names under their groups, drawn on the whole image at the
    // pixel the chart maps each group's center to (outside the plot area,
    // which clips).
    let name_style = TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (wi, w) in workloads.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(wi as f64 + 0.5, 0.0));
        root.draw(&Text::new(w.clone(), (x, y + 6), name_style.clone()))?;
    }
    Ok(())
}

/// A color box and name per policy, in the right margin of the image
/// (plotters' own series labels are drawn inside the clipped plot area).
fn draw_legend(root: &DrawingArea<SVGBackend<'_>, Shift>, policies: &[Policy]) -> DrawResult {
    let x = (WIDTH_PX - LEGEND_PX + 20) as i32;
    for (i, &p) in policies.iter().enumerate() {
        let y = (TITLE_PX + 30) as i32 + 20 * i as i32;
        root.draw(&Rectangle::new(
            [(x, y), (x + 12, y + 12)],
            color(p).filled(),
        ))?;
        root.draw(&Text::new(
            p.name(),
            (x + 18, y),
            (FONT, 13).into_font().color(&BLACK),
        ))?;
    }
    Ok(())
}

/// An axis figure without float noise or trailing zeros: 0.3, 1.25, 120.
fn tick(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl Metric {
    fn value(&self, r: &Row) -> Option<f64> {
        (self.value)(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_read_cleanly() {
        assert_eq!(tick(0.1 + 0.2), "0.3");
        assert_eq!(tick(120.0), "120");
        assert_eq!(tick(1.25), "1.25");
        assert_eq!(tick(0.0), "0");
    }

    #[test]
    fn writes_an_svg_with_labels_and_none_markers() {
        let dir = crate::procs::TempDir::new().unwrap();
        let path = dir.path().join("chart.svg");
        let row = |w: &str, p, done: bool| Row {
            workload: w.into(),
            policy: p,
            runs: 2,
            completed: if done { 2 } else { 0 },
            verified: 2,
            success_rate: if done { 1.0 } else { 0.0 },
            total_time_ms_median: done.then_some(2500.0),
            downtime_ms_median: done.then_some(40.0),
            downtime_ms_max: done.then_some(50),
            transferred_bytes_median: done.then_some((300u64 << 20) as f64),
            rounds_median: done.then_some(3.0),
            bytes_vs_baseline: None,
            time_vs_baseline: None,
        };
        let rows = vec![
            row("dirty:0.5x", Policy::Baseline, true),
            row("dirty:0.5x", Policy::Adaptive, true),
            row("dirty:3x", Policy::Baseline, false),
            row("dirty:3x", Policy::Adaptive, true),
        ];
        let ws = ["dirty:0.5x".to_string(), "dirty:3x".to_string()];
        write(
            &path,
            "test",
            &rows,
            &ws,
            &[Policy::Baseline, Policy::Adaptive],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        for s in [
            "dirty:0.5x",
            "dirty:3x",
            "baseline",
            "adaptive",
            "none",
            "2.5",
            "300",
            "runs completed",
        ] {
            assert!(svg.contains(s), "{s} not in the chart");
        }
    }
}
