//! Metrics of orphan recovery (registered under `holdfast_operator_`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Label: what a flush Job counter counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `started`, `succeeded`, `failed`, `stopped`.
    pub result: String,
}

/// Label: a phase of one orphan's recovery.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// `job_created`, `pod_running`, `drained`, `released`.
    pub phase: String,
}

/// Metrics of orphan recovery (registered under `holdfast_operator_`).
#[derive(Debug)]
pub struct OrphanMetrics {
    /// Volumes that hold events and that no pod will drain.
    pub orphaned_volumes: Gauge,
    /// Orphaned volumes that cannot be drained (cluster gone, recovery off).
    pub unrecoverable_volumes: Gauge,
    /// Flush Jobs running now.
    pub active_flush_jobs: Gauge,
    /// Flush Jobs by what happened to them.
    pub flush_jobs: Family<ResultLabel, Counter>,
    /// How long flush Jobs ran (start to end).
    pub flush_job_duration: Histogram,
    /// Time from first seeing a volume orphaned to its release.
    pub orphan_recovery_duration: Histogram,
    /// Volumes handed back to the storage system (flipped or released).
    pub volumes_released: Counter,
    /// Time from an orphan's detection to each phase of its recovery.
    pub phases: Family<PhaseLabel, Histogram, fn() -> Histogram>,
}

fn phase_histogram() -> Histogram {
    Histogram::new([0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0])
}

fn seconds_histogram() -> Histogram {
    Histogram::new([1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0])
}

impl OrphanMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            orphaned_volumes: Gauge::default(),
            unrecoverable_volumes: Gauge::default(),
            active_flush_jobs: Gauge::default(),
            flush_jobs: Family::default(),
            flush_job_duration: seconds_histogram(),
            orphan_recovery_duration: seconds_histogram(),
            volumes_released: Counter::default(),
            phases: Family::new_with_constructor(phase_histogram as fn() -> Histogram),
        };
        registry.register_with_unit(
            "orphan_phase",
            "Time from detecting an orphan to each phase of its recovery (job_created, pod_running, drained, released)",
            Unit::Seconds,
            m.phases.clone(),
        );
        registry.register(
            "orphaned_volumes",
            "Volumes holding events that no pod will drain",
            m.orphaned_volumes.clone(),
        );
        registry.register(
            "unrecoverable_volumes",
            "Orphaned volumes that cannot be drained (their CaptureCluster is gone or disabled recovery); they stay Retain",
            m.unrecoverable_volumes.clone(),
        );
        registry.register(
            "flush_jobs_active",
            "Flush Jobs running now",
            m.active_flush_jobs.clone(),
        );
        registry.register(
            "flush_jobs",
            "Flush Jobs by result (started, succeeded, failed, stopped)",
            m.flush_jobs.clone(),
        );
        registry.register_with_unit(
            "flush_job_duration",
            "How long a flush Job ran",
            Unit::Seconds,
            m.flush_job_duration.clone(),
        );
        registry.register_with_unit(
            "orphan_recovery_duration",
            "Time from first seeing a volume orphaned to handing it back drained",
            Unit::Seconds,
            m.orphan_recovery_duration.clone(),
        );
        registry.register(
            "volumes_released",
            "Drained volumes handed back to the storage system",
            m.volumes_released.clone(),
        );
        m
    }

    /// Records that an orphan reached `phase` `since` its detection.
    pub fn phase(&self, phase: &str, since: std::time::Duration) {
        self.phases
            .get_or_create(&PhaseLabel {
                phase: phase.to_string(),
            })
            .observe(since.as_secs_f64());
    }

    /// Counts one flush Job `result`.
    pub fn job(&self, result: &str) {
        self.flush_jobs
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }
}
