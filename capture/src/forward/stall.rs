//! The forwarder's stall watchdog. librdkafka promises a delivery report
//! (success or failure) for every message within `message.timeout.ms`. A
//! producer that stays silent for longer while deliveries are outstanding
//! is wedged (seen once after a short broker outage: an idempotent producer
//! that never reported again after some of its messages timed out, cf.
//! librdkafka's message-timeout drain and epoch bump, PR #3750), and would
//! hold the forwarder for good. The forwarder then replaces the producer and
//! sends the unsettled events again. Before going silent, such a producer
//! times out whole batches while the broker is back (reproduced in
//! `e2e/tests/capture_forwarder.rs`): a round in which every event timed out
//! while Kafka answers a metadata request also gets a fresh producer.
//!
//! Invariant: only a delivery report settles an event, and a replaced
//! producer's reports are never awaited again, so an event acknowledged by
//! Kafka is never lost and none is settled twice; events in flight at the
//! stall stay buffered and may reach Kafka twice (at-least-once).

use std::time::Duration;

use rdkafka::producer::Producer;
use tokio::time::Instant;

use super::{KafkaProducer, SharedProducer, create_producer};
use crate::config::KafkaConfig;

/// Silence allowed beyond the message timeout (half of it, at least this):
/// librdkafka scans for timed-out messages about once a second, and a
/// broker answering slowly is not a stall.
const MIN_MARGIN: Duration = Duration::from_secs(5);

/// How long deliveries may be outstanding without any report before the
/// producer is judged stalled.
pub(super) fn stall_bound(message_timeout: Duration) -> Duration {
    message_timeout + (message_timeout / 2).max(MIN_MARGIN)
}

/// The producer's `message.timeout.ms`: the flag, unless a property
/// (`message.timeout.ms` or its alias `delivery.timeout.ms`) overrides it;
/// `None` when that makes it infinite (0).
pub(super) fn message_timeout(cfg: &KafkaConfig) -> Option<Duration> {
    let property = ["message.timeout.ms", "delivery.timeout.ms"]
        .iter()
        .find_map(|k| cfg.properties.get(*k))
        .and_then(|v| v.parse::<u64>().ok());
    match property {
        Some(0) => None,
        Some(ms) => Some(Duration::from_millis(ms)),
        None => Some(cfg.message_timeout),
    }
}

/// Tracks when the producer last showed progress.
#[derive(Debug)]
pub(super) struct Watchdog {
    /// `None`: messages never time out, so silence proves nothing.
    bound: Option<Duration>,
    last_progress: Instant,
}

impl Watchdog {
    /// A watchdog for the producer `cfg` configures.
    pub(super) fn new(cfg: &KafkaConfig) -> Self {
        Self {
            bound: message_timeout(cfg).map(stall_bound),
            last_progress: Instant::now(),
        }
    }

    /// Whether silence can mean a stall at all.
    pub(super) fn armed(&self) -> bool {
        self.bound.is_some()
    }

    /// A delivery report arrived, or a delivery was sent while none was
    /// outstanding: the silence starts again from now.
    pub(super) fn progressed(&mut self) {
        self.last_progress = Instant::now();
    }

    /// When the producer counts as stalled if nothing happens before
    /// (far away when not [armed](Self::armed)).
    pub(super) fn deadline(&self) -> Instant {
        self.last_progress + self.bound.unwrap_or(Duration::from_secs(86_400))
    }

    /// How long the producer has been silent.
    pub(super) fn silent_for(&self) -> Duration {
        self.last_progress.elapsed()
    }
}

/// After a round in which Kafka took nothing and every event timed out:
/// when Kafka answers a metadata request, the producer, not the broker, is
/// at fault, and is replaced. Returns whether it was.
pub(super) async fn replace_if_kafka_answers(
    shared: &SharedProducer,
    suspect: KafkaProducer,
) -> bool {
    let probe = suspect.clone();
    let answers = tokio::task::spawn_blocking(move || {
        probe
            .client()
            .fetch_metadata(None, Duration::from_secs(5))
            .is_ok()
    })
    .await
    .unwrap_or(false);
    if answers {
        tracing::warn!("kafka answers but every event timed out; replacing the kafka producer");
        shared.replace_stalled(suspect);
    }
    answers
}

impl SharedProducer {
    /// Replaces `stalled` with a fresh producer (unless another caller
    /// already did) and drops it off the async threads: dropping a producer
    /// purges, flushes and joins its polling thread, which a wedged producer
    /// may hold up.
    pub(super) fn replace_stalled(&self, stalled: KafkaProducer) {
        let old = {
            let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
            if !std::ptr::eq(current.client().native_ptr(), stalled.client().native_ptr()) {
                None
            } else {
                match create_producer(&self.cfg, self.metrics.clone()) {
                    Ok(fresh) => {
                        self.metrics.producer_recreated.inc();
                        Some(std::mem::replace(&mut *current, fresh))
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "could not replace the stalled kafka producer");
                        None
                    }
                }
            }
        };
        tokio::task::spawn_blocking(move || {
            drop(old);
            drop(stalled);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_is_the_message_timeout_plus_a_margin() {
        assert_eq!(
            stall_bound(Duration::from_secs(30)),
            Duration::from_secs(45)
        );
        assert_eq!(stall_bound(Duration::from_secs(2)), Duration::from_secs(7));
    }

    fn config(properties: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            bootstrap: "127.0.0.1:9".into(),
            properties: properties
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            dead_letter_topic: None,
            batch_events: 100,
            batch_bytes: 1 << 20,
            poison_retry_window: Duration::from_secs(60),
            message_timeout: Duration::from_secs(2),
            delivery: crate::config::Delivery::AtLeastOnce,
            checkpoint_topic: "holdfast.checkpoints".into(),
            transaction_events: 25_000,
            in_flight_events: crate::config::SERVE_IN_FLIGHT_EVENTS,
        }
    }

    #[test]
    fn a_timeout_property_overrides_the_flag_and_zero_disarms() {
        assert_eq!(message_timeout(&config(&[])), Some(Duration::from_secs(2)));
        let longer = config(&[("delivery.timeout.ms", "300000")]);
        assert_eq!(message_timeout(&longer), Some(Duration::from_secs(300)));
        let infinite = config(&[("message.timeout.ms", "0")]);
        assert!(!Watchdog::new(&infinite).armed());
        assert!(Watchdog::new(&longer).armed());
    }

    #[test]
    fn progress_pushes_the_deadline_back() {
        let mut watchdog = Watchdog::new(&config(&[]));
        let first = watchdog.deadline();
        assert!(first > Instant::now() + Duration::from_secs(6));
        std::thread::sleep(Duration::from_millis(20));
        assert!(watchdog.silent_for() >= Duration::from_millis(20));
        watchdog.progressed();
        assert!(watchdog.deadline() >= first + Duration::from_millis(20));
        assert!(watchdog.silent_for() < Duration::from_millis(20));
    }
}
