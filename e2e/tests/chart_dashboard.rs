//! The chart's Grafana dashboard (`charts/holdfast/dashboards/holdfast.json`,
//! shipped by `templates/dashboard.yaml`) and its alerts
//! (`templates/prometheusrule.yaml`) against what the binaries really export:
//!
//! - a real `holdfast-capture serve` with a real Kafka broker, made to
//!   acknowledge, reject, deliver and dead-letter events so that every
//!   labelled family has series, is scraped over HTTP; the operator's
//!   registry (`holdfast_operator::metrics::Metrics`, what `holdfast-operator
//!   run` serves) is rendered with every family populated through the calls
//!   the operator makes, and a real `holdfast-operator run` (on the real
//!   control plane) is shown to serve exactly those families;
//! - every metric name and matcher label in every dashboard query and alert
//!   expression must be in those expositions (a made-up name or label in a
//!   copy of an expression is caught);
//! - `promtool check metrics` finds no problem in either exposition.
//!
//! Needs: the pinned helm and Kubernetes binaries (`make e2e-bins`),
//! promtool (`e2e/promtool.sh`), Kafka (`make kafka`) and the workspace
//! binaries (`cargo build --bins`).

mod chart_support;
mod operator_support;
#[path = "chart_dashboard/promql.rs"]
mod promql;
#[path = "chart_dashboard/scrape.rs"]
mod scrape;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, ensure};
use chart_support::{find, of_kind, repo, template};
use holdfast_e2e::kube::{self as harness, poll_until};
use operator_support::{Operator, TIMEOUT, install_cluster_wide, operator_identity};
use promql::{Exported, as_prometheus_text, families, selectors, unexported};
use scrape::{operator_exposition, scrapes};
use serde_json::Value;

// ---------------------------------------------------------------------------
// What the chart queries.

fn dashboard_values() -> Vec<&'static str> {
    vec!["--set", "metrics.grafanaDashboard.enabled=true"]
}

/// The dashboard as the chart ships it (the rendered ConfigMap's JSON).
fn rendered_dashboard() -> anyhow::Result<Value> {
    let docs = template("holdfast", "holdfast-system", &dashboard_values())?;
    let map = find(&docs, "ConfigMap", "holdfast-dashboard")?;
    let text = map["data"]["holdfast.json"]
        .as_str()
        .context("no holdfast.json in the dashboard ConfigMap")?;
    Ok(serde_json::from_str(text)?)
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(panel);
        out.extend(panel["panels"].as_array().into_iter().flatten());
    }
    out
}

/// (place, PromQL) of every dashboard query: panel targets, and the metric
/// of each `label_values(metric, label)` variable.
fn dashboard_queries(dashboard: &Value) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().context("a target without expr")?;
            out.push((
                format!(
                    "panel {title:?} {}",
                    target["refId"].as_str().unwrap_or("?")
                ),
                expr.to_string(),
            ));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] != "query" {
            continue;
        }
        let query = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str())
            .context("a query variable without query")?;
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .with_context(|| format!("variable query {query:?} is not label_values(...)"))?;
        let (selector, _label) = inner
            .rsplit_once(',')
            .context("label_values(metric, label)")?;
        out.push((
            format!("variable {}", variable["name"]),
            selector.trim().to_string(),
        ));
    }
    Ok(out)
}

