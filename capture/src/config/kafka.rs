//! Kafka settings shared by `serve` and `flush`, and the checks that keep
//! them from weakening the delivery guarantee (`acks=all`, idempotence).

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Args;

use super::{Error, Result};

/// Kafka connection settings shared by `serve` and `flush`.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (host:port,...).
    #[arg(long, env = "HOLDFAST_KAFKA_BOOTSTRAP")]
    pub kafka_bootstrap: String,
    /// Extra librdkafka producer property, `key=value` (repeatable; TLS/SASL settings go here).
    /// In the environment: several separated by newlines.
    #[arg(
        long = "kafka-property",
        env = "HOLDFAST_KAFKA_PROPERTIES",
        value_delimiter = '\n'
    )]
    pub kafka_properties: Vec<String>,
    /// Topic that also receives events Kafka rejected for good, with reason headers.
    #[arg(long, env = "HOLDFAST_DEAD_LETTER_TOPIC")]
    pub dead_letter_topic: Option<String>,
    /// Events read from the buffer per Kafka batch.
    #[arg(long, env = "HOLDFAST_FORWARD_BATCH_EVENTS", default_value_t = 5000)]
    pub forward_batch_events: usize,
    /// Bytes read from the buffer per Kafka batch (at least one event is always read).
    #[arg(long, env = "HOLDFAST_FORWARD_BATCH_BYTES", default_value_t = 16 << 20)]
    pub forward_batch_bytes: u64,
    /// How long an event whose topic is unknown or not authorised is retried
    /// before it is judged poison (a topic created late, an ACL propagating).
    #[arg(long, env = "HOLDFAST_POISON_RETRY_WINDOW_SECS", default_value_t = 300)]
    pub poison_retry_window_secs: u64,
    /// How long librdkafka may try one message before it is reported failed (ms).
    #[arg(
        long,
        env = "HOLDFAST_KAFKA_MESSAGE_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub kafka_message_timeout_ms: u64,
    /// at-least-once (default): an event may reach Kafka twice after a crash.
    /// exactly-once: each batch is one Kafka transaction with a checkpoint of
    /// the buffer's sequence; consumers must read with
    /// `isolation.level=read_committed`.
    #[arg(long, env = "HOLDFAST_DELIVERY", value_enum, default_value_t = Delivery::AtLeastOnce)]
    pub delivery: Delivery,
    /// Compacted topic holding each volume's last delivered sequence
    /// (exactly-once); created if missing.
    #[arg(
        long,
        env = "HOLDFAST_CHECKPOINT_TOPIC",
        default_value = "holdfast.checkpoints"
    )]
    pub checkpoint_topic: String,
    /// Events per Kafka transaction at most (exactly-once; also bounded by
    /// `--forward-batch-bytes`). Each commit costs a round of markers, so
    /// fewer, larger transactions drain faster.
    #[arg(
        long,
        env = "HOLDFAST_TRANSACTION_EVENTS",
        default_value_t = DEFAULT_TRANSACTION_EVENTS
    )]
    pub transaction_events: usize,
}

/// Default `--transaction-events`: on a 3.9-million-event buffer, 25,000
/// drained exactly-once in 18 to 19 s against 29 to 30 s with 5,000 and 21 s
/// with 50,000; at-least-once took 17 to 21 s (alternating release runs,
/// README "Performance").
pub const DEFAULT_TRANSACTION_EVENTS: usize = 25_000;

/// Delivery guarantee from the buffer to Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Delivery {
    /// Idempotent producer; a crash may resend what was in flight.
    AtLeastOnce,
    /// Transactional producer with a checkpoint per batch.
    ExactlyOnce,
}

/// Validated Kafka settings.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Bootstrap servers.
    pub bootstrap: String,
    /// Extra librdkafka properties, applied last (so they win).
    pub properties: BTreeMap<String, String>,
    /// Dead-letter topic, if any.
    pub dead_letter_topic: Option<String>,
    /// Events per forward batch.
    pub batch_events: usize,
    /// Bytes per forward batch.
    pub batch_bytes: u64,
    /// Retry window for topic-level errors before dead-lettering.
    pub poison_retry_window: Duration,
    /// librdkafka `message.timeout.ms`.
    pub message_timeout: Duration,
    /// At-least-once or exactly-once.
    pub delivery: Delivery,
    /// Checkpoint topic (exactly-once).
    pub checkpoint_topic: String,
    /// Events per Kafka transaction at most (exactly-once).
    pub transaction_events: usize,
    /// At-least-once: most events sent to Kafka and not yet acknowledged, and
    /// most acknowledged and waiting for their settlement. With one
    /// settlement of as many committing, three times this bounds what a
    /// SIGKILL can make a later drainer send twice.
    pub in_flight_events: usize,
}

