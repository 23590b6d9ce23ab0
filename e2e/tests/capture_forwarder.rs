//! The at-least-once forwarder in process against a real Kafka broker:
//! events sent again alone after an oversized neighbour failed their batch
//! are counted as delivered, and a producer that stops reporting deliveries
//! is replaced (the stall watchdog) without losing or double-settling events.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use holdfast_capture::buffer::NewEvent;
use holdfast_capture::buffer::writer::GroupCommitWriter;
use holdfast_capture::config::{Delivery, Durability, KafkaConfig};
use holdfast_capture::forward::{Forwarder, RunUntil, SharedProducer};
use holdfast_capture::metrics::{Metrics, ReasonLabel, TopicLabel};
use holdfast_e2e::kafka::{KafkaBroker, record_count};

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
    }
}

fn event(uuid: String, payload: String) -> NewEvent {
    NewEvent {
        uuid,
        topic: "events".into(),
        key: Vec::new(),
        payload: payload.into_bytes(),
        captured_at_ms: 1,
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
