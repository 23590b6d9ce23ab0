//! The operator on the real control plane, with real Kafka: a CaptureCluster
//! becomes ServiceAccount, Role, RoleBinding, Services, PodDisruptionBudget
//! and a StatefulSet whose pods the node agent runs; events posted to a pod
//! reach Kafka; every PV ends up `Retain` and labelled (and is corrected
//! when flipped back); scaling 1 → 3 → 1 and a spec change roll as they
//! should; an invalid spec names its field and applies nothing; deletion
//! scales to zero, the pods mark their volumes clean, and the finalizer
//! waits for the one that is not.
//!
//! The operator runs as a child process under a ServiceAccount bound to
//! `operator/rbac/clusterrole.yaml` and nothing else.
//!
//! Needs: `make e2e-bins`, `make kafka`, and the workspace binaries
//! (`cargo build --bins`).

mod operator_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use holdfast_e2e::kafka::KafkaBroker;
use holdfast_e2e::kube::{self as harness, poll_until, storage};
use holdfast_operator::api::{
    CLAIM_LABEL, CLEAN_ANNOTATION, CLUSTER_LABEL, CaptureCluster, FINALIZER, NAMESPACE_LABEL,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, Pod, Service, ServiceAccount,
};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use operator_support::{
    Operator, TIMEOUT, condition, init_tracing, install_cluster_wide, operator_cluster_role,
    operator_identity, operator_identity_bound_to, pod_ready,
};
use serde_json::json;

fn cluster(name: &str, bootstrap: &str, replicas: i32) -> anyhow::Result<CaptureCluster> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "holdfast.dev/v1alpha1",
        "kind": "CaptureCluster",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "image": "holdfast/capture:dev",
            "kafka": {"bootstrapServers": bootstrap, "properties": {"linger.ms": "5"}},
            "streams": [{"name": "clicks", "topic": "clicks"}],
            "storage": {"size": "64Mi", "storageClassName": storage::STORAGE_CLASS},
            "shutdownGracePeriodSeconds": 10,
            // These tests pin down what the operator does without orphan
            // recovery (status, Events, the finalizer waiting); flush Jobs
            // are e2e/tests/orphans.rs's.
            "orphanRecovery": {"enabled": false},
        },
    }))?)
}

async fn ready_pods(pods: &Api<Pod>, name: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels(&format!("{CLUSTER_LABEL}={name}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p))
        .collect()
}

/// Waits until exactly `n` pods of the cluster exist, all Ready, and the
/// CaptureCluster reports them.
async fn wait_ready(client: &Client, ns: &str, name: &str, n: usize) -> anyhow::Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let ccs: Api<CaptureCluster> = Api::namespaced(client.clone(), ns);
    Ok(poll_until(
        &format!("{n} ready pods reported by {name}"),
        TIMEOUT,
        || async {
            let all = pods
                .list(&ListParams::default().labels(&format!("{CLUSTER_LABEL}={name}")))
                .await
                .ok()?
                .items;
            let ready = ready_pods(&pods, name).await;
            let cc = ccs.get(name).await.ok()?;
            let status = cc.status.as_ref()?;
            let ready_cond = condition(&cc, "Ready")?;
            (all.len() == n
                && ready.len() == n
                && status.ready_replicas == n as i32
                && ready_cond.0 == "True")
                .then_some(ready)
        },
    )
    .await?)
}

/// Every bound claim of the cluster has a PV that is `Retain` and labelled
/// with cluster, claim and namespace; returns the PV names by claim.
async fn wait_volumes_retained(
    client: &Client,
    ns: &str,
    name: &str,
    claims_expected: usize,
) -> anyhow::Result<BTreeMap<String, String>> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    Ok(poll_until(
        &format!("{claims_expected} volumes of {name} Retain and labelled"),
        TIMEOUT,
        || async {
            let list = claims
                .list(&ListParams::default().labels(&format!("{CLUSTER_LABEL}={name}")))
                .await
                .ok()?;
            if list.items.len() != claims_expected {
                return None;
            }
            let mut out = BTreeMap::new();
            for claim in list {
                let volume = claim.spec.as_ref()?.volume_name.clone()?;
                let pv = pvs.get(&volume).await.ok()?;
                let policy = pv.spec.as_ref()?.persistent_volume_reclaim_policy.clone()?;
                let labels = pv.labels();
                let ok = policy == "Retain"
                    && labels.get(CLUSTER_LABEL) == Some(&name.to_string())
                    && labels.get(CLAIM_LABEL) == Some(&claim.name_any())
                    && labels.get(NAMESPACE_LABEL) == Some(&ns.to_string());
                if !ok {
                    return None;
                }
                out.insert(claim.name_any(), volume);
            }
            Some(out)
        },
    )
    .await?)
}

