//! The chart's alerting rules (templates/prometheusrule.yaml) checked and
//! unit-tested by Prometheus' own `promtool` (built once by
//! `e2e/promtool.sh`): `promtool check rules` on the rendered rules, and
//! `promtool test rules` with tests/chart_rules/alerts.test.yaml, where
//! every alert has a case that fires and one that must not. The metrics the
//! expressions use exist in the operator's exposition and in the capture
//! pod's registry, so a renamed metric cannot silently disarm an alert.
//!
//! Needs: the pinned helm (`make e2e-bins`) and Go for the first
//! `e2e/promtool.sh` run (about 7 minutes; cached afterwards).

mod chart_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use chart_support::{find, repo, template};
use holdfast_operator::metrics::{ClusterFigures, ClusterLabel, Metrics};
use serde_json::Value;

/// `promtool`, built by `e2e/promtool.sh` when not cached yet.
fn promtool() -> anyhow::Result<PathBuf> {
    let output = Command::new("bash")
        .arg(repo().join("e2e/promtool.sh"))
        .output()
        .context("run e2e/promtool.sh")?;
    ensure!(
        output.status.success(),
        "e2e/promtool.sh failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let path = PathBuf::from(String::from_utf8(output.stdout)?.trim());
    ensure!(path.is_file(), "no promtool at {}", path.display());
    Ok(path)
}

fn run(promtool: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(output.status.success(), "promtool {args:?} failed:\n{text}");
    Ok(text)
}

/// The rules of the rendered PrometheusRule (release `holdfast` in
/// `holdfast-system`, default thresholds), as a Prometheus rules file.
fn rendered_rules() -> anyhow::Result<Value> {
    let docs = template(
        "holdfast",
        "holdfast-system",
        &["--set", "metrics.prometheusRule.enabled=true"],
    )?;
    Ok(find(&docs, "PrometheusRule", "holdfast")?["spec"].clone())
}

fn alerts(rules: &Value) -> Vec<&Value> {
    rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter(|r| r.get("alert").is_some())
        .collect()
}

#[test]
fn promtool_checks_and_unit_tests_every_alert() -> anyhow::Result<()> {
    let promtool = promtool()?;
    let rules = rendered_rules()?;
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&rules)?,
    )?;
    let fixture = repo().join("e2e/tests/chart_rules/alerts.test.yaml");
    let tests_text = std::fs::read_to_string(&fixture)?;
    std::fs::write(dir.path().join("alerts.test.yaml"), &tests_text)?;

    let checked = run(&promtool, dir.path(), &["check", "rules", "rules.yaml"])?;
    let names: BTreeSet<String> = alerts(&rules)
        .iter()
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect();
    ensure!(
        checked.contains(&format!("SUCCESS: {} rules found", names.len())),
        "{checked}"
    );
    run(
        &promtool,
        dir.path(),
        &["test", "rules", "alerts.test.yaml"],
    )?;

    // Every alert is tested firing and quiet, and every tested alert exists.
    let tests: Value = serde_yaml::from_str(&tests_text)?;
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .collect();
    for name in &names {
        let of = |firing: bool| {
            cases.iter().any(|c| {
                c["alertname"] == name.as_str()
                    && c["exp_alerts"]
                        .as_array()
                        .is_some_and(|a| a.is_empty() != firing)
            })
        };
        ensure!(of(true), "no promtool case where {name} fires");
        ensure!(of(false), "no promtool case where {name} stays quiet");
    }
    for case in &cases {
        let name = case["alertname"].as_str().unwrap_or_default();
        ensure!(names.contains(name), "tests name an unknown alert {name}");
    }
    for required in [
        "HoldfastOperatorAbsent",
        "HoldfastVolumeUnrecoverable",
        "HoldfastVolumeStuck",
        "HoldfastOrphanRecoverySlow",
        "HoldfastCaptureUnready",
        "HoldfastBufferFull",
    ] {
        ensure!(names.contains(required), "no {required} alert");
    }
    Ok(())
}

/// `holdfast_*` metric names an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("holdfast_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        names.insert(name);
    }
    names
}

#[test]
fn every_metric_an_alert_reads_is_exported() -> anyhow::Result<()> {
    // The operator's exposition, with one cluster published (a family
    // without series shows only its descriptor).
    let metrics = Metrics::new();
    metrics.clusters.publish(
        &[(
            ClusterLabel {
                namespace: "shop".into(),
                cluster: "events".into(),
            },
            ClusterFigures::default(),
        )]
        .into_iter()
        .collect(),
    );
    metrics
        .clusters
        .phase("shop", "events", "released", Duration::from_secs(1));
    let exposition = metrics.render();
    let operator: BTreeSet<&str> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let capture_source = std::fs::read_to_string(repo().join("capture/src/metrics.rs"))?;
    let http_source = std::fs::read_to_string(repo().join("capture/src/http/mod.rs"))?;

    let rules = rendered_rules()?;
    let mut checked = 0;
    for alert in alerts(&rules) {
        let expr = alert["expr"].as_str().context("expr")?;
        for name in metric_names(expr) {
            checked += 1;
            let base = name.strip_suffix("_total").unwrap_or(&name);
            if let Some(short) = base.strip_prefix("holdfast_operator_") {
                ensure!(
                    operator.contains(base)
                        || operator.contains(format!("holdfast_operator_{short}").as_str()),
                    "alert {} reads {name}, which the operator does not export:\n{exposition}",
                    alert["alert"]
                );
            } else {
                // Capture pod metrics: registered as `holdfast_` + name
                // (+ unit) in capture/src/metrics.rs.
                let short = base.strip_prefix("holdfast_").context("prefix")?;
                let candidates = [
                    short,
                    short.strip_suffix("_seconds").unwrap_or(short),
                    short.strip_suffix("_bytes").unwrap_or(short),
                ];
                ensure!(
                    candidates
                        .iter()
                        .any(|c| capture_source.contains(&format!("\"{c}\""))),
                    "alert {} reads {name}, which capture/src/metrics.rs does not register",
                    alert["alert"]
                );
            }
        }
        // The 503 reasons an alert matches are ones the capture pod uses.
        if let Some(start) = expr.find("reason=~\"") {
            let reasons = &expr[start + 9..];
            let reasons = &reasons[..reasons.find('"').context("closing quote")?];
            for reason in reasons.split('|') {
                ensure!(
                    http_source.contains(&format!("unavailable(\"{reason}\")")),
                    "alert {} matches 503 reason {reason}, which capture/src/http never answers",
                    alert["alert"]
                );
            }
        }
    }
    ensure!(checked >= 12, "only {checked} metric references checked");
    Ok(())
}
