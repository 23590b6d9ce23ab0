//! The demo's client: posts batches of events to the ready capture pods in
//! turn, as a load balancer would, and keeps the uuid of every event a pod
//! answered `200` for. A batch that fails is retried on the next pod with
//! the same uuids (a retried event is stored once), so the acknowledged set
//! is what the final count checks against Kafka.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::json;
use tokio::sync::watch;

use crate::tables::{CAPTURE_SELECTOR, ready};

/// Events per request.
const BATCH: usize = 5;
/// Pause between requests: paces the client at about 50 requests/s.
const PACE: Duration = Duration::from_millis(20);
/// Attempts of one batch before it is given up (never acknowledged).
const ATTEMPTS: usize = 3;

/// What the client saw so far.
#[derive(Debug, Default)]
pub struct Stats {
    /// Every acknowledged uuid.
    pub acked: HashSet<String>,
    /// Uuids acknowledged while Kafka was stopped.
    pub acked_in_outage: HashSet<String>,
    /// Requests that got no `200` (retried or given up).
    pub refused: u64,
}

/// The running client.
pub struct Client {
    stop: watch::Sender<bool>,
    stats: Arc<Mutex<Stats>>,
    outage: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Starts posting to the ready capture pods of namespace `ns`.
    pub fn start(client: kube::Client, ns: &str) -> Self {
        let (stop, stopped) = watch::channel(false);
        let stats = Arc::new(Mutex::new(Stats::default()));
        let outage = Arc::new(AtomicBool::new(false));
        let pods: Api<Pod> = Api::namespaced(client, ns);
        let task = tokio::spawn(post_loop(pods, stopped, stats.clone(), outage.clone()));
        Self {
            stop,
            stats,
            outage,
            task,
        }
    }

    /// Marks whether Kafka is stopped (acks are then counted as buffered
    /// during the outage).
    pub fn set_outage(&self, on: bool) {
        self.outage.store(on, Ordering::SeqCst);
    }

    /// Acknowledged events so far, those acknowledged during the outage,
    /// refused requests.
    pub fn counts(&self) -> (usize, usize, u64) {
        let stats = self.stats.lock().expect("stats lock");
        (
            stats.acked.len(),
            stats.acked_in_outage.len(),
            stats.refused,
        )
    }

    /// The uuids acknowledged during the outage.
    pub fn acked_in_outage(&self) -> HashSet<String> {
        self.stats
            .lock()
            .expect("stats lock")
            .acked_in_outage
            .clone()
    }

    /// Stops posting (the request in flight finishes) and returns the stats.
    pub async fn finish(self) -> Stats {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        std::mem::take(&mut *self.stats.lock().expect("stats lock"))
    }
}

async fn post_loop(
    pods: Api<Pod>,
    stopped: watch::Receiver<bool>,
    stats: Arc<Mutex<Stats>>,
    outage: Arc<AtomicBool>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("http client");
    let mut ips: Vec<String> = Vec::new();
    let mut refreshed: Option<Instant> = None;
    let mut turn = 0usize;
    while !*stopped.borrow() {
        if refreshed.is_none_or(|t| t.elapsed() > Duration::from_millis(500)) {
            if let Ok(list) = pods
                .list(&ListParams::default().labels(CAPTURE_SELECTOR))
                .await
            {
                ips = list
                    .items
                    .iter()
                    .filter(|p| ready(p))
                    .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
                    .collect();
            }
            refreshed = Some(Instant::now());
        }
        if ips.is_empty() {
            tokio::time::sleep(PACE).await;
            continue;
        }
        let uuids: Vec<String> = (0..BATCH)
            .map(|_| uuid::Uuid::now_v7().to_string())
            .collect();
        let body: Vec<_> = uuids
            .iter()
            .enumerate()
            .map(|(i, u)| json!({"uuid": u, "key": format!("user-{}", (turn + i) % 7), "action": "click"}))
            .collect();
        for _ in 0..ATTEMPTS {
            turn += 1;
            let ip = &ips[turn % ips.len()];
            // Counted as an outage ack only when Kafka was stopped both
            // before the request and after its answer.
            let before = outage.load(Ordering::SeqCst);
            let sent = http
                .post(format!("http://{ip}:8080/v1/events"))
                .json(&body)
                .send()
                .await;
            let mut stats = stats.lock().expect("stats lock");
            if matches!(&sent, Ok(r) if r.status() == 200) {
                if before && outage.load(Ordering::SeqCst) {
                    stats.acked_in_outage.extend(uuids.iter().cloned());
                }
                stats.acked.extend(uuids.iter().cloned());
                break;
            }
            stats.refused += 1;
        }
        tokio::time::sleep(PACE).await;
    }
}
