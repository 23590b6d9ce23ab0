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
//! The pod does not turn ready until it has read back `Retain` and
//! `clean=false` on its PV: a pod that cannot guard its volume (API timeout,
//! missing RBAC, an admission denial) stays unready and retries with backoff,
//! because a volume left `Delete` from an earlier clean drain would be deleted
//! with acknowledged events. Without `--volume-claim` (local runs) the guard
//! only logs.

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

    /// Called before the pod turns ready: makes the volume `Retain` and
    /// `clean=false`, then reads both back. `Err` says why it is not guarded
    /// yet; the caller stays unready and tries again.
    pub async fn before_ready(&self, volume_id: &str) -> Result<(), String> {
        let Some(k) = &self.k8s else {
            tracing::info!("volume guard: local buffer, no PersistentVolume to retain");
            return Ok(());
        };
        let patch = json!({
            "metadata": {"annotations": {
                CLEAN_ANNOTATION: "false",
                VOLUME_ID_ANNOTATION: volume_id,
            }},
            "spec": {"persistentVolumeReclaimPolicy": "Retain"},
        });
        let pv = k.patch_pv(patch, "Retain").await?;
        let policy = pv
            .spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
            .unwrap_or("");
        let clean = pv
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CLEAN_ANNOTATION))
            .map(String::as_str)
            .unwrap_or("");
        if policy == "Retain" && clean == "false" {
            Ok(())
        } else {
            Err(format!(
                "volume {} reads back reclaim policy {policy:?} and clean={clean:?}",
                pv.metadata.name.unwrap_or_default()
            ))
        }
    }

    /// Called on shutdown after the drain and the seal: `remaining` is what
    /// keeps the volume from being clean (events, dead letters, quarantined
    /// files), 0 only when the sealed buffer was marked clean.
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
            if let Err(e) = k.patch_pv(patch, "Delete").await {
                tracing::warn!(error = %e, "volume stays Retain; the operator will find it clean and release it");
            }
        } else {
            let patch = json!({
                "metadata": {"annotations": {
                    CLEAN_ANNOTATION: "false",
                    REMAINING_ANNOTATION: remaining.to_string(),
                }},
                "spec": {"persistentVolumeReclaimPolicy": "Retain"},
            });
            if let Err(e) = k.patch_pv(patch, "Retain").await {
                tracing::warn!(error = %e, "could not record the remaining events on the volume; it stays Retain");
            }
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

    /// Patches the PV behind the claim and returns it as the API server wrote it.
    async fn patch_pv(
        &self,
        patch: serde_json::Value,
        policy: &str,
    ) -> Result<PersistentVolume, String> {
        let (namespace, claim) = (&self.namespace, &self.claim);
        let pv = match self.volume_name().await {
            Ok(pv) if !pv.is_empty() => pv,
            Ok(_) => return Err(format!("claim {namespace}/{claim} is not bound yet")),
            Err(e) => return Err(log_failure(&e, namespace, claim, "read the claim")),
        };
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        match pvs
            .patch(&pv, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(written) => {
                tracing::info!(%namespace, %claim, volume = %pv, policy, "volume reclaim policy set");
                Ok(written)
            }
            Err(e) => Err(log_failure(
                &e,
                namespace,
                claim,
                "patch the PersistentVolume",
            )),
        }
    }
}

/// Logs a failed API call and returns the reason, for `/readyz`.
fn log_failure(e: &kube::Error, namespace: &str, claim: &str, what: &str) -> String {
    let forbidden = matches!(e, kube::Error::Api(s) if s.code == 403);
    if forbidden {
        tracing::warn!(%namespace, %claim, error = %e, "missing permission to {what}");
        format!("missing permission to {what} for claim {namespace}/{claim}")
    } else {
        tracing::warn!(%namespace, %claim, error = %e, "could not {what}");
        format!("could not {what} for claim {namespace}/{claim}: {e}")
    }
}
