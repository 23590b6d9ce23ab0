//! The one definition of an orphan, for status and recovery alike. Pure
//! classification: from lists of CaptureClusters, claims, PVs, pods and
//! flush Jobs to the orphaned volumes and what to do about each.
//!
//! A volume is an orphan when no pod will drain it:
//! - [`OrphanKind::ClaimWithoutPod`]: a StatefulSet claim whose ordinal is
//!   not wanted any more (scaled away, or the cluster is being deleted or
//!   gone: [`wanted_replicas`] asks the resource and its StatefulSet) and
//!   that no pod uses. A claim whose pod is only missing for a
//!   moment (restart, rolling update, rescheduling) is not one: its pod
//!   comes back to it.
//! - [`OrphanKind::ReleasedVolume`]: a `Released` PV of a cluster (its claim
//!   was deleted), or one already rebound to a recovery claim.
//!
//! A volume annotated [`CLEAN_ANNOTATION`]` = "true"` holds nothing: its
//! claim is simply removed. A volume still in use by a capture pod is never
//! an orphan, and a flush Job on a claim a capture pod uses is stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::ResourceExt;

use crate::api::{
    BUFFER_VOLUME, CLEAN_ANNOTATION, CLUSTER_LABEL, CLUSTER_UID_LABEL, COMPONENT_LABEL,
    CaptureCluster, NAMESPACE_LABEL, UNKNOWN_INSTANCE,
};
use crate::flush::{
    CLAIM_ANNOTATION, FAILED_AT_ANNOTATION, FAILURES_ANNOTATION, FLUSH_COMPONENT, JobState,
    flush_job_name, job_state, pre_bound_to, recovery_claim_name,
};
use crate::runtime::backoff;

/// Everything one pass looks at (already limited to the watched namespace).
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// CaptureClusters.
    pub clusters: Vec<CaptureCluster>,
    /// Claims labelled [`CLUSTER_LABEL`] (StatefulSet and recovery claims).
    pub claims: Vec<PersistentVolumeClaim>,
    /// PVs labelled [`CLUSTER_LABEL`].
    pub volumes: Vec<PersistentVolume>,
    /// Pods labelled [`CLUSTER_LABEL`] (capture pods and flush pods).
    pub pods: Vec<Pod>,
    /// Flush Jobs (labelled component `flush`).
    pub jobs: Vec<Job>,
    /// The clusters' StatefulSets (labelled [`CLUSTER_LABEL`]).
    pub statefulsets: Vec<StatefulSet>,
}

/// Why a volume is orphaned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OrphanKind {
    /// Its claim exists but no pod uses it, nor will.
    ClaimWithoutPod,
    /// Its claim is gone (`Released` PV), or it was rebound to a recovery claim.
    ReleasedVolume,
}

impl OrphanKind {
    /// Short name for logs and Events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClaimWithoutPod => "claim-without-pod",
            Self::ReleasedVolume => "released-volume",
        }
    }
}

/// A volume no pod will drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    /// Why.
    pub kind: OrphanKind,
    /// Namespace of its claim (and of the flush Job).
    pub namespace: String,
    /// The CaptureCluster it belongs to.
    pub cluster: String,
    /// The PV; `None` for a claim that never got a volume.
    pub volume: Option<String>,
    /// The claim to mount: the existing one, or the recovery claim to make.
    pub claim: String,
    /// Whether that claim exists.
    pub claim_exists: bool,
    /// Whether the claim is bound to the volume (a Job can mount it).
    pub claim_bound: bool,
    /// Marked clean (holds nothing): only the claim needs removing.
    pub clean: bool,
}

impl Orphan {
    /// A stable key (the volume, or the claim when there is none).
    pub fn key(&self) -> String {
        match &self.volume {
            Some(v) => format!("pv/{v}"),
            None => format!("pvc/{}/{}", self.namespace, self.claim),
        }
    }
}

/// A flush Job to delete because a capture pod came back to its claim (or
/// its volume needs nothing any more).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobToStop {
    /// Namespace.
    pub namespace: String,
    /// Job name.
    pub job: String,
    /// The cluster, for Events.
    pub cluster: String,
    /// Why.
    pub reason: &'static str,
}

/// What one pass found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    /// Orphaned volumes.
    pub orphans: Vec<Orphan>,
    /// Flush Jobs to delete.
    pub stop: Vec<JobToStop>,
}

fn is_clean(pv: &PersistentVolume) -> bool {
    pv.annotations().get(CLEAN_ANNOTATION).map(String::as_str) == Some("true")
}

