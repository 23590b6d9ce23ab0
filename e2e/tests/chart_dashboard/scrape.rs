//! The expositions chart_dashboard.rs checks: a real capture pod's
//! `/metrics`, and the operator's registry with every family populated.

use std::time::{Duration, Instant};

use anyhow::ensure;
use holdfast_e2e::capture::CaptureProcess;
use holdfast_e2e::kafka::KafkaBroker;
use holdfast_operator::metrics::{ClusterFigures, ClusterLabel, Metrics};
use serde_json::json;

pub struct Scrapes {
    /// `GET /metrics` of a real capture pod.
    pub capture: String,
    /// Its Content-Type.
    pub capture_content_type: String,
    /// The operator's registry with every family populated.
    pub operator: String,
}

static SCRAPES: tokio::sync::OnceCell<Scrapes> = tokio::sync::OnceCell::const_new();

pub async fn scrapes() -> anyhow::Result<&'static Scrapes> {
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
    // Two small events and an oversized one in the same request: the poison
    // fails the Kafka batch it shares with them, they are sent again alone
    // and must still count as delivered.
    let body = json!([{"n": 1}, {"pad": "p".repeat(3000)}, {"n": 2}]).to_string();
    let response = client
        .post(&url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    ensure!(response.status() == 200, "post: {}", response.status());
    for family in [
        "holdfast_events_delivered_total",
        "holdfast_events_dead_lettered_total",
    ] {
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
pub fn operator_exposition() -> String {
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
