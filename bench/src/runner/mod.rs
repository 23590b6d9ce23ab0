//! What `make bench` runs: a local Kafka broker, then every scenario against
//! a fresh capture pod of each build (this one, and a baseline when given,
//! alternating so drift on a shared machine hits both alike), the machine's
//! limits (fsync latency, the trivial handler), drains of a filled buffer
//! next to a raw produce loop; then `report.json`, `report.md` and PNG plots.
//!
//! Nothing here asserts a speed: the report is the product. A scenario that
//! fails is recorded with its error and the run goes on.

pub mod drain;
pub mod machine;
pub mod plots;
pub mod processes;
pub mod report;
pub mod scenarios;
pub mod targets;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use self::processes::Kafka;
use self::report::{BuildInfo, Host, Report, Scale};

/// A build of `holdfast-capture` to measure.
#[derive(Debug, Clone)]
pub struct Build {
    /// Label in the report (`this`, or a git revision).
    pub label: String,
    /// Path of its `holdfast-capture`.
    pub capture: PathBuf,
}

/// Everything a run needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Directory of this build's `holdfast-capture`.
    pub bin_dir: PathBuf,
    /// `holdfast-dev`, which runs the Kafka broker (a launcher: debug is as good as release).
    pub dev_bin: PathBuf,
    /// Label of this build.
    pub label: String,
    /// A baseline build, run alternately with this one.
    pub baseline: Option<Build>,
    /// Where the report and plots go.
    pub out_dir: PathBuf,
    /// Buffers and logs (on the disk whose fsync is measured).
    pub work_dir: PathBuf,
    /// Measured time per scenario.
    pub duration: Duration,
    /// Warm-up per scenario.
    pub warmup: Duration,
    /// Connections of the closed-loop runs.
    pub connections: Vec<usize>,
    /// Requests/s of the open-loop runs.
    pub fixed_rates: Vec<f64>,
    /// Connections of the open-loop runs.
    pub fixed_connections: usize,
    /// Events per batch request.
    pub batch_events: usize,
    /// Bytes per event.
    pub event_bytes: usize,
    /// Events in the drained buffer (0: no drain scenarios).
    pub drain_events: u64,
    /// Partitions of each topic.
    pub partitions: u32,
    /// Time spent on each fsync probe.
    pub fsync_probe: Duration,
    /// Only scenarios whose id contains one of these, and drains if one is
    /// `drain` (empty: everything).
    pub only: Vec<String>,
    /// Times every scenario and drain is run (at least 1).
    pub rounds: usize,
    /// This program (runs the trivial handler as a child).
    pub self_exe: PathBuf,
}

impl Settings {
    fn builds(&self) -> Vec<Build> {
        let this = Build {
            label: self.label.clone(),
            capture: self.bin_dir.join("holdfast-capture"),
        };
        std::iter::once(this).chain(self.baseline.clone()).collect()
    }

    fn scale(&self) -> Scale {
        Scale {
            duration_secs: self.duration.as_secs_f64(),
            warmup_secs: self.warmup.as_secs_f64(),
            drain_events: drain::filled_events(self.drain_events),
            event_bytes: self.event_bytes,
            batch_events: self.batch_events,
            connections: self.connections.clone(),
            fixed_rates: self.fixed_rates.clone(),
            fixed_connections: self.fixed_connections,
            partitions: self.partitions,
        }
    }
}

/// `builds` starting at `offset`, wrapping: alternates which build goes first.
fn rotated(builds: &[Build], offset: usize) -> Vec<Build> {
    let n = builds.len();
    (0..n).map(|i| builds[(i + offset) % n].clone()).collect()
}

fn progress(what: &str, line: String) {
    eprintln!("holdfast-bench: {what}: {line}");
}

