//! Settlements: the commits that delete what Kafka acknowledged (and bury
//! what it refused for good), retried while the disk refuses them, and the
//! delivered count by topic once they committed.
//!
//! A settlement of acknowledged events runs as a task of its own that owns
//! what it needs, so the last one of a batch can commit while the next
//! batch is sent (see the forwarder's loop); whoever started it awaits it
//! before the forwarder reads from the head of the queue again or stops.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::buffer::{self, DeadLetter, StoredEvent, WriterHandle};
use crate::metrics::{Metrics, TopicLabel};

/// Failed settlement commits before a settlement is given up (and its
/// events left to be sent again).
const SETTLE_ATTEMPTS: u32 = 4;

/// A settlement running on its own task.
pub(super) type Settling = JoinHandle<()>;

/// Commits settlements for one forwarder; cheap to clone.
#[derive(Clone)]
pub(super) struct Settler {
    dir: PathBuf,
    writer: WriterHandle,
    metrics: Arc<Metrics>,
    /// Delivered events whose settlement was given up, since last taken.
    unsettled: Arc<AtomicUsize>,
}

impl Settler {
    pub fn new(dir: PathBuf, writer: WriterHandle, metrics: Arc<Metrics>) -> Self {
        Self {
            dir,
            writer,
            metrics,
            unsettled: Default::default(),
        }
    }

    /// Delivered events whose settlement was given up since the last call:
    /// they stay buffered and are sent again.
    pub fn take_unsettled(&self) -> usize {
        self.unsettled.swap(0, Ordering::Relaxed)
    }

    /// Starts settling the acknowledged events `indices` of `batch`: a task
    /// that owns what it needs, counts the events as delivered once
    /// committed, or as unsettled if the disk kept refusing.
    pub fn delivered(
        &self,
        indices: &[usize],
        batch: &[StoredEvent],
        stop: watch::Receiver<bool>,
    ) -> Settling {
        let list: Vec<(i64, u64)> = indices
            .iter()
            .map(|&i| (batch[i].seq, batch[i].event.size()))
            .collect();
        let topics = by_topic(indices.iter().map(|&i| &batch[i]));
        let this = self.clone();
        tokio::spawn(async move {
            if list.is_empty() {
                return;
            }
            let n = list.len();
            if this.settle(list, Vec::new(), &stop).await {
                this.count(topics);
            } else {
                this.unsettled.fetch_add(n, Ordering::Relaxed);
            }
        })
    }

    /// Counts settled deliveries in `holdfast_events_delivered_total`, by topic.
    pub fn count_delivered<'a>(&self, settled: impl Iterator<Item = &'a StoredEvent>) {
        self.count(by_topic(settled));
    }

    fn count(&self, topics: Vec<(String, u64)>) {
        for (topic, n) in topics {
            self.metrics
                .delivered
                .get_or_create(&TopicLabel { topic })
                .inc_by(n);
        }
    }

    pub fn release_reserve(&self) {
        if let Some(freed) = buffer::release_reserve(&self.dir) {
            tracing::warn!(
                bytes = freed,
                "released the disk reserve so delivered events can be deleted"
            );
        }
    }

    /// Records a settlement, retrying with backoff while the disk refuses it
    /// (releasing the disk reserve, and settling in ever smaller parts: on a
    /// full disk a delete of a few rows needs only a few WAL pages). Gives up
    /// after [`SETTLE_ATTEMPTS`] failures (or on stop): the events stay
    /// buffered and are sent again later, so delivery goes on even while the
    /// disk refuses every write (duplicates, never loss). Returns whether all
    /// of it committed.
    pub async fn settle(
        &self,
        delivered: Vec<(i64, u64)>,
        dead: Vec<DeadLetter>,
        stop: &watch::Receiver<bool>,
    ) -> bool {
        let mut rest = delivered;
        let mut dead = dead;
        let mut chunk = rest.len().max(1);
        let mut delay = Duration::from_millis(50);
        let mut failures = 0u32;
        while !rest.is_empty() || !dead.is_empty() {
            let take = rest.len().min(chunk);
            let part = rest[..take].to_vec();
            match self.writer.settle(part, dead.clone()).await {
                Ok(()) => {
                    rest.drain(..take);
                    dead.clear();
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::error!(error = %e, events = rest.len() + dead.len(), chunk, attempt = failures, "could not record delivered events; retrying in smaller parts");
                    }
                    self.release_reserve();
                    if failures >= SETTLE_ATTEMPTS || (*stop.borrow() && failures >= 2) {
                        return false;
                    }
                    chunk = (chunk / 4).max(1);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        true
    }
}

/// Events by topic. Few topics, and runs of one topic: a short list beats
/// hashing each event, and a topic's name is copied once.
fn by_topic<'a>(settled: impl Iterator<Item = &'a StoredEvent>) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for stored in settled {
        let topic = &*stored.event.topic;
        match out.iter_mut().find(|(t, _)| t == topic) {
            Some((_, n)) => *n += 1,
            None => out.push((topic.to_owned(), 1)),
        }
    }
    out
}
