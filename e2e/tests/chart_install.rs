//! `helm install` of charts/holdfast into the test control plane, the way a
//! user runs it: the operator Deployment's pods (run by the node agent)
//! work under the chart's own ServiceAccount and ClusterRole; a
//! CaptureCluster from values becomes capture pods whose events reach a real
//! Kafka broker; orphan recovery drains a volume left with events by a pod
//! scaled away while Kafka was down; `helm upgrade` with a changed value
//! rolls the operator and
//! the new pod takes the Lease; `helm uninstall` leaves the CRD, the
//! CaptureCluster, its retained volume and the buffer on it.
//!
//! Needs: `make e2e-bins`, `make kafka`, and the workspace binaries
//! (`cargo build --bins`).

mod chart_support;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use chart_support::{TIMEOUT, chart, init_tracing};
use holdfast_e2e::kafka::KafkaBroker;
use holdfast_e2e::kube::{self as harness, Harness, poll_until, storage};
use holdfast_operator::api::{CLUSTER_LABEL, CaptureCluster};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::json;

/// Runs `helm <args>` against the harness; fails with its output.
async fn helm(h: &Harness, args: &[&str]) -> anyhow::Result<String> {
    let output = h.helm()?.args(args).output().await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!("helm {args:?} failed:\n{text}");
    }
    Ok(text)
}

/// Every operator container log of `ns` (the agent keeps
/// `<pods dir>/<namespace>_<pod>_<uid>/<container>.log`).
fn operator_logs(h: &Harness, ns: &str) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(h.dir().join("pods"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{ns}_"))
        {
            text.push_str(
                &std::fs::read_to_string(entry.path().join("operator.log")).unwrap_or_default(),
            );
        }
    }
    text
}

