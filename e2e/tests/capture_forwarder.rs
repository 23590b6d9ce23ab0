//! The at-least-once forwarder against a real Kafka broker: events sent
//! again alone after an oversized neighbour failed their batch are counted
//! as delivered (in process), and the capture binary drains its backlog
//! each time Kafka returns from an outage under load. The stalled-producer
//! watchdog has its own binary: capture_forwarder_stall.rs.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use holdfast_capture::buffer::NewEvent;
use holdfast_capture::buffer::writer::GroupCommitWriter;
use holdfast_capture::config::{Delivery, Durability, KafkaConfig};
use holdfast_capture::forward::{Forwarder, RunUntil, SharedProducer};
use holdfast_capture::metrics::{Metrics, ReasonLabel, TopicLabel};
use holdfast_e2e::capture::{self, CaptureProcess};
use holdfast_e2e::kafka::{KafkaBroker, record_count};
use serde_json::json;

fn config(bootstrap: &str, message_timeout: Duration) -> KafkaConfig {
    KafkaConfig {
        bootstrap: bootstrap.to_owned(),
        properties: BTreeMap::new(),
        dead_letter_topic: None,
        batch_events: 100,
        batch_bytes: 1 << 20,
        poison_retry_window: Duration::from_secs(60),
        message_timeout,
        delivery: Delivery::AtLeastOnce,
        checkpoint_topic: "holdfast.checkpoints".into(),
        transaction_events: 25_000,
        in_flight_events: holdfast_capture::config::SERVE_IN_FLIGHT_EVENTS,
    }
}

fn event(uuid: String, payload: String) -> NewEvent {
    NewEvent {
        uuid,
        topic: "events".into(),
        key: Vec::new(),
        payload: payload.into_bytes(),
        captured_at_ms: 1,
        client_uuid: true,
    }
}

