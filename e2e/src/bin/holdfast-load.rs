//! `holdfast-load`: an open-loop HTTP load generator for `make bench`.
//!
//! wrk measures the closed-loop maximum; this tool sends at a fixed rate (the
//! intended send times are fixed in advance, so a slow answer delays the
//! latency figures, not the schedule — no coordinated omission) and reports
//! throughput and latency percentiles of acknowledged requests.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "holdfast-load", about = "fixed-rate load for POST /v1/events")]
struct Args {
    /// Endpoint, e.g. http://127.0.0.1:8080/v1/events.
    #[arg(long)]
    url: String,
    /// Requests per second in total.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Concurrent connections.
    #[arg(long, default_value_t = 32)]
    connections: u64,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Events per request.
    #[arg(long, default_value_t = 1)]
    batch: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.rate == 0 || args.connections == 0 {
        bail!("--rate and --connections must be at least 1");
    }
    let event = r#"{"type":"page_view","user":"u-1234","path":"/pricing","ms":42}"#;
    let body = if args.batch == 1 {
        event.to_owned()
    } else {
        format!("[{}]", vec![event; args.batch].join(","))
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections as usize)
        .build()?;
    let interval = Duration::from_secs_f64(args.connections as f64 / args.rate as f64);
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs(args.duration_secs);
    let mut workers = Vec::new();
    for w in 0..args.connections {
        let (client, url, body) = (client.clone(), args.url.clone(), body.clone());
        let offset = interval.mul_f64(w as f64 / args.connections as f64);
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut next = start + offset;
            while next < end {
                tokio::time::sleep_until(next.into()).await;
                let sent = Instant::now();
                let ok = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .map(|r| r.status() == 200)
                    .unwrap_or(false);
                if ok {
                    lat.push(sent.elapsed().as_micros() as u32);
                } else {
                    errors += 1;
                }
                next += interval;
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (lat, e) = w.await?;
        all.extend(lat);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            0.0
        } else {
            all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0
        }
    };
    let secs = args.duration_secs as f64;
    println!(
        "target {} req/s x {} events, {} connections, {}s: {:.0} req/s acked ({:.0} events/s), {} errors; latency ms p50 {:.3} p90 {:.3} p99 {:.3} max {:.3}",
        args.rate,
        args.batch,
        args.connections,
        args.duration_secs,
        all.len() as f64 / secs,
        all.len() as f64 * args.batch as f64 / secs,
        errors,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0)
    );
    Ok(())
}
