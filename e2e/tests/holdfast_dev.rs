//! `holdfast-dev` as `make demo` and the benchmarks use it: `kafka` prints
//! its bootstrap address and stops cleanly on SIGTERM, `create-topic`
//! creates, `consume` prints JSON lines and fails on timeout.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_holdfast-dev");

/// Kills the child if the test fails before it stops it.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `holdfast-dev args` to completion, capturing its output.
fn dev(args: &[&str]) -> Result<Run> {
    let output = Command::new(BIN)
        .args(args)
        .output()
        .with_context(|| format!("running holdfast-dev {args:?}"))?;
    Ok(Run {
        success: output.status.success(),
        stdout: String::from_utf8(output.stdout)?,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

#[derive(Debug)]
struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_create_topic_and_consume_work_from_the_command_line() -> Result<()> {
    let data = tempfile::tempdir()?;
    let logs = tempfile::tempdir()?;
    let mut kafka = Guard(
        Command::new(BIN)
            .args(["kafka", "--data-dir"])
            .arg(data.path())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(logs.path().join("stderr"))?)
            .spawn()?,
    );
    let stderr = || std::fs::read_to_string(logs.path().join("stderr")).unwrap_or_default();
    let stdout = kafka.0.stdout.take().context("no stdout")?;
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await??;
    let bootstrap = line
        .trim()
        .strip_prefix("KAFKA_BOOTSTRAP=")
        .with_context(|| format!("unexpected first line {line:?}; stderr:\n{}", stderr()))?
        .to_owned();
    assert!(bootstrap.starts_with("127.0.0.1:"), "{bootstrap}");
    assert!(
        data.path().join("meta.properties").exists(),
        "data dir not used"
    );

    let created = dev(&[
        "create-topic",
        "--bootstrap",
        &bootstrap,
        "--topic",
        "events",
        "--partitions",
        "2",
        "--config",
        "retention.ms=-1",
    ])?;
    assert!(created.success, "{created:?}");
    let again = dev(&[
        "create-topic",
        "--bootstrap",
        &bootstrap,
        "--topic",
        "events",
    ])?;
    assert!(!again.success, "creating an existing topic succeeded");
    assert!(again.stderr.contains("TopicAlreadyExists"), "{again:?}");
    let tolerated = dev(&[
        "create-topic",
        "--bootstrap",
        &bootstrap,
        "--topic",
        "events",
        "--if-not-exists",
    ])?;
    assert!(tolerated.success, "{tolerated:?}");

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    let headers = OwnedHeaders::new().insert(Header {
        key: "source",
        value: Some("test"),
    });
    producer
        .send(
            FutureRecord::to("events")
                .key("a")
                .payload(r#"{"n":1}"#)
                .headers(headers),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)?;
    producer
        .send(
            FutureRecord::to("events").key("b").payload("plain text"),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)?;

    let consumed = dev(&[
        "consume",
        "--bootstrap",
        &bootstrap,
        "--topic",
        "events",
        "--count",
        "2",
        "--timeout-secs",
        "30",
    ])?;
    assert!(consumed.success, "{consumed:?}");
    let lines: Vec<Value> = consumed
        .stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 2);
    let a = lines
        .iter()
        .find(|l| l["key"] == "a")
        .context("record a missing")?;
    assert_eq!(a["topic"], "events");
    assert_eq!(a["payload"], serde_json::json!({"n": 1}));
    assert_eq!(a["headers"], serde_json::json!({"source": "test"}));
    assert!(a["partition"].is_i64() && a["offset"] == 0);
    let b = lines
        .iter()
        .find(|l| l["key"] == "b")
        .context("record b missing")?;
    assert_eq!(b["payload"], "plain text");

    let short = dev(&[
        "consume",
        "--bootstrap",
        &bootstrap,
        "--topic",
        "events",
        "--count",
        "3",
        "--timeout-secs",
        "2",
    ])?;
    assert!(!short.success, "consume succeeded without enough records");
    assert_eq!(short.stdout.lines().count(), 2, "{short:?}");

    let pid = Pid::from_raw(i32::try_from(kafka.0.id())?);
    kill(pid, Signal::SIGTERM)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = kafka.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!(
                "holdfast-dev kafka did not stop within 60s of SIGTERM; stderr:\n{}",
                stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.success(),
        "holdfast-dev kafka exited with {status}; stderr:\n{}",
        stderr()
    );
    Ok(())
}
