//! The report of a bench run: everything measured (`report.json`), the
//! ratios that survive a shared machine's drift, this build against a
//! baseline per figure, and the same as Markdown (`report.md`).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::drain::DrainRun;
use super::machine::FsyncProbe;
use super::scenarios::ScenarioRun;
use crate::load::Pace;

/// Where and how the run was made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    /// CPUs online.
    pub cores: usize,
    /// `uname -r`.
    pub kernel: String,
    /// Load average (1, 5, 15 min) when the run began.
    pub loadavg_start: String,
    /// Load average when it ended.
    pub loadavg_end: String,
}

/// Scale of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scale {
    /// Measured seconds per scenario.
    pub duration_secs: f64,
    /// Warm-up seconds per scenario.
    pub warmup_secs: f64,
    /// Events in the drained buffer.
    pub drain_events: u64,
    /// Bytes per event.
    pub event_bytes: usize,
    /// Events per batch request.
    pub batch_events: usize,
    /// Connections of the closed-loop runs.
    pub connections: Vec<usize>,
    /// Rates of the open-loop runs.
    pub fixed_rates: Vec<f64>,
    /// Connections of the open-loop runs.
    pub fixed_connections: usize,
    /// Partitions of every topic.
    pub partitions: u32,
}

/// A build measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildInfo {
    /// Label (`this`, or the baseline's revision).
    pub label: String,
    /// Its `holdfast-capture`.
    pub capture: String,
}

/// A ratio (or difference) between two figures of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ratio {
    /// What it compares.
    pub name: String,
    /// Build it is about (`machine` when none).
    pub build: String,
    /// The value.
    pub value: f64,
    /// `x` for a ratio, `ms` for a difference.
    pub unit: String,
}

/// One figure of one scenario, this build against the baseline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// Scenario or drain id.
    pub id: String,
    /// `req/s`, `events/s`, `P50 ms`, `P99 ms`, `P99.9 ms`, `RSS MiB`.
    pub figure: String,
    /// This build's value.
    pub this: f64,
    /// The baseline's value.
    pub baseline: f64,
    /// `this / baseline` (of the medians over rounds).
    pub ratio: f64,
    /// Rounds in which both builds measured this figure.
    #[serde(default)]
    pub rounds: usize,
    /// The lowest and highest of those rounds' own ratios.
    #[serde(default)]
    pub low: f64,
    #[serde(default)]
    pub high: f64,
}

/// The median of `values` (the mean of the middle two when there is an
/// even number); `None` when there is no finite value.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

fn p50(r: &ScenarioRun) -> Option<f64> {
    r.result.as_ref().map(|x| x.latency_ms.p50)
}

fn rps(r: &ScenarioRun) -> Option<f64> {
    r.result.as_ref().map(|x| x.requests_per_sec)
}

/// A figure of a scenario run, by name.
type Figure = (&'static str, fn(&ScenarioRun) -> Option<f64>);

/// The figures compared between builds; `events/s` only for closed loops
/// (an open loop's rate is the generator's).
const FIGURES: [Figure; 5] = [
    ("events/s", |r| {
        (r.pace == Pace::Max).then_some(r.result.as_ref()?.events_per_sec)
    }),
    ("P50 ms", p50),
    ("P99 ms", |r| Some(r.result.as_ref()?.latency_ms.p99)),
    ("P99.9 ms", |r| Some(r.result.as_ref()?.latency_ms.p999)),
    ("RSS MiB", |r| r.rss_peak_mib),
];

/// Everything a run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// When the run ended (RFC 3339, UTC).
    pub generated_at: String,
    /// Wall time of the whole run, seconds.
    pub run_seconds: f64,
    /// The machine.
    pub host: Host,
    /// Scale knobs.
    pub scale: Scale,
    /// Builds, this one first.
    pub builds: Vec<BuildInfo>,
    /// fsync probes of the buffer disk: at the start and at the end.
    pub fsync: Vec<FsyncProbe>,
    /// HTTP scenarios.
    pub scenarios: Vec<ScenarioRun>,
    /// Drains and the raw produce loop.
    pub drains: Vec<DrainRun>,
    /// Ratios within the run.
    pub ratios: Vec<Ratio>,
    /// This build / baseline, per figure (empty without a baseline).
    pub comparisons: Vec<Comparison>,
    /// PNG files written next to the report.
    pub plots: Vec<String>,
    /// The speed targets, each met or not (see `targets.rs`).
    #[serde(default)]
    pub targets: Vec<super::targets::TargetCheck>,
}

