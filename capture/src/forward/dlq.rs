//! Copies dead letters to `--dead-letter-topic`. A dead letter leaves the
//! buffer only once the dead-letter topic acknowledged its copy (`acks=all`);
//! until then it counts against the quota and keeps the volume from being
//! called clean. Copies that fail are retried on the next pass.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::message::Header;
use rdkafka::producer::BaseRecord;
use rusqlite::Connection;

use super::{
    KafkaProducer, ORIGINAL_TOPIC_HEADER, REASON_HEADER, SharedProducer, delivery, headers,
};
use crate::buffer::{self, DeadLetterFilter, WriterHandle};
use crate::config::KafkaConfig;
use crate::metrics::Metrics;

/// Dead letters copied per pass.
const COPY_BATCH: usize = 500;

/// Runs copy passes beside the main queue, one at a time, backing off (1 s,
/// doubling to a minute) after a pass that failed, so a missing or refusing
/// dead-letter topic never holds up delivery.
#[derive(Debug)]
pub(super) struct DlqCopier {
    task: Option<tokio::task::JoinHandle<bool>>,
    retry_at: tokio::time::Instant,
    delay: Duration,
}

impl Default for DlqCopier {
    fn default() -> Self {
        Self {
            task: None,
            retry_at: tokio::time::Instant::now(),
            delay: Duration::ZERO,
        }
    }
}

impl DlqCopier {
    /// Starts a pass unless one is running, the last one failed too
    /// recently, or there is nothing to copy.
    pub(super) fn poll(
        &mut self,
        cfg: &KafkaConfig,
        producer: &SharedProducer,
        writer: &WriterHandle,
        reader: &Arc<std::sync::Mutex<Connection>>,
        metrics: &Arc<Metrics>,
    ) {
        let Some(dlq) = cfg.dead_letter_topic.clone() else {
            return;
        };
        if let Some(task) = &self.task {
            if !task.is_finished() {
                return;
            }
            let ok = self
                .task
                .take()
                .and_then(futures::FutureExt::now_or_never)
                .and_then(|joined| joined.ok())
                .unwrap_or(false);
            self.delay = if ok {
                Duration::ZERO
            } else {
                (self.delay * 2).clamp(Duration::from_secs(1), Duration::from_secs(60))
            };
            self.retry_at = tokio::time::Instant::now() + self.delay;
        }
        if writer.state.dead_letters.load(Ordering::Relaxed) == 0
            || tokio::time::Instant::now() < self.retry_at
        {
            return;
        }
        self.task = Some(tokio::spawn(copy_dead_letters(
            producer.get(),
            writer.clone(),
            reader.clone(),
            dlq,
            metrics.clone(),
        )));
    }
}

/// One pass: copies up to [`COPY_BATCH`] dead letters and forgets those the
/// dead-letter topic acknowledged. Failures are logged and left for later;
/// returns whether the pass went through without one.
async fn copy_dead_letters(
    producer: KafkaProducer,
    writer: WriterHandle,
    reader: Arc<std::sync::Mutex<Connection>>,
    dlq: String,
    metrics: Arc<Metrics>,
) -> bool {
    let dlq = dlq.as_str();
    let rows = tokio::task::spawn_blocking(move || {
        let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
        buffer::dead_letters(&conn, 0, COPY_BATCH, &DeadLetterFilter::default())
    })
    .await;
    let rows = match rows {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not read dead letters");
            return false;
        }
        Err(_) => return false,
    };
    let mut all_ok = true;
    let mut pending = Vec::with_capacity(rows.len());
    for row in &rows {
        let event = buffer::NewEvent {
            uuid: row.uuid.clone(),
            topic: row.topic.as_str().into(),
            key: row.key.clone(),
            payload: row.payload.clone(),
            captured_at_ms: row.captured_at_ms,
            client_uuid: true,
        };
        let (route, rx) = delivery::once();
        let record = BaseRecord::with_opaque_to(dlq, route)
            .key(&row.key)
            .payload(&row.payload)
            .headers(
                headers(&event)
                    .insert(Header {
                        key: REASON_HEADER,
                        value: Some(row.reason.as_bytes()),
                    })
                    .insert(Header {
                        key: ORIGINAL_TOPIC_HEADER,
                        value: Some(row.topic.as_bytes()),
                    }),
            );
        match producer.send(record) {
            Ok(()) => pending.push((row.seq, rx)),
            Err((e, _)) => {
                tracing::warn!(seq = row.seq, dlq, error = %e, "could not queue a dead letter for the dead-letter topic");
                all_ok = false;
                break;
            }
        }
    }
    let mut copied = Vec::with_capacity(pending.len());
    for (seq, rx) in pending {
        match delivery::outcome(rx).await {
            Ok(()) => copied.push(seq),
            Err(e) => {
                all_ok = false;
                tracing::warn!(seq, dlq, error = %e, "could not copy a dead letter to the dead-letter topic; retrying later")
            }
        }
    }
    if copied.is_empty() {
        return all_ok;
    }
    let n = copied.len() as u64;
    match writer.dead_letters_copied(copied).await {
        Ok(()) => {
            metrics.dead_letters_copied.inc_by(n);
            all_ok
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not record dead letters as copied; they will be copied again");
            false
        }
    }
}
