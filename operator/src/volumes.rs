//! Keeps every PV bound to a Holdfast claim at reclaim policy `Retain` and
//! labelled with its cluster, claim and namespace (PVs do not inherit claim
//! labels, and orphan recovery finds volumes by these labels after their
//! claim is gone).
//!
//! Driven by the claims labelled [`CLUSTER_LABEL`], and by every PV change
//! mapped to its claim, so a volume is corrected as soon as it is bound and
//! whenever someone flips it back. Invariant 4 of the design: a volume is
//! left alone once it carries [`CLEAN_ANNOTATION`]` = "true"` (its pod saw
//! the buffer empty and may have flipped it to `Delete`); only its labels
//! are kept.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::api::{
    CLAIM_LABEL, CLEAN_ANNOTATION, CLUSTER_LABEL, CaptureCluster, FIELD_MANAGER, NAMESPACE_LABEL,
};
use crate::runtime::{Context, Error, Result, backoff};

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "volume";

/// What a PV bound to `claim` must look like, as a server-side apply patch,
/// or `None` when it already does. Pure.
pub fn build_volume_patch(claim: &PersistentVolumeClaim, pv: &PersistentVolume) -> Option<Value> {
    let cluster = claim.labels().get(CLUSTER_LABEL)?;
    let wanted_labels = BTreeMap::from([
        (CLUSTER_LABEL.to_string(), cluster.clone()),
        (CLAIM_LABEL.to_string(), claim.name_any()),
        (
            NAMESPACE_LABEL.to_string(),
            claim.namespace().unwrap_or_default(),
        ),
    ]);
    let labels_ok = wanted_labels
        .iter()
        .all(|(k, v)| pv.labels().get(k) == Some(v));
    let clean = pv.annotations().get(CLEAN_ANNOTATION).map(String::as_str) == Some("true");
    let policy = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref());
    let retain_ok = clean || policy == Some("Retain");
    if labels_ok && retain_ok {
        return None;
    }
    let mut patch = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv.name_any(), "labels": wanted_labels},
    });
    if !clean {
        patch["spec"] = json!({"persistentVolumeReclaimPolicy": "Retain"});
    }
    Some(patch)
}

/// Whether `pv` is bound (by its `claimRef`) to `claim`.
fn bound_to(pv: &PersistentVolume, claim: &PersistentVolumeClaim) -> bool {
    let Some(r) = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) else {
        return false;
    };
    r.name.as_deref() == Some(claim.name_any().as_str())
        && r.namespace == claim.namespace()
        && (r.uid.is_none() || r.uid == claim.uid())
}

/// Runs the volume controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let claims: Api<PersistentVolumeClaim> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    Controller::new(claims, watcher::Config::default().labels(CLUSTER_LABEL))
        .watches(pvs, watcher::Config::default(), |pv: PersistentVolume| {
            let r = pv.spec.as_ref()?.claim_ref.as_ref()?;
            Some(ObjectRef::new(r.name.as_deref()?).within(r.namespace.as_deref()?))
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                debug!(error = %e, "volume controller");
            }
        })
        .await;
}

fn cluster_ref(claim: &PersistentVolumeClaim) -> Option<ObjectReference> {
    let name = claim.labels().get(CLUSTER_LABEL)?.clone();
    Some(ObjectReference {
        api_version: Some(CaptureCluster::api_version(&()).to_string()),
        kind: Some(CaptureCluster::kind(&()).to_string()),
        name: Some(name),
        namespace: claim.namespace(),
        ..Default::default()
    })
}

