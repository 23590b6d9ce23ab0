//! The operator under the chart's own RBAC with `operator.watchNamespace`
//! set, on the real control plane: Roles in the watched namespace, a
//! ClusterRole with cluster-scoped resources only. The operator reconciles a
//! CaptureCluster (ServiceAccount, Role, StatefulSet, status, its capture
//! ServiceAccount added to the capture ClusterRoleBinding) and lets it go on
//! deletion (subject removed, finalizer released, its
//! `holdfast_operator_cluster_*{namespace, cluster}` series gone) without
//! one request refused; the same identity is refused pods of another namespace and any
//! ClusterRoleBinding but the capture one.
//!
//! Needs: `make e2e-bins` and the workspace binaries (`cargo build --bins`).

mod chart_support;
mod operator_support;

use anyhow::{Context, ensure};
use chart_support::{apply, install_crds, template};
use holdfast_e2e::kube::{self as harness, poll_until};
use holdfast_operator::api::CaptureCluster;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, DeleteParams, PostParams};
use operator_support::{Operator, TIMEOUT};
use serde_json::json;

/// Outcome of a request: Ok, or the API server's status code.
async fn code<T>(request: impl std::future::Future<Output = kube::Result<T>>) -> Result<(), u16> {
    match request.await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) => Err(e.code),
        Err(_) => Err(0),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_runs_a_cluster_under_the_charts_namespaced_rbac() -> anyhow::Result<()> {
    operator_support::init_tracing();
    let h = harness::shared().await;
    let admin = h.client()?;
    let ns = h.namespace("chart-scoped").await?;
    // The release is named after the namespace: its cluster-scoped objects
    // (ClusterRoles, bindings) are this test's own.
    let release = ns.clone();
    let docs = template(
        &release,
        &ns,
        &["--set", &format!("operator.watchNamespace={ns}")],
    )?;
    install_crds(&admin, &docs).await?;
    let mut kinds = Vec::new();
    for doc in &docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        ]
        .contains(&kind)
        {
            apply(&admin, doc, false).await?;
            kinds.push(kind);
        }
    }
    ensure!(
        kinds.contains(&"Role") && kinds.contains(&"ClusterRole"),
        "{kinds:?}"
    );

    // The operator's identity: the chart's ServiceAccount, nothing else.
    let sa = format!("{release}-holdfast-operator");
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create_token_request(
            &sa,
            &PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    audiences: vec![],
                    expiration_seconds: Some(3600),
                    bound_object_ref: None,
                },
                ..Default::default()
            },
        )
        .await?
        .status
        .context("token request without status")?
        .token;
    let cp = h.control_plane();
    let kubeconfig = h.dir().join(format!("operator-{ns}.kubeconfig"));
    std::fs::write(
        &kubeconfig,
        serde_yaml::to_string(&json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": cp.url(),
                "certificate-authority": cp.pki().ca_cert.display().to_string(),
            }}],
            "users": [{"name": "operator", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "operator", "namespace": ns}}],
            "current-context": "test",
        }))?,
    )?;
    let capture_role = format!("{release}-holdfast-capture");
    let operator = Operator::start_with_env(
        h,
        &ns,
        &kubeconfig,
        "scoped",
        &[("HOLDFAST_CAPTURE_CLUSTER_ROLE", &capture_role)],
    )?;
    poll_until("the operator leads", TIMEOUT, || async {
        operator.leads().await.then_some(())
    })
    .await
    .with_context(|| operator.log_text())?;

    let cc: CaptureCluster = serde_json::from_value(json!({
        "apiVersion": "holdfast.dev/v1alpha1",
        "kind": "CaptureCluster",
        "metadata": {"name": "events"},
        "spec": {
            "replicas": 0,
            "image": "holdfast/capture:dev",
            "kafka": {"bootstrapServers": "127.0.0.1:9"},
            "storage": {"size": "64Mi"},
        },
    }))?;
    let ccs: Api<CaptureCluster> = Api::namespaced(admin.clone(), &ns);
    ccs.create(&PostParams::default(), &cc).await?;
    let stss: Api<StatefulSet> = Api::namespaced(admin.clone(), &ns);
    let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    let bound = || async {
        let binding = bindings.get_opt(&capture_role).await.ok()??;
        Some(binding.subjects.unwrap_or_default().iter().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == "events-capture"
                && s.namespace.as_deref() == Some(ns.as_str())
        }))
    };
    poll_until("cluster reconciled and its pods bound", TIMEOUT, || async {
        stss.get_opt("events").await.ok()??;
        let status = ccs.get("events").await.ok()?.status?;
        status.observed_generation?;
        bound().await?.then_some(())
    })
    .await
    .with_context(|| operator.log_text())?;

    // Its per-cluster series, labelled with the cluster's namespace.
    let series = format!(
        "holdfast_operator_cluster_desired_replicas{{namespace=\"{ns}\",cluster=\"events\"}} 0"
    );
    poll_until("per-cluster metrics published", TIMEOUT, || async {
        operator.metrics().await?.contains(&series).then_some(())
    })
    .await
    .with_context(|| operator.log_text())?;

    ccs.delete("events", &DeleteParams::default()).await?;
    poll_until("cluster deleted through its finalizer", TIMEOUT, || async {
        matches!(ccs.get_opt("events").await, Ok(None)).then_some(())
    })
    .await
    .with_context(|| operator.log_text())?;
    ensure!(
        bound().await == Some(false),
        "capture ServiceAccount still bound"
    );
    poll_until("per-cluster metrics removed", TIMEOUT, || async {
        (!operator.metrics().await?.contains("cluster=\"events\"")).then_some(())
    })
    .await?;
    operator.ensure_never_forbidden()?;

    // The same identity outside its namespace and its one binding.
    let as_operator = cp.token_client(&token)?;
    let elsewhere =
        code(Api::<Pod>::namespaced(as_operator.clone(), "default").list(&Default::default()))
            .await;
    ensure!(
        elsewhere == Err(403),
        "pods of namespace default: {elsewhere:?}"
    );
    let own =
        code(Api::<Pod>::namespaced(as_operator.clone(), &ns).list(&Default::default())).await;
    ensure!(own.is_ok(), "pods of its own namespace: {own:?}");
    let other_binding =
        code(Api::<ClusterRoleBinding>::all(as_operator.clone()).get("cluster-admin")).await;
    ensure!(
        other_binding == Err(403),
        "clusterrolebinding cluster-admin: {other_binding:?}"
    );
    let delete_binding = code(
        Api::<ClusterRoleBinding>::all(as_operator).delete(&capture_role, &DeleteParams::default()),
    )
    .await;
    ensure!(
        delete_binding == Err(403),
        "deleting the capture binding: {delete_binding:?}"
    );
    Ok(())
}
