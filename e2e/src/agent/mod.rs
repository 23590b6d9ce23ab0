//! The node agent: plays the kubelet for one or more Nodes inside the test
//! process, running Holdfast pods as local processes.
//!
//! - Registers each Node (Ready condition, capacity, `kubernetes.io/hostname`
//!   label) and renews its Lease in `kube-node-lease` every second.
//! - Watches the pods bound to each node; a pod whose images all start with
//!   the configured prefix (`holdfast/`) runs as processes (see [`pod`]);
//!   any other pod stays Pending with a message, and is removed when deleted.
//! - Each pod gets its own loopback address (`127.1.x.y`), reported as
//!   `status.podIP`; the API server is reached at 127.0.0.1 through
//!   `KUBERNETES_SERVICE_HOST/PORT`.
//! - Volumes are host directories bind-mounted at the containers'
//!   `mountPath`s in a private mount namespace per process (`unshare --mount
//!   --propagation private`), so absolute paths — the ServiceAccount token at
//!   `/var/run/secrets/kubernetes.io/serviceaccount`, a claim at
//!   `/var/lib/holdfast` — work as in a container, and no mount is visible
//!   on the host. Mount targets are created on the host file system as
//!   empty directories if missing (there is no container root file system).
//!
//! Chaos: [`NodeAgent::kill_pod`] SIGKILLs a pod's processes (the pod
//! restarts per its policy); [`NodeAgent::stop_node`] is a node crash:
//! heartbeats stop (the node controller turns it NotReady/Unknown), the
//! node's processes are SIGKILLed and its pods are left as they are in the
//! API; [`NodeAgent::restart_node`] brings it back Ready and runs whatever
//! pods are still bound to it, like a kubelet after a reboot.

pub mod materialize;
pub mod pod;
pub mod spec;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use pod::{Pids, PodContext};

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request failed.
    #[error("{what}: {source}")]
    Api {
        /// What was attempted.
        what: String,
        /// Why.
        source: kube::Error,
    },
    /// No such node is managed by this agent.
    #[error("node {0} is not managed by this agent")]
    UnknownNode(String),
    /// No such pod is running on this agent.
    #[error("pod {0} is not running on this agent")]
    UnknownPod(String),
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The nodes to register and serve.
    pub nodes: Vec<String>,
    /// Where the binaries named by containers are looked up.
    pub bin_dir: PathBuf,
    /// Images the agent runs start with this (default `holdfast/`).
    pub image_prefix: String,
    /// Per-pod directories (volumes, logs) go under `<state_dir>/pods`.
    pub state_dir: PathBuf,
    /// API server host as seen by pods.
    pub api_host: String,
    /// API server port as seen by pods.
    pub api_port: u16,
}

impl AgentConfig {
    /// The default bin dir: `HOLDFAST_POD_BIN_DIR`, else the cargo profile
    /// directory of the running test binary (`target/debug` when it runs from
    /// `target/debug/deps`).
    pub fn default_bin_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("HOLDFAST_POD_BIN_DIR") {
            return PathBuf::from(dir);
        }
        let exe = std::env::current_exe().unwrap_or_default();
        let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.parent().map(PathBuf::from).unwrap_or(dir)
        } else {
            dir
        }
    }
}

/// A running pod as the agent tracks it.
struct PodHandle {
    namespace: String,
    name: String,
    node: String,
    updates: watch::Sender<Pod>,
    task: JoinHandle<()>,
    pids: Pids,
}

struct NodeHandle {
    tasks: Vec<JoinHandle<()>>,
}

struct Inner {
    client: Client,
    config: AgentConfig,
    nodes: Mutex<BTreeMap<String, NodeHandle>>,
    /// By pod uid.
    pods: Mutex<BTreeMap<String, PodHandle>>,
}

/// The node agent; see the module docs. Dropping it stops every node.
pub struct NodeAgent {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NodeAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAgent")
            .field("nodes", &self.inner.config.nodes)
            .finish()
    }
}

/// The next pod address: 127.1.0.2, 127.1.0.3, ... (unique per test process).
fn next_pod_ip() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    Ipv4Addr::new(
        127,
        1 + (n / 62_500) as u8,
        ((n / 250) % 250) as u8,
        (2 + n % 250) as u8,
    )
    .to_string()
}

impl NodeAgent {
    /// Registers the configured nodes and starts serving them. Must run in
    /// the runtime that should own the agent's tasks (the harness runtime).
    pub async fn start(client: Client, config: AgentConfig) -> Result<Self> {
        let agent = Self {
            inner: Arc::new(Inner {
                client,
                config,
                nodes: Mutex::new(BTreeMap::new()),
                pods: Mutex::new(BTreeMap::new()),
            }),
        };
        for node in agent.inner.config.nodes.clone() {
            agent.restart_node(&node).await?;
        }
        Ok(agent)
    }

