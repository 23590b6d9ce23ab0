//! Volumes whose claim vanished before they were labelled (issue 11, item
//! 7): a PV is labelled when the volume controller sees its claim bound,
//! so a claim deleted in between leaves a `Released` PV that recovery,
//! which finds volumes by label, would never see. Such a PV is found
//! through its `spec.claimRef`: a claim `<template>-<cluster>-<ordinal>`
//! (the StatefulSet's volumeClaimTemplate name) in the namespace of an
//! existing CaptureCluster `<cluster>`. It is then labelled like any other
//! volume of that cluster (and kept `Retain` unless marked clean), so
//! recovery treats it as it treats a labelled one.
//!
//! Driven by every change of a PV without [`CLUSTER_LABEL`], and by every
//! new CaptureCluster (a cluster recreated after its volume was released).
//!
//! Which instance of the cluster wrote it is not recorded on such a volume.
//! A PV created no earlier than the cluster was provisioned for one of this
//! instance's claims: it gets the cluster's uid. An older one may hold
//! events of a previous instance of the same name (deleted and recreated):
//! it gets [`UNKNOWN_INSTANCE`], which recovery treats as another instance,
//! drained only on `spec.orphanRecovery.adoptPreviousVolumes`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::watcher::{self, watcher};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::api::{
    BUFFER_VOLUME, CLAIM_LABEL, CLEAN_ANNOTATION, CLUSTER_LABEL, CLUSTER_UID_LABEL, CaptureCluster,
    FIELD_MANAGER, NAMESPACE_LABEL, UNKNOWN_INSTANCE,
};
use crate::runtime::{Context, Error, Result, backoff, scoped};

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "volume-claimref";

/// Where an unlabelled PV's claim pointed: a StatefulSet claim of a
/// cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRef {
    /// Namespace of the claim (and of the cluster).
    pub namespace: String,
    /// The claim, `<template>-<cluster>-<ordinal>`.
    pub claim: String,
    /// The cluster its name derives from.
    pub cluster: String,
}

/// The cluster a StatefulSet claim name `buffer-<cluster>-<ordinal>` stands
/// for. Pure.
pub fn claim_cluster(claim: &str) -> Option<&str> {
    let rest = claim.strip_prefix(BUFFER_VOLUME)?.strip_prefix('-')?;
    let (cluster, ordinal) = rest.rsplit_once('-')?;
    let numeric = !ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit());
    (numeric && !cluster.is_empty()).then_some(cluster)
}

/// The claim a `Released` PV without [`CLUSTER_LABEL`] was bound to, when
/// it is a StatefulSet claim of some cluster. Pure.
pub fn released_claim_ref(pv: &PersistentVolume) -> Option<ClaimRef> {
    if pv.labels().contains_key(CLUSTER_LABEL)
        || pv.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Released")
    {
        return None;
    }
    let r = pv.spec.as_ref()?.claim_ref.as_ref()?;
    let claim = r.name.clone()?;
    let namespace = r.namespace.clone()?;
    let cluster = claim_cluster(&claim)?.to_string();
    Some(ClaimRef {
        namespace,
        claim,
        cluster,
    })
}

/// The instance of `cluster` that `pv` belongs to: the cluster's uid when
/// the PV is no older than the cluster, else [`UNKNOWN_INSTANCE`]. Pure.
pub fn instance_of(pv: &PersistentVolume, cluster: &CaptureCluster) -> String {
    let created = |t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| t.map(|t| t.0);
    match (
        created(pv.metadata.creation_timestamp.as_ref()),
        created(cluster.metadata.creation_timestamp.as_ref()),
        cluster.metadata.uid.as_ref(),
    ) {
        (Some(pv_at), Some(cluster_at), Some(uid)) if pv_at >= cluster_at => uid.clone(),
        _ => UNKNOWN_INSTANCE.to_string(),
    }
}

