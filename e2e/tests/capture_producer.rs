//! A Kafka producer that hit a fatal error accepts nothing more: an
//! idempotent producer goes fatal when it can no longer guarantee order
//! without gaps. Capture replaces such a producer, in the forwarder and for
//! direct streams, instead of answering 503 for good while the pod stays
//! ready. librdkafka's own fault injection raises the fatal error in the
//! producer the capture code holds; the broker is a real Kafka.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use holdfast_capture::buffer::NewEvent;
use holdfast_capture::buffer::writer::GroupCommitWriter;
use holdfast_capture::config::{Delivery, Durability, KafkaConfig};
use holdfast_capture::forward::{self, Forwarder, RunUntil, SharedProducer};
use holdfast_capture::metrics::Metrics;
use holdfast_e2e::kafka::{KafkaBroker, record_count};
use rdkafka::client::Client;
use rdkafka::producer::Producer;

fn config(bootstrap: &str) -> KafkaConfig {
    KafkaConfig {
        bootstrap: bootstrap.to_owned(),
        properties: BTreeMap::new(),
        dead_letter_topic: None,
        batch_events: 100,
        batch_bytes: 1 << 20,
        poison_retry_window: Duration::from_secs(60),
        message_timeout: Duration::from_secs(30),
        delivery: Delivery::AtLeastOnce,
        checkpoint_topic: "holdfast.checkpoints".into(),
        transaction_events: 25_000,
        in_flight_events: holdfast_capture::config::SERVE_IN_FLIGHT_EVENTS,
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

/// Puts `client` in librdkafka's fatal state, as a broker-caused fatal
/// idempotence error would.
#[allow(unsafe_code)]
fn raise_fatal(client: &Client<impl rdkafka::ClientContext>) {
    let reason = c"test: fatal error injected";
    // SAFETY: the client's native handle is live for the call (we hold the
    // client); the reason is a NUL-terminated string librdkafka copies.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            client.native_ptr(),
            rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        )
    };
    assert_eq!(
        err,
        rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR,
        "librdkafka refused the fault injection"
    );
    assert!(client.fatal_error().is_some(), "the producer is not fatal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_sends_get_a_new_producer_after_a_fatal_error() -> Result<()> {
    let kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 1, &[]).await?;
    let metrics = Arc::new(Metrics::new());
    let shared = SharedProducer::new(&config(&kafka.bootstrap()), metrics.clone())?;
    forward::send_direct(&shared, &events("before", 3)).await?;

    let broken = shared.get();
    raise_fatal(broken.client());
    let refused = forward::send_direct(&shared, &events("during", 3)).await;
    ensure!(refused.is_err(), "a fatal producer delivered: {refused:?}");
    ensure!(
        shared.get().client().fatal_error().is_none(),
        "the fatal producer was kept"
    );
    ensure!(metrics.producer_recreated.get() == 1);

    forward::send_direct(&shared, &events("after", 3))
        .await
        .context("the next request must get a working producer")?;
    ensure!(
        record_count(&kafka.bootstrap(), "events").await? == 6,
        "only the 3 events before and the 3 after reach Kafka"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forwarder_replaces_a_fatal_producer_and_delivers_everything() -> Result<()> {
    let kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 1, &[]).await?;
    let dir = tempfile::tempdir()?;
    let (writer_thread, writer) =
        GroupCommitWriter::start(dir.path(), Durability::Fsync, u64::MAX, None)?;
    writer.append(events("buffered", 250)).await?;
    let metrics = Arc::new(Metrics::new());
    let cfg = config(&kafka.bootstrap());
    let shared = SharedProducer::new(&cfg, metrics.clone())?;
    raise_fatal(shared.get().client());

    let forwarder = Forwarder::new(
        dir.path(),
        writer.clone(),
        shared.clone(),
        cfg,
        metrics.clone(),
    )?;
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::time::timeout(
        Duration::from_secs(60),
        forwarder.run(stop, RunUntil::Empty),
    )
    .await
    .context("the forwarder did not drain the buffer with a fatal producer")??;

    ensure!(
        writer
            .state
            .events
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0,
        "events left in the buffer"
    );
    ensure!(
        metrics.producer_recreated.get() >= 1,
        "the producer was never replaced"
    );
    ensure!(
        record_count(&kafka.bootstrap(), "events").await? == 250,
        "every buffered event reaches Kafka exactly once"
    );
    drop(writer);
    writer_thread.join();
    Ok(())
}
