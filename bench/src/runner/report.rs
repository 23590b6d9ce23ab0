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
    /// `this / baseline`.
    pub ratio: f64,
}

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
}

impl Report {
    /// The run of scenario `id` by `build`, if it measured anything.
    pub fn scenario(&self, id: &str, build: &str) -> Option<&ScenarioRun> {
        self.scenarios
            .iter()
            .find(|r| r.id == id && r.build == build && r.result.is_some())
    }

    fn drain(&self, id: &str, build: &str) -> Option<&DrainRun> {
        self.drains
            .iter()
            .find(|d| d.id == id && d.build == build && d.error.is_none())
    }

    /// Computes [`Report::ratios`] and [`Report::comparisons`] from the runs.
    pub fn derive(&mut self) {
        let mut ratios = Vec::new();
        let shapes: Vec<String> = self
            .scenarios
            .iter()
            .filter(|r| r.series == "fsync" && r.body.events_per_request == 1)
            .map(|r| r.shape.clone())
            .fold(Vec::new(), |mut v, s| {
                if !v.contains(&s) {
                    v.push(s);
                }
                v
            });
        let p50 = |r: &ScenarioRun| r.result.as_ref().map_or(0.0, |x| x.latency_ms.p50);
        let rps = |r: &ScenarioRun| r.result.as_ref().map_or(0.0, |x| x.requests_per_sec);
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
        for b in &self.builds {
            let b = b.label.as_str();
            for shape in &shapes {
                let durable = self.scenario(&format!("fsync {shape}"), b);
                if let (Some(d), Some(x)) = (durable, self.scenario(&format!("direct {shape}"), b))
                {
                    let name = format!("durable P50 / direct P50, {shape}");
                    add(name, b, p50(d) / p50(x), "x");
                }
                let trivial = self.scenario(&format!("trivial {shape}"), "machine");
                if let (Some(d), Some(t)) = (durable, trivial)
                    && d.pace == Pace::Max
                {
                    let name = format!("durable req/s / trivial-handler req/s, {shape}");
                    add(name, b, rps(d) / rps(t), "x");
                }
                // The probe taken just before the run, else the run's first.
                if let Some(d) = durable
                    && let Some(f) = d.fsync_p50_ms.or(fsync_median)
                {
                    let name = format!("durable P50 - fsync median, {shape}");
                    add(name, b, p50(d) - f, "ms");
                }
            }
            let raw = self.drain("raw produce", "machine");
            for mode in ["flush at-least-once", "flush exactly-once"] {
                if let (Some(d), Some(r)) = (self.drain(mode, b), raw) {
                    let name = format!("drain / raw produce, {}", &mode[6..]);
                    add(name, b, d.events_per_sec / r.events_per_sec, "x");
                }
            }
        }
        self.ratios = ratios;
        self.comparisons = self.compare();
    }

