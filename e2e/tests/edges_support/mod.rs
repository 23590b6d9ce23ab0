//! Helpers for `capture_edges.rs`: concurrent clients that tally what was
//! acknowledged, a readiness sampler, reading a topic back, a raw HTTP/1.1
//! response reader for slow uploads.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use holdfast_e2e::capture::{self, CaptureProcess};
use holdfast_e2e::kafka::{KafkaBroker, KafkaOptions, Record};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

pub const UUID_HEADER: &str = "holdfast-uuid";
pub const REASON_HEADER: &str = "holdfast-dead-letter-reason";
/// What the volume guard logs when it would flip the volume to `Delete`.
pub const DRAINED_CLEAN: &str = "volume guard: buffer drained and marked clean";

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("holdfast-edges-")
        .tempdir()
        .expect("temporary directory")
}

pub fn uuid_of(r: &Record) -> String {
    String::from_utf8_lossy(r.header(UUID_HEADER).unwrap_or_default()).into_owned()
}

pub fn new_uuid() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Polls `f` every 50 ms until it holds; fails naming `what` at the deadline.
pub async fn wait_until<F: FnMut() -> bool>(what: &str, within: Duration, mut f: F) -> Result<()> {
    let deadline = Instant::now() + within;
    while !f() {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

pub fn inspect(dir: &Path) -> Value {
    capture::inspect(dir).unwrap_or(Value::Null)
}

/// Posts a JSON array of events; returns the status and the JSON body.
pub async fn post(client: &reqwest::Client, url: &str, events: &[Value]) -> Result<(u16, Value)> {
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(events)?)
        .send()
        .await?;
    let status = r.status().as_u16();
    let body = r.json().await.unwrap_or(Value::Null);
    Ok((status, body))
}

pub fn events_with_pad(n: usize, pad: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"uuid": new_uuid(), "i": i, "pad": "p".repeat(pad)}))
        .collect()
}

pub fn uuids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["uuid"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Every record currently in `topic` (high minus low watermark, all partitions).
pub async fn all_records(kafka: &KafkaBroker, topic: &str) -> Result<Vec<Record>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let (bootstrap, t) = (kafka.bootstrap(), topic.to_owned());
    let total = tokio::task::spawn_blocking(move || -> Result<usize> {
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("allow.auto.create.topics", "false")
            .create()?;
        let md = c.fetch_metadata(Some(&t), Duration::from_secs(10))?;
        let Some(topic) = md.topics().iter().find(|m| m.name() == t) else {
            return Ok(0);
        };
        if topic.error().is_some() {
            return Ok(0);
        }
        let mut total = 0;
        for p in topic.partitions() {
            let (lo, hi) = c.fetch_watermarks(&t, p.id(), Duration::from_secs(10))?;
            total += (hi - lo) as usize;
        }
        Ok(total)
    })
    .await??;
    if total == 0 {
        return Ok(Vec::new());
    }
    let records = kafka.consume(topic, total, Duration::from_secs(60)).await?;
    ensure!(
        records.len() == total,
        "{topic}: read {} of {total} records",
        records.len()
    );
    Ok(records)
}

