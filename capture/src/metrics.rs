//! Prometheus metrics of a capture pod, all prefixed `holdfast_`. Buffer gauges
//! are read from the writer's live figures at scrape time, so they are never stale.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::buffer::writer::BufferState;

/// Label: stream name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    /// Stream name.
    pub stream: String,
}

/// Label: outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// What came of it.
    pub outcome: &'static str,
}

/// Label: reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: String,
}

/// Label: topic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabel {
    /// Kafka topic.
    pub topic: String,
}

/// Every metric of the capture pod.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Events acknowledged, by stream.
    pub accepted: Family<StreamLabel, Counter>,
    /// Requests rejected, by reason.
    pub rejected: Family<ReasonLabel, Counter>,
    /// Events Kafka acknowledged, by topic.
    pub delivered: Family<TopicLabel, Counter>,
    /// Events moved to dead letters, by reason.
    pub dead_lettered: Family<ReasonLabel, Counter>,
    /// Time from request received to response, successful requests.
    pub ack_latency: Histogram,
    /// Commands per buffer commit.
    pub commit_batch: Histogram,
    /// 1 while the last Kafka interaction succeeded.
    pub kafka_up: Gauge,
    /// Failed forward attempts (retried).
    pub forward_retries: Counter,
    /// Quarantined (damaged) buffer files and their salvage.
    pub salvage: SalvageMetrics,
    /// Dead letters the dead-letter topic acknowledged (then forgotten locally).
    pub dead_letters_copied: Counter,
    /// Kafka producers replaced (fatal error, all timed out, or stalled).
    pub producer_recreated: Counter,
    /// Exactly-once delivery: transactions by outcome (committed, aborted).
    pub transactions: Family<OutcomeLabel, Counter>,
    /// Exactly-once delivery: 1 once another process with this volume's
    /// transactional id fenced this one (it never sends again; unready).
    pub fenced: Gauge,
    /// Exactly-once delivery: buffered events past the last committed checkpoint.
    pub checkpoint_lag: Gauge,
    state: std::sync::OnceLock<Arc<BufferState>>,
    buffer_events: Gauge,
    buffer_bytes: Gauge,
    dead_letters: Gauge,
    dead_letter_bytes: Gauge,
    oldest_age: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("holdfast");
        let accepted = Family::<StreamLabel, Counter>::default();
        registry.register("events_accepted", "Events acknowledged", accepted.clone());
        let rejected = Family::<ReasonLabel, Counter>::default();
        registry.register("requests_rejected", "Requests rejected", rejected.clone());
        let delivered = Family::<TopicLabel, Counter>::default();
        registry.register(
            "events_delivered",
            "Events acknowledged by Kafka",
            delivered.clone(),
        );
        let dead_lettered = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "events_dead_lettered",
            "Events Kafka rejected for good",
            dead_lettered.clone(),
        );
        let ack_latency = Histogram::new([
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]);
        registry.register_with_unit(
            "ack_latency",
            "Time from request to acknowledgement",
            prometheus_client::registry::Unit::Seconds,
            ack_latency.clone(),
        );
        let commit_batch =
            Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 512.0, 4096.0]);
        registry.register(
            "buffer_commit_batch_commands",
            "Requests and settlements per buffer commit",
            commit_batch.clone(),
        );
        let kafka_up = Gauge::default();
        registry.register("kafka_up", "1 while Kafka answers", kafka_up.clone());
        let forward_retries = Counter::default();
        registry.register(
            "forward_retries",
            "Forward batches retried after a Kafka error",
            forward_retries.clone(),
        );
        let salvage = SalvageMetrics::register(&mut registry);
        let dead_letters_copied = Counter::default();
        registry.register(
            "dead_letters_copied",
            "Dead letters copied to the dead-letter topic",
            dead_letters_copied.clone(),
        );
        let producer_recreated = Counter::default();
        registry.register(
            "kafka_producer_recreated",
            "Kafka producers replaced: after a fatal error, a round in which every event timed out while Kafka answered, or a producer silent past its message timeout",
            producer_recreated.clone(),
        );
        let transactions = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "kafka_transactions",
            "Kafka transactions of exactly-once delivery, by outcome",
            transactions.clone(),
        );
        let fenced = Gauge::default();
        registry.register(
            "kafka_fenced",
            "1 once a newer drainer of this volume fenced this process",
            fenced.clone(),
        );
        let checkpoint_lag = Gauge::default();
        registry.register(
            "checkpoint_lag_events",
            "Buffered events past the last checkpoint committed to Kafka",
            checkpoint_lag.clone(),
        );
        let dead_letters = Gauge::default();
        registry.register(
            "buffer_dead_letters",
            "Dead letters kept in the buffer (not yet copied to the dead-letter topic)",
            dead_letters.clone(),
        );
        let dead_letter_bytes = Gauge::default();
        registry.register_with_unit(
            "buffer_dead_letter",
            "Bytes of dead letters kept in the buffer",
            prometheus_client::registry::Unit::Bytes,
            dead_letter_bytes.clone(),
        );
        let buffer_events = Gauge::default();
        registry.register(
            "buffer_events",
            "Events waiting in the buffer",
            buffer_events.clone(),
        );
        let buffer_bytes = Gauge::default();
        registry.register_with_unit(
            "buffer",
            "Bytes of events waiting in the buffer",
            prometheus_client::registry::Unit::Bytes,
            buffer_bytes.clone(),
        );
        let oldest_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            "buffer_oldest_event_age",
            "Age of the oldest buffered event",
            prometheus_client::registry::Unit::Seconds,
            oldest_age.clone(),
        );
        Self {
            registry,
            accepted,
            rejected,
            delivered,
            dead_lettered,
            ack_latency,
            commit_batch,
            kafka_up,
            forward_retries,
            salvage,
            dead_letters_copied,
            producer_recreated,
            transactions,
            fenced,
            checkpoint_lag,
            dead_letters,
            dead_letter_bytes,
            state: std::sync::OnceLock::new(),
            buffer_events,
            buffer_bytes,
            oldest_age,
        }
    }

    /// Connects the buffer's live figures.
    pub fn attach_buffer(&self, state: Arc<BufferState>) {
        let _ = self.state.set(state);
    }

    /// Counts a rejected request.
    pub fn reject(&self, reason: &str) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        if let Some(state) = self.state.get() {
            self.buffer_events
                .set(state.events.load(Ordering::Relaxed) as i64);
            self.buffer_bytes
                .set(state.bytes.load(Ordering::Relaxed) as i64);
            self.dead_letters
                .set(state.dead_letters.load(Ordering::Relaxed) as i64);
            self.dead_letter_bytes
                .set(state.dead_bytes.load(Ordering::Relaxed) as i64);
            let oldest = state.oldest_ms.load(Ordering::Relaxed);
            let age = if oldest == 0 {
                0.0
            } else {
                ((crate::buffer::now_ms() - oldest).max(0) as f64) / 1000.0
            };
            self.oldest_age.set(age);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Quarantined (damaged) buffer files and what their salvage recovered.
#[derive(Debug, Clone, Default)]
pub struct SalvageMetrics {
    /// Quarantined buffer files not salvaged yet (the volume is not clean).
    pub quarantined_files: Gauge,
    /// Events read out of quarantined files back into the buffer.
    pub salvaged: Counter,
    /// Rows of quarantined files that could not be read.
    pub unreadable: Counter,
}

impl SalvageMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "buffer_quarantined_files",
            "Damaged buffer files moved aside and not salvaged yet",
            m.quarantined_files.clone(),
        );
        registry.register(
            "buffer_salvaged_events",
            "Events salvaged from quarantined buffer files",
            m.salvaged.clone(),
        );
        registry.register(
            "buffer_unreadable_events",
            "Rows of quarantined buffer files that could not be read",
            m.unreadable.clone(),
        );
        m
    }

    /// Observer for [`crate::buffer::salvage`]: keeps these figures current.
    pub fn observer(&self) -> crate::buffer::salvage::SalvageObserver {
        let m = self.clone();
        Box::new(move |waiting, report| {
            m.quarantined_files.set(waiting as i64);
            if let Some(r) = report {
                m.salvaged.inc_by(r.events + r.dead_letters);
                m.unreadable.inc_by(r.unreadable);
            }
        })
    }
}