fn delivered(metrics: &Metrics) -> u64 {
    metrics
        .delivered
        .get_or_create(&TopicLabel {
            topic: "events".into(),
        })
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_resent_alone_after_an_oversized_neighbour_are_counted_as_delivered() -> Result<()> {
    let kafka = KafkaBroker::start().await?;
    // Records over 1,000 bytes are refused for good, and fail their batch.
    kafka
        .create_topic("events", 1, &[("max.message.bytes", "1000")])
        .await?;
    let dir = tempfile::tempdir()?;
    let (writer_thread, writer) =
        GroupCommitWriter::start(dir.path(), Durability::Fsync, u64::MAX, None)?;
    writer
        .append(vec![
            event("small-1".into(), r#"{"n":1}"#.into()),
            event(
                "poison".into(),
                format!(r#"{{"pad":"{}"}}"#, "p".repeat(3000)),
            ),
            event("small-2".into(), r#"{"n":2}"#.into()),
        ])
        .await?;
    let metrics = Arc::new(Metrics::new());
    let cfg = config(&kafka.bootstrap(), Duration::from_secs(30));
    let shared = SharedProducer::new(&cfg, metrics.clone())?;
    let forwarder = Forwarder::new(dir.path(), writer.clone(), shared, cfg, metrics.clone())?;
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::time::timeout(
        Duration::from_secs(60),
        forwarder.run(stop, RunUntil::Empty),
    )
    .await
    .context("the forwarder did not empty the buffer")??;

    let in_kafka = record_count(&kafka.bootstrap(), "events").await?;
    ensure!(
        in_kafka == 2,
        "{in_kafka} records in kafka, expected the 2 small ones"
    );
    let counted = delivered(&metrics);
    ensure!(
        counted == 2,
        "holdfast_events_delivered_total{{topic=\"events\"}} is {counted}, but 2 events reached kafka"
    );
    let dead = metrics
        .dead_lettered
        .get_or_create(&ReasonLabel {
            reason: "too_large".into(),
        })
        .get();
    ensure!(
        dead == 1,
        "{dead} events dead-lettered, expected the poison one"
    );
    drop(writer);
    writer_thread.join();
    Ok(())
}

/// Posts 10-event batches with client uuids until `stop`; returns the
/// uuids acknowledged with `200`.
async fn post_until(
    url: String,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
) -> HashSet<String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    let mut acked = HashSet::new();
    while !stop.load(Ordering::Relaxed) {
        let events: Vec<serde_json::Value> = (0..10)
            .map(|_| json!({"uuid": uuid::Uuid::now_v7().to_string()}))
            .collect();
        let response = client
            .post(&url)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&events).expect("json"))
            .send()
            .await;
        if matches!(&response, Ok(r) if r.status() == 200) {
            acked.extend(
                events
                    .iter()
                    .map(|e| e["uuid"].as_str().unwrap_or_default().to_owned()),
            );
            count.store(acked.len(), Ordering::Relaxed);
        }
        // About 1,000 events a second: a backlog, not a flood.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    acked
}

/// Waits until the client has `more` acknowledgements beyond its count now.
async fn more_acked(count: &AtomicUsize, more: usize) -> Result<()> {
    let target = count.load(Ordering::Relaxed) + more;
    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(Ordering::Relaxed) < target {
        ensure!(
            Instant::now() < deadline,
            "{more} more acknowledgements in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The forwarder after broker outages shorter and longer than the message
/// timeout, under load: each time Kafka returns, the backlog drains within
/// a deadline (once a pod stalled here for good, its producer silent), and
/// no acknowledged event is lost. `HOLDFAST_OUTAGE_CYCLES` outages (2 by
/// default; more for a soak) with `HOLDFAST_OUTAGE_MESSAGE_TIMEOUT_MS`
/// (3000 by default; the chart's 30000 for the demo's shape).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_drains_after_each_kafka_outage_under_load() -> Result<()> {
    let cycles: usize = std::env::var("HOLDFAST_OUTAGE_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let message_timeout_ms: u64 = std::env::var("HOLDFAST_OUTAGE_MESSAGE_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let message_timeout = Duration::from_millis(message_timeout_ms);
    let mut kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 3, &[]).await?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("buf");
    let timeout_flag = message_timeout_ms.to_string();
    let cap = CaptureProcess::start(
        &data,
        &kafka.bootstrap(),
        &["--kafka-message-timeout-ms", &timeout_flag],
    )
    .await?;
    let url = format!("{}/v1/events", cap.url());
    let buffered = |d: &std::path::Path| -> Result<u64> {
        capture::inspect(d)?["events"]
            .as_u64()
            .context("inspect: no events count")
    };
    let mut acked = HashSet::new();
    for cycle in 0..cycles {
        // Alternately shorter and twice longer than the message timeout.
        let outage = if cycle % 2 == 0 {
            (message_timeout / 2).min(Duration::from_secs(5))
        } else {
            message_timeout * 2
        };
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let load = tokio::spawn(post_until(url.clone(), stop.clone(), count.clone()));
        // Load flowing (and delivered) before the broker goes.
        more_acked(&count, 1000).await?;
        kafka.stop().await?;
        // The outage itself (the scenario), not a synchronisation.
        tokio::time::sleep(outage).await;
        kafka.restart().await?;
        let back = Instant::now();
        // Load keeps coming while the backlog drains.
        more_acked(&count, 1000).await?;
        stop.store(true, Ordering::Relaxed);
        acked.extend(load.await?);
        // The forwarder's stall bound (message timeout + half of it, at
        // least 5 s) and then some.
        let deadline = message_timeout
            + (message_timeout / 2).max(Duration::from_secs(5))
            + Duration::from_secs(20);
        loop {
            let left = buffered(&data)?;
            if left == 0 {
                break;
            }
            ensure!(
                back.elapsed() < deadline,
                "cycle {cycle} (outage {outage:?}): {left} events still buffered {deadline:?} after kafka returned\nlog: {}",
                cap.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "cycle {cycle}: outage {outage:?}, backlog drained {:?} after kafka returned",
            back.elapsed()
        );
    }
    let total = record_count(&kafka.bootstrap(), "events").await?;
    let records = kafka
        .consume("events", total, Duration::from_secs(60))
        .await?;
    let seen: HashSet<String> = records
        .iter()
        .filter_map(|r| r.header("holdfast-uuid"))
        .map(|u| String::from_utf8_lossy(u).into_owned())
        .collect();
    let lost = acked.iter().filter(|u| !seen.contains(*u)).count();
    let log = cap.log_text();
    let stalls: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("kafka producer stalled") || l.contains("replacing the kafka producer")
        })
        .collect();
    for line in &stalls {
        eprintln!("{line}");
    }
    let stalls = stalls.len();
    eprintln!(
        "{cycles} outages: {} acknowledged, {total} records, {lost} lost, {stalls} producer(s) replaced (stalled or timing out)",
        acked.len()
    );
    ensure!(lost == 0, "{lost} acknowledged events lost");
    Ok(())
}
