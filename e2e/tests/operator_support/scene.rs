//! The scene of the orphan-recovery and operator-safety scenarios: a
//! namespace with an operator (child process, least-privilege RBAC) and a
//! CaptureCluster on real Kafka, a client posting throughout ([`Load`]), a
//! watch recording every PV's last state ([`watch_volumes`]), and the count
//! of every acknowledged uuid in Kafka ([`count_in_kafka`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use holdfast_e2e::kafka::KafkaBroker;
use holdfast_e2e::kube::{self as harness, Harness, poll_until, storage};
use holdfast_operator::api::{CLEAN_ANNOTATION, CLUSTER_LABEL, CaptureCluster};
use holdfast_operator::orphans::{FLUSH_COMPONENT, VOLUME_ANNOTATION};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use super::{Operator, install_cluster_wide, operator_identity, pod_ready};

pub const TOPIC: &str = "clicks";
/// Long enough for a flush Job to wait out a Kafka outage.
pub const RECOVERY: Duration = Duration::from_secs(240);

pub fn cluster(name: &str, bootstrap: &str, replicas: i32) -> anyhow::Result<CaptureCluster> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "holdfast.dev/v1alpha1",
        "kind": "CaptureCluster",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "image": "holdfast/capture:dev",
            // A second of lingering keeps a backlog in each buffer, so a
            // killed pod leaves events behind.
            "kafka": {"bootstrapServers": bootstrap, "properties": {
                "linger.ms": "1000",
                "reconnect.backoff.max.ms": "1000",
            }},
            "streams": [{"name": TOPIC, "topic": TOPIC}],
            "storage": {"size": "64Mi", "storageClassName": storage::STORAGE_CLASS},
            "shutdownGracePeriodSeconds": 10,
            "orphanRecovery": {"delaySeconds": 1, "maxParallelFlushJobs": 2},
        },
    }))?)
}

