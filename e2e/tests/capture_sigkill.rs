//! Crash safety under load, measured: several concurrent clients with mixed
//! batch sizes, a capture process SIGKILLed over and over at arbitrary
//! moments, then every acknowledged uuid counted in a real Kafka broker.
//! No acknowledged event may be lost; duplicates (same uuid delivered twice,
//! the price of at-least-once) are reported per kill and bounded: the
//! forwarder settles what Kafka acknowledged every few milliseconds, so a kill
//! resends only what was in flight at that moment, not a whole batch.
//!
//! `HOLDFAST_SIGKILL_KILLS` sets the number of kills (default 20);
//! `make sigkill-soak` runs 100.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use holdfast_e2e::capture::{self, CaptureProcess};
use holdfast_e2e::kafka::KafkaBroker;
use serde_json::json;

/// Average duplicates per kill the test tolerates: the design's bound. A
/// kill can only make a later drainer resend what Kafka acknowledged and
/// was not yet deleted: at most 1,000 events in flight, 1,000 acknowledged
/// and waiting, and one settlement of 1,000 committing. Measured: 537-669
/// per kill at the intake of the previous release's test runs, 970-1,140 at
/// today's (higher) intake; a whole unsettled batch would be up to 5,000.
const MAX_DUPLICATES_PER_KILL: usize = 3_000;

/// Batch sizes the clients cycle through.
const BATCH_SIZES: [usize; 4] = [1, 10, 100, 250];

fn kills() -> usize {
    std::env::var("HOLDFAST_SIGKILL_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// Records currently in `topic`, duplicates included.
async fn records_in(bootstrap: &str, topic: &str) -> Result<usize> {
    holdfast_e2e::kafka::record_count(bootstrap, topic).await
}

async fn wait_until<F: FnMut() -> bool>(what: &str, within: Duration, mut f: F) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn buffered(dir: &std::path::Path) -> u64 {
    capture::inspect(dir)
        .ok()
        .and_then(|v| v["events"].as_u64())
        .unwrap_or(u64::MAX)
}

/// One client: posts batches (sizes cycling from `offset`) with its own
/// uuids until `stop`; returns the uuids it got a 200 for.
async fn client(
    url: String,
    offset: usize,
    stop: Arc<AtomicBool>,
    acked_total: Arc<AtomicUsize>,
) -> HashSet<String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut acked = HashSet::new();
    let mut round = offset;
    while !stop.load(Ordering::Relaxed) {
        let n = BATCH_SIZES[round % BATCH_SIZES.len()];
        round += 1;
        let events: Vec<serde_json::Value> = (0..n)
            .map(|i| json!({"uuid": uuid::Uuid::now_v7().to_string(), "i": i, "pad": "x".repeat(64)}))
            .collect();
        let sent = http
            .post(&url)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&events).unwrap())
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 200 => {
                for e in &events {
                    acked.insert(e["uuid"].as_str().unwrap().to_owned());
                }
                acked_total.fetch_add(n, Ordering::Relaxed);
            }
            // Refused or cut off by the kill: not acknowledged, a client retries.
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_concurrent_load_loses_nothing_and_bounds_duplicates() -> Result<()> {
    let kills = kills();
    let kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 3, &[]).await?;
    let dir = tempfile::Builder::new()
        .prefix("holdfast-sigkill-")
        .tempdir()?;
    let mut cap = CaptureProcess::start(&dir.path().join("buf"), &kafka.bootstrap(), &[]).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let acked_total = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(client(
                format!("{}/v1/events", cap.url()),
                i,
                stop.clone(),
                acked_total.clone(),
            ))
        })
        .collect();
    let started = Instant::now();
    for k in 0..kills {
        // Let the clients get a few hundred events through, then kill at an
        // arbitrary moment within the next ~250 ms.
        let target = acked_total.load(Ordering::Relaxed) + 300;
        wait_until("client progress", Duration::from_secs(60), || {
            acked_total.load(Ordering::Relaxed) >= target
        })
        .await;
        let jitter = (uuid::Uuid::now_v7().as_u128() % 250) as u64;
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        cap.kill();
        if k + 1 < kills {
            cap.restart().await?;
        }
    }
    cap.restart().await?;
    let target = acked_total.load(Ordering::Relaxed) + 300;
    wait_until("client progress", Duration::from_secs(60), || {
        acked_total.load(Ordering::Relaxed) >= target
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = HashSet::new();
    for c in clients {
        acked.extend(c.await?);
    }
    wait_until("buffer to drain", Duration::from_secs(120), || {
        buffered(cap.data_dir()) == 0
    })
    .await;
    let log = cap.log_text();
    // Every record in the topic, duplicates included.
    let total = records_in(&kafka.bootstrap(), "events").await?;
    let records = kafka
        .consume("events", total, Duration::from_secs(60))
        .await?;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &records {
        let uuid = String::from_utf8(r.header("holdfast-uuid").unwrap_or_default().to_vec())?;
        *seen.entry(uuid).or_default() += 1;
    }
    let lost: Vec<&String> = acked.iter().filter(|u| !seen.contains_key(*u)).collect();
    let duplicates = total.saturating_sub(seen.len());
    eprintln!(
        "sigkill x{kills} in {:.0}s: acked {} events, found {} distinct in kafka ({} records), \
         {} duplicates ({:.1} per kill), {} lost",
        started.elapsed().as_secs_f64(),
        acked.len(),
        seen.len(),
        total,
        duplicates,
        duplicates as f64 / kills as f64,
        lost.len()
    );
    assert!(
        acked.len() >= kills * 300,
        "only {} events acked",
        acked.len()
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged events lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(
        duplicates <= kills * MAX_DUPLICATES_PER_KILL,
        "{duplicates} duplicates over {kills} kills: more than {MAX_DUPLICATES_PER_KILL} per kill"
    );
    // Logs go to a file here: they must carry no terminal colour codes.
    assert!(
        !log.contains('\u{1b}'),
        "log written to a file carries ANSI escape codes"
    );
    Ok(())
}
