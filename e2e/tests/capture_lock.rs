//! Issue 11 item 4, the capture pod's half: a pod that finds its buffer
//! locked by another process (its flush Job still draining, a replaced pod
//! still terminating) waits alive and unready instead of exiting, and starts
//! serving as soon as the lock is free. Before, it exited at once ("buffer
//! ... is held by another process"), which a kubelet turns into
//! CrashLoopBackOff.

#[allow(dead_code)]
mod edges_support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use edges_support::*;
use holdfast_e2e::capture::{CaptureProcess, capture_bin, free_port};
use holdfast_e2e::kafka::KafkaBroker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_waits_unready_for_the_lock_then_serves() -> Result<()> {
    let kafka = KafkaBroker::start().await?;
    kafka.create_topic("events", 1, &[]).await?;
    let dir = tempdir();
    let buf = dir.path().join("buf");
    let mut first = CaptureProcess::start(&buf, &kafka.bootstrap(), &[]).await?;
    let client = reqwest::Client::new();
    let before = events_with_pad(20, 10);
    let (status, body) = post(&client, &format!("{}/v1/events", first.url()), &before).await?;
    ensure!(status == 200, "{body}");

    // The second process on the same buffer.
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let log = dir.path().join("second.log");
    let mut second = std::process::Command::new(capture_bin()?)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(&buf)
        .args(["--kafka-bootstrap", &kafka.bootstrap()])
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(dir.path().join("second.err"))?)
        .spawn()?;
    let probe = |path: &'static str| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let r = client.get(format!("{url}{path}")).send().await.ok()?;
            let status = r.status().as_u16();
            Some((status, r.text().await.unwrap_or_default()))
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status, reason) = loop {
        if let Some(answer) = probe("/readyz").await {
            break answer;
        }
        ensure!(
            Instant::now() < deadline,
            "the second process never answered probes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(
        status == 503 && reason.contains("waiting for the buffer lock"),
        "{status} {reason}"
    );
    ensure!(
        probe("/healthz").await.map(|(s, _)| s) == Some(200),
        "alive while waiting"
    );
    let refused = client
        .post(format!("{url}/v1/events"))
        .json(&events_with_pad(1, 1))
        .send()
        .await?;
    ensure!(refused.status() == 503, "events refused while waiting");
    // It keeps waiting: it did not exit.
    ensure!(second.try_wait()?.is_none(), "the second process exited");

    first.terminate()?;
    first.wait_exit(Duration::from_secs(30)).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while probe("/readyz").await.map(|(s, _)| s) != Some(200) {
        ensure!(
            Instant::now() < deadline,
            "the second process never turned ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = events_with_pad(20, 10);
    let (status, body) = post(&client, &format!("{url}/v1/events"), &after).await?;
    ensure!(status == 200, "{body}");
    let want: HashSet<String> = uuids(&before).into_iter().chain(uuids(&after)).collect();
    wait_delivered(&kafka, "events", &want, Duration::from_secs(60)).await?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let exit = tokio::task::spawn_blocking(move || second.wait()).await??;
    ensure!(exit.success(), "second process exit {exit}");
    Ok(())
}
