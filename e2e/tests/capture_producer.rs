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

/// Kafka's `Utils.murmur2`, the hash of the Java client's default partitioner.
fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in chunks.by_ref() {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java client's default partitioner picks for `key`.
fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
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

/// Keys land on the partition the Java client's default partitioner picks
/// (murmur2), so events that share a key with records other producers write
/// share their partition, and their order. librdkafka's own default (CRC32)
/// would scatter them differently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_partitioned_as_the_java_client_partitions_them() -> Result<()> {
    // Kafka 4.1.2's `Utils.murmur2` of these (run against its jar): the
    // hash above is the Java one.
    for (key, hash) in [
        ("21", -973_932_308),
        ("foobar", -790_332_482),
        ("abc", 479_470_107),
        ("a-little-bit-long-string", -985_981_536),
    ] {
        ensure!(murmur2(key.as_bytes()) == hash, "murmur2({key})");
    }
    const PARTITIONS: i32 = 7;
    let kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", PARTITIONS, &[]).await?;
    let shared = SharedProducer::new(&config(&kafka.bootstrap()), Arc::new(Metrics::new()))?;
    let mut keyed = events("keyed", 60);
    for (i, e) in keyed.iter_mut().enumerate() {
        // Keys of every length modulo 4, a 36-character uuid among them.
        e.key = match i % 3 {
            0 => format!("user-{i}"),
            1 => format!("{i:0>width$}", width = i % 9 + 1),
            _ => format!("4b1e0a9c-7d3f-4c2a-9e8b-{i:0>12}"),
        }
        .into_bytes();
    }
    forward::send_direct(&shared, &keyed).await?;
    let records = kafka
        .consume("events", keyed.len(), Duration::from_secs(30))
        .await?;
    ensure!(records.len() == keyed.len(), "{} records", records.len());
    let mut used = std::collections::HashSet::new();
    for r in &records {
        let key = r.key.as_deref().context("a record without its key")?;
        let want = java_partition(key, PARTITIONS);
        ensure!(
            r.partition == want,
            "key {:?} went to partition {}, the Java client picks {want}",
            String::from_utf8_lossy(key),
            r.partition
        );
        used.insert(r.partition);
    }
    ensure!(used.len() > 1, "every key on one partition proves nothing");
    Ok(())
}
