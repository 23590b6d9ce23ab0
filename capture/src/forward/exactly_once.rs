//! Exactly-once delivery (`--delivery exactly-once`).
//!
//! Each batch is one Kafka transaction holding its events and a checkpoint
//! record `{volume, last_seq}` in a compacted checkpoint topic, keyed by the
//! volume id. Local rows are deleted only after the transaction committed.
//! The producer's `transactional.id` is derived from the volume id, so every
//! drainer of one volume (the pod, a flush Job, a pod that came back) shares
//! it: `init_transactions` fences any older one and aborts its open
//! transaction, and the checkpoint then tells which local rows Kafka already
//! has. A crash between Kafka's commit and the local delete therefore never
//! sends those rows again, and an aborted transaction is invisible to
//! `read_committed` consumers.
//!
//! Errors as Kafka defines them: an abortable one aborts the transaction and
//! the batch is retried; a fenced or fatal one stops delivery for good (the
//! pod turns unready; a newer drainer owns the volume now).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, Producer};
use rusqlite::Connection;
use tokio::sync::watch;
use tokio::time::Instant;

use super::checkpoint;
use super::dlq::DlqCopier;
use super::{
    Error, ErrorClass, KafkaContext, KafkaProducer, Result, RunUntil, SharedProducer, classify,
    delivery, enqueue_once, producer_config,
};
use crate::buffer::{self, StoredEvent, WriterHandle};
use crate::config::KafkaConfig;
use crate::metrics::{Metrics, OutcomeLabel, TopicLabel};

mod judge;

/// How long `init_transactions`, commit and abort may block.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// After an event was refused as too large, this many batches go one event
/// per transaction, so only the event that fails alone is dead-lettered.
const SOLO_ROUNDS: usize = 64;

/// The `transactional.id` of a volume's drainers.
pub fn transactional_id(volume_id: &str) -> String {
    format!("holdfast-{volume_id}")
}

/// What one transaction came to.
enum Outcome {
    /// Committed: these rows are in Kafka.
    Committed(Vec<(i64, u64, usize)>),
    /// Aborted; retry after a pause.
    Retry,
    /// Aborted, but some events were judged poison and moved aside: go on.
    Progress,
}

/// What the loop does after a round.
enum Step {
    /// Nothing left (flush).
    Done,
    /// Go on at once.
    Next,
    /// Nothing to send before then (or new events).
    Wait(Instant),
    /// Kafka refused the batch: back off.
    Retry,
}

/// Drains the buffer into Kafka, one transaction per batch.
pub struct ExactlyOnce {
    dir: std::path::PathBuf,
    reader: Arc<std::sync::Mutex<Connection>>,
    writer: WriterHandle,
    producer: KafkaProducer,
    /// Idempotent (not transactional) producer for dead-letter copies.
    plain: SharedProducer,
    cfg: KafkaConfig,
    metrics: Arc<Metrics>,
    volume_id: String,
    /// Highest sequence a committed transaction holds.
    committed_through: i64,
    /// Topics Kafka refuses, since when (poison after the retry window).
    refused_since: HashMap<String, Instant>,
    /// Refused topics waiting for their retry: a batch stops before their
    /// first row, so the rows ahead of it still flow.
    parked: HashMap<String, Instant>,
    /// Batches left to send one event at a time.
    solo: usize,
    dlq: DlqCopier,
    /// The deletion of the last committed batch's rows, still running while
    /// the next batch is read and sent (rows at or below the checkpoint are
    /// never sent again, so nothing hangs on it but the buffer's figures).
    deleting: Option<tokio::task::JoinHandle<Result<()>>>,
}

impl std::fmt::Debug for ExactlyOnce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExactlyOnce")
            .field("volume_id", &self.volume_id)
            .finish_non_exhaustive()
    }
}

impl ExactlyOnce {
    /// A transactional drainer of the buffer in `dir`, whose volume id is `volume_id`.
    pub fn new(
        dir: &std::path::Path,
        writer: WriterHandle,
        plain: SharedProducer,
        cfg: KafkaConfig,
        metrics: Arc<Metrics>,
        volume_id: String,
    ) -> Result<Self> {
        let mut c: ClientConfig = producer_config(&cfg);
        c.set("transactional.id", transactional_id(&volume_id));
        if !cfg.properties.contains_key("transaction.timeout.ms") {
            // librdkafka needs message.timeout.ms <= transaction.timeout.ms;
            // leave room for the commit after the last delivery (the broker's
            // default transaction.max.timeout.ms is 15 minutes).
            let ms = (cfg.message_timeout.as_millis() as u64 * 2).clamp(60_000, 900_000);
            c.set("transaction.timeout.ms", ms.to_string());
        }
        let producer = c
            .create_with_context(KafkaContext {
                metrics: metrics.clone(),
            })
            .map_err(Error::Producer)?;
        Ok(Self {
            dir: dir.to_owned(),
            reader: Arc::new(std::sync::Mutex::new(buffer::open_reader(dir)?)),
            writer,
            producer,
            plain,
            cfg,
            metrics,
            volume_id,
            committed_through: 0,
            refused_since: HashMap::new(),
            parked: HashMap::new(),
            solo: 0,
            dlq: DlqCopier::default(),
            deleting: None,
        })
    }

