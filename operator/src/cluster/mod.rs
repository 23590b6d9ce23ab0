//! Reconciles one CaptureCluster: validate the spec, server-side apply the
//! objects [`build`] makes (one field manager, [`crate::api::FIELD_MANAGER`]), report
//! status and Events; on deletion, scale to zero so every pod drains and
//! hold the finalizer until no volume of the cluster may still hold events.
//!
//! Invariants:
//! - an invalid spec applies nothing: the `SpecValid` condition names the
//!   field and a Warning Event says why;
//! - the finalizer [`FINALIZER`] is removed only once no pod of the cluster
//!   runs and every PV of the cluster carries [`crate::api::CLEAN_ANNOTATION`]` = "true"`
//!   (a claim that never got a volume holds nothing). Volumes the pods
//!   could not drain are drained by flush Jobs ([`crate::orphans`]); until
//!   then the finalizer waits and the `Draining` condition says which
//!   volumes it waits for.

mod apply;
pub mod build;
pub mod capture_binding;
mod cleanup;
pub mod conditions;
pub mod orphan_status;
pub mod status;

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolume, Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, warn};

use crate::api::{CLUSTER_LABEL, CaptureCluster, FINALIZER, NAMESPACE_LABEL};
use crate::runtime::{Context, Error, Result, api_err, backoff, key, scoped, update_params};

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "capturecluster";

/// Runs the CaptureCluster controller until `shutdown` resolves. `namespace`
/// limits it to one namespace.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let owned = watcher::Config::default().labels(CLUSTER_LABEL);
    Controller::new(
        scoped::<CaptureCluster>(&client, ns),
        watcher::Config::default(),
    )
    .owns(scoped::<StatefulSet>(&client, ns), owned.clone())
    .owns(scoped::<Service>(&client, ns), owned.clone())
    .owns(scoped::<PodDisruptionBudget>(&client, ns), owned.clone())
    .owns(scoped::<ServiceAccount>(&client, ns), owned.clone())
    // Pods and PVs are not owned by the cluster but carry its label: their
    // changes move readiness, orphan counts and deletion along.
    .watches(scoped::<Pod>(&client, ns), owned.clone(), |pod: Pod| {
        cluster_of(&pod.labels().clone(), pod.namespace())
    })
    .watches(
        Api::<PersistentVolume>::all(client.clone()),
        owned,
        |pv: PersistentVolume| {
            let ns = pv.labels().get(NAMESPACE_LABEL).cloned();
            cluster_of(pv.labels(), ns)
        },
    )
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        match result {
            Ok((object, _)) => debug!(cluster = %object.name, "reconciled"),
            Err(e) => debug!(error = %e, "reconcile loop"),
        }
    })
    .await;
}

/// The CaptureCluster an object labelled [`CLUSTER_LABEL`] belongs to.
fn cluster_of(
    labels: &std::collections::BTreeMap<String, String>,
    namespace: Option<String>,
) -> Option<ObjectRef<CaptureCluster>> {
    let name = labels.get(CLUSTER_LABEL)?;
    Some(ObjectRef::new(name).within(&namespace?))
}

/// Reconciles one CaptureCluster (see the module docs).
pub async fn reconcile(cluster: Arc<CaptureCluster>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let ns = cluster.namespace().ok_or(Error::NoNamespace)?;
    let result = if cluster.meta().deletion_timestamp.is_some() {
        if cluster.finalizers().iter().any(|f| f == FINALIZER) {
            cleanup::cleanup(&cluster, &ns, &ctx).await
        } else {
            Ok(Action::await_change())
        }
    } else {
        match ensure_finalizer(&cluster, &ns, &ctx).await {
            // The patch triggers another reconciliation with the finalizer on.
            Ok(true) => Ok(Action::await_change()),
            Ok(false) => apply::apply(&cluster, &ns, &ctx).await,
            Err(e) => Err(e),
        }
    };
    match &result {
        Ok(_) => ctx.succeeded(&key(&*cluster)),
        // A conflict is another writer's change landing first: retried
        // quietly, not an event worth a human's attention.
        Err(e) if e.reason() == "conflict" => {}
        Err(e) => {
            ctx.publish(
                &cluster,
                EventType::Warning,
                "ReconcileFailed",
                "Reconcile",
                e.to_string(),
            )
            .await;
        }
    }
    result
}

/// Counts the error and retries with exponential backoff per object.
pub fn error_policy(cluster: Arc<CaptureCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.cluster_failed(
        CONTROLLER,
        error.reason(),
        &cluster.namespace().unwrap_or_default(),
        &cluster.name_any(),
    );
    let failures = ctx.failed(&key(&*cluster));
    let delay = backoff(failures);
    warn!(
        cluster = %key(&*cluster),
        reason = error.reason(),
        failures,
        retry_in_secs = delay.as_secs(),
        error = %error,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// Adds the finalizer when missing; `true` when it patched.
async fn ensure_finalizer(cluster: &CaptureCluster, ns: &str, ctx: &Context) -> Result<bool> {
    if cluster.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(false);
    }
    ctx.may_write(|| format!("add finalizer to {}", key(cluster)))?;
    let api: Api<CaptureCluster> = Api::namespaced(ctx.client.clone(), ns);
    // The resourceVersion makes the patch fail (409, retried) rather than
    // clobber a concurrent change to the finalizer list.
    let mut finalizers = cluster.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    api.patch(
        &cluster.name_any(),
        &update_params(),
        &Patch::Merge(json!({"metadata": {
            "finalizers": finalizers,
            "resourceVersion": cluster.resource_version(),
        }})),
    )
    .await
    .map_err(api_err(format!("add finalizer to {}", key(cluster))))?;
    Ok(true)
}

pub(crate) async fn remove_finalizer(
    cluster: &CaptureCluster,
    ns: &str,
    ctx: &Context,
) -> Result<()> {
    let Some(index) = cluster.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    ctx.may_write(|| format!("remove finalizer of {}", key(cluster)))?;
    let api: Api<CaptureCluster> = Api::namespaced(ctx.client.clone(), ns);
    let mut finalizers = cluster.finalizers().to_vec();
    finalizers.remove(index);
    match api
        .patch(
            &cluster.name_any(),
            &update_params(),
            &Patch::Merge(json!({"metadata": {
                "finalizers": finalizers,
                "resourceVersion": cluster.resource_version(),
            }})),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(api_err(format!("remove finalizer of {}", key(cluster)))(e)),
    }
}
