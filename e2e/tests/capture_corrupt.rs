//! A damaged buffer never wedges a pod (issue 9, item 11), with the real
//! binary and a real Kafka broker: events are buffered while Kafka is out of
//! reach, the process stops, a page in the middle of `buffer.db` is
//! overwritten with garbage, and then
//! - `serve` starts anyway (ready), takes new events, and every old event
//!   that was not on the overwritten page reaches Kafka;
//! - `flush` salvages the same way and reports what it could not read.
//!
//! The events lost are known exactly: each cell of a table leaf holds the
//! event's JSON, so the uuids written on the overwritten page are the ones
//! gone.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use holdfast_e2e::capture::{self, CaptureProcess};
use holdfast_e2e::kafka::{KafkaBroker, Record};
use serde_json::json;

const PAGE: usize = 4096;
/// Kafka out of reach: events stay in the buffer.
const NO_KAFKA: &str = "127.0.0.1:9";

fn uuid_of(r: &Record) -> String {
    String::from_utf8(r.header("holdfast-uuid").expect("uuid header").to_vec()).unwrap()
}

/// Posts `n` events in requests of 100; returns their uuids.
async fn post_events(url: &str, n: usize, tag: &str) -> Result<Vec<String>> {
    let client = reqwest::Client::new();
    let mut uuids = Vec::with_capacity(n);
    for start in (0..n).step_by(100) {
        let batch: Vec<serde_json::Value> = (start..(start + 100).min(n))
            .map(|i| {
                let id = uuid::Uuid::now_v7().to_string();
                uuids.push(id.clone());
                json!({"uuid": id, "tag": tag, "n": i, "pad": "p".repeat(120)})
            })
            .collect();
        let r = client
            .post(format!("{url}/v1/events"))
            .json(&batch)
            .send()
            .await?;
        ensure!(r.status() == 200, "post answered {}", r.status());
    }
    Ok(uuids)
}

/// Buffers `n` events with Kafka out of reach and stops the pod with
/// SIGTERM, leaving a checkpointed `buffer.db` (no WAL) behind.
async fn buffer_events(dir: &Path, n: usize) -> Result<Vec<String>> {
    let mut cap = CaptureProcess::start(dir, NO_KAFKA, &["--drain-timeout-secs", "1"]).await?;
    let uuids = post_events(&cap.url(), n, "old").await?;
    cap.terminate()?;
    cap.wait_exit(Duration::from_secs(30)).await?;
    let wal = dir.join("buffer.db-wal");
    ensure!(
        std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) == 0,
        "a WAL is left: the test page may be superseded by it"
    );
    Ok(uuids)
}

/// Overwrites a table leaf in the middle of `buffer.db` with garbage and
/// returns the uuids that were written on it.
fn overwrite_a_middle_leaf(dir: &Path, sent: &HashSet<String>) -> Result<HashSet<String>> {
    let db = dir.join("buffer.db");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&db)?;
    let pages = file.metadata()?.len() as usize / PAGE;
    let mut leaves = Vec::new();
    for n in 2..pages {
        let mut page = vec![0u8; PAGE];
        file.read_exact_at(&mut page, (n * PAGE) as u64)?;
        let uuids = uuids_in(&page, sent);
        if page[0] == 0x0D && !uuids.is_empty() {
            leaves.push((n, uuids));
        }
    }
    ensure!(leaves.len() > 4, "only {} leaves", leaves.len());
    let (n, lost) = leaves.swap_remove(leaves.len() / 2);
    let mut x = 0x9e37_79b9_u32;
    let junk: Vec<u8> = (0..PAGE)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8 | 1
        })
        .collect();
    file.write_all_at(&junk, (n * PAGE) as u64)?;
    file.sync_all()?;
    Ok(lost)
}

