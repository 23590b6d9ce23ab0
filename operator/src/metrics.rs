//! Prometheus metrics of the operator (all `holdfast_operator_*`) and its
//! small HTTP server: `GET /metrics`, `GET /healthz` (200 while the process
//! runs), `GET /readyz` (200 once the operator leads or, without leader
//! election, runs its controllers; a standby replica answers 503, which keeps
//! it out of a Service but not alive-checked to death).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

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
        Self {
            registry,
            reconciles,
            errors,
            duration,
            leader,
            volumes_retained,
            invalid_specs,
            orphans,
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
