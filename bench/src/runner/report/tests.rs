use super::*;

#[test]
fn numbers_are_grouped_by_thousands() {
    assert_eq!(grouped(0.4), "0");
    assert_eq!(grouped(999.0), "999");
    assert_eq!(grouped(1000.0), "1,000");
    assert_eq!(grouped(1234567.0), "1,234,567");
}

fn run(id: &str, build: &str, pace: Pace, rps: f64, p50: f64) -> ScenarioRun {
    let (series, shape) = id.split_once(' ').unwrap();
    ScenarioRun {
        id: id.to_owned(),
        series: series.to_owned(),
        shape: shape.to_owned(),
        build: build.to_owned(),
        pace,
        connections: 4,
        body: crate::body::BodySpec::default(),
        server_args: Vec::new(),
        result: Some(crate::load::LoadResult {
            requests: rps as u64,
            events: rps as u64,
            errors: Default::default(),
            seconds: 1.0,
            requests_per_sec: rps,
            events_per_sec: rps,
            latency_ms: crate::load::Percentiles {
                p50,
                p99: p50 * 2.0,
                p999: p50 * 3.0,
                max: p50 * 4.0,
                mean: p50,
            },
        }),
        rss_peak_mib: Some(30.0),
        fsync_p50_ms: None,
        error: None,
        round: 0,
    }
}

/// A report of `scenarios` by builds `this` and `old`, with one fsync probe.
fn report(scenarios: Vec<ScenarioRun>) -> Report {
    let build = |label: &str| BuildInfo {
        label: label.to_owned(),
        capture: String::new(),
    };
    Report {
        generated_at: String::new(),
        run_seconds: 1.0,
        host: Host {
            cores: 2,
            kernel: String::new(),
            loadavg_start: String::new(),
            loadavg_end: String::new(),
        },
        scale: Scale {
            duration_secs: 1.0,
            warmup_secs: 0.0,
            drain_events: 0,
            event_bytes: 300,
            batch_events: 100,
            connections: vec![4],
            fixed_rates: vec![1000.0],
            fixed_connections: 64,
            partitions: 1,
        },
        builds: vec![build("this"), build("old")],
        fsync: vec![FsyncProbe {
            dir: String::new(),
            writes: 20,
            bytes_per_write: 4096,
            p50_ms: 0.25,
            p99_ms: 1.0,
            mean_ms: 0.3,
            max_ms: 2.0,
        }],
        scenarios,
        drains: Vec::new(),
        ratios: Vec::new(),
        comparisons: Vec::new(),
        plots: Vec::new(),
        targets: Vec::new(),
    }
}

#[test]
fn ratios_and_comparisons_come_from_the_matching_runs() {
    let fixed = Pace::Fixed { rate: 1000.0 };
    let mut r = report(vec![
        run("fsync max c4", "this", Pace::Max, 8000.0, 0.5),
        run("fsync max c4", "old", Pace::Max, 4000.0, 1.0),
        run("direct max c4", "this", Pace::Max, 2000.0, 2.0),
        run("trivial max c4", "machine", Pace::Max, 40000.0, 0.1),
        run("fsync 1000/s", "this", fixed, 1000.0, 0.4),
        run("direct 1000/s", "this", fixed, 1000.0, 4.0),
    ]);
    r.scenarios[0].fsync_p50_ms = Some(0.375);
    r.derive();
    let ratio = |name: &str, build: &str| {
        r.ratios
            .iter()
            .find(|x| x.name == name && x.build == build)
            .map(|x| x.value)
    };
    assert_eq!(
        ratio("durable P50 / direct P50, max c4", "this"),
        Some(0.25)
    );
    assert_eq!(ratio("durable P50 / direct P50, 1000/s", "this"), Some(0.1));
    assert_eq!(
        ratio("durable req/s / trivial-handler req/s, max c4", "this"),
        Some(0.2)
    );
    // No trivial-handler ratio for an open-loop rate: both do 1,000/s.
    assert_eq!(
        ratio("durable req/s / trivial-handler req/s, 1000/s", "this"),
        None
    );
    // The probe just before the run when there is one, else the run's first.
    assert_eq!(
        ratio("durable P50 - fsync median, max c4", "this"),
        Some(0.125)
    );
    assert_eq!(
        ratio("durable P50 - fsync median, 1000/s", "this"),
        Some(0.15000000000000002)
    );
    // The baseline has no direct run: no ratio rather than a wrong one.
    assert_eq!(ratio("durable P50 / direct P50, max c4", "old"), None);
    let cmp = |figure: &str| {
        r.comparisons
            .iter()
            .find(|c| c.id == "fsync max c4" && c.figure == figure)
            .map(|c| c.ratio)
    };
    assert_eq!(cmp("events/s"), Some(2.0));
    assert_eq!(cmp("P50 ms"), Some(0.5));
    assert_eq!(cmp("RSS MiB"), Some(1.0));
    // Only scenarios both builds ran are compared.
    assert!(r.comparisons.iter().all(|c| c.id == "fsync max c4"));
    let md = r.markdown();
    assert!(
        md.contains("| fsync max c4 | events/s | 8,000 | 4,000 | 2.00x |"),
        "{md}"
    );
}

