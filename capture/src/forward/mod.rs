//! Kafka delivery: producer setup, the forwarder loop that drains the buffer,
//! the direct path for `direct` streams, and the one error classifier every
//! Kafka error goes through.
//!
//! Invariant kept here: an event leaves the buffer only after Kafka
//! acknowledged it (`acks=all`, idempotent producer), or after Kafka rejected
//! it for good, in which case it moves to dead letters in the same buffer
//! transaction that deletes it. Everything else stays and is retried with
//! backoff, so a broker outage only delays delivery.

mod classify;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rusqlite::Connection;
use tokio::sync::watch;

pub use classify::{ErrorClass, classify};

use crate::buffer::{self, NewEvent, StoredEvent, WriterHandle};
use crate::config::KafkaConfig;
use crate::metrics::{Metrics, ReasonLabel, TopicLabel};

/// How often an idle forwarder checks that Kafka answers.
const KAFKA_PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// Header carrying the event's stable id.
pub const UUID_HEADER: &str = "holdfast-uuid";
/// Header carrying the capture time (ms since the Unix epoch).
pub const CAPTURED_AT_HEADER: &str = "holdfast-captured-at";
/// Header on dead-letter-topic records: why Kafka rejected the event.
pub const REASON_HEADER: &str = "holdfast-dead-letter-reason";
/// Header on dead-letter-topic records: the topic the event was meant for.
pub const ORIGINAL_TOPIC_HEADER: &str = "holdfast-original-topic";

/// Result of Kafka operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong talking to Kafka.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The producer could not be created (bad property, bad TLS material).
    #[error("kafka producer: {0}")]
    Producer(#[source] KafkaError),
    /// The buffer failed.
    #[error(transparent)]
    Buffer(#[from] buffer::Error),
    /// Settling delivered events in the buffer failed.
    #[error("buffer settle failed: {0}")]
    Settle(#[from] buffer::AppendError),
    /// A direct send failed; `index` is the event's position in its request.
    #[error("event {index}: kafka rejected it: {reason}")]
    Direct {
        index: usize,
        reason: String,
        class: ErrorClass,
    },
}

/// Tracks broker reachability for `holdfast_kafka_up`.
#[derive(Debug, Clone)]
pub struct KafkaContext {
    metrics: Arc<Metrics>,
}

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, "{log_message}")
            }
            _ => tracing::debug!(target: "librdkafka", facility = fac, "{log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            // Logged once per outage, not once per reconnect attempt.
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                if self.metrics.kafka_up.set(0) != 0 {
                    tracing::warn!(reason, "all kafka brokers are down; events stay buffered");
                }
            }
            Some(RDKafkaErrorCode::BrokerTransportFailure) => {
                tracing::debug!(error = %error, reason, "kafka connection failed")
            }
            _ => tracing::warn!(error = %error, reason, "kafka client error"),
        }
    }
}

/// The producer used by the forwarder and direct streams.
pub type KafkaProducer = FutureProducer<KafkaContext>;

/// Producer properties: safe defaults first, the user's properties last (they win).
pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set(
            "message.timeout.ms",
            cfg.message_timeout.as_millis().to_string(),
        )
        .set("client.id", "holdfast-capture");
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// Creates the producer.
pub fn create_producer(cfg: &KafkaConfig, metrics: Arc<Metrics>) -> Result<KafkaProducer> {
    producer_config(cfg)
        .create_with_context(KafkaContext { metrics })
        .map_err(Error::Producer)
}

fn headers(event: &NewEvent) -> OwnedHeaders {
    OwnedHeaders::new_with_capacity(2)
        .insert(Header {
            key: UUID_HEADER,
            value: Some(event.uuid.as_bytes()),
        })
        .insert(Header {
            key: CAPTURED_AT_HEADER,
            value: Some(event.captured_at_ms.to_string().as_bytes()),
        })
}

/// Enqueues one event, waiting for queue space when librdkafka's queue is full.
async fn enqueue(
    producer: &KafkaProducer,
    event: &NewEvent,
) -> std::result::Result<DeliveryFuture, KafkaError> {
    loop {
        let record = FutureRecord::to(&event.topic)
            .key(&event.key)
            .payload(&event.payload)
            .headers(headers(event));
        match producer.send_result(record) {
            Ok(fut) => return Ok(fut),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                // Deliveries in flight free the queue; librdkafka polls on its own thread.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Sends every event and waits for every delivery report. The result for
/// each event is `Ok(())` or the Kafka error it ended with.
pub async fn send_all(
    producer: &KafkaProducer,
    events: &[&NewEvent],
) -> Vec<std::result::Result<(), KafkaError>> {
    let mut pending = Vec::with_capacity(events.len());
    for event in events {
        pending.push(enqueue(producer, event).await);
    }
    let mut results = Vec::with_capacity(events.len());
    for p in pending {
        results.push(match p {
            Ok(fut) => match fut.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e),
                Err(_canceled) => Err(KafkaError::Canceled),
            },
            Err(e) => Err(e),
        });
    }
    results
}

/// Sends a `direct` stream's events; `Ok` only when Kafka acknowledged every one.
pub async fn send_direct(producer: &KafkaProducer, events: &[NewEvent]) -> Result<()> {
    let refs: Vec<&NewEvent> = events.iter().collect();
    let results = send_all(producer, &refs).await;
    for (index, r) in results.into_iter().enumerate() {
        if let Err(e) = r {
            return Err(Error::Direct {
                index,
                reason: e.to_string(),
                class: classify(&e),
            });
        }
    }
    Ok(())
}

/// When the forwarder stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunUntil {
    /// Until told to stop (serve).
    Stopped,
    /// Until the buffer is empty or told to stop (flush).
    Empty,
}

