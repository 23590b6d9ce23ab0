//! What each event that failed its batch becomes: sent again alone (too
//! large: Kafka judges size per record batch), parked (its topic refused),
//! a dead letter, or left buffered for the next round.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::sync::watch;
use tokio::time::Instant;

use super::super::classify::dead_letter;
use super::super::stall::{self, stall_bound};
use super::super::{ErrorClass, Result, classify, send_all};
use super::{Forwarder, PARK_MAX_DELAY, Parked, Round};
use crate::buffer::{DeadLetter, StoredEvent};
use crate::metrics::ReasonLabel;

impl Forwarder {
    /// Decides what each failed event becomes: retried alone (too large),
    /// parked (topic refused), dead letter, or left for the next round.
    pub(super) async fn judge_failures(
        &mut self,
        batch: &[StoredEvent],
        failures: Vec<(usize, KafkaError)>,
        delivered_idx: &[usize],
        stop: &watch::Receiver<bool>,
    ) -> Result<Round> {
        let mut delivered = delivered_idx.len();
        let producer = self.producer.get();
        let mut lone_delivered = Vec::new();
        let mut dead = Vec::new();
        let mut dead_reasons: Vec<&'static str> = Vec::new();
        let mut round = Round::default();
        let mut broker_failures = 0;
        let mut timed_out = 0;
        let now = Instant::now();
        let mut refused_topics: HashMap<String, &'static str> = HashMap::new();
        for (i, mut error) in failures {
            let stored = &batch[i];
            // Kafka judges size per record batch, so one oversized event fails
            // the innocent events batched with it: only an event rejected on
            // its own is poison.
            if classify(&error) == ErrorClass::DeadLetter("too_large") {
                // Bounded like the batch: a stalled producer must not hold it.
                let event = [&stored.event];
                let bound = stall::message_timeout(&self.cfg).map_or(Duration::MAX, stall_bound);
                let alone = tokio::time::timeout(bound, send_all(&producer, &event));
                match alone.await.map(|mut results| results.pop()) {
                    Ok(Some(Ok(()))) => {
                        lone_delivered.push(i);
                        continue;
                    }
                    Ok(Some(Err(e))) => error = e,
                    Ok(None) => error = KafkaError::Canceled,
                    Err(_elapsed) => {
                        error = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)
                    }
                }
            }
            match classify(&error) {
                ErrorClass::DeadLetter(reason) => {
                    dead.push(dead_letter(stored, reason, &error));
                    dead_reasons.push(reason);
                }
                ErrorClass::TopicRefused(reason) => {
                    let parked = self.parked.get(&*stored.event.topic).copied();
                    let window_over = parked.is_some_and(|p| {
                        now.duration_since(p.since) >= self.cfg.poison_retry_window
                    });
                    if window_over {
                        dead.push(DeadLetter {
                            seq: stored.seq,
                            size: stored.event.size(),
                            reason: format!(
                                "{reason}: {error} (for more than {}s)",
                                self.cfg.poison_retry_window.as_secs()
                            ),
                        });
                        dead_reasons.push(reason);
                    } else {
                        refused_topics.insert(stored.event.topic.to_string(), reason);
                        round.retried += 1;
                    }
                }
                ErrorClass::Retry => {
                    if let KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut) = error
                    {
                        timed_out += 1;
                    }
                    broker_failures += 1;
                    round.retried += 1;
                }
                ErrorClass::Fatal => {
                    round.fatal = true;
                    round.retried += 1;
                }
            }
        }
        for (topic, reason) in refused_topics {
            let p = self.parked.entry(topic.clone()).or_insert(Parked {
                since: now,
                retry_at: now,
                delay: Duration::from_millis(500),
            });
            p.retry_at = now + p.delay;
            p.delay = (p.delay * 2).min(PARK_MAX_DELAY);
            tracing::warn!(%topic, reason, retry_in_ms = p.retry_at.duration_since(now).as_millis() as u64, refused_for_s = now.duration_since(p.since).as_secs(), "kafka refused the topic; other topics keep flowing");
        }
        // A topic that took an event is healthy again.
        if !self.parked.is_empty() {
            for i in delivered_idx {
                self.parked.remove(&*batch[*i].event.topic);
            }
        }
        delivered += lone_delivered.len();
        if !lone_delivered.is_empty() || !dead.is_empty() {
            let list = lone_delivered
                .iter()
                .map(|&i| (batch[i].seq, batch[i].event.size()))
                .collect();
            let committed = self.settler.settle(list, dead.clone(), stop).await;
            if committed {
                self.settler
                    .count_delivered(lone_delivered.iter().map(|&i| &batch[i]));
                for reason in dead_reasons {
                    self.metrics
                        .dead_lettered
                        .get_or_create(&ReasonLabel {
                            reason: reason.to_owned(),
                        })
                        .inc();
                }
            }
        }
        round.delivered = delivered;
        round.broker_down = round.retried > 0 && broker_failures == round.retried;
        round.all_timed_out = delivered == 0 && timed_out > 0 && timed_out == round.retried;
        Ok(round)
    }
}
