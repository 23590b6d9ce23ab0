//! The chart against the real API server: every rendered document passes a
//! server-side dry-run, and the chart's ValidatingAdmissionPolicy fences a
//! capture pod (its ServiceAccount, with a token bound to the pod) to the
//! reclaim policy and `holdfast.dev/*` annotations of the one
//! PersistentVolume bound to its own claim: not its sibling pods' volumes,
//! not other applications' volumes in its namespace, not other namespaces'.
//!
//! Needs: `make e2e-bins` (control plane and helm).

mod chart_support;

use anyhow::{Context, bail, ensure};
use chart_support::{
    TIMEOUT, apply, describe, init_tracing, install_crds, monitoring_crds, template,
};
use holdfast_e2e::kube::{self as harness, poll_until};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{PersistentVolume, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

/// The values that turn every optional part on (without the CRDs of the
/// monitoring kinds the API server would refuse them).
fn all_on(namespace: &str) -> Vec<String> {
    [
        "--set",
        "captureCluster.enabled=true",
        "--set",
        "captureCluster.kafka.bootstrapServers=kafka.example:9092",
        "--set",
        "captureCluster.storage.bufferQuotaBytes=1000000",
        "--set",
        "captureCluster.storage.size=64Mi",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "operator.replicas=2",
        "--api-versions",
        "holdfast.dev/v1alpha1/CaptureCluster",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--set".into(),
        format!("operator.watchNamespace={namespace}"),
    ])
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rendered_document_passes_a_server_side_dry_run() -> anyhow::Result<()> {
    init_tracing();
    let h = harness::shared().await;
    let client = h.client()?;
    let ns = h.namespace("chart-dry").await?;
    let args = all_on(&ns);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let defaults = template("dry", &ns, &[])?;
    let everything = template("dry", &ns, &args)?;

    // CRDs first (a dry-run CRD does not make its kind known), then the rest.
    install_crds(&client, &monitoring_crds()).await?;
    install_crds(&client, &everything).await?;
    let mut checked = 0;
    for doc in defaults.iter().chain(&everything) {
        if doc["kind"] == "CustomResourceDefinition" {
            continue;
        }
        let applied = apply(&client, doc, true).await?;
        ensure!(
            applied.name_any() == doc["metadata"]["name"].as_str().unwrap_or_default(),
            "dry-run of {} answered another object",
            describe(doc)
        );
        checked += 1;
    }
    ensure!(checked >= 20, "only {checked} documents dry-run");
    // A dry-run stores nothing.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), &ns);
    ensure!(
        deployments
            .get_opt("dry-holdfast-operator")
            .await?
            .is_none(),
        "the dry-run created the Deployment"
    );
    Ok(())
}

/// A PersistentVolume claimed (pre-bound) by `claim` in `namespace`, or by
/// nobody.
fn pv(name: &str, claim: Option<(&str, &str)>) -> anyhow::Result<PersistentVolume> {
    let mut spec = json!({
        "capacity": {"storage": "1Gi"},
        "accessModes": ["ReadWriteOnce"],
        "persistentVolumeReclaimPolicy": "Retain",
        "storageClassName": "chart-admission-test",
        "hostPath": {"path": format!("/tmp/holdfast-chart-admission/{name}")},
    });
    if let Some((namespace, claim)) = claim {
        spec["claimRef"] = json!({"namespace": namespace, "name": claim});
    }
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": {"holdfast.dev/cluster": "events"},
            "annotations": {"example.com/owner": "storage-team", "holdfast.dev/clean": "false"},
        },
        "spec": spec,
    }))?)
}

/// Creates ServiceAccount `namespace/name`.
async fn create_service_account(
    client: &Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<()> {
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}}))?,
        )
        .await?;
    Ok(())
}

/// A pod `namespace/name` running as ServiceAccount `sa`, held back from
/// scheduling (it exists only so that tokens can be bound to it).
async fn held_pod(client: &Client, namespace: &str, name: &str, sa: &str) -> anyhow::Result<Pod> {
    Ok(Api::<Pod>::namespaced(client.clone(), namespace)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {
                    "serviceAccountName": sa,
                    "schedulingGates": [{"name": "holdfast.dev/never"}],
                    "containers": [{"name": "capture", "image": "example.invalid/none"}],
                },
            }))?,
        )
        .await?)
}

