//! The CaptureCluster resource as kubectl and GitOps see it, on the real
//! API server (issue 11, item 13):
//!
//! - `cel_rules_refuse_bad_specs_naming_the_field`: every cross-field check
//!   the reconciler makes is also a CEL rule of the committed CRD, so a
//!   create is refused at once with a message naming the field (and the
//!   reconciler's own `validate` names the same field).
//! - `storage_fields_the_claims_were_made_with_are_immutable`: changing
//!   `spec.storage.size` (to another amount), `storageClassName` or
//!   `accessMode` is refused; the same size spelled differently, the
//!   quota and the replicas may change.
//! - `scale_subresource_drives_the_statefulset_with_the_scheduling_fields`:
//!   `/scale` (what `kubectl scale` and a HorizontalPodAutoscaler use)
//!   changes `spec.replicas`, the operator's StatefulSet follows, and the
//!   scale reports the pods the StatefulSet made and their selector. The
//!   StatefulSet's pods carry `priorityClassName`,
//!   `topologySpreadConstraints` (with the pods' selector filled in) and
//!   `imagePullSecrets`. The pods select no node, so nothing runs (no Kafka
//!   needed).
//!
//! Needs: `make e2e-bins` and the workspace binaries.

mod operator_support;

use anyhow::{Context, ensure};
use holdfast_e2e::kube::{self as harness, poll_until, storage};
use holdfast_operator::api::CaptureCluster;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use operator_support::{Operator, TIMEOUT, init_tracing, install_cluster_wide, operator_identity};
use serde_json::{Value, json};

