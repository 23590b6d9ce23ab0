//! The chart's Grafana dashboard (`charts/holdfast/dashboards/holdfast.json`,
//! shipped by `templates/dashboard.yaml`) and its alerts
//! (`templates/prometheusrule.yaml`) against what the binaries really export:
//!
//! - a real `holdfast-capture serve` with a real Kafka broker, made to
//!   acknowledge, reject, deliver and dead-letter events so that every
//!   labelled family has series, is scraped over HTTP; the operator's
//!   registry (`holdfast_operator::metrics::Metrics`, what `holdfast-operator
//!   run` serves) is rendered with every family populated through the calls
//!   the operator makes;
//! - every metric name and matcher label in every dashboard query and alert
//!   expression must be in those expositions (a made-up name or label in a
//!   copy of an expression is caught);
//! - `promtool check metrics` finds no problem in either exposition.
//!
//! Needs: the pinned helm (`make e2e-bins`), promtool (`e2e/promtool.sh`),
//! Kafka (`make kafka`) and the workspace binaries (`cargo build --bins`).

mod chart_support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chart_support::{find, of_kind, repo, template};
use holdfast_e2e::capture::CaptureProcess;
use holdfast_e2e::kafka::KafkaBroker;
use holdfast_operator::metrics::{ClusterFigures, ClusterLabel, Metrics};
use serde_json::{Value, json};

/// Labels Prometheus adds to every scraped series (PodMonitor and
/// ServiceMonitor targets), which a query may match on.
const TARGET_LABELS: &[&str] = &[
    "namespace",
    "pod",
    "container",
    "job",
    "instance",
    "service",
    "endpoint",
];

/// Series Prometheus makes itself (not exported by a binary).
const PROMETHEUS_SERIES: &[&str] = &["up"];

// ---------------------------------------------------------------------------
// PromQL: which metrics and matcher labels an expression reads.

/// One vector selector of an expression: `metric{label="..", ...}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Selector {
    metric: String,
    labels: Vec<String>,
}

/// Words of PromQL that are not metric names when they stand alone.
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end",
];
/// Aggregation operators (they may be followed by `by (...)` before `(`).
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Words followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Index just past the string literal opening at `chars[i]`.
fn skip_string(chars: &[char], i: usize) -> anyhow::Result<usize> {
    let quote = chars[i];
    let mut j = i + 1;
    while j < chars.len() {
        match chars[j] {
            '\\' if quote != '`' => j += 2,
            c if c == quote => return Ok(j + 1),
            _ => j += 1,
        }
    }
    bail!("unterminated string literal")
}

/// Index just past the bracket that closes the one at `chars[i]`, skipping
/// string literals.
fn skip_group(chars: &[char], i: usize, open: char, close: char) -> anyhow::Result<usize> {
    let mut depth = 0;
    let mut j = i;
    while j < chars.len() {
        match chars[j] {
            '"' | '\'' | '`' => {
                j = skip_string(chars, j)?;
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return Ok(j + 1);
                }
            }
            _ => {}
        }
        j += 1;
    }
    bail!("unbalanced {open}{close}")
}

fn skip_space(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    i
}

/// The label names of the matchers in `{...}` starting at `chars[i]`, and
/// the index past the closing brace.
fn matcher_labels(chars: &[char], i: usize) -> anyhow::Result<(Vec<String>, usize)> {
    let end = skip_group(chars, i, '{', '}')?;
    let mut labels = Vec::new();
    let mut j = i + 1;
    while j < end - 1 {
        let c = chars[j];
        if c == '"' || c == '\'' || c == '`' {
            j = skip_string(chars, j)?;
        } else if is_ident_start(c) {
            let start = j;
            while j < end && is_ident(chars[j]) {
                j += 1;
            }
            labels.push(chars[start..j].iter().collect());
        } else {
            j += 1;
        }
    }
    Ok((labels, end))
}

