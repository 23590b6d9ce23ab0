//! What the cluster controller reports: the status patch (server-side
//! apply on the status subresource), the volumes that may hold events, and
//! the flush Jobs running for the cluster.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::api::{
    CLAIM_LABEL, CLEAN_ANNOTATION, CLUSTER_LABEL, COMPONENT_LABEL, CaptureCluster,
    CaptureClusterStatus, FIELD_MANAGER, NAMESPACE_LABEL,
};
use crate::flush::{FLUSH_COMPONENT, JobState, job_state};
use crate::runtime::nodes::{self, LostPod};
use crate::runtime::{Context, Result, api_err, cluster_inventory, key};
use tracing::warn;

pub(super) async fn patch_status(
    cluster: &CaptureCluster,
    ns: &str,
    ctx: &Context,
    status: CaptureClusterStatus,
) -> Result<()> {
    if cluster.status.as_ref() == Some(&status) {
        return Ok(());
    }
    ctx.may_write(|| format!("status of {}", key(cluster)))?;
    let api: Api<CaptureCluster> = Api::namespaced(ctx.client.clone(), ns);
    let patch = json!({
        "apiVersion": "holdfast.dev/v1alpha1",
        "kind": "CaptureCluster",
        "status": status,
    });
    api.patch_status(
        &cluster.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(api_err(format!("status of {}", key(cluster))))?;
    Ok(())
}

/// A PV of the cluster that may still hold events.
pub(super) fn holds_events(pv: &PersistentVolume) -> bool {
    pv.annotations().get(CLEAN_ANNOTATION).map(String::as_str) != Some("true")
}

/// Flush Jobs of cluster `name` in `ns` that are still running (the
/// CaptureCluster's `status.activeFlushJobs`).
pub async fn count_active_flush_jobs(client: &Client, ns: &str, name: &str) -> Result<i32> {
    let jobs = Api::<Job>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!(
            "{COMPONENT_LABEL}={FLUSH_COMPONENT},{CLUSTER_LABEL}={name}"
        )))
        .await
        .map_err(api_err(format!("list flush jobs of {ns}/{name}")))?;
    let active = jobs
        .items
        .iter()
        .filter(|j| job_state(j) == JobState::Active)
        .count();
    Ok(i32::try_from(active).unwrap_or(i32::MAX))
}

/// Where a cluster's volumes stand.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VolumeReport {
    /// PVs of the cluster not marked clean (may hold events).
    pub dirty: BTreeSet<String>,
}

/// The cluster's orphans that may hold events, by the one definition
/// recovery uses ([`crate::classify::find`]): a claim whose ordinal is
/// still wanted (rolling update, restart) is never one. Volumes held by a
/// pod stranded on a lost node are added as `Stuck`
/// ([`super::orphan_status::with_lost_pods`]); the stranded pods are
/// returned for the `NodeLost` condition and Event.
pub(super) async fn orphans_of(
    ctx: &Context,
    cluster: &CaptureCluster,
) -> Result<(Vec<crate::api::VolumeRecoveryStatus>, Vec<LostPod>)> {
    let ns = cluster.namespace().unwrap_or_default();
    let inv = cluster_inventory(&ctx.client, &ns, &cluster.name_any()).await?;
    let lost = lost_pods_of(ctx, cluster, &inv.pods).await;
    let states = super::orphan_status::volume_states(&inv, cluster, jiff::Timestamp::now());
    let states = super::orphan_status::with_lost_pods(states, &inv, cluster, &lost);
    Ok((states, lost))
}

