//! Exactly-once delivery (`--delivery exactly-once`) against a real Kafka
//! broker, read back with `isolation.level=read_committed`.
//!
//! - Chaos: clients post continuously (mixed batch sizes, each failed
//!   request retried with the same uuids until it gets its 200) while the
//!   capture process is SIGKILLed at arbitrary moments and the broker is
//!   SIGKILLed now and then; every acknowledged uuid must then be in Kafka
//!   exactly once. The same load in at-least-once mode is reported beside.
//!   `HOLDFAST_EOS_KILLS` sets the kills (default 10; `make eos-chaos` runs 50).
//! - Zombie: a copy of a live volume drained by `flush` while the pod that
//!   owns it still runs: the newer drainer fences the older one, and nothing
//!   is delivered twice.

#[allow(dead_code)]
mod edges_support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use edges_support::*;
use holdfast_e2e::capture::{self, CaptureProcess};
use holdfast_e2e::kafka::{ConsumeOptions, KafkaBroker};
use serde_json::{Value, json};

const EXACTLY_ONCE: [&str; 2] = ["--delivery", "exactly-once"];
const BATCH_SIZES: [usize; 4] = [1, 10, 100, 250];

fn kills() -> usize {
    std::env::var("HOLDFAST_EOS_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

/// One client: posts batches until `stop`; a request that fails is sent
/// again with the same uuids until it gets a 200, as a careful client
/// would. Returns the uuids acknowledged.
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
    let mut pending: Option<Vec<Value>> = None;
    while !stop.load(Ordering::Relaxed) || pending.is_some() {
        let events = pending.take().unwrap_or_else(|| {
            round += 1;
            let n = BATCH_SIZES[round % BATCH_SIZES.len()];
            (0..n)
                .map(|i| json!({"uuid": new_uuid(), "i": i, "pad": "x".repeat(64)}))
                .collect()
        });
        let sent = http
            .post(&url)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&events).unwrap())
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 200 => {
                acked.extend(uuids(&events));
                acked_total.fetch_add(events.len(), Ordering::Relaxed);
            }
            _ => {
                pending = Some(events);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    acked
}

/// What a chaos run found.
struct Run {
    acked: HashSet<String>,
    seen: HashMap<String, usize>,
    secs: f64,
}

impl Run {
    fn lost(&self) -> usize {
        self.acked
            .iter()
            .filter(|u| !self.seen.contains_key(*u))
            .count()
    }

    fn duplicates(&self) -> usize {
        self.seen.values().map(|n| n - 1).sum()
    }
}

/// Every record a read_committed consumer sees in `topic`, counted by uuid.
async fn committed_uuids(
    kafka: &KafkaBroker,
    topic: &str,
    want: usize,
) -> Result<HashMap<String, usize>> {
    // Aborted records and transaction markers count in the watermarks but
    // are never read: read until the deadline, not to a count.
    let records = kafka
        .consume_with(
            topic,
            &ConsumeOptions::new(usize::MAX, Duration::from_secs(10)),
        )
        .await?;
    let mut seen = HashMap::with_capacity(want);
    for r in &records {
        *seen.entry(uuid_of(r)).or_default() += 1;
    }
    Ok(seen)
}

async fn chaos(kills: usize, args: &[&str], broker_every: usize) -> Result<Run> {
    let mut kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 3, &[]).await?;
    let dir = tempdir();
    let buf = dir.path().join("buf");
    let mut cap = CaptureProcess::start(&buf, &kafka.bootstrap(), args).await?;
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
        let target = acked_total.load(Ordering::Relaxed) + 300;
        wait_until("client progress", Duration::from_secs(90), || {
            acked_total.load(Ordering::Relaxed) >= target
        })
        .await?;
        // An arbitrary moment: mid-transaction, between Kafka's commit and
        // the local delete, or while idle.
        let jitter = (uuid::Uuid::now_v7().as_u128() % 250) as u64;
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        cap.kill();
        if broker_every > 0 && k % broker_every == broker_every - 1 {
            kafka.kill();
            kafka.restart().await?;
        }
        cap.restart().await?;
    }
    let target = acked_total.load(Ordering::Relaxed) + 300;
    wait_until("client progress", Duration::from_secs(90), || {
        acked_total.load(Ordering::Relaxed) >= target
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    let mut acked = HashSet::new();
    for c in clients {
        acked.extend(c.await?);
    }
    wait_until("the buffer to drain", Duration::from_secs(120), || {
        capture::inspect(&buf)
            .ok()
            .and_then(|v| v["events"].as_u64())
            == Some(0)
    })
    .await?;
    let seen = committed_uuids(&kafka, "events", acked.len()).await?;
    Ok(Run {
        acked,
        seen,
        secs: started.elapsed().as_secs_f64(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_under_sigkill_and_broker_kills_delivers_each_event_once() -> Result<()> {
    let kills = kills();
    let eos = chaos(kills, &EXACTLY_ONCE, 5).await?;
    let alo = chaos(kills, &[], 5).await?;
    for (mode, run) in [("exactly-once", &eos), ("at-least-once", &alo)] {
        eprintln!(
            "{mode}: {kills} capture kills, {} broker kills in {:.0}s: {} acked, {} distinct in kafka, \
             {} duplicates, {} lost",
            kills / 5,
            run.secs,
            run.acked.len(),
            run.seen.len(),
            run.duplicates(),
            run.lost()
        );
    }
    ensure!(
        eos.acked.len() >= kills * 300,
        "only {} acked",
        eos.acked.len()
    );
    ensure!(
        eos.lost() == 0,
        "exactly-once lost {} acknowledged events",
        eos.lost()
    );
    ensure!(
        alo.lost() == 0,
        "at-least-once lost {} acknowledged events",
        alo.lost()
    );
    let twice: Vec<_> = eos.seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    ensure!(
        eos.duplicates() == 0,
        "exactly-once delivered {} duplicates, e.g. {twice:?}",
        eos.duplicates()
    );
    Ok(())
}

/// Copies a live buffer the way a second mount of the same volume would see
/// it (SQLite's online backup: a consistent snapshot).
fn snapshot(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    let src = rusqlite::Connection::open_with_flags(
        from.join("buffer.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    src.execute(
        "VACUUM INTO ?1",
        [to.join("buffer.db").display().to_string()],
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_drainer_fences_the_older_and_nothing_is_sent_twice() -> Result<()> {
    let mut kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 1, &[]).await?;
    let dir = tempdir();
    let (live, copy) = (dir.path().join("live"), dir.path().join("copy"));
    let mut pod = CaptureProcess::start(&live, &kafka.bootstrap(), &EXACTLY_ONCE).await?;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/events", pod.url());
    let first = events_with_pad(200, 20);
    let (status, body) = post(&client, &url, &first).await?;
    ensure!(status == 200, "{body}");
    let delivered = kafka
        .consume("events", first.len(), Duration::from_secs(60))
        .await?;
    ensure!(
        delivered.len() == first.len(),
        "{} of {} delivered",
        delivered.len(),
        first.len()
    );

    // Kafka away: the next events stay buffered in the pod; the copy holds them too.
    kafka.stop().await?;
    let second = events_with_pad(300, 20);
    let (status, body) = post(&client, &url, &second).await?;
    ensure!(status == 200, "{body}");
    snapshot(&live, &copy)?;
    kafka.restart().await?;

    // Both drain the same events at once: the pod, and a flush of the copy.
    let (exit, log) = tokio::task::spawn_blocking({
        let (copy, bootstrap) = (copy.clone(), kafka.bootstrap());
        move || capture::flush_with(&copy, &bootstrap, 60, &EXACTLY_ONCE)
    })
    .await??;
    ensure!(exit.success(), "flush of the copy failed: {log}");

    // The pod delivers again only if it is still the newest drainer: give it
    // new events, which its next transaction must fail to send. (It may
    // already be fenced: when its own delivery of `second` raced the flush.)
    let third = events_with_pad(50, 20);
    let third_taken = matches!(post(&client, &url, &third).await, Ok((200, _)));
    // Fenced, it stops delivering for good and exits non-zero (Kubernetes
    // would restart it; the restarted process fences in turn).
    let exit = pod.wait_exit(Duration::from_secs(90)).await?;
    ensure!(
        !exit.success(),
        "a fenced pod must exit non-zero, got {exit}"
    );
    ensure!(
        pod.log_text().contains("delivery stopped for good"),
        "the fenced pod did not say why it stopped: {}",
        pod.log_tail()
    );
    let want: HashSet<String> = uuids(&first).into_iter().chain(uuids(&second)).collect();
    let seen = committed_uuids(&kafka, "events", want.len()).await?;
    let missing = want.iter().filter(|u| !seen.contains_key(*u)).count();
    let twice = seen.values().filter(|n| **n > 1).count();
    eprintln!(
        "zombie: {} events wanted once, {} distinct seen, {missing} missing, {twice} twice",
        want.len(),
        seen.len()
    );
    ensure!(
        missing == 0,
        "{missing} acknowledged events never reached Kafka"
    );
    ensure!(twice == 0, "{twice} events reached Kafka twice");
    if third_taken {
        ensure!(
            uuids(&third).iter().all(|u| !seen.contains_key(u)),
            "a fenced drainer sent events"
        );
        let left = capture::inspect(&live)?;
        ensure!(
            left["events"].as_u64() >= Some(third.len() as u64),
            "the fenced pod must keep what it could not send: {left}"
        );
    }
    Ok(())
}

/// Kafka refuses an oversized event, which fails the whole transaction: the
/// innocent events around it are retried (one per transaction until the
/// culprit fails alone), the culprit becomes a dead letter, and everything
/// else reaches Kafka once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_aborts_only_its_transaction_and_the_rest_arrives_once() -> Result<()> {
    let kafka = KafkaBroker::start().await?;
    kafka
        .create_topic("events", 1, &[("max.message.bytes", "1000")])
        .await?;
    let dir = tempdir();
    let buf = dir.path().join("buf");
    let cap = CaptureProcess::start(&buf, &kafka.bootstrap(), &EXACTLY_ONCE).await?;
    let client = reqwest::Client::new();
    let (before, poison, after) = (
        events_with_pad(20, 10),
        events_with_pad(1, 3000),
        events_with_pad(20, 10),
    );
    let all: Vec<Value> = before
        .iter()
        .chain(&poison)
        .chain(&after)
        .cloned()
        .collect();
    let (status, body) = post(&client, &format!("{}/v1/events", cap.url()), &all).await?;
    ensure!(status == 200, "{body}");
    wait_until(
        "the poison event to be dead-lettered",
        Duration::from_secs(60),
        || {
            let s = inspect(&buf);
            s["dead_letters"] == 1 && s["events"] == 0
        },
    )
    .await?;
    let seen = committed_uuids(&kafka, "events", 40).await?;
    let want: HashSet<String> = uuids(&before).into_iter().chain(uuids(&after)).collect();
    let missing = want.iter().filter(|u| !seen.contains_key(*u)).count();
    let twice = seen.values().filter(|n| **n > 1).count();
    ensure!(
        missing == 0 && twice == 0,
        "{missing} missing, {twice} twice of {}",
        want.len()
    );
    ensure!(
        !seen.contains_key(&uuids(&poison)[0]),
        "the poison event reached Kafka"
    );
    Ok(())
}

/// A topic Kafka refuses for a while (created late) must not let the
/// checkpoint pass its events: rows of other topics behind them wait, rows
/// ahead of them flow, and once the topic exists every event of both
/// arrives once. (A first version left the refused topic's rows out of the
/// batch, committed a checkpoint past them, then deleted them unsent.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_topic_is_never_skipped_by_the_checkpoint() -> Result<()> {
    let kafka = broker_without_auto_create().await?;
    kafka.create_topic("events", 1, &[]).await?;
    let dir = tempdir();
    let buf = dir.path().join("buf");
    let mut args = EXACTLY_ONCE.to_vec();
    args.extend([
        "--stream",
        "default=events",
        "--stream",
        "late=late.topic",
        "--kafka-property",
        "topic.metadata.propagation.max.ms=1000",
    ]);
    let cap = CaptureProcess::start(&buf, &kafka.bootstrap(), &args).await?;
    let client = reqwest::Client::new();
    let (mut early, mut late) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let a = events_with_pad(10, 10);
        let b = events_with_pad(10, 10);
        let (s1, b1) = post(&client, &format!("{}/v1/events/late", cap.url()), &b).await?;
        let (s2, b2) = post(&client, &format!("{}/v1/events", cap.url()), &a).await?;
        ensure!(s1 == 200 && s2 == 200, "{b1} {b2}");
        early.extend(uuids(&a));
        late.extend(uuids(&b));
    }
    // Kafka refuses the late topic for a few seconds.
    wait_until(
        "kafka to refuse the late topic",
        Duration::from_secs(30),
        || cap.log_text().contains("kafka refused the topic"),
    )
    .await?;
    kafka.create_topic("late.topic", 1, &[]).await?;
    wait_until("the buffer to drain", Duration::from_secs(90), || {
        let s = inspect(&buf);
        s["events"] == 0
    })
    .await?;
    let s = inspect(&buf);
    ensure!(
        s["dead_letters"] == 0,
        "nothing may be dead-lettered within the window: {s}"
    );
    for (topic, want) in [("events", &early), ("late.topic", &late)] {
        let seen = committed_uuids(&kafka, topic, want.len()).await?;
        let missing = want.iter().filter(|u| !seen.contains_key(*u)).count();
        let twice = seen.values().filter(|n| **n > 1).count();
        ensure!(
            missing == 0 && twice == 0,
            "{topic}: {missing} of {} missing, {twice} twice",
            want.len()
        );
    }
    Ok(())
}

/// A transaction holds at most `--transaction-events` events: a buffer of
/// 95 drained with a cap of 20 commits exactly five checkpoints, each
/// covering the next 20 rows (the last 15), and every event arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_hold_at_most_the_configured_events() -> Result<()> {
    let kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 1, &[]).await?;
    let dir = tempdir();
    let buf = dir.path().join("buf");
    // Filled by a pod that cannot reach Kafka, then killed.
    let mut pod = CaptureProcess::start(&buf, "127.0.0.1:1", &[]).await?;
    let events = events_with_pad(95, 10);
    let (status, body) = post(
        &reqwest::Client::new(),
        &format!("{}/v1/events", pod.url()),
        &events,
    )
    .await?;
    ensure!(status == 200, "{body}");
    pod.kill();
    let volume = capture::inspect(&buf)?["volume_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(!volume.is_empty(), "inspect shows no volume id");

    let mut args = EXACTLY_ONCE.to_vec();
    args.extend(["--transaction-events", "20"]);
    let (exit, log) = tokio::task::spawn_blocking({
        let (buf, bootstrap) = (buf.clone(), kafka.bootstrap());
        move || capture::flush_with(&buf, &bootstrap, 60, &args)
    })
    .await??;
    ensure!(exit.success(), "flush failed: {log}");

    let checkpoints: Vec<i64> = kafka
        .consume_with(
            "holdfast.checkpoints",
            &ConsumeOptions::new(usize::MAX, Duration::from_secs(10)),
        )
        .await?
        .iter()
        .filter(|r| r.key_str() == Some(volume.as_str()))
        .filter_map(|r| serde_json::from_str::<Value>(r.payload_str()?).ok())
        .filter_map(|v| v["last_seq"].as_i64())
        .collect();
    ensure!(
        checkpoints == [20, 40, 60, 80, 95],
        "committed checkpoints {checkpoints:?}, want one per 20 events"
    );
    let seen = committed_uuids(&kafka, "events", events.len()).await?;
    let want = uuids(&events);
    let missing = want.iter().filter(|u| !seen.contains_key(*u)).count();
    let twice = seen.values().filter(|n| **n > 1).count();
    ensure!(
        missing == 0 && twice == 0,
        "{missing} missing, {twice} twice"
    );
    Ok(())
}
