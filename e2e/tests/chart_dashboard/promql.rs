//! Reading PromQL and expositions for chart_dashboard.rs: the vector
//! selectors (metric and matcher labels) of an expression, what an
//! exposition offers to queries, and OpenMetrics as the older Prometheus
//! text format that `promtool check metrics` lints.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, bail, ensure};

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
pub struct Selector {
    pub metric: String,
    pub labels: Vec<String>,
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

pub fn is_ident(c: char) -> bool {
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
pub fn selectors(expr: &str) -> anyhow::Result<Vec<Selector>> {
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
pub struct Exported {
    /// Series names a query can select: every sample's name, and for a
    /// family shown without samples the names its type gives its samples
    /// (OpenMetrics: counter `x` → `x_total`; histogram `x` → `x_bucket`,
    /// `x_sum`, `x_count`).
    pub names: BTreeSet<String>,
    /// Label names seen on each series name's samples.
    pub labels: BTreeMap<String, BTreeSet<String>>,
}

impl Exported {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
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
pub fn unexported(
    queries: &[(String, String)],
    exported: &Exported,
) -> anyhow::Result<Vec<String>> {
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

/// OpenMetrics text (what both binaries serve) as the Prometheus text
/// format `promtool check metrics` lints (client_golang's promlint reads
/// only that): a counter family `x` has samples `x_total`, which the older
/// format names as the family itself, and `# UNIT`/`# EOF` do not exist
/// there. Nothing else changes.
pub fn as_prometheus_text(openmetrics: &str) -> anyhow::Result<String> {
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

pub fn families(text: &str) -> BTreeMap<String, (String, String)> {
    let mut out: BTreeMap<String, (String, String)> = BTreeMap::new();
    for line in text.lines() {
        for (prefix, help) in [("# TYPE ", false), ("# HELP ", true)] {
            if let Some((name, rest)) = line.strip_prefix(prefix).and_then(|l| l.split_once(' ')) {
                let entry = out.entry(name.to_string()).or_default();
                if help {
                    entry.1 = rest.to_string();
                } else {
                    entry.0 = rest.to_string();
                }
            }
        }
    }
    out
}
