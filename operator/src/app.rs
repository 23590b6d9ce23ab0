//! `holdfast-operator run`: the HTTP server first (so `/healthz` answers
//! while a standby waits), then leader election, then both controllers until
//! SIGTERM or lost leadership.
//!
//! Shutdown: on SIGTERM the controllers finish their running reconciliations
//! and stop, then the Lease is released so a standby takes over at once.

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use tokio::sync::watch;
use tracing::{error, info};

use crate::cluster;
use crate::config::RunArgs;
use crate::leader::{Leadership, LeaseConfig};
use crate::metrics::{self, Metrics};
use crate::runtime::Context;
use crate::{orphans, volumes};

/// Why `run` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag was refused.
    #[error(transparent)]
    Flag(#[from] crate::config::InvalidFlag),
    /// No Kubernetes client could be made.
    #[error("kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// No client configuration was found.
    #[error("kubernetes client configuration: {0}")]
    Config(String),
    /// The HTTP listener could not be bound.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Leader election failed.
    #[error(transparent)]
    Leader(#[from] crate::leader::Error),
    /// Another process took the Lease while this one led.
    #[error("lost the leader lease; exiting so a restart joins as a standby")]
    LostLease,
}

/// A client: in a pod (`KUBERNETES_SERVICE_HOST` set) the in-cluster
/// identity, else the kubeconfig (`KUBECONFIG`, `~/.kube/config`).
pub async fn client() -> Result<Client, Error> {
    let config = if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        && std::env::var_os("KUBECONFIG").is_none()
    {
        kube::Config::incluster().map_err(|e| Error::Config(e.to_string()))?
    } else {
        kube::Config::infer()
            .await
            .map_err(|e| Error::Config(e.to_string()))?
    };
    Client::try_from(config).map_err(Error::Client)
}

async fn terminate_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!(signal = "SIGTERM", "shutting down"),
        _ = tokio::signal::ctrl_c() => info!(signal = "SIGINT", "shutting down"),
    }
}

/// Runs the operator until SIGTERM/SIGINT (Ok) or lost leadership (Err).
pub async fn run(args: RunArgs) -> Result<(), Error> {
    args.validate()?;
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: args.listen,
            source,
        })?;
    info!(addr = %args.listen, "serving /metrics and /healthz");
    let router = metrics::router(metrics.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            error!(error = %e, "http server stopped");
        }
    });

    let client = client().await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let signal = tokio::spawn(async move {
        terminate_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = {
        let rx = stop_rx.clone();
        move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        }
    };

    let mut leadership = None;
    if args.leader_elect {
        let config = LeaseConfig {
            name: args.lease_name.clone(),
            namespace: args.lease_namespace(),
            identity: args.identity(),
            duration: Duration::from_secs(args.lease_duration_secs),
            grace: Duration::from_secs(args.lease_grace_secs),
        };
        info!(lease = %format!("{}/{}", config.namespace, config.name), identity = %config.identity, "waiting to lead");
        let mut joined = Leadership::join(client.clone(), &config).await?;
        tokio::select! {
            acquired = joined.acquired() => acquired?,
            () = stopped() => {
                joined.release().await;
                return Ok(());
            }
        }
        info!(identity = %config.identity, "leading");
        leadership = Some(joined);
    }
    metrics.set_ready(true);

    let reporter = Reporter {
        controller: "holdfast-operator".into(),
        instance: Some(args.identity()),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        Recorder::new(client.clone(), reporter),
        metrics.clone(),
        args.capture_cluster_role.clone(),
    ));
    let clusters = tokio::spawn(cluster::run(
        ctx.clone(),
        args.watch_namespace.clone(),
        stopped(),
    ));
    let volumes = tokio::spawn(volumes::run(
        ctx.clone(),
        args.watch_namespace.clone(),
        stopped(),
    ));
    let orphans = tokio::spawn(orphans::run(
        ctx.clone(),
        orphans::Config {
            namespace: args.watch_namespace.clone(),
            interval: Duration::from_secs(args.orphan_scan_interval_secs),
            flush_timeout_secs: args.flush_timeout_secs,
        },
        stopped(),
    ));
    let lost = async {
        match leadership.as_mut() {
            Some(l) => l.lost().await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        () = lost => {
            // Stop at once: no write after this instant (every write checks
            // the gate), and the controllers are aborted, not drained, so
            // nothing in flight races the new leader.
            ctx.leader.revoke();
            metrics.set_ready(false);
            clusters.abort();
            volumes.abort();
            orphans.abort();
            error!("lost the leader lease; stopped every controller");
            Err(Error::LostLease)
        }
        () = stopped() => Ok(()),
    };
    metrics.set_ready(false);
    // Stop the controllers (graceful on SIGTERM: running reconciliations
    // finish; already aborted after a lost Lease).
    signal.abort();
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        let _ = clusters.await;
        let _ = volumes.await;
        let _ = orphans.await;
    })
    .await;
    if let Some(l) = leadership {
        l.release().await;
    }
    result
}
