//! The speed targets the design is held to (issue 13), judged from a
//! report: ratios against the baseline build (the issue measures against
//! `bcde454`: `make bench BASELINE=bcde454`) and absolute bounds. Nothing
//! fails on them; the report says which are met, which are not, and which
//! this run did not measure (another scale, no baseline, a failed run).
//!
//! Beside each target the single-event ones bear on, the report says what
//! the same build reaches with no fsync at all (`--durability os`, plus one
//! fsync median for a latency): a target that even this misses cannot be
//! met by any change to how the buffer syncs, only by a cheaper request path.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::report::{Report, grouped};

/// One target and what the run measured against it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetCheck {
    /// The target, in words.
    pub target: String,
    /// The figure measured, in words (empty when not measured).
    pub measured: String,
    /// Met, not met, or not measured in this run.
    pub met: Option<bool>,
    /// What this build reaches without fsync (see the module docs), in
    /// words; empty where no fsync setting bears on the target.
    #[serde(default)]
    pub ceiling: String,
    /// Whether that would meet the target.
    #[serde(default)]
    pub ceiling_met: Option<bool>,
}

/// A figure measured, as a number and in words.
type Measured = Option<(f64, String)>;

/// Which way a bound goes.
#[derive(Debug, Clone, Copy)]
enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

impl Bound {
    fn holds(self, v: f64) -> bool {
        match self {
            Bound::AtLeast(t) => v >= t,
            Bound::AtMost(t) => v <= t,
        }
    }
}

/// Every target, judged from `r`'s medians, ratios and comparisons.
pub fn evaluate(r: &Report) -> Vec<TargetCheck> {
    let this = r.builds.first().map_or("this", |b| b.label.as_str());
    let comparison = |id: &str, figure: &str| {
        r.comparisons
            .iter()
            .find(|c| c.id == id && c.figure == figure)
            .filter(|c| c.ratio.is_finite())
    };
    let compared = |id: &str, figure: &str| {
        comparison(id, figure).map(|c| {
            let range = if c.rounds > 1 {
                format!(", rounds {:.2}x to {:.2}x", c.low, c.high)
            } else {
                String::new()
            };
            let words = format!(
                "{:.2}x ({} against {}{range})",
                c.ratio,
                figure_words(c.this, figure),
                figure_words(c.baseline, figure)
            );
            (c.ratio, words)
        })
    };
    // Without fsync: this build's `os` figure (plus one fsync median for a
    // latency), against the baseline's durable one.
    let fsync_median = super::report::median(r.fsync.iter().map(|f| f.p50_ms).collect());
    let os_p50 = |shape: &str| {
        r.median_of(&format!("os {shape}"), this, |s| {
            Some(s.result.as_ref()?.latency_ms.p50)
        })
    };
    let unsynced = |shape: &str, figure: &str| -> Option<f64> {
        match figure {
            "events/s" => r.median_of(&format!("os {shape}"), this, |s| {
                Some(s.result.as_ref()?.events_per_sec)
            }),
            _ => Some(os_p50(shape)? + fsync_median?),
        }
    };
    let ceiling_ratio = |shape: &str, figure: &str| {
        let base = comparison(&format!("fsync {shape}"), figure)?.baseline;
        let v = unsynced(shape, figure)?;
        (base > 0.0).then(|| {
            let words = format!(
                "{:.2}x ({} against {})",
                v / base,
                figure_words(v, figure),
                figure_words(base, figure)
            );
            (v / base, words)
        })
    };
    // Over the fsync median by what a request costs besides its sync.
    let ceiling_over = |shape: &str| os_p50(shape).map(|v| (v, format!("{v:+.3} ms")));
    let ratio = |name: &str| {
        r.ratios
            .iter()
            .find(|x| x.name == name && x.build == this)
            .map(|x| x.value)
    };
    let p99 = |id: &str| {
        r.median_of(id, this, |s| Some(s.result.as_ref()?.latency_ms.p99))
            .map(|v| (v, format!("{v:.3} ms")))
    };
    let ms = |v: Option<f64>| v.map(|v| (v, format!("{v:+.3} ms")));
    let times = |v: Option<f64>| v.map(|v| (v, format!("{v:.2}x")));
    let batch = format!("fsync batch{} max c32", r.scale.batch_events);
    let worst_direct = r
        .ratios
        .iter()
        .filter(|x| x.build == this && x.name.starts_with("durable P50 / direct P50"))
        .map(|x| x.value)
        .reduce(f64::max);
    let drain = r
        .drain_rate("flush at-least-once", this)
        .map(|v| (v, format!("{} events/s", grouped(v))));
    let rss = r
        .median_of("fsync 10000/s", this, |s| s.rss_peak_mib)
        .map(|v| (v, format!("{v:.0} MiB")));
    let list: Vec<(&str, Measured, Bound, Measured)> = vec![
        (
            "single events at 32 connections: ≥ 1.6x the baseline's events/s",
            compared("fsync max c32", "events/s"),
            Bound::AtLeast(1.6),
            ceiling_ratio("max c32", "events/s"),
        ),
        (
            "P50 at 4 connections: ≤ 0.6x the baseline's",
            compared("fsync max c4", "P50 ms"),
            Bound::AtMost(0.6),
            ceiling_ratio("max c4", "P50 ms"),
        ),
        (
            "P50 at 4 connections: within 0.1 ms of the disk's fsync median",
            ms(ratio("durable P50 - fsync median, max c4")),
            Bound::AtMost(0.1),
            ceiling_over("max c4"),
        ),
        (
            "P99 at 4 connections: ≤ 2 ms",
            p99("fsync max c4"),
            Bound::AtMost(2.0),
            None,
        ),
        (
            "P50 at a fixed 10,000 requests/s: ≤ 0.6x the baseline's",
            compared("fsync 10000/s", "P50 ms"),
            Bound::AtMost(0.6),
            ceiling_ratio("10000/s", "P50 ms"),
        ),
        (
            "P50 at a fixed 10,000 requests/s: within 0.1 ms of the disk's fsync median",
            ms(ratio("durable P50 - fsync median, 10000/s")),
            Bound::AtMost(0.1),
            ceiling_over("10000/s"),
        ),
        (
            "P99 at a fixed 10,000 requests/s: ≤ 2 ms",
            p99("fsync 10000/s"),
            Bound::AtMost(2.0),
            None,
        ),
        (
            "durable P50 ≤ 0.3x direct P50 (the worst load shape)",
            times(worst_direct),
            Bound::AtMost(0.3),
            None,
        ),
        (
            "100-event batches at 32 connections: ≥ 1.85x the baseline's events/s",
            compared(&batch, "events/s"),
            Bound::AtLeast(1.85),
            None,
        ),
        (
            "100-event batches at 32 connections: P99 ≤ 20 ms",
            p99(&batch),
            Bound::AtMost(20.0),
            None,
        ),
        (
            "drain (at-least-once): ≥ 300,000 events/s",
            drain,
            Bound::AtLeast(300_000.0),
            None,
        ),
        (
            "drain (at-least-once): ≥ 0.5x the raw rdkafka produce loop",
            times(ratio("drain / raw produce, at-least-once")),
            Bound::AtLeast(0.5),
            None,
        ),
        (
            "RSS at 10,000 events/s: ≤ 64 MiB",
            rss,
            Bound::AtMost(64.0),
            None,
        ),
    ];
    list.into_iter()
        .map(|(target, measured, bound, ceiling)| TargetCheck {
            target: target.to_owned(),
            met: measured.as_ref().map(|(v, _)| bound.holds(*v)),
            measured: measured.map(|(_, words)| words).unwrap_or_default(),
            ceiling_met: ceiling.as_ref().map(|(v, _)| bound.holds(*v)),
            ceiling: ceiling.map(|(_, words)| words).unwrap_or_default(),
        })
        .collect()
}