/// The server-side apply patch that labels a volume found through its
/// claimRef like any volume of `cluster` (and keeps it `Retain` unless it
/// is marked clean). Pure.
pub fn build_claim_ref_patch(
    pv: &PersistentVolume,
    found: &ClaimRef,
    cluster: &CaptureCluster,
) -> Value {
    let labels = BTreeMap::from([
        (CLUSTER_LABEL.to_string(), found.cluster.clone()),
        (CLAIM_LABEL.to_string(), found.claim.clone()),
        (NAMESPACE_LABEL.to_string(), found.namespace.clone()),
        (CLUSTER_UID_LABEL.to_string(), instance_of(pv, cluster)),
    ]);
    let mut patch = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv.name_any(), "labels": labels},
    });
    if pv.annotations().get(CLEAN_ANNOTATION).map(String::as_str) != Some("true") {
        patch["spec"] = json!({"persistentVolumeReclaimPolicy": "Retain"});
    }
    patch
}

/// Runs the claimRef finder over PVs without [`CLUSTER_LABEL`] until
/// `shutdown` resolves. `namespace` limits it to one namespace's claims.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let unlabelled = watcher::Config::default().labels(&format!("!{CLUSTER_LABEL}"));
    // A cluster created after its volume was released (recreated under
    // the same name) finds it too: every new cluster looks again.
    let mut seen = std::collections::HashSet::new();
    let new_clusters = watcher(
        scoped::<CaptureCluster>(&ctx.client, namespace.as_deref()),
        watcher::Config::default(),
    )
    .touched_objects()
    .filter_map(move |c| {
        let new = c
            .ok()
            .and_then(|c| c.uid())
            .is_some_and(|uid| seen.insert(uid));
        std::future::ready(new.then_some(()))
    });
    let namespace = Arc::new(namespace);
    Controller::new(pvs, unlabelled)
        .reconcile_all_on(new_clusters)
        .graceful_shutdown_on(shutdown)
        .run(
            move |pv, ctx| reconcile(pv, ctx, namespace.clone()),
            error_policy,
            ctx,
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                debug!(error = %e, "claimRef volume finder");
            }
        })
        .await;
}

async fn reconcile(
    pv: Arc<PersistentVolume>,
    ctx: Arc<Context>,
    namespace: Arc<Option<String>>,
) -> Result<Action> {
    let Some(found) = released_claim_ref(&pv) else {
        return Ok(Action::await_change());
    };
    if namespace.as_deref().is_some_and(|ns| ns != found.namespace) {
        return Ok(Action::await_change());
    }
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let ns = &found.namespace;
    let Some(cluster) = Api::<CaptureCluster>::namespaced(ctx.client.clone(), ns)
        .get_opt(&found.cluster)
        .await
        .map_err(|source| Error::Api {
            what: format!("get capturecluster {ns}/{}", found.cluster),
            source,
        })?
    else {
        // Not a Holdfast volume, or its cluster is gone: nothing knows
        // where its events go. Found again if a cluster of that name comes.
        return Ok(Action::await_change());
    };
    let volume = pv.name_any();
    let patch = build_claim_ref_patch(&pv, &found, &cluster);
    ctx.may_write(|| format!("label volume {volume} found through its claimRef"))?;
    Api::<PersistentVolume>::all(ctx.client.clone())
        .patch(
            &volume,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::Api {
            what: format!("label volume {volume}"),
            source,
        })?;
    let instance = patch["metadata"]["labels"][CLUSTER_UID_LABEL]
        .as_str()
        .unwrap_or_default()
        .to_string();
    info!(pv = %volume, claim = %format!("{ns}/{}", found.claim), instance = %instance, "unlabelled volume found through its claimRef, labelled");
    ctx.publish(
        &cluster,
        EventType::Normal,
        "VolumeFoundByClaimRef",
        "LabelVolume",
        format!(
            "volume {volume} of deleted claim {} was never labelled; found through its claimRef and labelled (instance {instance})",
            found.claim
        ),
    )
    .await;
    Ok(Action::await_change())
}

