//! Kafka delivery: producer setup, the forwarder loop that drains the buffer,
//! the direct path for `direct` streams, and the one error classifier every
//! Kafka error goes through.
//!
//! Invariant kept here: an event leaves the buffer only after Kafka
//! acknowledged it (`acks=all`, idempotent producer), or after Kafka rejected
//! it for good, in which case it moves to dead letters in the same buffer
//! transaction that deletes it. Everything else stays and is retried with
//! backoff, so a broker outage only delays delivery.

mod checkpoint;
mod classify;
mod delivery;
mod dlq;
mod exactly_once;
mod forwarder;
mod stall;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

pub use classify::{ErrorClass, classify};
use delivery::Route;
pub use exactly_once::{ExactlyOnce, transactional_id};
pub use forwarder::{Forwarder, RunUntil};

use crate::buffer::{self, NewEvent, WriterHandle};
use crate::config::KafkaConfig;
use crate::metrics::Metrics;

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
    /// Exactly-once delivery: a newer drainer of this volume (same
    /// transactional id) fenced this process, or its producer hit a fatal error.
    #[error("fenced: a newer drainer of this volume took over ({0})")]
    Fenced(String),
    /// A direct send failed; `index` is the event's position in its request,
    /// `delivered` how many events of the request Kafka did take.
    #[error(
        "event {index}: kafka rejected it: {reason} ({delivered} events of the request delivered)"
    )]
    Direct {
        index: usize,
        reason: String,
        class: ErrorClass,
        delivered: usize,
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

/// The producer used by the forwarder and direct streams; its polling
/// thread hands each delivery report to the event's [`Route`].
pub type KafkaProducer = ThreadedProducer<KafkaContext>;

/// Producer properties: safe defaults first, the user's properties last (they win).
pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        // Keys land where the Java client's default partitioner puts them
        // (librdkafka's own default hashes with CRC32), so an event shares
        // its partition, and its order, with other producers' records of the
        // same key. Murmur2 is also the cheaper hash of a 36-byte uuid key.
        .set("partitioner", "murmur2_random")
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

/// A producer that is replaced when it hits a fatal error; cheap to clone.
#[derive(Clone)]
pub struct SharedProducer {
    current: Arc<std::sync::RwLock<KafkaProducer>>,
    /// Shared: the HTTP state, and so this, is cloned for every request.
    cfg: Arc<KafkaConfig>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for SharedProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedProducer").finish_non_exhaustive()
    }
}

impl SharedProducer {
    /// Creates the first producer.
    pub fn new(cfg: &KafkaConfig, metrics: Arc<Metrics>) -> Result<Self> {
        let producer = create_producer(cfg, metrics.clone())?;
        Ok(Self {
            current: Arc::new(std::sync::RwLock::new(producer)),
            cfg: Arc::new(cfg.clone()),
            metrics,
        })
    }

    /// The producer to use now.
    pub fn get(&self) -> KafkaProducer {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces `broken` (unless another caller already did).
    pub fn replace_broken(&self, broken: &KafkaProducer) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if !std::ptr::eq(current.client().native_ptr(), broken.client().native_ptr()) {
            return;
        }
        match create_producer(&self.cfg, self.metrics.clone()) {
            Ok(p) => {
                tracing::error!("kafka producer hit a fatal error; replaced it");
                self.metrics.producer_recreated.inc();
                *current = p;
            }
            Err(e) => tracing::error!(error = %e, "could not replace the broken kafka producer"),
        }
    }
}

fn headers(event: &NewEvent) -> OwnedHeaders {
    let mut digits = [0; 20];
    let captured_at = itoa(&mut digits, event.captured_at_ms);
    OwnedHeaders::new_with_capacity(2)
        .insert(Header {
            key: UUID_HEADER,
            value: Some(event.uuid.as_bytes()),
        })
        .insert(Header {
            key: CAPTURED_AT_HEADER,
            value: Some(captured_at),
        })
}