/// A namespace with an operator and a CaptureCluster of `replicas` ready pods.
pub struct Scene {
    pub h: &'static Harness,
    pub client: Client,
    pub ns: String,
    pub name: String,
    pub kubeconfig: std::path::PathBuf,
    pub operator: Operator,
    pub history: History,
    pub watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Scene {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Scene {
    pub async fn start(prefix: &str, broker: &KafkaBroker, replicas: i32) -> anyhow::Result<Self> {
        Self::start_with(prefix, broker, replicas, &[]).await
    }

    /// [`Scene::start`] with `spec.kafka.exactlyOnce: true`.
    pub async fn start_exactly_once(
        prefix: &str,
        broker: &KafkaBroker,
        replicas: i32,
    ) -> anyhow::Result<Self> {
        Self::start_inner(prefix, broker, replicas, &[], true).await
    }

    /// [`Scene::start`] with operator flags as environment.
    pub async fn start_with(
        prefix: &str,
        broker: &KafkaBroker,
        replicas: i32,
        operator_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start_inner(prefix, broker, replicas, operator_env, false).await
    }

    async fn start_inner(
        prefix: &str,
        broker: &KafkaBroker,
        replicas: i32,
        operator_env: &[(&str, &str)],
        exactly_once: bool,
    ) -> anyhow::Result<Self> {
        let h = harness::shared().await;
        let client = h.client()?;
        install_cluster_wide(&client).await?;
        let ns = h.namespace(prefix).await?;
        let kubeconfig = operator_identity(h, &ns).await?;
        let operator = Operator::start_with_env(h, &ns, &kubeconfig, "op-a", operator_env)?;
        let name = "events".to_string();
        let (history, watcher) = watch_volumes(client.clone());
        let mut cc = cluster(&name, &broker.bootstrap(), replicas)?;
        cc.spec.kafka.exactly_once = exactly_once;
        Api::<CaptureCluster>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &cc)
            .await?;
        let scene = Self {
            h,
            client,
            ns,
            name,
            kubeconfig,
            operator,
            history,
            watcher,
        };
        scene.wait_ready(replicas as usize).await?;
        Ok(scene)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn claims(&self) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn pvs(&self) -> Api<PersistentVolume> {
        Api::all(self.client.clone())
    }

    pub fn ccs(&self) -> Api<CaptureCluster> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn capture_pods(&self) -> Vec<Pod> {
        self.pods()
            .list(&ListParams::default().labels(&format!(
                "{CLUSTER_LABEL}={},app.kubernetes.io/component=capture",
                self.name
            )))
            .await
            .map(|l| l.items)
            .unwrap_or_default()
    }

    pub async fn wait_ready(&self, n: usize) -> anyhow::Result<()> {
        poll_until(
            &format!("{n} ready capture pods"),
            Duration::from_secs(120),
            || async {
                let pods = self.capture_pods().await;
                (pods.len() == n
                    && pods
                        .iter()
                        .all(|p| pod_ready(p) && p.metadata.deletion_timestamp.is_none()))
                .then_some(())
            },
        )
        .await
        .with_context(|| self.operator.log_text())?;
        Ok(())
    }

    pub async fn scale(&self, replicas: i32) -> anyhow::Result<()> {
        self.ccs()
            .patch(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": replicas}})),
            )
            .await?;
        Ok(())
    }

    /// The PV bound to `claim`.
    pub async fn volume_of(&self, claim: &str) -> anyhow::Result<String> {
        poll_until(
            &format!("claim {claim} bound"),
            Duration::from_secs(60),
            || async { self.claims().get(claim).await.ok()?.spec?.volume_name },
        )
        .await
        .map_err(Into::into)
    }

    /// SIGKILLs pod `pod` every 50 ms until its object is gone, so it never
    /// drains: returns when it is gone.
    pub async fn kill_until_gone(&self, pod: &str) -> anyhow::Result<()> {
        poll_until(
            &format!("pod {pod} gone"),
            Duration::from_secs(60),
            || async {
                let _ = self.h.agent().kill_pod(&self.ns, pod);
                self.pods().get_opt(pod).await.ok()?.is_none().then_some(())
            },
        )
        .await?;
        Ok(())
    }

    /// Waits until PV `volume` is deleted; returns its state in the delete
    /// event (its final reclaim policy and clean annotation), whether its
    /// flush Job was seen and the nodes the Job's pods ran on.
    pub async fn wait_volume_drained(
        &self,
        volume: &str,
        timeout: Duration,
    ) -> anyhow::Result<Drained> {
        poll_until(
            &format!("volume {volume} drained and deleted"),
            timeout,
            || async {
                let history = self.history.lock().unwrap();
                history.get(volume).filter(|d| d.deleted).cloned()
            },
        )
        .await
        .with_context(|| self.operator.log_text())
    }

    /// The node a PV is pinned to (local volumes of the test storage).
    pub async fn node_of(&self, volume: &str) -> anyhow::Result<String> {
        let pv = self.pvs().get(volume).await?;
        let term = pv
            .spec
            .and_then(|s| s.node_affinity)
            .and_then(|a| a.required)
            .context("volume without node affinity")?
            .node_selector_terms
            .into_iter()
            .next()
            .context("no term")?;
        term.match_expressions
            .unwrap_or_default()
            .into_iter()
            .find(|e| e.key == "kubernetes.io/hostname")
            .and_then(|e| e.values?.into_iter().next())
            .context("no hostname in the node affinity")
    }

    /// Every remaining PV of the cluster is `Retain` (its pod is alive).
    pub async fn live_volumes_retained(&self) -> anyhow::Result<()> {
        for claim in self
            .claims()
            .list(&ListParams::default().labels(&format!("{CLUSTER_LABEL}={}", self.name)))
            .await?
        {
            let Some(volume) = claim.spec.and_then(|s| s.volume_name) else {
                continue;
            };
            let pv = self.pvs().get(&volume).await?;
            let policy = pv.spec.and_then(|s| s.persistent_volume_reclaim_policy);
            ensure!(
                policy.as_deref() == Some("Retain"),
                "volume {volume} of a live pod is {policy:?}"
            );
        }
        Ok(())
    }

    /// Events of the namespace with `reason`.
    pub async fn events(&self, reason: &str) -> Vec<String> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.ns);
        api.list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .filter_map(|e| e.note)
            .collect()
    }
}

