//! `holdfast-load`: HTTP load for `POST /v1/events`, open loop at a fixed rate
//! (latency from the intended send time: no coordinated omission) or closed
//! loop at the highest rate N connections reach. Prints P50/P99/P99.9/max,
//! requests/s, events/s and errors by status; `--json` for machines.

use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use holdfast_bench::body::BodySpec;
use holdfast_bench::load::{self, LoadSpec, Pace};

#[derive(Debug, Parser)]
#[command(
    name = "holdfast-load",
    version,
    about = "HTTP load for POST /v1/events"
)]
struct Args {
    /// Endpoint, e.g. http://127.0.0.1:8080/v1/events.
    #[arg(long)]
    url: String,
    /// Requests per second in total (open loop); 0: as fast as the connections go (closed loop).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Events per request (1: a JSON object; more: a JSON array).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Bytes per event.
    #[arg(long, default_value_t = 300)]
    event_bytes: usize,
    /// A fresh random `uuid` in every event (otherwise the server makes one).
    #[arg(long)]
    client_uuids: bool,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (addr, path) = load::parse_url(&args.url)?;
    let spec = LoadSpec {
        addr,
        path,
        pace: if args.rate > 0.0 {
            Pace::Fixed { rate: args.rate }
        } else {
            Pace::Max
        },
        connections: args.connections,
        warmup: Duration::from_secs_f64(args.warmup_secs),
        duration: Duration::from_secs_f64(args.duration_secs),
        max_requests: None,
        body: BodySpec {
            events_per_request: args.batch,
            event_bytes: args.event_bytes,
            client_uuids: args.client_uuids,
        },
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?
        .block_on(load::run(&spec))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    let pace = match spec.pace {
        Pace::Fixed { rate } => format!("fixed {rate:.0} req/s"),
        Pace::Max => "max rate".to_owned(),
    };
    let l = result.latency_ms;
    println!(
        "{pace}, {} connections, {} event(s) of {} bytes per request, {:.1}s: \
         {:.0} req/s, {:.0} events/s; latency ms p50 {:.3} p99 {:.3} p99.9 {:.3} max {:.3}; errors {:?}",
        spec.connections,
        spec.body.events_per_request,
        spec.body.event_bytes,
        result.seconds,
        result.requests_per_sec,
        result.events_per_sec,
        l.p50,
        l.p99,
        l.p999,
        l.max,
        result.errors
    );
    Ok(())
}
