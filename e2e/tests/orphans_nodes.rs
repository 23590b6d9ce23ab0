//! A node lost under load (issue 11, item 5; scenario 9), on the real
//! control plane with real Kafka: a client posts throughout, every uuid
//! that got a `200` is looked up in Kafka afterwards.
//!
//! - `pod_stranded_on_a_lost_node_is_reported_then_drained_after_the_out_of_service_taint`:
//!   the node of capture pod `events-1` crashes (the agent stops
//!   heartbeating and its processes are SIGKILLed with events still in the
//!   buffer) and the cluster is scaled from 2 to 1. The pod stays
//!   `Terminating` (no kubelet confirms its end) and keeps its claim, so
//!   nothing may drain the volume; the operator must say so: `NodeLost`
//!   and `OrphansStuck` conditions, a `Stuck` entry in `status.volumes`
//!   and a Warning Event naming the pod, the node, how long, and the
//!   out-of-service taint. No flush Job may start meanwhile. Then the node
//!   is tainted `node.kubernetes.io/out-of-service=nodeshutdown:NoExecute`:
//!   Kubernetes force-deletes the pod, and orphan recovery drains the
//!   volume on the other node (the scene uses the harness's network
//!   storage class, whose volumes attach anywhere, like a cloud disk).
//!   Before the fix the stuck state was visible nowhere.
//!
//! This test binary stops a node of its harness: it holds one test only.
//! Figures go to stderr (`--nocapture`).

mod operator_support;

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use holdfast_e2e::kafka::KafkaBroker;
use holdfast_e2e::kube::{self as harness, poll_until, storage};
use holdfast_operator::api::CaptureCluster;
use holdfast_operator::orphans::job::flush_job_name;
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use operator_support::scene::*;
use operator_support::{
    Operator, condition, init_tracing, install_cluster_wide, operator_identity,
};
use serde_json::json;

const OUT_OF_SERVICE: &str = "node.kubernetes.io/out-of-service";