fn running_and_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        && pod.metadata.deletion_timestamp.is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_runs_capture_upgrade_rolls_and_uninstall_keeps_data() -> anyhow::Result<()> {
    init_tracing();
    let mut broker = KafkaBroker::start().await?;
    broker.create_topic("events", 1, &[]).await?;
    let h = harness::shared().await;
    let client = h.client()?;
    let ns = h.namespace("chart").await?;
    let chart = chart();
    let chart = chart.to_str().context("chart path")?;
    let bootstrap = format!(
        "captureCluster.kafka.bootstrapServers={}",
        broker.bootstrap()
    );
    let storage_class = format!(
        "captureCluster.storage.storageClassName={}",
        storage::STORAGE_CLASS
    );
    let values = [
        "--set",
        "operator.leaderElection.leaseDurationSeconds=6",
        "--set",
        "operator.leaderElection.leaseGraceSeconds=2",
        "--set",
        "captureCluster.enabled=true",
        "--set",
        &bootstrap,
        "--set",
        "captureCluster.storage.size=64Mi",
        "--set",
        &storage_class,
        "--set",
        "captureCluster.shutdownGracePeriodSeconds=10",
        "--set",
        "captureCluster.orphanRecovery.delaySeconds=1",
        "--set-json",
        r#"captureCluster.kafka.properties={"reconnect.backoff.max.ms":"1000"}"#,
    ];
    let mut install = vec![
        "install",
        "holdfast",
        chart,
        "-n",
        &ns,
        "--wait",
        "--timeout",
        "3m",
    ];
    install.extend(values);
    let notes = helm(h, &install)
        .await
        .with_context(|| operator_logs(h, &ns))?;
    // First install: the CRD was not served when the release was rendered,
    // so the CaptureCluster waits for an upgrade, and the notes say so.
    ensure!(notes.contains("helm upgrade holdfast"), "notes:\n{notes}");
    let ccs: Api<CaptureCluster> = Api::namespaced(client.clone(), &ns);
    ensure!(ccs.get_opt("events").await?.is_none());

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let operators = ListParams::default().labels("app.kubernetes.io/component=operator");
    let leader = poll_until("the operator pod leads", TIMEOUT, || async {
        let pod = pods
            .list(&operators)
            .await
            .ok()?
            .items
            .into_iter()
            .find(running_and_ready)?;
        let lease = leases.get_opt("holdfast-operator").await.ok()??;
        (lease.spec?.holder_identity? == pod.name_any()).then(|| pod.name_any())
    })
    .await
    .with_context(|| operator_logs(h, &ns))?;

    // The upgrade creates the CaptureCluster; the operator (under the
    // chart's RBAC) turns it into a capture pod that delivers to Kafka.
    let mut upgrade = vec![
        "upgrade",
        "holdfast",
        chart,
        "-n",
        &ns,
        "--wait",
        "--timeout",
        "3m",
    ];
    upgrade.extend(values);
    let notes = helm(h, &upgrade).await?;
    ensure!(
        notes.contains("/v1/events"),
        "notes do not show how to send an event:\n{notes}"
    );
    let capture_pods = ListParams::default().labels(&format!("{CLUSTER_LABEL}=events"));
    let pod = poll_until("a ready capture pod", TIMEOUT, || async {
        pods.list(&capture_pods)
            .await
            .ok()?
            .items
            .into_iter()
            .find(running_and_ready)
    })
    .await
    .with_context(|| operator_logs(h, &ns))?;
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .context("pod ip")?;
    let uuids: Vec<String> = (0..10).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let body: Vec<_> = uuids
        .iter()
        .map(|u| json!({"uuid": u, "action": "signup"}))
        .collect();
    let response = reqwest::Client::new()
        .post(format!("http://{ip}:8080/v1/events"))
        .json(&body)
        .send()
        .await?;
    ensure!(response.status() == 200, "post: {}", response.status());
    let records = broker
        .consume("events", uuids.len(), Duration::from_secs(60))
        .await?;
    let delivered: BTreeSet<String> = records
        .iter()
        .filter_map(|r| r.header("holdfast-uuid"))
        .map(|h| String::from_utf8_lossy(h).into_owned())
        .collect();
    ensure!(
        uuids.iter().all(|u| delivered.contains(u)),
        "{} of {} events in Kafka",
        delivered.len(),
        uuids.len()
    );
    let logs = operator_logs(h, &ns);
    ensure!(
        !logs.contains("forbidden"),
        "the chart's RBAC refused the operator:\n{logs}"
    );

    // Orphan recovery under the chart's RBAC: without Kafka, the pod scaled
    // away leaves its volume Retain with events; a flush Job (the chart's
    // image, run by the node agent) drains it once Kafka is back, and the
    // volume goes back to the storage system.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let volume = claims
        .get("buffer-events-0")
        .await?
        .spec
        .and_then(|s| s.volume_name)
        .context("claim not bound")?;
    broker.stop().await?;
    let stranded: Vec<String> = (0..10).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let body: Vec<_> = stranded
        .iter()
        .map(|u| json!({"uuid": u, "action": "stranded"}))
        .collect();
    let response = reqwest::Client::new()
        .post(format!("http://{ip}:8080/v1/events"))
        .json(&body)
        .send()
        .await?;
    ensure!(
        response.status() == 200,
        "post without Kafka: {}",
        response.status()
    );
    let mut scaled_away = upgrade.clone();
    scaled_away.extend(["--set", "captureCluster.replicas=0"]);
    helm(h, &scaled_away).await?;
    poll_until("the volume left Retain with events", TIMEOUT, || async {
        let pv = pvs.get(&volume).await.ok()?;
        let policy = pv.spec.as_ref()?.persistent_volume_reclaim_policy.clone()?;
        let remaining = pv
            .annotations()
            .get("holdfast.dev/remaining-events")?
            .clone();
        (policy == "Retain" && remaining != "0").then_some(())
    })
    .await?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let job = holdfast_operator::orphans::job::flush_job_name(&volume);
    poll_until("a flush job for the orphaned volume", TIMEOUT, || async {
        jobs.get_opt(&job).await.ok()?.map(|_| ())
    })
    .await
    .with_context(|| operator_logs(h, &ns))?;
    broker.restart().await?;
    poll_until(
        "the orphaned volume drained and deleted",
        Duration::from_secs(180),
        || async { pvs.get_opt(&volume).await.ok()?.is_none().then_some(()) },
    )
    .await
    .with_context(|| operator_logs(h, &ns))?;
    let records = broker
        .consume(
            "events",
            uuids.len() + stranded.len(),
            Duration::from_secs(60),
        )
        .await?;
    let delivered: BTreeSet<String> = records
        .iter()
        .filter_map(|r| r.header("holdfast-uuid"))
        .map(|h| String::from_utf8_lossy(h).into_owned())
        .collect();
    ensure!(
        stranded.iter().all(|u| delivered.contains(u)),
        "{} of {} stranded events in Kafka",
        stranded.iter().filter(|u| delivered.contains(*u)).count(),
        stranded.len()
    );
    let logs = operator_logs(h, &ns);
    ensure!(
        !logs.contains("forbidden"),
        "the chart's RBAC refused the operator:\n{logs}"
    );

    // A changed value rolls the operator: a new pod takes over the Lease.
    let before = deployments.get("holdfast-operator").await?;
    // (The capture pod comes back, with a new claim, in the same upgrade.)
    let mut changed = upgrade.clone();
    changed.extend(["--set", "operator.logLevel=debug"]);
    helm(h, &changed).await?;
    let after = deployments.get("holdfast-operator").await?;
    ensure!(
        after.metadata.generation > before.metadata.generation,
        "the Deployment did not change"
    );
    let new_leader = poll_until("the rolled operator pod leads", TIMEOUT, || async {
        let all = pods.list(&operators).await.ok()?.items;
        let live: Vec<&Pod> = all
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        let pod = live.iter().find(|p| running_and_ready(p))?;
        let lease = leases.get_opt("holdfast-operator").await.ok()??;
        (live.len() == 1
            && pod.name_any() != leader
            && lease.spec?.holder_identity? == pod.name_any())
        .then(|| pod.name_any())
    })
    .await
    .with_context(|| operator_logs(h, &ns))?;
    let env = pods
        .get(&new_leader)
        .await?
        .spec
        .context("spec")?
        .containers[0]
        .env
        .clone()
        .unwrap_or_default();
    ensure!(
        env.iter()
            .any(|e| e.name == "HOLDFAST_LOG" && e.value.as_deref() == Some("debug"))
    );

    // Uninstall: the operator goes; the CRD, the CaptureCluster, the claim,
    // its Retain volume and the buffer file on it stay.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let claim = claims.get("buffer-events-0").await?;
    let volume = claim
        .spec
        .and_then(|s| s.volume_name)
        .context("claim not bound")?;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    poll_until("the volume is Retain", TIMEOUT, || async {
        let pv = pvs.get(&volume).await.ok()?;
        (pv.spec?.persistent_volume_reclaim_policy.as_deref() == Some("Retain")).then_some(())
    })
    .await?;
    helm(
        h,
        &[
            "uninstall",
            "holdfast",
            "-n",
            &ns,
            "--wait",
            "--timeout",
            "2m",
        ],
    )
    .await?;
    ensure!(deployments.get_opt("holdfast-operator").await?.is_none());
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    ensure!(
        crds.get_opt("captureclusters.holdfast.dev")
            .await?
            .is_some(),
        "helm uninstall deleted the CRD"
    );
    ensure!(
        ccs.get_opt("events").await?.is_some(),
        "helm uninstall deleted the CaptureCluster"
    );
    ensure!(
        claims.get_opt("buffer-events-0").await?.is_some(),
        "the claim is gone"
    );
    let pv = pvs.get(&volume).await?;
    ensure!(
        pv.spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
            == Some("Retain"),
        "the volume is no longer Retain"
    );
    let path = storage::volume_path(&pv).context("volume path")?;
    ensure!(
        path.join("buffer.db").is_file(),
        "no buffer at {} after uninstall",
        path.display()
    );
    Ok(())
}