/// Uuids of `sent` that appear in `page` (after `"uuid":"` in an event's JSON).
fn uuids_in(page: &[u8], sent: &HashSet<String>) -> HashSet<String> {
    let marker = br#""uuid":""#;
    page.windows(marker.len())
        .enumerate()
        .filter(|(_, w)| *w == marker)
        .filter_map(|(i, _)| page.get(i + marker.len()..i + marker.len() + 36))
        .filter_map(|b| std::str::from_utf8(b).ok())
        .filter(|u| sent.contains(*u))
        .map(str::to_owned)
        .collect()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("holdfast-corrupt-e2e-")
        .tempdir()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_quarantines_a_damaged_buffer_serves_and_delivers_every_readable_event() -> Result<()>
{
    let kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 3, &[]).await?;
    let tmp = tempdir();
    let dir = tmp.path().join("buf");
    let old = buffer_events(&dir, 3000).await?;
    let sent: HashSet<String> = old.iter().cloned().collect();
    let lost = overwrite_a_middle_leaf(&dir, &sent)?;

    // Today: "database disk image is malformed" and the pod never starts.
    let mut cap = CaptureProcess::start(&dir, &kafka.bootstrap(), &["--drain-timeout-secs", "20"])
        .await
        .context("serve must start on a damaged buffer")?;
    let quarantine = dir.join("quarantine");
    ensure!(quarantine.is_dir(), "no quarantine folder");
    let new = post_events(&cap.url(), 500, "new").await?;

    let want = old.len() - lost.len() + new.len();
    let records = kafka
        .consume("events", want, Duration::from_secs(120))
        .await?;
    let got: HashSet<String> = records.iter().map(uuid_of).collect();
    for u in &new {
        ensure!(got.contains(u), "new event {u} missing");
    }
    let old_missing: HashSet<&String> = old.iter().filter(|u| !got.contains(*u)).collect();
    let lost_ref: HashSet<&String> = lost.iter().collect();
    ensure!(
        old_missing == lost_ref,
        "{} old events missing, {} were on the damaged page",
        old_missing.len(),
        lost.len()
    );

    // The salvage report is written once the last salvaged batch committed.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let stats = loop {
        let stats = capture::inspect(&dir)?;
        if stats["quarantined_files"] == 0 || std::time::Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(stats["quarantined_files"] == 0, "{stats}");
    ensure!(
        stats["salvaged_events"] == (old.len() - lost.len()) as u64,
        "{stats}"
    );
    ensure!(stats["unreadable_events"] == lost.len() as u64, "{stats}");
    let metrics = reqwest::get(format!("{}/metrics", cap.url()))
        .await?
        .text()
        .await?;
    let salvaged_line = format!(
        "holdfast_buffer_salvaged_events_total {}",
        old.len() - lost.len()
    );
    ensure!(metrics.contains(&salvaged_line), "{metrics}");
    ensure!(metrics.contains("holdfast_buffer_quarantined_files 0"));

    cap.terminate()?;
    let status = cap.wait_exit(Duration::from_secs(60)).await?;
    ensure!(status.success(), "serve exited with {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_salvages_a_damaged_buffer_and_reports_what_it_could_not_read() -> Result<()> {
    let kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 3, &[]).await?;
    let tmp = tempdir();
    let dir = tmp.path().join("buf");
    let old = buffer_events(&dir, 2000).await?;
    let sent: HashSet<String> = old.iter().cloned().collect();
    let lost = overwrite_a_middle_leaf(&dir, &sent)?;

    let (status, log) = capture::flush(&dir, &kafka.bootstrap(), 120)?;
    ensure!(status.success(), "flush failed on a damaged buffer: {log}");
    let want = old.len() - lost.len();
    let records = kafka
        .consume("events", want, Duration::from_secs(60))
        .await?;
    let got: HashSet<String> = records.iter().map(uuid_of).collect();
    ensure!(got.len() == want, "{} of {want} delivered", got.len());
    ensure!(got.is_disjoint(&lost) && got.is_subset(&sent));
    ensure!(log.contains("unreadable"), "flush log names no loss: {log}");

    let stats = capture::inspect(&dir)?;
    ensure!(
        stats["events"] == 0 && stats["quarantined_files"] == 0,
        "{stats}"
    );
    ensure!(stats["unreadable_events"] == lost.len() as u64, "{stats}");
    ensure!(stats["salvaged_events"] == want as u64, "{stats}");
    Ok(())
}
