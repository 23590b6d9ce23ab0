//! The steps of orphan recovery that talk to the API server: stop a Job,
//! release a clean volume, rebind a Released one, start a flush Job, hand a
//! drained volume back, record a failure, report an unrecoverable volume.
//! Each checks leadership before it writes ([`Context::may_write`]).

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::api::{CLEAN_ANNOTATION, CLUSTER_LABEL, COMPONENT_LABEL, CaptureCluster};
use crate::runtime::{Context, Result, api_err, backoff, patch_params};

use super::find::{self, Inventory, Orphan};
use super::job::{self, FlushJobInput};
use super::rebind;
use super::{
    Config, FAILED_AT_ANNOTATION, FAILURES_ANNOTATION, FIELD_MANAGER, FLUSH_COMPONENT,
    REMAINING_ANNOTATION,
};

/// One orphan and what the pass knows about it.
pub(super) struct Target<'a> {
    pub(super) orphan: &'a Orphan,
    pub(super) cluster: Option<&'a CaptureCluster>,
    pub(super) volume: Option<&'a PersistentVolume>,
    pub(super) job: Option<&'a Job>,
    pub(super) inv: &'a Inventory,
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
    patch_params(FIELD_MANAGER)
}

pub(super) async fn delete_job(ctx: &Context, ns: &str, name: &str) -> Result<()> {
    ctx.may_write(|| format!("delete job {ns}/{name}"))?;
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    match jobs.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(api_err(format!("delete job {ns}/{name}"))(e)),
    }
}

/// Deletes the orphan's claim (guarded by its uid, so a claim recreated
/// under the same name by a returning StatefulSet pod is not touched).
pub(super) async fn delete_claim(ctx: &Context, target: &Target<'_>) -> Result<bool> {
    let o = target.orphan;
    if !o.claim_exists {
        return Ok(false);
    }
    ctx.may_write(|| format!("delete claim {}/{}", o.namespace, o.claim))?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &o.namespace);
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
pub(super) async fn claim_in_use(client: &kube::Client, ns: &str, claim: &str) -> Result<bool> {
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
pub(super) async fn release(ctx: &Context, target: &Target<'_>) -> Result<()> {
    ctx.may_write(|| format!("release volume {}", target.volume_name()))?;
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
    let deleted = delete_claim(ctx, target).await?;
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
pub(super) async fn rebind_volume(ctx: &Context, target: &Target<'_>) -> Result<()> {
    ctx.may_write(|| format!("rebind volume {}", target.volume_name()))?;
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

pub(super) async fn start_job(ctx: &Context, config: &Config, target: &Target<'_>) -> Result<()> {
    ctx.may_write(|| format!("start flush job for {}", target.volume_name()))?;
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
pub(super) async fn finish(
    ctx: &Context,
    target: &Target<'_>,
    orphaned_for: Duration,
) -> Result<()> {
    ctx.may_write(|| format!("hand back volume {}", target.volume_name()))?;
    let (Some(pv), Some(job)) = (target.volume, target.job) else {
        // No PV left to flip: just clear the Job.
        if let Some(job) = target.job {
            delete_job(ctx, &target.orphan.namespace, &job.name_any()).await?;
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
    delete_claim(ctx, target).await?;
    let job_name = job.name_any();
    let node = job_node(target.inv, &o.namespace, &job_name);
    delete_job(ctx, &o.namespace, &job_name).await?;
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

pub(super) async fn record_failure(
    ctx: &Context,
    target: &Target<'_>,
    now: jiff::Timestamp,
) -> Result<()> {
    ctx.may_write(|| format!("record failure on {}", target.volume_name()))?;
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
    delete_job(ctx, &o.namespace, &job_name).await?;
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
pub(super) async fn report(ctx: &Context, target: &Target<'_>, why: &str) {
    let o = target.orphan;
    let note = format!(
        "volume {} (claim {}/{}) may hold events and cannot be drained: {why}",
        target.volume_name(),
        o.namespace,
        o.claim
    );
    warn!(volume = target.volume_name(), claim = %o.claim, namespace = %o.namespace, why, "orphaned volume cannot be drained");
    if let Some(pv) = target.volume {
        let mut reference = pv.object_ref(&());
        // Events of cluster-scoped objects live in `default`.
        reference.namespace = None;
        ctx.publish_on(
            &reference,
            EventType::Warning,
            "VolumeUnrecoverable",
            "Inspect",
            note.clone(),
        )
        .await;
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
