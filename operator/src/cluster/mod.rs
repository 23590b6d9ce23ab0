//! Reconciles one CaptureCluster: validate the spec, server-side apply the
//! objects [`build`] makes (one field manager, [`FIELD_MANAGER`]), report
//! status and Events; on deletion, scale to zero so every pod drains and
//! hold the finalizer until no volume of the cluster may still hold events.
//!
//! Invariants:
//! - an invalid spec applies nothing: the `SpecValid` condition names the
//!   field and a Warning Event says why;
//! - the finalizer [`FINALIZER`] is removed only once no pod of the cluster
//!   runs and every PV of the cluster carries [`CLEAN_ANNOTATION`]` = "true"`
//!   (a claim that never got a volume holds nothing). Volumes the pods
//!   could not drain are drained by flush Jobs ([`crate::orphans`]); until
//!   then the finalizer waits and the `Draining` condition says which
//!   volumes it waits for.

pub mod build;
pub mod conditions;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, Pod, Service, ServiceAccount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{debug, info, warn};

use crate::api::{
    BUFFER_VOLUME, CLAIM_LABEL, CLEAN_ANNOTATION, CLUSTER_LABEL, CONDITION_DRAINING,
    CONDITION_READY, CONDITION_SPEC_VALID, CaptureCluster, CaptureClusterStatus, FIELD_MANAGER,
    FINALIZER, InvalidSpec, NAMESPACE_LABEL, quantity_bytes,
};
use crate::metrics::Metrics;
use build::Names;
use conditions::Wanted;

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "capturecluster";

/// Errors of a reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request to the API server failed.
    #[error("{what}: {source}")]
    Api {
        /// What was attempted.
        what: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// The object lacks its namespace (never true for objects from the API).
    #[error("capturecluster has no namespace")]
    NoNamespace,
}

impl Error {
    /// A short class for the errors metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Api {
                source: kube::Error::Api(status),
                ..
            } => match status.code {
                403 => "forbidden",
                404 => "not_found",
                409 => "conflict",
                422 => "invalid",
                429 => "throttled",
                500..=599 => "server_error",
                _ => "api",
            },
            Self::Api { .. } => "transport",
            Self::NoNamespace => "no_namespace",
        }
    }
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Api { what, source }
}

/// What every reconciliation shares.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Posts Events on CaptureClusters.
    pub recorder: Recorder,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// The ClusterRole bound to each cluster's capture pods (PV access).
    pub capture_cluster_role: String,
    /// Consecutive failures per object (`namespace/name`), for backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context for the controllers.
    pub fn new(
        client: Client,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        capture_cluster_role: String,
    ) -> Self {
        Self {
            client,
            recorder,
            metrics,
            capture_cluster_role,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a failure of `key` and returns how many in a row.
    pub fn failed(&self, key: &str) -> u32 {
        let mut failures = self.failures.lock().expect("failures lock");
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// Forgets the failures of `key` after a success.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().expect("failures lock").remove(key);
    }

    /// Posts an Event on `cluster`; a failure to post is logged, never fatal.
    pub async fn publish(
        &self,
        cluster: &CaptureCluster,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self
            .recorder
            .publish(&event, &cluster.object_ref(&()))
            .await
        {
            warn!(cluster = %cluster.name_any(), reason, error = %e, "cannot post event");
        }
    }
}

/// The delay before retrying an object after `failures` failures in a row:
/// 2 s doubling, at most five minutes.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(8);
    Duration::from_secs((2u64 << exp).min(300))
}

fn key(cluster: &CaptureCluster) -> String {
    format!(
        "{}/{}",
        cluster.namespace().unwrap_or_default(),
        cluster.name_any()
    )
}