fn figure_words(v: f64, figure: &str) -> String {
    match figure {
        "events/s" => format!("{} events/s", grouped(v)),
        "P50 ms" | "P99 ms" | "P99.9 ms" => format!("{v:.3} ms"),
        other => format!("{v:.1} {other}"),
    }
}

/// The targets as a Markdown section.
pub fn markdown(m: &mut String, r: &Report) {
    let baseline = r.builds.get(1).map_or(
        "none (ratios against it are not measured)".to_owned(),
        |b| format!("`{}`", b.label),
    );
    let _ = writeln!(
        m,
        "\n## Targets\n\nThe speeds the design is held to on this 2-core machine, \
         with `--durability fsync` and the broker on the same cores (ratios against the \
         baseline: the targets were set against `bcde454`; this run's baseline: {baseline}). \
         Reported, never asserted. The last column is what this build reaches with no \
         fsync at all (`--durability os`, plus one fsync median for a latency), against \
         the baseline's durable figure: where even that misses, no change to syncing can \
         meet the target.\n\n\
         | target | measured | met | with no fsync at all |\n| --- | --- | --- | --- |"
    );
    for t in &r.targets {
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "no",
            None => "not measured",
        };
        let ceiling = match t.ceiling_met {
            Some(true) => format!("met: {}", t.ceiling),
            Some(false) => format!("no: {}", t.ceiling),
            None => String::new(),
        };
        let _ = writeln!(m, "| {} | {} | {met} | {ceiling} |", t.target, t.measured);
    }
}
