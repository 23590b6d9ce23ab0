//! Orphan recovery: every volume that holds events and that no pod will
//! drain is drained by a flush Job, then handed back to the storage system
//! (design invariant 5); a volume that cannot be drained stays `Retain` and
//! is reported (invariant 4).
//!
//! One loop (leader only) lists CaptureClusters, the claims, PVs and pods
//! labelled [`CLUSTER_LABEL`] and the flush Jobs, classifies them
//! ([`find`], pure) and takes at most one step per orphan per pass
//! ([`find::decide`], pure):
//!
//! | orphan | steps |
//! | --- | --- |
//! | a scaled-away claim (or one of a deleted cluster) whose PV is not clean | flush Job on the claim → on success PV `Delete` + `clean=true`, claim deleted |
//! | a `Released` PV (claim deleted) that is `Retain` and not clean | pre-bind the PV to a recovery claim (`claimRef` without uid, claim with `volumeName`, [`rebind`]) → flush Job → as above |
//! | a claim whose PV is clean (its pod drained it) or that never got a PV | claim deleted (PV flipped to `Delete` first if it is not) |
//! | a volume whose CaptureCluster is gone, or whose cluster disabled recovery | left `Retain`, Warning Event, `holdfast_operator_unrecoverable_volumes` |
//!
//! Never two drainers: a Job starts only on a claim no pod uses (a capture
//! pod, or a flush pod of an earlier Job still terminating); a flush Job
//! whose claim a capture pod uses again is deleted, the pod takes over (the
//! buffer's `flock` makes the pod wait, by failing and restarting, until
//! the Job's pod is gone). A Job is named after its PV
//! ([`job::flush_job_name`]), so there is one at most per volume, and a
//! restarted operator picks up the Jobs it finds.
//!
//! Flipping to `Delete` (invariant 4) happens only after a Job exited 0,
//! which `holdfast-capture flush` does only when it saw the buffer empty;
//! the patch carries the PV's resourceVersion, so it fails if anything (a
//! pod returning and marking the volume `clean=false`) touched the PV since
//! it was read. Failed Jobs are counted on the PV
//! ([`FAILURES_ANNOTATION`], [`FAILED_AT_ANNOTATION`], so the backoff
//! survives restarts); the next Job starts after [`backoff`] (2 s doubling
//! to 5 min). `spec.orphanRecovery.delaySeconds` is measured from when this
//! process first saw the volume orphaned (a restart starts it afresh);
//! `maxParallelFlushJobs` caps the running Jobs per cluster.
//!
//! Events on the CaptureCluster: `FlushJobStarted`, `VolumeDrained`,
//! `FlushJobFailed`, `FlushJobStopped`, `VolumeRebound`, `ClaimRemoved`; on
//! the PV: `VolumeUnrecoverable`. Status `activeFlushJobs` is counted by the
//! cluster controller from the Jobs ([`count_active_flush_jobs`]).

pub mod find;
pub mod job;
pub mod rebind;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::{Event, EventType};
use kube::{Client, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::api::{
    CLEAN_ANNOTATION, CLUSTER_LABEL, COMPONENT_LABEL, CaptureCluster, NAMESPACE_LABEL,
};
use crate::cluster::{Context, Error, Result, backoff};

use find::{Inventory, Orphan, Situation, Step};
use job::{FlushJobInput, JobState};

/// Name of this loop in metrics and logs.
pub const CONTROLLER: &str = "orphans";
/// Value of [`COMPONENT_LABEL`] on flush Jobs, their pods and recovery claims.
pub const FLUSH_COMPONENT: &str = "flush";
/// Annotation on a flush Job and a recovery claim: the PV it is for.
pub const VOLUME_ANNOTATION: &str = "holdfast.dev/volume";
/// Annotation on a flush Job: the claim it mounts.
pub const CLAIM_ANNOTATION: &str = "holdfast.dev/flush-claim";
/// Annotation on a PV: flush Jobs that failed on it in a row.
pub const FAILURES_ANNOTATION: &str = "holdfast.dev/flush-failures";
/// Annotation on a PV: when its last flush Job failed (RFC 3339).
pub const FAILED_AT_ANNOTATION: &str = "holdfast.dev/flush-failed-at";
/// Annotation on a PV (set by the capture pod): events its last shutdown left.
pub const REMAINING_ANNOTATION: &str = "holdfast.dev/remaining-events";

/// Field manager of the loop's merge patches.
const FIELD_MANAGER: &str = "holdfast-operator-orphans";

/// `prefix` + `name` as a DNS label of at most 63 characters: dots become
/// dashes, and a name too long is cut and suffixed with a hash of the whole,
/// so distinct volumes keep distinct names.
pub fn bounded_name(prefix: &str, name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let full = format!("{prefix}{clean}");
    if full.len() <= 63 {
        return full;
    }
    // FNV-1a: stable across releases (unlike std's hasher).
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let suffix = format!("-{:08x}", hash as u32);
    let keep = 63 - suffix.len();
    let head = full[..keep].trim_end_matches('-');
    format!("{head}{suffix}")
}

/// Label: what a flush Job counter counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `started`, `succeeded`, `failed`, `stopped`.
    pub result: String,
}

