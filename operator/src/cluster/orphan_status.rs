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
use crate::runtime::nodes::LostPod;

/// `status.volumes` kind of a volume held by a pod on a lost node.
pub const KIND_NODE_LOST: &str = "pod-on-lost-node";

/// Flush Jobs failing this many times in a row make the volume count as stuck.
pub use crate::classify::STUCK_AFTER_FAILURES;

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

/// `states` with the volumes of `cluster`'s pods on lost nodes marked
/// `Stuck` (see [`crate::runtime::nodes`]): an entry already there (a
/// flush Job's claim) gets the reason, a volume not there yet (its claim
/// is still in use, so it is no orphan yet) is added. Only pods that block
/// recovery ([`LostPod::blocks_recovery`]) count. Pure.
pub fn with_lost_pods(
    mut states: Vec<VolumeRecoveryStatus>,
    inv: &Inventory,
    cluster: &CaptureCluster,
    lost: &[LostPod],
) -> Vec<VolumeRecoveryStatus> {
    let ns = cluster.namespace().unwrap_or_default();
    let name = cluster.name_any();
    for pod in lost
        .iter()
        .filter(|l| l.namespace == ns && l.cluster == name && l.blocks_recovery())
    {
        for claim in &pod.claims {
            let reason = pod.condition_text();
            if let Some(state) = states.iter_mut().find(|s| &s.claim == claim) {
                state.phase = "Stuck".into();
                state.reason = reason;
                continue;
            }
            let volume = inv
                .claims
                .iter()
                .find(|c| c.namespace().as_deref() == Some(ns.as_str()) && &c.name_any() == claim)
                .and_then(|c| c.spec.as_ref()?.volume_name.clone())
                .unwrap_or_else(|| format!("claim/{claim}"));
            states.push(VolumeRecoveryStatus {
                volume,
                claim: claim.clone(),
                kind: KIND_NODE_LOST.into(),
                phase: "Stuck".into(),
                reason,
                failures: 0,
                next_retry: None,
            });
        }
    }
    states.sort_by(|a, b| a.volume.cmp(&b.volume));
    states
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

    #[test]
    fn a_volume_held_by_a_pod_on_a_lost_node_is_stuck_and_says_how_to_unblock() {
        let claim: k8s_openapi::api::core::v1::PersistentVolumeClaim =
            serde_json::from_value(json!({
                "metadata": {"name": "buffer-events-1", "namespace": "ns"},
                "spec": {"volumeName": "pv-1"},
            }))
            .unwrap();
        let inv = Inventory {
            clusters: vec![cluster()],
            claims: vec![claim],
            ..Default::default()
        };
        let lost = |pod: &str, terminating: bool| LostPod {
            namespace: "ns".into(),
            cluster: "events".into(),
            pod: pod.into(),
            node: "node-1".into(),
            claims: vec![format!("buffer-{pod}")],
            terminating,
            flush: false,
            since: None,
            node_status: "Unknown".into(),
            out_of_service: false,
        };
        // A wanted pod that is only unreachable is the NodeLost condition's
        // business; a terminating one strands its volume.
        let states = with_lost_pods(
            Vec::new(),
            &inv,
            &inv.clusters[0],
            &[lost("events-1", true), lost("events-0", false)],
        );
        assert_eq!(states.len(), 1, "{states:?}");
        assert_eq!(states[0].volume, "pv-1");
        assert_eq!(states[0].kind, KIND_NODE_LOST);
        assert_eq!(states[0].phase, "Stuck");
        assert!(
            states[0]
                .reason
                .contains("node.kubernetes.io/out-of-service"),
            "{}",
            states[0].reason
        );
        let (is_stuck, message) = stuck(&states);
        assert!(is_stuck && message.contains("events-1"), "{message}");
    }
}
