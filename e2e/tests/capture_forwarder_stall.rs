//! A Kafka producer that stops reporting deliveries (neither success nor
//! failure) must not stall the forwarder: after the message timeout and a
//! margin without a report, the forwarder replaces the producer and sends
//! the unsettled events again (duplicates allowed, loss never).
//!
//! The stall is injected for real: rust-rdkafka dispatches delivery reports
//! and librdkafka's log lines on one polling thread per producer; a tracing
//! layer holds that thread of the first producer the moment it logs while
//! the broker is away, so that producer's reports never arrive, even after
//! the broker (a real Kafka) returns. In its own test binary, since the
//! tracing subscriber is process-wide.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use holdfast_capture::buffer::NewEvent;
use holdfast_capture::buffer::writer::GroupCommitWriter;
use holdfast_capture::config::{Delivery, Durability, KafkaConfig};
use holdfast_capture::forward::{Forwarder, RunUntil, SharedProducer};
use holdfast_capture::metrics::Metrics;
use holdfast_e2e::kafka::{KafkaBroker, record_count};
use tracing_subscriber::layer::SubscriberExt;

/// Holds the first producer polling thread that logs once armed.
static ARMED: AtomicBool = AtomicBool::new(false);
static HELD: AtomicBool = AtomicBool::new(false);
static RELEASED: AtomicBool = AtomicBool::new(false);

struct HoldPollingThread;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for HoldPollingThread {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let polling = std::thread::current().name() == Some("producer polling thread");
        if !polling || event.metadata().target() != "librdkafka" {
            return;
        }
        if ARMED.swap(false, Ordering::SeqCst) {
            HELD.store(true, Ordering::SeqCst);
            while !RELEASED.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn events(prefix: &str, n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| NewEvent {
            uuid: format!("{prefix}-{i}"),
            topic: "events".into(),
            key: Vec::new(),
            payload: format!(r#"{{"i":{i}}}"#).into_bytes(),
            captured_at_ms: 1,
            client_uuid: true,
        })
        .collect()
}

async fn poll_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !f() {
        ensure!(
            Instant::now() < deadline,
            "timed out after {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_stops_reporting_is_replaced_and_nothing_is_lost() -> Result<()> {
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(HoldPollingThread))
        .context("installing the tracing layer")?;
    let mut kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 1, &[]).await?;
    let dir = tempfile::tempdir()?;
    let (writer_thread, writer) =
        GroupCommitWriter::start(dir.path(), Durability::Fsync, u64::MAX, None)?;
    let metrics = Arc::new(Metrics::new());
    let message_timeout = Duration::from_secs(2);
    let cfg = KafkaConfig {
        bootstrap: kafka.bootstrap(),
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
    };
    let shared = SharedProducer::new(&cfg, metrics.clone())?;
    let forwarder = Forwarder::new(dir.path(), writer.clone(), shared, cfg, metrics.clone())?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(forwarder.run(stop, RunUntil::Stopped));
    let buffered = || writer.state.events.load(Ordering::Relaxed);

    writer.append(events("before", 100)).await?;
    poll_until("the first events to drain", Duration::from_secs(30), || {
        buffered() == 0
    })
    .await?;

    // The broker goes away: the first producer logs the refused connection
    // and its polling thread is held from then on.
    ARMED.store(true, Ordering::SeqCst);
    kafka.stop().await?;
    writer.append(events("during", 300)).await?;
    poll_until(
        "the producer's polling thread to be held",
        Duration::from_secs(30),
        || HELD.load(Ordering::SeqCst),
    )
    .await?;
    kafka.restart().await?;
    let restarted = Instant::now();

    // The held producer never reports again: only a fresh one can drain.
    let drained = poll_until(
        "the backlog to drain after kafka returned",
        Duration::from_secs(60),
        || buffered() == 0,
    )
    .await;
    let recreated = metrics.producer_recreated.get();
    RELEASED.store(true, Ordering::SeqCst);
    drained?;
    eprintln!(
        "backlog drained {:?} after kafka returned; {recreated} producer(s) replaced",
        restarted.elapsed()
    );
    ensure!(recreated >= 1, "the stalled producer was never replaced");

    stop_tx.send(true)?;
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .context("the forwarder did not stop")???;

    let total = record_count(&kafka.bootstrap(), "events").await?;
    let records = kafka
        .consume("events", total, Duration::from_secs(60))
        .await?;
    let seen: HashSet<String> = records
        .iter()
        .filter_map(|r| r.header("holdfast-uuid"))
        .map(|u| String::from_utf8_lossy(u).into_owned())
        .collect();
    let lost: Vec<String> = events("before", 100)
        .into_iter()
        .chain(events("during", 300))
        .map(|e| e.uuid)
        .filter(|u| !seen.contains(u))
        .collect();
    eprintln!(
        "{total} records in kafka for 400 events ({} duplicates)",
        total - seen.len()
    );
    ensure!(
        lost.is_empty(),
        "{} events lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    drop(writer);
    writer_thread.join();
    Ok(())
}