    /// The nodes this agent serves.
    pub fn nodes(&self) -> &[String] {
        &self.inner.config.nodes
    }

    /// The directory of a pod (volumes, `<container>.log`), if it runs here.
    pub fn pod_dir(&self, namespace: &str, name: &str) -> Option<PathBuf> {
        let pods = self.inner.pods.lock().expect("pods lock");
        pods.iter()
            .find(|(_, p)| p.namespace == namespace && p.name == name)
            .map(|(uid, p)| self.inner.pod_dir(&p.namespace, &p.name, uid))
    }

    /// The pids of a pod's running containers, by container name.
    pub fn pod_pids(&self, namespace: &str, name: &str) -> BTreeMap<String, u32> {
        let pods = self.inner.pods.lock().expect("pods lock");
        pods.values()
            .filter(|p| p.namespace == namespace && p.name == name)
            .flat_map(|p| p.pids.lock().expect("pids lock").clone())
            .collect()
    }

    /// Every pid of every pod process the agent runs.
    pub fn all_pids(&self) -> Vec<u32> {
        let pods = self.inner.pods.lock().expect("pods lock");
        pods.values()
            .flat_map(|p| {
                p.pids
                    .lock()
                    .expect("pids lock")
                    .values()
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// SIGKILLs every process of the pod (a crash); the pod's restart policy
    /// decides what happens next.
    pub fn kill_pod(&self, namespace: &str, name: &str) -> Result<()> {
        let pids = self.pod_pids(namespace, name);
        if pids.is_empty() {
            return Err(Error::UnknownPod(format!("{namespace}/{name}")));
        }
        for pid in pids.values() {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
        Ok(())
    }

    /// A node crash: heartbeats stop, its processes are SIGKILLed, its pods
    /// are no longer served until [`Self::restart_node`].
    pub fn stop_node(&self, node: &str) -> Result<()> {
        let handle = self
            .inner
            .nodes
            .lock()
            .expect("nodes lock")
            .remove(node)
            .ok_or_else(|| Error::UnknownNode(node.to_string()))?;
        for task in handle.tasks {
            task.abort();
        }
        let mut pods = self.inner.pods.lock().expect("pods lock");
        let uids: Vec<String> = pods
            .iter()
            .filter(|(_, p)| p.node == node)
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in uids {
            if let Some(p) = pods.remove(&uid) {
                for pid in p.pids.lock().expect("pids lock").values() {
                    let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
                }
                p.task.abort();
            }
        }
        tracing::info!(node, "node stopped");
        Ok(())
    }

    /// Registers (or re-registers) `node` as Ready and serves its pods.
    pub async fn restart_node(&self, node: &str) -> Result<()> {
        if !self.inner.config.nodes.iter().any(|n| n == node) {
            return Err(Error::UnknownNode(node.to_string()));
        }
        if self
            .inner
            .nodes
            .lock()
            .expect("nodes lock")
            .contains_key(node)
        {
            return Ok(());
        }
        self.inner.register(node).await?;
        let heartbeat = tokio::spawn(heartbeat(self.inner.clone(), node.to_string()));
        let watch = tokio::spawn(watch_pods(self.inner.clone(), node.to_string()));
        self.inner.nodes.lock().expect("nodes lock").insert(
            node.to_string(),
            NodeHandle {
                tasks: vec![heartbeat, watch],
            },
        );
        tracing::info!(node, "node serving");
        Ok(())
    }

    /// Stops every node (processes killed) and waits until every pod process
    /// has been reaped (at most ten seconds).
    pub async fn shutdown(&self) {
        let pids = self.all_pids();
        for node in self.inner.config.nodes.clone() {
            let _ = self.stop_node(&node);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline
            && pids.iter().any(|pid| crate::kube::process::pid_alive(*pid))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        for node in self.inner.config.nodes.clone() {
            let _ = self.stop_node(&node);
        }
    }
}

impl Inner {
    fn pod_dir(&self, namespace: &str, name: &str, uid: &str) -> PathBuf {
        let short: String = uid.chars().take(8).collect();
        self.config
            .state_dir
            .join("pods")
            .join(format!("{namespace}_{name}_{short}"))
    }

    fn build_node(&self, node: &str) -> Node {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node,
                "labels": {
                    "kubernetes.io/hostname": node,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "holdfast.dev/test-node": "true",
                },
            },
            "spec": {},
        }))
        .expect("static node")
    }

    fn node_status(&self, node: &str) -> serde_json::Value {
        let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::now(),
        ))
        .unwrap_or_default();
        let resources = json!({
            "cpu": "16", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi",
        });
        let cond = |t: &str, s: &str, reason: &str| {
            json!({"type": t, "status": s, "reason": reason, "message": reason,
                   "lastHeartbeatTime": now, "lastTransitionTime": now})
        };
        json!({"status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                cond("Ready", "True", "KubeletReady"),
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": node},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": node, "systemUUID": node, "bootID": uuid::Uuid::new_v4().to_string(),
                "kernelVersion": "", "osImage": "holdfast test node",
                "containerRuntimeVersion": "holdfast-agent://0.1",
                "kubeletVersion": format!("v{}", crate::kube::kubernetes_version()),
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
            },
        }})
    }

    async fn register(&self, node: &str) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        match nodes
            .create(&PostParams::default(), &self.build_node(node))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(source) => {
                return Err(Error::Api {
                    what: format!("register node {node}"),
                    source,
                });
            }
        }
        self.post_status(node).await
    }

    async fn post_status(&self, node: &str) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        nodes
            .patch_status(
                node,
                &PatchParams::default(),
                &Patch::Merge(&self.node_status(node)),
            )
            .await
            .map(|_| ())
            .map_err(|source| Error::Api {
                what: format!("node {node} status"),
                source,
            })
    }

    async fn renew_lease(&self, node: &str) -> Result<()> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let now = MicroTime(jiff::Timestamp::now());
        let owner = Api::<Node>::all(self.client.clone())
            .get(node)
            .await
            .ok()
            .and_then(|n| n.uid())
            .map(|uid| OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: node.to_string(),
                uid,
                ..Default::default()
            });
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(node.to_string()),
                namespace: Some("kube-node-lease".into()),
                owner_references: owner.map(|o| vec![o]),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.to_string()),
                lease_duration_seconds: Some(40),
                renew_time: Some(now),
                ..Default::default()
            }),
        };
        leases
            .patch(
                node,
                &PatchParams::apply("holdfast-node-agent").force(),
                &Patch::Apply(&lease),
            )
            .await
            .map(|_| ())
            .map_err(|source| Error::Api {
                what: format!("lease of node {node}"),
                source,
            })
    }
}

