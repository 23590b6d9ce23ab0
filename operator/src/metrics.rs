//! Prometheus metrics of the operator (all `holdfast_operator_*`) and its
//! small HTTP server: `GET /metrics`, `GET /healthz` (200 while the process
//! runs), `GET /readyz` (200 once the operator leads or, without leader
//! election, runs its controllers; a standby replica answers 503, which keeps
//! it out of a Service but not alive-checked to death).
//!
//! Fleet-wide series keep short names (`holdfast_operator_orphaned_volumes`,
//! `..._orphan_phase_seconds{phase}`, `..._reconcile_errors_total{controller,
//! reason}`). What describes one CaptureCluster is also exposed per cluster,
//! as `holdfast_operator_cluster_*{namespace, cluster}` ([`ClusterMetrics`]).
//! Their cardinality is bounded by the CaptureClusters that exist (plus
//! those whose orphaned volumes outlive them): the leader sets every such
//! series on each orphan-recovery pass and removes the series of clusters
//! that are gone, and the other labels take a fixed set of values (4
//! phases, 3 controllers, 9 error classes). With 50 clusters that is about
//! 3,000 series, most of them the phase histograms' buckets.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Label: which controller.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    /// `capturecluster` or `volume`.
    pub controller: String,
}

/// Labels: controller and error reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// `capturecluster` or `volume`.
    pub controller: String,
    /// Error class (`api`, `conflict`, `forbidden`, ...).
    pub reason: String,
}

/// Label: the CaptureCluster a series describes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ClusterLabel {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub cluster: String,
}

/// Labels: a cluster, a controller and an error class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ClusterErrorLabel {
    /// The cluster's namespace.
    pub namespace: String,
    /// The cluster's name.
    pub cluster: String,
    /// `capturecluster`, `volume` or `orphans`.
    pub controller: String,
    /// Error class (`api`, `conflict`, `forbidden`, ...).
    pub reason: String,
}

/// Labels: a cluster and a phase of an orphan's recovery.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ClusterPhaseLabel {
    /// The cluster's namespace.
    pub namespace: String,
    /// The cluster's name.
    pub cluster: String,
    /// `job_created`, `pod_running`, `drained`, `released`.
    pub phase: String,
}