/// Drains the buffer into Kafka, oldest first.
pub struct Forwarder {
    dir: std::path::PathBuf,
    reader: Arc<std::sync::Mutex<Connection>>,
    writer: WriterHandle,
    producer: KafkaProducer,
    cfg: KafkaConfig,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").finish_non_exhaustive()
    }
}

impl Forwarder {
    /// A forwarder reading with its own connection to the buffer in `dir`.
    pub fn new(
        dir: &std::path::Path,
        writer: WriterHandle,
        producer: KafkaProducer,
        cfg: KafkaConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        Ok(Self {
            dir: dir.to_owned(),
            reader: Arc::new(std::sync::Mutex::new(buffer::open_reader(dir)?)),
            writer,
            producer,
            cfg,
            metrics,
        })
    }

    async fn read(&self, limit: usize) -> Result<Vec<StoredEvent>> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            buffer::read_batch(&conn, 0, limit)
        })
        .await
        .map_err(|_| buffer::Error::WriterStopped)?
        .map_err(Error::from)
    }

    /// Runs until `stop` turns true (finishing the batch in flight), or, with
    /// [`RunUntil::Empty`], until the buffer is empty.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>, until: RunUntil) -> Result<()> {
        let backoff_builder = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times();
        let mut backoff = backoff_builder.build();
        let mut last_probe: Option<tokio::time::Instant> = None;
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let outcome = match self.read(self.cfg.batch_events).await {
                Err(e) => Err(e),
                Ok(batch) if batch.is_empty() => {
                    if until == RunUntil::Empty {
                        return Ok(());
                    }
                    // Idle: ask Kafka for metadata now and then, so `kafka_up`
                    // tells the truth about a pod that has nothing to send.
                    if last_probe.is_none_or(|t| t.elapsed() >= KAFKA_PROBE_INTERVAL) {
                        last_probe = Some(tokio::time::Instant::now());
                        let producer = self.producer.clone();
                        let up = tokio::task::spawn_blocking(move || {
                            producer
                                .client()
                                .fetch_metadata(None, Duration::from_secs(5))
                                .is_ok()
                        })
                        .await
                        .unwrap_or(false);
                        self.metrics.kafka_up.set(i64::from(up));
                    }
                    tokio::select! {
                        _ = self.writer.appended.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
                // A batch in flight is abandoned on stop: its events are still in
                // the buffer and are sent again by the next drainer (at least once).
                Ok(batch) => tokio::select! {
                    r = self.forward(&batch) => r,
                    _ = stop.changed() => return Ok(()),
                },
            };
            let delay = match outcome {
                Ok((0, _)) => {
                    self.metrics.kafka_up.set(1);
                    backoff = backoff_builder.build();
                    continue;
                }
                Ok((retried, fatal)) => {
                    if fatal {
                        // An idempotent producer that hit a fatal error accepts nothing more.
                        tracing::error!("kafka producer hit a fatal error; recreating it");
                        match create_producer(&self.cfg, self.metrics.clone()) {
                            Ok(p) => self.producer = p,
                            Err(e) => {
                                tracing::error!(error = %e, "could not recreate the producer")
                            }
                        }
                    }
                    self.metrics.forward_retries.inc();
                    self.metrics.kafka_up.set(0);
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(
                        events = retried,
                        delay_ms = delay.as_millis() as u64,
                        "kafka did not take every event; retrying"
                    );
                    delay
                }
                Err(e) => {
                    // The buffer failed (typically a full disk): the forwarder never
                    // gives up, since draining is what frees the disk.
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::error!(error = %e, delay_ms = delay.as_millis() as u64, "forwarding failed on the buffer side; retrying");
                    if let Some(freed) = buffer::release_reserve(&self.dir) {
                        tracing::warn!(
                            bytes = freed,
                            "released the disk reserve so delivered events can be deleted"
                        );
                    }
                    delay
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Forwards one batch; returns how many events must be retried, and
    /// whether the producer reported a fatal error.
    async fn forward(&self, batch: &[StoredEvent]) -> Result<(usize, bool)> {
        let refs: Vec<&NewEvent> = batch.iter().map(|s| &s.event).collect();
        let mut results = send_all(&self.producer, &refs).await;
        // Kafka judges size per record batch, so one oversized event fails the
        // innocent events batched with it. Retry each such event alone: only an
        // event that is rejected on its own is poison.
        for (stored, result) in batch.iter().zip(results.iter_mut()) {
            if let Err(e) = result
                && classify(e) == ErrorClass::DeadLetter("too_large")
            {
                *result = send_all(&self.producer, &[&stored.event])
                    .await
                    .pop()
                    .unwrap_or(Err(KafkaError::Canceled));
            }
        }
        let mut delivered = Vec::with_capacity(batch.len());
        let mut dead = Vec::new();
        let mut retry = 0;
        let mut fatal = false;
        let mut by_topic: std::collections::HashMap<&str, u64> = Default::default();
        for (stored, result) in batch.iter().zip(results) {
            let size = stored.event.size();
            match result {
                Ok(()) => {
                    delivered.push((stored.seq, size));
                    *by_topic.entry(stored.event.topic.as_str()).or_default() += 1;
                }
                Err(e) => match classify(&e) {
                    ErrorClass::DeadLetter(reason) => {
                        tracing::warn!(
                            seq = stored.seq,
                            uuid = %stored.event.uuid,
                            topic = %stored.event.topic,
                            reason,
                            error = %e,
                            "kafka rejected event for good; moved to dead letters"
                        );
                        self.metrics
                            .dead_lettered
                            .get_or_create(&ReasonLabel {
                                reason: reason.to_owned(),
                            })
                            .inc();
                        dead.push((stored.seq, size, format!("{reason}: {e}")));
                    }
                    ErrorClass::Retry => retry += 1,
                    ErrorClass::Fatal => {
                        retry += 1;
                        fatal = true;
                    }
                },
            }
        }
        if !dead.is_empty()
            && let Some(dlq) = &self.cfg.dead_letter_topic
        {
            self.send_to_dlq(dlq, batch, &dead).await;
        }
        self.settle(delivered, dead).await?;
        for (topic, n) in by_topic {
            self.metrics
                .delivered
                .get_or_create(&TopicLabel {
                    topic: topic.to_owned(),
                })
                .inc_by(n);
        }
        Ok((retry, fatal))
    }

    /// Records what Kafka took, retrying a few times (releasing the disk
    /// reserve) before giving up: the caller then backs off and sends the
    /// batch again, so events reach Kafka even while the disk stays full, at
    /// the price of duplicates (same `holdfast-uuid`).
    async fn settle(
        &self,
        delivered: Vec<(i64, u64)>,
        dead: Vec<(i64, u64, String)>,
    ) -> Result<()> {
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.writer.settle(delivered.clone(), dead.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::error!(error = %e, events = delivered.len() + dead.len(), attempt, "could not record delivered events");
                    if let Some(freed) = buffer::release_reserve(&self.dir) {
                        tracing::warn!(
                            bytes = freed,
                            "released the disk reserve so delivered events can be deleted"
                        );
                    }
                    if attempt >= 3 {
                        return Err(e.into());
                    }
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
    }

    /// Best effort: the dead letters table keeps the event whatever happens here.
    async fn send_to_dlq(&self, dlq: &str, batch: &[StoredEvent], dead: &[(i64, u64, String)]) {
        for (seq, _, reason) in dead {
            let Some(stored) = batch.iter().find(|s| s.seq == *seq) else {
                continue;
            };
            let e = &stored.event;
            let record = FutureRecord::to(dlq)
                .key(&e.key)
                .payload(&e.payload)
                .headers(
                    headers(e)
                        .insert(Header {
                            key: REASON_HEADER,
                            value: Some(reason.as_bytes()),
                        })
                        .insert(Header {
                            key: ORIGINAL_TOPIC_HEADER,
                            value: Some(e.topic.as_bytes()),
                        }),
                );
            if let Err((error, _)) = self.producer.send(record, Duration::from_secs(5)).await {
                tracing::warn!(seq, dlq, error = %error, "could not copy dead letter to the dead-letter topic");
            }
        }
    }
}

/// Waits until the buffer is empty or the deadline passes; returns what remains.
pub async fn wait_empty(writer: &WriterHandle, deadline: tokio::time::Instant) -> u64 {
    loop {
        let n = writer.state.events.load(Ordering::Relaxed);
        if n == 0 || tokio::time::Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Flushes librdkafka's queue (used before exit).
pub fn flush_producer(producer: &KafkaProducer, timeout: Duration) {
    let _ = producer.flush(timeout);
}