fn env_of(sts: &StatefulSet) -> BTreeMap<String, String> {
    sts.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .env
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.clone(), v.value.clone()?)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_cluster_runs_delivers_retains_scales_rolls_and_drains() -> anyhow::Result<()> {
    init_tracing();
    let broker = KafkaBroker::start().await?;
    broker.create_topic("clicks", 1, &[]).await?;
    let h = harness::shared().await;
    let client = h.client()?;
    install_cluster_wide(&client).await?;
    let ns = h.namespace("op").await?;
    let kubeconfig = operator_identity(h, &ns).await?;
    let operator = Operator::start(h, &ns, &kubeconfig, "op-a")?;
    let name = "events";
    let ccs: Api<CaptureCluster> = Api::namespaced(client.clone(), &ns);
    ccs.create(
        &PostParams::default(),
        &cluster(name, &broker.bootstrap(), 1)?,
    )
    .await?;

    // Every object, with the fields that matter.
    let stss: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let sts = poll_until("statefulset applied", TIMEOUT, || async {
        stss.get_opt(name).await.ok().flatten()
    })
    .await
    .with_context(|| operator.log_text())?;
    let spec = sts.spec.as_ref().context("sts spec")?;
    let pod_spec = spec.template.spec.as_ref().context("pod spec")?;
    let container = &pod_spec.containers[0];
    ensure!(
        container.command.as_deref()
            == Some(&["holdfast-capture".to_string(), "serve".to_string()][..])
    );
    let env = env_of(&sts);
    ensure!(env["HOLDFAST_LISTEN"] == "$(POD_IP):8080");
    ensure!(env["HOLDFAST_KAFKA_BOOTSTRAP"] == broker.bootstrap());
    ensure!(env["HOLDFAST_STREAMS"] == "clicks=clicks:durable");
    ensure!(env["HOLDFAST_DRAIN_TIMEOUT_SECS"] == "5");
    ensure!(pod_spec.termination_grace_period_seconds == Some(10));
    let probe = container
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .context("readiness probe")?;
    ensure!(probe.path.as_deref() == Some("/readyz"));
    let vct = &spec.volume_claim_templates.as_ref().context("vct")?[0];
    ensure!(vct.metadata.name.as_deref() == Some("buffer"));
    ensure!(vct.labels().get(CLUSTER_LABEL).map(String::as_str) == Some(name));
    let owner = &sts.owner_references()[0];
    ensure!(owner.kind == "CaptureCluster" && owner.name == name && owner.controller == Some(true));
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    let headless = svcs.get(&format!("{name}-headless")).await?;
    ensure!(headless.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None"));
    svcs.get(name).await?;
    Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns)
        .get(name)
        .await?;
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .get(&format!("{name}-capture"))
        .await?;
    Api::<Role>::namespaced(client.clone(), &ns)
        .get(&format!("{name}-capture"))
        .await?;
    Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .get(&format!("{name}-capture"))
        .await?;
    let cc = ccs.get(name).await?;
    ensure!(cc.finalizers().iter().any(|f| f == FINALIZER));

    // The node agent runs the pod; the cluster reports it ready.
    let started = Instant::now();
    let pods = wait_ready(&client, &ns, name, 1)
        .await
        .with_context(|| operator.log_text())?;
    eprintln!("1 pod ready after {:.1}s", started.elapsed().as_secs_f64());

    // `kubectl get capturecluster` columns (the Table the API server serves).
    let table: serde_json::Value = client
        .request(
            http::Request::get(format!(
                "/apis/holdfast.dev/v1alpha1/namespaces/{ns}/captureclusters"
            ))
            .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
            .body(Vec::new())?,
        )
        .await?;
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .context("columns")?
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for wanted in ["Ready", "Orphans", "Age"] {
        ensure!(
            columns.contains(&wanted),
            "no {wanted} column in {columns:?}"
        );
    }
    let ready_col = columns.iter().position(|c| *c == "Ready").unwrap();
    ensure!(
        table["rows"][0]["cells"][ready_col] == json!(1),
        "Ready column: {}",
        table["rows"][0]["cells"]
    );

    // Events posted to the pod's address arrive in Kafka.
    let ip = pods[0]
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .context("pod ip")?;
    let http = reqwest::Client::new();
    let uuids: Vec<String> = (0..20).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let body: Vec<_> = uuids
        .iter()
        .map(|u| json!({"uuid": u, "action": "click"}))
        .collect();
    let response = http
        .post(format!("http://{ip}:8080/v1/events/clicks"))
        .json(&body)
        .send()
        .await?;
    ensure!(response.status() == 200, "post: {}", response.status());
    let records = broker
        .consume("clicks", uuids.len(), Duration::from_secs(60))
        .await?;
    let got: std::collections::BTreeSet<String> = records
        .iter()
        .filter_map(|r| r.header("holdfast-uuid"))
        .map(|h| String::from_utf8_lossy(h).into_owned())
        .collect();
    ensure!(
        uuids.iter().all(|u| got.contains(u)),
        "{} of {} events in Kafka",
        got.len(),
        uuids.len()
    );

    // The class makes volumes with Delete; the operator sets Retain and labels.
    let volumes = wait_volumes_retained(&client, &ns, name, 1).await?;
    let pv_name = volumes.values().next().context("a volume")?.clone();
    // Flipped back by hand (not marked clean): corrected again.
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    pvs.patch(
        &pv_name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"persistentVolumeReclaimPolicy": "Delete"}})),
    )
    .await?;
    wait_volumes_retained(&client, &ns, name, 1).await?;

    // Scale 1 → 3 → 1.
    ccs.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3}})),
    )
    .await?;
    wait_ready(&client, &ns, name, 3).await?;
    wait_volumes_retained(&client, &ns, name, 3).await?;
    ccs.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 1}})),
    )
    .await?;
    let pods = wait_ready(&client, &ns, name, 1).await?;
    ensure!(pods[0].name_any() == format!("{name}-0"));
    // Claims outlive a scale-down. The two pods drained into Kafka on
    // SIGTERM and, through the ClusterRoleBinding the operator made, marked
    // their volumes clean and `Delete` themselves; the operator leaves a
    // clean volume's policy alone.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let volume_of = |claim: String| {
        let claims = claims.clone();
        async move { claims.get(&claim).await.ok()?.spec?.volume_name }
    };
    let mut scaled_away = Vec::new();
    for i in [1, 2] {
        let volume = volume_of(format!("buffer-{name}-{i}"))
            .await
            .context("scaled-away claim lost its volume")?;
        poll_until(&format!("{volume} clean and Delete"), TIMEOUT, || async {
            let pv = pvs.get(&volume).await.ok()?;
            let clean = pv.annotations().get(CLEAN_ANNOTATION).map(String::as_str) == Some("true");
            let policy = pv.spec?.persistent_volume_reclaim_policy?;
            (clean && policy == "Delete").then_some(())
        })
        .await?;
        scaled_away.push(volume);
    }
    // A volume whose pod could not drain (simulated: not clean) is an
    // orphan: `Retain` again, counted in the status, named in an Event.
    let stuck = scaled_away[1].clone();
    pvs.patch(
        &stuck,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {CLEAN_ANNOTATION: "false"}}})),
    )
    .await?;
    poll_until(
        "1 orphaned volume reported and retained",
        TIMEOUT,
        || async {
            let cc = ccs.get(name).await.ok()?;
            let pv = pvs.get(&stuck).await.ok()?;
            let retained = pv.spec?.persistent_volume_reclaim_policy? == "Retain";
            (cc.status?.orphaned_volumes == 1 && retained).then_some(())
        },
    )
    .await
    .with_context(|| operator.log_text())?;

    // A spec change (a producer property) rolls the pod.
    let old_uid = pods[0].uid().context("uid")?;
    ccs.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"kafka": {"properties": {"linger.ms": "20"}}}})),
    )
    .await?;
    let podsapi: Api<Pod> = Api::namespaced(client.clone(), &ns);
    poll_until("pod rolled with the new property", TIMEOUT, || async {
        let pod = podsapi.get(&format!("{name}-0")).await.ok()?;
        let env: BTreeMap<_, _> = pod.spec.as_ref()?.containers[0]
            .env
            .iter()
            .flatten()
            .filter_map(|v| Some((v.name.clone(), v.value.clone()?)))
            .collect();
        (pod.uid()? != old_uid
            && pod_ready(&pod)
            && env.get("HOLDFAST_KAFKA_PROPERTIES").map(String::as_str) == Some("linger.ms=20"))
        .then_some(())
    })
    .await?;
    wait_ready(&client, &ns, name, 1).await?;
    let cc = ccs.get(name).await?;
    ensure!(
        cc.status.as_ref().and_then(|s| s.observed_generation) == cc.metadata.generation,
        "status describes generation {:?}, spec is {:?}",
        cc.status.as_ref().and_then(|s| s.observed_generation),
        cc.metadata.generation
    );

    // The operator said what it did.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("CaptureCluster"))
        .filter_map(|e| e.reason.clone())
        .collect();
    for wanted in ["Applied", "VolumeRetained", "OrphanedVolumes"] {
        ensure!(
            reasons.iter().any(|r| r == wanted),
            "no {wanted} event in {reasons:?}"
        );
    }

    // Deletion: scaled to zero, the last pod drains and marks its volume
    // clean, then the finalizer waits for the volume that is not, and says so.
    // The pods' PV access: their ServiceAccount is a subject of the one
    // capture ClusterRoleBinding (named like the role it binds).
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    let capture_sa = format!("{name}-capture");
    let bound = || async {
        let binding = bindings.get_opt("holdfast-capture").await?;
        anyhow::Ok(binding.and_then(|b| b.subjects).is_some_and(|subjects| {
            subjects
                .iter()
                .any(|s| s.name == capture_sa && s.namespace.as_deref() == Some(ns.as_str()))
        }))
    };
    ensure!(bound().await?, "capture ServiceAccount not bound");
    ccs.delete(name, &DeleteParams::default()).await?;
    let message = poll_until("deletion waits for the stuck volume", TIMEOUT, || async {
        let cc = ccs.get(name).await.ok()?;
        let (status, reason, message) = condition(&cc, "Draining")?;
        (status == "True" && reason == "VolumesHoldEvents").then_some(message)
    })
    .await
    .with_context(|| operator.log_text())?;
    ensure!(
        message.contains(&stuck) && message.starts_with("1 volume"),
        "{message}"
    );
    let remaining = podsapi
        .list(&ListParams::default().labels(&format!("{CLUSTER_LABEL}={name}")))
        .await?;
    ensure!(remaining.items.is_empty(), "pods left after scale to zero");
    let first = pvs.get(&pv_name).await?;
    ensure!(
        first
            .annotations()
            .get(CLEAN_ANNOTATION)
            .map(String::as_str)
            == Some("true"),
        "the last pod did not mark its volume clean"
    );
    // Once that volume is clean too (what a flush Job does when recovery is
    // enabled), the finalizer goes, with the pods' ClusterRoleBinding.
    pvs.patch(
        &stuck,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {CLEAN_ANNOTATION: "true"}}})),
    )
    .await?;
    poll_until("capturecluster gone", TIMEOUT, || async {
        matches!(ccs.get_opt(name).await, Ok(None)).then_some(())
    })
    .await
    .with_context(|| operator.log_text())?;
    ensure!(!bound().await?, "capture ServiceAccount still bound");
    operator.ensure_never_forbidden()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_spec_names_the_field_and_applies_nothing() -> anyhow::Result<()> {
    init_tracing();
    let h = harness::shared().await;
    let client = h.client()?;
    install_cluster_wide(&client).await?;
    let ns = h.namespace("op-invalid").await?;
    let kubeconfig = operator_identity(h, &ns).await?;
    let operator = Operator::start(h, &ns, &kubeconfig, "op-b")?;
    let ccs: Api<CaptureCluster> = Api::namespaced(client.clone(), &ns);

    // The documented example, every field set, passes the schema.
    let mut example: CaptureCluster = serde_yaml::from_str(&std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../operator/examples/capturecluster.yaml"
    ))?)?;
    example.metadata.namespace = Some(ns.clone());
    ccs.create(
        &PostParams {
            dry_run: true,
            ..Default::default()
        },
        &example,
    )
    .await
    .context("server-side dry run of operator/examples/capturecluster.yaml")?;

    // What the schema checks, the API server refuses, naming the field.
    let mut bad = cluster("schema", "kafka:9092", 1)?;
    bad.spec.replicas = -1;
    let err = ccs
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("negative replicas accepted");
    ensure!(err.to_string().contains("spec.replicas"), "{err}");

    // What only the reconciler checks (the CRD's CEL rules cover the
    // cross-field checks, e2e/tests/operator_api.rs): a condition names
    // the field.
    let mut bad = cluster("quota", "kafka:9092", 1)?;
    bad.spec.kafka.bootstrap_servers = "no-port".into();
    ccs.create(&PostParams::default(), &bad).await?;
    let (reason, message) = poll_until("SpecValid=False", TIMEOUT, || async {
        let cc = ccs.get("quota").await.ok()?;
        let (status, reason, message) = condition(&cc, "SpecValid")?;
        (status == "False").then_some((reason, message))
    })
    .await
    .with_context(|| operator.log_text())?;
    ensure!(reason == "InvalidSpec");
    ensure!(message.contains("spec.kafka.bootstrapServers"), "{message}");
    // Nothing was applied.
    let stss: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    ensure!(stss.get_opt("quota").await?.is_none());
    ensure!(svcs.get_opt("quota").await?.is_none());
    ensure!(sas.get_opt("quota-capture").await?.is_none());
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    poll_until("InvalidSpec event", TIMEOUT, || async {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("InvalidSpec")
                    && e.note
                        .as_deref()
                        .is_some_and(|n| n.contains("spec.kafka.bootstrapServers"))
            })
            .then_some(())
    })
    .await?;

    // Fixed: applied (replicas 0 keeps it light), condition flips.
    ccs.patch(
        "quota",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {
            "replicas": 0,
            "kafka": {"bootstrapServers": "kafka:9092"},
            "storage": {"bufferQuotaBytes": 32 << 20},
        }})),
    )
    .await?;
    poll_until("fixed spec applied", TIMEOUT, || async {
        let cc = ccs.get("quota").await.ok()?;
        let valid = condition(&cc, "SpecValid")?.0 == "True";
        let sts = stss.get_opt("quota").await.ok()??;
        (valid && env_of(&sts)["HOLDFAST_BUFFER_QUOTA_BYTES"] == (32u64 << 20).to_string())
            .then_some(())
    })
    .await
    .with_context(|| operator.log_text())?;
    operator.ensure_never_forbidden()?;
    Ok(())
}

