//! Issue 12, part 2, "idempotent ingestion", on the real binary and a real
//! Kafka broker: a client that retries (the same uuids) gets its 200 with
//! the same count again, and each event reaches Kafka once, whether the
//! first copy is still buffered or already delivered, and across a SIGKILL
//! that cut the first response.
//!
//! Each test ends with a sentinel event posted last and waited for: the
//! topic has one partition and the buffer delivers in order, so a duplicate
//! stored by a retry would reach Kafka before the sentinel does.

#[allow(dead_code)]
mod edges_support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use edges_support::*;
use holdfast_e2e::capture::CaptureProcess;
use holdfast_e2e::kafka::KafkaBroker;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

const TOPIC: &str = "events";

/// Posts a sentinel, waits for it, and returns how often each uuid of the
/// topic was delivered.
async fn deliveries_after_sentinel(
    kafka: &KafkaBroker,
    http: &reqwest::Client,
    url: &str,
) -> Result<HashMap<String, usize>> {
    let sentinel = events_with_pad(1, 8);
    let (status, _) = post(http, url, &sentinel).await?;
    ensure!(status == 200, "sentinel refused with {status}");
    let want: HashSet<String> = uuids(&sentinel).into_iter().collect();
    wait_delivered(kafka, TOPIC, &want, Duration::from_secs(60)).await
}

fn assert_once(seen: &HashMap<String, usize>, batch: &[Value]) {
    let counts: Vec<usize> = uuids(batch)
        .iter()
        .map(|u| seen.get(u).copied().unwrap_or(0))
        .collect();
    assert!(
        counts.iter().all(|&n| n == 1),
        "each uuid must reach Kafka once; counts {counts:?}"
    );
}

fn buffered_events(dir: &std::path::Path) -> u64 {
    inspect(dir)["events"].as_u64().unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_batch_posted_again_is_acknowledged_alike_and_delivered_once() -> Result<()> {
    let kafka = KafkaBroker::start().await?;
    kafka.create_topic(TOPIC, 1, &[]).await?;
    let dir = tempdir();
    let cap = CaptureProcess::start(&dir.path().join("buf"), &kafka.bootstrap(), &[]).await?;
    let url = format!("{}/v1/events", cap.url());
    let http = reqwest::Client::new();
    let batch = events_with_pad(50, 100);
    let accepted = json!({"accepted": 50});
    // Twice at once: the second lands while the first is still buffered
    // (or in the same group commit).
    let (a, b) = tokio::join!(post(&http, &url, &batch), post(&http, &url, &batch));
    assert_eq!((a?, b?), ((200, accepted.clone()), (200, accepted.clone())));
    let want: HashSet<String> = uuids(&batch).into_iter().collect();
    wait_delivered(&kafka, TOPIC, &want, Duration::from_secs(60)).await?;
    wait_until("the batch settled", Duration::from_secs(30), || {
        buffered_events(cap.data_dir()) == 0
    })
    .await?;
    // Again once delivered: answered from the window, the same way.
    assert_eq!(post(&http, &url, &batch).await?, (200, accepted));
    // A retry that carries one more event stores that one only, and a
    // request repeating an event inside itself stores it once.
    let mut more = batch.clone();
    more.extend(events_with_pad(1, 100));
    more.push(more[50].clone());
    assert_eq!(
        post(&http, &url, &more).await?,
        (200, json!({"accepted": 52}))
    );
    let seen = deliveries_after_sentinel(&kafka, &http, &url).await?;
    assert_once(&seen, &more);
    assert_eq!(seen.values().sum::<usize>(), 52, "{seen:?}");
    Ok(())
}

/// Sends `events` on a raw connection and reads only the status line, as a
/// client whose connection died right after the server answered would.
async fn post_and_lose_the_answer(url: &str, events: &[Value]) -> Result<u16> {
    let body = serde_json::to_vec(events)?;
    let mut s = tokio::net::TcpStream::connect(url.trim_start_matches("http://")).await?;
    s.write_all(
        format!(
            "POST /v1/events HTTP/1.1\r\nhost: capture\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    s.write_all(&body).await?;
    let (status, _) = tokio::time::timeout(Duration::from_secs(10), read_response(&mut s))
        .await
        .context("no answer")??;
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_retried_after_a_sigkill_cut_its_response_is_delivered_once() -> Result<()> {
    let mut kafka = KafkaBroker::start().await?;
    kafka.create_topic(TOPIC, 1, &[]).await?;
    let dir = tempdir();
    let buf = dir.path().join("buf");
    let mut cap = CaptureProcess::start(&buf, &kafka.bootstrap(), &[]).await?;
    let url = cap.url();
    let http = reqwest::Client::new();

    // Delivered before the kill: the retry meets the window, read back from
    // the file by the restarted process.
    let delivered = events_with_pad(20, 100);
    assert_eq!(post_and_lose_the_answer(&url, &delivered).await?, 200);
    let want: HashSet<String> = uuids(&delivered).into_iter().collect();
    wait_delivered(&kafka, TOPIC, &want, Duration::from_secs(60)).await?;
    wait_until("the batch settled", Duration::from_secs(30), || {
        buffered_events(&buf) == 0
    })
    .await?;
    cap.restart().await?;
    let events_url = format!("{}/v1/events", cap.url());
    assert_eq!(
        post(&http, &events_url, &delivered).await?,
        (200, json!({"accepted": 20}))
    );
    ensure!(
        buffered_events(&buf) == 0,
        "the retry of a delivered batch must not be stored"
    );

    // Still buffered at the kill (Kafka is down): the retry meets the queue.
    kafka.kill();
    let buffered = events_with_pad(30, 100);
    assert_eq!(post_and_lose_the_answer(&url, &buffered).await?, 200);
    ensure!(
        buffered_events(&buf) == 30,
        "the batch should wait in the buffer"
    );
    cap.restart().await?;
    assert_eq!(
        post(&http, &events_url, &buffered).await?,
        (200, json!({"accepted": 30}))
    );
    ensure!(buffered_events(&buf) == 30, "the retry must not be stored");
    kafka.restart().await?;

    let seen = deliveries_after_sentinel(&kafka, &http, &events_url).await?;
    assert_once(&seen, &delivered);
    assert_once(&seen, &buffered);
    assert_eq!(seen.values().sum::<usize>(), 51, "{seen:?}");
    Ok(())
}
