//! What both controllers (and the volume controller) share, below all of
//! them: the [`Context`] of a reconciliation, the one [`Error`] type and its
//! classes for metrics, the retry [`backoff`], Events, and server-side apply
//! ([`apply`]). Nothing here knows about orphans or StatefulSets, so
//! `cluster` and `orphans` depend on it and never on each other.

pub mod apply;
mod inventory;
pub mod nodes;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use tracing::warn;

use crate::api::{CaptureCluster, FIELD_MANAGER};
use crate::metrics::Metrics;

pub use apply::{apply_cluster_object, apply_object};
pub use inventory::{cluster_inventory, inventory};

/// Errors of a reconciliation or of an orphan-recovery step.
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
    /// This process lost its leader Lease: it must not write any more.
    #[error("not the leader any more: {what} not done")]
    NotLeader {
        /// The write that was skipped.
        what: String,
    },
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
            Self::NotLeader { .. } => "not_leader",
        }
    }

    /// The API server's status code, when it answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            Self::Api {
                source: kube::Error::Api(status),
                ..
            } => Some(status.code),
            _ => None,
        }
    }
}

/// Result of the controllers.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Maps a kube error to [`Error::Api`] saying what was attempted.
pub fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Api { what, source }
}

/// The delay before retrying an object after `failures` failures in a row:
/// 2 s doubling, at most five minutes.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(8);
    Duration::from_secs((2u64 << exp).min(300))
}

/// An [`Api`] on one namespace, or on all of them.
pub fn scoped<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Parameters of a non-apply patch made by `manager`.
pub fn patch_params(manager: &str) -> PatchParams {
    PatchParams {
        field_manager: Some(manager.to_string()),
        ..Default::default()
    }
}

/// Parameters of the operator's own non-apply patches (finalizers, scale to
/// zero): the same field manager as its applies.
pub fn update_params() -> PatchParams {
    patch_params(FIELD_MANAGER)
}

/// Whether this process may write: true without leader election, and while
/// it holds the Lease. Shared by every controller; the leader task clears it
/// the moment the Lease is lost, before the process exits.
#[derive(Debug, Clone)]
pub struct LeaderGate(Arc<AtomicBool>);

impl Default for LeaderGate {
    fn default() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }
}

impl LeaderGate {
    /// Whether writes are allowed now.
    pub fn leads(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Stops every later write (the Lease is lost).
    pub fn revoke(&self) {
        self.0.store(false, Ordering::SeqCst);
    }

    /// `Err(NotLeader)` when this process lost the Lease: called before each
    /// write, so a deposed leader cannot race its successor.
    pub fn check(&self, what: impl FnOnce() -> String) -> Result<()> {
        if self.leads() {
            Ok(())
        } else {
            Err(Error::NotLeader { what: what() })
        }
    }
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
    /// Cleared when the leader Lease is lost: no write after that.
    pub leader: LeaderGate,
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
            leader: LeaderGate::default(),
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

    /// `Err(NotLeader)` once the Lease is lost (see [`LeaderGate::check`]).
    pub fn may_write(&self, what: impl FnOnce() -> String) -> Result<()> {
        self.leader.check(what)
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
        self.publish_on(&cluster.object_ref(&()), type_, reason, action, note)
            .await;
    }

    /// Posts an Event on any object; a failure to post is logged.
    pub async fn publish_on(
        &self,
        reference: &k8s_openapi::api::core::v1::ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        if !self.leader.leads() {
            return;
        }
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, reference).await {
            warn!(object = ?reference.name, reason, error = %e, "cannot post event");
        }
    }
}

/// `namespace/name` of an object, for logs and failure counts.
pub fn key<K: ResourceExt>(object: &K) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
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

    #[test]
    fn a_revoked_gate_refuses_every_write() {
        let gate = LeaderGate::default();
        assert!(gate.check(|| "x".into()).is_ok());
        let other = gate.clone();
        other.revoke();
        let err = gate.check(|| "patch pv".into()).unwrap_err();
        assert_eq!(err.reason(), "not_leader");
        assert!(err.to_string().contains("patch pv"), "{err}");
    }
}