/// Every vector selector of a PromQL expression (Grafana's `$variables`
/// allowed): identifiers that are not functions, aggregations, keywords,
/// label lists (`by (...)`), matcher labels, durations or strings.
fn selectors(expr: &str) -> anyhow::Result<Vec<Selector>> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i)?;
        } else if c == '[' {
            i = skip_group(&chars, i, '[', ']')?;
        } else if c == '$' {
            // $var, ${var}, $__rate_interval
            i += 1;
            if chars.get(i) == Some(&'{') {
                i = skip_group(&chars, i, '{', '}')?;
            } else {
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // Numbers and durations (0.99, 5m, 1e3).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c == '{' {
            bail!("a selector without a metric name in {expr:?}");
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let lower = word.to_ascii_lowercase();
            let next = skip_space(&chars, i);
            if LABEL_LISTS.contains(&lower.as_str()) {
                if chars.get(next) == Some(&'(') {
                    i = skip_group(&chars, next, '(', ')')?;
                }
            } else if chars.get(next) == Some(&'(')
                || KEYWORDS.contains(&lower.as_str())
                || AGGREGATIONS.contains(&lower.as_str())
            {
                // A function call, an aggregation or an operator.
            } else if chars.get(next) == Some(&'{') {
                let (labels, end) = matcher_labels(&chars, next)?;
                out.push(Selector {
                    metric: word,
                    labels,
                });
                i = end;
            } else {
                out.push(Selector {
                    metric: word,
                    labels: Vec::new(),
                });
            }
        } else {
            i += 1;
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Expositions: which series names and labels a binary exports.

/// What one exposition offers to queries.
#[derive(Debug, Default)]
struct Exported {
    /// Series names a query can select: every sample's name, and for a
    /// family shown without samples the names its type gives its samples
    /// (OpenMetrics: counter `x` → `x_total`; histogram `x` → `x_bucket`,
    /// `x_sum`, `x_count`).
    names: BTreeSet<String>,
    /// Label names seen on each series name's samples.
    labels: BTreeMap<String, BTreeSet<String>>,
}

impl Exported {
    fn parse(text: &str) -> anyhow::Result<Self> {
        let mut exported = Self::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split_whitespace();
                let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                    bail!("bad TYPE line {line:?}");
                };
                let suffixes: &[&str] = match kind {
                    "counter" => &["_total"],
                    "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count"],
                    "summary" => &["", "_sum", "_count"],
                    "info" => &["_info"],
                    _ => &[""],
                };
                for suffix in suffixes {
                    exported.names.insert(format!("{name}{suffix}"));
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let chars: Vec<char> = line.chars().collect();
                let end = chars
                    .iter()
                    .position(|c| !is_ident(*c))
                    .unwrap_or(chars.len());
                let name: String = chars[..end].iter().collect();
                let labels = exported.labels.entry(name.clone()).or_default();
                if chars.get(end) == Some(&'{') {
                    labels.extend(matcher_labels(&chars, end)?.0);
                }
                exported.names.insert(name);
            }
        }
        Ok(exported)
    }
}

/// Problems of the queries against what the binaries export: each a
/// sentence naming the query's place, the metric and, for labels, the label.
fn unexported(queries: &[(String, String)], exported: &Exported) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    for (place, expr) in queries {
        let found = selectors(expr).with_context(|| format!("{place}: {expr}"))?;
        if !found.iter().any(|s| s.metric.starts_with("holdfast_"))
            && !found
                .iter()
                .any(|s| PROMETHEUS_SERIES.contains(&s.metric.as_str()))
        {
            problems.push(format!("{place} reads no holdfast_ metric: {expr}"));
        }
        for Selector { metric, labels } in found {
            if PROMETHEUS_SERIES.contains(&metric.as_str()) {
                continue;
            }
            if !exported.names.contains(&metric) {
                problems.push(format!(
                    "{place} reads {metric}, which neither binary exports"
                ));
                continue;
            }
            let known = exported.labels.get(&metric);
            for label in labels {
                if !TARGET_LABELS.contains(&label.as_str())
                    && !known.is_some_and(|k| k.contains(&label))
                {
                    problems.push(format!(
                        "{place} matches label {label} of {metric}, which has {known:?}"
                    ));
                }
            }
        }
    }
    Ok(problems)
}

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
// The expositions.

struct Scrapes {
    /// `GET /metrics` of a real capture pod.
    capture: String,
    /// Its Content-Type.
    capture_content_type: String,
    /// The operator's registry with every family populated.
    operator: String,
}

static SCRAPES: tokio::sync::OnceCell<Scrapes> = tokio::sync::OnceCell::const_new();