/// Renews the node's Lease every second and posts its status every five.
async fn heartbeat(inner: Arc<Inner>, node: String) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        if let Err(e) = inner.renew_lease(&node).await {
            tracing::debug!(node = %node, error = %e, "lease renewal failed");
        }
        if n.is_multiple_of(5)
            && let Err(e) = inner.post_status(&node).await
        {
            tracing::debug!(node = %node, error = %e, "node status failed");
        }
        n += 1;
    }
}

/// Watches the pods bound to `node` and hands each to its worker.
async fn watch_pods(inner: Arc<Inner>, node: String) {
    let pods: Api<Pod> = Api::all(inner.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = watcher(pods, config).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                inner.apply(&node, pod);
            }
            Ok(watcher::Event::Delete(pod)) => inner.forget(&pod),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
            Err(e) => tracing::debug!(node = %node, error = %e, "pod watch error"),
        }
    }
}

impl Inner {
    fn apply(self: &Arc<Self>, node: &str, pod: Pod) {
        let Some(uid) = pod.uid() else {
            return;
        };
        let mut pods = self.pods.lock().expect("pods lock");
        if let Some(handle) = pods.get(&uid) {
            let _ = handle.updates.send(pod);
            return;
        }
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let pids: Pids = Arc::default();
        let ctx = PodContext {
            client: self.client.clone(),
            bin_dir: self.config.bin_dir.clone(),
            image_prefix: self.config.image_prefix.clone(),
            pod_dir: self.pod_dir(&namespace, &name, &uid),
            host_ip: "127.0.0.1".into(),
            pod_ip: pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .filter(|ip| ip.starts_with("127.1."))
                .unwrap_or_else(next_pod_ip),
            api_host: self.config.api_host.clone(),
            api_port: self.config.api_port,
            pids: pids.clone(),
        };
        let (tx, rx) = watch::channel(pod);
        let task = tokio::spawn(pod::run(ctx, rx));
        pods.insert(
            uid,
            PodHandle {
                namespace,
                name,
                node: node.to_string(),
                updates: tx,
                task,
                pids,
            },
        );
    }

    /// The pod object is gone: stop its worker (killing any process left)
    /// and remove its directory.
    fn forget(&self, pod: &Pod) {
        let Some(uid) = pod.uid() else {
            return;
        };
        if let Some(handle) = self.pods.lock().expect("pods lock").remove(&uid) {
            for pid in handle.pids.lock().expect("pids lock").values() {
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            }
            handle.task.abort();
            let dir = self.pod_dir(&handle.namespace, &handle.name, &uid);
            // Logs stay for debugging; materialised secrets and tokens go.
            let _ = std::fs::remove_dir_all(dir.join("volumes"));
        }
    }
}
