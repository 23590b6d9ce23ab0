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
//! cluster controller from the Jobs ([`crate::flush::job_state`]).

pub mod job;
pub mod rebind;

pub use crate::classify as find;
pub use crate::flush::{
    CLAIM_ANNOTATION, FAILED_AT_ANNOTATION, FAILURES_ANNOTATION, FLUSH_COMPONENT,
    REMAINING_ANNOTATION, VOLUME_ANNOTATION, bounded_name,
};

pub mod metrics;
mod steps;
mod trigger;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::{debug, info, warn};

use crate::runtime::{Context, Error, Result};

use find::{Inventory, Orphan, Situation, Step};
pub use metrics::{OrphanMetrics, ResultLabel};
use steps::Target;

/// Name of this loop in metrics and logs.
pub const CONTROLLER: &str = "orphans";
/// Field manager of the loop's merge patches.
pub(crate) const FIELD_MANAGER: &str = "holdfast-operator-orphans";

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
    /// Unrecoverable volumes already reported, with the reason given.
    reported: BTreeMap<String, String>,
    /// Phases of each orphan's recovery already timed.
    timed: HashMap<String, BTreeSet<&'static str>>,
}

impl Memory {
    /// Whether `why` is news for the volume `key`: never reported, or
    /// reported for another reason (its cluster was gone, and is now back
    /// as another instance, say). Records it.
    fn report_news(&mut self, key: String, why: &str) -> bool {
        if self.reported.get(&key).is_some_and(|last| last == why) {
            return false;
        }
        self.reported.insert(key, why.to_owned());
        true
    }

    /// Records phase `phase` of `orphan` once, `since` its detection.
    fn phase(&mut self, ctx: &Context, orphan: &Orphan, phase: &'static str, since: Duration) {
        if self.timed.entry(orphan.key()).or_default().insert(phase) {
            ctx.metrics.orphans.phase(phase, since);
            ctx.metrics
                .clusters
                .phase(&orphan.namespace, &orphan.cluster, phase, since);
        }
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
    let (wake, watches) = trigger::spawn(ctx.client.clone(), config.namespace.clone());
    info!(interval_secs = config.interval.as_secs_f64(), namespace = ?config.namespace, "orphan recovery running (watch-driven, periodic resync)");
    loop {
        let next = {
            let _timer = ctx.metrics.reconcile(CONTROLLER);
            match pass(&ctx, &config, &mut memory).await {
                Ok(next) => next,
                Err(e) => {
                    ctx.metrics.reconcile_failed(CONTROLLER, e.reason());
                    warn!(reason = e.reason(), error = %e, "orphan recovery pass failed");
                    None
                }
            }
        };
        // The next pass: on any change (coalesced for a moment), when a
        // waiting orphan's timer runs out, or at the resync interval.
        let sleep = next.map_or(config.interval, |d| d.min(config.interval));
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(sleep) => {}
            () = wake.notified() => tokio::time::sleep(COALESCE).await,
        }
    }
    watches.abort();
}

/// How long a pass waits after a change for the changes that come with it.
const COALESCE: Duration = Duration::from_millis(150);

