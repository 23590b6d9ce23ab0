//! Metrics of orphan recovery (registered under `holdfast_operator_`), and
//! the per-cluster figures each recovery pass publishes.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::ResourceExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::classify::{Inventory, Orphan, STUCK_AFTER_FAILURES, Step};
use crate::metrics::{ClusterFigures, ClusterLabel};

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

/// The per-cluster figures of one recovery pass, published to
/// [`crate::metrics::ClusterMetrics`]: every CaptureCluster of the
/// inventory (zero when it has no orphan, so alerts have a series to
/// compare), plus the clusters that are gone but left orphans behind.
#[derive(Debug, Default)]
pub struct Tally(BTreeMap<ClusterLabel, ClusterFigures>);

impl Tally {
    /// Every cluster of `inv`, with its replicas and no orphan yet.
    pub fn new(inv: &Inventory) -> Self {
        let mut figures = BTreeMap::new();
        for cluster in &inv.clusters {
            let namespace = cluster.namespace().unwrap_or_default();
            let name = cluster.name_any();
            let ready = inv
                .statefulsets
                .iter()
                .find(|s| s.namespace().as_deref() == Some(&namespace) && s.name_any() == name)
                .and_then(|s| s.status.as_ref())
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            let desired = if cluster.metadata.deletion_timestamp.is_some() {
                0
            } else {
                cluster.spec.replicas
            };
            figures.insert(
                ClusterLabel {
                    namespace,
                    cluster: name,
                },
                ClusterFigures {
                    desired_replicas: i64::from(desired),
                    ready_replicas: i64::from(ready),
                    ..Default::default()
                },
            );
        }
        Self(figures)
    }

    /// Counts one orphan that may hold events: what the pass decided for it
    /// and how long it has been orphaned.
    pub fn orphan(
        &mut self,
        orphan: &Orphan,
        volume: Option<&PersistentVolume>,
        step: &Step,
        orphaned_for: Duration,
    ) {
        if orphan.clean {
            return;
        }
        let f = self
            .0
            .entry(ClusterLabel {
                namespace: orphan.namespace.clone(),
                cluster: orphan.cluster.clone(),
            })
            .or_default();
        f.orphaned += 1;
        let failures = volume.map_or(0, |v| crate::classify::failures(v).0);
        let unrecoverable = matches!(step, Step::Report(_));
        if unrecoverable {
            f.unrecoverable += 1;
        } else {
            f.oldest_recovering_seconds =
                f.oldest_recovering_seconds.max(orphaned_for.as_secs_f64());
        }
        if unrecoverable || failures >= STUCK_AFTER_FAILURES {
            f.stuck += 1;
        }
    }

    /// The figures, by cluster.
    pub fn figures(&self) -> &BTreeMap<ClusterLabel, ClusterFigures> {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::OrphanKind;
    use serde_json::json;

    fn inventory() -> Inventory {
        let cluster = |ns: &str, name: &str, replicas: i32| {
            serde_json::from_value(json!({
                "apiVersion": "holdfast.dev/v1alpha1", "kind": "CaptureCluster",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"replicas": replicas, "image": "i", "kafka": {"bootstrapServers": "k:9092"},
                    "storage": {"size": "1Gi"}},
            }))
            .unwrap()
        };
        Inventory {
            clusters: vec![cluster("shop", "events", 3), cluster("web", "clicks", 1)],
            statefulsets: vec![
                serde_json::from_value(json!({
                    "metadata": {"name": "events", "namespace": "shop"},
                    "status": {"replicas": 3, "readyReplicas": 2},
                }))
                .unwrap(),
            ],
            ..Default::default()
        }
    }

    fn orphan(ns: &str, cluster: &str, volume: &str, clean: bool) -> Orphan {
        Orphan {
            kind: OrphanKind::ReleasedVolume,
            namespace: ns.into(),
            cluster: cluster.into(),
            volume: Some(volume.into()),
            claim: format!("hf-recover-{volume}"),
            claim_exists: false,
            claim_bound: false,
            clean,
        }
    }