/// `serve`'s in-flight window: a killed pod's drainer resends at most 3,000
/// events (`e2e/tests/capture_sigkill.rs` measures ~1,000 per kill).
pub const SERVE_IN_FLIGHT_EVENTS: usize = 1000;
/// `flush`'s in-flight window: a drain is bound by the round trip of a
/// window (send, Kafka's acknowledgement, the settlement's commit), so a
/// window five times larger drains 1.1 to 2.2 times as fast (alternating
/// release runs, README); a killed flush resends at most 15,000 events
/// (`e2e/tests/capture_flush_kill.rs`).
pub const FLUSH_IN_FLIGHT_EVENTS: usize = 5000;

impl KafkaArgs {
    /// Validates into [`KafkaConfig`].
    pub fn validate(&self) -> Result<KafkaConfig> {
        let mut properties = BTreeMap::new();
        for value in self
            .kafka_properties
            .iter()
            .filter(|v| !v.trim().is_empty())
        {
            let (k, v) = value
                .split_once('=')
                .filter(|(k, _)| !k.trim().is_empty())
                .ok_or_else(|| Error::KafkaProperty {
                    value: value.clone(),
                })?;
            properties.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        for (key, value) in &properties {
            check_property(key, value)?;
        }
        if self.forward_batch_bytes == 0 {
            return Err(Error::Range {
                flag: "--forward-batch-bytes",
                expected: "at least 1",
                value: 0,
            });
        }
        if self.forward_batch_events == 0 {
            return Err(Error::Range {
                flag: "--forward-batch-events",
                expected: "at least 1",
                value: 0,
            });
        }
        if self.transaction_events == 0 {
            return Err(Error::Range {
                flag: "--transaction-events",
                expected: "at least 1",
                value: 0,
            });
        }
        Ok(KafkaConfig {
            bootstrap: self.kafka_bootstrap.clone(),
            properties,
            dead_letter_topic: self.dead_letter_topic.clone().filter(|t| !t.is_empty()),
            batch_events: self.forward_batch_events,
            batch_bytes: self.forward_batch_bytes,
            poison_retry_window: Duration::from_secs(self.poison_retry_window_secs),
            message_timeout: Duration::from_millis(self.kafka_message_timeout_ms),
            delivery: self.delivery,
            checkpoint_topic: self.checkpoint_topic.clone(),
            transaction_events: self.transaction_events,
            in_flight_events: SERVE_IN_FLIGHT_EVENTS,
        })
    }
}

/// librdkafka's default `message.max.bytes`.
pub const LIBRDKAFKA_MESSAGE_MAX_BYTES: u64 = 1_000_000;
/// Room a record needs beyond the event itself: the Holdfast headers
/// (uuid, capture time), the record and batch framing.
pub const RECORD_OVERHEAD_BYTES: u64 = 1024;

impl KafkaConfig {
    /// The largest record the producer will send (`message.max.bytes`).
    pub fn message_max_bytes(&self) -> u64 {
        self.properties
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(LIBRDKAFKA_MESSAGE_MAX_BYTES)
    }
}

/// Refuses producer properties that would weaken `acks=all` or idempotence,
/// or that Holdfast sets itself.
fn check_property(key: &str, value: &str) -> Result<()> {
    let v = value.trim().to_ascii_lowercase();
    let why = match key {
        "acks" | "request.required.acks" | "request.acks" if v != "all" && v != "-1" => {
            Some("a 200 is only final once every in-sync replica has the event; acks must stay all")
        }
        "enable.idempotence" if v != "true" => Some(
            "the idempotent producer keeps retries from duplicating or reordering events; it must stay on",
        ),
        "max.in.flight.requests.per.connection" | "max.in.flight"
            if v.parse::<u64>().map_or(true, |n| n > 5) =>
        {
            Some("the idempotent producer allows at most 5 requests in flight")
        }
        "retries" | "message.send.max.retries" if v == "0" => {
            Some("without retries a broker blip fails events that would have been delivered")
        }
        "transactional.id" => Some("Holdfast derives transactional ids itself"),
        "enable.gapless.guarantee" if v == "false" => None,
        _ => None,
    };
    match why {
        Some(why) => Err(Error::UnsafeProperty {
            key: key.to_owned(),
            value: value.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}
