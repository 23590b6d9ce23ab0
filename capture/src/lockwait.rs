//! Waiting for the buffer's lock without exiting.
//!
//! One process drains a buffer at a time (`flock` on the volume). A pod that
//! finds the lock held (its flush Job still draining, a replaced pod still
//! terminating on the same node) must not exit: on a kubelet that becomes
//! CrashLoopBackOff, and its back-off delays the pod long after the lock is
//! free. It waits instead, alive (`/healthz` 200) and unready (`/readyz` 503
//! "waiting for the buffer lock"), and starts as soon as the lock is free.

use std::path::Path;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;

use crate::buffer::{DirLock, Error as BufferError};

/// How often the lock is tried again.
const RETRY: Duration = Duration::from_millis(250);

/// What [`acquire`] got.
#[derive(Debug)]
pub enum Acquired {
    /// The lock: the buffer is this process's alone.
    Lock(DirLock),
    /// Told to stop before the lock came free (nothing was touched).
    Stopped,
}

/// Takes the lock of `dir`, serving probes on `listener` (a clone of the
/// pod's listening socket) while another process holds it; stops waiting
/// when `stop` resolves.
pub async fn acquire(
    dir: &Path,
    listener: &std::net::TcpListener,
    stop: impl std::future::Future<Output = ()>,
) -> crate::buffer::Result<Acquired> {
    match DirLock::acquire(dir) {
        Err(BufferError::Locked { lock, .. }) => {
            tracing::warn!(
                lock = %lock.display(),
                "the buffer is held by another process (a flush Job or a pod still \
                 terminating); waiting for it, unready"
            );
        }
        other => return other.map(Acquired::Lock),
    }
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let probes = match listener
        .try_clone()
        .and_then(tokio::net::TcpListener::from_std)
    {
        Ok(l) => Some(tokio::spawn(async move {
            let app = Router::new()
                .route("/healthz", get(|| async { "ok" }))
                .fallback(|| async {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "waiting for the buffer lock",
                    )
                });
            let _ = axum::serve(l, app)
                .with_graceful_shutdown(async {
                    let _ = done_rx.await;
                })
                .await;
        })),
        Err(e) => {
            tracing::error!(error = %e, "could not serve probes while waiting for the buffer lock");
            None
        }
    };
    tokio::pin!(stop);
    let waited = std::time::Instant::now();
    let outcome = loop {
        tokio::select! {
            _ = &mut stop => break Ok(Acquired::Stopped),
            _ = tokio::time::sleep(RETRY) => {}
        }
        match DirLock::acquire(dir) {
            Err(BufferError::Locked { .. }) => continue,
            Err(e) => break Err(e),
            Ok(lock) => {
                tracing::info!(
                    waited_ms = waited.elapsed().as_millis() as u64,
                    "buffer lock taken"
                );
                break Ok(Acquired::Lock(lock));
            }
        }
    };
    let _ = done_tx.send(());
    if let Some(probes) = probes {
        let _ = probes.await;
    }
    outcome
}