/// Runs everything and writes the report; returns it.
pub async fn run(s: &Settings) -> Result<Report> {
    let started = Instant::now();
    std::fs::create_dir_all(&s.out_dir)?;
    let _ = std::fs::remove_dir_all(&s.work_dir);
    std::fs::create_dir_all(&s.work_dir)?;
    let builds = s.builds();
    for b in &builds {
        processes::ensure_file(&b.capture)?;
    }
    let loadavg_start = processes::loadavg();
    let probe_dir = s.work_dir.join("fsync");
    let mut fsync = vec![probe(&probe_dir, s.fsync_probe).await?];
    progress(
        "fsync",
        format!(
            "P50 {:.3} ms, P99 {:.3} ms",
            fsync[0].p50_ms, fsync[0].p99_ms
        ),
    );

    let kafka = Kafka::start(&s.dev_bin, &s.work_dir).await?;
    for topic in [
        scenarios::EVENTS_TOPIC,
        drain::DRAIN_TOPIC,
        drain::RAW_TOPIC,
    ] {
        kafka.create_topic(topic, s.partitions).await?;
    }
    progress("kafka", kafka.bootstrap.clone());

    let machine = Build {
        label: "machine".to_owned(),
        capture: PathBuf::new(),
    };
    let list = scenarios::all(s);
    let mut runs = Vec::new();
    let rounds = s.rounds.max(1);
    for round in 0..rounds {
        for (i, sc) in list.iter().enumerate() {
            let order = if sc.per_build() {
                rotated(&builds, i + round)
            } else {
                vec![machine.clone()]
            };
            for b in &order {
                let mut run = scenarios::run(s, sc, b, i, &kafka.bootstrap).await;
                run.round = round;
                let line = match (&run.result, &run.error) {
                    (Some(r), _) => format!(
                        "{:.0} req/s, {:.0} events/s, P50 {:.3} ms, P99 {:.3} ms, errors {:?}, RSS {:.0} MiB",
                        r.requests_per_sec,
                        r.events_per_sec,
                        r.latency_ms.p50,
                        r.latency_ms.p99,
                        r.errors,
                        run.rss_peak_mib.unwrap_or(0.0)
                    ),
                    (None, e) => format!("FAILED: {}", e.as_deref().unwrap_or("?")),
                };
                let of_rounds = if rounds > 1 {
                    format!(", round {}/{rounds}", round + 1)
                } else {
                    String::new()
                };
                let what = format!(
                    "[{}/{}] {} ({}{of_rounds})",
                    i + 1,
                    list.len(),
                    sc.id,
                    b.label
                );
                progress(&what, line);
                runs.push(run);
            }
        }
    }

    let mut drains = Vec::new();
    if s.drain_events > 0 && (s.only.is_empty() || s.only.iter().any(|f| f == "drain")) {
        drains = run_drains(s, &builds, &kafka.bootstrap).await;
    }
    drop(kafka);
    fsync.push(probe(&probe_dir, s.fsync_probe).await?);

    let mut report = Report {
        generated_at: jiff::Timestamp::now().to_string(),
        run_seconds: started.elapsed().as_secs_f64(),
        host: Host {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            loadavg_start,
            loadavg_end: processes::loadavg(),
        },
        scale: s.scale(),
        builds: builds
            .iter()
            .map(|b| BuildInfo {
                label: b.label.clone(),
                capture: b.capture.display().to_string(),
            })
            .collect(),
        fsync,
        scenarios: runs,
        drains,
        ratios: Vec::new(),
        comparisons: Vec::new(),
        plots: Vec::new(),
        targets: Vec::new(),
    };
    report.derive();
    report.plots = plots::write_all(&s.out_dir, &report)?;
    write(&s.out_dir, &report)?;
    let _ = std::fs::remove_dir_all(&s.work_dir);
    Ok(report)
}

async fn probe(dir: &Path, budget: Duration) -> Result<machine::FsyncProbe> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || machine::probe_fsync(&dir, budget)).await?
}

async fn run_drains(s: &Settings, builds: &[Build], bootstrap: &str) -> Vec<drain::DrainRun> {
    let mut out = Vec::new();
    let events = drain::filled_events(s.drain_events);
    let mut sources = Vec::new();
    for b in builds {
        let dir = s.work_dir.join(format!("fill-{}", b.label));
        let t = Instant::now();
        match drain::fill(s, b, &dir).await {
            Ok(n) => {
                let secs = t.elapsed().as_secs_f64();
                progress(
                    &format!("fill ({})", b.label),
                    format!("{n} events in {secs:.1} s"),
                );
                sources.push((b.clone(), Some(dir.join("buffer"))));
            }
            Err(e) => {
                progress(&format!("fill ({})", b.label), format!("FAILED: {e:#}"));
                for (mode, _) in drain::MODES {
                    let why = anyhow::anyhow!("filling the buffer: {e:#}");
                    out.push(drain::DrainRun::failed(mode, &b.label, events, why));
                }
                sources.push((b.clone(), None));
            }
        }
    }
    // A fresh broker is slow at first (its JIT cold, the idempotence
    // coordinator still loading: `flush` logged `Coordinator load in
    // progress`), and only the first drain would pay for it: warm it up,
    // untimed, with the raw produce loop.
    let warm = drain::raw_produce(bootstrap, events, s.event_bytes).await;
    progress("broker warm-up (not reported)", drain_line(&warm));
    for round in 0..s.rounds.max(1) {
        for (m, (mode, flags)) in drain::MODES.iter().enumerate() {
            let n = sources.len();
            for k in 0..n {
                let (b, source) = &sources[(k + m + round) % n];
                let Some(source) = source else { continue };
                // Every copy of a source has its volume id: an exactly-once
                // drain after the first would find its checkpoint at the
                // end and send nothing, unless each round has its own topic.
                let mut flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
                if round > 0 && flags.iter().any(|f| f == "exactly-once") {
                    flags.push("--checkpoint-topic".to_owned());
                    flags.push(format!("holdfast.checkpoints.round{round}"));
                }
                let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
                let mut d =
                    drain::flush(b, mode, &flags, source, &s.work_dir, bootstrap, events).await;
                d.round = round;
                progress(&format!("{mode} ({})", b.label), drain_line(&d));
                out.push(d);
            }
        }
        let mut d = drain::raw_produce(bootstrap, events, s.event_bytes).await;
        d.round = round;
        progress("raw produce", drain_line(&d));
        out.push(d);
    }
    out
}

fn drain_line(d: &drain::DrainRun) -> String {
    match &d.error {
        None => format!(
            "{} events in {:.2} s = {:.0} events/s",
            d.events, d.seconds, d.events_per_sec
        ),
        Some(e) => format!("FAILED: {e}"),
    }
}

/// Writes `report.json` and `report.md` into `dir`.
pub fn write(dir: &Path, report: &Report) -> Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(dir.join("report.json"), json + "\n").context("report.json")?;
    std::fs::write(dir.join("report.md"), report.markdown()).context("report.md")?;
    Ok(())
}