/// Runs the CaptureCluster controller until `shutdown` resolves. `namespace`
/// limits it to one namespace.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    fn scoped<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let owned = watcher::Config::default().labels(CLUSTER_LABEL);
    Controller::new(
        scoped::<CaptureCluster>(&client, &namespace),
        watcher::Config::default(),
    )
    .owns(scoped::<StatefulSet>(&client, &namespace), owned.clone())
    .owns(scoped::<Service>(&client, &namespace), owned.clone())
    .owns(
        scoped::<PodDisruptionBudget>(&client, &namespace),
        owned.clone(),
    )
    .owns(scoped::<ServiceAccount>(&client, &namespace), owned.clone())
    // Pods and PVs are not owned by the cluster but carry its label: their
    // changes move readiness, orphan counts and deletion along.
    .watches(
        scoped::<Pod>(&client, &namespace),
        owned.clone(),
        |pod: Pod| cluster_of(&pod.labels().clone(), pod.namespace()),
    )
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
            cleanup(&cluster, &ns, &ctx).await
        } else {
            Ok(Action::await_change())
        }
    } else {
        match ensure_finalizer(&cluster, &ns, &ctx).await {
            // The patch triggers another reconciliation with the finalizer on.
            Ok(true) => Ok(Action::await_change()),
            Ok(false) => apply(&cluster, &ns, &ctx).await,
            Err(e) => Err(e),
        }
    };
    match &result {
        Ok(_) => ctx.succeeded(&key(&cluster)),
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
    ctx.metrics.reconcile_failed(CONTROLLER, error.reason());
    let failures = ctx.failed(&key(&cluster));
    let delay = backoff(failures);
    warn!(
        cluster = %key(&cluster),
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

async fn remove_finalizer(cluster: &CaptureCluster, ns: &str, ctx: &Context) -> Result<()> {
    let Some(index) = cluster.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
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

/// Parameters of the operator's non-apply patches (finalizers, scale to
/// zero): the same field manager as its applies.
fn update_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    }
}

/// Server-side applies `object` with the operator's field manager.
pub async fn apply_object<K>(client: &Client, ns: &str, object: &K) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = object.name_any();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(api_err(format!("apply {} {ns}/{name}", K::kind(&()))))
}

/// Server-side applies a cluster-scoped `object` with the operator's field manager.
pub async fn apply_cluster_object<K>(client: &Client, object: &K) -> Result<K>
where
    K: Resource<Scope = ClusterResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<K> = Api::all(client.clone());
    let name = object.name_any();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(api_err(format!("apply {} {name}", K::kind(&()))))
}

/// Fields of the volumeClaimTemplate that cannot change once the
/// StatefulSet exists, compared with the spec.
fn immutable_storage_change(
    cluster: &CaptureCluster,
    existing: &StatefulSet,
) -> Option<InvalidSpec> {
    let template = existing
        .spec
        .as_ref()?
        .volume_claim_templates
        .as_ref()?
        .iter()
        .find(|t| t.metadata.name.as_deref() == Some(BUFFER_VOLUME))?;
    let spec = template.spec.as_ref()?;
    let size = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"));
    if let Some(size) = size
        && quantity_bytes(size) != cluster.spec.storage_bytes()
    {
        return Some(InvalidSpec {
            field: "spec.storage.size".into(),
            reason: format!(
                "cannot change after creation (claims were made with {}); create a new CaptureCluster to resize",
                size.0
            ),
        });
    }
    if cluster.spec.storage.storage_class_name.is_some()
        && spec.storage_class_name != cluster.spec.storage.storage_class_name
    {
        return Some(InvalidSpec {
            field: "spec.storage.storageClassName".into(),
            reason: format!(
                "cannot change after creation (claims use {})",
                spec.storage_class_name
                    .as_deref()
                    .unwrap_or("the default class")
            ),
        });
    }
    None
}