    fn compare(&self) -> Vec<Comparison> {
        let [this, base] = match &self.builds[..] {
            [a, b, ..] => [a.label.as_str(), b.label.as_str()],
            _ => return Vec::new(),
        };
        let mut out = Vec::new();
        let mut push = |id: &str, figure: &str, this: f64, baseline: f64| {
            out.push(Comparison {
                id: id.to_owned(),
                figure: figure.to_owned(),
                this,
                baseline,
                ratio: if baseline > 0.0 {
                    this / baseline
                } else {
                    f64::NAN
                },
            })
        };
        for r in self.scenarios.iter().filter(|r| r.build == this) {
            let (Some(a), Some(b)) = (self.scenario(&r.id, this), self.scenario(&r.id, base))
            else {
                continue;
            };
            let (x, y) = (a.result.as_ref().unwrap(), b.result.as_ref().unwrap());
            if r.pace == Pace::Max {
                push(&r.id, "events/s", x.events_per_sec, y.events_per_sec);
            }
            push(&r.id, "P50 ms", x.latency_ms.p50, y.latency_ms.p50);
            push(&r.id, "P99 ms", x.latency_ms.p99, y.latency_ms.p99);
            push(&r.id, "P99.9 ms", x.latency_ms.p999, y.latency_ms.p999);
            if let (Some(m), Some(n)) = (a.rss_peak_mib, b.rss_peak_mib) {
                push(&r.id, "RSS MiB", m, n);
            }
        }
        for d in self.drains.iter().filter(|d| d.build == this) {
            if let (Some(a), Some(b)) = (self.drain(&d.id, this), self.drain(&d.id, base)) {
                push(&d.id, "events/s", a.events_per_sec, b.events_per_sec);
                if let (Some(m), Some(n)) = (a.rss_peak_mib, b.rss_peak_mib) {
                    push(&d.id, "RSS MiB", m, n);
                }
            }
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
                        r.build,
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
                        r.id, r.build
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
                        d.build,
                        grouped(d.events as f64),
                        d.seconds,
                        grouped(d.events_per_sec),
                        grouped(d.records_in_kafka as f64)
                    );
                }
                Some(e) => {
                    let e = first_line(e);
                    let _ = writeln!(m, "| {} | {} | failed: {e} | | | | |", d.id, d.build);
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
                 | scenario | figure | `{a}` | `{b}` | ratio |\n| --- | --- | ---: | ---: | ---: |"
            );
            for c in &self.comparisons {
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} | {:.2}x |",
                    c.id,
                    c.figure,
                    figure(c.this),
                    figure(c.baseline),
                    c.ratio
                );
            }
        }
        let _ = writeln!(m, "\n## Plots\n");
        for p in &self.plots {
            let _ = writeln!(m, "![{p}]({p})");
        }
        m
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
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(grouped(0.4), "0");
        assert_eq!(grouped(999.0), "999");
        assert_eq!(grouped(1000.0), "1,000");
        assert_eq!(grouped(1234567.0), "1,234,567");
    }

    fn run(id: &str, build: &str, pace: Pace, rps: f64, p50: f64) -> ScenarioRun {
        let (series, shape) = id.split_once(' ').unwrap();
        ScenarioRun {
            id: id.to_owned(),
            series: series.to_owned(),
            shape: shape.to_owned(),
            build: build.to_owned(),
            pace,
            connections: 4,
            body: crate::body::BodySpec::default(),
            server_args: Vec::new(),
            result: Some(crate::load::LoadResult {
                requests: rps as u64,
                events: rps as u64,
                errors: Default::default(),
                seconds: 1.0,
                requests_per_sec: rps,
                events_per_sec: rps,
                latency_ms: crate::load::Percentiles {
                    p50,
                    p99: p50 * 2.0,
                    p999: p50 * 3.0,
                    max: p50 * 4.0,
                    mean: p50,
                },
            }),
            rss_peak_mib: Some(30.0),
            fsync_p50_ms: None,
            error: None,
        }
    }

    #[test]
    fn ratios_and_comparisons_come_from_the_matching_runs() {
        let fixed = Pace::Fixed { rate: 1000.0 };
        let build = |label: &str| BuildInfo {
            label: label.to_owned(),
            capture: String::new(),
        };
        let mut r = Report {
            generated_at: String::new(),
            run_seconds: 1.0,
            host: Host {
                cores: 2,
                kernel: String::new(),
                loadavg_start: String::new(),
                loadavg_end: String::new(),
            },
            scale: Scale {
                duration_secs: 1.0,
                warmup_secs: 0.0,
                drain_events: 0,
                event_bytes: 300,
                batch_events: 100,
                connections: vec![4],
                fixed_rates: vec![1000.0],
                fixed_connections: 64,
                partitions: 1,
            },
            builds: vec![build("this"), build("old")],
            fsync: vec![FsyncProbe {
                dir: String::new(),
                writes: 20,
                bytes_per_write: 4096,
                p50_ms: 0.25,
                p99_ms: 1.0,
                mean_ms: 0.3,
                max_ms: 2.0,
            }],
            scenarios: vec![
                run("fsync max c4", "this", Pace::Max, 8000.0, 0.5),
                run("fsync max c4", "old", Pace::Max, 4000.0, 1.0),
                run("direct max c4", "this", Pace::Max, 2000.0, 2.0),
                run("trivial max c4", "machine", Pace::Max, 40000.0, 0.1),
                run("fsync 1000/s", "this", fixed, 1000.0, 0.4),
                run("direct 1000/s", "this", fixed, 1000.0, 4.0),
            ],
            drains: Vec::new(),
            ratios: Vec::new(),
            comparisons: Vec::new(),
            plots: Vec::new(),
        };
        r.scenarios[0].fsync_p50_ms = Some(0.375);
        r.derive();
        let ratio = |name: &str, build: &str| {
            r.ratios
                .iter()
                .find(|x| x.name == name && x.build == build)
                .map(|x| x.value)
        };
        assert_eq!(
            ratio("durable P50 / direct P50, max c4", "this"),
            Some(0.25)
        );
        assert_eq!(ratio("durable P50 / direct P50, 1000/s", "this"), Some(0.1));
        assert_eq!(
            ratio("durable req/s / trivial-handler req/s, max c4", "this"),
            Some(0.2)
        );
        // No trivial-handler ratio for an open-loop rate: both do 1,000/s.
        assert_eq!(
            ratio("durable req/s / trivial-handler req/s, 1000/s", "this"),
            None
        );
        // The probe just before the run when there is one, else the run's first.
        assert_eq!(
            ratio("durable P50 - fsync median, max c4", "this"),
            Some(0.125)
        );
        assert_eq!(
            ratio("durable P50 - fsync median, 1000/s", "this"),
            Some(0.15000000000000002)
        );
        // The baseline has no direct run: no ratio rather than a wrong one.
        assert_eq!(ratio("durable P50 / direct P50, max c4", "old"), None);
        let cmp = |figure: &str| {
            r.comparisons
                .iter()
                .find(|c| c.id == "fsync max c4" && c.figure == figure)
                .map(|c| c.ratio)
        };
        assert_eq!(cmp("events/s"), Some(2.0));
        assert_eq!(cmp("P50 ms"), Some(0.5));
        assert_eq!(cmp("RSS MiB"), Some(1.0));
        // Only scenarios both builds ran are compared.
        assert!(r.comparisons.iter().all(|c| c.id == "fsync max c4"));
        let md = r.markdown();
        assert!(
            md.contains("| fsync max c4 | events/s | 8,000 | 4,000 | 2.00x |"),
            "{md}"
        );
    }
}
