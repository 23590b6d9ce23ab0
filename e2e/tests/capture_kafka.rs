//! The capture service against a real Apache Kafka broker: round trip, crash
//! safety under SIGKILL, broker outage, quota, poison, SIGTERM drain, flush.
//! Each test runs its own broker and its own `holdfast-capture` process.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use holdfast_e2e::capture::{self, CaptureProcess};
use holdfast_e2e::kafka::{KafkaBroker, Record};
use serde_json::json;

const UUID_HEADER: &str = "holdfast-uuid";

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("holdfast-capture-e2e-")
        .tempdir()
        .unwrap()
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
    gzip: bool,
) -> reqwest::Result<reqwest::Response> {
    let mut req = client
        .post(url)
        .header("content-type", content_type)
        .body(body);
    if gzip {
        req = req.header("content-encoding", "gzip");
    }
    req.send().await
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn uuid_of(r: &Record) -> String {
    String::from_utf8(r.header(UUID_HEADER).expect("uuid header").to_vec()).unwrap()
}

/// Counts records by uuid header: (distinct, duplicates).
fn tally(records: &[Record]) -> (HashMap<String, usize>, usize) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in records {
        *seen.entry(uuid_of(r)).or_default() += 1;
    }
    let dups = seen.values().map(|n| n - 1).sum();
    (seen, dups)
}

/// Records currently in `topic`, duplicates included.
async fn records_in(bootstrap: &str, topic: &str) -> Result<usize> {
    holdfast_e2e::kafka::record_count(bootstrap, topic).await
}

