//! Keeps every PV bound to a Holdfast claim at reclaim policy `Retain` and
//! labelled with its cluster, claim and namespace (PVs do not inherit claim
//! labels, and orphan recovery finds volumes by these labels after their
//! claim is gone).
//!
//! Driven by the claims labelled [`CLUSTER_LABEL`], by every PV change
//! mapped to its claim, and by every capture pod mapped to the claims it
//! mounts, so a volume is corrected as soon as it is bound, whenever someone
//! flips it back, and whenever a pod starts on it.
//!
//! A PV whose claim was deleted before it was labelled is found through its
//! `claimRef` instead ([`claim_ref`]).
//!
//! Invariant 4 of the design, from both sides:
//! - a volume no live pod uses is left alone once it carries
//!   [`CLEAN_ANNOTATION`]` = "true"` (its pod saw the buffer empty and may
//!   have flipped it to `Delete`); only its labels are kept;
//! - a volume whose claim a running or starting capture pod mounts is
//!   forced back to `Retain` and `clean=false` whatever its mark (the pod
//!   may write events to it: a mark left by an earlier clean drain is stale,
//!   e.g. when the pod's own `Retain` patch failed), with a Warning Event
//!   `VolumeRetainForced`. A pod being deleted is not "live": it drains and
//!   may mark its volume clean on the way out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::api::{
    BUFFER_VOLUME, CLAIM_LABEL, CLEAN_ANNOTATION, CLUSTER_LABEL, CLUSTER_UID_LABEL,
    COMPONENT_LABEL, CaptureCluster, FIELD_MANAGER, NAMESPACE_LABEL,
};
use crate::runtime::{Context, Error, Result, backoff, patch_params};

pub mod claim_ref;

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "volume";

/// What a PV bound to `claim` must look like, as a server-side apply patch,
/// or `None` when it already does. Pure.
pub fn build_volume_patch(
    claim: &PersistentVolumeClaim,
    pv: &PersistentVolume,
    cluster_uid: Option<&str>,
) -> Option<Value> {
    let cluster = claim.labels().get(CLUSTER_LABEL)?;
    let mut wanted_labels = BTreeMap::from([
        (CLUSTER_LABEL.to_string(), cluster.clone()),
        (CLAIM_LABEL.to_string(), claim.name_any()),
        (
            NAMESPACE_LABEL.to_string(),
            claim.namespace().unwrap_or_default(),
        ),
    ]);
    // The instance that first bound the volume, kept for good (also in every
    // later apply, or server-side apply would drop it).
    if let Some(uid) = pv
        .labels()
        .get(CLUSTER_UID_LABEL)
        .map(String::as_str)
        .or(cluster_uid)
    {
        wanted_labels.insert(CLUSTER_UID_LABEL.to_string(), uid.to_string());
    }
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

/// Whether `pod` is a capture pod that runs or is starting (not finished,
/// not being deleted) and mounts claim `claim`: it may write to the volume.
pub fn writes_to(pod: &Pod, claim: &str) -> bool {
    let capture = pod.labels().get(COMPONENT_LABEL).map(String::as_str) == Some("capture");
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    capture
        && !finished
        && pod.metadata.deletion_timestamp.is_none()
        && claims_of(pod).any(|c| c == claim)
}

/// The claims a pod mounts.
fn claims_of(pod: &Pod) -> impl Iterator<Item = &str> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.as_str())
}

/// The merge patch that makes the volume of a claim a live pod writes to
/// `Retain` and `clean=false` when it carries a (stale) clean mark, or
/// `None` when it does not (it holds events and is kept `Retain` anyway). Guarded by the
/// PV's resourceVersion. Pure.
pub fn build_force_retain_patch(pv: &PersistentVolume) -> Option<Value> {
    let clean = pv.annotations().get(CLEAN_ANNOTATION).map(String::as_str);
    // Only a stale clean mark is dangerous: a volume without it is set to
    // Retain by the ordinary path ([`build_volume_patch`]).
    if clean != Some("true") {
        return None;
    }
    Some(json!({
        "metadata": {
            "resourceVersion": pv.resource_version(),
            "annotations": {CLEAN_ANNOTATION: "false"},
        },
        "spec": {"persistentVolumeReclaimPolicy": "Retain"},
    }))
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

/// Runs the volume controller, and the finder of volumes whose claim
/// vanished before they were labelled ([`claim_ref`]), until `shutdown`
/// resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    use futures::FutureExt;
    let shutdown = shutdown.shared();
    futures::join!(
        claim_ref::run(ctx.clone(), namespace.clone(), shutdown.clone()),
        run_claims(ctx, namespace, shutdown),
    );
}

