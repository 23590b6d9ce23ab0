//! PNG plots of a report: latency percentiles per scenario, throughput
//! against connections, drain rates. Drawn with plotters into an RGB buffer
//! (text by ab_glyph from a TTF read at run time) and written with `png`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context as _, Result, anyhow, bail};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::register_font;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::Report;
use super::scenarios::ScenarioRun;
use crate::load::Percentiles;

const FONTS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a sans-serif TTF with plotters once: `HOLDFAST_BENCH_FONT`, else
/// DejaVu Sans or Liberation Sans from the usual places.
fn font() -> Result<()> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os("HOLDFAST_BENCH_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain(FONTS.iter().map(PathBuf::from))
            .collect();
        let path = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
            format!("no TTF font found (tried {candidates:?}); set HOLDFAST_BENCH_FONT to one")
        })?;
        let bytes: &'static [u8] = Box::leak(
            std::fs::read(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .into_boxed_slice(),
        );
        register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{}: not a usable font", path.display()))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn write_png(path: &Path, buf: &[u8], (w, h): (u32, u32)) -> Result<()> {
    let file = std::fs::File::create(path)?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(buf)?;
    writer.finish()?;
    Ok(())
}

fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing: {e:?}")
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// One labelled row of bars (one bar per series), top to bottom.
struct Bars<'a> {
    caption: &'a str,
    x_desc: &'a str,
    series: &'a [&'a str],
    rows: Vec<(String, Vec<f64>)>,
    log: bool,
}

/// Horizontal grouped bars: long scenario names stay readable.
fn bars(path: &Path, b: &Bars<'_>) -> Result<()> {
    font()?;
    if b.rows.is_empty() {
        bail!("{}: nothing to plot", b.caption);
    }
    let values = b
        .rows
        .iter()
        .flat_map(|(_, v)| v)
        .copied()
        .filter(|v| *v > 0.0);
    let hi = values.clone().fold(0.0_f64, f64::max).max(1e-3) * 1.3;
    let lo = if b.log {
        values.fold(f64::INFINITY, f64::min).min(hi) / 2.0
    } else {
        0.0
    };
    let n = b.rows.len();
    let size = (
        1100u32,
        110 + 26 * n as u32 * (b.series.len() as u32).max(2) / 2 + 60,
    );
    let mut buf = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (names, area) = root.split_horizontally(330);
        let mut builder = ChartBuilder::on(&area);
        let chart = builder
            .caption(b.caption, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40);
        let y_range = 0.0..n as f64;
        let labels = if b.log {
            let mut c = chart
                .build_cartesian_2d((lo..hi).log_scale(), y_range)
                .map_err(draw_err)?;
            c.configure_mesh()
                .disable_y_mesh()
                .light_line_style(RGBColor(238, 238, 238))
                .y_labels(0)
                .x_desc(b.x_desc)
                .draw()
                .map_err(draw_err)?;
            draw_bars(&mut c, b, lo)?
        } else {
            let mut c = chart
                .build_cartesian_2d(lo..hi, y_range)
                .map_err(draw_err)?;
            c.configure_mesh()
                .disable_y_mesh()
                .light_line_style(RGBColor(238, 238, 238))
                .y_labels(0)
                .x_desc(b.x_desc)
                .x_label_formatter(&|v| thousands(*v))
                .draw()
                .map_err(draw_err)?;
            draw_bars(&mut c, b, lo)?
        };
        let style = ("sans-serif", 14)
            .into_text_style(&names)
            .pos(Pos::new(HPos::Right, VPos::Center));
        for ((label, _), y) in b.rows.iter().zip(labels) {
            names
                .draw(&Text::new(label.clone(), (322, y), style.clone()))
                .map_err(draw_err)?;
        }
        root.present().map_err(draw_err)?;
    }
    write_png(path, &buf, size)
}

/// Draws the bars (row 0 on top) and a legend; returns each row's label height in pixels.
fn draw_bars<'a, X>(
    c: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, RangedCoordf64>>,
    b: &Bars<'_>,
    lo: f64,
) -> Result<Vec<i32>>
where
    X: Ranged<ValueType = f64>,
{
    let n = b.rows.len();
    let gap = 0.15;
    let step = (1.0 - 2.0 * gap) / b.series.len() as f64;
    for (i, (_, vals)) in b.rows.iter().enumerate() {
        for (j, v) in vals.iter().enumerate() {
            // The first series on top within its row.
            let y0 = (n - 1 - i) as f64 + 1.0 - gap - (j + 1) as f64 * step;
            let bar = Rectangle::new(
                [(lo, y0), (v.max(lo), y0 + step * 0.9)],
                COLORS[j % COLORS.len()].filled(),
            );
            c.draw_series([bar]).map_err(draw_err)?;
        }
    }
    if b.series.len() > 1 {
        for (j, name) in b.series.iter().enumerate() {
            let color = COLORS[j % COLORS.len()];
            c.draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                .map_err(draw_err)?
                .label(*name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled())
                });
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(draw_err)?;
    }
    Ok((0..n)
        .map(|i| {
            c.backend_coord(&(lo.max(f64::MIN_POSITIVE), (n - 1 - i) as f64 + 0.5))
                .1
        })
        .collect())
}

