//! Drain scenarios: a buffer of N events filled through a capture pod's own
//! HTTP path (Kafka unreachable, so nothing leaves), then drained into the
//! broker by `holdfast-capture flush` at-least-once and exactly-once, next to
//! a raw rdkafka produce loop of events of the same size (the ceiling: the
//! same producer settings, no buffer). Each build fills its own buffer, so a
//! baseline reads a file of its own schema, and each drain gets its own copy
//! (exactly-once checkpoints are per volume: a copy drained twice would skip).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use serde::{Deserialize, Serialize};

use super::processes::{self, Server};
use super::{Build, Settings};
use crate::body::{self, BodySpec};
use crate::load::{self, LoadSpec, Pace};

/// Topic the drained buffers were filled for.
pub const DRAIN_TOPIC: &str = "bench.drain";
/// Topic of the raw produce loop.
pub const RAW_TOPIC: &str = "bench.raw";

/// One drain (or the raw produce loop) by one build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainRun {
    /// `flush at-least-once`, `flush exactly-once` or `raw produce`.
    pub id: String,
    /// Build label (`machine` for the raw produce loop).
    pub build: String,
    /// Events drained.
    pub events: u64,
    /// Wall time, seconds (`flush`: the whole process, start to exit).
    pub seconds: f64,
    /// `events / seconds`.
    pub events_per_sec: f64,
    /// Records the topic grew by (exactly-once adds transaction markers).
    pub records_in_kafka: u64,
    /// Peak resident memory of the `flush` process, MiB.
    pub rss_peak_mib: Option<f64>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Which round of the run this was (`--rounds`; from 0).
    #[serde(default)]
    pub round: usize,
}

impl DrainRun {
    /// A run that did not happen, and why.
    pub fn failed(id: &str, build: &str, events: u64, error: anyhow::Error) -> Self {
        Self {
            id: id.to_owned(),
            build: build.to_owned(),
            events,
            seconds: 0.0,
            events_per_sec: 0.0,
            records_in_kafka: 0,
            rss_peak_mib: None,
            error: Some(format!("{error:#}")),
            round: 0,
        }
    }
}

/// Drain modes: id and extra `flush` flags.
pub const MODES: [(&str, &[&str]); 2] = [
    ("flush at-least-once", &[]),
    ("flush exactly-once", &["--delivery", "exactly-once"]),
];

/// Events per fill request, and how many requests make at least `n` events.
fn fill_shape(n: u64) -> (usize, u64) {
    let batch = n.clamp(1, 1000) as usize;
    (batch, n.div_ceil(batch as u64))
}

/// Events a fill of `n` holds (whole requests).
pub fn filled_events(n: u64) -> u64 {
    let (batch, requests) = fill_shape(n);
    batch as u64 * requests
}

/// Fills `dir` with [`filled_events`] events for [`DRAIN_TOPIC`] through
/// `build`'s `serve`, with Kafka unreachable, and checks the count.
pub async fn fill(s: &Settings, build: &Build, dir: &Path) -> Result<u64> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], processes::free_port()?));
    // A closed port: the forwarder never delivers, the buffer keeps everything.
    let nowhere = format!("127.0.0.1:{}", processes::free_port()?);
    let buffer = dir.join("buffer");
    let extra = [
        "--stream".to_owned(),
        format!("default={DRAIN_TOPIC}"),
        "--durability".to_owned(),
        "os".to_owned(),
    ];
    let args = processes::capture_args(addr, &buffer, &nowhere, &extra);
    let log = dir.join("fill.log");
    let server = Server::start(&build.capture, &args, addr, &log).await?;
    let (batch, requests) = fill_shape(s.drain_events);
    let spec = LoadSpec {
        addr,
        path: "/v1/events".to_owned(),
        pace: Pace::Max,
        connections: 4,
        warmup: Duration::ZERO,
        duration: Duration::from_secs(24 * 3600),
        max_requests: Some(requests),
        body: BodySpec {
            events_per_request: batch,
            event_bytes: s.event_bytes,
            client_uuids: false,
        },
    };
    let result = load::run(&spec).await?;
    // Not SIGTERM: with Kafka unreachable a graceful stop waits for nothing useful.
    server.kill();
    ensure!(
        result.error_count() == 0,
        "filling the buffer: errors {:?}",
        result.errors
    );
    let inspect = tokio::process::Command::new(&build.capture)
        .args(["inspect", "--json", "--data-dir"])
        .arg(&buffer)
        .output()
        .await?;
    ensure!(
        inspect.status.success(),
        "inspect: {}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&inspect.stdout)?;
    let events = stats["events"]
        .as_u64()
        .context("inspect: no events count")?;
    let expected = batch as u64 * requests;
    ensure!(
        events == expected,
        "the filled buffer holds {events} events, {expected} were sent"
    );
    Ok(events)
}

/// Copies the filled buffer, then writes back everything dirty on the
/// machine: otherwise the kernel writes the copy (and the broker's log of
/// the previous drain) back while the next drain is timed, and a drain
/// measures the disk's write-back instead of the drainer.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    nix::unistd::sync();
    Ok(())
}