/// The cluster's pods on nodes that are not `Ready`. Only the nodes of
/// pods that are not ready or are terminating are read (the node
/// controller marks the pods of a lost node not ready), so a healthy
/// cluster costs no request. A node that cannot be read is skipped (and
/// logged): this is reporting, never a reason to fail a reconciliation.
async fn lost_pods_of(ctx: &Context, cluster: &CaptureCluster, pods: &[Pod]) -> Vec<LostPod> {
    let name = cluster.name_any();
    let ours: Vec<Pod> = pods
        .iter()
        .filter(|p| p.labels().get(CLUSTER_LABEL) == Some(&name))
        .cloned()
        .collect();
    let suspects: BTreeSet<String> = ours
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some() || !pod_ready(p))
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    if suspects.is_empty() {
        return Vec::new();
    }
    let api: Api<Node> = Api::all(ctx.client.clone());
    let mut nodes = Vec::new();
    for node in suspects {
        match api.get_opt(&node).await {
            Ok(Some(n)) => nodes.push(n),
            Ok(None) => {}
            Err(e) => {
                warn!(node = %node, error = %e, "cannot read node; pods on lost nodes are not reported");
            }
        }
    }
    nodes::lost_pods(&ours, &nodes)
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The volumes of a cluster that may hold events, from its claims, the PVs
/// bound to them (by name) and the PVs labelled for it. Pure.
pub fn classify_volumes(
    claims: &[PersistentVolumeClaim],
    bound: &BTreeMap<String, PersistentVolume>,
    labelled: &[PersistentVolume],
) -> VolumeReport {
    let mut report = VolumeReport::default();
    let mut seen = BTreeSet::new();
    for claim in claims {
        let Some(volume) = claim.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
            continue;
        };
        seen.insert(volume.clone());
        let Some(pv) = bound.get(&volume) else {
            continue;
        };
        if !holds_events(pv) {
            continue;
        }
        report.dirty.insert(volume);
    }
    for pv in labelled {
        let volume = pv.name_any();
        if !seen.contains(&volume) && pv.labels().contains_key(CLAIM_LABEL) && holds_events(pv) {
            report.dirty.insert(volume);
        }
    }
    report
}

/// Lists what [`classify_volumes`] needs and classifies.
pub(super) async fn volume_report(
    cluster: &CaptureCluster,
    ns: &str,
    ctx: &Context,
) -> Result<VolumeReport> {
    let name = cluster.name_any();
    let selector = format!("{CLUSTER_LABEL}={name}");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let claims = claims
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(api_err(format!("list claims of {}", key(cluster))))?
        .items;
    let mut bound = BTreeMap::new();
    for volume in claims
        .iter()
        .filter_map(|c| c.spec.as_ref().and_then(|s| s.volume_name.clone()))
    {
        if let Some(pv) = pvs
            .get_opt(&volume)
            .await
            .map_err(api_err(format!("get volume {volume}")))?
        {
            bound.insert(volume, pv);
        }
    }
    let labelled = pvs
        .list(
            &ListParams::default()
                .labels(&format!("{CLUSTER_LABEL}={name},{NAMESPACE_LABEL}={ns}")),
        )
        .await
        .map_err(api_err(format!("list volumes of {}", key(cluster))))?
        .items;
    Ok(classify_volumes(&claims, &bound, &labelled))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(name: &str, volume: Option<&str>) -> PersistentVolumeClaim {
        let mut c = PersistentVolumeClaim::default();
        c.metadata.name = Some(name.into());
        c.spec = Some(k8s_openapi::api::core::v1::PersistentVolumeClaimSpec {
            volume_name: volume.map(String::from),
            ..Default::default()
        });
        c
    }

    fn pv(name: &str, clean: bool, claim: Option<&str>) -> PersistentVolume {
        let mut pv = PersistentVolume::default();
        pv.metadata.name = Some(name.into());
        if clean {
            pv.metadata.annotations =
                Some([(CLEAN_ANNOTATION.to_string(), "true".to_string())].into());
        }
        if let Some(claim) = claim {
            pv.metadata.labels = Some([(CLAIM_LABEL.to_string(), claim.to_string())].into());
        }
        pv
    }

    #[test]
    fn every_volume_not_marked_clean_may_hold_events() {
        let claims = [
            claim("buffer-events-0", Some("pv0")),
            claim("buffer-events-1", Some("pv1")),
            claim("buffer-events-2", Some("pv2")),
            claim("buffer-events-3", None),
        ];
        let bound = [
            ("pv0".to_string(), pv("pv0", false, None)),
            ("pv1".to_string(), pv("pv1", false, None)),
            ("pv2".to_string(), pv("pv2", true, None)),
        ]
        .into();
        // pv9's claim is gone (Released); pv8 is clean.
        let labelled = [
            pv("pv9", false, Some("buffer-events-9")),
            pv("pv8", true, Some("buffer-events-8")),
            pv("pv0", false, Some("buffer-events-0")),
        ];
        let report = classify_volumes(&claims, &bound, &labelled);
        let names = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>();
        assert_eq!(names(&report.dirty), ["pv0", "pv1", "pv9"]);
    }

    #[test]
    fn a_volume_is_clean_only_when_annotated() {
        let mut pv = PersistentVolume::default();
        assert!(holds_events(&pv));
        pv.metadata.annotations =
            Some([(CLEAN_ANNOTATION.to_string(), "false".to_string())].into());
        assert!(holds_events(&pv));
        pv.metadata.annotations = Some([(CLEAN_ANNOTATION.to_string(), "true".to_string())].into());
        assert!(!holds_events(&pv));
    }
}
