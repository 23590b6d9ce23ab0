//! Deletion: scale to zero so every pod drains, wait for the pods to go,
//! then hold the finalizer until every volume of the cluster is clean; the
//! `Draining` condition and a Warning Event say what it waits for.

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams, Patch};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::api::{
    CLEAN_ANNOTATION, CLUSTER_LABEL, CONDITION_DRAINING, CONDITION_READY, CaptureCluster,
    CaptureClusterStatus,
};
use crate::runtime::{Context, Result, api_err, key, update_params};

use super::build::Names;
use super::conditions::{self, Wanted};
use super::remove_finalizer;
use super::status::{patch_status, volume_report};

/// Deletion: scale to zero, wait for the pods to drain and go, then wait
/// until every volume is clean.
pub(super) async fn cleanup(cluster: &CaptureCluster, ns: &str, ctx: &Context) -> Result<Action> {
    let name = cluster.name_any();
    let names = Names::of(cluster);
    let statefulsets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    if let Some(sts) = statefulsets
        .get_opt(&names.statefulset)
        .await
        .map_err(api_err(format!(
            "get statefulset {ns}/{}",
            names.statefulset
        )))?
        && sts.spec.as_ref().and_then(|s| s.replicas) != Some(0)
    {
        ctx.may_write(|| format!("scale {ns}/{} to zero", names.statefulset))?;
        statefulsets
            .patch(
                &names.statefulset,
                &update_params(),
                &Patch::Merge(json!({"spec": {"replicas": 0}})),
            )
            .await
            .map_err(api_err(format!("scale {ns}/{} to zero", names.statefulset)))?;
        info!(cluster = %key(cluster), "deleting: scaled to zero so every pod drains");
        ctx.publish(
            cluster,
            EventType::Normal,
            "ScaledToZero",
            "Delete",
            "cluster is being deleted: scaled to zero so every pod drains its buffer".into(),
        )
        .await;
    }
    let selector = format!("{CLUSTER_LABEL}={name}");
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let running = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(api_err(format!("list pods of {}", key(cluster))))?;
    if !running.items.is_empty() {
        draining(
            cluster,
            ns,
            ctx,
            "WaitingForPods",
            format!(
                "{} capture pod(s) still draining: {}",
                running.items.len(),
                running
                    .items
                    .iter()
                    .map(|p| p.name_any())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(3)));
    }
    let report = volume_report(cluster, ns, ctx).await?;
    let dirty = report.dirty;
    if !dirty.is_empty() {
        let list = dirty.iter().cloned().collect::<Vec<_>>().join(", ");
        let terminating = namespace_terminating(ctx, ns).await;
        let (reason, message) =
            blocked_message(ns, &cluster.name_any(), &list, dirty.len(), terminating);
        let changed = !cluster.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == CONDITION_DRAINING && c.message == message)
        });
        if changed {
            warn!(cluster = %key(cluster), volumes = %list, reason, "deletion waits for volumes that may hold events");
            ctx.publish(
                cluster,
                EventType::Warning,
                reason,
                "Delete",
                message.clone(),
            )
            .await;
            if terminating {
                // New Events in a terminating namespace are refused: say it
                // on the volumes too (cluster-scoped: their Events live in
                // `default`).
                for volume in &dirty {
                    let reference = k8s_openapi::api::core::v1::ObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("PersistentVolume".into()),
                        name: Some(volume.clone()),
                        ..Default::default()
                    };
                    ctx.publish_on(
                        &reference,
                        EventType::Warning,
                        reason,
                        "Delete",
                        message.clone(),
                    )
                    .await;
                }
            }
        }
        draining(cluster, ns, ctx, reason, message).await?;
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    // The pods needed their PV access to mark their volumes; now nothing
    // of the cluster runs.
    super::capture_binding::unbind(ctx, cluster).await?;
    info!(cluster = %key(cluster), "every volume is clean: releasing the finalizer");
    ctx.publish(
        cluster,
        EventType::Normal,
        "Drained",
        "Delete",
        "no pod left and every volume is clean; removing the finalizer".into(),
    )
    .await;
    remove_finalizer(cluster, ns, ctx).await?;
    Ok(Action::await_change())
}

async fn draining(
    cluster: &CaptureCluster,
    ns: &str,
    ctx: &Context,
    reason: &str,
    message: String,
) -> Result<()> {
    let status = cluster.status.clone().unwrap_or_default();
    let generation = cluster.meta().generation;
    let now = jiff::Timestamp::now();
    let conds = conditions::set(
        &status.conditions,
        Wanted {
            type_: CONDITION_DRAINING,
            status: true,
            reason,
            message,
        },
        generation,
        now,
    );
    let conds = conditions::set(
        &conds,
        Wanted {
            type_: CONDITION_READY,
            status: false,
            reason: "Deleting",
            message: "the cluster is being deleted".into(),
        },
        generation,
        now,
    );
    patch_status(
        cluster,
        ns,
        ctx,
        CaptureClusterStatus {
            ready_replicas: 0,
            conditions: conds,
            ..status
        },
    )
    .await
}

/// Whether namespace `ns` is being deleted (`false` when it cannot be read).
async fn namespace_terminating(ctx: &Context, ns: &str) -> bool {
    Api::<Namespace>::all(ctx.client.clone())
        .get_opt(ns)
        .await
        .ok()
        .flatten()
        .is_some_and(|n| n.metadata.deletion_timestamp.is_some())
}

/// Why deletion waits, and how to unblock it: the `Draining` condition's
/// reason and message. Pure.
pub fn blocked_message(
    ns: &str,
    cluster: &str,
    volumes: &str,
    count: usize,
    namespace_terminating: bool,
) -> (&'static str, String) {
    if namespace_terminating {
        return (
            "NamespaceTerminating",
            format!(
                "{count} volume(s) may still hold events: {volumes}; namespace {ns} is being deleted, so Kubernetes refuses the flush Jobs and claims that would drain them here, and the Secrets they would use may be gone. The volumes stay Retain: no event is lost. To unblock: drain each volume with `holdfast-capture flush` (mount it in a pod of another namespace), or accept keeping the volumes undrained; then remove the finalizer: kubectl -n {ns} patch capturecluster {cluster} --type=json -p '[{{\"op\":\"remove\",\"path\":\"/metadata/finalizers\"}}]' (the volumes stay Retain and are reported as unrecoverable)"
            ),
        );
    }
    (
        "VolumesHoldEvents",
        format!(
            "{count} volume(s) may still hold events: {volumes}; deletion waits until flush Jobs (orphan recovery) have drained each and annotated it {CLEAN_ANNOTATION}=true (is Kafka reachable? see the FlushJobFailed events)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_deletion_says_why_and_how_to_unblock() {
        let (reason, message) = blocked_message("shop", "events", "pv1, pv2", 2, true);
        assert_eq!(reason, "NamespaceTerminating");
        assert!(message.contains("pv1, pv2"), "{message}");
        assert!(
            message.contains("namespace shop is being deleted"),
            "{message}"
        );
        assert!(
            message.contains("kubectl -n shop patch capturecluster events"),
            "{message}"
        );
        let (reason, message) = blocked_message("shop", "events", "pv1", 1, false);
        assert_eq!(reason, "VolumesHoldEvents");
        assert!(message.contains("flush Jobs"), "{message}");
    }
}