/// Metrics of orphan recovery (registered under `holdfast_operator_`).
#[derive(Debug)]
pub struct OrphanMetrics {
    /// Volumes that hold events and that no pod will drain.
    pub orphaned_volumes: Gauge,
    /// Orphaned volumes that cannot be drained (cluster gone, recovery off).
    pub unrecoverable_volumes: Gauge,
    /// Flush Jobs running now.
    pub active_flush_jobs: Gauge,
    /// Flush Jobs by what happened to them.
    pub flush_jobs: Family<ResultLabel, Counter>,
    /// How long flush Jobs ran (start to end).
    pub flush_job_duration: Histogram,
    /// Time from first seeing a volume orphaned to its release.
    pub orphan_recovery_duration: Histogram,
    /// Volumes handed back to the storage system (flipped or released).
    pub volumes_released: Counter,
}

fn seconds_histogram() -> Histogram {
    Histogram::new([1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0])
}

impl OrphanMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            orphaned_volumes: Gauge::default(),
            unrecoverable_volumes: Gauge::default(),
            active_flush_jobs: Gauge::default(),
            flush_jobs: Family::default(),
            flush_job_duration: seconds_histogram(),
            orphan_recovery_duration: seconds_histogram(),
            volumes_released: Counter::default(),
        };
        registry.register(
            "orphaned_volumes",
            "Volumes holding events that no pod will drain",
            m.orphaned_volumes.clone(),
        );
        registry.register(
            "unrecoverable_volumes",
            "Orphaned volumes that cannot be drained (their CaptureCluster is gone or disabled recovery); they stay Retain",
            m.unrecoverable_volumes.clone(),
        );
        registry.register(
            "flush_jobs_active",
            "Flush Jobs running now",
            m.active_flush_jobs.clone(),
        );
        registry.register(
            "flush_jobs",
            "Flush Jobs by result (started, succeeded, failed, stopped)",
            m.flush_jobs.clone(),
        );
        registry.register_with_unit(
            "flush_job_duration",
            "How long a flush Job ran",
            Unit::Seconds,
            m.flush_job_duration.clone(),
        );
        registry.register_with_unit(
            "orphan_recovery_duration",
            "Time from first seeing a volume orphaned to handing it back drained",
            Unit::Seconds,
            m.orphan_recovery_duration.clone(),
        );
        registry.register(
            "volumes_released",
            "Drained volumes handed back to the storage system",
            m.volumes_released.clone(),
        );
        m
    }

    fn job(&self, result: &str) {
        self.flush_jobs
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }
}

/// Settings of the loop.
#[derive(Debug, Clone)]
pub struct Config {
    /// Only this namespace (claims, pods, Jobs, clusters; PVs by their
    /// [`NAMESPACE_LABEL`]).
    pub namespace: Option<String>,
    /// Time between passes.
    pub interval: Duration,
    /// `holdfast-capture flush --timeout-secs` of each Job.
    pub flush_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: None,
            interval: Duration::from_secs(5),
            flush_timeout_secs: 600,
        }
    }
}

/// What the loop remembers between passes (lost on restart, by design:
/// everything that matters is in the API).
#[derive(Debug, Default)]
struct Memory {
    /// When each orphan was first seen.
    first_seen: HashMap<String, Instant>,
    /// Unrecoverable volumes already reported.
    reported: BTreeSet<String>,
}

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Api { what, source }
}