/// Where one cluster stands after an orphan-recovery pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterFigures {
    /// Replicas wanted (the StatefulSet's spec).
    pub desired_replicas: i64,
    /// Capture pods ready (the StatefulSet's status).
    pub ready_replicas: i64,
    /// Orphaned volumes that may hold events (status `orphanedVolumes`).
    pub orphaned: i64,
    /// Orphaned volumes that cannot be drained without a human.
    pub unrecoverable: i64,
    /// Orphaned volumes that are stuck: unrecoverable, or whose flush Jobs
    /// failed [`crate::classify::STUCK_AFTER_FAILURES`] times in a row (the
    /// `OrphansStuck` condition's rule).
    pub stuck: i64,
    /// How long the oldest orphan still being recovered has been orphaned
    /// (as this process saw it; 0 when none).
    pub oldest_recovering_seconds: f64,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Per-CaptureCluster metrics (`holdfast_operator_cluster_*`, labelled
/// `namespace` and `cluster`).
#[derive(Debug)]
pub struct ClusterMetrics {
    desired: Family<ClusterLabel, Gauge>,
    ready: Family<ClusterLabel, Gauge>,
    orphaned: Family<ClusterLabel, Gauge>,
    unrecoverable: Family<ClusterLabel, Gauge>,
    stuck: Family<ClusterLabel, Gauge>,
    oldest: Family<ClusterLabel, FloatGauge>,
    errors: Family<ClusterErrorLabel, Counter>,
    phases: Family<ClusterPhaseLabel, Histogram, fn() -> Histogram>,
    /// Every label set in use, so the series of a cluster that is gone can
    /// be removed.
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    clusters: BTreeSet<ClusterLabel>,
    errors: BTreeSet<ClusterErrorLabel>,
    phases: BTreeSet<ClusterPhaseLabel>,
}

fn phase_histogram() -> Histogram {
    Histogram::new([0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0])
}

fn label(namespace: &str, cluster: &str) -> ClusterLabel {
    ClusterLabel {
        namespace: namespace.to_string(),
        cluster: cluster.to_string(),
    }
}

impl ClusterMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            desired: Family::default(),
            ready: Family::default(),
            orphaned: Family::default(),
            unrecoverable: Family::default(),
            stuck: Family::default(),
            oldest: Family::default(),
            errors: Family::default(),
            phases: Family::new_with_constructor(phase_histogram as fn() -> Histogram),
            seen: Mutex::new(Seen::default()),
        };
        let gauges = [
            (
                "cluster_desired_replicas",
                "Capture pods a CaptureCluster wants (its StatefulSet's spec)",
                &m.desired,
            ),
            (
                "cluster_ready_replicas",
                "Capture pods of a CaptureCluster that are ready",
                &m.ready,
            ),
            (
                "cluster_orphaned_volumes",
                "Orphaned volumes of a CaptureCluster that may hold events (no pod will drain them)",
                &m.orphaned,
            ),
            (
                "cluster_unrecoverable_volumes",
                "Orphaned volumes of a CaptureCluster that cannot be drained without a human (they stay Retain)",
                &m.unrecoverable,
            ),
            (
                "cluster_stuck_volumes",
                "Orphaned volumes of a CaptureCluster that are unrecoverable or whose flush Jobs keep failing (condition OrphansStuck)",
                &m.stuck,
            ),
        ];
        for (name, help, family) in gauges {
            registry.register(name, help, family.clone());
        }
        registry.register_with_unit(
            "cluster_oldest_recovering_orphan",
            "How long the oldest orphaned volume of a CaptureCluster still being recovered has waited (since this operator process first saw it)",
            Unit::Seconds,
            m.oldest.clone(),
        );
        registry.register(
            "cluster_reconcile_errors",
            "Failed reconciliations and recovery steps of a CaptureCluster, by controller and reason",
            m.errors.clone(),
        );
        registry.register_with_unit(
            "cluster_orphan_phase",
            "Time from detecting an orphan of a CaptureCluster to each phase of its recovery (job_created, pod_running, drained, released)",
            Unit::Seconds,
            m.phases.clone(),
        );
        m
    }

    /// Sets every cluster's figures and removes the series of clusters
    /// that are not in `figures` any more.
    pub fn publish(&self, figures: &BTreeMap<ClusterLabel, ClusterFigures>) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        for (l, f) in figures {
            self.desired.get_or_create(l).set(f.desired_replicas);
            self.ready.get_or_create(l).set(f.ready_replicas);
            self.orphaned.get_or_create(l).set(f.orphaned);
            self.unrecoverable.get_or_create(l).set(f.unrecoverable);
            self.stuck.get_or_create(l).set(f.stuck);
            self.oldest
                .get_or_create(l)
                .set(f.oldest_recovering_seconds);
            seen.clusters.insert(l.clone());
        }
        let gone =
            |namespace: &str, cluster: &str| !figures.contains_key(&label(namespace, cluster));
        for l in seen
            .clusters
            .iter()
            .filter(|l| gone(&l.namespace, &l.cluster))
        {
            self.desired.remove(l);
            self.ready.remove(l);
            self.orphaned.remove(l);
            self.unrecoverable.remove(l);
            self.stuck.remove(l);
            self.oldest.remove(l);
        }
        seen.clusters.retain(|l| !gone(&l.namespace, &l.cluster));
        for l in seen
            .errors
            .iter()
            .filter(|l| gone(&l.namespace, &l.cluster))
        {
            self.errors.remove(l);
        }
        seen.errors.retain(|l| !gone(&l.namespace, &l.cluster));
        for l in seen
            .phases
            .iter()
            .filter(|l| gone(&l.namespace, &l.cluster))
        {
            self.phases.remove(l);
        }
        seen.phases.retain(|l| !gone(&l.namespace, &l.cluster));
    }

    /// Records that an orphan of `namespace/cluster` reached `phase` `since`
    /// its detection.
    pub fn phase(&self, namespace: &str, cluster: &str, phase: &str, since: Duration) {
        let l = ClusterPhaseLabel {
            namespace: namespace.to_string(),
            cluster: cluster.to_string(),
            phase: phase.to_string(),
        };
        self.phases.get_or_create(&l).observe(since.as_secs_f64());
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .phases
            .insert(l);
    }

    fn error(&self, l: ClusterErrorLabel) {
        self.errors.get_or_create(&l).inc();
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .errors
            .insert(l);
    }
}

