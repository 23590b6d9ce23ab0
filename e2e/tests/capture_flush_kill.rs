//! A `flush` SIGKILLed in the middle of a drain (a flush Job whose node
//! died): the next flush delivers the rest, nothing acknowledged is lost, and
//! what the kill makes it send twice stays within the drain's in-flight
//! window (`FLUSH_IN_FLIGHT_EVENTS` sent, as many waiting, one settlement of
//! as many committing).

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use holdfast_capture::config::FLUSH_IN_FLIGHT_EVENTS;
use holdfast_e2e::capture::{self, CaptureProcess};
use holdfast_e2e::kafka::{self, KafkaBroker};
use serde_json::json;

/// Events buffered before the drain: enough that a debug build's flush is
/// still draining when the test has seen a tenth of them in Kafka.
const EVENTS: usize = 100_000;
const PER_REQUEST: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_killed_mid_drain_loses_nothing_and_resends_at_most_its_window() -> Result<()> {
    let mut kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 3, &[]).await?;
    let dir = tempfile::tempdir()?;
    let buf = dir.path().join("buf");
    let mut cap = CaptureProcess::start(&buf, &kafka.bootstrap(), &[]).await?;
    // Kafka away: every event stays in the buffer for the flushes.
    kafka.stop().await?;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/events", cap.url());
    for r in 0..EVENTS / PER_REQUEST {
        let batch: Vec<_> = (0..PER_REQUEST).map(|i| json!({"r": r, "i": i})).collect();
        let answer = client.post(&url).json(&batch).send().await?;
        ensure!(answer.status() == 200, "request {r}: {}", answer.status());
    }
    cap.kill();
    kafka.restart().await?;

    let mut first = Command::new(capture::capture_bin()?)
        .args(["flush", "--data-dir"])
        .arg(&buf)
        .args(["--kafka-bootstrap", &kafka.bootstrap()])
        .env("HOLDFAST_LOG", "warn,librdkafka=error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let at_kill = loop {
        let delivered = kafka::record_count(&kafka.bootstrap(), "events").await?;
        if delivered >= EVENTS / 10 {
            break delivered;
        }
        ensure!(
            first.try_wait()?.is_none(),
            "the first flush ended before a tenth was delivered ({delivered})"
        );
        ensure!(Instant::now() < deadline, "no tenth delivered within 120 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    first.kill()?;
    first.wait()?;
    ensure!(
        at_kill < EVENTS,
        "the first flush had delivered everything ({at_kill}) before the kill: the test proves nothing"
    );

    let (status, stderr) = capture::flush(&buf, &kafka.bootstrap(), 300)?;
    ensure!(status.success(), "the second flush failed: {stderr}");
    let total = kafka::record_count(&kafka.bootstrap(), "events").await?;
    let records = kafka
        .consume("events", total, Duration::from_secs(120))
        .await?;
    let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
    for r in &records {
        let uuid = r
            .header("holdfast-uuid")
            .context("a record without a holdfast-uuid header")?;
        *seen.entry(uuid.to_vec()).or_default() += 1;
    }
    let duplicates = records.len() - seen.len();
    eprintln!(
        "killed at {at_kill} of {EVENTS} delivered; {} records, {} distinct, {duplicates} duplicates",
        records.len(),
        seen.len()
    );
    ensure!(
        seen.len() == EVENTS,
        "{} of {EVENTS} acknowledged events reached Kafka",
        seen.len()
    );
    ensure!(
        duplicates <= 3 * FLUSH_IN_FLIGHT_EVENTS,
        "{duplicates} events sent twice after one kill, more than three windows of {FLUSH_IN_FLIGHT_EVENTS}"
    );
    Ok(())
}