async fn wait_until<F: FnMut() -> bool>(what: &str, within: Duration, mut f: F) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn buffered(dir: &std::path::Path) -> u64 {
    capture::inspect(dir).unwrap()["events"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_of_ten_thousand_events_in_mixed_formats() -> Result<()> {
    let kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 3, &[]).await?;
    kafka.create_topic("web.clicks", 3, &[]).await?;
    let dir = tempdir();
    let cap = CaptureProcess::start(
        &dir.path().join("buf"),
        &kafka.bootstrap(),
        &[
            "--stream",
            "default=events",
            "--stream",
            "clicks=web.clicks",
        ],
    )
    .await?;
    let client = reqwest::Client::new();
    let mut expected: HashMap<String, (String, Option<String>)> = HashMap::new();
    let mut sent = 0usize;
    let mut round = 0usize;
    while sent < 10_000 {
        round += 1;
        let stream = if round.is_multiple_of(2) {
            "clicks"
        } else {
            "default"
        };
        let topic = if stream == "clicks" {
            "web.clicks"
        } else {
            "events"
        };
        let url = if stream == "default" {
            format!("{}/v1/events", cap.url())
        } else {
            format!("{}/v1/events/clicks", cap.url())
        };
        let n = (10_000 - sent).min(1 + round % 97);
        let events: Vec<serde_json::Value> = (0..n)
            .map(|i| {
                let id = uuid::Uuid::now_v7().to_string();
                let key = (i % 3 == 0).then(|| format!("user-{}", (sent + i) % 17));
                expected.insert(id.clone(), (topic.to_owned(), key.clone()));
                let mut e = json!({"uuid": id, "n": sent + i, "round": round});
                if let Some(k) = key {
                    e["key"] = json!(k);
                }
                e
            })
            .collect();
        let resp = match round % 4 {
            0 if n == 1 => {
                post(
                    &client,
                    &url,
                    "application/json",
                    events[0].to_string(),
                    false,
                )
                .await?
            }
            0 | 1 => {
                post(
                    &client,
                    &url,
                    "application/json",
                    serde_json::to_vec(&events)?,
                    false,
                )
                .await?
            }
            2 => {
                let nd: String = events.iter().map(|e| format!("{e}\n")).collect();
                post(&client, &url, "application/x-ndjson", nd, false).await?
            }
            _ => {
                let body = gz(&serde_json::to_vec(&events)?);
                post(&client, &url, "application/json", body, true).await?
            }
        };
        assert_eq!(resp.status(), 200, "{}", resp.text().await?);
        sent += n;
    }
    let mut records = kafka
        .consume("events", 10_000, Duration::from_secs(60))
        .await?;
    let events_count = records.len();
    records.extend(
        kafka
            .consume("web.clicks", 10_000 - events_count, Duration::from_secs(60))
            .await?,
    );
    let (seen, dups) = tally(&records);
    assert_eq!(dups, 0, "duplicates in a clean run");
    assert_eq!(seen.len(), 10_000);
    for r in &records {
        let id = uuid_of(r);
        let (topic, key) = &expected[&id];
        assert_eq!(&r.topic, topic, "event {id} routed to the wrong topic");
        let want_key = key.clone().unwrap_or_else(|| id.clone());
        assert_eq!(r.key_str(), Some(want_key.as_str()), "event {id} key");
        let payload: serde_json::Value = serde_json::from_slice(r.payload.as_ref().unwrap())?;
        assert_eq!(payload["uuid"], json!(id));
        assert!(r.header("holdfast-captured-at").is_some());
    }
    wait_until("buffer to empty", Duration::from_secs(30), || {
        buffered(cap.data_dir()) == 0
    })
    .await;
    Ok(())
}

/// Posts batches of events with client uuids until `stop`; returns acked uuids.
async fn post_continuously(
    url: String,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicUsize>,
) -> (HashSet<String>, usize) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut acked = HashSet::new();
    let mut failed = 0usize;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let events: Vec<serde_json::Value> = (0..10)
            .map(|j| json!({"uuid": uuid::Uuid::now_v7().to_string(), "i": i * 10 + j}))
            .collect();
        i += 1;
        match post(
            &client,
            &url,
            "application/json",
            serde_json::to_vec(&events).unwrap(),
            false,
        )
        .await
        {
            Ok(r) if r.status() == 200 => {
                for e in &events {
                    acked.insert(e["uuid"].as_str().unwrap().to_owned());
                }
                progress.store(acked.len(), Ordering::Relaxed);
            }
            // Refused or cut off by the kill: the client would retry; not acked.
            _ => {
                failed += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    (acked, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_event_survives_repeated_sigkill() -> Result<()> {
    let kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 3, &[]).await?;
    let dir = tempdir();
    let mut cap = CaptureProcess::start(&dir.path().join("buf"), &kafka.bootstrap(), &[]).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(post_continuously(
        format!("{}/v1/events", cap.url()),
        stop.clone(),
        progress.clone(),
    ));
    // Kill whenever the client got another 500 acknowledgements through.
    let mut target = 0;
    for kill in 0..5 {
        target += 500;
        wait_until("client progress", Duration::from_secs(60), || {
            progress.load(Ordering::Relaxed) >= target
        })
        .await;
        cap.kill();
        eprintln!(
            "kill {kill}: SIGKILL after {} acked",
            progress.load(Ordering::Relaxed)
        );
        cap.restart().await?;
    }
    target += 500;
    wait_until("client progress", Duration::from_secs(60), || {
        progress.load(Ordering::Relaxed) >= target
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (acked, failed) = writer.await?;
    assert!(acked.len() > 100, "only {} events acked", acked.len());
    wait_until("buffer to drain", Duration::from_secs(60), || {
        buffered(cap.data_dir()) == 0
    })
    .await;
    // Read everything in the topic: duplicates make it more than acked.len().
    let total = records_in(&kafka.bootstrap(), "events").await?;
    let records = kafka
        .consume("events", total, Duration::from_secs(60))
        .await?;
    let (seen, dups) = tally(&records);
    let lost: Vec<&String> = acked.iter().filter(|u| !seen.contains_key(*u)).collect();
    eprintln!(
        "sigkill x5: acked {} events, {} requests failed, found {} in kafka, {} duplicates, {} lost",
        acked.len(),
        failed,
        seen.len(),
        dups,
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged events lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_outage_keeps_accepting_and_delivers_after_return() -> Result<()> {
    let mut kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 1, &[]).await?;
    let dir = tempdir();
    let cap = CaptureProcess::start(
        &dir.path().join("buf"),
        &kafka.bootstrap(),
        &["--kafka-message-timeout-ms", "5000"],
    )
    .await?;
    kafka.stop().await?;
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..50 {
        let id = uuid::Uuid::now_v7().to_string();
        let r = post(
            &client,
            &format!("{}/v1/events", cap.url()),
            "application/json",
            json!({"uuid": id, "i": i}).to_string(),
            false,
        )
        .await?;
        assert_eq!(r.status(), 200);
        ids.push(id);
    }
    let ready = client.get(format!("{}/readyz", cap.url())).send().await?;
    assert_eq!(
        ready.status(),
        200,
        "a kafka outage must not make the pod unready"
    );
    assert_eq!(buffered(cap.data_dir()), 50);
    kafka.restart().await?;
    let records = kafka.consume("events", 50, Duration::from_secs(90)).await?;
    let (seen, _) = tally(&records);
    for id in &ids {
        assert!(
            seen.contains_key(id),
            "event {id} not delivered after kafka returned"
        );
    }
    wait_until("buffer to drain", Duration::from_secs(30), || {
        buffered(cap.data_dir()) == 0
    })
    .await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_writes_nothing() -> Result<()> {
    let mut kafka = KafkaBroker::start().await?;
    let dir = tempdir();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "t0ken\n")?;
    let cap = CaptureProcess::start(
        &dir.path().join("buf"),
        &kafka.bootstrap(),
        &[
            "--auth-tokens-file",
            tokens.to_str().unwrap(),
            "--max-event-bytes",
            "100",
        ],
    )
    .await?;
    // Nothing may reach the buffer, so Kafka is not even needed from here on.
    kafka.stop().await?;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/events", cap.url());
    let authed = |b: reqwest::RequestBuilder| b.bearer_auth("t0ken");
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            authed(client.post(&url))
                .header("content-type", "application/json")
                .body("{\"a\":"),
            400,
            "malformed_json",
        ),
        (
            authed(client.post(&url))
                .header("content-type", "application/json")
                .body(format!("[{{\"a\":1}},{{\"pad\":\"{}\"}}]", "x".repeat(200))),
            413,
            "event_too_large",
        ),
        (
            authed(client.post(&url))
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body("not gzip at all"),
            400,
            "bad_gzip",
        ),
        (
            authed(client.post(&url))
                .header("content-type", "text/csv")
                .body("a,b"),
            415,
            "unsupported_media_type",
        ),
        (
            client
                .post(&url)
                .header("content-type", "application/json")
                .body("{\"a\":1}"),
            401,
            "unauthorized",
        ),
    ];
    for (req, status, reason) in cases {
        let r = req.send().await?;
        assert_eq!(r.status().as_u16(), status);
        let body: serde_json::Value = r.json().await?;
        assert_eq!(body["error"], reason, "{body}");
    }
    assert_eq!(
        buffered(cap.data_dir()),
        0,
        "a rejected request wrote something"
    );
    let ok = authed(client.post(&url))
        .header("content-type", "application/json")
        .body("{\"a\":1}")
        .send()
        .await?;
    assert_eq!(ok.status(), 200);
    assert_eq!(buffered(cap.data_dir()), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_buffer_answers_503_until_kafka_drains_it() -> Result<()> {
    let mut kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 1, &[]).await?;
    let dir = tempdir();
    let cap = CaptureProcess::start(
        &dir.path().join("buf"),
        &kafka.bootstrap(),
        &["--buffer-quota-bytes", "20000", "--retry-after-secs", "2"],
    )
    .await?;
    kafka.stop().await?;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/events", cap.url());
    let body = serde_json::to_vec(
        &(0..10)
            .map(|i| json!({"i": i, "pad": "x".repeat(100)}))
            .collect::<Vec<_>>(),
    )?;
    let mut accepted = 0;
    let full = loop {
        let r = post(&client, &url, "application/json", body.clone(), false).await?;
        if r.status() == 503 {
            break r;
        }
        assert_eq!(r.status(), 200);
        accepted += 1;
        assert!(accepted < 100, "quota never reached");
    };
    assert_eq!(full.headers()["retry-after"], "2");
    let ready = client.get(format!("{}/readyz", cap.url())).send().await?;
    assert_eq!(ready.status(), 503);
    kafka.restart().await?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = post(&client, &url, "application/json", body.clone(), false).await?;
        if r.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still refusing after kafka returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Ready again once the drain brought the buffer under 90% of its quota.
    let deadline = Instant::now() + Duration::from_secs(60);
    while client
        .get(format!("{}/readyz", cap.url()))
        .send()
        .await?
        .status()
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "never ready again after draining"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_event_goes_to_dead_letters_and_the_rest_flows() -> Result<()> {
    let kafka = KafkaBroker::start().await?;
    kafka
        .create_topic("events", 1, &[("max.message.bytes", "2000")])
        .await?;
    kafka.create_topic("events.dlq", 1, &[]).await?;
    let dir = tempdir();
    let cap = CaptureProcess::start(
        &dir.path().join("buf"),
        &kafka.bootstrap(),
        &["--dead-letter-topic", "events.dlq"],
    )
    .await?;
    let client = reqwest::Client::new();
    let poison = uuid::Uuid::now_v7().to_string();
    let mut good = Vec::new();
    let mut events = Vec::new();
    for i in 0..20 {
        if i == 5 {
            events.push(json!({"uuid": poison, "pad": "p".repeat(5000)}));
        } else {
            let id = uuid::Uuid::now_v7().to_string();
            events.push(json!({"uuid": id, "i": i}));
            good.push(id);
        }
    }
    let r = post(
        &client,
        &format!("{}/v1/events", cap.url()),
        "application/json",
        serde_json::to_vec(&events)?,
        false,
    )
    .await?;
    assert_eq!(r.status(), 200);
    let records = kafka.consume("events", 19, Duration::from_secs(60)).await?;
    let (seen, _) = tally(&records);
    for id in &good {
        assert!(seen.contains_key(id), "good event {id} blocked by poison");
    }
    assert!(!seen.contains_key(&poison));
    let dlq = kafka
        .consume("events.dlq", 1, Duration::from_secs(30))
        .await?;
    // The copy is tracked: once the dead-letter topic acknowledged it, the
    // buffer forgets the dead letter (until then it keeps the volume dirty).
    wait_until(
        "dead letter copied and forgotten",
        Duration::from_secs(30),
        || {
            let s = capture::inspect(cap.data_dir()).unwrap();
            s["dead_letters"] == 0 && s["events"] == 0
        },
    )
    .await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(uuid_of(&dlq[0]), poison);
    let reason = String::from_utf8_lossy(dlq[0].header("holdfast-dead-letter-reason").unwrap());
    assert!(reason.starts_with("too_large"), "{reason}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_buffer_and_exits_zero() -> Result<()> {
    let kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 3, &[]).await?;
    let dir = tempdir();
    // Small forward batches so events are still buffered when SIGTERM lands.
    let mut cap = CaptureProcess::start(
        &dir.path().join("buf"),
        &kafka.bootstrap(),
        &["--forward-batch-events", "50"],
    )
    .await?;
    let client = reqwest::Client::new();
    let body = serde_json::to_vec(&(0..1000).map(|i| json!({"i": i})).collect::<Vec<_>>())?;
    for _ in 0..5 {
        let r = post(
            &client,
            &format!("{}/v1/events", cap.url()),
            "application/json",
            body.clone(),
            false,
        )
        .await?;
        assert_eq!(r.status(), 200);
    }
    cap.terminate()?;
    let status = cap.wait_exit(Duration::from_secs(30)).await?;
    assert!(status.success(), "exit status {status}");
    let s = capture::inspect(&dir.path().join("buf"))?;
    assert_eq!(s["events"], 0);
    assert_eq!(s["clean"], true);
    let records = kafka
        .consume("events", 5000, Duration::from_secs(60))
        .await?;
    assert_eq!(tally(&records).0.len(), 5000);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_drains_a_directory_left_by_a_killed_process() -> Result<()> {
    let mut kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 1, &[]).await?;
    let dir = tempdir();
    let buf = dir.path().join("buf");
    let mut cap = CaptureProcess::start(&buf, &kafka.bootstrap(), &[]).await?;
    kafka.stop().await?;
    let client = reqwest::Client::new();
    let events: Vec<serde_json::Value> = (0..200)
        .map(|i| json!({"uuid": uuid::Uuid::now_v7().to_string(), "i": i}))
        .collect();
    let r = post(
        &client,
        &format!("{}/v1/events", cap.url()),
        "application/json",
        serde_json::to_vec(&events)?,
        false,
    )
    .await?;
    assert_eq!(r.status(), 200);
    cap.kill();
    assert_eq!(buffered(&buf), 200);
    // With Kafka still down, flush gives up with a clear message and non-zero exit.
    let (status, stderr) = capture::flush(&buf, &kafka.bootstrap(), 3)?;
    assert!(!status.success());
    assert!(stderr.contains("200 events remain"), "{stderr}");
    kafka.restart().await?;
    let (status, stderr) = capture::flush(&buf, &kafka.bootstrap(), 120)?;
    assert!(status.success(), "flush failed: {stderr}");
    let s = capture::inspect(&buf)?;
    assert_eq!(
        (s["events"].as_u64(), s["clean"].as_bool()),
        (Some(0), Some(true))
    );
    let records = kafka
        .consume("events", 200, Duration::from_secs(60))
        .await?;
    let (seen, _) = tally(&records);
    for e in &events {
        assert!(seen.contains_key(e["uuid"].as_str().unwrap()));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_stream_answers_after_kafka_ack_and_503_without_kafka() -> Result<()> {
    let mut kafka = KafkaBroker::start().await?;
    kafka.create_topic("metrics", 1, &[]).await?;
    let dir = tempdir();
    let cap = CaptureProcess::start(
        &dir.path().join("buf"),
        &kafka.bootstrap(),
        &[
            "--stream",
            "default=events",
            "--stream",
            "m=metrics:direct",
            "--kafka-message-timeout-ms",
            "3000",
        ],
    )
    .await?;
    let client = reqwest::Client::new();
    // An idle pod still reports whether Kafka answers.
    wait_for_metric(&client, &cap.url(), "holdfast_kafka_up 1").await?;
    let url = format!("{}/v1/events/m", cap.url());
    let id = uuid::Uuid::now_v7().to_string();
    let r = post(
        &client,
        &url,
        "application/json",
        json!({"uuid": id}).to_string(),
        false,
    )
    .await?;
    assert_eq!(r.status(), 200);
    // Already in Kafka when the 200 arrived; never on disk.
    assert_eq!(capture::inspect(cap.data_dir())?["last_seq"], 0);
    let records = kafka.consume("metrics", 1, Duration::from_secs(30)).await?;
    assert_eq!(uuid_of(&records[0]), id);
    kafka.stop().await?;
    let r = post(
        &client,
        &url,
        "application/json",
        json!({"a": 1}).to_string(),
        false,
    )
    .await?;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await?;
    assert_eq!(body["error"], "kafka_unavailable");
    wait_for_metric(&client, &cap.url(), "holdfast_kafka_up 0").await?;
    Ok(())
}

/// Polls `/metrics` until it holds `line`.
async fn wait_for_metric(client: &reqwest::Client, url: &str, line: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = client
            .get(format!("{url}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        if text.lines().any(|l| l == line) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "metrics never showed {line:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_without_kafka_keeps_events_and_exits_by_the_deadline() -> Result<()> {
    let mut kafka = KafkaBroker::start().await?;
    let dir = tempdir();
    let buf = dir.path().join("buf");
    let mut cap =
        CaptureProcess::start(&buf, &kafka.bootstrap(), &["--drain-timeout-secs", "2"]).await?;
    kafka.stop().await?;
    let client = reqwest::Client::new();
    let body = serde_json::to_vec(&(0..100).map(|i| json!({"i": i})).collect::<Vec<_>>())?;
    let r = post(
        &client,
        &format!("{}/v1/events", cap.url()),
        "application/json",
        body,
        false,
    )
    .await?;
    assert_eq!(r.status(), 200);
    let started = Instant::now();
    cap.terminate()?;
    let status = cap.wait_exit(Duration::from_secs(20)).await?;
    assert!(status.success(), "exit status {status}");
    eprintln!("shutdown with kafka down took {:?}", started.elapsed());
    let s = capture::inspect(&buf)?;
    assert_eq!(
        (s["events"].as_u64(), s["clean"].as_bool()),
        (Some(100), Some(false))
    );
    Ok(())
}

/// A tmpfs of a fixed size, unmounted on drop: a disk that really fills up.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()?;
        anyhow::ensure!(status.success(), "mount tmpfs failed (needs root)");
        Ok(Self(dir.to_owned()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_answers_503_and_loses_no_acknowledged_event() -> Result<()> {
    let mut kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 1, &[]).await?;
    let dir = tempdir();
    let buf = dir.path().join("buf");
    let _disk = SmallDisk::mount(&buf, "2m")?;
    let cap = CaptureProcess::start(
        &buf,
        &kafka.bootstrap(),
        &["--disk-reserve-bytes", "262144"],
    )
    .await?;
    kafka.stop().await?;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/events", cap.url());
    let mut acked = Vec::new();
    let refused = loop {
        let events: Vec<serde_json::Value> = (0..20)
            .map(|_| json!({"uuid": uuid::Uuid::now_v7().to_string(), "pad": "d".repeat(400)}))
            .collect();
        let r = post(
            &client,
            &url,
            "application/json",
            serde_json::to_vec(&events)?,
            false,
        )
        .await?;
        if r.status() != 200 {
            break r;
        }
        acked.extend(
            events
                .iter()
                .map(|e| e["uuid"].as_str().unwrap().to_owned()),
        );
        assert!(acked.len() < 100_000, "the disk never filled");
    };
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let ready = client.get(format!("{}/readyz", cap.url())).send().await?;
    assert_eq!(
        ready.status(),
        503,
        "a pod with a full disk must turn unready"
    );
    eprintln!("disk full after {} acked events", acked.len());
    kafka.restart().await?;
    // Wait until everything acknowledged is in Kafka (duplicates may come first).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = HashMap::new();
    while Instant::now() < deadline {
        let total = records_in(&kafka.bootstrap(), "events").await?;
        if total >= acked.len() {
            let records = kafka
                .consume("events", total, Duration::from_secs(60))
                .await?;
            seen = tally(&records).0;
            if acked.iter().all(|u| seen.contains_key(u)) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let lost = acked.iter().filter(|u| !seen.contains_key(*u)).count();
    assert_eq!(
        lost,
        0,
        "{lost} acknowledged events lost on a full disk; log:\n{}",
        cap.log_tail()
    );
    Ok(())
}