/// A request the API server refuses (here: the operator's role lacks
/// PodDisruptionBudgets) is reported as a Warning Event and an error metric
/// by reason, retried with backoff, and succeeds once the permission exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_reported_and_retried_until_it_succeeds() -> anyhow::Result<()> {
    init_tracing();
    let h = harness::shared().await;
    let client = h.client()?;
    install_cluster_wide(&client).await?;
    let ns = h.namespace("op-refused").await?;
    // The operator's ClusterRole without the policy rule.
    let mut role = operator_cluster_role()?;
    let role_name = format!("holdfast-operator-no-pdb-{ns}");
    role.metadata.name = Some(role_name.clone());
    let full_rules = role.rules.clone().unwrap_or_default();
    role.rules = Some(
        full_rules
            .iter()
            .filter(|r| !r.api_groups.iter().flatten().any(|g| g == "policy"))
            .cloned()
            .collect(),
    );
    ensure!(role.rules.as_ref().unwrap().len() + 1 == full_rules.len());
    let roles: Api<ClusterRole> = Api::all(client.clone());
    roles.create(&PostParams::default(), &role).await?;
    let kubeconfig = operator_identity_bound_to(h, &ns, &role_name).await?;
    let operator = Operator::start(h, &ns, &kubeconfig, "op-c")?;
    let ccs: Api<CaptureCluster> = Api::namespaced(client.clone(), &ns);
    let mut cc = cluster("refused", "127.0.0.1:9", 0)?;
    cc.spec.storage.storage_class_name = None;
    ccs.create(&PostParams::default(), &cc).await?;

    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let note = poll_until("ReconcileFailed event", TIMEOUT, || async {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("ReconcileFailed"))?
            .note
    })
    .await
    .with_context(|| operator.log_text())?;
    ensure!(
        note.contains("poddisruptionbudgets") && note.contains("forbidden"),
        "{note}"
    );
    let errors = poll_until("forbidden counted", TIMEOUT, || async {
        let n = operator
            .metric(
                "holdfast_operator_reconcile_errors_total{controller=\"capturecluster\",reason=\"forbidden\"}",
            )
            .await?;
        (n >= 1.0).then_some(n)
    })
    .await?;
    eprintln!("{errors} forbidden reconciliations counted");
    let stss: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    ensure!(stss.get_opt("refused").await?.is_none());

    // Granted: the next retry applies everything.
    role.rules = Some(full_rules);
    roles
        .replace(&role_name, &PostParams::default(), &{
            let mut r = role.clone();
            r.metadata.resource_version = roles.get(&role_name).await?.resource_version();
            r
        })
        .await?;
    poll_until("applied after the grant", TIMEOUT, || async {
        let cc = ccs.get("refused").await.ok()?;
        let sts = stss.get_opt("refused").await.ok()??;
        (condition(&cc, "Ready")?.0 == "True").then_some(sts)
    })
    .await
    .with_context(|| operator.log_text())?;
    Ok(())
}
