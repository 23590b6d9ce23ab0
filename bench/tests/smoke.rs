//! `make bench` at a tiny scale, so the bench never rots: the real runner
//! binary with a real Kafka broker and the debug `holdfast-capture` (built by
//! `cargo build --bins`, which `make test` runs first). Asserts the report is
//! complete and sane, never a speed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, ensure};
use holdfast_bench::runner::report::Report;

fn bench() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_holdfast-bench"));
    c.arg("run")
        .args(["--duration-secs", "0.5", "--warmup-secs", "0.2"])
        .args(["--fsync-probe-secs", "0.2"]);
    c
}

fn run(cmd: &mut Command, out: &Path) -> Result<Report> {
    let output = cmd.arg("--out").arg(out).output()?;
    let log = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "holdfast-bench failed:\n{log}");
    let json = std::fs::read_to_string(out.join("report.json"))?;
    let report: Report = serde_json::from_str(&json).context("report.json")?;
    ensure!(
        !out.join("work").exists(),
        "the work directory is left behind"
    );
    Ok(report)
}

/// A PNG file: signature, a header the decoder accepts, a picture of some size.
fn assert_png(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    ensure!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{path:?} is not a PNG"
    );
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info()?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf)?;
    ensure!(
        frame.width >= 400 && frame.height >= 100,
        "{path:?}: {frame:?}"
    );
    // Something was drawn: not one flat colour.
    let first = &buf[..3];
    ensure!(
        buf[..frame.buffer_size()].chunks(3).any(|px| px != first),
        "{path:?} is blank"
    );
    Ok(())
}

#[test]
fn tiny_bench_writes_a_complete_and_sane_report() -> Result<()> {
    let out = tempfile::tempdir()?;
    let report = run(bench().args(["--drain-events", "5000"]), out.path())?;

    // Every scenario the runner knows, each measured once by this build (or
    // the machine), with answers, ordered percentiles and the server's memory.
    let ids = [
        "fsync 1000/s",
        "fsync 10000/s",
        "fsync max c4",
        "fsync max c32",
        "os 1000/s",
        "os 10000/s",
        "os max c4",
        "os max c32",
        "direct 1000/s",
        "direct 10000/s",
        "direct max c4",
        "direct max c32",
        "fsync batch100 max c32",
        "fsync no-dedup max c32",
        "fsync client-uuids max c32",
        "fsync client-uuids no-dedup max c32",
        "trivial 1000/s",
        "trivial 10000/s",
        "trivial max c4",
        "trivial max c32",
    ];
    let got: Vec<&str> = report.scenarios.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(got, ids);
    let md = std::fs::read_to_string(out.path().join("report.md"))?;
    for r in &report.scenarios {
        let build = if r.id.starts_with("trivial") {
            "machine"
        } else {
            "this"
        };
        assert_eq!(r.build, build, "{}", r.id);
        assert_eq!(r.error, None, "{}", r.id);
        let x = r.result.as_ref().unwrap();
        assert!(
            x.requests > 0 && x.requests_per_sec > 0.0,
            "{}: {x:?}",
            r.id
        );
        assert_eq!(
            x.events,
            x.requests * r.body.events_per_request as u64,
            "{}",
            r.id
        );
        assert!(
            x.latency_ms.ordered() && x.latency_ms.p50 > 0.0,
            "{}: {x:?}",
            r.id
        );
        // Only an open-loop schedule the debug build could not keep is allowed.
        assert!(
            x.errors.keys().all(|k| k == "unsent"),
            "{}: {:?}",
            r.id,
            x.errors
        );
        assert!(r.rss_peak_mib.is_some_and(|m| m > 1.0), "{}", r.id);
        // The disk's fsync is probed before each capture scenario.
        assert_eq!(
            r.fsync_p50_ms.is_some_and(|f| f > 0.0),
            build == "this",
            "{}",
            r.id
        );
        assert!(
            md.contains(&format!("| {} | {} |", r.id, r.build)),
            "{} not in report.md",
            r.id
        );
    }
    assert_eq!(
        report.scenarios[12].body.events_per_request, 100,
        "the batch scenario sends 100-event batches"
    );

    // Drains: both modes and the raw loop, every event in Kafka.
    let drains: Vec<(&str, &str)> = report
        .drains
        .iter()
        .map(|d| (d.id.as_str(), d.build.as_str()))
        .collect();
    assert_eq!(
        drains,
        [
            ("flush at-least-once", "this"),
            ("flush exactly-once", "this"),
            ("raw produce", "machine")
        ]
    );
    for d in &report.drains {
        assert_eq!(d.error, None, "{}", d.id);
        assert_eq!(d.events, 5000, "{}", d.id);
        assert!(d.records_in_kafka >= d.events, "{d:?}");
        assert!(d.seconds > 0.0 && d.events_per_sec > 0.0, "{d:?}");
    }

    // Machine limits, ratios, plots.
    assert_eq!(report.fsync.len(), 2);
    for f in &report.fsync {
        assert!(
            f.writes >= 20 && f.p50_ms > 0.0 && f.p50_ms <= f.p99_ms,
            "{f:?}"
        );
    }
    let ratio = |name: &str| {
        report
            .ratios
            .iter()
            .find(|r| r.name == name && r.build == "this")
            .map(|r| r.value)
    };
    for name in [
        "durable P50 / direct P50, 1000/s",
        "durable P50 / direct P50, 10000/s",
        "durable P50 / direct P50, max c4",
        "durable P50 / direct P50, max c32",
        "durable req/s / trivial-handler req/s, max c4",
        "durable req/s / trivial-handler req/s, max c32",
        "drain / raw produce, at-least-once",
        "drain / raw produce, exactly-once",
    ] {
        let v = ratio(name).with_context(|| format!("ratio {name:?} missing"))?;
        assert!(v.is_finite() && v > 0.0, "{name}: {v}");
    }
    assert!(report.comparisons.is_empty(), "no baseline, no comparison");
    // Without a baseline only the absolute targets are judged.
    assert_eq!(report.targets.len(), 13);
    for t in &report.targets {
        assert_eq!(t.met.is_some(), !t.target.contains("the baseline"), "{t:?}");
    }
    assert!(md.contains("## Targets"), "{md}");
    assert_eq!(report.plots, ["latency.png", "throughput.png", "drain.png"]);
    for p in &report.plots {
        assert_png(&out.path().join(p))?;
        assert!(md.contains(&format!("]({p})")), "{p} not linked");
    }
    assert!(report.host.cores > 0 && !report.host.loadavg_end.is_empty());
    Ok(())
}