fn phase(pv: &PersistentVolume) -> &str {
    pv.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn is_flush(labels: &BTreeMap<String, String>) -> bool {
    labels.get(COMPONENT_LABEL).map(String::as_str) == Some(FLUSH_COMPONENT)
}

fn terminated(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn claims_used_by(pod: &Pod) -> impl Iterator<Item = &str> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.as_str())
}

/// The ordinal of StatefulSet claim `buffer-<cluster>-<n>`.
pub fn claim_ordinal(claim: &str, cluster: &str) -> Option<i32> {
    claim
        .strip_prefix(BUFFER_VOLUME)?
        .strip_prefix('-')?
        .strip_prefix(cluster)?
        .strip_prefix('-')?
        .parse()
        .ok()
}

/// Ordinals below this are wanted: their pod comes back. The largest of
/// the resource's `spec.replicas` (0 while it is being deleted or when it
/// is gone) and the StatefulSet's `spec.replicas` and `status.replicas`: a
/// scale-down the operator refused or could not apply yet, or pods of a
/// higher ordinal still running, keep their claims. Only when every source
/// agrees is an ordinal scaled away.
pub fn wanted_replicas(cluster: Option<&CaptureCluster>, sts: Option<&StatefulSet>) -> i32 {
    let resource = match cluster {
        Some(c) if c.metadata.deletion_timestamp.is_none() => c.spec.replicas,
        _ => 0,
    };
    let spec = sts
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas)
        .unwrap_or(0);
    let status = sts
        .and_then(|s| s.status.as_ref())
        .map_or(0, |s| s.replicas);
    resource.max(spec).max(status)
}

/// Classifies the inventory (see the module docs).
pub fn find(inv: &Inventory) -> Findings {
    let cluster = |ns: &str, name: &str| {
        inv.clusters
            .iter()
            .find(|c| c.namespace().as_deref() == Some(ns) && c.name_any() == name)
    };
    // (namespace, claim) used by a live capture pod / by a live flush pod.
    let mut used_by_capture = BTreeSet::new();
    let mut used_by_flush = BTreeSet::new();
    for pod in inv.pods.iter().filter(|p| !terminated(p)) {
        let ns = pod.namespace().unwrap_or_default();
        let set = if is_flush(pod.labels()) {
            &mut used_by_flush
        } else {
            &mut used_by_capture
        };
        for claim in claims_used_by(pod) {
            set.insert((ns.clone(), claim.to_string()));
        }
    }
    let volumes: BTreeMap<String, &PersistentVolume> =
        inv.volumes.iter().map(|v| (v.name_any(), v)).collect();
    let mut findings = Findings::default();
    let mut seen_volumes = BTreeSet::new();
    for claim in &inv.claims {
        let Some(cluster_name) = claim.labels().get(CLUSTER_LABEL).cloned() else {
            continue;
        };
        let ns = claim.namespace().unwrap_or_default();
        let name = claim.name_any();
        let volume = claim.spec.as_ref().and_then(|s| s.volume_name.clone());
        if let Some(v) = &volume {
            seen_volumes.insert(v.clone());
        }
        if claim.metadata.deletion_timestamp.is_some() {
            // Going away (its volume turns Released once no pod uses it).
            continue;
        }
        if used_by_capture.contains(&(ns.clone(), name.clone())) {
            continue;
        }
        let recovery = is_flush(claim.labels());
        let kind = if recovery {
            OrphanKind::ReleasedVolume
        } else {
            let owner = cluster(&ns, &cluster_name);
            let sts = inv.statefulsets.iter().find(|s| {
                s.namespace().as_deref() == Some(ns.as_str()) && s.name_any() == cluster_name
            });
            match claim_ordinal(&name, &cluster_name) {
                // Its pod comes back to it.
                Some(n) if n < wanted_replicas(owner, sts) => continue,
                Some(_) => OrphanKind::ClaimWithoutPod,
                // Not a claim of the StatefulSet's template: leave it be.
                None => continue,
            }
        };
        let pv = volume.as_ref().and_then(|v| volumes.get(v)).copied();
        let bound = claim
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Bound");
        findings.orphans.push(Orphan {
            kind,
            namespace: ns,
            cluster: cluster_name,
            volume: volume.clone(),
            claim: name,
            claim_exists: true,
            claim_bound: bound && pv.is_some(),
            // A claim that never got a volume holds nothing; a volume we
            // cannot see (not labelled yet) is assumed to hold events.
            clean: volume.is_none() || pv.is_some_and(is_clean),
        });
    }
    for pv in &inv.volumes {
        let name = pv.name_any();
        if seen_volumes.contains(&name) {
            continue;
        }
        let (Some(cluster_name), Some(ns)) = (
            pv.labels().get(CLUSTER_LABEL).cloned(),
            pv.labels().get(NAMESPACE_LABEL).cloned(),
        ) else {
            continue;
        };
        // Released, or already pre-bound to its recovery claim (Available)
        // when the claim could not be made yet.
        let prebound =
            phase(pv) == "Available" && pre_bound_to(pv, &ns, &recovery_claim_name(&name));
        if phase(pv) != "Released" && !prebound {
            continue;
        }
        let clean = is_clean(pv);
        let policy = pv
            .spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref());
        if clean && policy == Some("Delete") {
            // The storage system is deleting it.
            continue;
        }
        let claim = recovery_claim_name(&name);
        findings.orphans.push(Orphan {
            kind: OrphanKind::ReleasedVolume,
            namespace: ns,
            cluster: cluster_name,
            volume: Some(name),
            claim,
            claim_exists: false,
            claim_bound: false,
            clean,
        });
    }
    // Flush Jobs whose claim a capture pod uses again: the pod takes over
    // (the Job would hold the buffer's lock and keep the pod from starting).
    for job in &inv.jobs {
        let ns = job.namespace().unwrap_or_default();
        let Some(claim) = job.annotations().get(CLAIM_ANNOTATION) else {
            continue;
        };
        if used_by_capture.contains(&(ns.clone(), claim.clone())) {
            findings.stop.push(JobToStop {
                namespace: ns,
                job: job.name_any(),
                cluster: job.labels().get(CLUSTER_LABEL).cloned().unwrap_or_default(),
                reason: "a capture pod uses the claim again",
            });
        } else if job_state(job) != JobState::Active
            && !findings
                .orphans
                .iter()
                .any(|o| o.namespace == ns && &o.claim == claim)
        {
            findings.stop.push(JobToStop {
                namespace: ns,
                job: job.name_any(),
                cluster: job.labels().get(CLUSTER_LABEL).cloned().unwrap_or_default(),
                reason: "finished and its volume needs nothing more",
            });
        }
    }
    // A claim in use by a flush pod whose Job is gone (stopped, or being
    // deleted) must not get a second drainer: drop it until the pod is gone.
    findings.orphans.retain(|o| {
        let has_job = inv.jobs.iter().any(|j| {
            j.namespace().as_deref() == Some(o.namespace.as_str())
                && j.annotations().get(CLAIM_ANNOTATION) == Some(&o.claim)
        });
        has_job || o.clean || !used_by_flush.contains(&(o.namespace.clone(), o.claim.clone()))
    });
    findings.orphans.sort_by_key(Orphan::key);
    findings
}

