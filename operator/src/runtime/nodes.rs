//! Pods of a cluster stranded on a lost node (its `Ready` condition
//! `False` or `Unknown`): the node's kubelet cannot confirm their end, so
//! they stay (`Terminating` once deleted) and keep their claims. That
//! blocks recovery of their volumes, correctly: a flush Job must never
//! mount a buffer a pod may still write to. Nothing drains such a volume
//! until a human confirms the node is gone, by tainting it
//! `node.kubernetes.io/out-of-service=nodeshutdown:NoExecute`; Kubernetes
//! then force-deletes its pods and detaches their volumes, and orphan
//! recovery proceeds on its own (the claim is no longer in use).
//!
//! This module finds such pods ([`lost_pods`], pure) and words what the
//! `NodeLost` condition, the `status.volumes` entries and the Warning Event
//! say ([`LostPod::condition_text`], [`LostPod::event_text`]).

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;

use crate::api::{CLUSTER_LABEL, COMPONENT_LABEL};
use crate::flush::FLUSH_COMPONENT;

/// Condition type on a CaptureCluster with pods on a lost node.
pub const CONDITION_NODE_LOST: &str = "NodeLost";
/// Event reason of the same.
pub const REASON_NODE_LOST: &str = "NodeLost";
/// The taint that tells Kubernetes a node is shut down for good.
pub const OUT_OF_SERVICE_TAINT: &str = "node.kubernetes.io/out-of-service";

/// A pod of a cluster on a node that is not `Ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostPod {
    /// Namespace of the pod.
    pub namespace: String,
    /// The CaptureCluster it belongs to.
    pub cluster: String,
    /// Pod name.
    pub pod: String,
    /// Its node.
    pub node: String,
    /// Claims it mounts (their volumes are blocked).
    pub claims: Vec<String>,
    /// Deleted, waiting for the kubelet that will not answer.
    pub terminating: bool,
    /// A flush Job's pod (its Job never finishes while the node is lost).
    pub flush: bool,
    /// Since when the node is lost: for `Unknown`, its `Ready` condition's
    /// last heartbeat (frozen by the node controller when the kubelet went
    /// silent); for `False` (a kubelet still reporting, so its heartbeat
    /// moves), the condition's transition.
    pub since: Option<jiff::Timestamp>,
    /// `Unknown` (heartbeats stopped) or `False`.
    pub node_status: String,
    /// The node already carries the out-of-service taint.
    pub out_of_service: bool,
}

/// `(status, since)` of a node's `Ready` condition when it is not `True`
/// (see [`LostPod::since`]).
pub fn not_ready(node: &Node) -> Option<(String, Option<jiff::Timestamp>)> {
    let ready = node
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?;
    (ready.status != "True").then(|| {
        (
            ready.status.clone(),
            ready
                .last_heartbeat_time
                .as_ref()
                .filter(|_| ready.status == "Unknown")
                .or(ready.last_transition_time.as_ref())
                .map(|t| t.0),
        )
    })
}