async fn apply(cluster: &CaptureCluster, ns: &str, ctx: &Context) -> Result<Action> {
    let name = cluster.name_any();
    let names = Names::of(cluster);
    let statefulsets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let existing = statefulsets
        .get_opt(&names.statefulset)
        .await
        .map_err(api_err(format!(
            "get statefulset {ns}/{}",
            names.statefulset
        )))?;
    let refusal = cluster.spec.validate(&name).err().or_else(|| {
        existing
            .as_ref()
            .and_then(|sts| immutable_storage_change(cluster, sts))
    });
    if let Some(invalid) = refusal {
        return refuse(cluster, ns, ctx, invalid).await;
    }
    let client = &ctx.client;
    apply_object(client, ns, &build::build_service_account(cluster)).await?;
    apply_object(client, ns, &build::build_role(cluster)).await?;
    apply_object(client, ns, &build::build_role_binding(cluster)).await?;
    apply_cluster_object(
        client,
        &build::build_cluster_role_binding(cluster, &ctx.capture_cluster_role),
    )
    .await?;
    apply_object(client, ns, &build::build_headless_service(cluster)).await?;
    apply_object(client, ns, &build::build_client_service(cluster)).await?;
    apply_object(client, ns, &build::build_pod_disruption_budget(cluster)).await?;
    let sts = apply_object(
        client,
        ns,
        &build::build_statefulset(cluster, cluster.spec.replicas),
    )
    .await?;
    let ready = sts
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let report = volume_report(cluster, ns, ctx).await?;
    let orphaned = i32::try_from(report.orphaned.len()).unwrap_or(i32::MAX);
    let status = cluster.status.clone().unwrap_or_default();
    if orphaned != status.orphaned_volumes {
        // Until orphan recovery drains them, say which volumes wait.
        let list = report
            .orphaned
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if orphaned > 0 {
            warn!(cluster = %key(cluster), volumes = %list, "volumes without a pod may hold events");
            ctx.publish(
                cluster,
                EventType::Warning,
                "OrphanedVolumes",
                "Inspect",
                format!("{orphaned} volume(s) without a pod may hold events: {list}"),
            )
            .await;
        }
    }
    let generation = cluster.meta().generation;
    if status.observed_generation != generation
        || !conditions::is(&status.conditions, CONDITION_SPEC_VALID, true)
    {
        ctx.publish(
            cluster,
            EventType::Normal,
            "Applied",
            "Apply",
            format!(
                "applied generation {} ({} replicas)",
                generation.unwrap_or_default(),
                cluster.spec.replicas
            ),
        )
        .await;
        info!(cluster = %key(cluster), generation, replicas = cluster.spec.replicas, "applied");
    }
    let desired = cluster.spec.replicas;
    let all_ready = ready >= desired
        && sts
            .status
            .as_ref()
            .and_then(|s| s.updated_replicas)
            .unwrap_or(0)
            >= desired;
    let now = jiff::Timestamp::now();
    let mut conds = conditions::set(
        &status.conditions,
        Wanted {
            type_: CONDITION_SPEC_VALID,
            status: true,
            reason: "Valid",
            message: "spec accepted".into(),
        },
        generation,
        now,
    );
    conds = conditions::set(
        &conds,
        Wanted {
            type_: CONDITION_READY,
            status: all_ready,
            reason: if all_ready {
                "AllReplicasReady"
            } else {
                "Progressing"
            },
            message: format!("{ready}/{desired} capture pods ready"),
        },
        generation,
        now,
    );
    conds = conditions::remove(&conds, CONDITION_DRAINING);
    patch_status(
        cluster,
        ns,
        ctx,
        CaptureClusterStatus {
            observed_generation: generation,
            ready_replicas: ready,
            conditions: conds,
            orphaned_volumes: orphaned,
            active_flush_jobs: crate::orphans::count_active_flush_jobs(&ctx.client, ns, &name)
                .await?,
        },
    )
    .await?;
    // Owned objects wake us on change; the periodic pass catches drift in
    // what we do not watch (Roles, RoleBindings).
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Records an invalid spec without applying anything.
async fn refuse(
    cluster: &CaptureCluster,
    ns: &str,
    ctx: &Context,
    invalid: InvalidSpec,
) -> Result<Action> {
    ctx.metrics.invalid_specs.inc();
    let status = cluster.status.clone().unwrap_or_default();
    let generation = cluster.meta().generation;
    let message = invalid.to_string();
    let already =
        status.conditions.iter().any(|c| {
            c.type_ == CONDITION_SPEC_VALID && c.status == "False" && c.message == message
        }) && status.observed_generation == generation;
    if !already {
        warn!(cluster = %key(cluster), field = %invalid.field, reason = %invalid.reason, "invalid spec, nothing applied");
        ctx.publish(
            cluster,
            EventType::Warning,
            "InvalidSpec",
            "Validate",
            format!("{message}; nothing was applied"),
        )
        .await;
    }
    let now = jiff::Timestamp::now();
    let mut conds = conditions::set(
        &status.conditions,
        Wanted {
            type_: CONDITION_SPEC_VALID,
            status: false,
            reason: "InvalidSpec",
            message: message.clone(),
        },
        generation,
        now,
    );
    conds = conditions::set(
        &conds,
        Wanted {
            type_: CONDITION_READY,
            status: false,
            reason: "InvalidSpec",
            message: format!("spec refused, nothing applied: {message}"),
        },
        generation,
        now,
    );
    patch_status(
        cluster,
        ns,
        ctx,
        CaptureClusterStatus {
            observed_generation: generation,
            conditions: conds,
            ..status
        },
    )
    .await?;
    // A new spec wakes us; nothing to retry until then.
    Ok(Action::await_change())
}

async fn patch_status(
    cluster: &CaptureCluster,
    ns: &str,
    ctx: &Context,
    status: CaptureClusterStatus,
) -> Result<()> {
    if cluster.status.as_ref() == Some(&status) {
        return Ok(());
    }
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
fn holds_events(pv: &PersistentVolume) -> bool {
    pv.annotations().get(CLEAN_ANNOTATION).map(String::as_str) != Some("true")
}

/// Deletion: scale to zero, wait for the pods to drain and go, then wait
/// until every volume is clean.
async fn cleanup(cluster: &CaptureCluster, ns: &str, ctx: &Context) -> Result<Action> {
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
        let message = format!(
            "{} volume(s) may still hold events: {list}; deletion waits until flush Jobs (orphan recovery) have drained each and annotated it {CLEAN_ANNOTATION}=true",
            dirty.len()
        );
        let changed = !cluster.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == CONDITION_DRAINING && c.message == message)
        });
        if changed {
            warn!(cluster = %key(cluster), volumes = %list, "deletion waits for volumes that may hold events");
            ctx.publish(
                cluster,
                EventType::Warning,
                "VolumesHoldEvents",
                "Delete",
                message.clone(),
            )
            .await;
        }
        draining(cluster, ns, ctx, "VolumesHoldEvents", message).await?;
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    // The pods needed their PV access to mark their volumes; now nothing
    // of the cluster runs.
    let bindings: Api<ClusterRoleBinding> = Api::all(ctx.client.clone());
    match bindings
        .delete(&names.cluster_binding, &Default::default())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => {
            return Err(api_err(format!(
                "delete clusterrolebinding {}",
                names.cluster_binding
            ))(e));
        }
    }
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