/// What to do about one orphan now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing yet.
    Wait(&'static str),
    /// It holds nothing: flip the PV to `Delete` if needed, delete the claim.
    Release,
    /// A Released PV: pre-bind it to the recovery claim and create the claim.
    Rebind,
    /// Start the flush Job.
    StartJob,
    /// The Job saw the buffer empty: flip the PV to `Delete` and mark it
    /// clean, then delete the claim and the Job.
    Finish,
    /// The Job failed: count it on the PV and delete the Job (a new one
    /// starts after the backoff).
    RecordFailure,
    /// It cannot be drained; it stays `Retain` and is reported.
    Report(String),
}

/// What [`decide`] needs beyond the orphan.
#[derive(Debug, Clone)]
pub struct Situation<'a> {
    /// Its cluster, if it still exists.
    pub cluster: Option<&'a CaptureCluster>,
    /// Its PV, if visible.
    pub volume: Option<&'a PersistentVolume>,
    /// Its flush Job, if one exists.
    pub job: Option<&'a Job>,
    /// How long this process has seen it orphaned.
    pub orphaned_for: Duration,
    /// Now.
    pub now: jiff::Timestamp,
    /// Whether another flush Job of the cluster may start.
    pub slot_free: bool,
}

/// Flush Jobs failing this many times in a row make the volume count as
/// stuck (the `OrphansStuck` condition and
/// `holdfast_operator_cluster_stuck_volumes` alike).
pub const STUCK_AFTER_FAILURES: u32 = 3;

/// Failures recorded on a PV and when the last one was.
pub fn failures(volume: &PersistentVolume) -> (u32, Option<jiff::Timestamp>) {
    let n = volume
        .annotations()
        .get(FAILURES_ANNOTATION)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let at = volume
        .annotations()
        .get(FAILED_AT_ANNOTATION)
        .and_then(|v| v.parse().ok());
    (n, at)
}

