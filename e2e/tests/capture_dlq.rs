//! Issue 9 item 3, the hostile side: a dead-letter topic that does not exist
//! must not hold up delivery of everything else. Copies to a missing topic
//! hang in librdkafka until the message timeout; before the copies moved to a
//! background task the forwarder awaited each one inline, so every pass of
//! the main queue waited that long behind them.

#[allow(dead_code)]
mod edges_support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Result;
use edges_support::*;
use holdfast_e2e::capture::CaptureProcess;

/// librdkafka's wait for a missing topic and for a send: long, so a stall
/// behind the dead-letter copy would be plain to see.
const SLOW: [&str; 4] = [
    "--kafka-message-timeout-ms",
    "20000",
    "--kafka-property",
    "topic.metadata.propagation.max.ms=20000",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_topic_never_holds_up_delivery() -> Result<()> {
    let kafka = broker_without_auto_create().await?;
    // The broker refuses records over 1,000 bytes on this topic: an event
    // larger than that is poison, and its copy goes to a topic that is missing.
    kafka
        .create_topic("events", 1, &[("max.message.bytes", "1000")])
        .await?;
    let dir = tempdir();
    let buf = dir.path().join("buf");
    let mut args = vec!["--dead-letter-topic", "missing.dlq"];
    args.extend(SLOW);
    let cap = CaptureProcess::start(&buf, &kafka.bootstrap(), &args).await?;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/events", cap.url());

    let poison = events_with_pad(1, 3000);
    let (status, body) = post(&client, &url, &poison).await?;
    assert_eq!(status, 200, "{body}");
    wait_until(
        "the oversized event to be dead-lettered",
        Duration::from_secs(30),
        || inspect(&buf)["dead_letters"] == 1,
    )
    .await?;

    // Delivery goes on while the copy waits for a topic that never comes.
    let mut slowest = Duration::ZERO;
    for round in 0..5 {
        let batch = events_with_pad(10, 20);
        let sent = Instant::now();
        let (status, body) = post(&client, &url, &batch).await?;
        assert_eq!(status, 200, "{body}");
        let want: HashSet<String> = uuids(&batch).into_iter().collect();
        wait_delivered(&kafka, "events", &want, Duration::from_secs(60)).await?;
        let took = sent.elapsed();
        slowest = slowest.max(took);
        assert!(
            took < Duration::from_secs(8),
            "round {round}: delivery took {took:?} behind a dead-letter copy to a missing topic"
        );
    }
    let s = inspect(&buf);
    assert_eq!(
        (s["dead_letters"].as_u64(), s["events"].as_u64()),
        (Some(1), Some(0)),
        "the dead letter is kept until the topic has it, everything else delivered: {s}"
    );
    eprintln!("dead-letter topic missing: slowest delivery {slowest:?}");
    Ok(())
}
