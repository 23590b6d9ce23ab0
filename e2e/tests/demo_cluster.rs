//! Smoke of `make demo-cluster`: `holdfast-demo-cluster --exit-when-done`
//! tells the whole story on a real control plane, the chart installed with
//! helm and a real Kafka, and this test checks from its output that every
//! step was observed: the killed and scaled-away pod's volume stayed
//! `Retain`, its flush Job succeeded, the volume went `Retain -> Delete`
//! and was deleted, events were acknowledged while Kafka was down and were
//! all in Kafka after it returned, and the final line says
//! `acknowledged N, found N in Kafka, lost 0` with N > 0.
//!
//! Needs: `make e2e-bins`, `make kafka`, and the workspace binaries
//! (`cargo build --bins`).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast-demo-cluster");

/// The number right after `prefix` in `line`.
fn number_after(line: &str, prefix: &str) -> Option<u64> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The `ok:` line containing every one of `parts`.
fn ok_line<'a>(out: &'a str, parts: &[&str]) -> Result<&'a str> {
    out.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("ok: "))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .with_context(|| format!("no `ok:` line with {parts:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_cluster_tells_the_story_and_loses_nothing() -> Result<()> {
    let started = Instant::now();
    let child = tokio::process::Command::new(BIN)
        .args(["--exit-when-done", "--outage-secs", "8"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting holdfast-demo-cluster")?;
    let output = tokio::time::timeout(Duration::from_secs(420), child.wait_with_output())
        .await
        .context("holdfast-demo-cluster did not finish within 7 minutes")??;
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    let err = String::from_utf8_lossy(&output.stderr).into_owned();
    eprintln!("{out}");
    let check = || -> Result<()> {
        ensure!(output.status.success(), "exited with {}", output.status);

        let retained = ok_line(&out, &["of events-2 stays Retain", "clean=false"])?;
        let volume = retained
            .split_whitespace()
            .find(|w| w.starts_with("pvc-"))
            .context("no volume named")?;
        ok_line(&out, &["flush Job hf-flush-", volume, "succeeded"])?;
        ok_line(
            &out,
            &[volume, "went Retain -> Delete (clean=true) and was deleted"],
        )?;

        let down = ok_line(&out, &["Kafka down", "acknowledged while it was down"])?;
        let in_outage = number_after(down, "s: ").context("outage count")?;
        ensure!(in_outage > 0, "nothing acknowledged without Kafka: {down}");
        let back = ok_line(&out, &["Kafka back: all"])?;
        ensure!(
            number_after(back, "all ") == Some(in_outage),
            "{back} (outage: {in_outage})"
        );

        let last = out
            .lines()
            .rev()
            .find(|l| l.starts_with("acknowledged "))
            .context("no final count")?;
        let acked = number_after(last, "acknowledged ").context("acked")?;
        let found = number_after(last, ", found ").context("found")?;
        let lost = number_after(last, ", lost ").context("lost")?;
        ensure!(
            acked > in_outage && found == acked && lost == 0,
            "final line: {last}"
        );
        Ok(())
    };
    check().with_context(|| format!("stderr:\n{err}"))?;
    eprintln!(
        "demo-cluster smoke took {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
