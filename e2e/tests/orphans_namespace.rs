//! The namespace of a CaptureCluster deleted while its buffers hold events
//! (issue 11, item 2; scenario 10), on the real control plane with real
//! Kafka: a client posts throughout, every uuid that got a `200` is looked
//! up in Kafka afterwards.
//!
//! - `deleted_namespace_blocks_with_a_reason_and_keeps_every_volume_retained`:
//!   Kafka stops, so the pod's buffer holds acknowledged events, and the
//!   whole namespace is deleted. Kubernetes deletes the pods, claims,
//!   ServiceAccounts and Secrets, and refuses anything new in the
//!   namespace (flush Jobs, recovery claims, Events), so the volume cannot
//!   be drained there. The operator (running in its own namespace, as the
//!   chart installs it) must not lose data and must not hang silently: the
//!   finalizer holds, the `Draining` condition says `NamespaceTerminating`
//!   with how to unblock, a Warning Event on the PV (its Events live in
//!   `default`) says the same, and the PV stays `Retain` with its events.
//!   Then the documented way out: the volume is drained by hand with
//!   `holdfast-capture flush`, the finalizer removed, the namespace goes,
//!   and every acknowledged uuid is in Kafka.
//!
//! Figures go to stderr (`--nocapture`).

mod operator_support;

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use holdfast_e2e::kafka::KafkaBroker;
use holdfast_e2e::kube::{self as harness, poll_until, storage};
use holdfast_operator::api::{CLEAN_ANNOTATION, CaptureCluster};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use operator_support::scene::*;
use operator_support::{
    Operator, condition, init_tracing, install_cluster_wide, operator_identity,
};
use serde_json::json;

/// A [`Scene`] whose operator runs (ServiceAccount, Lease) in a namespace
/// of its own, watching the cluster's namespace: deleting the cluster's
/// namespace leaves the operator alone.
async fn scene_with_operator_apart(
    prefix: &str,
    broker: &KafkaBroker,
    replicas: i32,
) -> anyhow::Result<Scene> {
    let h = harness::shared().await;
    let client = h.client()?;
    install_cluster_wide(&client).await?;
    let ns = h.namespace(prefix).await?;
    let operator_ns = h.namespace(&format!("{prefix}-op")).await?;
    let kubeconfig = operator_identity(h, &operator_ns).await?;
    let operator = Operator::start_with_env(
        h,
        &ns,
        &kubeconfig,
        "op-a",
        &[("HOLDFAST_LEASE_NAMESPACE", operator_ns.as_str())],
    )?;
    let name = "events".to_string();
    let (history, watcher) = watch_volumes(client.clone());
    Api::<CaptureCluster>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &cluster(&name, &broker.bootstrap(), replicas)?,
        )
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