async fn scrapes() -> anyhow::Result<&'static Scrapes> {
    SCRAPES
        .get_or_try_init(|| async {
            let (capture, capture_content_type) = scrape_capture().await?;
            Ok(Scrapes {
                capture,
                capture_content_type,
                operator: operator_exposition(),
            })
        })
        .await
}

/// A capture pod that has acknowledged, rejected, delivered and
/// dead-lettered events; its `/metrics` once every such family shows.
async fn scrape_capture() -> anyhow::Result<(String, String)> {
    let kafka = KafkaBroker::start().await?;
    // Records over 1,000 bytes are refused for good: a dead letter.
    kafka
        .create_topic("events", 1, &[("max.message.bytes", "1000")])
        .await?;
    let dir = tempfile::Builder::new()
        .prefix("holdfast-dashboard-")
        .tempdir()?;
    let capture = CaptureProcess::start(&dir.path().join("buf"), &kafka.bootstrap(), &[]).await?;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/events", capture.url());
    let metrics_url = format!("{}/metrics", capture.url());
    // Delivered events first, then the poison on its own: an event sent
    // again alone after an oversized neighbour failed its batch is not
    // counted in holdfast_events_delivered_total (forward/forwarder.rs,
    // judge_failures).
    let small = json!([{"n": 1}, {"n": 2}]).to_string();
    let poison = json!({"pad": "p".repeat(3000)}).to_string();
    for (body, family) in [
        (small, "holdfast_events_delivered_total"),
        (poison, "holdfast_events_dead_lettered_total"),
    ] {
        let response = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        ensure!(response.status() == 200, "post: {}", response.status());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = client.get(&metrics_url).send().await?.text().await?;
            if text.lines().any(|l| l.starts_with(&format!("{family}{{"))) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "no {family} after 60 s:\n{text}\nlog: {}",
                capture.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let refused = client
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    ensure!(
        refused.status() == 400,
        "malformed JSON: {}",
        refused.status()
    );

    let response = client.get(&metrics_url).send().await?;
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = response.text().await?;
    for family in [
        "holdfast_events_accepted_total",
        "holdfast_requests_rejected_total",
        "holdfast_events_delivered_total",
        "holdfast_events_dead_lettered_total",
    ] {
        ensure!(
            text.lines().any(|l| l.starts_with(&format!("{family}{{"))),
            "no {family} series:\n{text}"
        );
    }
    Ok((text, content_type))
}

/// The operator's exposition with a series in every family, set the way
/// the controllers and orphan recovery set them.
fn operator_exposition() -> String {
    let metrics = Metrics::new();
    metrics.set_ready(true);
    drop(metrics.reconcile("capturecluster"));
    metrics.reconcile_failed("volume", "api");
    metrics.cluster_failed("orphans", "conflict", "shop", "events");
    metrics.volumes_retained.inc();
    metrics.invalid_specs.inc();
    let orphans = &metrics.orphans;
    orphans.orphaned_volumes.set(1);
    orphans.unrecoverable_volumes.set(0);
    orphans.active_flush_jobs.set(1);
    orphans.job("started");
    orphans.phase("job_created", Duration::from_secs(2));
    orphans.flush_job_duration.observe(12.0);
    orphans.orphan_recovery_duration.observe(30.0);
    orphans.volumes_released.inc();
    metrics.clusters.publish(
        &[(
            ClusterLabel {
                namespace: "shop".into(),
                cluster: "events".into(),
            },
            ClusterFigures {
                desired_replicas: 3,
                ready_replicas: 2,
                orphaned: 1,
                ..ClusterFigures::default()
            },
        )]
        .into_iter()
        .collect(),
    );
    metrics
        .clusters
        .phase("shop", "events", "released", Duration::from_secs(40));
    metrics.render()
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

/// OpenMetrics text (what both binaries serve) as the Prometheus text
/// format `promtool check metrics` lints (client_golang's promlint reads
/// only that): a counter family `x` has samples `x_total`, which the older
/// format names as the family itself, and `# UNIT`/`# EOF` do not exist
/// there. Nothing else changes.
fn as_prometheus_text(openmetrics: &str) -> anyhow::Result<String> {
    ensure!(
        openmetrics.trim_end().ends_with("# EOF"),
        "not OpenMetrics (no # EOF):\n{openmetrics}"
    );
    let counters: BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::new();
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    Ok(out)
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
