//! The operator as the chart will run it: a Deployment of two replicas whose
//! pods (run by the node agent) use the in-cluster identity of the
//! `holdfast-operator` ServiceAccount, bound only to the operator's
//! ClusterRole and leader-election Role. One replica leads and is Ready; the
//! standby stays unready; the leader reconciles a CaptureCluster.
//!
//! Needs: `make e2e-bins` and the workspace binaries (`cargo build --bins`).

mod operator_support;

use anyhow::{Context, ensure};
use holdfast_e2e::kube::{self as harness, poll_until};
use holdfast_operator::api::CaptureCluster;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use operator_support::{TIMEOUT, init_tracing, install_cluster_wide, operator_identity, pod_ready};
use serde_json::json;

fn deployment() -> anyhow::Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": "holdfast-operator"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app.kubernetes.io/name": "holdfast-operator"}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "holdfast-operator"}},
                "spec": {
                    "serviceAccountName": "holdfast-operator",
                    "terminationGracePeriodSeconds": 10,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532},
                    "containers": [{
                        "name": "operator",
                        "image": "holdfast/operator:dev",
                        "args": ["run"],
                        "env": [
                            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "HOLDFAST_WATCH_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            {"name": "HOLDFAST_OPERATOR_LISTEN", "value": "$(POD_IP):8081"},
                            {"name": "HOLDFAST_LEASE_DURATION_SECS", "value": "6"},
                            {"name": "HOLDFAST_LEASE_GRACE_SECS", "value": "2"},
                            {"name": "HOLDFAST_LOG_FORMAT", "value": "json"},
                        ],
                        "ports": [{"name": "http", "containerPort": 8081}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1},
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
                        "securityContext": {
                            "readOnlyRootFilesystem": true,
                            "allowPrivilegeEscalation": false,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }],
                },
            },
        },
    }))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_pods_use_their_service_account_and_one_leads() -> anyhow::Result<()> {
    init_tracing();
    let h = harness::shared().await;
    let client = h.client()?;
    install_cluster_wide(&client).await?;
    let ns = h.namespace("op-pod").await?;
    operator_identity(h, &ns).await?;
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &deployment()?)
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // Every operator container's log in this namespace (the agent keeps
    // `<pod dir>/<container>.log`, named `<namespace>_<pod>_<uid>`).
    let logs = || {
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
    };
    let selector = ListParams::default().labels("app.kubernetes.io/name=holdfast-operator");
    let leader = poll_until("one operator pod ready, one standby", TIMEOUT, || async {
        let all = pods.list(&selector).await.ok()?.items;
        let running = all
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        let ready: Vec<&Pod> = all.iter().filter(|p| pod_ready(p)).collect();
        (all.len() == 2 && running == 2 && ready.len() == 1).then(|| ready[0].name_any())
    })
    .await
    .with_context(logs)?;
    // The Lease names the ready pod (its identity is POD_NAME).
    let lease = Api::<Lease>::namespaced(client.clone(), &ns)
        .get("holdfast-operator")
        .await?;
    let holder = lease
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    ensure!(
        holder == leader,
        "lease held by {holder}, ready pod is {leader}"
    );

    let cc: CaptureCluster = serde_json::from_value(json!({
        "apiVersion": "holdfast.dev/v1alpha1",
        "kind": "CaptureCluster",
        "metadata": {"name": "incluster"},
        "spec": {
            "replicas": 0,
            "image": "holdfast/capture:dev",
            "kafka": {"bootstrapServers": "127.0.0.1:9"},
            "storage": {"size": "64Mi"},
        },
    }))?;
    Api::<CaptureCluster>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &cc)
        .await?;
    let stss: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    poll_until(
        "statefulset applied by the operator pod",
        TIMEOUT,
        || async { stss.get_opt("incluster").await.ok()?.map(|_| ()) },
    )
    .await
    .with_context(logs)?;
    let text = logs();
    ensure!(text.contains("leading"), "no leader in the logs:\n{text}");
    ensure!(!text.contains("forbidden"), "refused requests:\n{text}");
    Ok(())
}