/// What the PV watcher saw of one volume.
#[derive(Debug, Clone, Default)]
pub struct Drained {
    /// Reclaim policy in the last state seen (the delete event's, once deleted).
    pub last_policy: Option<String>,
    /// `holdfast.dev/clean` in that state.
    pub last_clean: Option<String>,
    /// The volume was deleted.
    pub deleted: bool,
    /// A pod of its flush Job was seen.
    pub job_seen: bool,
    /// Nodes its flush Job's pods ran on.
    pub job_nodes: BTreeSet<String>,
    /// When a pod of its flush Job was first seen running.
    pub job_running_at: Option<Instant>,
}

impl Drained {
    /// Seconds from `orphaned_at` to the flush pod running (item 9's figure).
    pub fn to_running(&self, orphaned_at: Instant) -> String {
        self.job_running_at
            .map_or("flush pod never seen running".into(), |t| {
                format!(
                    "orphan to flush pod running {:.1}s",
                    t.saturating_duration_since(orphaned_at).as_secs_f64()
                )
            })
    }
}

pub type History = Arc<Mutex<BTreeMap<String, Drained>>>;

/// Records every PV's state from a watch, so the state a volume had when it
/// was deleted is known however quickly it went.
pub fn watch_volumes(client: Client) -> (History, tokio::task::JoinHandle<()>) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let history: History = Arc::default();
    let h = history.clone();
    let pv_client = client.clone();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(
            Api::<PersistentVolume>::all(pv_client),
            watcher::Config::default()
        ));
        while let Some(event) = stream.next().await {
            let (pv, deleted) = match event {
                Ok(watcher::Event::Apply(pv) | watcher::Event::InitApply(pv)) => (pv, false),
                Ok(watcher::Event::Delete(pv)) => (pv, true),
                _ => continue,
            };
            let mut history = h.lock().unwrap();
            let entry = history.entry(pv.name_any()).or_default();
            entry.last_policy = pv
                .spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.clone());
            entry.last_clean = pv.annotations().get(CLEAN_ANNOTATION).cloned();
            entry.deleted |= deleted;
        }
    });
    let h = history.clone();
    let pods_task = tokio::spawn(async move {
        let pods = Api::<Pod>::all(client);
        let config = watcher::Config::default()
            .labels(&format!("app.kubernetes.io/component={FLUSH_COMPONENT}"));
        let mut stream = std::pin::pin!(watcher(pods, config).applied_objects());
        while let Some(Ok(pod)) = stream.next().await {
            let Some(volume) = pod.annotations().get(VOLUME_ANNOTATION).cloned() else {
                continue;
            };
            let mut history = h.lock().unwrap();
            let entry = history.entry(volume).or_default();
            entry.job_seen = true;
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            if running && entry.job_running_at.is_none() {
                entry.job_running_at = Some(Instant::now());
            }
            if let Some(node) = pod.spec.and_then(|s| s.node_name) {
                entry.job_nodes.insert(node);
            }
        }
    });
    let task = tokio::spawn(async move {
        let _ = tokio::join!(task, pods_task);
    });
    (history, task)
}

/// A drained volume was deleted as `Delete` + `clean=true`, after a flush
/// Job ran on it.
pub fn ensure_drained(volume: &str, d: &Drained) -> anyhow::Result<()> {
    ensure!(d.job_seen, "no flush job pod was seen for {volume}");
    ensure!(
        d.deleted
            && d.last_policy.as_deref() == Some("Delete")
            && d.last_clean.as_deref() == Some("true"),
        "volume {volume} ended as {:?} clean={:?} deleted={}",
        d.last_policy,
        d.last_clean,
        d.deleted
    );
    Ok(())
}

