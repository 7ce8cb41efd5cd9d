//! The chart of a `ferry-bench compare` experiment, as SVG and as PNG: four
//! panels (effective MiB/s, downtime, source and target ferryd CPU per GiB)
//! against the stream count, one line per transport through the medians,
//! with a whisker from the smallest to the largest value at each point.
//!
//! The same drawing code runs on both backends. SVG text needs no font
//! (plotters writes `<text>` elements); the PNG's text is drawn by
//! [`super::bitmap::Labeled`] with a font read at run time, or left out.

use std::path::Path;

use ab_glyph::FontVec;
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::aggregate::{Row, Spread, TransportStatus};
use super::bitmap::{self, Labeled};

/// The image; four panels in two rows below the title band.
pub const SIZE_PX: (u32, u32) = (1200, 860);
/// Title and legend band.
const TITLE_PX: u32 = 60;
/// Horizontal distance between the transports' points at one stream count,
/// in stream slots (a slot is 1 wide), so whiskers do not hide each other.
const SPREAD_X: f64 = 0.08;
/// Half the width of a whisker's caps, in stream slots.
const CAP_X: f64 = 0.03;
const FONT: &str = "sans-serif";
const GREY: RGBColor = RGBColor(0x88, 0x88, 0x88);

/// A transport's color, the same in every chart.
fn color(transport: &str) -> RGBColor {
    match transport {
        "tcp" => RGBColor(0x1f, 0x77, 0xb4),
        "uring" => RGBColor(0xff, 0x7f, 0x0e),
        "rdma" => RGBColor(0x2c, 0xa0, 0x2c),
        _ => RGBColor(0x94, 0x67, 0xbd),
    }
}

/// One panel: a title, a unit, and the figure of a row.
struct Metric {
    title: &'static str,
    unit: &'static str,
    value: fn(&Row) -> Option<Spread>,
}

const METRICS: [Metric; 4] = [
    Metric {
        title: "effective throughput (guest MiB / total time)",
        unit: "MiB/s",
        value: |r| r.effective_mib_s,
    },
    Metric {
        title: "downtime",
        unit: "ms",
        value: |r| r.downtime_ms,
    },
    Metric {
        title: "source ferryd CPU per GiB moved",
        unit: "CPU s/GiB",
        value: |r| r.source_cpu_s_per_gib,
    },
    Metric {
        title: "target ferryd CPU per GiB moved",
        unit: "CPU s/GiB",
        value: |r| r.target_cpu_s_per_gib,
    },
];

/// What the chart shows.
#[derive(Clone, Copy, Debug)]
pub struct Chart<'a> {
    /// The line at the top.
    pub title: &'a str,
    /// The experiment's rows.
    pub rows: &'a [Row],
    /// Every transport asked for, with why it could not run (if so).
    pub transports: &'a [TransportStatus],
    /// The stream counts, in x order.
    pub streams: &'a [u32],
}

