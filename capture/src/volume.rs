//! The pod's own PersistentVolume. Invariant 4: a volume holding undelivered
//! events stays `Retain`; only a pod that has just seen its buffer empty may
//! flip it to `Delete`.
//!
//! - Before the pod turns ready: the PV behind `--volume-claim` is patched to
//!   `Retain` and annotated `holdfast.dev/clean=false`.
//! - After a clean drain on SIGTERM: `Delete` and `holdfast.dev/clean=true`.
//! - After a drain that left events: stays `Retain`, annotated with
//!   `holdfast.dev/remaining-events`.
//!
//! Missing permissions or an unreachable API server never stop the pod from
//! serving: the operator marks every Holdfast PV `Retain` too, and treats a
//! volume without `clean=true` as holding events. Without `--volume-claim`
//! (local runs) the guard only logs.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

/// Annotation: `"true"` once a pod drained the buffer and left it empty.
pub const CLEAN_ANNOTATION: &str = "holdfast.dev/clean";
/// Annotation: events left in the buffer by the last shutdown.
pub const REMAINING_ANNOTATION: &str = "holdfast.dev/remaining-events";
/// Annotation: the buffer's volume id (UUID made with the file).
pub const VOLUME_ID_ANNOTATION: &str = "holdfast.dev/volume-id";

/// Guards the volume under the buffer.
#[derive(Clone, Default)]
pub struct VolumeGuard {
    k8s: Option<Kubernetes>,
}

#[derive(Clone)]
struct Kubernetes {
    client: kube::Client,
    namespace: String,
    claim: String,
}

impl std::fmt::Debug for VolumeGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.k8s {
            Some(k) => write!(f, "VolumeGuard({}/{})", k.namespace, k.claim),
            None => write!(f, "VolumeGuard(local)"),
        }
    }
}

impl VolumeGuard {
    /// A guard for a buffer that is not on a Kubernetes volume (local runs, tests).
    pub fn local() -> Self {
        Self::default()
    }

    /// A guard for the PV bound to `claim` in `namespace`, using in-cluster
    /// config (or `KUBECONFIG`). Falls back to [`local`](Self::local), with a
    /// warning, when no Kubernetes client can be built.
    pub async fn kubernetes(namespace: String, claim: String) -> Self {
        match kube::Client::try_default().await {
            Ok(client) => Self {
                k8s: Some(Kubernetes {
                    client,
                    namespace,
                    claim,
                }),
            },
            Err(e) => {
                tracing::warn!(error = %e, %namespace, %claim, "no kubernetes client; volume reclaim policy left to the operator");
                Self::local()
            }
        }
    }

    /// Called before the pod turns ready: the volume must be `Retain` from here on.
    pub async fn before_ready(&self, volume_id: &str) {
        let Some(k) = &self.k8s else {
            tracing::info!("volume guard: local buffer, no PersistentVolume to retain");
            return;
        };
        let patch = json!({
            "metadata": {"annotations": {
                CLEAN_ANNOTATION: "false",
                VOLUME_ID_ANNOTATION: volume_id,
            }},
            "spec": {"persistentVolumeReclaimPolicy": "Retain"},
        });
        k.patch_pv(patch, "Retain").await;
    }

    /// Called on shutdown after the drain: `remaining` events are still buffered.
    pub async fn after_drain(&self, remaining: u64) {
        let Some(k) = &self.k8s else {
            if remaining == 0 {
                tracing::info!("volume guard: buffer drained and marked clean");
            } else {
                tracing::warn!(remaining, "volume guard: buffer not empty");
            }
            return;
        };
        if remaining == 0 {
            let patch = json!({
                "metadata": {"annotations": {CLEAN_ANNOTATION: "true", REMAINING_ANNOTATION: "0"}},
                "spec": {"persistentVolumeReclaimPolicy": "Delete"},
            });
            k.patch_pv(patch, "Delete").await;
        } else {
            let patch = json!({
                "metadata": {"annotations": {
                    CLEAN_ANNOTATION: "false",
                    REMAINING_ANNOTATION: remaining.to_string(),
                }},
                "spec": {"persistentVolumeReclaimPolicy": "Retain"},
            });
            k.patch_pv(patch, "Retain").await;
        }
    }
}

impl Kubernetes {
    async fn volume_name(&self) -> Result<String, kube::Error> {
        let claims: Api<PersistentVolumeClaim> =
            Api::namespaced(self.client.clone(), &self.namespace);
        let pvc = claims.get(&self.claim).await?;
        Ok(pvc.spec.and_then(|s| s.volume_name).unwrap_or_default())
    }

    async fn patch_pv(&self, patch: serde_json::Value, policy: &str) {
        let (namespace, claim) = (&self.namespace, &self.claim);
        let pv = match self.volume_name().await {
            Ok(pv) if !pv.is_empty() => pv,
            Ok(_) => {
                tracing::warn!(%namespace, %claim, "claim is not bound; nothing to patch");
                return;
            }
            Err(e) => {
                log_failure(&e, namespace, claim, "read the claim");
                return;
            }
        };
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        match pvs
            .patch(&pv, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(%namespace, %claim, volume = %pv, policy, "volume reclaim policy set")
            }
            Err(e) => log_failure(&e, namespace, claim, "patch the PersistentVolume"),
        }
    }
}

fn log_failure(e: &kube::Error, namespace: &str, claim: &str, what: &str) {
    let forbidden = matches!(e, kube::Error::Api(s) if s.code == 403);
    if forbidden {
        tracing::warn!(%namespace, %claim, error = %e, "missing permission to {what}; the pod keeps serving and the operator keeps the volume Retain");
    } else {
        tracing::warn!(%namespace, %claim, error = %e, "could not {what}; the operator keeps the volume Retain");
    }
}