/// A client posting 5 events per request to the ready capture pods in turn,
/// keeping the uuids of every `200`.
pub struct Load {
    pub stop: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<(Vec<String>, u64)>,
    /// Events acknowledged so far.
    pub acked: Arc<AtomicUsize>,
}

impl Load {
    pub fn start(client: Client, ns: &str, name: &str) -> Self {
        let (stop, rx) = watch::channel(false);
        let count = Arc::new(AtomicUsize::new(0));
        let acked_count = count.clone();
        let pods: Api<Pod> = Api::namespaced(client, ns);
        let selector = format!("{CLUSTER_LABEL}={name},app.kubernetes.io/component=capture");
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()
                .expect("http client");
            let mut acked = Vec::new();
            let mut refused = 0u64;
            let mut ips: Vec<String> = Vec::new();
            let mut refreshed = Instant::now() - Duration::from_secs(10);
            let mut turn = 0usize;
            while !*rx.borrow() {
                if refreshed.elapsed() > Duration::from_millis(300) {
                    if let Ok(list) = pods.list(&ListParams::default().labels(&selector)).await {
                        ips = list
                            .items
                            .iter()
                            .filter(|p| pod_ready(p) && p.metadata.deletion_timestamp.is_none())
                            .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
                            .collect();
                    }
                    refreshed = Instant::now();
                }
                if ips.is_empty() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                turn += 1;
                let ip = &ips[turn % ips.len()];
                let uuids: Vec<String> = (0..5).map(|_| uuid::Uuid::now_v7().to_string()).collect();
                let body: Vec<_> = uuids
                    .iter()
                    .map(|u| json!({"uuid": u, "key": format!("user-{}", turn % 7)}))
                    .collect();
                match http
                    .post(format!("http://{ip}:8080/v1/events/{TOPIC}"))
                    .json(&body)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => {
                        acked.extend(uuids);
                        acked_count.store(acked.len(), Ordering::Relaxed);
                    }
                    _ => refused += 1,
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (acked, refused)
        });
        Self {
            stop,
            task,
            acked: count,
        }
    }

    /// Waits until `more` events beyond those acknowledged now are
    /// acknowledged (the load ran long enough to matter), or fails at the deadline.
    pub async fn until_more_acked(&self, more: usize, within: Duration) -> anyhow::Result<()> {
        let target = self.acked.load(Ordering::Relaxed) + more;
        poll_until("more events acknowledged", within, || async {
            (self.acked.load(Ordering::Relaxed) >= target).then_some(())
        })
        .await?;
        Ok(())
    }

    pub async fn finish(self) -> anyhow::Result<(Vec<String>, u64)> {
        let _ = self.stop.send(true);
        Ok(self.task.await?)
    }
}

/// Acked, found in Kafka, duplicates; fails when an acked uuid is missing.
pub async fn count_in_kafka(
    broker: &KafkaBroker,
    acked: &[String],
) -> anyhow::Result<(usize, usize)> {
    let want: BTreeSet<&str> = acked.iter().map(String::as_str).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let records = broker
            .consume(TOPIC, usize::MAX, Duration::from_secs(8))
            .await?;
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for r in &records {
            if let Some(u) = r.header("holdfast-uuid") {
                *counts
                    .entry(String::from_utf8_lossy(u).into_owned())
                    .or_default() += 1;
            }
        }
        let missing = want.iter().filter(|u| !counts.contains_key(**u)).count();
        if missing == 0 {
            let found = want.len();
            let dups = counts
                .iter()
                .filter(|(u, _)| want.contains(u.as_str()))
                .map(|(_, n)| n - 1)
                .sum();
            return Ok((found, dups));
        }
        ensure!(
            Instant::now() < deadline,
            "{missing} of {} acked events are not in Kafka",
            want.len()
        );
    }
}

pub fn report(
    scenario: &str,
    acked: usize,
    found: usize,
    dups: usize,
    refused: u64,
    drained: &str,
) {
    eprintln!(
        "ORPHANS {scenario}: acked {acked} / found in Kafka {found} / duplicates {dups} / refused requests {refused} / {drained}"
    );
}
