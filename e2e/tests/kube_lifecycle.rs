//! The harness starts and stops cleanly, again and again: five fresh control
//! planes in a row, each running a pod, each leaving no process, mount or
//! directory behind. The first one also crashes and restarts its node.
//!
//! Needs the control-plane binaries: `make e2e-bins` (bash e2e/bins.sh).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use holdfast_e2e::kube::process::pid_alive;
use holdfast_e2e::kube::{Harness, HarnessConfig, poll_until};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

fn node_ready(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Processes whose command line mentions `dir` (anything the harness started
/// there, including children it does not know of).
fn processes_mentioning(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

/// Mount points anywhere on the machine (every process's view) under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let info = std::fs::read_to_string(entry.path().join("mountinfo")).unwrap_or_default();
        found.extend(
            info.lines()
                .filter(|l| l.contains(&needle))
                .map(String::from),
        );
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_starts_and_stops_cleanly_five_times() -> anyhow::Result<()> {
    let testpod = Path::new(env!("CARGO_BIN_EXE_holdfast-testpod"));
    ensure!(testpod.is_file());
    for round in 0..5 {
        let started = Instant::now();
        let h = Harness::start(HarnessConfig::default()).await?;
        let startup = started.elapsed();
        let client = h.client()?;
        let ns = h.namespace("cycle").await?;
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "sleeper"},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "main",
                    "image": "holdfast/testpod:dev",
                    "command": ["holdfast-testpod", "serve", "--listen=$(POD_IP):8080", "--data=/run/holdfast-test/data"],
                    "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                    "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8080}, "periodSeconds": 1},
                    "volumeMounts": [{"name": "data", "mountPath": "/run/holdfast-test/data"}],
                }],
                "volumes": [{"name": "data", "emptyDir": {}}],
            },
        }))?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        pods.create(&PostParams::default(), &pod).await?;
        poll_until("sleeper ready", TIMEOUT, || async {
            pods.get("sleeper").await.ok().filter(pod_ready)
        })
        .await?;

        if round == 0 {
            // Node crash: heartbeats stop, the process dies, the node
            // controller marks the node not Ready; a restart brings both back.
            let node = pods
                .get("sleeper")
                .await?
                .spec
                .and_then(|s| s.node_name)
                .context("sleeper not bound to a node")?;
            let nodes: Api<Node> = Api::all(client.clone());
            let pid = *h
                .agent()
                .pod_pids(&ns, "sleeper")
                .values()
                .next()
                .context("no pid")?;
            h.agent().stop_node(&node)?;
            poll_until("process of the crashed node gone", TIMEOUT, || async {
                (!pid_alive(pid)).then_some(())
            })
            .await?;
            let status = poll_until("node not ready", TIMEOUT, || async {
                let s = node_ready(&nodes.get(&node).await.ok()?)?;
                (s != "True").then_some(s)
            })
            .await?;
            ensure!(status == "Unknown", "node Ready={status}");
            h.agent().restart_node(&node).await?;
            poll_until("node ready again", TIMEOUT, || async {
                (node_ready(&nodes.get(&node).await.ok()?)? == "True").then_some(())
            })
            .await?;
            poll_until("sleeper running again", TIMEOUT, || async {
                let pids = h.agent().pod_pids(&ns, "sleeper");
                let p = pods.get("sleeper").await.ok().filter(pod_ready)?;
                (!pids.is_empty() && !pids.values().any(|p| *p == pid)).then_some(p)
            })
            .await?;
        }

        let pids = h.pids();
        ensure!(
            pids.len() >= 5,
            "expected 4 components and a pod, got {pids:?}"
        );
        ensure!(pids.iter().all(|p| pid_alive(*p)));
        let dir = h.dir().to_path_buf();
        let stopping = Instant::now();
        h.stop().await;
        let stop = stopping.elapsed();
        let alive: Vec<u32> = pids.iter().copied().filter(|p| pid_alive(*p)).collect();
        ensure!(
            alive.is_empty(),
            "round {round}: still alive after stop: {alive:?}"
        );
        let leftovers = processes_mentioning(&dir);
        ensure!(
            leftovers.is_empty(),
            "round {round}: processes left: {leftovers:?}"
        );
        let mounts = mounts_under(&dir);
        ensure!(mounts.is_empty(), "round {round}: mounts left: {mounts:?}");
        ensure!(!dir.exists(), "round {round}: {} left", dir.display());
        eprintln!(
            "round {round}: started in {:.1}s, stopped in {:.1}s, {} processes reaped",
            startup.as_secs_f64(),
            stop.as_secs_f64(),
            pids.len()
        );
    }
    Ok(())
}
