//! Shared by the `operator_*` tests: install the committed CRD and the
//! operator's least-privilege RBAC, and run `holdfast-operator run` as a
//! child process under a ServiceAccount bound to exactly that ClusterRole
//! (its kubeconfig holds nothing but that ServiceAccount's token).

#![allow(dead_code)]

pub mod scene;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use holdfast_e2e::agent::AgentConfig;
use holdfast_e2e::kube::process::Process;
use holdfast_e2e::kube::{Harness, poll_until};
use holdfast_operator::api::CaptureCluster;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use nix::sys::signal::Signal;
use serde_json::json;

/// Generous deadline for anything the control plane does.
pub const TIMEOUT: Duration = Duration::from_secs(120);

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "holdfast_e2e=info".into()),
        )
        .with_test_writer()
        .try_init();
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = AgentConfig::default_bin_dir().join(name);
    ensure!(
        path.is_file(),
        "{} is missing: build the workspace binaries first (`cargo build --bins`, `make build`)",
        path.display()
    );
    Ok(path)
}

/// Installs the CRD from `crds/` (the committed, generated file) and the
/// ClusterRole from `operator/rbac/`, once per harness; waits until the CRD
/// is established.
pub async fn install_cluster_wide(client: &Client) -> anyhow::Result<()> {
    let yaml = std::fs::read_to_string(format!("{REPO}/crds/captureclusters.holdfast.dev.yaml"))?;
    let crd: CustomResourceDefinition = serde_yaml::from_str(
        yaml.split("\n---\n")
            .find(|doc| doc.contains("kind: CustomResourceDefinition"))
            .context("no CRD in crds/")?,
    )?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply("holdfast-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await
    .context("apply the CRD")?;
    poll_until("CRD established", TIMEOUT, || async {
        let crd = crds.get(&crd.name_any()).await.ok()?;
        crd.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await?;
    let role = operator_cluster_role()?;
    Api::<ClusterRole>::all(client.clone())
        .patch(
            &role.name_any(),
            &PatchParams::apply("holdfast-e2e").force(),
            &Patch::Apply(&role),
        )
        .await
        .context("apply the operator ClusterRole")?;
    let capture: ClusterRole = serde_yaml::from_str(&std::fs::read_to_string(format!(
        "{REPO}/operator/rbac/capture-clusterrole.yaml"
    ))?)?;
    Api::<ClusterRole>::all(client.clone())
        .patch(
            &capture.name_any(),
            &PatchParams::apply("holdfast-e2e").force(),
            &Patch::Apply(&capture),
        )
        .await
        .context("apply the capture ClusterRole")?;
    // The API server serves the new resource a moment after Established.
    let api: Api<CaptureCluster> = Api::all(client.clone());
    poll_until("captureclusters served", TIMEOUT, || async {
        api.list(&Default::default()).await.ok().map(|_| ())
    })
    .await?;
    Ok(())
}

/// Creates ServiceAccount `holdfast-operator` in `ns`, binds it to the
/// operator ClusterRole and the leader-election Role, and returns a
/// kubeconfig that authenticates as it (a TokenRequest token).
pub async fn operator_identity(h: &Harness, ns: &str) -> anyhow::Result<PathBuf> {
    operator_identity_bound_to(h, ns, "holdfast-operator").await
}

/// The operator's ClusterRole from `operator/rbac/clusterrole.yaml`.
pub fn operator_cluster_role() -> anyhow::Result<ClusterRole> {
    Ok(serde_yaml::from_str(&std::fs::read_to_string(format!(
        "{REPO}/operator/rbac/clusterrole.yaml"
    ))?)?)
}

/// [`operator_identity`] bound to ClusterRole `cluster_role` instead.
pub async fn operator_identity_bound_to(
    h: &Harness,
    ns: &str,
    cluster_role: &str,
) -> anyhow::Result<PathBuf> {
    let client = h.client()?;
    let sa_name = "holdfast-operator";
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": sa_name}}))?,
    )
    .await?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("holdfast-operator-{ns}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
        "subjects": [{"kind": "ServiceAccount", "name": sa_name, "namespace": ns}],
    }))?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await?;
    let mut role: Role = serde_yaml::from_str(&std::fs::read_to_string(format!(
        "{REPO}/operator/rbac/leader-election-role.yaml"
    ))?)?;
    role.metadata.namespace = Some(ns.to_string());
    Api::<Role>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &role)
        .await?;
    let role_binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "holdfast-operator-leader-election"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role.name_any()},
        "subjects": [{"kind": "ServiceAccount", "name": sa_name, "namespace": ns}],
    }))?;
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &role_binding)
        .await?;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let token = sas
        .create_token_request(sa_name, &PostParams::default(), &request)
        .await?
        .status
        .context("token request without status")?
        .token;
    let cp = h.control_plane();
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": cp.url(),
            "certificate-authority": cp.pki().ca_cert.display().to_string(),
        }}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "operator", "namespace": ns}}],
        "current-context": "test",
    });
    let path = h.dir().join(format!("operator-{ns}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&kubeconfig)?)?;
    Ok(path)
}

/// One `holdfast-operator run` process, watching one namespace.
pub struct Operator {
    pub identity: String,
    pub metrics_addr: String,
    pub log: PathBuf,
    process: Option<Process>,
}

impl Operator {
    /// Starts an operator in `ns` under the identity of `kubeconfig`, with a
    /// short Lease (6 s, renewed 2 s before expiry) so failover is quick.
    pub fn start(h: &Harness, ns: &str, kubeconfig: &Path, identity: &str) -> anyhow::Result<Self> {
        Self::start_with_env(h, ns, kubeconfig, identity, &[])
    }

    /// [`Operator::start`] with more environment (flags as `HOLDFAST_*`).
    pub fn start_with_env(
        h: &Harness,
        ns: &str,
        kubeconfig: &Path,
        identity: &str,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let port = holdfast_e2e::kube::control_plane::free_ports::<1>()[0];
        let metrics_addr = format!("127.0.0.1:{port}");
        let log = h.dir().join(format!("operator-{ns}-{identity}.log"));
        let program = bin("holdfast-operator")?;
        let process = Process::spawn(
            format!("operator {identity}"),
            &program,
            |c| {
                c.arg("run")
                    .env_clear()
                    .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                    .env("KUBECONFIG", kubeconfig)
                    .env("HOLDFAST_WATCH_NAMESPACE", ns)
                    .env("HOLDFAST_LEASE_NAMESPACE", ns)
                    .env("HOLDFAST_OPERATOR_IDENTITY", identity)
                    .env("HOLDFAST_OPERATOR_LISTEN", &metrics_addr)
                    .env("HOLDFAST_LEASE_DURATION_SECS", "6")
                    .env("HOLDFAST_LEASE_GRACE_SECS", "2")
                    .env("HOLDFAST_LOG", "info,holdfast_operator=debug")
                    .envs(extra_env.iter().copied());
            },
            &log,
        )?;
        Ok(Self {
            identity: identity.to_string(),
            metrics_addr,
            log,
            process: Some(process),
        })
    }

    /// The operator's `/metrics` text, if it answers.
    pub async fn metrics(&self) -> Option<String> {
        let response = reqwest::get(format!("http://{}/metrics", self.metrics_addr))
            .await
            .ok()?;
        response.text().await.ok()
    }

    /// `holdfast_operator_reconciles_total{controller}`, 0 when absent.
    pub async fn reconciles(&self, controller: &str) -> Option<f64> {
        self.metric(&format!(
            "holdfast_operator_reconciles_total{{controller=\"{controller}\"}}"
        ))
        .await
    }

    /// The value of one sample (`name{labels}` as exposed), 0 when absent.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let text = self.metrics().await?;
        let prefix = format!("{sample} ");
        Some(
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0),
        )
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub async fn exited_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let process = self.process.as_mut()?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = process.try_wait() {
                self.process = None;
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether `/readyz` says it leads.
    pub async fn leads(&self) -> bool {
        reqwest::get(format!("http://{}/readyz", self.metrics_addr))
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// SIGTERM and wait for the exit (the Lease is released on the way out).
    pub async fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut process = self.process.take().context("operator already stopped")?;
        process.signal(Signal::SIGTERM);
        let status = tokio::time::timeout(Duration::from_secs(30), process.wait())
            .await
            .context("operator did not exit within 30 s of SIGTERM")??;
        Ok(status)
    }

    /// Fails when the log shows a request the API server refused for lack
    /// of permission (the ClusterRole must cover everything the code does).
    pub fn ensure_never_forbidden(&self) -> anyhow::Result<()> {
        let log = self.log_text();
        let denied: Vec<&str> = log.lines().filter(|l| l.contains("forbidden")).collect();
        ensure!(
            denied.is_empty(),
            "operator {} was refused:\n{}",
            self.identity,
            denied.join("\n")
        );
        Ok(())
    }

    /// The log so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop_blocking(Duration::from_secs(5));
        }
    }
}

pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The `status` of condition `type_` of a CaptureCluster, with its message.
pub fn condition(cc: &CaptureCluster, type_: &str) -> Option<(String, String, String)> {
    cc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}