/// Every metric of the operator.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabel, Counter>,
    errors: Family<ErrorLabel, Counter>,
    duration: Family<ControllerLabel, Histogram, fn() -> Histogram>,
    /// 1 while this process holds the leader Lease.
    pub leader: Gauge,
    /// PVs the operator set to `Retain`.
    pub volumes_retained: Counter,
    /// CaptureClusters whose spec was refused.
    pub invalid_specs: Counter,
    /// Orphan recovery (flush Jobs, orphaned volumes).
    pub orphans: crate::orphans::OrphanMetrics,
    /// Per-CaptureCluster series.
    pub clusters: ClusterMetrics,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("holdfast_operator");
        let reconciles = Family::<ControllerLabel, Counter>::default();
        registry.register("reconciles", "Reconciliations run", reconciles.clone());
        let errors = Family::<ErrorLabel, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by reason",
            errors.clone(),
        );
        let duration = Family::<ControllerLabel, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Time one reconciliation took",
            Unit::Seconds,
            duration.clone(),
        );
        let leader = Gauge::default();
        registry.register("leader", "1 while this process leads", leader.clone());
        let volumes_retained = Counter::default();
        registry.register(
            "volumes_retained",
            "PersistentVolumes set to Retain by the operator",
            volumes_retained.clone(),
        );
        let invalid_specs = Counter::default();
        registry.register(
            "invalid_specs",
            "Reconciliations that refused a CaptureCluster spec",
            invalid_specs.clone(),
        );
        let orphans = crate::orphans::OrphanMetrics::register(&mut registry);
        let clusters = ClusterMetrics::register(&mut registry);
        Self {
            registry,
            reconciles,
            errors,
            duration,
            leader,
            volumes_retained,
            invalid_specs,
            orphans,
            clusters,
            ready: AtomicBool::new(false),
        }
    }

    /// Starts timing one reconciliation of `controller`; the returned guard
    /// records count and duration when dropped.
    pub fn reconcile(&self, controller: &str) -> ReconcileTimer<'_> {
        let label = ControllerLabel {
            controller: controller.to_string(),
        };
        self.reconciles.get_or_create(&label).inc();
        ReconcileTimer {
            metrics: self,
            label,
            start: Instant::now(),
        }
    }

    /// Counts a failed reconciliation.
    pub fn reconcile_failed(&self, controller: &str, reason: &str) {
        self.errors
            .get_or_create(&ErrorLabel {
                controller: controller.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts a failed reconciliation (or recovery step) of the
    /// CaptureCluster `namespace/cluster`: fleet-wide and for that cluster.
    pub fn cluster_failed(&self, controller: &str, reason: &str, namespace: &str, cluster: &str) {
        self.reconcile_failed(controller, reason);
        self.clusters.error(ClusterErrorLabel {
            namespace: namespace.to_string(),
            cluster: cluster.to_string(),
            controller: controller.to_string(),
            reason: reason.to_string(),
        });
    }

    /// Marks the operator ready (leading, controllers running) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.leader.set(i64::from(ready));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Records one reconciliation when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    label: ControllerLabel,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&self.label)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// The operator's HTTP routes.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(metrics)
}

async fn render(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
}

async fn readyz(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "standby")
    }
}