/// Decides the next step for `orphan`. Pure.
pub fn decide(orphan: &Orphan, s: &Situation<'_>) -> Step {
    if let Some(job) = s.job {
        return match job_state(job) {
            // Nothing to flip until the PV is visible again.
            JobState::Succeeded if s.volume.is_none() => Step::Wait("volume not visible yet"),
            JobState::Succeeded => Step::Finish,
            JobState::Failed => Step::RecordFailure,
            JobState::Active => Step::Wait("flush job running"),
        };
    }
    let Some(cluster) = s.cluster else {
        if orphan.clean {
            // Left behind by a cluster that is gone: nothing to keep.
            return Step::Release;
        }
        return Step::Report(format!(
            "its CaptureCluster {}/{} is gone, so nothing knows where to deliver its events; it stays Retain",
            orphan.namespace, orphan.cluster
        ));
    };
    if !cluster.spec.orphan_recovery.enabled {
        if orphan.clean {
            return Step::Wait("orphan recovery disabled");
        }
        return Step::Report(format!(
            "orphan recovery is disabled (spec.orphanRecovery.enabled=false) on {}; it stays Retain",
            orphan.cluster
        ));
    }
    // A volume first bound by another instance of this cluster (deleted and
    // recreated under the same name) may hold events meant for another
    // Kafka: drained only on the cluster's explicit opt-in.
    if !orphan.clean
        && !cluster.spec.orphan_recovery.adopt_previous_volumes
        && let Some(owner) = s.volume.and_then(|v| v.labels().get(CLUSTER_UID_LABEL))
        && cluster.metadata.uid.as_ref() != Some(owner)
    {
        let writer = if owner == UNKNOWN_INSTANCE {
            // Found through its claimRef, older than this instance.
            "it may have been written by a previous instance of".to_string()
        } else {
            format!("it was written by a previous instance (uid {owner}) of")
        };
        return Step::Report(format!(
            "{writer} CaptureCluster {}/{}, which may have delivered to another Kafka; it stays Retain. To drain it into this cluster's Kafka set spec.orphanRecovery.adoptPreviousVolumes: true",
            orphan.namespace, orphan.cluster
        ));
    }
    // The delay applies to releasing clean claims too: a quick scale down
    // and up again keeps its claims.
    let delay = Duration::from_secs(cluster.spec.orphan_recovery.delay_seconds.into());
    if s.orphaned_for < delay {
        return Step::Wait("recovery delay");
    }
    if orphan.clean {
        return Step::Release;
    }
    let Some(volume) = s.volume else {
        return Step::Wait("volume not visible yet");
    };
    let (failed, failed_at) = failures(volume);
    if failed > 0
        && let Some(at) = failed_at
    {
        let retry = backoff(failed);
        let since = s.now.duration_since(at);
        if since < jiff::SignedDuration::try_from(retry).unwrap_or_default() {
            return Step::Wait("backing off after a failed flush");
        }
    }
    if orphan.kind == OrphanKind::ReleasedVolume && !orphan.claim_exists {
        return Step::Rebind;
    }
    if orphan.kind == OrphanKind::ReleasedVolume
        && !pre_bound_to(volume, &orphan.namespace, &orphan.claim)
    {
        return Step::Rebind;
    }
    if !orphan.claim_bound {
        return Step::Wait("claim not bound yet");
    }
    if !s.slot_free {
        return Step::Wait("maxParallelFlushJobs reached");
    }
    Step::StartJob
}

/// How long until a waiting orphan's timer runs out (its recovery delay,
/// or the backoff after a failed flush), so the loop wakes for it.
pub fn wait_left(
    orphan: &Orphan,
    cluster: Option<&CaptureCluster>,
    volume: Option<&PersistentVolume>,
    orphaned_for: Duration,
    now: jiff::Timestamp,
) -> Option<Duration> {
    let cluster = cluster?;
    let delay = Duration::from_secs(cluster.spec.orphan_recovery.delay_seconds.into());
    if orphaned_for < delay {
        return Some(delay - orphaned_for);
    }
    if orphan.clean {
        return None;
    }
    let (failed, at) = failures(volume?);
    let at = at.filter(|_| failed > 0)?;
    let since = Duration::try_from(now.duration_since(at)).unwrap_or_default();
    backoff(failed).checked_sub(since)
}

/// The flush Job of `orphan` among `jobs`, by its deterministic name.
pub fn job_of<'a>(orphan: &Orphan, jobs: &'a [Job]) -> Option<&'a Job> {
    let volume = orphan.volume.as_deref()?;
    let name = flush_job_name(volume);
    jobs.iter()
        .find(|j| j.name_any() == name && j.namespace().as_deref() == Some(&orphan.namespace))
}

/// Active flush Jobs per (namespace, cluster).
pub fn active_jobs(jobs: &[Job]) -> BTreeMap<(String, String), u32> {
    let mut out = BTreeMap::new();
    for job in jobs.iter().filter(|j| job_state(j) == JobState::Active) {
        let key = (
            job.namespace().unwrap_or_default(),
            job.labels().get(CLUSTER_LABEL).cloned().unwrap_or_default(),
        );
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests;