fn scoped<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the loop until `shutdown` resolves (a pass in progress finishes).
pub async fn run(
    ctx: Arc<Context>,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let mut memory = Memory::default();
    tokio::pin!(shutdown);
    info!(interval_secs = config.interval.as_secs_f64(), namespace = ?config.namespace, "orphan recovery running");
    loop {
        {
            let _timer = ctx.metrics.reconcile(CONTROLLER);
            if let Err(e) = pass(&ctx, &config, &mut memory).await {
                ctx.metrics.reconcile_failed(CONTROLLER, e.reason());
                warn!(reason = e.reason(), error = %e, "orphan recovery pass failed");
            }
        }
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(config.interval) => {}
        }
    }
}

/// Lists what one pass needs.
pub async fn inventory(client: &Client, namespace: Option<&str>) -> Result<Inventory> {
    let labelled = ListParams::default().labels(CLUSTER_LABEL);
    let clusters = scoped::<CaptureCluster>(client, namespace)
        .list(&ListParams::default())
        .await
        .map_err(api_err("list captureclusters"))?
        .items;
    let claims = scoped::<PersistentVolumeClaim>(client, namespace)
        .list(&labelled)
        .await
        .map_err(api_err("list claims"))?
        .items;
    let pods = scoped::<Pod>(client, namespace)
        .list(&labelled)
        .await
        .map_err(api_err("list pods"))?
        .items;
    let jobs = scoped::<Job>(client, namespace)
        .list(&ListParams::default().labels(&format!("{COMPONENT_LABEL}={FLUSH_COMPONENT}")))
        .await
        .map_err(api_err("list flush jobs"))?
        .items;
    let mut volumes = Api::<PersistentVolume>::all(client.clone())
        .list(&labelled)
        .await
        .map_err(api_err("list volumes"))?
        .items;
    if let Some(ns) = namespace {
        volumes.retain(|pv| pv.labels().get(NAMESPACE_LABEL).map(String::as_str) == Some(ns));
    }
    Ok(Inventory {
        clusters,
        claims,
        volumes,
        pods,
        jobs,
    })
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
        .filter(|j| job::job_state(j) == JobState::Active)
        .count();
    Ok(i32::try_from(active).unwrap_or(i32::MAX))
}

