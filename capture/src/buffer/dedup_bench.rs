//! What the deduplication window costs the writer, measured without HTTP:
//! 32 concurrent single-event appenders and a settler that deletes what is
//! buffered (as the forwarder does), window on and off, ordered (UUIDv7)
//! and random (UUIDv4) uuids. A benchmark, not a test:
//! `cargo test --release -p holdfast-capture --lib window_cost -- --ignored --nocapture`
//! (`HOLDFAST_BENCH_EVENTS`, default 200,000 per run).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::*;

fn event(random: bool) -> NewEvent {
    let id = if random {
        uuid::Uuid::new_v4()
    } else {
        uuid::Uuid::now_v7()
    };
    NewEvent {
        uuid: id.to_string(),
        topic: "events".into(),
        key: id.to_string().into_bytes(),
        payload: vec![b'x'; 300],
        captured_at_ms: 0,
        client_uuid: true,
    }
}

async fn run(window: Duration, random: bool, durability: Durability, total: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let opts = WriterOptions {
        dedup_window: window,
        ..WriterOptions::drain(durability)
    };
    let (w, h) = GroupCommitWriter::start_with(dir.path(), opts, None).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let settler = {
        let (h, done, path) = (h.clone(), done.clone(), dir.path().to_owned());
        tokio::spawn(async move {
            let r = open_reader(&path).unwrap();
            let mut after = 0;
            while !done.load(Ordering::Relaxed) {
                let batch: Vec<(i64, u64)> = read_batch(&r, after, 1000)
                    .unwrap()
                    .iter()
                    .map(|s| (s.seq, s.event.size()))
                    .collect();
                if let Some((last, _)) = batch.last() {
                    after = *last;
                    h.settle(batch, vec![]).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let started = Instant::now();
    let per = total / 32;
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move {
                for _ in 0..per {
                    h.append(vec![event(random)]).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let rate = (per * 32) as f64 / started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    settler.await.unwrap();
    drop(h);
    tokio::task::spawn_blocking(move || w.join()).await.unwrap();
    rate
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run on demand, see the module docs"]
async fn window_cost() {
    let total: usize = std::env::var("HOLDFAST_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    // `HOLDFAST_BENCH_PROFILE=on|off`: one long run of ordered uuids (random
    // v4 ones with `HOLDFAST_BENCH_RANDOM` set),
    // durability os, window on or off (for `perf record`).
    if let Ok(case) = std::env::var("HOLDFAST_BENCH_PROFILE") {
        let window = if case == "on" { 600 } else { 0 };
        let random = std::env::var_os("HOLDFAST_BENCH_RANDOM").is_some();
        let rate = run(Duration::from_secs(window), random, Durability::Os, total).await;
        println!("window {case}: {rate:.0}/s");
        return;
    }
    for durability in [Durability::Os, Durability::Fsync] {
        for random in [false, true] {
            let mut on = Vec::new();
            let mut off = Vec::new();
            for _ in 0..3 {
                off.push(run(Duration::ZERO, random, durability, total).await);
                on.push(run(Duration::from_secs(600), random, durability, total).await);
            }
            on.sort_by(f64::total_cmp);
            off.sort_by(f64::total_cmp);
            println!(
                "{durability:?} {} uuids: window off {:.0}/s, on {:.0}/s, on/off {:.3} (medians of 3)",
                if random { "random v4" } else { "ordered v7" },
                off[1],
                on[1],
                on[1] / off[1]
            );
        }
    }
}

/// How long the first append after a start takes to index a full window:
/// `cargo test --release -p holdfast-capture --lib window_index_load -- --ignored --nocapture`
/// (`HOLDFAST_BENCH_EVENTS` remembered uuids, default 6,000,000: 10,000
/// client uuids/s for the default 10 minutes).
#[test]
#[ignore = "benchmark: run on demand, see the doc comment"]
fn window_index_load() {
    let total: i64 = std::env::var("HOLDFAST_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6_000_000);
    let dir = tempfile::tempdir().unwrap();
    let c = open_writer(dir.path(), Durability::Os).unwrap();
    c.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
         INSERT INTO recent_uuids(uuid, delivered_at_ms)
         SELECT lower(hex(randomblob(16))), 0 FROM n",
        [total],
    )
    .unwrap();
    let started = Instant::now();
    let w = dedup::Window::over_table(dedup::DEFAULT_WINDOW);
    w.ensure_loaded(&c).unwrap();
    println!(
        "indexed {total} remembered uuids in {:.2} s",
        started.elapsed().as_secs_f64()
    );
}