fn thousands(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// Requests/s of single-event closed-loop runs against connections, one line per series and build.
/// Returns false, drawing nothing, when no run has the data (a `--only`
/// selection without closed-loop single-event runs).
fn throughput(path: &Path, report: &Report) -> Result<bool> {
    font()?;
    let mut lines: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for run in &report.scenarios {
        let Some(r) = &run.result else { continue };
        if run.pace != crate::load::Pace::Max
            || run.body.events_per_request != 1
            || run.body.client_uuids
        {
            continue;
        }
        if !["fsync", "os", "direct", "trivial"].contains(&run.series.as_str()) {
            continue;
        }
        let name = if run.build == "machine" {
            run.series.clone()
        } else {
            format!("{} ({})", run.series, run.build)
        };
        // One point per connection count: the median of its rounds.
        if lines
            .iter()
            .any(|(n, pts)| *n == name && pts.iter().any(|p| p.0 == run.connections as f64))
        {
            continue;
        }
        let rps = |s: &ScenarioRun| Some(s.result.as_ref()?.requests_per_sec);
        let median = report.median_of(&run.id, &run.build, rps);
        let point = (run.connections as f64, median.unwrap_or(r.requests_per_sec));
        match lines.iter_mut().find(|(n, _)| *n == name) {
            Some((_, pts)) => pts.push(point),
            None => lines.push((name, vec![point])),
        }
    }
    if lines.is_empty() {
        return Ok(false);
    }
    let xs = lines.iter().flat_map(|(_, p)| p.iter().map(|p| p.0));
    let xmax = xs.fold(1.0_f64, f64::max);
    let ymax = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.15;
    let size = (1000u32, 620u32);
    let mut buf = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut c = ChartBuilder::on(&root)
            .caption(
                "Single-event requests/s vs connections (closed loop)",
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..xmax * 1.1, 0.0..ymax)
            .map_err(draw_err)?;
        c.configure_mesh()
            .light_line_style(RGBColor(238, 238, 238))
            .x_desc("connections")
            .y_desc("requests/s")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| thousands(*v))
            .draw()
            .map_err(draw_err)?;
        for (k, (name, mut pts)) in lines.into_iter().enumerate() {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let color = COLORS[k % COLORS.len()];
            c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(draw_err)?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                });
            c.draw_series(PointSeries::of_element(
                pts,
                4,
                color.filled(),
                &|p, s, st| EmptyElement::at(p) + Circle::new((0, 0), s, st),
            ))
            .map_err(draw_err)?;
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    write_png(path, &buf, size)?;
    Ok(true)
}

/// Writes every plot into `dir`; returns the file names.
pub fn write_all(dir: &Path, report: &Report) -> Result<Vec<String>> {
    let mut written = Vec::new();
    let label = |id: &str, build: &str| {
        if build == "machine" {
            id.to_owned()
        } else {
            format!("{id} ({build})")
        }
    };
    // One bar per scenario and build: the medians of its rounds.
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    for r in &report.scenarios {
        let name = label(&r.id, &r.build);
        if r.result.is_none() || rows.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let of = |f: fn(&Percentiles) -> f64| {
            report
                .median_of(&r.id, &r.build, |s| Some(f(&s.result.as_ref()?.latency_ms)))
                .unwrap_or(f64::NAN)
        };
        rows.push((name, vec![of(|l| l.p50), of(|l| l.p99), of(|l| l.p999)]));
    }
    // A `--only` selection may leave a plot without data: it is skipped.
    if !rows.is_empty() {
        bars(
            &dir.join("latency.png"),
            &Bars {
                caption: "Latency per scenario (open loop: from the intended send time)",
                x_desc: "milliseconds (log)",
                series: &["P50", "P99", "P99.9"],
                rows,
                log: true,
            },
        )
        .context("latency.png")?;
        written.push("latency.png".to_owned());
    }
    if throughput(&dir.join("throughput.png"), report).context("throughput.png")? {
        written.push("throughput.png".to_owned());
    }
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    for d in report.drains.iter().filter(|d| d.error.is_none()) {
        let name = label(&d.id, &d.build);
        if !rows.iter().any(|(n, _)| *n == name) {
            let rate = report
                .drain_rate(&d.id, &d.build)
                .unwrap_or(d.events_per_sec);
            rows.push((name, vec![rate]));
        }
    }
    if !rows.is_empty() {
        bars(
            &dir.join("drain.png"),
            &Bars {
                caption: "Drain of one buffer into Kafka, and a raw produce loop",
                x_desc: "events/s",
                series: &["events/s"],
                rows,
                log: false,
            },
        )
        .context("drain.png")?;
        written.push("drain.png".to_owned());
    }
    Ok(written)
}
