//! Delivery reports from librdkafka's polling thread to whoever sent.
//!
//! A batch's events report into one shared queue by their index in the
//! batch ([`Reports`]): one small box per event and one wake-up per burst
//! of reports, where a future per event cost a oneshot channel, its box and
//! a task node, and woke the forwarder once per event (9 % of a drain's CPU).
//! A lone send (a direct stream, a dead letter's copy, a checkpoint record)
//! still gets a oneshot ([`once`]).

use std::sync::{Arc, Mutex};

use futures::channel::oneshot;
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::ProducerContext;

use super::KafkaContext;

/// How one event's delivery ended: acknowledged, or the error it failed with.
pub type Outcome = Result<(), KafkaError>;

/// Where an event's delivery report goes.
#[derive(Debug)]
pub enum Route {
    /// A lone send's channel.
    Once(oneshot::Sender<Outcome>),
    /// A batch's reports, and the event's index in the batch.
    Batch(Arc<Reports>, usize),
}

/// Delivery reports of one batch, by the event's index in it.
///
/// The queue lives as long as any of its events is unreported: the reports
/// of a batch given up (a stalled producer) land here unread, and are freed
/// with the last of them.
#[derive(Debug, Default)]
pub struct Reports {
    queue: Mutex<Vec<(usize, Outcome)>>,
    ready: tokio::sync::Notify,
}

impl Reports {
    fn push(&self, index: usize, outcome: Outcome) {
        let was_empty = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.push((index, outcome));
            queue.len() == 1
        };
        // One wake-up per burst: the taker empties the whole queue.
        if was_empty {
            self.ready.notify_one();
        }
    }

    /// Waits for at least one report and takes every one queued. Safe to
    /// cancel: reports are taken only when it returns them.
    pub async fn take(&self) -> Vec<(usize, Outcome)> {
        loop {
            {
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if !queue.is_empty() {
                    return std::mem::take(&mut *queue);
                }
            }
            // A report pushed after the check leaves a permit: no lost wake-up.
            self.ready.notified().await;
        }
    }
}

/// A route for a lone send, and the receiver of its outcome.
pub fn once() -> (Box<Route>, oneshot::Receiver<Outcome>) {
    let (tx, rx) = oneshot::channel();
    (Box::new(Route::Once(tx)), rx)
}

/// The outcome a lone send's receiver got; a report that never came (its
/// producer dropped it) is `Canceled`.
pub async fn outcome(rx: oneshot::Receiver<Outcome>) -> Outcome {
    rx.await.unwrap_or(Err(KafkaError::Canceled))
}

impl ProducerContext for KafkaContext {
    type DeliveryOpaque = Box<Route>;

    fn delivery(&self, result: &DeliveryResult<'_>, route: Box<Route>) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(e.clone()),
        };
        match *route {
            Route::Once(tx) => {
                // The sender may have stopped waiting (a bounded wait ran out).
                let _ = tx.send(outcome);
            }
            Route::Batch(reports, index) => reports.push(index, outcome),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn reports_pushed_while_nobody_waits_are_taken_in_one_go() {
        let reports = Reports::default();
        reports.push(2, Ok(()));
        reports.push(0, Err(KafkaError::Canceled));
        let got = reports.take().await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, 2);
        assert!(matches!(got[1], (0, Err(KafkaError::Canceled))));
        // Nothing left: a second take waits (the permit of the first push
        // may wake it once, and it finds the queue empty and waits again).
        let waited = tokio::time::timeout(Duration::from_millis(50), reports.take()).await;
        assert!(waited.is_err(), "no report was queued: {waited:?}");
    }

    #[tokio::test]
    async fn a_report_from_another_thread_wakes_the_taker() {
        let reports = Arc::new(Reports::default());
        let taker = tokio::spawn({
            let reports = reports.clone();
            async move { reports.take().await }
        });
        let pusher = reports.clone();
        std::thread::spawn(move || pusher.push(7, Ok(())))
            .join()
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), taker)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(got.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![7]);
    }

    #[tokio::test]
    async fn a_cancelled_take_loses_no_report() {
        let reports = Reports::default();
        let cancelled = tokio::time::timeout(Duration::from_millis(10), reports.take()).await;
        assert!(cancelled.is_err());
        reports.push(1, Ok(()));
        let got = tokio::time::timeout(Duration::from_secs(10), reports.take())
            .await
            .expect("taken");
        assert_eq!(got.len(), 1);
    }

    #[tokio::test]
    async fn a_lone_send_dropped_unreported_is_canceled() {
        let (route, rx) = once();
        drop(route);
        assert!(matches!(outcome(rx).await, Err(KafkaError::Canceled)));
    }
}