#[test]
fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
    assert_eq!(median(vec![]), None);
    assert_eq!(median(vec![f64::NAN]), None);
    assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
    assert_eq!(median(vec![4.0, 1.0, f64::NAN, 2.0, 8.0]), Some(3.0));
}

/// A figure that swings from round to round: the comparison is of medians,
/// its range that of the rounds' own ratios, and a round one build failed
/// pairs with nothing.
#[test]
fn rounds_compare_by_their_medians_and_give_the_range_of_their_ratios() {
    let mut runs = Vec::new();
    for (round, this, old) in [(0, 100.0, 100.0), (1, 300.0, 100.0), (2, 200.0, 400.0)] {
        let mut a = run("fsync max c32", "this", Pace::Max, this, 1.0);
        let mut b = run("fsync max c32", "old", Pace::Max, old, 1.0);
        (a.round, b.round) = (round, round);
        runs.extend([a, b]);
    }
    let mut failed = run("fsync max c32", "old", Pace::Max, 1.0, 1.0);
    (failed.round, failed.result, failed.error) = (3, None, Some("refused".into()));
    let mut late = run("fsync max c32", "this", Pace::Max, 1000.0, 1.0);
    late.round = 3;
    runs.extend([failed, late]);
    let mut r = report(runs);
    r.derive();
    let c = r
        .comparisons
        .iter()
        .find(|c| c.id == "fsync max c32" && c.figure == "events/s")
        .unwrap();
    // This build: 100, 300, 200, 1000 (median 250); old: 100, 100, 400 (100).
    assert_eq!((c.this, c.baseline, c.ratio), (250.0, 100.0, 2.5));
    assert_eq!((c.rounds, c.low, c.high), (3, 0.5, 3.0));
    assert_eq!(
        r.comparisons
            .iter()
            .filter(|c| c.id == "fsync max c32")
            .count(),
        5,
        "one comparison per figure, not per round"
    );
    let md = r.markdown();
    assert!(md.contains("| 2.50x | 3: 0.50x to 3.00x |"), "{md}");
    assert!(md.contains("| fsync max c32 | this (round 4) |"), "{md}");
}

