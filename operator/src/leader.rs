//! Leader election on a `coordination.k8s.io` Lease, through the
//! `kube-lease-manager` crate (server-side apply on the Lease, so two
//! candidates cannot both win). The leader renews `grace` seconds before
//! expiry; a standby takes over once the Lease has expired. Losing the
//! Lease is fatal for the process: the controllers may have work in flight,
//! and a clean restart as a standby is the safe way out.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Errors of leader election.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Lease could not be created or read.
    #[error("lease {namespace}/{name}: {source}")]
    Lease {
        /// Lease namespace.
        namespace: String,
        /// Lease name.
        name: String,
        /// Why.
        source: LeaseManagerError,
    },
    /// The election task ended before this process led.
    #[error("leader election stopped")]
    Stopped,
}

/// Settings of the election.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This candidate's identity.
    pub identity: String,
    /// Validity of the Lease without renewal.
    pub duration: Duration,
    /// Renew this long before expiry.
    pub grace: Duration,
}

/// A held (or awaited) leadership; dropping it releases the Lease.
pub struct Leadership {
    state: watch::Receiver<bool>,
    task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

impl Leadership {
    /// Joins the election; returns at once (see [`Self::acquired`]).
    pub async fn join(client: Client, config: &LeaseConfig) -> Result<Self, Error> {
        let manager = LeaseManagerBuilder::new(client, &config.name)
            .with_namespace(&config.namespace)
            .with_identity(&config.identity)
            .with_field_manager(format!("holdfast-operator-{}", config.identity))
            .with_duration(config.duration.as_secs())
            .with_grace(config.grace.as_secs())
            .build()
            .await
            .map_err(|source| Error::Lease {
                namespace: config.namespace.clone(),
                name: config.name.clone(),
                source,
            })?;
        let (state, task) = manager.watch().await;
        Ok(Self { state, task })
    }

    /// Waits until this process leads.
    pub async fn acquired(&mut self) -> Result<(), Error> {
        loop {
            if *self.state.borrow_and_update() {
                return Ok(());
            }
            self.state.changed().await.map_err(|_| Error::Stopped)?;
        }
    }

    /// Resolves when leadership is lost (or the election stopped).
    pub async fn lost(&mut self) {
        loop {
            if !*self.state.borrow_and_update() {
                return;
            }
            if self.state.changed().await.is_err() {
                return;
            }
        }
    }

    /// Releases the Lease (so a standby takes over at once) and waits for
    /// the election task to finish.
    pub async fn release(self) {
        let Self { state, task } = self;
        drop(state);
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(_))) => tracing::info!("lease released"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "lease release failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "lease task failed"),
            Err(_) => tracing::warn!("lease release timed out"),
        }
    }
}