/// Sum of the topic's high watermarks (records ever written, markers included).
pub async fn topic_records(bootstrap: &str, topic: &str) -> Result<u64> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || -> Result<u64> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()?;
        let timeout = Duration::from_secs(30);
        let md = c.fetch_metadata(Some(&topic), timeout)?;
        let t = md.topics().first().context("no metadata for the topic")?;
        let mut total = 0;
        for p in t.partitions() {
            let (_, high) = c.fetch_watermarks(&topic, p.id(), timeout)?;
            total += high.max(0) as u64;
        }
        Ok(total)
    })
    .await?
}

/// Drains a copy of the filled buffer `source` with `flush` and `flags`.
pub async fn flush(
    build: &Build,
    id: &str,
    flags: &[&str],
    source: &Path,
    work: &Path,
    bootstrap: &str,
    events: u64,
) -> DrainRun {
    let attempt = async {
        let dir: PathBuf = work.join(format!("{}-{}", id.replace(' ', "-"), build.label));
        copy_dir(source, &dir)?;
        let before = topic_records(bootstrap, DRAIN_TOPIC).await?;
        let mut args: Vec<String> = [
            "flush",
            "--timeout-secs",
            "3600",
            "--kafka-bootstrap",
            bootstrap,
        ]
        .map(str::to_owned)
        .to_vec();
        args.push("--data-dir".to_owned());
        args.push(dir.display().to_string());
        args.extend(flags.iter().map(|f| f.to_string()));
        let log = dir.with_extension("log");
        let (status, took, rss) = processes::run_timed(&build.capture, &args, &log).await?;
        let _ = std::fs::remove_dir_all(&dir);
        ensure!(
            status.success(),
            "flush exited with {status}: {}",
            processes::tail(&log)
        );
        let records = topic_records(bootstrap, DRAIN_TOPIC).await? - before;
        ensure!(
            records >= events,
            "{records} records reached Kafka for {events} events"
        );
        let seconds = took.as_secs_f64();
        Ok(DrainRun {
            id: id.to_owned(),
            build: build.label.clone(),
            events,
            seconds,
            events_per_sec: events as f64 / seconds,
            records_in_kafka: records,
            rss_peak_mib: rss,
            error: None,
            round: 0,
        })
    };
    attempt
        .await
        .unwrap_or_else(|e| DrainRun::failed(id, &build.label, events, e))
}

struct Deliveries {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let counter = if result.is_ok() {
            &self.ok
        } else {
            &self.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Produces `events` events of `event_bytes` bytes (uuid key and header, as
/// the forwarder sends them) with the forwarder's producer settings, and
/// waits for every acknowledgement.
pub async fn raw_produce(bootstrap: &str, events: u64, event_bytes: usize) -> DrainRun {
    let id = "raw produce";
    let attempt = async {
        // Like each drain: the previous drain's write-back is not timed here.
        nix::unistd::sync();
        let before = topic_records(bootstrap, RAW_TOPIC).await?;
        let bootstrap_owned = bootstrap.to_owned();
        let seconds =
            tokio::task::spawn_blocking(move || produce_all(&bootstrap_owned, events, event_bytes))
                .await??;
        let records = topic_records(bootstrap, RAW_TOPIC).await? - before;
        ensure!(
            records >= events,
            "{records} records reached Kafka for {events} events"
        );
        Ok(DrainRun {
            id: id.to_owned(),
            build: "machine".to_owned(),
            events,
            seconds,
            events_per_sec: events as f64 / seconds,
            records_in_kafka: records,
            rss_peak_mib: None,
            error: None,
            round: 0,
        })
    };
    attempt
        .await
        .unwrap_or_else(|e| DrainRun::failed(id, "machine", events, e))
}

fn produce_all(bootstrap: &str, events: u64, event_bytes: usize) -> Result<f64> {
    let context = Deliveries {
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    };
    let producer: BaseProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("client.id", "holdfast-bench-raw")
        .create_with_context(context)?;
    // The payloads are made before the clock starts: the ceiling is Kafka's.
    let payloads: Vec<(String, String)> = (0..events.min(100_000) as usize)
        .map(|i| {
            let uuid = uuid::Uuid::now_v7().to_string();
            (uuid, body::event(i, event_bytes, None))
        })
        .collect();
    let ctx = producer.context();
    let started = Instant::now();
    for i in 0..events as usize {
        let (key, payload) = &payloads[i % payloads.len()];
        let headers = OwnedHeaders::new().insert(Header {
            key: "holdfast-uuid",
            value: Some(key.as_str()),
        });
        let mut record = BaseRecord::to(RAW_TOPIC)
            .key(key)
            .payload(payload)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // Serve delivery reports to make room, then try again.
                    record = back;
                    producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        if i.is_multiple_of(1000) {
            producer.poll(Duration::ZERO);
        }
    }
    producer.flush(Duration::from_secs(600))?;
    let seconds = started.elapsed().as_secs_f64();
    let (ok, failed) = (
        ctx.ok.load(Ordering::Relaxed),
        ctx.failed.load(Ordering::Relaxed),
    );
    ensure!(
        ok == events && failed == 0,
        "raw produce: {ok} delivered, {failed} failed of {events}"
    );
    Ok(seconds)
}
