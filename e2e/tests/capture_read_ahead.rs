//! The forwarder reads the next batch while one is delivered, past the
//! batch it holds. That cursor must never pass over a parked topic's events:
//! once the topic comes back, its oldest events go first, while another
//! stream keeps every round clean (the condition under which a read ahead
//! is used).

#[allow(dead_code)]
mod edges_support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;
use edges_support::*;
use holdfast_e2e::capture::CaptureProcess;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_topic_keeps_its_order_while_another_stream_flows() -> Result<()> {
    let kafka = broker_without_auto_create().await?;
    kafka.create_topic("flowing", 1, &[]).await?;
    let dir = tempdir();
    let buf = dir.path().join("buf");
    let args = [
        "--stream",
        "default=flowing",
        "--stream",
        "late=late.topic",
        "--poison-retry-window-secs",
        "120",
        "--kafka-property",
        "topic.metadata.propagation.max.ms=1000",
    ];
    let cap = CaptureProcess::start(&buf, &kafka.bootstrap(), &args).await?;
    let client = reqwest::Client::new();
    let late_url = format!("{}/v1/events/late", cap.url());
    // Posted while the topic is missing: parked, kept.
    let mut order: Vec<String> = Vec::new();
    for _ in 0..5 {
        let batch = events_with_pad(20, 50);
        let (status, body) = post(&client, &late_url, &batch).await?;
        assert_eq!(status, 200, "{body}");
        order.extend(uuids(&batch));
    }
    wait_until("kafka to refuse the topic", Duration::from_secs(30), || {
        cap.log_text().contains("kafka refused the topic")
    })
    .await?;
    // Another stream flows all along: every round is clean.
    let stop = Arc::new(AtomicBool::new(false));
    let flowing = tokio::spawn({
        let (client, url, stop) = (
            client.clone(),
            format!("{}/v1/events", cap.url()),
            stop.clone(),
        );
        async move {
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = post(&client, &url, &events_with_pad(50, 50)).await?;
                anyhow::ensure!(status == 200, "{body}");
            }
            anyhow::Ok(())
        }
    });
    kafka.create_topic("late.topic", 1, &[]).await?;
    // Newer events of the topic, posted while its old ones wait to be retried.
    for _ in 0..20 {
        let batch = events_with_pad(5, 50);
        let (status, body) = post(&client, &late_url, &batch).await?;
        assert_eq!(status, 200, "{body}");
        order.extend(uuids(&batch));
        // Pacing, not synchronisation: spread the newer events over the
        // parked topic's retries.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let want: HashSet<String> = order.iter().cloned().collect();
    wait_delivered(&kafka, "late.topic", &want, Duration::from_secs(90)).await?;
    stop.store(true, Ordering::Relaxed);
    flowing.await??;
    let records = kafka
        .consume("late.topic", order.len(), Duration::from_secs(30))
        .await?;
    let got: Vec<String> = records.iter().filter_map(record_uuid).collect();
    let first: Vec<String> = dedup_in_order(got);
    assert_eq!(
        first, order,
        "the late topic's events reached Kafka out of order (first sightings)"
    );
    Ok(())
}

fn record_uuid(r: &holdfast_e2e::kafka::Record) -> Option<String> {
    r.header("holdfast-uuid")
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Each uuid at its first sighting (at least once: a resend may repeat one).
fn dedup_in_order(uuids: Vec<String>) -> Vec<String> {
    let mut seen = HashSet::new();
    uuids
        .into_iter()
        .filter(|u| seen.insert(u.clone()))
        .collect()
}