async fn pass(ctx: &Context, config: &Config, memory: &mut Memory) -> Result<()> {
    let inv = inventory(&ctx.client, config.namespace.as_deref()).await?;
    let findings = find::find(&inv);
    let cluster_of = |ns: &str, name: &str| {
        inv.clusters
            .iter()
            .find(|c| c.namespace().as_deref() == Some(ns) && c.name_any() == name)
    };

    for stop in &findings.stop {
        let result = delete_job(&ctx.client, &stop.namespace, &stop.job).await;
        match result {
            Ok(()) => {
                ctx.metrics.orphans.job("stopped");
                info!(namespace = %stop.namespace, job = %stop.job, reason = stop.reason, "flush job deleted");
                if let Some(cluster) = cluster_of(&stop.namespace, &stop.cluster) {
                    ctx.publish(
                        cluster,
                        EventType::Normal,
                        "FlushJobStopped",
                        "StopFlush",
                        format!("flush Job {} deleted: {}", stop.job, stop.reason),
                    )
                    .await;
                }
            }
            Err(e) => failed(ctx, &format!("job {}/{}", stop.namespace, stop.job), &e),
        }
    }

    let now_instant = Instant::now();
    let now = jiff::Timestamp::now();
    let keys: BTreeSet<String> = findings.orphans.iter().map(Orphan::key).collect();
    memory.first_seen.retain(|k, _| keys.contains(k));
    memory.reported.retain(|k| keys.contains(k));
    let mut active = find::active_jobs(&inv.jobs);
    let mut holding = 0i64;
    let mut unrecoverable = 0i64;
    for orphan in &findings.orphans {
        let first_seen = *memory.first_seen.entry(orphan.key()).or_insert(now_instant);
        if !orphan.clean {
            holding += 1;
        }
        let cluster = cluster_of(&orphan.namespace, &orphan.cluster);
        let volume = orphan
            .volume
            .as_deref()
            .and_then(|v| inv.volumes.iter().find(|pv| pv.name_any() == v));
        let job = find::job_of(orphan, &inv.jobs);
        let slot = (orphan.namespace.clone(), orphan.cluster.clone());
        let running = active.get(&slot).copied().unwrap_or(0);
        let max = cluster.map_or(0, |c| c.spec.orphan_recovery.max_parallel_flush_jobs);
        let step = find::decide(
            orphan,
            &Situation {
                cluster,
                volume,
                job,
                orphaned_for: now_instant.duration_since(first_seen),
                now,
                slot_free: running < max,
            },
        );
        let target = Target {
            orphan,
            cluster,
            volume,
            job,
            inv: &inv,
        };
        let result = match &step {
            Step::Wait(why) => {
                debug!(volume = ?orphan.volume, claim = %orphan.claim, kind = orphan.kind.as_str(), why, "orphan waits");
                Ok(())
            }
            Step::Release => release(ctx, &target).await,
            Step::Rebind => rebind_volume(ctx, &target).await,
            Step::StartJob => {
                let started = start_job(ctx, config, &target).await;
                if started.is_ok() {
                    *active.entry(slot).or_insert(0) += 1;
                }
                started
            }
            Step::Finish => finish(ctx, &target, now_instant.duration_since(first_seen)).await,
            Step::RecordFailure => record_failure(ctx, &target, now).await,
            Step::Report(why) => {
                unrecoverable += 1;
                if memory.reported.insert(orphan.key()) {
                    report(ctx, &target, why).await;
                }
                Ok(())
            }
        };
        match result {
            Ok(()) => {
                if matches!(step, Step::Finish | Step::Release) {
                    memory.first_seen.remove(&orphan.key());
                }
            }
            Err(e) => failed(ctx, &orphan.key(), &e),
        }
    }
    let m = &ctx.metrics.orphans;
    m.orphaned_volumes.set(holding);
    m.unrecoverable_volumes.set(unrecoverable);
    m.active_flush_jobs
        .set(i64::from(active.values().copied().sum::<u32>()));
    Ok(())
}

/// A failed step: logged and counted; the next pass retries (a conflict is
/// another writer landing first, and is expected).
fn failed(ctx: &Context, what: &str, e: &Error) {
    ctx.metrics.reconcile_failed(CONTROLLER, e.reason());
    if e.reason() == "conflict" {
        debug!(target = %what, error = %e, "orphan step raced another writer; retrying next pass");
    } else {
        warn!(target = %what, reason = e.reason(), error = %e, "orphan step failed; retrying next pass");
    }
}

/// One orphan and what the pass knows about it.
struct Target<'a> {
    orphan: &'a Orphan,
    cluster: Option<&'a CaptureCluster>,
    volume: Option<&'a PersistentVolume>,
    job: Option<&'a Job>,
    inv: &'a Inventory,
}

impl Target<'_> {
    fn volume_name(&self) -> &str {
        self.orphan.volume.as_deref().unwrap_or("(none)")
    }

    fn claim_uid(&self) -> Option<String> {
        self.inv
            .claims
            .iter()
            .find(|c| {
                c.namespace().as_deref() == Some(self.orphan.namespace.as_str())
                    && c.name_any() == self.orphan.claim
            })
            .and_then(|c| c.uid())
    }

    async fn publish(
        &self,
        ctx: &Context,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        if let Some(cluster) = self.cluster {
            ctx.publish(cluster, type_, reason, action, note).await;
        }
    }
}

fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    }
}

async fn delete_job(client: &Client, ns: &str, name: &str) -> Result<()> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    match jobs.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(api_err(format!("delete job {ns}/{name}"))(e)),
    }
}

/// Deletes the orphan's claim (guarded by its uid, so a claim recreated
/// under the same name by a returning StatefulSet pod is not touched).
async fn delete_claim(client: &Client, target: &Target<'_>) -> Result<bool> {
    let o = target.orphan;
    if !o.claim_exists {
        return Ok(false);
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &o.namespace);
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: target.claim_uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match claims.delete(&o.claim, &params).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(false),
        Err(e) => Err(api_err(format!("delete claim {}/{}", o.namespace, o.claim))(e)),
    }
}