fn terminated(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The pods labelled [`CLUSTER_LABEL`] in `pods` whose node in `nodes` is
/// not `Ready`, sorted by namespace and name. A pod that finished
/// (`Succeeded`/`Failed`) holds nothing and is left out. Pure.
pub fn lost_pods(pods: &[Pod], nodes: &[Node]) -> Vec<LostPod> {
    let mut out: Vec<LostPod> = pods
        .iter()
        .filter(|p| !terminated(p))
        .filter_map(|pod| {
            let cluster = pod.labels().get(CLUSTER_LABEL)?.clone();
            let node_name = pod.spec.as_ref()?.node_name.clone()?;
            let node = nodes.iter().find(|n| n.name_any() == node_name)?;
            let (node_status, since) = not_ready(node)?;
            let out_of_service = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| t.iter().any(|t| t.key == OUT_OF_SERVICE_TAINT));
            let claims = pod
                .spec
                .iter()
                .flat_map(|s| s.volumes.iter().flatten())
                .filter_map(|v| v.persistent_volume_claim.as_ref())
                .map(|c| c.claim_name.clone())
                .collect();
            Some(LostPod {
                namespace: pod.namespace().unwrap_or_default(),
                cluster,
                pod: pod.name_any(),
                node: node_name,
                claims,
                terminating: pod.metadata.deletion_timestamp.is_some(),
                flush: pod.labels().get(COMPONENT_LABEL).map(String::as_str)
                    == Some(FLUSH_COMPONENT),
                since,
                node_status,
                out_of_service,
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
    out
}

impl LostPod {
    fn state(&self) -> &'static str {
        if self.terminating {
            "is stuck Terminating"
        } else {
            "cannot be reached (Kubernetes evicts it after its unreachable toleration, then it stays Terminating)"
        }
    }

    fn remedy(&self) -> String {
        if self.out_of_service {
            format!(
                "node {} carries the {OUT_OF_SERVICE_TAINT} taint: Kubernetes is force-deleting its pods, then orphan recovery drains the volume",
                self.node
            )
        } else {
            format!(
                "if the node is gone for good, taint it: kubectl taint nodes {} {OUT_OF_SERVICE_TAINT}=nodeshutdown:NoExecute (Kubernetes then force-deletes its pods and detaches their volumes, and orphan recovery drains them); if it comes back, nothing is needed",
                self.node
            )
        }
    }

    fn claims_text(&self) -> String {
        if self.claims.is_empty() {
            "no claim".into()
        } else {
            format!("claim {}", self.claims.join(", "))
        }
    }

    /// Whether its volumes cannot make progress until a human acts: the
    /// pod is going away (or is a flush pod, whose Job cannot finish), so
    /// no pod will drain them while the node stays lost.
    pub fn blocks_recovery(&self) -> bool {
        self.terminating || self.flush
    }

    /// Stable wording for the `NodeLost` condition and `status.volumes`
    /// (a timestamp, not an age, so status does not change every pass).
    pub fn condition_text(&self) -> String {
        let since = self
            .since
            .map_or_else(String::new, |t| format!(" since {t}"));
        format!(
            "pod {} ({}) on node {} (Ready={}{since}) {}: its buffer cannot be drained until the pod is gone; {}",
            self.pod,
            self.claims_text(),
            self.node,
            self.node_status,
            self.state(),
            self.remedy()
        )
    }

    /// The Warning Event's note: the same, with how long the node is lost.
    pub fn event_text(&self, now: jiff::Timestamp) -> String {
        let age = self.since.map_or_else(
            || "for an unknown time".to_string(),
            |t| {
                let secs = now.duration_since(t).as_secs().max(0);
                format!("for {secs}s")
            },
        );
        format!(
            "pod {} ({}) on node {}, not Ready ({}) {age}, {}: its buffer cannot be drained until the pod is gone; {}",
            self.pod,
            self.claims_text(),
            self.node,
            self.node_status,
            self.state(),
            self.remedy()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, ready: &str, taint: bool) -> Node {
        let taints = if taint {
            json!([{"key": OUT_OF_SERVICE_TAINT, "value": "nodeshutdown", "effect": "NoExecute"}])
        } else {
            json!([])
        };
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"taints": taints},
            "status": {"conditions": [{"type": "Ready", "status": ready,
                "lastHeartbeatTime": "2025-12-31T23:59:50Z",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
        }))
        .unwrap()
    }

    fn pod(name: &str, node: &str, deleted: bool, phase: &str) -> Pod {
        let mut meta = json!({"name": name, "namespace": "ns",
            "labels": {CLUSTER_LABEL: "events"}});
        if deleted {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:05Z");
        }
        serde_json::from_value(json!({
            "metadata": meta,
            "spec": {"nodeName": node, "containers": [],
                "volumes": [{"name": "buffer", "persistentVolumeClaim": {"claimName": format!("buffer-{name}")}}]},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn finds_pods_on_nodes_that_are_not_ready_and_says_how_to_unblock() {
        let nodes = [
            node("n1", "Unknown", false),
            node("n2", "True", false),
            node("n3", "False", true),
        ];
        let pods = [
            pod("events-1", "n1", true, "Running"),
            pod("events-0", "n2", false, "Running"),
            pod("events-2", "n3", false, "Running"),
            // Finished pods hold nothing; unknown nodes are not judged.
            pod("flush-x", "n1", false, "Succeeded"),
            pod("events-3", "gone", true, "Running"),
        ];
        let lost = lost_pods(&pods, &nodes);
        let names: Vec<_> = lost.iter().map(|l| l.pod.as_str()).collect();
        assert_eq!(names, ["events-1", "events-2"]);
        let stuck = &lost[0];
        assert!(stuck.terminating && !stuck.out_of_service);
        assert_eq!(stuck.claims, ["buffer-events-1"]);
        let text = stuck.condition_text();
        assert!(text.contains("pod events-1"), "{text}");
        assert!(text.contains("node n1"), "{text}");
        assert!(text.contains("stuck Terminating"), "{text}");
        assert!(
            text.contains(
                "kubectl taint nodes n1 node.kubernetes.io/out-of-service=nodeshutdown:NoExecute"
            ),
            "{text}"
        );
        let now: jiff::Timestamp = "2026-01-01T00:01:30Z".parse().unwrap();
        let event = stuck.event_text(now);
        // Lost since its last heartbeat (10 s before the node controller
        // noticed), not since the condition turned.
        assert!(event.contains("for 100s"), "{event}");
        assert!(event.contains("buffer-events-1"), "{event}");
        let tainted = lost[1].condition_text();
        assert!(tainted.contains("force-deleting"), "{tainted}");
        // A kubelet reporting NotReady keeps heartbeating: the transition
        // counts, so the text stays the same from pass to pass.
        assert!(tainted.contains("since 2026-01-01T00:00:00Z"), "{tainted}");
        assert!(!lost[1].terminating);
    }

    #[test]
    fn a_ready_node_strands_nothing() {
        assert!(not_ready(&node("n", "True", false)).is_none());
        assert_eq!(
            not_ready(&node("n", "Unknown", false)).map(|(s, _)| s),
            Some("Unknown".to_string())
        );
        assert!(lost_pods(&[pod("events-0", "n", true, "Running")], &[]).is_empty());
    }
}