/// One pass; returns how soon a waiting orphan's timer runs out, if any.
async fn pass(ctx: &Context, config: &Config, memory: &mut Memory) -> Result<Option<Duration>> {
    let inv = crate::runtime::inventory(&ctx.client, config.namespace.as_deref()).await?;
    let findings = find::find(&inv);
    let cluster_of = |ns: &str, name: &str| {
        inv.clusters
            .iter()
            .find(|c| c.namespace().as_deref() == Some(ns) && c.name_any() == name)
    };

    for stop in &findings.stop {
        let result = steps::delete_job(ctx, &stop.namespace, &stop.job).await;
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
            Err(e) => failed(
                ctx,
                &format!("job {}/{}", stop.namespace, stop.job),
                (&stop.namespace, &stop.cluster),
                &e,
            ),
        }
    }

    let now_instant = Instant::now();
    let now = jiff::Timestamp::now();
    let keys: BTreeSet<String> = findings.orphans.iter().map(Orphan::key).collect();
    memory.first_seen.retain(|k, _| keys.contains(k));
    memory.reported.retain(|k, _| keys.contains(k));
    memory.timed.retain(|k, _| keys.contains(k));
    let mut next: Option<Duration> = None;
    let mut active = find::active_jobs(&inv.jobs);
    let mut holding = 0i64;
    let mut unrecoverable = 0i64;
    let mut tally = metrics::Tally::new(&inv);
    for orphan in &findings.orphans {
        let key = orphan.key();
        let first_seen = *memory.first_seen.entry(key.clone()).or_insert(now_instant);
        let orphaned_for = now_instant.duration_since(first_seen);
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
                orphaned_for,
                now,
                slot_free: running < max,
            },
        );
        tally.orphan(orphan, volume, &step, orphaned_for);
        let target = Target {
            orphan,
            cluster,
            volume,
            job,
            inv: &inv,
        };
        if let Some(job) = job
            && flush_pod_running(&inv, &orphan.namespace, &job.name_any())
        {
            memory.phase(ctx, orphan, "pod_running", orphaned_for);
        }
        let result = match &step {
            Step::Wait(why) => {
                debug!(volume = ?orphan.volume, claim = %orphan.claim, kind = orphan.kind.as_str(), why, "orphan waits");
                if let Some(wait) = find::wait_left(orphan, cluster, volume, orphaned_for, now) {
                    next = Some(next.map_or(wait, |n| n.min(wait)));
                }
                Ok(())
            }
            Step::Release => steps::release(ctx, &target).await,
            Step::Rebind => steps::rebind_volume(ctx, &target).await,
            Step::StartJob => {
                let started = steps::start_job(ctx, config, &target).await;
                if started.is_ok() {
                    *active.entry(slot).or_insert(0) += 1;
                    memory.phase(ctx, orphan, "job_created", orphaned_for);
                }
                started
            }
            Step::Finish => {
                memory.phase(ctx, orphan, "drained", orphaned_for);
                steps::finish(ctx, &target, orphaned_for).await
            }
            Step::RecordFailure => steps::record_failure(ctx, &target, now).await,
            Step::Report(why) => {
                unrecoverable += 1;
                if memory.report_news(orphan.key(), why) {
                    steps::report(ctx, &target, why).await;
                }
                Ok(())
            }
        };
        match result {
            Ok(()) => {
                if matches!(step, Step::Finish | Step::Release) {
                    memory.phase(ctx, orphan, "released", orphaned_for);
                    memory.first_seen.remove(&key);
                    memory.timed.remove(&key);
                }
            }
            Err(e) => failed(ctx, &key, (&orphan.namespace, &orphan.cluster), &e),
        }
    }
    let m = &ctx.metrics.orphans;
    m.orphaned_volumes.set(holding);
    m.unrecoverable_volumes.set(unrecoverable);
    m.active_flush_jobs
        .set(i64::from(active.values().copied().sum::<u32>()));
    ctx.metrics.clusters.publish(tally.figures());
    Ok(next)
}

/// Whether a pod of flush Job `job` runs now.
fn flush_pod_running(inv: &Inventory, ns: &str, job: &str) -> bool {
    inv.pods.iter().any(|p| {
        p.namespace().as_deref() == Some(ns)
            && p.labels()
                .get("batch.kubernetes.io/job-name")
                .map(String::as_str)
                == Some(job)
            && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
}

/// A failed step of a cluster's recovery: logged and counted; the next pass
/// retries (a conflict is another writer landing first, and is expected).
fn failed(ctx: &Context, what: &str, (namespace, cluster): (&str, &str), e: &Error) {
    if namespace_terminating(e) {
        // Kubernetes refuses new claims and Jobs in a namespace being
        // deleted; the cluster's deletion says so (`Draining` condition
        // `NamespaceTerminating`, Events on the PVs) and how to unblock.
        debug!(target = %what, error = %e, "namespace is being deleted: no recovery there");
        return;
    }
    ctx.metrics
        .cluster_failed(CONTROLLER, e.reason(), namespace, cluster);
    if e.reason() == "conflict" {
        debug!(target = %what, error = %e, "orphan step raced another writer; retrying next pass");
    } else {
        warn!(target = %what, reason = e.reason(), error = %e, "orphan step failed; retrying next pass");
    }
}

/// Whether `e` is the API server refusing new content in a namespace that
/// is being deleted.
fn namespace_terminating(e: &Error) -> bool {
    matches!(
        e,
        Error::Api {
            source: kube::Error::Api(status),
            ..
        } if status.code == 403 && status.message.contains("because it is being terminated")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_by_a_terminating_namespace_is_recognised() {
        let refused = |message: &str| Error::Api {
            what: "create claim".into(),
            source: kube::Error::Api(
                serde_json::from_value(serde_json::json!({
                    "status": "Failure", "message": message, "reason": "Forbidden", "code": 403,
                }))
                .unwrap(),
            ),
        };
        assert!(namespace_terminating(&refused(
            "persistentvolumeclaims \"x\" is forbidden: unable to create new content in namespace ns because it is being terminated"
        )));
        assert!(!namespace_terminating(&refused(
            "persistentvolumeclaims is forbidden: User \"op\" cannot create resource"
        )));
    }

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
    fn an_unrecoverable_volume_is_reported_again_only_for_a_new_reason() {
        let mut memory = Memory::default();
        let gone = "its CaptureCluster ns/events is gone";
        let previous = "it was written by a previous instance of CaptureCluster ns/events";
        assert!(memory.report_news("pv/a".into(), gone));
        assert!(!memory.report_news("pv/a".into(), gone), "once per reason");
        // The cluster came back as another instance: the reason changed.
        assert!(memory.report_news("pv/a".into(), previous));
        assert!(!memory.report_news("pv/a".into(), previous));
        assert!(memory.report_news("pv/b".into(), previous), "per volume");
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