/// (place, PromQL) of every alert of the rendered PrometheusRule.
fn alert_queries() -> anyhow::Result<Vec<(String, String)>> {
    let docs = template(
        "holdfast",
        "holdfast-system",
        &["--set", "metrics.prometheusRule.enabled=true"],
    )?;
    let rule = find(&docs, "PrometheusRule", "holdfast")?;
    let mut out = Vec::new();
    for group in rule["spec"]["groups"].as_array().into_iter().flatten() {
        for r in group["rules"].as_array().into_iter().flatten() {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("?");
            let expr = r["expr"].as_str().context("a rule without expr")?;
            out.push((format!("alert {name}"), expr.to_string()));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// promtool

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
    Ok(PathBuf::from(String::from_utf8(output.stdout)?.trim()))
}

/// `promtool check metrics` on `text`: its complaints, empty when none.
fn promtool_check_metrics(text: &str) -> anyhow::Result<String> {
    let mut child = Command::new(promtool()?)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success() == said.trim().is_empty(),
        "promtool exited {} saying {said:?}",
        output.status
    );
    Ok(said)
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn promql_selectors_are_metric_names_and_matcher_labels_only() -> anyhow::Result<()> {
    let found = selectors(
        r#"histogram_quantile(0.99, sum by (le) (rate(holdfast_ack_latency_seconds_bucket{namespace=~"$namespace", le!="+Inf"}[$__rate_interval])))
           / on (pod) group_left (stream) holdfast_kafka_up offset 5m and holdfast_buffer_events > bool 0
           or count(up{job="x"} == 0) or vector(0) unless absent(holdfast_operator_leader{namespace="a,b}"})"#,
    )?;
    let names: Vec<(&str, Vec<&str>)> = found
        .iter()
        .map(|s| {
            (
                s.metric.as_str(),
                s.labels.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    ensure!(
        names
            == vec![
                (
                    "holdfast_ack_latency_seconds_bucket",
                    vec!["namespace", "le"]
                ),
                ("holdfast_kafka_up", vec![]),
                ("holdfast_buffer_events", vec![]),
                ("up", vec!["job"]),
                ("holdfast_operator_leader", vec!["namespace"]),
            ],
        "{names:?}"
    );
    ensure!(selectors(r#"{__name__="x"}"#).is_err());
    ensure!(selectors(r#"x{a="unterminated}"#).is_err());
    Ok(())
}

#[test]
fn the_dashboard_configmap_is_off_by_default_and_labelled_for_the_sidecar() -> anyhow::Result<()> {
    let off = template("holdfast", "holdfast-system", &[])?;
    ensure!(
        !of_kind(&off, "ConfigMap")
            .iter()
            .any(|m| m["metadata"]["name"] == "holdfast-dashboard"),
        "a dashboard ConfigMap rendered by default"
    );

    let on = template("holdfast", "holdfast-system", &dashboard_values())?;
    let map = find(&on, "ConfigMap", "holdfast-dashboard")?;
    ensure!(map["metadata"]["namespace"] == "holdfast-system", "{map}");
    ensure!(
        map["metadata"]["labels"]["grafana_dashboard"] == "1",
        "not labelled for kube-prometheus-stack's sidecar: {}",
        map["metadata"]["labels"]
    );
    // The ConfigMap carries the file verbatim.
    let shipped = std::fs::read_to_string(repo().join("charts/holdfast/dashboards/holdfast.json"))?;
    ensure!(
        map["data"]["holdfast.json"].as_str().map(str::trim) == Some(shipped.trim()),
        "the ConfigMap's holdfast.json differs from dashboards/holdfast.json"
    );

    // Label, namespace and annotations follow the values.
    let moved = template(
        "blue",
        "ops",
        &[
            "--set",
            "metrics.grafanaDashboard.enabled=true",
            "--set",
            "metrics.grafanaDashboard.label=dashboards",
            "--set",
            "metrics.grafanaDashboard.labelValue=holdfast",
            "--set",
            "metrics.grafanaDashboard.namespace=monitoring",
            "--set",
            "metrics.grafanaDashboard.annotations.grafana_folder=Holdfast",
        ],
    )?;
    let map = find(&moved, "ConfigMap", "blue-holdfast-dashboard")?;
    let meta = &map["metadata"];
    ensure!(meta["namespace"] == "monitoring", "{meta}");
    ensure!(meta["labels"]["dashboards"] == "holdfast", "{meta}");
    ensure!(meta["labels"].get("grafana_dashboard").is_none(), "{meta}");
    ensure!(
        meta["annotations"]["grafana_folder"] == "Holdfast",
        "{meta}"
    );

    // A dashboard Grafana can import: unique panel ids, a Prometheus data
    // source chosen by variable, every query on it.
    let dashboard = rendered_dashboard()?;
    ensure!(dashboard["uid"] == "holdfast" && dashboard["title"] == "Holdfast");
    let all = panels(&dashboard);
    let ids: BTreeSet<i64> = all.iter().filter_map(|p| p["id"].as_i64()).collect();
    ensure!(ids.len() == all.len(), "panel ids missing or repeated");
    ensure!(
        dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v["name"] == "datasource"
                && v["type"] == "datasource"
                && v["query"] == "prometheus"),
        "no Prometheus data source variable"
    );
    for panel in all.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"].as_array().map(Vec::len).unwrap_or(0);
        ensure!(targets > 0, "panel {} has no query", panel["title"]);
        for target in panel["targets"].as_array().into_iter().flatten() {
            ensure!(
                target["datasource"]["uid"] == "${datasource}",
                "panel {} does not use the chosen data source",
                panel["title"]
            );
        }
    }

    // What the issue asks the dashboard to show.
    let queries = dashboard_queries(&dashboard)?;
    let read: BTreeSet<String> = queries
        .iter()
        .flat_map(|(_, q)| selectors(q).unwrap_or_default())
        .map(|s| s.metric)
        .collect();
    for metric in [
        "holdfast_events_accepted_total",
        "holdfast_requests_rejected_total",
        "holdfast_ack_latency_seconds_bucket",
        "holdfast_buffer_events",
        "holdfast_buffer_oldest_event_age_seconds",
        "holdfast_events_delivered_total",
        "holdfast_events_dead_lettered_total",
        "holdfast_kafka_up",
        "holdfast_operator_cluster_orphaned_volumes",
        "holdfast_operator_flush_jobs_active",
        "holdfast_operator_flush_jobs_total",
        "holdfast_operator_reconcile_errors_total",
    ] {
        ensure!(read.contains(metric), "the dashboard never reads {metric}");
    }
    ensure!(
        queries
            .iter()
            .any(|(_, q)| q.contains("histogram_quantile(0.99")
                && q.contains("holdfast_ack_latency_seconds_bucket")),
        "no ack latency percentile"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_query_is_exported() -> anyhow::Result<()> {
    let scrapes = scrapes().await?;
    let mut exported = Exported::parse(&scrapes.capture)?;
    let operator = Exported::parse(&scrapes.operator)?;
    exported.names.extend(operator.names);
    for (name, labels) in operator.labels {
        exported.labels.entry(name).or_default().extend(labels);
    }
    let dashboard = dashboard_queries(&rendered_dashboard()?)?;
    let alerts = alert_queries()?;
    ensure!(
        dashboard.len() >= 20,
        "only {} dashboard queries",
        dashboard.len()
    );
    ensure!(alerts.len() >= 12, "only {} alerts", alerts.len());
    let mut queries = dashboard.clone();
    queries.extend(alerts.iter().cloned());
    let problems = unexported(&queries, &exported)?;
    ensure!(
        problems.is_empty(),
        "queries read what the binaries do not export:\n{}\ncapture:\n{}\noperator:\n{}",
        problems.join("\n"),
        scrapes.capture,
        scrapes.operator
    );

    // The check can fail: a made-up metric, a suffix a counter does not
    // have, and a label the series does not carry, each in a copy of a real
    // expression.
    let (place, kafka_down) = alerts
        .iter()
        .find(|(p, _)| p == "alert HoldfastKafkaDown")
        .context("no HoldfastKafkaDown")?;
    let (_, rejected) = dashboard
        .iter()
        .find(|(_, q)| q.contains("holdfast_requests_rejected_total"))
        .context("no rejected panel")?;
    for (broken, named) in [
        (
            kafka_down.replace("holdfast_kafka_up", "holdfast_kafka_connected"),
            "holdfast_kafka_connected",
        ),
        (
            rejected.replace(
                "holdfast_requests_rejected_total",
                "holdfast_requests_rejected",
            ),
            "holdfast_requests_rejected,",
        ),
        (
            rejected.replace("namespace=~", "reason=\"x\", stream=~"),
            "label stream",
        ),
    ] {
        let problems = unexported(&[(place.clone(), broken.clone())], &exported)?;
        ensure!(
            problems.iter().any(|p| p.contains(named)),
            "{broken:?} was not caught ({named}): {problems:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_check_metrics_finds_no_problem_in_either_exposition() -> anyhow::Result<()> {
    let scrapes = scrapes().await?;
    ensure!(
        scrapes
            .capture_content_type
            .starts_with("application/openmetrics-text"),
        "capture /metrics is {}",
        scrapes.capture_content_type
    );
    for (binary, text) in [
        ("holdfast-capture", &scrapes.capture),
        ("holdfast-operator", &scrapes.operator),
    ] {
        let converted = as_prometheus_text(text)?;
        let said = promtool_check_metrics(&converted)?;
        ensure!(
            said.trim().is_empty(),
            "promtool check metrics on {binary}'s /metrics:\n{said}\n{converted}"
        );
    }

    // promtool does lint what it is given: a badly named, undocumented
    // family appended to the operator's exposition is reported.
    let mut bad = as_prometheus_text(&scrapes.operator)?;
    bad.push_str(
        "# TYPE holdfast_operator_sync_milliseconds gauge\nholdfast_operator_sync_milliseconds 3\n",
    );
    let said = promtool_check_metrics(&bad)?;
    ensure!(
        said.contains("holdfast_operator_sync_milliseconds no help text")
            && said.contains("use base unit \"seconds\""),
        "promtool missed the bad family: {said:?}"
    );
    Ok(())
}

/// Each family of an exposition with its `# TYPE` and `# HELP` lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_binary_serves_the_registry_the_checks_use() -> anyhow::Result<()> {
    let h = harness::shared().await;
    install_cluster_wide(&h.client()?).await?;
    let ns = h.namespace("dashboard").await?;
    let kubeconfig = operator_identity(h, &ns).await?;
    let operator = Operator::start(h, &ns, &kubeconfig, "dashboard")?;
    let url = format!("http://{}/metrics", operator.metrics_addr);
    let (served, content_type) = poll_until("the operator leads", TIMEOUT, || async {
        if !operator.leads().await {
            return None;
        }
        let response = reqwest::get(&url).await.ok()?;
        let content_type = response
            .headers()
            .get("content-type")?
            .to_str()
            .ok()?
            .to_string();
        Some((response.text().await.ok()?, content_type))
    })
    .await
    .with_context(|| format!("operator log:\n{}", operator.log_text()))?;
    ensure!(
        content_type.starts_with("application/openmetrics-text"),
        "operator /metrics is {content_type}"
    );
    ensure!(
        served.lines().any(|l| l == "holdfast_operator_leader 1"),
        "{served}"
    );

    // Every family the binary serves is one the checks above saw, with the
    // same type and help: they checked what the binary exports.
    let real = families(&served);
    let rendered = families(&operator_exposition());
    ensure!(
        real.len() >= 8,
        "only {} families served:\n{served}",
        real.len()
    );
    for (name, described) in &real {
        ensure!(
            rendered.get(name) == Some(described),
            "the operator serves {name} {described:?}, the rendered registry has {:?}",
            rendered.get(name)
        );
    }
    let said = promtool_check_metrics(&as_prometheus_text(&served)?)?;
    ensure!(
        said.trim().is_empty(),
        "promtool on the operator's /metrics:\n{said}"
    );
    Ok(())
}
