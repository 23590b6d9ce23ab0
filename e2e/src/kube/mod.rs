//! A real Kubernetes control plane for tests, and the harness around it.
//!
//! [`Harness::start`] brings up etcd, kube-apiserver (RBAC), the
//! controller-manager and the scheduler from the binaries `e2e/bins.sh`
//! builds ([`control_plane`]), creates the test StorageClass and starts its
//! provisioner ([`storage`]), and starts the node agent
//! ([`crate::agent`]) that runs Holdfast pods as local processes. [`shared`]
//! gives every test of a test binary the same harness; each test works in its
//! own namespace ([`Harness::namespace`]).
//!
//! Everything the harness starts runs on its own runtime
//! ([`process::runtime`]) and dies with the test process (see [`process`]).
//! Tests make their clients with [`Harness::client`] in their own runtime.

pub mod control_plane;
pub mod pki;
pub mod process;
pub mod storage;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ::kube::Client;
use ::kube::api::{Api, PostParams};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub use control_plane::{ControlPlane, bin_dir, kubernetes_version};

use crate::agent::{AgentConfig, NodeAgent};
use storage::Provisioner;

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The control plane failed.
    #[error("control plane: {0}")]
    ControlPlane(#[from] control_plane::Error),
    /// The storage provisioner failed.
    #[error("storage: {0}")]
    Storage(#[from] storage::Error),
    /// The node agent failed.
    #[error("node agent: {0}")]
    Agent(#[from] crate::agent::Error),
    /// A request failed.
    #[error("{what}: {source}")]
    Api {
        /// What was attempted.
        what: String,
        /// Why.
        source: ::kube::Error,
    },
    /// Something did not happen in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The harness task panicked.
    #[error("harness task failed: {0}")]
    Task(String),
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Polls `check` every 100 ms until it returns `Some`, or fails after
/// `timeout` naming `what`.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How to start a harness.
#[derive(Debug, Clone)]
pub struct HarnessConfig {
    /// Nodes the agent registers (default: two, `holdfast-node-1` and
    /// `holdfast-node-2`, so node affinity of local volumes is observable).
    pub nodes: Vec<String>,
    /// Where pod binaries are looked up (default: [`AgentConfig::default_bin_dir`]).
    pub pod_bin_dir: Option<PathBuf>,
    /// Images the agent runs (default `holdfast/`).
    pub image_prefix: String,
}

impl Default for HarnessConfig {
    fn default() -> Self {
        Self {
            nodes: vec!["holdfast-node-1".into(), "holdfast-node-2".into()],
            pod_bin_dir: None,
            image_prefix: "holdfast/".into(),
        }
    }
}

/// A control plane, the test storage and the node agent.
#[derive(Debug)]
pub struct Harness {
    dir: PathBuf,
    agent: NodeAgent,
    provisioner: Provisioner,
    control_plane: ControlPlane,
}

impl Harness {
    /// Starts a harness on the harness runtime; callable from any runtime.
    pub async fn start(config: HarnessConfig) -> Result<Self> {
        process::runtime()
            .spawn(Self::start_here(config))
            .await
            .map_err(|e| Error::Task(e.to_string()))?
    }

    async fn start_here(config: HarnessConfig) -> Result<Self> {
        let dir = control_plane::new_run_dir()?;
        let control_plane = ControlPlane::start(&dir).await?;
        let client = control_plane.client().map_err(Error::ControlPlane)?;
        storage::ensure_storage_class(&client).await?;
        let volumes = dir.join("volumes");
        let provisioner = Provisioner::start(client.clone(), volumes);
        let agent = NodeAgent::start(
            client.clone(),
            AgentConfig {
                nodes: config.nodes.clone(),
                bin_dir: config
                    .pod_bin_dir
                    .clone()
                    .unwrap_or_else(AgentConfig::default_bin_dir),
                image_prefix: config.image_prefix.clone(),
                state_dir: dir.clone(),
                api_host: "127.0.0.1".into(),
                api_port: control_plane.api_port(),
            },
        )
        .await?;
        // The TaintNodesByCondition admission plugin taints new nodes
        // not-ready; the node controller lifts it once it sees Ready.
        let nodes: Api<Node> = Api::all(client.clone());
        for node in &config.nodes {
            poll_until(
                &format!("node {node} schedulable"),
                Duration::from_secs(60),
                || async {
                    let n = nodes.get(node).await.ok()?;
                    let tainted = n
                        .spec
                        .and_then(|s| s.taints)
                        .unwrap_or_default()
                        .iter()
                        .any(|t| t.key.starts_with("node.kubernetes.io/"));
                    (!tainted).then_some(())
                },
            )
            .await?;
        }
        Ok(Self {
            dir,
            agent,
            provisioner,
            control_plane,
        })
    }

    /// A new admin client bound to the calling runtime.
    pub fn client(&self) -> Result<Client> {
        Ok(self.control_plane.client()?)
    }

    /// The control plane (URL, kubeconfig, clients for other identities).
    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    /// The node agent (chaos helpers, pod directories and pids).
    pub fn agent(&self) -> &NodeAgent {
        &self.agent
    }

    /// This harness's directory (logs, PKI, volumes, pods).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where provisioned volumes live on the host.
    pub fn volumes_dir(&self) -> PathBuf {
        self.dir.join("volumes")
    }

    /// Every pid the harness runs: control-plane components and pod processes.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = self.control_plane.pids();
        pids.extend(self.agent.all_pids());
        pids
    }

    /// A `helm` command (the pinned binary from [`bin_dir`]) that talks to
    /// this cluster as the admin, with helm's cache, config and data
    /// directories inside the harness directory.
    pub fn helm(&self) -> Result<tokio::process::Command> {
        let helm = bin_dir()?.join("helm");
        if !helm.is_file() {
            return Err(control_plane::Error::MissingBinary {
                binary: "helm".into(),
                dir: helm.parent().unwrap_or(Path::new("")).display().to_string(),
            }
            .into());
        }
        let home = self.dir.join("helm");
        let mut command = tokio::process::Command::new(helm);
        command
            .env("KUBECONFIG", self.control_plane.kubeconfig())
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .kill_on_drop(true);
        Ok(command)
    }

    /// Creates a namespace `<prefix>-<random>` and waits until its `default`
    /// ServiceAccount and `kube-root-ca.crt` ConfigMap exist (pods need both).
    pub async fn namespace(&self, prefix: &str) -> Result<String> {
        let client = self.client()?;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("{prefix}-{}", &suffix[..8]);
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await
            .map_err(|source| Error::Api {
                what: format!("create namespace {name}"),
                source,
            })?;
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &name);
        poll_until(
            &format!("default service account and root CA in {name}"),
            Duration::from_secs(60),
            || async {
                let sa = sas.get_opt("default").await.ok().flatten();
                let ca = cms.get_opt("kube-root-ca.crt").await.ok().flatten();
                (sa.is_some() && ca.is_some()).then_some(())
            },
        )
        .await?;
        Ok(name)
    }

    /// Stops the agent (pod processes killed), the provisioner and the
    /// control plane, and removes the harness directory. Returns once every
    /// process has been reaped.
    pub async fn stop(self) {
        let Self {
            dir,
            agent,
            provisioner,
            mut control_plane,
        } = self;
        let task = process::runtime().spawn(async move {
            agent.shutdown().await;
            drop(agent);
            drop(provisioner);
            let _ = tokio::task::spawn_blocking(move || {
                control_plane.stop();
                drop(control_plane);
                let _ = std::fs::remove_dir_all(&dir);
            })
            .await;
        });
        let _ = task.await;
    }
}

/// The harness shared by every test of this test binary, started on first
/// use. It lives until the test process exits (its processes die with it).
pub async fn shared() -> &'static Harness {
    static SHARED: tokio::sync::OnceCell<Harness> = tokio::sync::OnceCell::const_new();
    SHARED
        .get_or_init(|| async {
            match Harness::start(HarnessConfig::default()).await {
                Ok(harness) => harness,
                Err(e) => panic!("cannot start the shared Kubernetes harness: {e}"),
            }
        })
        .await
}
