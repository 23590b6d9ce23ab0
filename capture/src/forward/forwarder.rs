//! The forwarder loop: reads the oldest events in bounded batches, produces
//! them, and settles what Kafka acknowledged as the delivery reports arrive
//! (every few milliseconds), so a crash resends at most what was in flight in
//! the last moments rather than a whole batch.
//!
//! Topic-level refusals (unknown topic, not authorised) can be transient (a
//! topic created late, an ACL still propagating): such a topic is parked and
//! retried with backoff while other topics flow; only when it keeps failing
//! for `--poison-retry-window-secs` are its events judged poison.
//!
//! Deliveries never wait on a producer for good: one silent past the
//! message timeout, or timing out every event while Kafka answers, is
//! replaced (see `stall.rs`) and the unconfirmed events are sent again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;
use rusqlite::Connection;
use tokio::sync::watch;
use tokio::time::Instant;

use super::dlq::DlqCopier;

mod acks;
mod judge;
mod settler;
use super::delivery::{Reports, Route};
use super::stall::{self, Watchdog};
use super::{Result, SharedProducer, enqueue};
use crate::buffer::{self, StoredEvent, WriterHandle};
use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use acks::Acks;
use settler::{Settler, Settling};

/// How often an idle forwarder checks that Kafka answers.
const KAFKA_PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// Delivered events are settled at least this often while a batch is in
/// flight, or as soon as the in-flight window's worth are waiting
/// ([`KafkaConfig::in_flight_events`]).
const SETTLE_INTERVAL: Duration = Duration::from_millis(5);
/// On stop, deliveries in flight get this long to be acknowledged and settled.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Longest pause between retries of a parked topic.
const PARK_MAX_DELAY: Duration = Duration::from_secs(30);

/// The next batch, being read while the current one is delivered.
type ReadAhead = tokio::task::JoinHandle<buffer::Result<Vec<StoredEvent>>>;

/// When the forwarder stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunUntil {
    /// Until told to stop (serve).
    Stopped,
    /// Until nothing is left to deliver, or told to stop (flush).
    Empty,
}

/// A topic Kafka refused as a whole; retried until the poison window passes.
#[derive(Debug, Clone, Copy)]
struct Parked {
    since: Instant,
    retry_at: Instant,
    delay: Duration,
}

/// What one batch came to.
#[derive(Debug, Default)]
struct Round {
    delivered: usize,
    /// Events left for a later attempt, and whether every one of them failed
    /// on the broker side (so Kafka looks down).
    retried: usize,
    broker_down: bool,
    fatal: bool,
    /// Nothing delivered and every failure a message timeout.
    all_timed_out: bool,
}