/// What `kubectl get` and `kubectl describe` show, when kubectl is on PATH.
fn kubectl_view(scene: &Scene) -> String {
    let kubeconfig = scene.h.control_plane().kubeconfig();
    let mut out = String::new();
    for args in [
        vec!["get", "capturecluster"],
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
async fn deleted_namespace_blocks_with_a_reason_and_keeps_every_volume_retained()
-> anyhow::Result<()> {
    init_tracing();
    let mut broker = KafkaBroker::start().await?;
    broker.create_topic(TOPIC, 2, &[]).await?;
    let scene = scene_with_operator_apart("orph-ns", &broker, 1).await?;
    let volume = scene.volume_of("buffer-events-0").await?;
    let load = Load::start(scene.client.clone(), &scene.ns, &scene.name);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Kafka goes away: what is acknowledged from now on stays in the buffer.
    broker.stop().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked, refused) = load.finish().await?;
    ensure!(!acked.is_empty(), "no event was acknowledged");

    let namespaces: Api<Namespace> = Api::all(scene.client.clone());
    namespaces
        .delete(&scene.ns, &DeleteParams::default())
        .await?;
    let deleted_at = Instant::now();

    // Blocked, with the reason and the way out, in status...
    let cc = poll_until(
        "Draining: NamespaceTerminating",
        Duration::from_secs(90),
        || async {
            let cc = scene.ccs().get(&scene.name).await.ok()?;
            let (status, reason, message) = condition(&cc, "Draining")?;
            (status == "True"
                && reason == "NamespaceTerminating"
                && message.contains(&volume)
                && message.contains(&format!(
                    "kubectl -n {} patch capturecluster {}",
                    scene.ns, scene.name
                )))
            .then_some(cc)
        },
    )
    .await
    .with_context(|| scene.operator.log_text())?;
    let reported_after = deleted_at.elapsed();
    // ...and in a Warning Event on the volume (the namespace refuses new
    // Events; a PV's Events live in `default`).
    let events: Api<Event> = Api::namespaced(scene.client.clone(), "default");
    let note = poll_until(
        "NamespaceTerminating event on the PV",
        Duration::from_secs(30),
        || async {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("NamespaceTerminating")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some(volume.as_str())
                })?
                .note
        },
    )
    .await?;
    ensure!(
        note.contains("holdfast-capture flush") && note.contains("stay Retain"),
        "the event does not say how to unblock: {note}"
    );
    eprintln!(
        "NAMESPACE-DELETED blocked state:\n{}\nEvent NamespaceTerminating on PV {volume}: {note}\n",
        kubectl_view(&scene)
    );

    // The namespace waits; the volume is Retain, not clean, and holds events.
    let ns = namespaces.get(&scene.ns).await?;
    ensure!(
        ns.metadata.deletion_timestamp.is_some(),
        "namespace {} is not terminating",
        scene.ns
    );
    ensure!(
        cc.metadata.deletion_timestamp.is_some(),
        "the CaptureCluster is not being deleted"
    );
    let pv = scene.pvs().get(&volume).await?;
    let policy = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.clone());
    ensure!(
        policy.as_deref() == Some("Retain")
            && pv.annotations().get(CLEAN_ANNOTATION).map(String::as_str) != Some("true"),
        "volume {volume} is {policy:?} clean={:?}",
        pv.annotations().get(CLEAN_ANNOTATION)
    );
    let dir = storage::volume_path(&pv).context("volume path")?;
    let stats = holdfast_e2e::capture::inspect(&dir)?;
    let held = stats["events"].as_u64().unwrap_or(0);
    ensure!(held > 0, "the volume holds no events: {stats}");

    // The way out the condition names: drain by hand (here straight from
    // the volume's directory; on a real cluster, from a pod in another
    // namespace), then remove the finalizer.
    broker.restart().await?;
    let (status, stderr) = holdfast_e2e::capture::flush(&dir, &broker.bootstrap(), 120)?;
    ensure!(status.success(), "manual flush failed: {stderr}");
    let (found, dups) = count_in_kafka(&broker, &acked).await?;
    scene
        .ccs()
        .patch(
            &scene.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await?;
    poll_until("namespace gone", Duration::from_secs(90), || async {
        namespaces
            .get_opt(&scene.ns)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await?;
    let policy = scene
        .pvs()
        .get(&volume)
        .await?
        .spec
        .and_then(|s| s.persistent_volume_reclaim_policy);
    ensure!(
        policy.as_deref() == Some("Retain"),
        "volume {volume} is {policy:?} after the namespace went"
    );
    // Refusals by the terminating namespace are expected; nothing else.
    let log = scene.operator.log_text();
    let denied: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("forbidden") && !l.contains("being terminated"))
        .collect();
    ensure!(
        denied.is_empty(),
        "operator was refused:\n{}",
        denied.join("\n")
    );
    report(
        "10 namespace deleted with events buffered",
        acked.len(),
        found,
        dups,
        refused,
        &format!(
            "blocked with NamespaceTerminating {:.1}s after the delete; volume kept Retain with {held} events; drained by hand, finalizer removed",
            reported_after.as_secs_f64()
        ),
    );
    Ok(())
}