#[test]
fn targets_say_met_not_met_or_not_measured() {
    let fixed = Pace::Fixed { rate: 10000.0 };
    let mut r = report(vec![
        // Exactly 1.6x: a bound is met at its value.
        run("fsync max c32", "this", Pace::Max, 16000.0, 1.0),
        run("fsync max c32", "old", Pace::Max, 10000.0, 1.0),
        // P50 0.7x the baseline's; P99 (twice the P50 here) 1.4 ms.
        run("fsync max c4", "this", Pace::Max, 7000.0, 0.7),
        run("fsync max c4", "old", Pace::Max, 5000.0, 1.0),
        run("fsync 10000/s", "this", fixed, 10000.0, 1.5),
    ]);
    r.derive();
    let met = |target: &str| {
        let t = r
            .targets
            .iter()
            .find(|t| t.target.starts_with(target))
            .unwrap_or_else(|| panic!("no target {target:?}"));
        (t.met, t.measured.clone())
    };
    let (ok, words) = met("single events at 32 connections");
    assert_eq!(ok, Some(true), "{words}");
    assert!(
        words.starts_with("1.60x (16,000 events/s against 10,000"),
        "{words}"
    );
    assert_eq!(met("P50 at 4 connections: ≤ 0.6x").0, Some(false));
    assert_eq!(met("P99 at 4 connections").0, Some(true));
    // P50 0.7 ms against the 0.25 ms fsync probe: 0.45 ms over it.
    assert_eq!(met("P50 at 4 connections: within 0.1 ms").0, Some(false));
    assert_eq!(met("P99 at a fixed 10,000 requests/s").0, Some(false));
    assert_eq!(met("RSS at 10,000 events/s").0, Some(true));
    // No baseline run at 10,000/s, no batches, no drains, no direct runs.
    for absent in [
        "P50 at a fixed 10,000 requests/s: ≤ 0.6x",
        "100-event batches",
        "drain",
        "durable P50",
    ] {
        assert_eq!(met(absent).0, None, "{absent}");
    }
    assert_eq!(r.targets.len(), 13);
    let md = r.markdown();
    assert!(md.contains("## Targets"), "{md}");
    assert!(
        md.contains("| drain (at-least-once): ≥ 300,000 events/s |  | not measured |"),
        "{md}"
    );
}

#[test]
fn targets_show_what_the_build_reaches_with_no_fsync_at_all() {
    let fixed = Pace::Fixed { rate: 10000.0 };
    let mut r = report(vec![
        run("fsync max c32", "this", Pace::Max, 12000.0, 1.0),
        run("fsync max c32", "old", Pace::Max, 10000.0, 1.0),
        // Without fsync 1.5x the baseline's durable rate: short of 1.6x.
        run("os max c32", "this", Pace::Max, 15000.0, 0.5),
        run("fsync max c4", "this", Pace::Max, 7000.0, 0.7),
        run("fsync max c4", "old", Pace::Max, 5000.0, 1.0),
        // 0.3 ms without fsync: with the 0.25 ms probe, 0.55 ms, 0.55x the
        // baseline's 1.0 ms (met); 0.3 ms over the fsync median (not met).
        run("os max c4", "this", Pace::Max, 9000.0, 0.3),
        run("fsync 10000/s", "this", fixed, 10000.0, 1.5),
        run("fsync 10000/s", "old", fixed, 10000.0, 2.0),
        // 0.05 ms without fsync: 0.1 ms over the fsync median at most.
        run("os 10000/s", "this", fixed, 10000.0, 0.05),
    ]);
    r.derive();
    let ceiling = |target: &str| {
        let t = r
            .targets
            .iter()
            .find(|t| t.target.starts_with(target))
            .unwrap_or_else(|| panic!("no target {target:?}"));
        (t.ceiling_met, t.ceiling.clone())
    };
    let (met, words) = ceiling("single events at 32 connections");
    assert_eq!(met, Some(false), "{words}");
    assert!(words.starts_with("1.50x (15,000 events/s"), "{words}");
    let (met, words) = ceiling("P50 at 4 connections: ≤ 0.6x");
    assert_eq!(met, Some(true), "{words}");
    assert!(words.starts_with("0.55x (0.550 ms"), "{words}");
    assert_eq!(
        ceiling("P50 at 4 connections: within 0.1 ms"),
        (Some(false), "+0.300 ms".to_owned())
    );
    assert_eq!(
        ceiling("P50 at a fixed 10,000 requests/s: ≤ 0.6x").0,
        Some(true)
    );
    assert_eq!(
        ceiling("P50 at a fixed 10,000 requests/s: within 0.1 ms").0,
        Some(true)
    );
    // Targets no fsync setting bears on, or this run did not measure so.
    for none in [
        "P99 at 4",
        "RSS",
        "drain",
        "100-event batches at 32 connections: ≥",
    ] {
        assert_eq!(ceiling(none), (None, String::new()), "{none}");
    }
    let md = r.markdown();
    assert!(md.contains("| met | with no fsync at all |"), "{md}");
    assert!(md.contains("| no | no: 1.50x (15,000 events/s"), "{md}");
}