/// Where a cluster's volumes stand.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VolumeReport {
    /// PVs of the cluster not marked clean (may hold events).
    pub dirty: BTreeSet<String>,
    /// Dirty PVs that no pod uses: their claim's pod is gone (scaled away,
    /// cluster deleted) or their claim is gone (Released PV).
    pub orphaned: BTreeSet<String>,
}

/// Classifies a cluster's volumes from its claims, the names of its pods,
/// the PVs bound to the claims (by name) and the PVs labelled for it. Pure.
pub fn classify_volumes(
    claims: &[PersistentVolumeClaim],
    pods: &BTreeSet<String>,
    bound: &std::collections::BTreeMap<String, PersistentVolume>,
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
        report.dirty.insert(volume.clone());
        // StatefulSet claims are `<template>-<pod>`.
        let pod = claim
            .name_any()
            .strip_prefix(&format!("{BUFFER_VOLUME}-"))
            .map(str::to_string);
        if pod.is_none_or(|p| !pods.contains(&p)) {
            report.orphaned.insert(volume);
        }
    }
    for pv in labelled {
        let volume = pv.name_any();
        if !seen.contains(&volume) && pv.labels().contains_key(CLAIM_LABEL) && holds_events(pv) {
            report.dirty.insert(volume.clone());
            report.orphaned.insert(volume);
        }
    }
    report
}

/// Lists what [`classify_volumes`] needs and classifies.
async fn volume_report(cluster: &CaptureCluster, ns: &str, ctx: &Context) -> Result<VolumeReport> {
    let name = cluster.name_any();
    let selector = format!("{CLUSTER_LABEL}={name}");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let claims = claims
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(api_err(format!("list claims of {}", key(cluster))))?
        .items;
    let pods: BTreeSet<String> = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(api_err(format!("list pods of {}", key(cluster))))?
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    let mut bound = std::collections::BTreeMap::new();
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
    Ok(classify_volumes(&claims, &pods, &bound, &labelled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_two_seconds_up_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(2), Duration::from_secs(4));
        assert_eq!(backoff(5), Duration::from_secs(32));
        assert_eq!(backoff(9), Duration::from_secs(300));
        assert_eq!(backoff(1000), Duration::from_secs(300));
    }

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
    fn volumes_without_a_pod_that_are_not_clean_are_orphans() {
        let claims = [
            claim("buffer-events-0", Some("pv0")),
            claim("buffer-events-1", Some("pv1")),
            claim("buffer-events-2", Some("pv2")),
            claim("buffer-events-3", None),
        ];
        let pods = BTreeSet::from(["events-0".to_string()]);
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
        let report = classify_volumes(&claims, &pods, &bound, &labelled);
        let names = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>();
        assert_eq!(names(&report.dirty), ["pv0", "pv1", "pv9"]);
        assert_eq!(names(&report.orphaned), ["pv1", "pv9"]);
    }

    fn cluster(size: &str, class: Option<&str>) -> CaptureCluster {
        let spec = serde_json::from_value(json!({
            "image": "holdfast/capture:dev",
            "kafka": {"bootstrapServers": "kafka:9092"},
            "storage": {"size": size, "storageClassName": class},
        }))
        .unwrap();
        let mut c = CaptureCluster::new("events", spec);
        c.metadata.namespace = Some("ns".into());
        c.metadata.uid = Some("u".into());
        c
    }

    #[test]
    fn storage_cannot_change_once_the_claims_exist() {
        let existing = build::build_statefulset(&cluster("1Gi", Some("fast")), 1);
        assert_eq!(
            immutable_storage_change(&cluster("1024Mi", Some("fast")), &existing),
            None
        );
        assert_eq!(
            immutable_storage_change(&cluster("2Gi", Some("fast")), &existing)
                .unwrap()
                .field,
            "spec.storage.size"
        );
        assert_eq!(
            immutable_storage_change(&cluster("1Gi", Some("slow")), &existing)
                .unwrap()
                .field,
            "spec.storage.storageClassName"
        );
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