/// Two rounds, each alternating the builds in the other order; drains too
/// (the second round's exactly-once drains of the same volumes must deliver
/// every event again, not find the first round's checkpoint).
#[test]
fn a_baseline_build_runs_alternately_and_is_compared_per_figure() -> Result<()> {
    // The same binary under another path stands in for a baseline build.
    let out = tempfile::tempdir()?;
    let bin_dir: PathBuf = Path::new(env!("CARGO_BIN_EXE_holdfast-bench"))
        .parent()
        .unwrap()
        .to_owned();
    let baseline = out.path().join("baseline-capture");
    std::fs::copy(bin_dir.join("holdfast-capture"), &baseline)
        .context("holdfast-capture not built: run `cargo build --bins` (make test does)")?;
    let report = run(
        bench()
            .args(["--only", "fsync max c4,drain", "--drain-events", "2000"])
            .args(["--rounds", "2"])
            .arg("--baseline-capture")
            .arg(&baseline)
            .args(["--baseline-label", "base"]),
        out.path().join("report").as_path(),
    )?;
    let runs: Vec<(&str, &str, usize)> = report
        .scenarios
        .iter()
        .map(|r| (r.id.as_str(), r.build.as_str(), r.round))
        .collect();
    assert_eq!(
        runs,
        [
            ("fsync max c4", "this", 0),
            ("fsync max c4", "base", 0),
            ("fsync max c4", "base", 1),
            ("fsync max c4", "this", 1)
        ]
    );
    // Drain modes alternate which build goes first, and so do rounds.
    let drains: Vec<(&str, &str, usize)> = report
        .drains
        .iter()
        .map(|d| (d.id.as_str(), d.build.as_str(), d.round))
        .collect();
    assert_eq!(
        drains,
        [
            ("flush at-least-once", "this", 0),
            ("flush at-least-once", "base", 0),
            ("flush exactly-once", "base", 0),
            ("flush exactly-once", "this", 0),
            ("raw produce", "machine", 0),
            ("flush at-least-once", "base", 1),
            ("flush at-least-once", "this", 1),
            ("flush exactly-once", "this", 1),
            ("flush exactly-once", "base", 1),
            ("raw produce", "machine", 1)
        ]
    );
    for d in &report.drains {
        assert_eq!(d.error, None, "{d:?}");
        assert!(d.records_in_kafka >= d.events, "{d:?}");
    }
    for figure in ["events/s", "P50 ms", "P99 ms", "P99.9 ms", "RSS MiB"] {
        let c = report
            .comparisons
            .iter()
            .find(|c| c.id == "fsync max c4" && c.figure == figure)
            .with_context(|| format!("no comparison of {figure}"))?;
        assert!(c.this > 0.0 && c.baseline > 0.0, "{c:?}");
        assert!((c.ratio - c.this / c.baseline).abs() < 1e-9, "{c:?}");
        assert!(
            c.rounds == 2 && c.low <= c.high && c.low > 0.0,
            "both rounds paired: {c:?}"
        );
    }
    let target = |name: &str| report.targets.iter().find(|t| t.target.starts_with(name));
    let p50 = target("P50 at 4 connections: ≤ 0.6x").context("no P50 target")?;
    assert!(
        p50.met.is_some() && p50.measured.contains("ms against"),
        "{p50:?}"
    );
    let batches = target("100-event batches at 32 connections: ≥").context("no batch target")?;
    assert_eq!(batches.met, None, "not run: {batches:?}");
    for mode in ["flush at-least-once", "flush exactly-once"] {
        assert!(
            report
                .comparisons
                .iter()
                .any(|c| c.id == mode && c.figure == "events/s"),
            "no comparison of {mode}"
        );
    }
    let md = std::fs::read_to_string(out.path().join("report/report.md"))?;
    assert!(md.contains("## `this` / `base`"), "{md}");
    assert!(md.contains("## Targets"), "{md}");
    assert!(md.contains("| fsync max c4 | base (round 2) |"), "{md}");
    Ok(())
}