fn spec(extra: Value) -> Value {
    let mut spec = json!({
        "replicas": 0,
        "image": "holdfast/capture:dev",
        "kafka": {"bootstrapServers": "kafka:9092"},
        "streams": [{"name": "clicks", "topic": "clicks"}],
        "storage": {"size": "64Mi", "storageClassName": storage::STORAGE_CLASS},
    });
    merge(&mut spec, extra);
    spec
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

fn cluster(name: &str, spec: Value) -> anyhow::Result<CaptureCluster> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "holdfast.dev/v1alpha1",
        "kind": "CaptureCluster",
        "metadata": {"name": name},
        "spec": spec,
    }))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cel_rules_refuse_bad_specs_naming_the_field() -> anyhow::Result<()> {
    init_tracing();
    let h = harness::shared().await;
    let client = h.client()?;
    install_cluster_wide(&client).await?;
    let ns = h.namespace("api-cel").await?;
    let ccs: Api<CaptureCluster> = Api::namespaced(client.clone(), &ns);

    // (name, spec change, the field the refusal names, the field
    // `validate` names when it differs)
    let long = "a".repeat(43);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "quota",
            json!({"storage": {"bufferQuotaBytes": 64u64 << 20}}),
            "spec.storage.bufferQuotaBytes",
        ),
        (
            "size",
            json!({"storage": {"size": "100m"}}),
            "spec.storage.size",
        ),
        (
            "default-stream",
            json!({"defaultStream": "nope"}),
            "spec.defaultStream",
        ),
        (
            "default-stream-no-streams",
            json!({"streams": [], "defaultStream": "clicks"}),
            "spec.defaultStream",
        ),
        (
            "duplicate-stream",
            json!({"streams": [{"name": "a", "topic": "t"}, {"name": "a", "topic": "u"}]}),
            "spec.streams[1]",
        ),
        (
            "reserved-property",
            json!({"kafka": {"properties": {"sasl.password": "x"}}}),
            "spec.kafka.properties",
        ),
        (
            "bad-property",
            json!({"kafka": {"properties": {" linger.ms": "5"}}}),
            "spec.kafka.properties",
        ),
        (
            "exactly-once",
            json!({"kafka": {"exactlyOnce": true}}),
            "spec.kafka.exactlyOnce",
        ),
        (
            "mtls-half",
            json!({"kafka": {"tls": {"secretName": "kafka-tls", "certKey": "tls.crt"}}}),
            "spec.kafka.tls",
        ),
        (long.as_str(), json!({}), "metadata.name"),
    ];
    for (name, change, field) in cases {
        let bad = cluster(name, spec(change.clone()))?;
        // The reconciler refuses it too, naming the same field.
        let invalid = bad
            .spec
            .validate(name)
            .expect_err(&format!("validate accepted {name}: {change}"));
        let err = ccs
            .create(&PostParams::default(), &bad)
            .await
            .expect_err(&format!("the API server accepted {name}: {change}"));
        let text = err.to_string();
        ensure!(
            text.contains(field),
            "{name}: refusal does not name {field}: {text}"
        );
        ensure!(
            invalid.field.starts_with(field.trim_end_matches("[1]")),
            "{name}: validate names {} where the API server names {field}",
            invalid.field
        );
    }
    // A valid spec with every checked field set passes.
    let good = cluster(
        "good",
        spec(json!({
            "defaultStream": "clicks",
            "kafka": {
                "properties": {"linger.ms": "5"},
                "tls": {"secretName": "kafka-tls", "certKey": "tls.crt", "keyKey": "tls.key"},
            },
            "storage": {"bufferQuotaBytes": 32u64 << 20},
        })),
    )?;
    ensure!(good.spec.validate("good").is_ok());
    ccs.create(&PostParams::default(), &good)
        .await
        .context("a valid spec was refused")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_fields_the_claims_were_made_with_are_immutable() -> anyhow::Result<()> {
    init_tracing();
    let h = harness::shared().await;
    let client = h.client()?;
    install_cluster_wide(&client).await?;
    let ns = h.namespace("api-immutable").await?;
    let ccs: Api<CaptureCluster> = Api::namespaced(client.clone(), &ns);
    ccs.create(&PostParams::default(), &cluster("events", spec(json!({})))?)
        .await?;
    let patch = |change: Value| {
        let ccs = ccs.clone();
        async move {
            ccs.patch(
                "events",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": change})),
            )
            .await
        }
    };
    for (change, field) in [
        (json!({"storage": {"size": "128Mi"}}), "spec.storage.size"),
        (
            json!({"storage": {"storageClassName": "other"}}),
            "spec.storage.storageClassName",
        ),
        (
            json!({"storage": {"storageClassName": null}}),
            "spec.storage.storageClassName",
        ),
        (
            json!({"storage": {"accessMode": "ReadWriteOncePod"}}),
            "spec.storage.accessMode",
        ),
    ] {
        let err = patch(change.clone())
            .await
            .expect_err(&format!("immutable change accepted: {change}"));
        let text = err.to_string();
        ensure!(
            text.contains(field) && text.contains("immutable"),
            "{change}: {text}"
        );
    }
    // What may change: the same size spelled differently, the quota, the
    // replicas, and an explicit default access mode.
    patch(json!({
        "replicas": 2,
        "storage": {"size": "65536Ki", "bufferQuotaBytes": 16u64 << 20, "accessMode": "ReadWriteOnce"},
    }))
    .await
    .context("a mutable change was refused")?;
    let cc = ccs.get("events").await?;
    ensure!(cc.spec.replicas == 2);
    ensure!(cc.spec.storage.buffer_quota_bytes == Some(16 << 20));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_subresource_drives_the_statefulset_with_the_scheduling_fields() -> anyhow::Result<()>
{
    init_tracing();
    let h = harness::shared().await;
    let client = h.client()?;
    install_cluster_wide(&client).await?;
    let ns = h.namespace("api-scale").await?;
    let priority = format!("holdfast-{ns}");
    Api::<PriorityClass>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": priority},
                "value": 1000,
            }))?,
        )
        .await?;
    let kubeconfig = operator_identity(h, &ns).await?;
    let operator = Operator::start(h, &ns, &kubeconfig, "op-scale")?;
    let ccs: Api<CaptureCluster> = Api::namespaced(client.clone(), &ns);
    let stss: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let name = "events";
    ccs.create(
        &PostParams::default(),
        &cluster(
            name,
            spec(json!({
                "replicas": 1,
                // No node has it: the pods stay Pending, nothing runs.
                "nodeSelector": {"holdfast.dev/test-no-node": "true"},
                "priorityClassName": priority,
                "imagePullSecrets": [{"name": "registry"}],
                "topologySpreadConstraints": [{
                    "maxSkew": 1,
                    "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "ScheduleAnyway",
                }],
                "orphanRecovery": {"enabled": false},
            })),
        )?,
    )
    .await?;
    poll_until("StatefulSet at 1 replica", TIMEOUT, || async {
        let sts = stss.get_opt(name).await.ok()??;
        (sts.spec?.replicas == Some(1)).then_some(())
    })
    .await
    .with_context(|| operator.log_text())?;

    // `kubectl scale --replicas 3` patches the scale subresource.
    ccs.patch_scale(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3}})),
    )
    .await
    .context("patch /scale")?;
    ensure!(ccs.get(name).await?.spec.replicas == 3);
    let sts = poll_until("StatefulSet follows /scale", TIMEOUT, || async {
        let sts = stss.get_opt(name).await.ok()??;
        (sts.spec.as_ref()?.replicas == Some(3)).then_some(sts)
    })
    .await
    .with_context(|| operator.log_text())?;
    let scale = poll_until("scale reports 3 pods", TIMEOUT, || async {
        let scale = ccs.get_scale(name).await.ok()?;
        (scale.status.as_ref()?.replicas == 3).then_some(scale)
    })
    .await
    .with_context(|| operator.log_text())?;
    ensure!(scale.spec.and_then(|s| s.replicas) == Some(3));
    let selector = scale
        .status
        .and_then(|s| s.selector)
        .context("scale without selector")?;
    let selected = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    ensure!(
        selected.len() == 3,
        "selector {selector} selects {} pods",
        selected.len()
    );

    // The scheduling fields reach the template and the pods.
    let template = sts.spec.unwrap().template.spec.unwrap();
    ensure!(template.priority_class_name.as_deref() == Some(priority.as_str()));
    ensure!(
        template
            .image_pull_secrets
            .is_some_and(|s| s.len() == 1 && s[0].name == "registry")
    );
    let spread = template
        .topology_spread_constraints
        .context("no topologySpreadConstraints")?;
    let match_labels = spread[0]
        .label_selector
        .as_ref()
        .and_then(|s| s.match_labels.clone())
        .context("spread constraint without the pods' selector")?;
    ensure!(match_labels.get("holdfast.dev/cluster").map(String::as_str) == Some(name));
    for pod in &selected {
        let spec = pod.spec.as_ref().context("pod without spec")?;
        ensure!(
            spec.priority_class_name.as_deref() == Some(priority.as_str()),
            "{} has no priority class",
            pod.name_any()
        );
        ensure!(spec.priority == Some(1000));
    }

    // And down again: the HorizontalPodAutoscaler's direction.
    ccs.patch_scale(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 1}})),
    )
    .await?;
    poll_until("scale reports 1 pod", TIMEOUT, || async {
        let scale = ccs.get_scale(name).await.ok()?;
        let sts = stss.get_opt(name).await.ok()??;
        (scale.status?.replicas == 1 && sts.spec?.replicas == Some(1)).then_some(())
    })
    .await
    .with_context(|| operator.log_text())?;
    operator.ensure_never_forbidden()?;
    Ok(())
}