/// Corrects the PV bound to one claim.
pub async fn reconcile(claim: Arc<PersistentVolumeClaim>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let Some(volume) = claim.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
        return Ok(Action::await_change());
    };
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let Some(pv) = pvs.get_opt(&volume).await.map_err(|source| Error::Api {
        what: format!("get volume {volume}"),
        source,
    })?
    else {
        return Ok(Action::await_change());
    };
    if !bound_to(&pv, &claim) {
        return Ok(Action::await_change());
    }
    let Some(patch) = build_volume_patch(&claim, &pv) else {
        return Ok(Action::await_change());
    };
    let before = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.clone())
        .unwrap_or_default();
    pvs.patch(
        &volume,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::Api {
        what: format!("retain volume {volume}"),
        source,
    })?;
    let claim_name = format!(
        "{}/{}",
        claim.namespace().unwrap_or_default(),
        claim.name_any()
    );
    if patch.get("spec").is_some() && before != "Retain" {
        ctx.metrics.volumes_retained.inc();
        info!(pv = %volume, claim = %claim_name, was = %before, "volume set to Retain");
        if let Some(reference) = cluster_ref(&claim) {
            let event = Event {
                type_: EventType::Normal,
                reason: "VolumeRetained".into(),
                note: Some(format!(
                    "volume {volume} of claim {} set to Retain (was {before}) and labelled",
                    claim.name_any()
                )),
                action: "RetainVolume".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &reference).await {
                warn!(pv = %volume, error = %e, "cannot post event");
            }
        }
    } else {
        info!(pv = %volume, claim = %claim_name, "volume labelled");
    }
    Ok(Action::await_change())
}

fn error_policy(claim: Arc<PersistentVolumeClaim>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(CONTROLLER, error.reason());
    let key = format!(
        "claim:{}/{}",
        claim.namespace().unwrap_or_default(),
        claim.name_any()
    );
    let delay = backoff(ctx.failed(&key));
    warn!(claim = %key, reason = error.reason(), error = %error, retry_in_secs = delay.as_secs(), "volume reconcile failed");
    Action::requeue(delay.min(Duration::from_secs(60)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PersistentVolumeSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn claim() -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("buffer-events-0".into()),
                namespace: Some("ns".into()),
                uid: Some("u1".into()),
                labels: Some([(CLUSTER_LABEL.to_string(), "events".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn pv(policy: &str) -> PersistentVolume {
        PersistentVolume {
            metadata: ObjectMeta {
                name: Some("pvc-u1".into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeSpec {
                persistent_volume_reclaim_policy: Some(policy.into()),
                claim_ref: Some(ObjectReference {
                    name: Some("buffer-events-0".into()),
                    namespace: Some("ns".into()),
                    uid: Some("u1".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_deleting_volume_is_set_to_retain_and_labelled() {
        let patch = build_volume_patch(&claim(), &pv("Delete")).unwrap();
        assert_eq!(patch["spec"]["persistentVolumeReclaimPolicy"], "Retain");
        assert_eq!(patch["metadata"]["labels"][CLUSTER_LABEL], "events");
        assert_eq!(patch["metadata"]["labels"][CLAIM_LABEL], "buffer-events-0");
        assert_eq!(patch["metadata"]["labels"][NAMESPACE_LABEL], "ns");
        assert_eq!(patch["metadata"]["name"], "pvc-u1");
        assert!(bound_to(&pv("Delete"), &claim()));
    }

    #[test]
    fn a_retained_labelled_volume_needs_nothing() {
        let mut v = pv("Retain");
        let labels = build_volume_patch(&claim(), &v).unwrap()["metadata"]["labels"].clone();
        v.metadata.labels = serde_json::from_value(labels).unwrap();
        assert_eq!(build_volume_patch(&claim(), &v), None);
    }

    #[test]
    fn a_clean_volume_keeps_its_policy_and_only_gets_labels() {
        let mut v = pv("Delete");
        v.metadata.annotations = Some([(CLEAN_ANNOTATION.to_string(), "true".to_string())].into());
        let patch = build_volume_patch(&claim(), &v).unwrap();
        assert!(patch.get("spec").is_none());
        assert_eq!(patch["metadata"]["labels"][CLUSTER_LABEL], "events");
    }

    #[test]
    fn a_claim_without_the_cluster_label_is_not_ours() {
        let mut c = claim();
        c.metadata.labels = None;
        assert_eq!(build_volume_patch(&c, &pv("Delete")), None);
    }

    #[test]
    fn a_volume_bound_to_an_older_claim_of_the_same_name_is_not_touched() {
        let mut v = pv("Delete");
        v.spec.as_mut().unwrap().claim_ref.as_mut().unwrap().uid = Some("old".into());
        assert!(!bound_to(&v, &claim()));
    }
}