/// A [`Scene`] whose cluster's volumes come from the network storage class.
async fn network_scene(prefix: &str, broker: &KafkaBroker, replicas: i32) -> anyhow::Result<Scene> {
    let h = harness::shared().await;
    let client = h.client()?;
    install_cluster_wide(&client).await?;
    let ns = h.namespace(prefix).await?;
    let kubeconfig = operator_identity(h, &ns).await?;
    let operator = Operator::start(h, &ns, &kubeconfig, "op-a")?;
    let name = "events".to_string();
    let (history, watcher) = watch_volumes(client.clone());
    let mut cc: CaptureCluster = cluster(&name, &broker.bootstrap(), replicas)?;
    cc.spec.storage.storage_class_name = Some(storage::NETWORK_STORAGE_CLASS.into());
    Api::<CaptureCluster>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &cc)
        .await?;
    let scene = Scene {
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

/// Adds the out-of-service taint to `node` (what an administrator does
/// once the node is known to be gone).
async fn taint_out_of_service(scene: &Scene, node: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(scene.client.clone());
    poll_until(
        &format!("taint {node} out-of-service"),
        Duration::from_secs(30),
        || async {
            let n = nodes.get(node).await.ok()?;
            let mut taints = n.spec.as_ref()?.taints.clone().unwrap_or_default();
            taints.push(Taint {
                key: OUT_OF_SERVICE.into(),
                value: Some("nodeshutdown".into()),
                effect: "NoExecute".into(),
                time_added: None,
            });
            // The resourceVersion makes a concurrent change (the node
            // controller's own taints) fail the patch; it is retried.
            nodes
                .patch(
                    node,
                    &PatchParams::default(),
                    &Patch::Merge(json!({
                        "metadata": {"resourceVersion": n.resource_version()},
                        "spec": {"taints": taints},
                    })),
                )
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await?;
    Ok(())
}

/// `holdfast_operator_orphan_phase_seconds_sum{phase}` for each phase (one
/// orphan per operator here, so the sum is its time).
async fn phases(operator: &Operator) -> String {
    let mut out = Vec::new();
    for phase in ["job_created", "pod_running", "drained", "released"] {
        let sample = format!("holdfast_operator_orphan_phase_seconds_sum{{phase=\"{phase}\"}}");
        let value = operator.metric(&sample).await.unwrap_or(0.0);
        out.push(format!("{phase} {value:.1}s"));
    }
    format!("detected -> {}", out.join(", "))
}

/// What `kubectl get` and `kubectl describe` show, when kubectl is on PATH.
pub fn kubectl_view(scene: &Scene) -> String {
    let kubeconfig = scene.h.control_plane().kubeconfig();
    let mut out = String::new();
    for args in [
        vec!["get", "capturecluster", "-o", "wide"],
        vec!["describe", "capturecluster", scene.name.as_str()],
    ] {
        let Ok(result) = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["-n", &scene.ns])
            .args(&args)
            .output()
        else {
            return "(kubectl not on PATH)".into();
        };
        out.push_str(&format!(
            "$ kubectl -n {} {}\n{}{}\n",
            scene.ns,
            args.join(" "),
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_stranded_on_a_lost_node_is_reported_then_drained_after_the_out_of_service_taint()
-> anyhow::Result<()> {
    init_tracing();
    let broker = KafkaBroker::start().await?;
    broker.create_topic(TOPIC, 2, &[]).await?;
    let scene = network_scene("orph-node", &broker, 2).await?;
    let volume = scene.volume_of("buffer-events-1").await?;
    let pv = scene.pvs().get(&volume).await?;
    ensure!(
        pv.spec
            .as_ref()
            .and_then(|s| s.node_affinity.as_ref())
            .is_none(),
        "network volume {volume} is pinned to a node"
    );
    let node = scene
        .pods()
        .get("events-1")
        .await?
        .spec
        .and_then(|s| s.node_name)
        .context("events-1 not scheduled")?;
    let load = Load::start(scene.client.clone(), &scene.ns, &scene.name);
    // Load for a while, so the buffer of events-1 holds events.
    tokio::time::sleep(Duration::from_secs(4)).await;

    // The node crashes under load; the pod is not wanted any more.
    scene.h.agent().stop_node(&node)?;
    let lost_at = Instant::now();
    scene.scale(1).await?;

    // The stuck state explains itself: status and a Warning Event.
    let cc = poll_until("NodeLost in status", Duration::from_secs(90), || async {
        let cc = scene.ccs().get(&scene.name).await.ok()?;
        let (status, _, message) = condition(&cc, "NodeLost")?;
        let (stuck, _, _) = condition(&cc, "OrphansStuck")?;
        let entry = cc
            .status
            .as_ref()?
            .volumes
            .iter()
            .find(|v| v.volume == volume)?;
        (status == "True"
            && stuck == "True"
            && message.contains("events-1")
            && message.contains("stuck Terminating")
            && entry.phase == "Stuck")
            .then_some(cc)
    })
    .await
    .with_context(|| scene.operator.log_text())?;
    let reported_after = lost_at.elapsed();
    let (_, _, message) = condition(&cc, "NodeLost").context("NodeLost")?;
    ensure!(
        message.contains(&node)
            && message.contains(&format!(
                "kubectl taint nodes {node} {OUT_OF_SERVICE}=nodeshutdown:NoExecute"
            )),
        "the NodeLost condition does not name the node and the remedy: {message}"
    );
    let notes = poll_until("NodeLost event", Duration::from_secs(30), || async {
        let notes = scene.events("NodeLost").await;
        notes
            .iter()
            .any(|n| {
                n.contains("pod events-1")
                    && n.contains(&node)
                    && n.contains(" for ")
                    && n.contains(OUT_OF_SERVICE)
            })
            .then_some(notes)
    })
    .await
    .with_context(|| scene.operator.log_text())?;
    eprintln!(
        "NODE-LOST stuck state:\n{}\nEvent NodeLost: {}\n",
        kubectl_view(&scene),
        notes.last().cloned().unwrap_or_default()
    );
    // Blocked, correctly: the pod still exists and holds the claim, no
    // flush Job, the volume stays Retain.
    let pod = scene.pods().get_opt("events-1").await?;
    ensure!(
        pod.is_some_and(|p| p.metadata.deletion_timestamp.is_some()),
        "events-1 is not stuck Terminating"
    );
    ensure!(
        scene
            .jobs()
            .get_opt(&flush_job_name(&volume))
            .await?
            .is_none(),
        "a flush Job started on a volume a pod may still write to"
    );
    let policy = scene
        .pvs()
        .get(&volume)
        .await?
        .spec
        .and_then(|s| s.persistent_volume_reclaim_policy);
    ensure!(
        policy.as_deref() == Some("Retain"),
        "volume {volume} is {policy:?}"
    );

    // The administrator confirms the node is gone.
    taint_out_of_service(&scene, &node).await?;
    let tainted_at = Instant::now();
    poll_until(
        "events-1 force-deleted",
        Duration::from_secs(90),
        || async {
            scene
                .pods()
                .get_opt("events-1")
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await?;
    let deleted_after = tainted_at.elapsed();
    let drained = scene.wait_volume_drained(&volume, RECOVERY).await?;
    let recovered_after = tainted_at.elapsed();
    let (acked, refused) = load.finish().await?;
    let (found, dups) = count_in_kafka(&broker, &acked).await?;
    ensure_drained(&volume, &drained)?;
    ensure!(
        !drained.job_nodes.contains(&node),
        "the flush Job ran on the lost node {node}: {:?}",
        drained.job_nodes
    );
    let cleared = poll_until("NodeLost cleared", Duration::from_secs(60), || async {
        let cc = scene.ccs().get(&scene.name).await.ok()?;
        let (status, _, _) = condition(&cc, "NodeLost")?;
        let (stuck, _, _) = condition(&cc, "OrphansStuck")?;
        (status == "False" && stuck == "False").then_some(())
    })
    .await;
    ensure!(
        cleared.is_ok(),
        "NodeLost/OrphansStuck still set after recovery: {:?}",
        scene
            .ccs()
            .get(&scene.name)
            .await
            .ok()
            .and_then(|c| c.status)
    );
    scene.live_volumes_retained().await?;
    scene.operator.ensure_never_forbidden()?;
    report(
        "9 node lost under load (network volume)",
        acked.len(),
        found,
        dups,
        refused,
        &format!(
            "reported {:.1}s after the crash; taint to pod force-deleted {:.1}s, to drained+deleted {:.1}s; {}; {}; job on {:?}",
            reported_after.as_secs_f64(),
            deleted_after.as_secs_f64(),
            recovered_after.as_secs_f64(),
            drained.to_running(tainted_at),
            phases(&scene.operator).await,
            drained.job_nodes
        ),
    );
    Ok(())
}