fn error_policy(pv: Arc<PersistentVolume>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(CONTROLLER, error.reason());
    let key = format!("claimref:{}", pv.name_any());
    let delay = backoff(ctx.failed(&key));
    warn!(pv = %pv.name_any(), reason = error.reason(), error = %error, retry_in_secs = delay.as_secs(), "claimRef volume finder failed");
    Action::requeue(delay.min(Duration::from_secs(60)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    pub(crate) fn released(claim: &str, created: &str) -> PersistentVolume {
        serde_json::from_value(json!({
            "metadata": {"name": "pvc-1", "creationTimestamp": created},
            "spec": {"persistentVolumeReclaimPolicy": "Retain",
                "claimRef": {"namespace": "ns", "name": claim, "uid": "gone"}},
            "status": {"phase": "Released"},
        }))
        .unwrap()
    }

    fn cluster(created: &str) -> CaptureCluster {
        let mut c: CaptureCluster = serde_json::from_value(json!({
            "apiVersion": "holdfast.dev/v1alpha1",
            "kind": "CaptureCluster",
            "metadata": {"name": "events", "namespace": "ns", "uid": "uid-now"},
            "spec": {"image": "i", "kafka": {"bootstrapServers": "k:1"}, "storage": {"size": "1Gi"}},
        }))
        .unwrap();
        c.metadata.creation_timestamp = Some(Time(created.parse().unwrap()));
        c
    }

    #[test]
    fn reads_the_cluster_of_a_statefulset_claim_name() {
        assert_eq!(claim_cluster("buffer-events-0"), Some("events"));
        assert_eq!(claim_cluster("buffer-my-events-12"), Some("my-events"));
        assert_eq!(claim_cluster("buffer-events"), None);
        assert_eq!(claim_cluster("buffer-events-x"), None);
        assert_eq!(claim_cluster("data-events-0"), None);
        assert_eq!(claim_cluster("buffer--0"), None);
    }

    #[test]
    fn only_an_unlabelled_released_volume_of_a_statefulset_claim_is_found() {
        let pv = released("buffer-events-1", "2026-01-01T00:00:10Z");
        assert_eq!(
            released_claim_ref(&pv),
            Some(ClaimRef {
                namespace: "ns".into(),
                claim: "buffer-events-1".into(),
                cluster: "events".into(),
            })
        );
        let mut bound = pv.clone();
        bound.status.as_mut().unwrap().phase = Some("Bound".into());
        assert_eq!(released_claim_ref(&bound), None);
        let mut labelled = pv.clone();
        labelled.metadata.labels = Some([(CLUSTER_LABEL.to_string(), "events".into())].into());
        assert_eq!(released_claim_ref(&labelled), None);
        assert_eq!(
            released_claim_ref(&released("postgres-data-0", "2026-01-01T00:00:10Z")),
            None
        );
    }

    #[test]
    fn a_volume_older_than_the_cluster_belongs_to_an_unknown_instance() {
        let c = cluster("2026-01-01T00:00:05Z");
        let newer = released("buffer-events-0", "2026-01-01T00:00:05Z");
        assert_eq!(instance_of(&newer, &c), "uid-now");
        let older = released("buffer-events-0", "2026-01-01T00:00:04Z");
        assert_eq!(instance_of(&older, &c), UNKNOWN_INSTANCE);
        let found = released_claim_ref(&older).unwrap();
        let patch = build_claim_ref_patch(&older, &found, &c);
        let labels = &patch["metadata"]["labels"];
        assert_eq!(labels[CLUSTER_LABEL], "events");
        assert_eq!(labels[CLAIM_LABEL], "buffer-events-0");
        assert_eq!(labels[NAMESPACE_LABEL], "ns");
        assert_eq!(labels[CLUSTER_UID_LABEL], UNKNOWN_INSTANCE);
        assert_eq!(patch["spec"]["persistentVolumeReclaimPolicy"], "Retain");
        // Marked clean: labels only (its pod may have set Delete).
        let mut clean = older;
        clean.metadata.annotations = Some([(CLEAN_ANNOTATION.to_string(), "true".into())].into());
        assert!(
            build_claim_ref_patch(&clean, &found, &c)
                .get("spec")
                .is_none()
        );
    }
}
