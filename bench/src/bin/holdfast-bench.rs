//! `holdfast-bench`: the `make bench` runner (`run`), and the trivial handler
//! it measures the machine with (`trivial-server`). See `holdfast_bench::runner`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use holdfast_bench::runner::{self, Build, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "holdfast-bench",
    version,
    about = "Holdfast benchmarks: report and plots"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start Kafka and capture pods, run every scenario, write the report and plots.
    Run(Box<RunArgs>),
    /// Serve the trivial handler (200 to every POST) until killed.
    TrivialServer {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Directory with this build's `holdfast-capture` (default: this program's).
    #[arg(long, env = "HOLDFAST_BENCH_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// `holdfast-dev`, which runs the Kafka broker (default: in --bin-dir).
    #[arg(long, env = "HOLDFAST_BENCH_DEV_BIN")]
    dev_bin: Option<PathBuf>,
    /// Label of this build in the report.
    #[arg(long, env = "HOLDFAST_BENCH_LABEL", default_value = "this")]
    label: String,
    /// A baseline `holdfast-capture` to run every capture scenario against too, alternating.
    #[arg(long, env = "HOLDFAST_BENCH_BASELINE_CAPTURE")]
    baseline_capture: Option<PathBuf>,
    /// Label of the baseline (e.g. its git revision).
    #[arg(
        long,
        env = "HOLDFAST_BENCH_BASELINE_LABEL",
        default_value = "baseline"
    )]
    baseline_label: String,
    /// Where report.md, report.json and the plots go.
    #[arg(long, env = "HOLDFAST_BENCH_OUT", default_value = "target/bench")]
    out: PathBuf,
    /// Buffers and logs, on the disk to measure (default: <out>/work; removed at the end).
    #[arg(long, env = "HOLDFAST_BENCH_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// Seconds measured per scenario.
    #[arg(long, env = "BENCH_SECS", default_value_t = 10.0)]
    duration_secs: f64,
    /// Seconds of warm-up load before each measurement.
    #[arg(long, env = "BENCH_WARMUP_SECS", default_value_t = 1.0)]
    warmup_secs: f64,
    /// Events in the buffer drained by `flush` (0: skip the drains).
    #[arg(long, env = "BENCH_DRAIN_EVENTS", default_value_t = 1_000_000)]
    drain_events: u64,
    /// Connections of the closed-loop (max rate) runs.
    #[arg(long, value_delimiter = ',', default_value = "4,32")]
    connections: Vec<usize>,
    /// Requests/s of the open-loop runs.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    rates: Vec<f64>,
    /// Connections of the open-loop runs (128 carry 10,000/s at 12 ms each;
    /// with too few, requests queue in the generator and count as latency).
    #[arg(long, default_value_t = 128)]
    rate_connections: usize,
    /// Events per request in the batch scenario.
    #[arg(long, default_value_t = 100)]
    batch_events: usize,
    /// Bytes per event.
    #[arg(long, default_value_t = 300)]
    event_bytes: usize,
    /// Partitions of each topic.
    #[arg(long, default_value_t = 6)]
    partitions: u32,
    /// Seconds of each fsync probe (one at the start, one at the end).
    #[arg(long, default_value_t = 2.0)]
    fsync_probe_secs: f64,
    /// Run only scenarios whose name contains one of these (comma separated; `drain` for the drains).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run every scenario and drain this many times (builds alternating,
    /// the order turning each round); the report gives medians and, per
    /// comparison, the range of the rounds' ratios.
    #[arg(long, env = "BENCH_ROUNDS", default_value_t = 1)]
    rounds: usize,
}

fn secs(v: f64, flag: &str) -> Result<Duration> {
    if !(v.is_finite() && v >= 0.0) {
        bail!("{flag} must be a non-negative number of seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

fn settings(a: RunArgs) -> Result<Settings> {
    let self_exe = std::env::current_exe().context("locating this program")?;
    let bin_dir = match a.bin_dir {
        Some(d) => d,
        None => self_exe
            .parent()
            .context("program has no directory")?
            .to_owned(),
    };
    if a.connections.is_empty() || a.connections.contains(&0) {
        bail!("--connections needs one or more counts of at least 1");
    }
    if a.rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        bail!("--rates must be positive");
    }
    if a.batch_events < 2 {
        bail!("--batch-events must be at least 2");
    }
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let duration = secs(a.duration_secs, "--duration-secs")?;
    if duration.is_zero() {
        bail!("--duration-secs must be above 0");
    }
    Ok(Settings {
        work_dir: a.work_dir.unwrap_or_else(|| a.out.join("work")),
        dev_bin: a.dev_bin.unwrap_or_else(|| bin_dir.join("holdfast-dev")),
        bin_dir,
        label: a.label,
        baseline: a.baseline_capture.map(|capture| Build {
            label: a.baseline_label,
            capture,
        }),
        out_dir: a.out,
        duration,
        warmup: secs(a.warmup_secs, "--warmup-secs")?,
        connections: a.connections,
        fixed_rates: a.rates,
        fixed_connections: a.rate_connections.max(1),
        batch_events: a.batch_events,
        event_bytes: a.event_bytes,
        drain_events: a.drain_events,
        partitions: a.partitions.max(1),
        fsync_probe: secs(a.fsync_probe_secs, "--fsync-probe-secs")?,
        only: a.only,
        rounds: a.rounds,
        self_exe,
    })
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::TrivialServer { listen } => {
            tokio::runtime::Runtime::new()?.block_on(holdfast_bench::trivial::serve(listen))
        }
        Cmd::Run(args) => {
            let s = settings(*args)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            // On SIGINT or SIGTERM the run is dropped, and with it every
            // child process (Kafka, capture pods) it started.
            let report = runtime.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let mut term = signal(SignalKind::terminate())?;
                tokio::select! {
                    report = runner::run(&s) => report,
                    _ = tokio::signal::ctrl_c() => bail!("interrupted"),
                    _ = term.recv() => bail!("terminated"),
                }
            })?;
            // A baseline may lack a flag a scenario needs (an older build):
            // its failures are in the report; only this build's fail the run.
            let baseline = s.baseline.as_ref().map(|b| b.label.as_str());
            let ours = |build: &str| Some(build) != baseline;
            let failed = report
                .scenarios
                .iter()
                .filter(|r| r.error.is_some() && ours(&r.build))
                .count()
                + report
                    .drains
                    .iter()
                    .filter(|d| d.error.is_some() && ours(&d.build))
                    .count();
            eprintln!(
                "holdfast-bench: wrote {}/report.md, report.json and {} plot(s); {failed} run(s) failed",
                s.out_dir.display(),
                report.plots.len()
            );
            if failed > 0 {
                bail!("{failed} run(s) failed: see the report");
            }
            Ok(())
        }
    }
}
