//! Benchmark, not a test: drain rate of the same buffer at-least-once and
//! exactly-once (`make bench-drain`, `BENCH_EVENTS` events, default 1,000,000;
//! `HOLDFAST_BIN_DIR=target/release` to time a release build). Prints figures
//! and the ratio; asserts only that every event arrived.

use std::time::Instant;

use anyhow::{Result, ensure};
use holdfast_capture::buffer::NewEvent;
use holdfast_capture::buffer::writer::GroupCommitWriter;
use holdfast_capture::config::Durability;
use holdfast_e2e::capture;
use holdfast_e2e::kafka::{KafkaBroker, record_count};

fn events() -> usize {
    std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// A buffer of `n` events of about 200 bytes over 8 partitions' keys.
async fn fill(dir: &std::path::Path, n: usize) -> Result<()> {
    let (thread, writer) = GroupCommitWriter::start(dir, Durability::Os, u64::MAX, None)?;
    let pad = "x".repeat(160);
    for chunk in 0..n.div_ceil(10_000) {
        let batch = (0..10_000.min(n - chunk * 10_000))
            .map(|i| NewEvent {
                uuid: uuid::Uuid::now_v7().to_string(),
                topic: "events".into(),
                key: format!("k{}", i % 8).into_bytes(),
                payload: format!(r#"{{"i":{i},"pad":"{pad}"}}"#).into_bytes(),
                captured_at_ms: 1,
                client_uuid: true,
            })
            .collect();
        writer.append(batch).await?;
    }
    drop(writer);
    tokio::task::spawn_blocking(move || thread.join()).await?;
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with make bench-drain"]
async fn drain_rate_at_least_once_and_exactly_once() -> Result<()> {
    let n = events();
    let work = tempfile::tempdir()?;
    let source = work.path().join("source");
    let filled = Instant::now();
    fill(&source, n).await?;
    eprintln!(
        "filled a buffer of {n} events in {:.1}s",
        filled.elapsed().as_secs_f64()
    );
    let mut rates = Vec::new();
    for (mode, args) in [
        ("at-least-once", &[][..]),
        ("exactly-once", &["--delivery", "exactly-once"][..]),
    ] {
        let kafka = KafkaBroker::start().await?;
        kafka.create_topic("events", 8, &[]).await?;
        let dir = work.path().join(mode);
        copy_dir(&source, &dir)?;
        let started = Instant::now();
        let (exit, log) = tokio::task::spawn_blocking({
            let (dir, bootstrap) = (dir.clone(), kafka.bootstrap());
            let args: Vec<&'static str> = args.to_vec();
            move || capture::flush_with(&dir, &bootstrap, 3600, &args)
        })
        .await??;
        let secs = started.elapsed().as_secs_f64();
        ensure!(exit.success(), "{mode} flush failed: {log}");
        let in_kafka = record_count(&kafka.bootstrap(), "events").await?;
        // Exactly-once adds one transaction marker per partition per batch.
        ensure!(in_kafka >= n, "{mode}: {in_kafka} records for {n} events");
        eprintln!(
            "{mode}: drained {n} events in {secs:.1}s = {:.0} events/s ({in_kafka} records incl. markers)",
            n as f64 / secs
        );
        rates.push(secs);
        drop(kafka);
    }
    eprintln!(
        "exactly-once drain takes {:.2}x the at-least-once time (target <= 1.5x)",
        rates[1] / rates[0]
    );
    Ok(())
}