/// The volume controller proper: claims, their PVs and their pods.
async fn run_claims(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let claims: Api<PersistentVolumeClaim> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let pods: Api<Pod> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    Controller::new(claims, watcher::Config::default().labels(CLUSTER_LABEL))
        .watches(pvs, watcher::Config::default(), |pv: PersistentVolume| {
            let r = pv.spec.as_ref()?.claim_ref.as_ref()?;
            Some(ObjectRef::new(r.name.as_deref()?).within(r.namespace.as_deref()?))
        })
        // A pod starting on a claim: its volume must be Retain, whatever its mark.
        .watches(
            pods,
            watcher::Config::default().labels(&format!("{COMPONENT_LABEL}=capture")),
            |pod: Pod| {
                let ns = pod.namespace().unwrap_or_default();
                claims_of(&pod)
                    .map(|c| ObjectRef::new(c).within(&ns))
                    .collect::<Vec<_>>()
            },
        )
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
    if claim.labels().contains_key(CLUSTER_LABEL)
        && let Some(pod) = live_writer(&ctx, &claim).await?
        && let Some(patch) = build_force_retain_patch(&pv)
    {
        return force_retain(&ctx, &claim, &pv, &pod, &patch).await;
    }
    let uid = cluster_uid(&ctx, &claim).await?;
    let Some(patch) = build_volume_patch(&claim, &pv, uid.as_deref()) else {
        return Ok(Action::await_change());
    };
    let before = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.clone())
        .unwrap_or_default();
    ctx.may_write(|| format!("retain volume {volume}"))?;
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
            ctx.publish_on(
                &reference,
                EventType::Normal,
                "VolumeRetained",
                "RetainVolume",
                format!(
                    "volume {volume} of claim {} set to Retain (was {before}) and labelled",
                    claim.name_any()
                ),
            )
            .await;
        }
    } else {
        info!(pv = %volume, claim = %claim_name, "volume labelled");
    }
    Ok(Action::await_change())
}

/// The uid of the CaptureCluster that `claim` belongs to, if it exists.
async fn cluster_uid(ctx: &Context, claim: &PersistentVolumeClaim) -> Result<Option<String>> {
    let (Some(name), Some(ns)) = (claim.labels().get(CLUSTER_LABEL), claim.namespace()) else {
        return Ok(None);
    };
    let cluster = Api::<CaptureCluster>::namespaced(ctx.client.clone(), &ns)
        .get_opt(name)
        .await
        .map_err(|source| Error::Api {
            what: format!("get capturecluster {ns}/{name}"),
            source,
        })?;
    Ok(cluster.and_then(|c| c.uid()))
}

/// The live capture pod that mounts `claim` (a StatefulSet claim is
/// `buffer-<pod>`), if any.
async fn live_writer(ctx: &Context, claim: &PersistentVolumeClaim) -> Result<Option<Pod>> {
    let Some(pod_name) = claim
        .name_any()
        .strip_prefix(&format!("{BUFFER_VOLUME}-"))
        .map(str::to_string)
    else {
        return Ok(None);
    };
    let ns = claim.namespace().unwrap_or_default();
    let pod = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&pod_name)
        .await
        .map_err(|source| Error::Api {
            what: format!("get pod {ns}/{pod_name}"),
            source,
        })?;
    Ok(pod.filter(|p| writes_to(p, &claim.name_any())))
}

/// Forces the volume of a claim a live pod writes to back to `Retain` and
/// `clean=false`, with a Warning Event saying what it was.
async fn force_retain(
    ctx: &Context,
    claim: &PersistentVolumeClaim,
    pv: &PersistentVolume,
    pod: &Pod,
    patch: &Value,
) -> Result<Action> {
    let volume = pv.name_any();
    ctx.may_write(|| format!("force volume {volume} to Retain"))?;
    let was_policy = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.clone())
        .unwrap_or_default();
    let was_clean = pv
        .annotations()
        .get(CLEAN_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    Api::<PersistentVolume>::all(ctx.client.clone())
        .patch(&volume, &patch_params(FIELD_MANAGER), &Patch::Merge(patch))
        .await
        .map_err(|source| Error::Api {
            what: format!("force volume {volume} to Retain"),
            source,
        })?;
    ctx.metrics.volumes_retained.inc();
    let note = format!(
        "volume {volume} of claim {} is used by pod {}, which may write events to it, but was {was_policy} with {CLEAN_ANNOTATION}={was_clean:?}: set to Retain and {CLEAN_ANNOTATION}=false",
        claim.name_any(),
        pod.name_any()
    );
    warn!(pv = %volume, claim = %claim.name_any(), pod = %pod.name_any(), was = %was_policy, clean = %was_clean, "volume of a live pod forced to Retain");
    if let Some(reference) = cluster_ref(claim) {
        ctx.publish_on(
            &reference,
            EventType::Warning,
            "VolumeRetainForced",
            "RetainVolume",
            note,
        )
        .await;
    }
    Ok(Action::await_change())
}