/// A capture pod uses `claim` right now (a fresh look, just before a
/// volume is handed back).
async fn claim_in_use(client: &Client, ns: &str, claim: &str) -> Result<bool> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(CLUSTER_LABEL))
        .await
        .map_err(api_err(format!("list pods of {ns}")))?;
    Ok(pods.items.iter().any(|p| {
        p.labels().get(COMPONENT_LABEL).map(String::as_str) != Some(FLUSH_COMPONENT)
            && p.spec.iter().any(|s| {
                s.volumes
                    .iter()
                    .flatten()
                    .filter_map(|v| v.persistent_volume_claim.as_ref())
                    .any(|c| c.claim_name == claim)
            })
    }))
}

/// A clean claim (its pod drained it) or one that never got a volume: the
/// PV goes back to the storage system with the claim.
async fn release(ctx: &Context, target: &Target<'_>) -> Result<()> {
    let o = target.orphan;
    if claim_in_use(&ctx.client, &o.namespace, &o.claim).await? {
        return Ok(());
    }
    if let Some(pv) = target.volume {
        let policy = pv
            .spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref());
        if policy != Some("Delete") {
            Api::<PersistentVolume>::all(ctx.client.clone())
                .patch(
                    &pv.name_any(),
                    &merge_params(),
                    &Patch::Merge(json!({
                        "metadata": {"resourceVersion": pv.resource_version()},
                        "spec": {"persistentVolumeReclaimPolicy": "Delete"},
                    })),
                )
                .await
                .map_err(api_err(format!("set volume {} to Delete", pv.name_any())))?;
        }
    }
    let deleted = delete_claim(&ctx.client, target).await?;
    ctx.metrics.orphans.volumes_released.inc();
    info!(volume = target.volume_name(), claim = %o.claim, namespace = %o.namespace, "clean volume released");
    if deleted {
        target
            .publish(
                ctx,
                EventType::Normal,
                "ClaimRemoved",
                "ReleaseVolume",
                format!(
                    "claim {} (volume {}) holds no events and no pod uses it: removed, the volume goes back to the storage system",
                    o.claim,
                    target.volume_name()
                ),
            )
            .await;
    }
    Ok(())
}

/// Pre-binds a Released PV to the recovery claim and creates the claim.
async fn rebind_volume(ctx: &Context, target: &Target<'_>) -> Result<()> {
    let (Some(cluster), Some(pv)) = (target.cluster, target.volume) else {
        return Ok(());
    };
    let o = target.orphan;
    if !rebind::pre_bound_to(pv, &o.namespace, &o.claim) {
        Api::<PersistentVolume>::all(ctx.client.clone())
            .patch(
                &pv.name_any(),
                &merge_params(),
                &Patch::Merge(rebind::build_claim_ref_patch(pv, &o.namespace, &o.claim)),
            )
            .await
            .map_err(api_err(format!("pre-bind volume {}", pv.name_any())))?;
    }
    if !o.claim_exists {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &o.namespace);
        match claims
            .create(
                &PostParams::default(),
                &rebind::build_recovery_claim(cluster, pv),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => {
                return Err(api_err(format!("create claim {}/{}", o.namespace, o.claim))(e));
            }
        }
    }
    info!(volume = %pv.name_any(), claim = %o.claim, namespace = %o.namespace, "released volume rebound for its flush job");
    target
        .publish(
            ctx,
            EventType::Normal,
            "VolumeRebound",
            "RebindVolume",
            format!(
                "volume {} lost its claim while holding events: bound to claim {} for a flush Job",
                pv.name_any(),
                o.claim
            ),
        )
        .await;
    Ok(())
}

