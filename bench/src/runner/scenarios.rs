//! The HTTP scenarios of `make bench`: which server, which flags, which load,
//! and running one of them against one build (a fresh capture pod and buffer
//! each time, so its peak memory is the scenario's own).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};

use super::machine;
use super::processes::{self, Server};
use super::{Build, Settings};
use crate::body::BodySpec;
use crate::load::{self, LoadResult, LoadSpec, Pace};

/// Topic of the HTTP scenarios' stream.
pub const EVENTS_TOPIC: &str = "bench.events";

/// What serves the requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// `holdfast-capture serve` with these flags (after the common ones).
    Capture {
        /// Flags.
        args: Vec<String>,
    },
    /// The trivial handler (machine limit; runs once, not per build).
    Trivial,
}

/// One scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scenario {
    /// Unique name, `"<series> <shape>"`.
    pub id: String,
    /// Server set-up: `fsync`, `os`, `direct`, `trivial`, or a variant such as `fsync no-dedup`.
    pub series: String,
    /// Load shape: `1000/s`, `max c32`, `batch100 max c32`.
    pub shape: String,
    /// What serves.
    pub target: Target,
    /// Pacing.
    pub pace: Pace,
    /// Connections.
    pub connections: usize,
    /// Request bodies.
    pub body: BodySpec,
}

impl Scenario {
    /// Whether it is run against every build (capture) or once (machine).
    pub fn per_build(&self) -> bool {
        matches!(self.target, Target::Capture { .. })
    }

    /// Single-event requests, closed loop: a point of the throughput-vs-connections plot.
    pub fn is_max_single(&self) -> bool {
        self.pace == Pace::Max && self.body.events_per_request == 1 && !self.body.client_uuids
    }
}

/// One scenario run against one build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioRun {
    /// Scenario id.
    pub id: String,
    /// Scenario series.
    pub series: String,
    /// Scenario shape.
    pub shape: String,
    /// Build label (`machine` for the trivial handler).
    pub build: String,
    /// Pacing.
    pub pace: Pace,
    /// Connections.
    pub connections: usize,
    /// Request bodies.
    pub body: BodySpec,
    /// Server flags (capture scenarios).
    pub server_args: Vec<String>,
    /// What the load generator measured (absent when the run failed).
    pub result: Option<LoadResult>,
    /// Peak resident memory of the server, MiB.
    pub rss_peak_mib: Option<f64>,
    /// Median write + `fdatasync` of the buffer disk, probed just before this
    /// run (capture scenarios): the disk's floor at the time, since it drifts.
    #[serde(default)]
    pub fsync_p50_ms: Option<f64>,
    /// Why the run failed, if it did.
    pub error: Option<String>,
    /// Which round of the run this was (`--rounds`; from 0).
    #[serde(default)]
    pub round: usize,
}

fn shape(pace: Pace, connections: usize) -> String {
    match pace {
        Pace::Fixed { rate } => format!("{rate:.0}/s"),
        Pace::Max => format!("max c{connections}"),
    }
}

