//! What status says about a cluster's orphans: one entry per volume that
//! may hold events and that no pod will drain (the classifier's own
//! definition, [`crate::classify`]), with its phase, why, its failures and
//! next retry, and the `OrphansRecovering` / `OrphansStuck` conditions.
//! Pure: derived from the same objects recovery acts on, so a restarted
//! operator reports the same thing.

use std::time::Duration;

use kube::ResourceExt;

use crate::api::{CaptureCluster, VolumeRecoveryStatus};
use crate::classify::{self, Inventory, Situation, Step};
use crate::flush::{flush_job_name, job_failure};
use crate::runtime::backoff;

/// Flush Jobs failing this many times in a row make the volume count as stuck.
pub const STUCK_AFTER_FAILURES: u32 = 3;

/// The entries of `status.volumes` for `cluster`. Pure.
pub fn volume_states(
    inv: &Inventory,
    cluster: &CaptureCluster,
    now: jiff::Timestamp,
) -> Vec<VolumeRecoveryStatus> {
    let ns = cluster.namespace().unwrap_or_default();
    let name = cluster.name_any();
    classify::find(inv)
        .orphans
        .iter()
        .filter(|o| o.namespace == ns && o.cluster == name && !o.clean)
        .map(|orphan| {
            let volume = orphan
                .volume
                .as_deref()
                .and_then(|v| inv.volumes.iter().find(|pv| pv.name_any() == v));
            let job = classify::job_of(orphan, &inv.jobs);
            let step = classify::decide(
                orphan,
                &Situation {
                    cluster: Some(cluster),
                    volume,
                    job,
                    // Status does not know when recovery first saw it: the
                    // recovery delay is reported as passed.
                    orphaned_for: Duration::MAX,
                    now,
                    slot_free: true,
                },
            );
            let (failures, failed_at) = volume.map(classify::failures).unwrap_or_default();
            let next_retry = failed_at.filter(|_| failures > 0).and_then(|at| {
                let retry = jiff::SignedDuration::try_from(backoff(failures)).ok()?;
                at.checked_add(retry).ok().map(|t| t.to_string())
            });
            let volume_name = orphan
                .volume
                .clone()
                .unwrap_or_else(|| format!("claim/{}", orphan.claim));
            let (phase, reason) = match &step {
                Step::Report(why) => ("Stuck", why.clone()),
                Step::Wait("flush job running") => (
                    "Draining",
                    format!("flush Job {} is draining it", flush_job_name(&volume_name)),
                ),
                Step::Wait(why) if failures > 0 => (
                    "Retrying",
                    format!("{failures} flush Job(s) failed in a row; {why}"),
                ),
                Step::Wait(why) => ("Waiting", (*why).to_string()),
                Step::RecordFailure => (
                    "Retrying",
                    job.map_or_else(|| "flush Job failed".into(), job_failure),
                ),
                Step::Finish => ("Drained", "drained; handing the volume back".into()),
                Step::Rebind | Step::StartJob | Step::Release => {
                    ("Pending", "a flush Job is about to start".into())
                }
            };
            VolumeRecoveryStatus {
                volume: volume_name,
                claim: orphan.claim.clone(),
                kind: orphan.kind.as_str().into(),
                phase: phase.into(),
                reason,
                failures,
                next_retry,
            }
        })
        .collect()
}

/// `(stuck, message)` of the `OrphansStuck` condition: the volumes that
/// cannot be drained without a human, or whose flush Jobs keep failing.
pub fn stuck(states: &[VolumeRecoveryStatus]) -> (bool, String) {
    let stuck: Vec<String> = states
        .iter()
        .filter(|s| s.phase == "Stuck" || s.failures >= STUCK_AFTER_FAILURES)
        .map(|s| format!("{}: {}", s.volume, s.reason))
        .collect();
    if stuck.is_empty() {
        (false, "no orphaned volume is stuck".into())
    } else {
        (true, stuck.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CLEAN_ANNOTATION, CLUSTER_LABEL, CLUSTER_UID_LABEL, NAMESPACE_LABEL};
    use crate::flush::{FAILED_AT_ANNOTATION, FAILURES_ANNOTATION};
    use serde_json::json;

    fn cluster() -> CaptureCluster {
        serde_json::from_value(json!({
            "apiVersion": "holdfast.dev/v1alpha1", "kind": "CaptureCluster",
            "metadata": {"name": "events", "namespace": "ns", "uid": "uid-now"},
            "spec": {"replicas": 0, "image": "i", "kafka": {"bootstrapServers": "k:9092"},
                "storage": {"size": "1Gi"}},
        }))
        .unwrap()
    }

    fn released(
        name: &str,
        labels: serde_json::Value,
        annotations: serde_json::Value,
    ) -> k8s_openapi::api::core::v1::PersistentVolume {
        let mut l = json!({CLUSTER_LABEL: "events", NAMESPACE_LABEL: "ns"});
        for (k, v) in labels.as_object().unwrap() {
            l[k] = v.clone();
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": l, "annotations": annotations},
            "spec": {"persistentVolumeReclaimPolicy": "Retain",
                "claimRef": {"namespace": "ns", "name": "old", "uid": "u"}},
            "status": {"phase": "Released"},
        }))
        .unwrap()
    }

    #[test]
    fn a_stuck_orphan_says_why_and_a_failing_one_when_it_retries() {
        let now = jiff::Timestamp::now();
        let inv = Inventory {
            clusters: vec![cluster()],
            volumes: vec![
                released(
                    "pv-old",
                    json!({CLUSTER_UID_LABEL: "uid-before"}),
                    json!({}),
                ),
                released(
                    "pv-failing",
                    json!({}),
                    json!({FAILURES_ANNOTATION: "3", FAILED_AT_ANNOTATION: now.to_string()}),
                ),
                released("pv-clean", json!({}), json!({CLEAN_ANNOTATION: "true"})),
            ],
            ..Default::default()
        };
        let states = volume_states(&inv, &inv.clusters[0], now);
        let names: Vec<_> = states.iter().map(|s| s.volume.as_str()).collect();
        assert_eq!(names, ["pv-failing", "pv-old"]);
        assert_eq!(states[0].phase, "Retrying");
        assert_eq!(states[0].failures, 3);
        assert!(states[0].next_retry.is_some());
        assert_eq!(states[1].phase, "Stuck");
        assert!(
            states[1].reason.contains("adoptPreviousVolumes"),
            "{}",
            states[1].reason
        );
        let (is_stuck, message) = stuck(&states);
        assert!(is_stuck);
        assert!(
            message.contains("pv-old") && message.contains("pv-failing"),
            "{message}"
        );
        assert!(!stuck(&states[..0]).0);
    }
}
