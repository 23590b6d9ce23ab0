//! The pod's own PersistentVolume. Invariant 4: a volume holding undelivered
//! events stays `Retain`; only a pod that has just seen its buffer empty may
//! flip it to `Delete`.
//!
//! This is the hook point. Without Kubernetes wiring (`VolumeGuard::local`),
//! it only records and logs; the orphan-recovery work fills in the PV patches
//! (Retain before ready, Delete after a clean drain).

/// Guards the volume under the buffer.
#[derive(Debug, Clone, Default)]
pub struct VolumeGuard {
    _private: (),
}

impl VolumeGuard {
    /// A guard for a buffer that is not on a Kubernetes volume (local runs, tests).
    pub fn local() -> Self {
        Self::default()
    }

    /// Called before the pod turns ready: the volume must be `Retain` from here on.
    pub async fn before_ready(&self) {
        tracing::info!("volume guard: local buffer, no PersistentVolume to retain");
    }

    /// Called on shutdown after the drain: `remaining` events are still buffered.
    pub async fn after_drain(&self, remaining: u64) {
        if remaining == 0 {
            tracing::info!("volume guard: buffer drained and marked clean; volume may be released");
        } else {
            tracing::warn!(
                remaining,
                "volume guard: buffer not empty; volume must stay Retain"
            );
        }
    }
}