/// Every scenario of a run, in order, filtered by `--only`.
pub fn all(s: &Settings) -> Vec<Scenario> {
    let single = BodySpec {
        events_per_request: 1,
        event_bytes: s.event_bytes,
        client_uuids: false,
    };
    let mut paces: Vec<(Pace, usize)> = s
        .fixed_rates
        .iter()
        .map(|&rate| (Pace::Fixed { rate }, s.fixed_connections))
        .collect();
    paces.extend(s.connections.iter().map(|&c| (Pace::Max, c)));
    let stream = |mode: &str| format!("default={EVENTS_TOPIC}:{mode}");
    let capture = |args: &[&str]| Target::Capture {
        args: args.iter().map(|a| a.to_string()).collect(),
    };
    let mut out = Vec::new();
    let mut add = |series: &str, shape: String, target: Target, pace, connections, body| {
        out.push(Scenario {
            id: format!("{series} {shape}"),
            series: series.to_owned(),
            shape,
            target,
            pace,
            connections,
            body,
        })
    };
    let durable = stream("durable");
    let direct = stream("direct");
    for (series, args) in [
        ("fsync", vec!["--stream", &durable]),
        ("os", vec!["--stream", &durable, "--durability", "os"]),
        ("direct", vec!["--stream", &direct]),
    ] {
        for &(pace, c) in &paces {
            add(series, shape(pace, c), capture(&args), pace, c, single);
        }
    }
    let widest = s.connections.iter().copied().max().unwrap_or(32);
    let batch = BodySpec {
        events_per_request: s.batch_events,
        ..single
    };
    add(
        "fsync",
        format!("batch{} {}", s.batch_events, shape(Pace::Max, widest)),
        capture(&["--stream", &durable]),
        Pace::Max,
        widest,
        batch,
    );
    let client = BodySpec {
        client_uuids: true,
        ..single
    };
    let no_dedup = ["--stream", &durable, "--dedup-window-secs", "0"];
    for (series, args, body) in [
        ("fsync no-dedup", &no_dedup[..], single),
        ("fsync client-uuids", &no_dedup[..2], client),
        ("fsync client-uuids no-dedup", &no_dedup[..], client),
    ] {
        let shape = shape(Pace::Max, widest);
        add(series, shape, capture(args), Pace::Max, widest, body);
    }
    for &(pace, c) in &paces {
        add("trivial", shape(pace, c), Target::Trivial, pace, c, single);
    }
    out.retain(|sc| s.only.is_empty() || s.only.iter().any(|f| sc.id.contains(f.as_str())));
    out
}

/// Runs `scenario` against `build` (or the trivial handler) and records the
/// outcome; a failure is recorded, not returned, so the run goes on.
pub async fn run(
    s: &Settings,
    scenario: &Scenario,
    build: &Build,
    index: usize,
    bootstrap: &str,
) -> ScenarioRun {
    let dir = s
        .work_dir
        .join(format!("scenario-{index:02}-{}", build.label));
    let mut run = ScenarioRun {
        id: scenario.id.clone(),
        series: scenario.series.clone(),
        shape: scenario.shape.clone(),
        build: build.label.clone(),
        pace: scenario.pace,
        connections: scenario.connections,
        body: scenario.body,
        server_args: Vec::new(),
        result: None,
        rss_peak_mib: None,
        fsync_p50_ms: None,
        error: None,
        round: 0,
    };
    if let Err(e) = measure(s, scenario, build, &dir, bootstrap, &mut run).await {
        run.error = Some(format!("{e:#}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
    run
}

async fn measure(
    s: &Settings,
    scenario: &Scenario,
    build: &Build,
    dir: &Path,
    bootstrap: &str,
    run: &mut ScenarioRun,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], processes::free_port()?));
    let (program, args) = match &scenario.target {
        Target::Capture { args } => {
            let (probe_dir, budget) = (dir.join("fsync"), s.fsync_probe / 4);
            let probe =
                tokio::task::spawn_blocking(move || machine::probe_fsync(&probe_dir, budget));
            run.fsync_p50_ms = Some(probe.await??.p50_ms);
            run.server_args = args.clone();
            let all = processes::capture_args(addr, &dir.join("buffer"), bootstrap, args);
            (build.capture.clone(), all)
        }
        Target::Trivial => {
            let args = vec!["trivial-server".into(), "--listen".into(), addr.to_string()];
            (s.self_exe.clone(), args)
        }
    };
    let mut server = Server::start(&program, &args, addr, &dir.join("server.log")).await?;
    let spec = LoadSpec {
        addr,
        path: "/v1/events".to_owned(),
        pace: scenario.pace,
        connections: scenario.connections,
        warmup: s.warmup,
        duration: s.duration,
        max_requests: None,
        body: scenario.body,
    };
    let result = load::run(&spec).await;
    run.rss_peak_mib = server.peak_rss_mib();
    ensure!(server.alive(), "server exited: {}", server.log_tail());
    server.stop();
    run.result = Some(result?);
    Ok(())
}