    /// Runs until `stop` (finishing the transaction in flight) or, with
    /// [`RunUntil::Empty`], until nothing is left. Returns [`Error::Fenced`]
    /// once a newer drainer of the volume took over.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>, until: RunUntil) -> Result<()> {
        let mut delay = Duration::from_millis(100);
        if !self.start(&mut stop).await? {
            return Ok(());
        }
        loop {
            if *stop.borrow() {
                // Committed rows left buffered would only be deleted unsent
                // by the next drainer; finish deleting them anyway.
                let _ = self.finish_deleting().await;
                return Ok(());
            }
            self.dlq.poll(
                &self.cfg,
                &self.plain,
                &self.writer,
                &self.reader,
                &self.metrics,
            );
            let pause = match self.round(until).await {
                Ok(Step::Done) => return Ok(()),
                Ok(Step::Next) => {
                    delay = Duration::from_millis(100);
                    continue;
                }
                Ok(Step::Wait(until)) => until,
                Ok(Step::Retry) => {
                    self.metrics.forward_retries.inc();
                    let d = delay;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    Instant::now() + d
                }
                Err(Error::Fenced(e)) => return Err(Error::Fenced(e)),
                Err(e) => {
                    // The buffer failed (typically a full disk): never give
                    // up, since draining is what frees the disk.
                    tracing::error!(error = %e, delay_ms = delay.as_millis() as u64, "exactly-once delivery failed on the buffer side; retrying");
                    if let Some(freed) = buffer::release_reserve(&self.dir) {
                        tracing::warn!(
                            bytes = freed,
                            "released the disk reserve so delivered events can be deleted"
                        );
                    }
                    let d = delay;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    Instant::now() + d
                }
            };
            tokio::select! {
                _ = self.writer.appended.notified() => {}
                _ = tokio::time::sleep_until(pause) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// One batch: read, drop what the checkpoint covers, send the rest in
    /// one transaction, delete what committed.
    async fn round(&mut self, until: RunUntil) -> Result<Step> {
        // While the last batch's rows are being deleted, read past them.
        let after = if self.deleting.is_some() {
            self.committed_through
        } else {
            0
        };
        let batch = self.read(after).await?;
        let (old, mut batch): (Vec<StoredEvent>, Vec<StoredEvent>) = batch
            .into_iter()
            .partition(|e| e.seq <= self.committed_through);
        if !old.is_empty() {
            self.finish_deleting().await?;
            // Kafka has them (a delete failed, or the checkpoint says so).
            let rows = old.iter().map(|e| (e.seq, e.event.size())).collect();
            self.writer.settle(rows, Vec::new()).await?;
            return Ok(Step::Next);
        }
        // A checkpoint covers every row up to it, so a batch stops at the
        // first row of a refused topic that waits for its retry: rows before
        // it flow, none after it is skipped.
        let now = Instant::now();
        if let Some(cut) = batch.iter().position(|e| {
            self.parked
                .get(&*e.event.topic)
                .is_some_and(|retry_at| *retry_at > now)
        }) {
            if cut == 0 {
                let retry_at = self.parked[&*batch[0].event.topic];
                return Ok(Step::Wait(retry_at));
            }
            batch.truncate(cut);
        }
        if batch.is_empty() {
            self.finish_deleting().await?;
            if until == RunUntil::Empty && self.drained() {
                return Ok(Step::Done);
            }
            self.report_lag();
            return Ok(Step::Wait(now + Duration::from_millis(500)));
        }
        let outcome = self.deliver(&batch).await;
        // One deletion at a time. Its failure is the buffer's, reported as
        // such, after a fence (which stops this drainer for good).
        let deleted = self.finish_deleting().await;
        let outcome = outcome?;
        deleted?;
        Ok(match outcome {
            Outcome::Committed(rows) => {
                self.settle(&batch, rows);
                self.metrics.kafka_up.set(1);
                Step::Next
            }
            Outcome::Progress => Step::Next,
            Outcome::Retry => {
                tracing::warn!(
                    events = batch.len(),
                    "kafka transaction aborted; retrying the batch"
                );
                Step::Retry
            }
        })
    }

    /// Fences older drainers, then reads the checkpoint. False when stopped
    /// first. `init_transactions` is called until it succeeds once (a second
    /// call on a ready producer is a state error); the checkpoint is retried
    /// on its own.
    async fn start(&mut self, stop: &mut watch::Receiver<bool>) -> Result<bool> {
        let mut delay = Duration::from_millis(250);
        let mut initialised = false;
        loop {
            let attempt = if initialised {
                Ok(())
            } else {
                let producer = self.producer.clone();
                tokio::task::spawn_blocking(move || producer.init_transactions(TXN_TIMEOUT))
                    .await
                    .unwrap_or(Err(KafkaError::Canceled))
            };
            initialised |= attempt.is_ok();
            let attempt = match attempt {
                Ok(()) => checkpoint::ensure_topic(&self.cfg).await,
                Err(e) => Err(e),
            };
            let attempt = match attempt {
                Ok(()) => checkpoint::read(&self.cfg, &self.volume_id).await,
                Err(e) => Err(e),
            };
            match attempt {
                Ok(through) => {
                    self.committed_through = through;
                    tracing::info!(
                        transactional_id = %transactional_id(&self.volume_id),
                        checkpoint = through,
                        "exactly-once delivery: older drainers fenced, checkpoint read"
                    );
                    return Ok(true);
                }
                Err(e) if is_fatal(&e) => return Err(self.fenced(&e)),
                Err(e) => {
                    tracing::warn!(error = %e, delay_ms = delay.as_millis() as u64, "exactly-once start failed; retrying");
                    self.metrics.kafka_up.set(0);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return Ok(false);
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    fn fenced(&self, e: &KafkaError) -> Error {
        self.metrics.fenced.set(1);
        tracing::error!(
            error = %e,
            transactional_id = %transactional_id(&self.volume_id),
            "exactly-once delivery stopped for good (fenced by a newer drainer of this volume, or a fatal producer error: see error); this process never sends again"
        );
        Error::Fenced(e.to_string())
    }

    fn drained(&self) -> bool {
        let s = &self.writer.state;
        s.events.load(Ordering::Relaxed) == 0
            && (self.cfg.dead_letter_topic.is_none() || s.dead_letters.load(Ordering::Relaxed) == 0)
    }

    fn report_lag(&self) {
        let last = self.writer.state.last_seq.load(Ordering::Relaxed);
        let waiting = self.writer.state.events.load(Ordering::Relaxed) as i64;
        let lag = if waiting == 0 {
            0
        } else {
            (last - self.committed_through).max(0)
        };
        self.metrics.checkpoint_lag.set(lag);
    }

    async fn read(&self, after: i64) -> Result<Vec<StoredEvent>> {
        let reader = self.reader.clone();
        let limit = if self.solo > 0 {
            1
        } else {
            self.cfg.transaction_events
        };
        let max_bytes = self.cfg.batch_bytes;
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            buffer::read_batch_bounded(&conn, after, limit, max_bytes, &[])
        })
        .await
        .map_err(|_| buffer::Error::WriterStopped)?
        .map_err(Into::into)
    }

    /// Sends `batch` and its checkpoint in one transaction.
    async fn deliver(&mut self, batch: &[StoredEvent]) -> Result<Outcome> {
        if let Err(e) = self.producer.begin_transaction() {
            return self.after_error(e).await;
        }
        let last = batch.last().map_or(0, |e| e.seq);
        let mark = checkpoint::record(&self.volume_id, last);
        let mut pending = Vec::with_capacity(batch.len());
        let mut failures: Vec<(usize, KafkaError)> = Vec::new();
        for (i, stored) in batch.iter().enumerate() {
            match enqueue_once(&self.producer, &stored.event).await {
                Ok(f) => pending.push((i, f)),
                Err(e) => failures.push((i, e)),
            }
        }
        let (route, mark_rx) = delivery::once();
        let mark_sent = self.producer.send(
            BaseRecord::with_opaque_to(&self.cfg.checkpoint_topic, route)
                .key(self.volume_id.as_bytes())
                .payload(&mark),
        );
        let mark_ok = match mark_sent {
            Ok(()) => delivery::outcome(mark_rx).await.is_ok(),
            Err(_) => false,
        };
        for (i, rx) in pending {
            if let Err(e) = delivery::outcome(rx).await {
                failures.push((i, e));
            }
        }
        if failures.is_empty() && mark_ok {
            return self.commit(batch).await;
        }
        if let Some((_, e)) = failures.iter().find(|(_, e)| is_fatal(e)) {
            return Err(self.fenced(e));
        }
        self.abort().await?;
        self.judge(batch, failures).await
    }

    /// Commits; a retriable failure (a timeout) is answered by calling
    /// commit again, as librdkafka requires (any other call would conflict
    /// with the one still pending).
    async fn commit(&mut self, batch: &[StoredEvent]) -> Result<Outcome> {
        let mut delay = Duration::from_millis(100);
        loop {
            let producer = self.producer.clone();
            let result =
                tokio::task::spawn_blocking(move || producer.commit_transaction(TXN_TIMEOUT))
                    .await
                    .unwrap_or(Err(KafkaError::Canceled));
            match result {
                Ok(()) => {
                    self.count("committed");
                    self.committed_through = batch.last().map_or(0, |e| e.seq);
                    if self.solo > 0 {
                        self.solo -= 1;
                    }
                    let rows = batch
                        .iter()
                        .enumerate()
                        .map(|(i, e)| (e.seq, e.event.size(), i))
                        .collect();
                    return Ok(Outcome::Committed(rows));
                }
                Err(e) if is_fatal(&e) => return Err(self.fenced(&e)),
                Err(e) if retriable(&e) && !needs_abort(&e) => {
                    tracing::warn!(error = %e, delay_ms = delay.as_millis() as u64, "kafka transaction commit not confirmed; committing again");
                    self.metrics.kafka_up.set(0);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kafka transaction commit failed; aborting it");
                    self.abort().await?;
                    return Ok(Outcome::Retry);
                }
            }
        }
    }

    /// Aborts; a retriable failure is answered by aborting again.
    async fn abort(&mut self) -> Result<()> {
        let mut delay = Duration::from_millis(100);
        loop {
            let producer = self.producer.clone();
            let result =
                tokio::task::spawn_blocking(move || producer.abort_transaction(TXN_TIMEOUT))
                    .await
                    .unwrap_or(Err(KafkaError::Canceled));
            match result {
                Ok(()) => {
                    self.count("aborted");
                    return Ok(());
                }
                Err(e) if is_fatal(&e) => return Err(self.fenced(&e)),
                Err(e) if retriable(&e) => {
                    tracing::warn!(error = %e, delay_ms = delay.as_millis() as u64, "kafka transaction abort not confirmed; aborting again");
                    self.metrics.kafka_up.set(0);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    // No transaction to abort (it never began): nothing pending.
                    tracing::warn!(error = %e, "kafka transaction abort failed");
                    return Ok(());
                }
            }
        }
    }

    /// A transactional call failed before anything was sent.
    async fn after_error(&mut self, e: KafkaError) -> Result<Outcome> {
        if is_fatal(&e) {
            return Err(self.fenced(&e));
        }
        tracing::warn!(error = %e, "kafka transaction could not begin");
        if needs_abort(&e) {
            self.abort().await?;
        }
        Ok(Outcome::Retry)
    }

    /// Waits for the deletion of the last committed batch's rows.
    async fn finish_deleting(&mut self) -> Result<()> {
        let Some(deleting) = self.deleting.take() else {
            return Ok(());
        };
        let deleted = deleting
            .await
            .unwrap_or(Err(Error::Buffer(buffer::Error::WriterStopped)));
        self.report_lag();
        deleted
    }

    /// Counts what Kafka committed, then starts deleting the rows (see
    /// [`finish_deleting`](Self::finish_deleting)); a failed delete leaves
    /// them to a later read from the head, which finds them at or below the
    /// checkpoint and deletes them unsent.
    fn settle(&mut self, batch: &[StoredEvent], rows: Vec<(i64, u64, usize)>) {
        for e in batch {
            self.refused_since.remove(&*e.event.topic);
            self.parked.remove(&*e.event.topic);
        }
        let mut by_topic: HashMap<&str, u64> = HashMap::new();
        for (_, _, i) in &rows {
            *by_topic.entry(&*batch[*i].event.topic).or_default() += 1;
        }
        for (topic, n) in by_topic {
            self.metrics
                .delivered
                .get_or_create(&TopicLabel {
                    topic: topic.to_owned(),
                })
                .inc_by(n);
        }
        let list: Vec<(i64, u64)> = rows.iter().map(|(s, n, _)| (*s, *n)).collect();
        let writer = self.writer.clone();
        self.deleting = Some(tokio::spawn(async move {
            writer.settle(list, Vec::new()).await.map_err(Error::from)
        }));
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .transactions
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }
}

fn txn_error(e: &KafkaError) -> Option<&rdkafka::error::RDKafkaError> {
    match e {
        KafkaError::Transaction(t) => Some(t),
        _ => None,
    }
}

/// Fenced or fatal: this producer must never send again.
fn is_fatal(e: &KafkaError) -> bool {
    txn_error(e).is_some_and(|t| t.is_fatal()) || classify(e) == ErrorClass::Fatal
}

fn retriable(e: &KafkaError) -> bool {
    txn_error(e).is_some_and(|t| t.is_retriable())
}

fn needs_abort(e: &KafkaError) -> bool {
    txn_error(e).is_some_and(|t| t.txn_requires_abort())
}