/// Writes the chart as SVG.
pub fn write_svg(path: &Path, chart: &Chart<'_>) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let root = SVGBackend::new(path, SIZE_PX).into_drawing_area();
    draw(&root, chart).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Writes the chart as PNG; its text only with a `font`.
pub fn write_png(path: &Path, chart: &Chart<'_>, font: Option<&FontVec>) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let (w, h) = SIZE_PX;
    let mut buf = vec![0xff; w as usize * h as usize * 3];
    {
        let root = Labeled::new(&mut buf, SIZE_PX, font).into_drawing_area();
        draw(&root, chart).map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    bitmap::write_png(path, &buf, SIZE_PX)
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, chart: &Chart<'_>) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(TITLE_PX);
    head.draw(&Text::new(
        chart.title.to_string(),
        (10, 8),
        (FONT, 18).into_font().color(&BLACK),
    ))?;
    draw_legend(&head, chart.transports)?;
    for (area, metric) in body.split_evenly((2, 2)).iter().zip(&METRICS) {
        draw_panel(root, area, metric, chart)?;
    }
    Ok(())
}

/// A line sample and the name of each transport; unavailable ones in grey.
fn draw_legend<DB: DrawingBackend>(
    head: &DrawingArea<DB, Shift>,
    transports: &[TransportStatus],
) -> DrawResult<DB> {
    let mut x = 12;
    let y = 40;
    for t in transports {
        let (label, c) = match &t.unavailable {
            None => (t.name.clone(), color(&t.name)),
            Some(_) => (format!("{} (unavailable)", t.name), GREY),
        };
        if t.unavailable.is_none() {
            head.draw(&PathElement::new(
                vec![(x, y), (x + 24, y)],
                c.stroke_width(2),
            ))?;
            head.draw(&Circle::new((x + 12, y), 4, c.filled()))?;
        }
        let style = TextStyle::from((FONT, 13).into_font())
            .color(&c)
            .pos(Pos::new(HPos::Left, VPos::Center));
        // The backend's own estimate: the font's metrics on the PNG.
        let (w, _) = head.estimate_text_size(&label, &style)?;
        head.draw(&Text::new(label, (x + 30, y), style))?;
        x += 30 + w as i32 + 24;
    }
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    area: &DrawingArea<DB, Shift>,
    metric: &Metric,
    chart: &Chart<'_>,
) -> DrawResult<DB> {
    let slots = chart.streams.len().max(1) as f64;
    let y_max = chart
        .rows
        .iter()
        .filter_map(metric.value)
        .map(|s| s.max)
        .fold(0.0_f64, f64::max);
    let y_top = if y_max > 0.0 { y_max * 1.15 } else { 1.0 };
    let mut c = ChartBuilder::on(area)
        .caption(metric.title, (FONT, 15))
        .margin(10)
        .margin_right(20)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..slots - 0.5, 0.0..y_top)?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_desc("streams")
        .y_desc(metric.unit)
        .y_max_light_lines(1)
        .y_label_formatter(&|v| tick(*v))
        .label_style((FONT, 12))
        .draw()?;

    let runnable: Vec<&str> = chart
        .transports
        .iter()
        .filter(|t| t.unavailable.is_none())
        .map(|t| t.name.as_str())
        .collect();
    for (ti, &t) in runnable.iter().enumerate() {
        let dx = (ti as f64 - (runnable.len() - 1) as f64 / 2.0) * SPREAD_X;
        let points: Vec<(f64, Spread)> = chart
            .streams
            .iter()
            .enumerate()
            .filter_map(|(si, &s)| {
                let row = chart
                    .rows
                    .iter()
                    .find(|r| r.transport == t && r.streams == s)?;
                (metric.value)(row).map(|v| (si as f64 + dx, v))
            })
            .collect();
        let col = color(t);
        c.draw_series(std::iter::once(PathElement::new(
            points
                .iter()
                .map(|(x, s)| (*x, s.median))
                .collect::<Vec<_>>(),
            col.stroke_width(2),
        )))?;
        for (x, s) in &points {
            if s.max > s.min {
                c.draw_series([
                    PathElement::new(vec![(*x, s.min), (*x, s.max)], col.stroke_width(1)),
                    PathElement::new(
                        vec![(x - CAP_X, s.min), (x + CAP_X, s.min)],
                        col.stroke_width(1),
                    ),
                    PathElement::new(
                        vec![(x - CAP_X, s.max), (x + CAP_X, s.max)],
                        col.stroke_width(1),
                    ),
                ])?;
            }
        }
        c.draw_series(
            points
                .iter()
                .map(|(x, s)| Circle::new((*x, s.median), 4, col.filled())),
        )?;
    }
    // Stream counts under their slots, drawn on the whole image at the pixel
    // the chart maps each slot to (outside the plot area, which clips).
    let style = TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (si, s) in chart.streams.iter().enumerate() {
        let (x, y) = c.backend_coord(&(si as f64, 0.0));
        root.draw(&Text::new(s.to_string(), (x, y + 6), style.clone()))?;
    }
    Ok(())
}

/// An axis figure without float noise or trailing zeros: 0.3, 1.25, 120.
fn tick(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::aggregate::TransportStatus as T;
    use crate::compare::aggregate::{aggregate, Run};
    use crate::migrate::cpu::CpuUse;
    use crate::migrate::report::BenchResult;

    fn run(transport: &str, streams: u32, eff: f64) -> Run {
        Run {
            seq: 1,
            repeat: 1,
            transport: transport.into(),
            streams,
            result: Some(BenchResult {
                completed: true,
                verified: true,
                effective_mib_s: eff,
                downtime_ms: 3,
                cpu: Some(CpuUse {
                    source_s_per_gib: Some(0.625),
                    target_s_per_gib: Some(0.5),
                    ..CpuUse::default()
                }),
                ..BenchResult::default()
            }),
            error: None,
        }
    }

    fn rows() -> (Vec<T>, Vec<Row>) {
        let runs = vec![
            run("tcp", 1, 1000.0),
            run("tcp", 1, 1400.0),
            run("tcp", 2, 2000.0),
            run("uring", 1, 1500.0),
        ];
        let ts = vec![
            T::runnable("tcp"),
            T::runnable("uring"),
            T::unavailable("rdma", "not built"),
        ];
        let rows = aggregate(&runs, &ts, &[1, 2, 8]);
        (ts, rows)
    }

    #[test]
    fn ticks_read_cleanly() {
        assert_eq!(tick(0.1 + 0.2), "0.3");
        assert_eq!(tick(120.0), "120");
        assert_eq!(tick(0.125), "0.125");
        assert_eq!(tick(0.0), "0");
    }

    #[test]
    fn writes_an_svg_with_every_label() {
        let dir = crate::procs::TempDir::new().unwrap();
        let path = dir.path().join("compare.svg");
        let (ts, rows) = rows();
        let chart = Chart {
            title: "test chart",
            rows: &rows,
            transports: &ts,
            streams: &[1, 2, 8],
        };
        write_svg(&path, &chart).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        for s in [
            "test chart",
            "tcp",
            "uring",
            "rdma (unavailable)",
            "effective throughput",
            "downtime",
            "source ferryd CPU",
            "target ferryd CPU",
            "streams",
            "MiB/s",
            ">\n8\n<",
        ] {
            assert!(svg.contains(s), "{s} not in the chart");
        }
        // A whisker for tcp at 1 stream (1000-1400), none where one run.
        assert!(svg.contains("<circle"), "no points");
    }

    #[test]
    fn writes_a_png_with_and_without_a_font() {
        let dir = crate::procs::TempDir::new().unwrap();
        let (ts, rows) = rows();
        let chart = Chart {
            title: "test chart",
            rows: &rows,
            transports: &ts,
            streams: &[1, 2, 8],
        };
        let bare = dir.path().join("bare.png");
        write_png(&bare, &chart, None).unwrap();
        let size = |p: &Path| {
            let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
            let r = dec.read_info().unwrap();
            (r.info().width, r.info().height)
        };
        assert_eq!(size(&bare), SIZE_PX);
        let Some(font) = bitmap::find_font(None).unwrap() else {
            eprintln!(
                "skipped the labelled PNG: none of {:?} is here",
                bitmap::FONT_PATHS
            );
            return;
        };
        let labelled = dir.path().join("labelled.png");
        write_png(&labelled, &chart, Some(&font.font)).unwrap();
        assert_eq!(size(&labelled), SIZE_PX);
        // Text adds ink: the labelled file compresses worse.
        let len = |p: &Path| std::fs::metadata(p).unwrap().len();
        assert!(
            len(&labelled) > len(&bare),
            "{} <= {}",
            len(&labelled),
            len(&bare)
        );
    }
}
