//! What a durable acknowledgement costs the disk, counted on the real binary
//! with `strace`: every append commit is synced once, with `fdatasync` (an
//! `fsync` would also flush the inode for every mtime change, a second
//! synchronous write on ext4), and the forwarder's settlements (deletes of
//! delivered events) add no sync of their own. The volume guard measures the
//! disk (`statfs`, which can block on ext4) at most every 100 ms while it is
//! far from full, not once per commit.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use holdfast_e2e::capture::{CaptureProcess, Strace};
use holdfast_e2e::kafka::KafkaBroker;
use serde_json::json;

/// Requests posted one after another, each waiting for its 200 and then for
/// its delivery, so that every request is followed by a settlement.
const REQUESTS: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_sync_once_with_fdatasync_and_settlements_add_no_sync() -> Result<()> {
    if let Some(why) = Strace::unavailable() {
        bail!("this test counts syscalls with strace: {why}");
    }
    let kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 1, &[]).await?;
    let dir = tempfile::tempdir()?;
    let cap = CaptureProcess::start(&dir.path().join("buf"), &kafka.bootstrap(), &[]).await?;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/events", cap.url());
    // Warm up: the first commits create the WAL and its index.
    post_and_wait_delivered(&client, &cap, &url, 0).await?;
    let trace = SyncCount::attach(cap.pid().context("the capture process has no pid")?)?;
    let started = Instant::now();
    for i in 1..=REQUESTS {
        post_and_wait_delivered(&client, &cap, &url, i).await?;
    }
    let elapsed = started.elapsed();
    let calls = trace.finish()?;
    let (statfs, syncs): (Vec<_>, Vec<_>) = calls.into_iter().partition(|c| c.call == "statfs");
    let mut by_thread = std::collections::BTreeMap::<(&str, &str), usize>::new();
    for s in &syncs {
        *by_thread.entry((&s.thread, &s.call)).or_default() += 1;
    }
    eprintln!("{REQUESTS} requests, each delivered: syncs by thread {by_thread:?}");
    let count = |f: &dyn Fn(&SyncCall) -> bool| syncs.iter().filter(|s| f(s)).count();
    ensure!(
        count(&|s| s.call == "fsync") == 0,
        "SQLite synced with fsync; fdatasync is enough: {by_thread:?}"
    );
    // The writer thread syncs every acknowledged commit and nothing else; the
    // checkpointer's syncs (a few a second) are its own business.
    let writer = count(&|s| s.thread == "buffer-writer");
    ensure!(
        writer >= REQUESTS,
        "{writer} writer syncs for {REQUESTS} acknowledged requests: some 200 was not synced"
    );
    ensure!(
        writer < REQUESTS * 3 / 2,
        "{writer} writer syncs for {REQUESTS} requests and as many settlements: settlements are synced"
    );
    // One measurement per 100 ms at most (and a little slack at the ends),
    // where one per commit would be 60. Assumes the test's disk has more
    // than 256 MiB free (closer to full, the guard measures every round).
    let measured = statfs
        .iter()
        .filter(|c| c.thread == "buffer-writer")
        .count();
    let most = elapsed.as_millis() as usize / 100 + 3;
    eprintln!("{measured} statfs by the writer in {elapsed:?}");
    ensure!(
        measured <= most,
        "the writer measured the volume {measured} times in {elapsed:?} for {REQUESTS} commits (at most {most})"
    );
    Ok(())
}

/// Posts one event, then waits until the buffer is empty again.
async fn post_and_wait_delivered(
    client: &reqwest::Client,
    cap: &CaptureProcess,
    url: &str,
    i: usize,
) -> Result<()> {
    let r = client
        .post(url)
        .json(&json!({"i": i}))
        .send()
        .await
        .context("posting")?;
    ensure!(r.status().as_u16() == 200, "request {i}: {}", r.status());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = client
            .get(format!("{}/metrics", cap.url()))
            .send()
            .await?
            .text()
            .await?;
        let buffered = metrics
            .lines()
            .find_map(|l| l.strip_prefix("holdfast_buffer_events "))
            .context("no holdfast_buffer_events in /metrics")?;
        if buffered.trim() == "0" {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "request {i} was not delivered within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One sync call: the syscall and the name of the thread that made it.
#[derive(Debug)]
struct SyncCall {
    call: String,
    thread: String,
}

/// `strace` recording `fsync`, `fdatasync` and `statfs` in every thread of a process.
struct SyncCount {
    pid: u32,
    trace: Strace,
    out: tempfile::NamedTempFile,
}

impl SyncCount {
    fn attach(pid: u32) -> Result<Self> {
        let out = tempfile::NamedTempFile::new()?;
        let path = out.path().to_str().context("temporary path")?.to_owned();
        let trace = Strace::attach(pid, &["-e", "trace=fsync,fdatasync,statfs", "-o", &path])?;
        Ok(Self { pid, trace, out })
    }

    /// Detaches and returns every call seen, named by thread.
    fn finish(mut self) -> Result<Vec<SyncCall>> {
        self.trace.detach()?;
        let thread = |tid: &str| {
            std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", self.pid))
                .map(|n| n.trim().to_owned())
                .unwrap_or_else(|_| format!("gone {tid}"))
        };
        // Lines look like `1234  fdatasync(7)            = 0`.
        Ok(std::fs::read_to_string(self.out.path())?
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let tid = words.next()?;
                let call = words.next()?.split('(').next()?;
                ["fsync", "fdatasync", "statfs"]
                    .contains(&call)
                    .then(|| SyncCall {
                        call: call.to_owned(),
                        thread: thread(tid),
                    })
            })
            .collect())
    }
}