impl Report {
    /// The run of scenario `id` by `build`, if it measured anything (the
    /// first round's).
    pub fn scenario(&self, id: &str, build: &str) -> Option<&ScenarioRun> {
        self.scenarios
            .iter()
            .find(|r| r.id == id && r.build == build && r.result.is_some())
    }

    /// Every run of scenario `id` by `build` that measured something, in
    /// round order.
    fn runs<'a>(&'a self, id: &'a str, build: &'a str) -> impl Iterator<Item = &'a ScenarioRun> {
        self.scenarios
            .iter()
            .filter(move |r| r.id == id && r.build == build && r.result.is_some())
    }

    /// The median over rounds of figure `f` of scenario `id` by `build`.
    pub fn median_of(
        &self,
        id: &str,
        build: &str,
        f: impl Fn(&ScenarioRun) -> Option<f64>,
    ) -> Option<f64> {
        median(self.runs(id, build).filter_map(f).collect())
    }

    /// The drains of `id` by `build` that finished, in round order.
    fn drains_of<'a>(&'a self, id: &'a str, build: &'a str) -> impl Iterator<Item = &'a DrainRun> {
        self.drains
            .iter()
            .filter(move |d| d.id == id && d.build == build && d.error.is_none())
    }

    /// The median drain rate of `id` by `build` over rounds.
    pub fn drain_rate(&self, id: &str, build: &str) -> Option<f64> {
        median(
            self.drains_of(id, build)
                .map(|d| d.events_per_sec)
                .collect(),
        )
    }

    /// Computes [`Report::ratios`] and [`Report::comparisons`] from the runs
    /// (medians over rounds), and the targets from both.
    pub fn derive(&mut self) {
        let mut ratios = Vec::new();
        let mut shapes: Vec<String> = Vec::new();
        for r in &self.scenarios {
            if r.series == "fsync" && r.body.events_per_request == 1 && !shapes.contains(&r.shape) {
                shapes.push(r.shape.clone());
            }
        }
        let mut add = |name: String, build: &str, value: f64, unit: &str| {
            if value.is_finite() {
                ratios.push(Ratio {
                    name,
                    build: build.to_owned(),
                    value,
                    unit: unit.to_owned(),
                });
            }
        };
        let fsync_median = self.fsync.first().map(|f| f.p50_ms);
        // The probe taken just before the run, else the run's first.
        let over_fsync = |r: &ScenarioRun| Some(p50(r)? - r.fsync_p50_ms.or(fsync_median)?);
        for b in &self.builds {
            let b = b.label.as_str();
            for shape in &shapes {
                let durable = format!("fsync {shape}");
                let direct = format!("direct {shape}");
                if let (Some(d), Some(x)) = (
                    self.median_of(&durable, b, p50),
                    self.median_of(&direct, b, p50),
                ) {
                    add(format!("durable P50 / direct P50, {shape}"), b, d / x, "x");
                }
                let closed = self
                    .scenario(&durable, b)
                    .is_some_and(|r| r.pace == Pace::Max);
                if closed
                    && let (Some(d), Some(t)) = (
                        self.median_of(&durable, b, rps),
                        self.median_of(&format!("trivial {shape}"), "machine", rps),
                    )
                {
                    let name = format!("durable req/s / trivial-handler req/s, {shape}");
                    add(name, b, d / t, "x");
                }
                if let Some(v) = self.median_of(&durable, b, over_fsync) {
                    add(format!("durable P50 - fsync median, {shape}"), b, v, "ms");
                }
            }
            let raw = self.drain_rate("raw produce", "machine");
            for mode in ["flush at-least-once", "flush exactly-once"] {
                if let (Some(d), Some(r)) = (self.drain_rate(mode, b), raw) {
                    let name = format!("drain / raw produce, {}", &mode[6..]);
                    add(name, b, d / r, "x");
                }
            }
        }
        self.ratios = ratios;
        self.comparisons = self.compare();
        self.targets = super::targets::evaluate(self);
    }

    fn compare(&self) -> Vec<Comparison> {
        let [this, base] = match &self.builds[..] {
            [a, b, ..] => [a.label.as_str(), b.label.as_str()],
            _ => return Vec::new(),
        };
        let mut out = Vec::new();
        // Medians of each build's rounds, and the range of the ratios of
        // the rounds both builds measured.
        let mut push = |id: &str, figure: &str, a: Vec<(usize, f64)>, b: Vec<(usize, f64)>| {
            let (Some(x), Some(y)) = (
                median(a.iter().map(|v| v.1).collect()),
                median(b.iter().map(|v| v.1).collect()),
            ) else {
                return;
            };
            let per_round: Vec<f64> = a
                .iter()
                .filter_map(|(round, v)| {
                    let (_, w) = b.iter().find(|(r, _)| r == round)?;
                    (*w > 0.0).then(|| v / w)
                })
                .collect();
            out.push(Comparison {
                id: id.to_owned(),
                figure: figure.to_owned(),
                this: x,
                baseline: y,
                ratio: if y > 0.0 { x / y } else { f64::NAN },
                rounds: per_round.len(),
                low: per_round.iter().copied().fold(f64::NAN, f64::min),
                high: per_round.iter().copied().fold(f64::NAN, f64::max),
            })
        };
        let mut ids: Vec<&str> = Vec::new();
        for r in self.scenarios.iter().filter(|r| r.build == this) {
            if !ids.contains(&r.id.as_str()) {
                ids.push(&r.id);
            }
        }
        for id in ids {
            for (figure, f) in FIGURES {
                let of = |build| -> Vec<(usize, f64)> {
                    self.runs(id, build)
                        .filter_map(|r| Some((r.round, f(r)?)))
                        .collect()
                };
                push(id, figure, of(this), of(base));
            }
        }
        let mut ids: Vec<&str> = Vec::new();
        for d in self.drains.iter().filter(|d| d.build == this) {
            if !ids.contains(&d.id.as_str()) {
                ids.push(&d.id);
            }
        }
        for id in ids {
            let rates = |build| -> Vec<(usize, f64)> {
                self.drains_of(id, build)
                    .map(|d| (d.round, d.events_per_sec))
                    .collect()
            };
            push(id, "events/s", rates(this), rates(base));
            let rss = |build| -> Vec<(usize, f64)> {
                self.drains_of(id, build)
                    .filter_map(|d| Some((d.round, d.rss_peak_mib?)))
                    .collect()
            };
            push(id, "RSS MiB", rss(this), rss(base));
        }
        out
    }

    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let h = &self.host;
        let _ = writeln!(m, "# Holdfast bench report\n");
        let _ = writeln!(
            m,
            "{} · {} cores · kernel {} · load average {} at the start, {} at the end · run took {:.0} s\n",
            self.generated_at, h.cores, h.kernel, h.loadavg_start, h.loadavg_end, self.run_seconds
        );
        let s = &self.scale;
        let _ = writeln!(
            m,
            "Each scenario: a fresh capture pod and buffer, {:.1} s of load measured after {:.1} s of warm-up; events of {} bytes; \
             open loop at a fixed rate over {} connections (latency from the intended send time), closed loop otherwise; \
             topics of {} partitions on one local broker sharing the cores. Builds: {}.\n",
            s.duration_secs,
            s.warmup_secs,
            s.event_bytes,
            s.fixed_connections,
            s.partitions,
            self.builds
                .iter()
                .map(|b| format!("`{}` ({})", b.label, b.capture))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(m, "## Machine\n");
        for (f, when) in self.fsync.iter().zip(["start", "end"]) {
            let _ = writeln!(
                m,
                "- fsync of the buffer disk ({when}; {} B write + fdatasync, {} times in {}): P50 {:.3} ms, P99 {:.3} ms, max {:.3} ms",
                f.bytes_per_write, f.writes, f.dir, f.p50_ms, f.p99_ms, f.max_ms
            );
        }
        let _ = writeln!(
            m,
            "\n## Scenarios\n\n| scenario | build | req/s | events/s | P50 ms | P99 ms | P99.9 ms | max ms | errors | RSS MiB | fsync P50 ms |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"
        );
        for r in &self.scenarios {
            let rss = r.rss_peak_mib.map_or("-".into(), |v| format!("{v:.0}"));
            let fsync = r.fsync_p50_ms.map_or("-".into(), |v| format!("{v:.3}"));
            match &r.result {
                Some(x) => {
                    let l = x.latency_ms;
                    let errors = if x.errors.is_empty() {
                        "0".to_owned()
                    } else {
                        x.errors
                            .iter()
                            .map(|(k, v)| format!("{k}: {v}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    let _ = writeln!(
                        m,
                        "| {} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {fsync} |",
                        r.id,
                        who(&r.build, r.round),
                        grouped(x.requests_per_sec),
                        grouped(x.events_per_sec),
                        l.p50,
                        l.p99,
                        l.p999,
                        l.max,
                        errors,
                        rss
                    );
                }
                None => {
                    let why = first_line(r.error.as_deref().unwrap_or("no result"));
                    let _ = writeln!(
                        m,
                        "| {} | {} | failed: {why} | | | | | | | | |",
                        r.id,
                        who(&r.build, r.round)
                    );
                }
            }
        }
        let _ = writeln!(
            m,
            "\n## Drain\n\n| drain | build | events | seconds | events/s | records in Kafka | RSS MiB |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |"
        );
        for d in &self.drains {
            match &d.error {
                None => {
                    let rss = d.rss_peak_mib.map_or("-".into(), |v| format!("{v:.0}"));
                    let _ = writeln!(
                        m,
                        "| {} | {} | {} | {:.2} | {} | {} | {rss} |",
                        d.id,
                        who(&d.build, d.round),
                        grouped(d.events as f64),
                        d.seconds,
                        grouped(d.events_per_sec),
                        grouped(d.records_in_kafka as f64)
                    );
                }
                Some(e) => {
                    let e = first_line(e);
                    let who = who(&d.build, d.round);
                    let _ = writeln!(m, "| {} | {who} | failed: {e} | | | | |", d.id);
                }
            }
        }
        let _ = writeln!(
            m,
            "\n## Ratios\n\n| ratio | build | value |\n| --- | --- | ---: |"
        );
        for r in &self.ratios {
            let value = match r.unit.as_str() {
                "x" => format!("{:.2}x", r.value),
                unit => format!("{:+.3} {unit}", r.value),
            };
            let _ = writeln!(m, "| {} | {} | {value} |", r.name, r.build);
        }
        if !self.comparisons.is_empty() {
            let (a, b) = (&self.builds[0].label, &self.builds[1].label);
            let _ = writeln!(
                m,
                "\n## `{a}` / `{b}`\n\nRuns alternated build by build, scenario by scenario. \
                 Above 1 is better for rates, below 1 for latency and memory.\n\n\
                 With several rounds each value is the median of its rounds, and the last column \
                 the lowest and highest ratio of a single round.\n\n\
                 | scenario | figure | `{a}` | `{b}` | ratio | rounds: range |\n| --- | --- | ---: | ---: | ---: | --- |"
            );
            for c in &self.comparisons {
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} | {:.2}x | {}: {:.2}x to {:.2}x |",
                    c.id,
                    c.figure,
                    figure(c.this),
                    figure(c.baseline),
                    c.ratio,
                    c.rounds,
                    c.low,
                    c.high
                );
            }
        }
        super::targets::markdown(&mut m, self);
        let _ = writeln!(m, "\n## Plots\n");
        for p in &self.plots {
            let _ = writeln!(m, "![{p}]({p})");
        }
        m
    }
}

/// A build's label, and its round after the first.
fn who(build: &str, round: usize) -> String {
    match round {
        0 => build.to_owned(),
        r => format!("{build} (round {})", r + 1),
    }
}

/// An error's first line, fit for a table cell (the JSON has it whole).
fn first_line(e: &str) -> String {
    e.lines().next().unwrap_or_default().replace('|', "/")
}

/// `12345.6` as `12,346`.
pub fn grouped(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn figure(v: f64) -> String {
    if v >= 100.0 {
        grouped(v)
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests;
