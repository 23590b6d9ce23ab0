//! Flush Jobs and recovery claims as both controllers see them: their
//! names (deterministic per volume, so there is one at most), labels and
//! annotations, and the state of a Job from its status. Pure; the cluster
//! controller counts Jobs for status with it, orphan recovery drives them.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::PersistentVolume;

use crate::api::{CLUSTER_LABEL, COMPONENT_LABEL, MANAGED_BY_LABEL, NAME_LABEL};

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

/// The flush Job's name for PV `volume`: `hf-flush-<volume>`, shortened
/// with a hash when too long (a Job name must fit a label value).
pub fn flush_job_name(volume: &str) -> String {
    bounded_name("hf-flush-", volume)
}

/// Labels of flush Jobs and their pods (and recovery claims): not the
/// capture selector, so no Service, PodDisruptionBudget or StatefulSet
/// selects them.
pub fn flush_labels(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_string(), "holdfast".to_string()),
        (COMPONENT_LABEL.to_string(), FLUSH_COMPONENT.to_string()),
        (CLUSTER_LABEL.to_string(), cluster.to_string()),
        (
            MANAGED_BY_LABEL.to_string(),
            "holdfast-operator".to_string(),
        ),
    ])
}

/// The recovery claim's name for PV `volume`: `hf-recover-<volume>`,
/// shortened with a hash when too long.
pub fn recovery_claim_name(volume: &str) -> String {
    bounded_name("hf-recover-", volume)
}

/// Whether `volume`'s claimRef already names `namespace/claim`.
pub fn pre_bound_to(volume: &PersistentVolume, namespace: &str, claim: &str) -> bool {
    volume
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .is_some_and(|r| {
            r.namespace.as_deref() == Some(namespace) && r.name.as_deref() == Some(claim)
        })
}

/// Where a flush Job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Still running (or waiting to).
    Active,
    /// The buffer was seen empty: the volume may be released.
    Succeeded,
    /// Gave up (flush timeout, pod failures, deadline).
    Failed,
}

/// The state of a flush Job from its status.
pub fn job_state(job: &Job) -> JobState {
    let Some(status) = job.status.as_ref() else {
        return JobState::Active;
    };
    let condition = |type_: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == type_ && c.status == "True")
    };
    if status.succeeded.unwrap_or(0) > 0 || condition("Complete") {
        JobState::Succeeded
    } else if condition("Failed") {
        JobState::Failed
    } else {
        JobState::Active
    }
}

/// How long a finished Job ran, from its status.
pub fn job_duration(job: &Job) -> Option<std::time::Duration> {
    let status = job.status.as_ref()?;
    let start = status.start_time.as_ref()?.0;
    let end = status.completion_time.as_ref().map(|t| t.0).or_else(|| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.status == "True" && (c.type_ == "Failed" || c.type_ == "Complete"))
            .and_then(|c| c.last_transition_time.as_ref().map(|t| t.0))
    })?;
    let span = end.duration_since(start);
    std::time::Duration::try_from(span).ok()
}

/// Why a failed Job failed (its `Failed` condition), for Events.
pub fn job_failure(job: &Job) -> String {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Failed"))
        .map(|c| {
            format!(
                "{}: {}",
                c.reason.as_deref().unwrap_or("Failed"),
                c.message.as_deref().unwrap_or("")
            )
        })
        .unwrap_or_else(|| "failed".into())
}