async fn start_job(ctx: &Context, config: &Config, target: &Target<'_>) -> Result<()> {
    let (Some(cluster), Some(pv)) = (target.cluster, target.volume) else {
        return Ok(());
    };
    let o = target.orphan;
    // A pod may have come back since the list.
    if claim_in_use(&ctx.client, &o.namespace, &o.claim).await? {
        return Ok(());
    }
    let job = job::build_flush_job(&FlushJobInput {
        cluster,
        volume: pv,
        claim: &o.claim,
        flush_timeout_secs: config.flush_timeout_secs,
    });
    let name = job.name_any();
    match Api::<Job>::namespaced(ctx.client.clone(), &o.namespace)
        .create(&PostParams::default(), &job)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => return Ok(()),
        Err(e) => return Err(api_err(format!("create job {}/{name}", o.namespace))(e)),
    }
    ctx.metrics.orphans.job("started");
    let remaining = pv
        .annotations()
        .get(REMAINING_ANNOTATION)
        .map(|n| format!(" ({n} events left by its last pod)"))
        .unwrap_or_default();
    info!(volume = %pv.name_any(), claim = %o.claim, namespace = %o.namespace, job = %name, kind = o.kind.as_str(), "flush job started");
    target
        .publish(
            ctx,
            EventType::Normal,
            "FlushJobStarted",
            "Flush",
            format!(
                "volume {} ({}, claim {}) may hold events{remaining}: flush Job {name} started",
                pv.name_any(),
                o.kind.as_str(),
                o.claim
            ),
        )
        .await;
    Ok(())
}

/// The node the Job's pod ran on, for the Event.
fn job_node(inv: &Inventory, ns: &str, job: &str) -> Option<String> {
    inv.pods
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns))
        .filter(|p| {
            p.labels().get("job-name").map(String::as_str) == Some(job)
                || p.labels()
                    .get("batch.kubernetes.io/job-name")
                    .map(String::as_str)
                    == Some(job)
        })
        .find_map(|p| p.spec.as_ref()?.node_name.clone())
}

/// The Job saw the buffer empty: hand the volume back.
async fn finish(ctx: &Context, target: &Target<'_>, orphaned_for: Duration) -> Result<()> {
    let (Some(pv), Some(job)) = (target.volume, target.job) else {
        // No PV left to flip: just clear the Job.
        if let Some(job) = target.job {
            delete_job(&ctx.client, &target.orphan.namespace, &job.name_any()).await?;
        }
        return Ok(());
    };
    let o = target.orphan;
    if claim_in_use(&ctx.client, &o.namespace, &o.claim).await? {
        // A pod came back after the Job: it owns the volume now.
        return Ok(());
    }
    let (failures, _) = find::failures(pv);
    Api::<PersistentVolume>::all(ctx.client.clone())
        .patch(
            &pv.name_any(),
            &merge_params(),
            &Patch::Merge(json!({
                "metadata": {
                    "resourceVersion": pv.resource_version(),
                    "annotations": {
                        CLEAN_ANNOTATION: "true",
                        REMAINING_ANNOTATION: "0",
                        FAILURES_ANNOTATION: null,
                        FAILED_AT_ANNOTATION: null,
                    },
                },
                "spec": {"persistentVolumeReclaimPolicy": "Delete"},
            })),
        )
        .await
        .map_err(api_err(format!(
            "set drained volume {} to Delete",
            pv.name_any()
        )))?;
    delete_claim(&ctx.client, target).await?;
    let job_name = job.name_any();
    let node = job_node(target.inv, &o.namespace, &job_name);
    delete_job(&ctx.client, &o.namespace, &job_name).await?;
    let m = &ctx.metrics.orphans;
    m.job("succeeded");
    m.volumes_released.inc();
    let ran = job::job_duration(job);
    if let Some(ran) = ran {
        m.flush_job_duration.observe(ran.as_secs_f64());
    }
    m.orphan_recovery_duration
        .observe(orphaned_for.as_secs_f64());
    info!(
        volume = %pv.name_any(),
        claim = %o.claim,
        namespace = %o.namespace,
        job = %job_name,
        node = node.as_deref().unwrap_or(""),
        job_secs = ran.map(|d| d.as_secs()),
        orphaned_secs = orphaned_for.as_secs(),
        failures_before = failures,
        "volume drained by its flush job: set to Delete, claim removed"
    );
    target
        .publish(
            ctx,
            EventType::Normal,
            "VolumeDrained",
            "Flush",
            format!(
                "flush Job {job_name}{} drained volume {} in {}s ({}s after it was found orphaned): set to Delete, claim {} removed",
                node.map(|n| format!(" on node {n}")).unwrap_or_default(),
                pv.name_any(),
                ran.map_or(0, |d| d.as_secs()),
                orphaned_for.as_secs(),
                o.claim
            ),
        )
        .await;
    Ok(())
}

