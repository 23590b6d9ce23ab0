//! After an aborted transaction: what each failed event of the batch comes
//! to (sent alone, dead-lettered, or waiting for its refused topic).

use rdkafka::error::KafkaError;
use tokio::time::{Duration, Instant};

use super::super::classify::dead_letter;
use super::super::{ErrorClass, Result, classify};
use super::{ExactlyOnce, Outcome, SOLO_ROUNDS};
use crate::buffer::StoredEvent;
use crate::metrics::ReasonLabel;

impl ExactlyOnce {
    /// After an aborted transaction: too-large events are retried alone,
    /// poison is moved to dead letters, refused topics wait out their window.
    pub(super) async fn judge(
        &mut self,
        batch: &[StoredEvent],
        failures: Vec<(usize, KafkaError)>,
    ) -> Result<Outcome> {
        let now = Instant::now();
        let mut dead = Vec::new();
        let mut reasons = Vec::new();
        let mut parked_any = false;
        for (i, error) in failures {
            let stored = &batch[i];
            let reason = match classify(&error) {
                // Kafka judges size per record batch: only an event that
                // fails alone is poison.
                ErrorClass::DeadLetter("too_large") if batch.len() > 1 => {
                    self.solo = SOLO_ROUNDS;
                    continue;
                }
                ErrorClass::DeadLetter(reason) => reason,
                ErrorClass::TopicRefused(reason) => {
                    let since = *self
                        .refused_since
                        .entry(stored.event.topic.to_string())
                        .or_insert(now);
                    let refused_for = now.duration_since(since);
                    if refused_for < self.cfg.poison_retry_window {
                        let wait = (refused_for / 2)
                            .clamp(Duration::from_millis(500), Duration::from_secs(30));
                        if self
                            .parked
                            .insert(stored.event.topic.to_string(), now + wait)
                            .is_none()
                        {
                            tracing::warn!(topic = %stored.event.topic, reason, error = %error, refused_for_s = refused_for.as_secs(), "kafka refused the topic; its events wait for it, events ahead of them flow");
                        }
                        parked_any = true;
                        continue;
                    }
                    reason
                }
                ErrorClass::Retry | ErrorClass::Fatal => continue,
            };
            dead.push(dead_letter(stored, reason, &error));
            reasons.push(reason);
        }
        if dead.is_empty() {
            return Ok(if self.solo == SOLO_ROUNDS || parked_any {
                Outcome::Progress
            } else {
                Outcome::Retry
            });
        }
        self.writer.settle(Vec::new(), dead).await?;
        self.solo = 0;
        for reason in reasons {
            self.metrics
                .dead_lettered
                .get_or_create(&ReasonLabel {
                    reason: reason.to_owned(),
                })
                .inc();
        }
        Ok(Outcome::Progress)
    }
}