fn error_policy(claim: Arc<PersistentVolumeClaim>, error: &Error, ctx: Arc<Context>) -> Action {
    match claim.labels().get(CLUSTER_LABEL) {
        Some(cluster) => ctx.metrics.cluster_failed(
            CONTROLLER,
            error.reason(),
            &claim.namespace().unwrap_or_default(),
            cluster,
        ),
        None => ctx.metrics.reconcile_failed(CONTROLLER, error.reason()),
    }
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
        let patch = build_volume_patch(&claim(), &pv("Delete"), None).unwrap();
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
        let labels = build_volume_patch(&claim(), &v, None).unwrap()["metadata"]["labels"].clone();
        v.metadata.labels = serde_json::from_value(labels).unwrap();
        assert_eq!(build_volume_patch(&claim(), &v, None), None);
    }

    #[test]
    fn a_volume_is_labelled_with_the_first_instance_that_bound_it() {
        let patch = build_volume_patch(&claim(), &pv("Retain"), Some("uid-new")).unwrap();
        assert_eq!(patch["metadata"]["labels"][CLUSTER_UID_LABEL], "uid-new");
        // Bound earlier by another instance of the same name: kept.
        let mut old = pv("Retain");
        old.metadata.labels = Some([(CLUSTER_UID_LABEL.to_string(), "uid-old".to_string())].into());
        let patch = build_volume_patch(&claim(), &old, Some("uid-new")).unwrap();
        assert_eq!(patch["metadata"]["labels"][CLUSTER_UID_LABEL], "uid-old");
    }

    #[test]
    fn a_clean_volume_keeps_its_policy_and_only_gets_labels() {
        let mut v = pv("Delete");
        v.metadata.annotations = Some([(CLEAN_ANNOTATION.to_string(), "true".to_string())].into());
        let patch = build_volume_patch(&claim(), &v, None).unwrap();
        assert!(patch.get("spec").is_none());
        assert_eq!(patch["metadata"]["labels"][CLUSTER_LABEL], "events");
    }

    #[test]
    fn a_claim_without_the_cluster_label_is_not_ours() {
        let mut c = claim();
        c.metadata.labels = None;
        assert_eq!(build_volume_patch(&c, &pv("Delete"), None), None);
    }

    #[test]
    fn a_volume_bound_to_an_older_claim_of_the_same_name_is_not_touched() {
        let mut v = pv("Delete");
        v.spec.as_mut().unwrap().claim_ref.as_mut().unwrap().uid = Some("old".into());
        assert!(!bound_to(&v, &claim()));
    }

    fn capture_pod(claim: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "events-0", "namespace": "ns",
                "labels": {COMPONENT_LABEL: "capture", CLUSTER_LABEL: "events"}},
            "spec": {"containers": [], "volumes": [
                {"name": "buffer", "persistentVolumeClaim": {"claimName": claim}},
            ]},
            "status": {"phase": "Pending"},
        }))
        .unwrap()
    }

    #[test]
    fn a_running_or_starting_capture_pod_writes_to_its_claim() {
        let pod = capture_pod("buffer-events-0");
        assert!(writes_to(&pod, "buffer-events-0"));
        assert!(!writes_to(&pod, "buffer-events-1"));
        let mut done = pod.clone();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(!writes_to(&done, "buffer-events-0"));
        let mut deleting = pod.clone();
        deleting.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
        );
        assert!(!writes_to(&deleting, "buffer-events-0"));
        let mut flush = pod;
        flush
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(COMPONENT_LABEL.into(), "flush".into());
        assert!(!writes_to(&flush, "buffer-events-0"));
    }

    #[test]
    fn the_volume_of_a_live_pod_is_forced_to_retain_even_when_marked_clean() {
        let mut v = pv("Delete");
        v.metadata.resource_version = Some("9".into());
        v.metadata.annotations = Some([(CLEAN_ANNOTATION.to_string(), "true".to_string())].into());
        // Marked clean: the label-only patch leaves it Delete...
        assert!(
            build_volume_patch(&claim(), &v, None)
                .unwrap()
                .get("spec")
                .is_none()
        );
        // ...but a live pod's volume is forced back.
        let patch = build_force_retain_patch(&v).unwrap();
        assert_eq!(patch["spec"]["persistentVolumeReclaimPolicy"], "Retain");
        assert_eq!(patch["metadata"]["annotations"][CLEAN_ANNOTATION], "false");
        assert_eq!(patch["metadata"]["resourceVersion"], "9");
        // Retain + clean=true is forced too (the mark is stale).
        let mut retained = pv("Retain");
        retained.metadata.annotations =
            Some([(CLEAN_ANNOTATION.to_string(), "true".to_string())].into());
        assert!(build_force_retain_patch(&retained).is_some());
        // Without a clean mark there is nothing to force: the ordinary
        // patch makes it Retain.
        assert_eq!(build_force_retain_patch(&pv("Retain")), None);
        assert_eq!(build_force_retain_patch(&pv("Delete")), None);
        assert!(build_volume_patch(&claim(), &pv("Delete"), None).unwrap()["spec"].is_object());
    }
}
