//! Command line and environment (`HOLDFAST_*`) of `holdfast-operator`.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The Holdfast operator.
#[derive(Debug, Parser)]
#[command(name = "holdfast-operator", version, about)]
pub struct Cli {
    /// Log format; filter with `HOLDFAST_LOG` (e.g. `info,kube=warn`).
    #[arg(long, env = "HOLDFAST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controllers (with leader election), `/metrics` and `/healthz`.
    Run(RunArgs),
    /// Print the CustomResourceDefinition YAML (what `crds/` holds).
    Crd,
}

/// Flags of `run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Address of the HTTP server (`/metrics`, `/healthz`, `/readyz`).
    #[arg(long, env = "HOLDFAST_OPERATOR_LISTEN", default_value = "0.0.0.0:8081")]
    pub listen: SocketAddr,
    /// Watch only this namespace (default: every namespace).
    #[arg(long, env = "HOLDFAST_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Take a Lease before reconciling, so only one replica acts.
    #[arg(long, env = "HOLDFAST_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "HOLDFAST_LEASE_NAME", default_value = "holdfast-operator")]
    pub lease_name: String,
    /// Namespace of the leader Lease (default: the pod's namespace, else `default`).
    #[arg(long, env = "HOLDFAST_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long a Lease holds without renewal.
    #[arg(long, env = "HOLDFAST_LEASE_DURATION_SECS", default_value_t = 15)]
    pub lease_duration_secs: u64,
    /// The leader renews this long before its Lease expires.
    #[arg(long, env = "HOLDFAST_LEASE_GRACE_SECS", default_value_t = 5)]
    pub lease_grace_secs: u64,
    /// ClusterRole bound to each cluster's capture pods so they can keep
    /// their own PersistentVolume `Retain` (see `rbac/capture-clusterrole.yaml`).
    #[arg(long, env = "HOLDFAST_CAPTURE_CLUSTER_ROLE", default_value = crate::api::CAPTURE_CLUSTER_ROLE)]
    pub capture_cluster_role: String,
    /// Identity in the Lease (default: `POD_NAME`, else the host name and pid).
    #[arg(long, env = "HOLDFAST_OPERATOR_IDENTITY")]
    pub identity: Option<String>,
    /// Seconds between two passes of orphan recovery (find orphaned
    /// volumes, start and follow flush Jobs).
    #[arg(long, env = "HOLDFAST_ORPHAN_SCAN_INTERVAL_SECS", default_value_t = 5)]
    pub orphan_scan_interval_secs: u64,
    /// `holdfast-capture flush --timeout-secs` of each flush Job: how long
    /// one Job tries to empty a buffer before it fails (and is retried with
    /// backoff).
    #[arg(long, env = "HOLDFAST_FLUSH_TIMEOUT_SECS", default_value_t = 600)]
    pub flush_timeout_secs: u64,
}

/// A flag value the operator refuses at start-up.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {reason}")]
pub struct InvalidFlag {
    /// The flag.
    pub flag: &'static str,
    /// Why.
    pub reason: String,
}

impl RunArgs {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), InvalidFlag> {
        if self.lease_duration_secs < 2 {
            return Err(InvalidFlag {
                flag: "--lease-duration-secs",
                reason: "must be at least 2".into(),
            });
        }
        if self.lease_grace_secs == 0 || self.lease_grace_secs >= self.lease_duration_secs {
            return Err(InvalidFlag {
                flag: "--lease-grace-secs",
                reason: format!(
                    "must be between 1 and --lease-duration-secs ({}) exclusive",
                    self.lease_duration_secs
                ),
            });
        }
        if self.orphan_scan_interval_secs == 0 {
            return Err(InvalidFlag {
                flag: "--orphan-scan-interval-secs",
                reason: "must be at least 1".into(),
            });
        }
        if self.flush_timeout_secs < 10 {
            return Err(InvalidFlag {
                flag: "--flush-timeout-secs",
                reason: "must be at least 10".into(),
            });
        }
        if self.lease_name.is_empty() {
            return Err(InvalidFlag {
                flag: "--lease-name",
                reason: "must not be empty".into(),
            });
        }
        Ok(())
    }

    /// The Lease namespace: the flag, else the in-cluster namespace file,
    /// else `default`.
    pub fn lease_namespace(&self) -> String {
        self.lease_namespace
            .clone()
            .or_else(|| {
                std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| "default".into())
    }

    /// The identity in the Lease.
    pub fn identity(&self) -> String {
        self.identity
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "holdfast-operator".into());
                format!("{host}-{}", std::process::id())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["holdfast-operator", "run"];
        argv.extend(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(a) => a,
            Command::Crd => unreachable!(),
        }
    }

    #[test]
    fn defaults_are_valid_and_leader_election_is_on() {
        let a = args(&[]);
        assert!(a.leader_elect);
        assert!(a.validate().is_ok());
        assert!(!args(&["--leader-elect", "false"]).leader_elect);
    }

    #[test]
    fn refuses_a_grace_not_below_the_duration_naming_the_flag() {
        let err = args(&["--lease-duration-secs", "5", "--lease-grace-secs", "5"])
            .validate()
            .unwrap_err();
        assert_eq!(err.flag, "--lease-grace-secs");
    }
}