async fn record_failure(ctx: &Context, target: &Target<'_>, now: jiff::Timestamp) -> Result<()> {
    let Some(job) = target.job else {
        return Ok(());
    };
    let o = target.orphan;
    let failures = target.volume.map_or(0, |pv| find::failures(pv).0) + 1;
    if let Some(pv) = target.volume {
        Api::<PersistentVolume>::all(ctx.client.clone())
            .patch(
                &pv.name_any(),
                &merge_params(),
                &Patch::Merge(json!({"metadata": {"annotations": {
                    FAILURES_ANNOTATION: failures.to_string(),
                    FAILED_AT_ANNOTATION: now.to_string(),
                }}})),
            )
            .await
            .map_err(api_err(format!(
                "record failure on volume {}",
                pv.name_any()
            )))?;
    }
    let job_name = job.name_any();
    delete_job(&ctx.client, &o.namespace, &job_name).await?;
    let m = &ctx.metrics.orphans;
    m.job("failed");
    if let Some(ran) = job::job_duration(job) {
        m.flush_job_duration.observe(ran.as_secs_f64());
    }
    let why = job::job_failure(job);
    let retry = backoff(failures);
    warn!(volume = target.volume_name(), namespace = %o.namespace, job = %job_name, failures, retry_in_secs = retry.as_secs(), why = %why, "flush job failed; the volume stays Retain");
    target
        .publish(
            ctx,
            EventType::Warning,
            "FlushJobFailed",
            "Flush",
            format!(
                "flush Job {job_name} for volume {} failed ({why}); failure {failures} in a row, next try in {}s; the volume stays Retain",
                target.volume_name(),
                retry.as_secs()
            ),
        )
        .await;
    Ok(())
}

/// An orphan that cannot be drained: a Warning Event on its PV (its
/// CaptureCluster may be gone) and on the cluster when it exists.
async fn report(ctx: &Context, target: &Target<'_>, why: &str) {
    let o = target.orphan;
    let note = format!(
        "volume {} (claim {}/{}) may hold events and cannot be drained: {why}",
        target.volume_name(),
        o.namespace,
        o.claim
    );
    warn!(volume = target.volume_name(), claim = %o.claim, namespace = %o.namespace, why, "orphaned volume cannot be drained");
    if let Some(pv) = target.volume {
        let event = Event {
            type_: EventType::Warning,
            reason: "VolumeUnrecoverable".into(),
            note: Some(note.clone()),
            action: "Inspect".into(),
            secondary: None,
        };
        let mut reference = pv.object_ref(&());
        // Events of cluster-scoped objects live in `default`.
        reference.namespace = None;
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            warn!(volume = %pv.name_any(), error = %e, "cannot post event");
        }
    }
    target
        .publish(
            ctx,
            EventType::Warning,
            "VolumeUnrecoverable",
            "Inspect",
            note,
        )
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_names_are_dns_labels_and_keep_distinct_volumes_apart() {
        assert_eq!(bounded_name("hf-flush-", "pvc-1"), "hf-flush-pvc-1");
        assert_eq!(
            bounded_name("hf-flush-", "Local.Vol_1"),
            "hf-flush-local-vol-1"
        );
        let a = bounded_name("hf-recover-", &"a".repeat(100));
        let b = bounded_name("hf-recover-", &format!("{}b", "a".repeat(99)));
        assert!(a.len() <= 63 && b.len() <= 63);
        assert_ne!(a, b);
        assert!(a.chars().last().unwrap().is_ascii_alphanumeric());
    }

    #[test]
    fn registers_its_metrics() {
        let metrics = crate::metrics::Metrics::new();
        metrics.orphans.orphaned_volumes.set(2);
        metrics.orphans.job("started");
        let text = metrics.render();
        assert!(
            text.contains("holdfast_operator_orphaned_volumes 2"),
            "{text}"
        );
        assert!(
            text.contains("holdfast_operator_flush_jobs_total{result=\"started\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("holdfast_operator_flush_job_duration_seconds_bucket"),
            "{text}"
        );
    }
}