/// `n` in decimal, written into `buf` (no allocation per event).
fn itoa(buf: &mut [u8; 20], n: i64) -> &[u8] {
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // 20 bytes hold any i64 ("-9223372036854775808" is 20).
    let _ = write!(cursor, "{n}");
    let len = cursor.position() as usize;
    &buf[..len]
}

/// Enqueues one event, its report going to `route`; waits for queue space
/// when librdkafka's queue is full.
async fn enqueue(
    producer: &KafkaProducer,
    event: &NewEvent,
    route: Box<Route>,
) -> std::result::Result<(), KafkaError> {
    let mut route = route;
    loop {
        let record = BaseRecord::with_opaque_to(&event.topic, route)
            .key(&event.key)
            .payload(&event.payload)
            .headers(headers(event));
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record)) => {
                route = record.delivery_opaque;
                // Deliveries in flight free the queue; librdkafka polls on its own thread.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Enqueues one event whose outcome comes back on its own channel.
async fn enqueue_once(
    producer: &KafkaProducer,
    event: &NewEvent,
) -> std::result::Result<futures::channel::oneshot::Receiver<delivery::Outcome>, KafkaError> {
    let (route, rx) = delivery::once();
    enqueue(producer, event, route).await.map(|()| rx)
}

/// Sends every event and waits for every delivery report. The result for
/// each event is `Ok(())` or the Kafka error it ended with.
pub async fn send_all(
    producer: &KafkaProducer,
    events: &[&NewEvent],
) -> Vec<std::result::Result<(), KafkaError>> {
    let mut pending = Vec::with_capacity(events.len());
    for event in events {
        pending.push(enqueue_once(producer, event).await);
    }
    let mut results = Vec::with_capacity(events.len());
    for p in pending {
        results.push(match p {
            Ok(rx) => delivery::outcome(rx).await,
            Err(e) => Err(e),
        });
    }
    results
}

/// Sends a `direct` stream's events; `Ok` only when Kafka acknowledged every one.
///
/// Kafka judges size per record batch, so an oversized event fails the
/// innocent events batched with it: each event that failed as too large is
/// sent again alone, and only one that fails alone is blamed.
///
/// A producer that hit a fatal error (an idempotent producer then accepts
/// nothing more) is replaced, so the next request gets a working one.
pub async fn send_direct(shared: &SharedProducer, events: &[NewEvent]) -> Result<()> {
    let producer = &shared.get();
    let refs: Vec<&NewEvent> = events.iter().collect();
    let mut results = send_all(producer, &refs).await;
    for (event, result) in events.iter().zip(results.iter_mut()) {
        if let Err(e) = result
            && classify(e) == ErrorClass::DeadLetter("too_large")
        {
            *result = send_all(producer, &[event])
                .await
                .pop()
                .unwrap_or(Err(KafkaError::Canceled));
        }
    }
    let delivered = results.iter().filter(|r| r.is_ok()).count();
    // Blame an event Kafka refuses for good before one that merely timed out.
    let worst = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e, classify(e))))
        .min_by_key(|(i, _, class)| (!matches!(class, ErrorClass::DeadLetter(_)), *i));
    if results
        .iter()
        .any(|r| matches!(r, Err(e) if classify(e) == ErrorClass::Fatal))
    {
        shared.replace_broken(producer);
    }
    match worst {
        None => Ok(()),
        Some((index, e, class)) => Err(Error::Direct {
            index,
            reason: e.to_string(),
            class,
            delivered,
        }),
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

#[cfg(test)]
mod tests {
    use super::itoa;

    #[test]
    fn itoa_writes_every_i64_as_to_string_does() {
        for n in [0, 7, -1, 1_765_000_000_123, i64::MAX, i64::MIN] {
            let mut buf = [0; 20];
            assert_eq!(itoa(&mut buf, n), n.to_string().as_bytes());
        }
    }
}