/// Drains the buffer into Kafka, oldest first.
pub struct Forwarder {
    reader: Arc<std::sync::Mutex<Connection>>,
    writer: WriterHandle,
    producer: SharedProducer,
    cfg: KafkaConfig,
    metrics: Arc<Metrics>,
    parked: HashMap<String, Parked>,
    settler: Settler,
    /// Copies to the dead-letter topic run beside the main queue, so a
    /// missing or refusing dead-letter topic never holds up delivery.
    dlq: DlqCopier,
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
        producer: SharedProducer,
        cfg: KafkaConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        Ok(Self {
            reader: Arc::new(std::sync::Mutex::new(buffer::open_reader(dir)?)),
            settler: Settler::new(dir.to_owned(), writer.clone(), metrics.clone()),
            writer,
            producer,
            cfg,
            metrics,
            parked: HashMap::new(),
            dlq: DlqCopier::default(),
        })
    }

    /// Reads the oldest events past `after` (0: from the head), at most a
    /// batch of them and at most `max_bytes`, skipping parked topics.
    fn spawn_read(
        &self,
        after: i64,
        max_bytes: u64,
    ) -> tokio::task::JoinHandle<buffer::Result<Vec<StoredEvent>>> {
        let reader = self.reader.clone();
        let now = Instant::now();
        let exclude: Vec<String> = self
            .parked
            .iter()
            .filter(|(_, p)| p.retry_at > now)
            .map(|(t, _)| t.clone())
            .collect();
        let limit = self.cfg.batch_events;
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            let exclude: Vec<&str> = exclude.iter().map(String::as_str).collect();
            buffer::read_batch_bounded(&conn, after, limit, max_bytes, &exclude)
        })
    }

    async fn read(&self) -> Result<Vec<StoredEvent>> {
        self.spawn_read(0, self.cfg.batch_bytes)
            .await
            .map_err(|_| buffer::Error::WriterStopped)?
            .map_err(Into::into)
    }

    /// Starts reading the batch after `batch` while `batch` is delivered,
    /// within what is left of the batch byte bound (so both together hold
    /// no more than one batch may, and at most one event more: a read always
    /// returns one). Used only if `batch` goes through cleanly, when the rows
    /// past it are the head of the queue. Not while a topic is parked: its
    /// events before the cursor would be passed over once its retry time
    /// comes, and its newer events sent before them.
    fn read_ahead(&self, batch: &[StoredEvent]) -> Option<ReadAhead> {
        if !self.parked.is_empty() {
            return None;
        }
        let bytes: u64 = batch.iter().map(|s| s.event.size()).sum();
        let left = self.cfg.batch_bytes.checked_sub(bytes).filter(|&b| b > 0)?;
        Some(self.spawn_read(batch.last()?.seq, left))
    }

    /// The batch read ahead, if it was read and holds events.
    async fn take_ahead(ahead: Option<ReadAhead>) -> Option<Vec<StoredEvent>> {
        match ahead?.await {
            Ok(Ok(batch)) if !batch.is_empty() => Some(batch),
            // Nothing past the last batch, or a failed read: read from the head.
            _ => None,
        }
    }

    /// Starts a pass copying dead letters (see [`DlqCopier`]).
    fn copy_dead_letters_in_background(&mut self) {
        self.dlq.poll(
            &self.cfg,
            &self.producer,
            &self.writer,
            &self.reader,
            &self.metrics,
        );
    }

    /// Nothing left that this forwarder could still deliver.
    fn drained(&self) -> bool {
        let s = &self.writer.state;
        s.events.load(Ordering::Relaxed) == 0
            && (self.cfg.dead_letter_topic.is_none() || s.dead_letters.load(Ordering::Relaxed) == 0)
    }

    /// Runs until `stop` turns true (settling what is in flight), or, with
    /// [`RunUntil::Empty`], until nothing is left to deliver.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>, until: RunUntil) -> Result<()> {
        let backoff_builder = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times();
        let mut backoff = backoff_builder.build();
        let mut last_probe: Option<Instant> = None;
        let mut ahead: Option<ReadAhead> = None;
        // The last settlement of the batch before, still committing while
        // the next batch (read ahead) is sent.
        let mut pending: Option<Settling> = None;
        loop {
            if *stop.borrow() {
                if let Some(last) = pending.take() {
                    let _ = last.await;
                }
                return Ok(());
            }
            self.copy_dead_letters_in_background();
            let read = match Self::take_ahead(ahead.take()).await {
                Some(batch) => Ok(batch),
                None => {
                    // A read from the head must not find rows a settlement
                    // is still deleting: they would be sent twice.
                    if let Some(last) = pending.take() {
                        let _ = last.await;
                    }
                    self.read().await
                }
            };
            let outcome = match read {
                Err(e) => Err(e),
                Ok(batch) if batch.is_empty() => {
                    if until == RunUntil::Empty && self.drained() {
                        return Ok(());
                    }
                    self.idle(&mut stop, &mut last_probe).await;
                    continue;
                }
                Ok(batch) => {
                    ahead = self.read_ahead(&batch);
                    let round = self.forward(&batch, pending.take(), &mut stop).await.map(
                        |(round, last)| {
                            pending = last;
                            round
                        },
                    );
                    if !matches!(&round, Ok(r) if r.retried == 0) {
                        // Rows of this batch stay buffered before the ones read ahead.
                        ahead = None;
                    }
                    round
                }
            };
            let delay = match outcome {
                Ok(round) if round.retried == 0 => {
                    if round.delivered > 0 {
                        self.metrics.kafka_up.set(1);
                    }
                    backoff = backoff_builder.build();
                    continue;
                }
                Ok(round) => {
                    if round.fatal {
                        self.producer.replace_broken(&self.producer.get());
                    }
                    if round.delivered > 0 {
                        self.metrics.kafka_up.set(1);
                    } else if round.broker_down {
                        self.metrics.kafka_up.set(0);
                    }
                    self.metrics.forward_retries.inc();
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(
                        events = round.retried,
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
                    self.release_reserve();
                    delay
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Nothing to read now: probe Kafka now and then, and wait for new events,
    /// a parked topic's retry time, or stop.
    async fn idle(&self, stop: &mut watch::Receiver<bool>, last_probe: &mut Option<Instant>) {
        // Ask Kafka for metadata now and then, so `kafka_up` tells the truth
        // about a pod that has nothing to send.
        if last_probe.is_none_or(|t| t.elapsed() >= KAFKA_PROBE_INTERVAL) {
            *last_probe = Some(Instant::now());
            let producer = self.producer.get();
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
        let next_retry = self
            .parked
            .values()
            .map(|p| p.retry_at)
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_millis(500))
            .min(Instant::now() + Duration::from_millis(500));
        tokio::select! {
            _ = self.writer.appended.notified() => {}
            _ = tokio::time::sleep_until(next_retry) => {}
            _ = stop.changed() => {}
        }
    }

    fn release_reserve(&self) {
        self.settler.release_reserve();
    }

    /// Forwards one batch, settling deliveries as they are acknowledged.
    /// `carried` is the last settlement of the batch before, still
    /// committing. When this batch goes through cleanly its own last
    /// settlement is handed back still committing, so the next batch is sent
    /// meanwhile; otherwise every settlement has finished on return.
    async fn forward(
        &mut self,
        batch: &[StoredEvent],
        carried: Option<Settling>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(Round, Option<Settling>)> {
        let producer = self.producer.get();
        let mut failures: Vec<(usize, KafkaError)> = Vec::new();
        // This batch's delivery reports, and how many are still to come.
        let reports = Arc::new(Reports::default());
        let mut in_flight = 0usize;
        let mut stop_deadline: Option<Instant> = None;
        let mut next = 0;
        // Sent, acknowledged, handed to a settlement.
        let mut acks = Acks::new(batch.len());
        let mut delivered_total: Vec<usize> = Vec::new();
        let mut watchdog = Watchdog::new(&self.cfg);
        let mut stalled = false;
        let window = self.cfg.in_flight_events.max(1);
        let mut tick = tokio::time::interval(SETTLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One settlement commits while the next deliveries are sent and
        // acknowledged (the first may be the batch before's last).
        let mut settling: Option<Settling> = carried;
        loop {
            // At most a window of events sent and not yet acknowledged, a
            // window acknowledged and waiting, and one settlement committing:
            // all a kill can make a later drainer send twice.
            while next < batch.len()
                && stop_deadline.is_none()
                && in_flight < window
                && acks.waiting() < window
            {
                if *stop.borrow() {
                    // Not sent: these stay in the buffer for the next drainer.
                    stop_deadline = Some(Instant::now() + STOP_GRACE);
                    break;
                }
                let route = Box::new(Route::Batch(reports.clone(), next));
                match enqueue(&producer, &batch[next].event, route).await {
                    Ok(()) => {
                        if in_flight == 0 {
                            watchdog.progressed();
                        }
                        acks.sent(next);
                        in_flight += 1;
                    }
                    Err(e) => failures.push((next, e)),
                }
                next += 1;
            }
            let sent_all = next >= batch.len() || stop_deadline.is_some();
            if settling.is_none()
                && acks.waiting() > 0
                && (acks.waiting() >= window || (in_flight == 0 && sent_all))
            {
                let list = acks.take_all();
                settling = Some(self.settler.delivered(&list, batch, stop.clone()));
            }
            // Everything acknowledged is handed over. A clean batch leaves
            // its last settlement committing for the caller to carry.
            let clean = failures.is_empty() && stop_deadline.is_none();
            if in_flight == 0 && acks.waiting() == 0 && sent_all && (settling.is_none() || clean) {
                break;
            }
            let deadline =
                stop_deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                taken = reports.take(), if in_flight > 0 => {
                    watchdog.progressed();
                    // Reports come in bursts (one per record batch Kafka
                    // acknowledged): every one queued is taken at once.
                    for (i, result) in taken {
                        in_flight -= 1;
                        match result {
                            Ok(()) => {
                                acks.acked(i);
                                delivered_total.push(i);
                            }
                            Err(e) => {
                                acks.failed(i);
                                failures.push((i, e));
                            }
                        }
                    }
                },
                _ = async { settling.as_mut().expect("guarded").await }, if settling.is_some() => {
                    settling = None;
                }
                _ = tick.tick(), if settling.is_none() && acks.waiting() > 0 => {
                    // Only the acknowledged head: the writer deletes it as one
                    // range; the rest waits until it joins the head, or until
                    // a window's worth is waiting.
                    let list = acks.take_head();
                    if !list.is_empty() {
                        settling = Some(self.settler.delivered(&list, batch, stop.clone()));
                    }
                }
                _ = stop.changed(), if stop_deadline.is_none() => {
                    stop_deadline = Some(Instant::now() + STOP_GRACE);
                }
                _ = tokio::time::sleep_until(deadline), if stop_deadline.is_some() => {
                    tracing::warn!(events = in_flight, "stopping with deliveries unconfirmed; they stay buffered");
                    break;
                }
                _ = tokio::time::sleep_until(watchdog.deadline()), if watchdog.armed() && in_flight > 0 && stop_deadline.is_none() => {
                    let silent_ms = watchdog.silent_for().as_millis() as u64;
                    tracing::warn!(events = in_flight, silent_ms, "kafka producer stalled: no delivery report past the message timeout; replacing it and sending the unconfirmed events again");
                    stalled = true;
                    break;
                }
            }
        }
        // The stalled producer's reports are never taken again (they land in
        // `reports`, freed with the last): its unconfirmed events stay
        // buffered and count as failed to retry.
        drop(reports);
        let suspect = if stalled {
            self.producer.replace_stalled(producer);
            let timed_out = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
            failures.extend(acks.outstanding().map(|i| (i, timed_out.clone())));
            None
        } else {
            Some(producer)
        };
        let rest = acks.take_all();
        let carry = if !stalled && rest.is_empty() && failures.is_empty() && stop_deadline.is_none()
        {
            settling.take()
        } else {
            None
        };
        if let Some(last) = settling.take() {
            let _ = last.await;
        }
        if !rest.is_empty() {
            let _ = self.settler.delivered(&rest, batch, stop.clone()).await;
        }
        if stop_deadline.is_some() {
            // Stopping: no lone retries; unsettled events stay buffered.
            let retried = batch.len() - delivered_total.len();
            self.settler.take_unsettled();
            return Ok((
                Round {
                    delivered: delivered_total.len(),
                    retried,
                    ..Round::default()
                },
                None,
            ));
        }
        let mut round = match self
            .judge_failures(batch, failures, &delivered_total, stop)
            .await
        {
            Ok(round) => round,
            Err(e) => {
                // Never leave a settlement running behind an error: the next
                // read from the head would find its rows.
                if let Some(last) = carry {
                    let _ = last.await;
                }
                return Err(e);
            }
        };
        // Delivered but not settled (the disk refused), or not sent after a
        // stall: sent again later.
        round.retried += self.settler.take_unsettled() + (batch.len() - next);
        if round.all_timed_out
            && let Some(producer) = suspect
        {
            stall::replace_if_kafka_answers(&self.producer, producer).await;
        }
        Ok((round, carry))
    }
}