/// Waits until every uuid in `want` is in `topic`; returns the uuids seen.
pub async fn wait_delivered(
    kafka: &KafkaBroker,
    topic: &str,
    want: &HashSet<String>,
    within: Duration,
) -> Result<HashMap<String, usize>> {
    let deadline = Instant::now() + within;
    loop {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for r in all_records(kafka, topic).await? {
            *seen.entry(uuid_of(&r)).or_default() += 1;
        }
        let missing = want.iter().filter(|u| !seen.contains_key(*u)).count();
        if missing == 0 {
            return Ok(seen);
        }
        if Instant::now() > deadline {
            bail!(
                "{missing} of {} acknowledged events never reached {topic}",
                want.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `PRAGMA integrity_check` of `dir/buffer.db`, through Python's sqlite3
/// (another SQLite build than the one that wrote it).
pub fn integrity_check(dir: &Path) -> Result<String> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('PRAGMA integrity_check').fetchone()[0])",
        ])
        .arg(dir.join("buffer.db"))
        .output()
        .context("running python3")?;
    ensure!(
        out.status.success(),
        "integrity check failed to run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// What concurrent clients saw: acknowledged uuids and every refusal by reason.
#[derive(Debug, Default)]
pub struct Tally {
    /// Uuids of events answered 200.
    pub acked: HashSet<String>,
    /// Refusals by "status error".
    pub refused: HashMap<String, usize>,
    /// Transport errors (timeouts, resets).
    pub errors: usize,
}

/// Clients posting batches until `stop`; a uuid counts as acknowledged only on a 200.
pub struct Clients {
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicUsize>,
    refusals: Arc<AtomicUsize>,
    tally: Arc<Mutex<Tally>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Clients {
    /// `n` clients, each posting `events` events of `pad` bytes, pausing
    /// `pause` after every answer.
    pub fn start(n: usize, url: String, events: usize, pad: usize, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(AtomicUsize::new(0));
        let refusals = Arc::new(AtomicUsize::new(0));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let tasks = (0..n)
            .map(|_| {
                let (stop, acks, refusals, tally, url) = (
                    stop.clone(),
                    acks.clone(),
                    refusals.clone(),
                    tally.clone(),
                    url.clone(),
                );
                tokio::spawn(async move {
                    let client = reqwest::Client::builder()
                        .timeout(Duration::from_secs(15))
                        .build()
                        .expect("http client");
                    while !stop.load(Ordering::Relaxed) {
                        let batch = events_with_pad(events, pad);
                        match post(&client, &url, &batch).await {
                            Ok((200, _)) => {
                                tally.lock().unwrap().acked.extend(uuids(&batch));
                                acks.fetch_add(batch.len(), Ordering::Relaxed);
                                tokio::time::sleep(pause).await;
                            }
                            Ok((status, body)) => {
                                let reason = format!(
                                    "{status} {}",
                                    body["error"].as_str().unwrap_or("(no error field)")
                                );
                                *tally.lock().unwrap().refused.entry(reason).or_default() += 1;
                                refusals.fetch_add(1, Ordering::Relaxed);
                                // A client honouring Retry-After would wait longer.
                                tokio::time::sleep(pause.max(Duration::from_millis(20))).await;
                            }
                            Err(_) => {
                                tally.lock().unwrap().errors += 1;
                                tokio::time::sleep(pause.max(Duration::from_millis(20))).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            acks,
            refusals,
            tally,
            tasks,
        }
    }

    pub fn acks(&self) -> usize {
        self.acks.load(Ordering::Relaxed)
    }

    pub fn refusals(&self) -> usize {
        self.refusals.load(Ordering::Relaxed)
    }

    pub async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        std::mem::take(&mut *self.tally.lock().unwrap())
    }
}

/// Samples `/readyz` every 25 ms until stopped: (elapsed, status, body).
pub struct ReadinessProbe {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(Instant, u16, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadinessProbe {
    pub fn start(url: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, out) = (stop.clone(), samples.clone());
        let task = tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("http client");
            while !s.load(Ordering::Relaxed) {
                if let Ok(r) = client.get(format!("{url}/readyz")).send().await {
                    let status = r.status().as_u16();
                    let body = r.text().await.unwrap_or_default();
                    out.lock().unwrap().push((Instant::now(), status, body));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        });
        Self {
            stop,
            samples,
            task,
        }
    }

    /// Whether the last sample was 200.
    pub fn ready_now(&self) -> bool {
        self.samples
            .lock()
            .unwrap()
            .last()
            .is_some_and(|(_, s, _)| *s == 200)
    }

    /// Whether a sample after `since` was 503 with `reason` in its body.
    pub fn saw_unready(&self, since: Instant, reason: &str) -> bool {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .any(|(t, s, b)| *t >= since && *s == 503 && b.contains(reason))
    }

    pub async fn finish(self) -> Vec<(Instant, u16, String)> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        std::mem::take(&mut *self.samples.lock().unwrap())
    }
}

/// Readiness transitions from unready back to ready within `[from, to)`.
pub fn flaps(samples: &[(Instant, u16, String)], from: Instant, to: Instant) -> usize {
    samples
        .iter()
        .filter(|(t, _, _)| *t >= from && *t < to)
        .map(|(_, s, _)| *s)
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] != 200 && w[1] == 200)
        .count()
}

/// Names and sizes of the files in `dir`.
pub fn file_sizes(dir: &Path) -> Vec<(String, u64)> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    (e.file_name().to_string_lossy().into_owned(), len)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The last lines of the capture log, without the per-request refusals.
pub fn log_excerpt(cap: &CaptureProcess) -> String {
    let log = cap.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains("buffer append failed"))
        .collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Reads one HTTP/1.1 response head (and a body of `content-length`) from `s`.
pub async fn read_response(s: &mut tokio::net::TcpStream) -> Result<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .context("no status in response")?;
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await?;
                ensure!(n > 0, "connection closed inside the response body");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
            // The head and body of an interim response (100) are read separately.
            buf.drain(..end + 4 + len);
            return Ok((status, body));
        }
        let n = s.read(&mut chunk).await?;
        ensure!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A broker that refuses to create topics on first use, so a topic exists
/// only once a test creates it.
pub async fn broker_without_auto_create() -> Result<KafkaBroker> {
    KafkaBroker::start_with(KafkaOptions {
        auto_create_topics: false,
        ..KafkaOptions::default()
    })
    .await
}