    #[test]
    fn counts_each_clusters_orphans_with_the_stuck_rule_of_the_condition() {
        let mut tally = Tally::new(&inventory());
        let failing: PersistentVolume = serde_json::from_value(json!({
            "metadata": {"name": "pv-b", "annotations": {crate::flush::FAILURES_ANNOTATION: STUCK_AFTER_FAILURES.to_string()}},
        }))
        .unwrap();
        let waiting = Step::Wait("flush job running");
        tally.orphan(
            &orphan("shop", "events", "pv-a", false),
            None,
            &waiting,
            Duration::from_secs(40),
        );
        tally.orphan(
            &orphan("shop", "events", "pv-b", false),
            Some(&failing),
            &waiting,
            Duration::from_secs(90),
        );
        tally.orphan(
            &orphan("shop", "events", "pv-c", true),
            None,
            &waiting,
            Duration::from_secs(900),
        );
        tally.orphan(
            &orphan("gone", "old", "pv-d", false),
            None,
            &Step::Report("its CaptureCluster is gone".into()),
            Duration::from_secs(600),
        );
        let f = tally.figures();
        let of = |ns: &str, c: &str| {
            f[&ClusterLabel {
                namespace: ns.into(),
                cluster: c.into(),
            }]
                .clone()
        };
        let events = of("shop", "events");
        assert_eq!((events.desired_replicas, events.ready_replicas), (3, 2));
        // The clean one holds nothing: not counted.
        assert_eq!(
            (events.orphaned, events.stuck, events.unrecoverable),
            (2, 1, 0)
        );
        assert_eq!(events.oldest_recovering_seconds, 90.0);
        // A cluster without orphans is there, at zero.
        assert_eq!(
            of("web", "clicks"),
            ClusterFigures {
                desired_replicas: 1,
                ..Default::default()
            }
        );
        // A gone cluster's unrecoverable volume is stuck, not "recovering".
        let old = of("gone", "old");
        assert_eq!((old.orphaned, old.unrecoverable, old.stuck), (1, 1, 1));
        assert_eq!(old.oldest_recovering_seconds, 0.0);
        assert_eq!(f.len(), 3);
    }

    #[test]
    fn series_of_clusters_that_are_gone_are_removed() {
        let metrics = crate::metrics::Metrics::new();
        let mut tally = Tally::new(&inventory());
        tally.orphan(
            &orphan("shop", "events", "pv-a", false),
            None,
            &Step::Wait("x"),
            Duration::from_secs(5),
        );
        metrics.clusters.publish(tally.figures());
        metrics
            .clusters
            .phase("shop", "events", "job_created", Duration::from_secs(1));
        metrics.cluster_failed("orphans", "conflict", "shop", "events");
        let text = metrics.render();
        for sample in [
            "holdfast_operator_cluster_orphaned_volumes{namespace=\"shop\",cluster=\"events\"} 1",
            "holdfast_operator_cluster_ready_replicas{namespace=\"shop\",cluster=\"events\"} 2",
            "holdfast_operator_cluster_orphaned_volumes{namespace=\"web\",cluster=\"clicks\"} 0",
            "holdfast_operator_cluster_oldest_recovering_orphan_seconds{namespace=\"shop\",cluster=\"events\"} 5",
            "holdfast_operator_cluster_reconcile_errors_total{namespace=\"shop\",cluster=\"events\",controller=\"orphans\",reason=\"conflict\"} 1",
            "holdfast_operator_cluster_orphan_phase_seconds_count{namespace=\"shop\",cluster=\"events\",phase=\"job_created\"} 1",
            "holdfast_operator_reconcile_errors_total{controller=\"orphans\",reason=\"conflict\"} 1",
        ] {
            assert!(text.contains(sample), "{sample} missing:\n{text}");
        }
        // shop/events is deleted: every one of its series goes.
        let mut inv = inventory();
        inv.clusters.remove(0);
        metrics.clusters.publish(Tally::new(&inv).figures());
        let text = metrics.render();
        assert!(!text.contains("cluster=\"events\""), "{text}");
        assert!(text.contains("cluster=\"clicks\""), "{text}");
    }
}