/// A client authenticated as ServiceAccount `namespace/name` with a token
/// from the TokenRequest API, bound to `pod` as the kubelet binds the
/// tokens it projects (the token then names the pod in its extra claims),
/// or bound to nothing.
async fn service_account_client(
    h: &harness::Harness,
    client: &Client,
    namespace: &str,
    name: &str,
    pod: Option<&Pod>,
) -> anyhow::Result<Client> {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let token = sas
        .create_token_request(
            name,
            &PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    audiences: vec![],
                    expiration_seconds: Some(3600),
                    bound_object_ref: pod.map(|p| BoundObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Pod".into()),
                        name: p.metadata.name.clone(),
                        uid: p.metadata.uid.clone(),
                    }),
                },
                ..Default::default()
            },
        )
        .await?
        .status
        .context("token request has no status")?
        .token;
    Ok(h.control_plane().token_client(&token)?)
}

/// What a request returned: Ok, or the API server's message.
async fn outcome<T>(
    request: impl std::future::Future<Output = kube::Result<T>>,
) -> Result<(), String> {
    match request.await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) => Err(format!("{} {}", e.code, e.message)),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_policy_fences_capture_pods_to_their_own_volume() -> anyhow::Result<()> {
    init_tracing();
    let h = harness::shared().await;
    let admin = h.client()?;
    let own = h.namespace("chart-own").await?;
    let other = h.namespace("chart-other").await?;

    // The chart's policy, binding and capture ClusterRole, for real.
    let docs = template("fence", &own, &[])?;
    let policy_name = "fence-holdfast-capture-volume-guard";
    for doc in &docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if kind.starts_with("ValidatingAdmissionPolicy")
            || (kind == "ClusterRole" && doc["metadata"]["name"] == "fence-holdfast-capture")
        {
            apply(&admin, doc, false).await?;
        }
    }

    // Capture pods are bound to the capture ClusterRole (get, patch PVs); to
    // show that the policy, not RBAC, is what refuses, this test also grants
    // them every verb on PVs and their status.
    let broad: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": format!("chart-admission-pv-all-{own}")},
        "rules": [{"apiGroups": [""], "resources": ["persistentvolumes", "persistentvolumes/status"], "verbs": ["*"]}],
    }))?;
    Api::<ClusterRole>::all(admin.clone())
        .create(&PostParams::default(), &broad)
        .await?;
    let bind = |name: &str, role: &str, sa: &str| -> anyhow::Result<ClusterRoleBinding> {
        Ok(serde_json::from_value(json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": own}],
        }))?)
    };
    let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    for (sa, role) in [
        ("events-capture", "fence-holdfast-capture".to_string()),
        ("events-capture", broad.name_any()),
        ("reporter", broad.name_any()),
    ] {
        bindings
            .create(
                &PostParams::default(),
                &bind(&format!("chart-admission-{own}-{sa}-{role}"), &role, sa)?,
            )
            .await?;
    }
    create_service_account(&admin, &own, "events-capture").await?;
    create_service_account(&admin, &own, "reporter").await?;
    // Two pods of CaptureCluster `events`; each patches its own volume
    // with a token bound to it, as the kubelet projects it.
    let pod0 = held_pod(&admin, &own, "events-0", "events-capture").await?;
    let pod1 = held_pod(&admin, &own, "events-1", "events-capture").await?;
    let capture = service_account_client(h, &admin, &own, "events-capture", Some(&pod0)).await?;
    let sibling = service_account_client(h, &admin, &own, "events-capture", Some(&pod1)).await?;
    let unbound = service_account_client(h, &admin, &own, "events-capture", None).await?;
    let not_capture = service_account_client(h, &admin, &own, "reporter", None).await?;

    let pvs_admin: Api<PersistentVolume> = Api::all(admin.clone());
    let mine = format!("{own}-mine");
    let siblings = format!("{own}-sibling");
    let app = format!("{own}-app");
    let theirs = format!("{own}-theirs");
    let unclaimed = format!("{own}-unclaimed");
    let probe = format!("{own}-probe");
    for volume in [
        pv(&probe, None)?,
        pv(&mine, Some((&own, "buffer-events-0")))?,
        pv(&siblings, Some((&own, "buffer-events-1")))?,
        // Another application's volume in the same namespace.
        pv(&app, Some((&own, "data-postgres-0")))?,
        // The same claim name in another namespace.
        pv(&theirs, Some((&other, "buffer-events-0")))?,
        pv(&unclaimed, None)?,
    ] {
        pvs_admin.create(&PostParams::default(), &volume).await?;
    }
    let pvs: Api<PersistentVolume> = Api::all(capture.clone());
    let merge = |patch: Value| Patch::Merge(patch);
    let params = PatchParams::default();

    // The policy is enforced once the API server has loaded it (probed on
    // a volume of its own: changes before that go through).
    poll_until("the admission policy denies", TIMEOUT, || async {
        outcome(pvs.patch(
            &probe,
            &params,
            &merge(json!({"metadata": {"labels": {"example.com/probe": uuid::Uuid::new_v4().simple().to_string()}}})),
        ))
        .await
        .err()
        .filter(|m| m.contains(policy_name))
    })
    .await?;

    // What the capture pod's volume guard does is allowed on its own volume.
    for (what, patch) in [
        (
            "Retain before ready",
            json!({
                "metadata": {"annotations": {"holdfast.dev/clean": "false", "holdfast.dev/volume-id": "0190a6e2-6f1b-7c3a-9f00-000000000001"}},
                "spec": {"persistentVolumeReclaimPolicy": "Retain"},
            }),
        ),
        (
            "Delete after a clean drain",
            json!({
                "metadata": {"annotations": {"holdfast.dev/clean": "true", "holdfast.dev/remaining-events": "0"}},
                "spec": {"persistentVolumeReclaimPolicy": "Delete"},
            }),
        ),
        (
            "remove a holdfast annotation",
            json!({"metadata": {"annotations": {"holdfast.dev/remaining-events": null}}}),
        ),
    ] {
        outcome(pvs.patch(&mine, &params, &merge(patch)))
            .await
            .map_err(|m| anyhow::anyhow!("{what} was refused: {m}"))?;
    }
    let after = pvs_admin.get(&mine).await?;
    let spec = after.spec.clone().unwrap_or_default();
    ensure!(spec.persistent_volume_reclaim_policy.as_deref() == Some("Delete"));
    ensure!(
        after
            .annotations()
            .get("holdfast.dev/clean")
            .map(String::as_str)
            == Some("true")
    );
    // The sibling pod may change its own volume, too.
    let retain = json!({"spec": {"persistentVolumeReclaimPolicy": "Retain"}});
    outcome(Api::<PersistentVolume>::all(sibling).patch(
        &siblings,
        &params,
        &merge(retain.clone()),
    ))
    .await
    .map_err(|m| anyhow::anyhow!("pod events-1 was refused its own volume: {m}"))?;

    // Everything else is denied by the policy, naming why.
    let clean = json!({"metadata": {"annotations": {"holdfast.dev/clean": "true"}}});
    let delete_policy = json!({"spec": {"persistentVolumeReclaimPolicy": "Delete"}});
    let denied: Vec<(&str, &str, Value, &str)> = vec![
        (
            "reclaim policy of the sibling pod's volume",
            &siblings,
            delete_policy.clone(),
            "is claimed by",
        ),
        (
            "holdfast annotation of the sibling pod's volume",
            &siblings,
            clean.clone(),
            "own claim",
        ),
        (
            "reclaim policy of another application's volume",
            &app,
            delete_policy.clone(),
            "data-postgres-0",
        ),
        (
            "reclaim policy of the same claim name in another namespace",
            &theirs,
            delete_policy.clone(),
            "is claimed by",
        ),
        (
            "holdfast annotation of another namespace's volume",
            &theirs,
            clean.clone(),
            "own claim",
        ),
        (
            "an unclaimed volume",
            &unclaimed,
            delete_policy.clone(),
            "not claimed",
        ),
        (
            "the claim reference's namespace",
            &mine,
            json!({"spec": {"claimRef": {"namespace": other.clone()}}}),
            "own claim",
        ),
        (
            "another annotation",
            &mine,
            json!({"metadata": {"annotations": {"example.com/owner": "me"}}}),
            "holdfast.dev/* annotations",
        ),
        (
            "a label",
            &mine,
            json!({"metadata": {"labels": {"holdfast.dev/cluster": "other"}}}),
            "labels",
        ),
        (
            "a finalizer",
            &mine,
            json!({"metadata": {"finalizers": ["example.com/hold"]}}),
            "finalizers",
        ),
        (
            "the claim reference's uid",
            &mine,
            json!({"spec": {"claimRef": {"uid": "7f0b8d4e-0000-4000-8000-000000000000"}}}),
            "spec.claimRef",
        ),
        (
            "the storage class",
            &mine,
            json!({"spec": {"storageClassName": "faster"}}),
            "spec.storageClassName",
        ),
        (
            "the capacity",
            &mine,
            json!({"spec": {"capacity": {"storage": "2Gi"}}}),
            "spec.capacity",
        ),
        (
            "reclaim policy Recycle",
            &mine,
            json!({"spec": {"persistentVolumeReclaimPolicy": "Recycle"}}),
            "only to Retain or Delete",
        ),
    ];
    for (what, name, patch, reason) in &denied {
        match outcome(pvs.patch(name, &params, &merge(patch.clone()))).await {
            Ok(()) => bail!("capture pod events-0 could change {what}"),
            Err(m) => ensure!(
                m.contains(policy_name) && m.contains(reason),
                "changing {what} was refused, but not by the policy for '{reason}': {m}"
            ),
        }
    }
    // A token not bound to a pod (a legacy or hand-made token) changes
    // nothing, not even a volume of its namespace named like a capture claim.
    let unbound_patch =
        outcome(Api::<PersistentVolume>::all(unbound).patch(&mine, &params, &merge(retain))).await;
    ensure!(
        unbound_patch
            .as_ref()
            .is_err_and(|m| m.contains(policy_name) && m.contains("bound to its pod")),
        "unbound token: {unbound_patch:?}"
    );
    let status_patch =
        outcome(pvs.patch_status(&mine, &params, &merge(json!({"status": {"message": "hi"}}))))
            .await;
    ensure!(
        status_patch
            .as_ref()
            .is_err_and(|m| m.contains(policy_name)),
        "status update: {status_patch:?}"
    );
    let delete = outcome(pvs.delete(&mine, &DeleteParams::default())).await;
    ensure!(
        delete.as_ref().is_err_and(|m| m.contains(policy_name)),
        "delete: {delete:?}"
    );
    let create = outcome(pvs.create(
        &PostParams::default(),
        &pv(&format!("{own}-new"), Some((&own, "buffer-events-0")))?,
    ))
    .await;
    ensure!(
        create.as_ref().is_err_and(|m| m.contains(policy_name)),
        "create: {create:?}"
    );
    // Nothing of the denied changes stuck.
    let kept = pvs_admin.get(&mine).await?;
    ensure!(
        kept.labels()
            .get("holdfast.dev/cluster")
            .map(String::as_str)
            == Some("events")
    );
    ensure!(
        kept.annotations()
            .get("example.com/owner")
            .map(String::as_str)
            == Some("storage-team")
    );
    ensure!(kept.finalizers().iter().all(|f| f != "example.com/hold"));
    for name in [&siblings, &app, &theirs] {
        let now = pvs_admin.get(name).await?;
        ensure!(
            now.spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
                == Some("Retain"),
            "{name} lost Retain"
        );
        ensure!(
            now.annotations()
                .get("holdfast.dev/clean")
                .map(String::as_str)
                == Some("false"),
            "{name} was marked clean"
        );
    }

    // Other identities are not affected: a ServiceAccount not named
    // *-capture (same RBAC) and the admin may change what they are allowed to.
    let others: Api<PersistentVolume> = Api::all(not_capture);
    outcome(others.patch(
        &theirs,
        &params,
        &merge(json!({"metadata": {"labels": {"example.com/checked": "yes"}}})),
    ))
    .await
    .map_err(|m| anyhow::anyhow!("a non-capture service account was refused: {m}"))?;
    outcome(pvs_admin.patch(
        &mine,
        &params,
        &merge(json!({"metadata": {"annotations": {"example.com/owner": "admin"}}})),
    ))
    .await
    .map_err(|m| anyhow::anyhow!("the admin was refused: {m}"))?;

    for name in [&mine, &siblings, &app, &theirs, &unclaimed, &probe] {
        let _ = pvs_admin.delete(name, &DeleteParams::default()).await;
    }
    Ok(())
}
