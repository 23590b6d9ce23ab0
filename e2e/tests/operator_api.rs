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
//! - `unlabelled_volume_of_a_vanished_claim_is_found_through_its_claim_ref`
//!   (item 7): two `Released` PVs that never got a Holdfast label (their
//!   claims `buffer-events-<n>` were deleted first), one older than the
//!   CaptureCluster and one newer. Both are found through `claimRef` and
//!   labelled; the newer one gets the cluster's uid and a flush Job at
//!   once, the older one (maybe a previous instance's) is reported stuck
//!   until `adoptPreviousVolumes`, then gets its Job. Before, recovery
//!   (which finds volumes by label) never saw either. The flush pods
//!   select no node: nothing runs, no Kafka needed.
//!
//! Needs: `make e2e-bins` and the workspace binaries.

mod operator_support;

use anyhow::{Context, ensure};
use holdfast_e2e::kube::{self as harness, poll_until, storage};
use holdfast_operator::api::{CLUSTER_LABEL, CLUSTER_UID_LABEL, CaptureCluster, UNKNOWN_INSTANCE};
use holdfast_operator::flush::{flush_job_name, recovery_claim_name};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
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

/// A `Released` hostPath PV of the network class whose claim
/// `buffer-events-<ordinal>` in `ns` is gone, with no label at all.
fn orphaned_pv(
    name: &str,
    ns: &str,
    ordinal: u32,
    path: &std::path::Path,
) -> anyhow::Result<PersistentVolume> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "64Mi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": storage::NETWORK_STORAGE_CLASS,
            "hostPath": {"path": path.display().to_string(), "type": "DirectoryOrCreate"},
            "claimRef": {"namespace": ns, "name": format!("buffer-events-{ordinal}"),
                "uid": uuid::Uuid::new_v4().to_string()},
        },
    }))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlabelled_volume_of_a_vanished_claim_is_found_through_its_claim_ref() -> anyhow::Result<()>
{
    init_tracing();
    let h = harness::shared().await;
    let client = h.client()?;
    install_cluster_wide(&client).await?;
    let ns = h.namespace("api-claimref").await?;
    let kubeconfig = operator_identity(h, &ns).await?;
    let operator = Operator::start(h, &ns, &kubeconfig, "op-claimref")?;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let ccs: Api<CaptureCluster> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let dir = h.volumes_dir();
    let released = |name: String| {
        let pvs = pvs.clone();
        async move {
            poll_until(&format!("{name} Released"), TIMEOUT, || async {
                let pv = pvs.get(&name).await.ok()?;
                (pv.status.as_ref()?.phase.as_deref() == Some("Released")).then_some(pv)
            })
            .await
        }
    };

    // Older than the cluster.
    let old = format!("{ns}-old");
    let old_pv = pvs
        .create(
            &PostParams::default(),
            &orphaned_pv(&old, &ns, 1, &dir.join(&old))?,
        )
        .await?;
    released(old.clone()).await?;
    let old_created = old_pv
        .metadata
        .creation_timestamp
        .context("no creationTimestamp")?
        .0;
    // Creation times have a resolution of a second: the cluster must be
    // visibly younger.
    poll_until(
        "the clock passes the old volume's second",
        TIMEOUT,
        || async { (jiff::Timestamp::now().as_second() > old_created.as_second()).then_some(()) },
    )
    .await?;
    let cc = ccs
        .create(
            &PostParams::default(),
            &cluster(
                "events",
                spec(json!({
                    "nodeSelector": {"holdfast.dev/test-no-node": "true"},
                    "orphanRecovery": {"delaySeconds": 0},
                })),
            )?,
        )
        .await?;
    let uid = cc.uid().context("cluster without uid")?;
    // Newer than the cluster: provisioned for one of its claims.
    let new = format!("{ns}-new");
    pvs.create(
        &PostParams::default(),
        &orphaned_pv(&new, &ns, 2, &dir.join(&new))?,
    )
    .await?;
    released(new.clone()).await?;

    let labelled = |name: String| {
        let pvs = pvs.clone();
        async move {
            poll_until(&format!("{name} labelled"), TIMEOUT, || async {
                let pv = pvs.get(&name).await.ok()?;
                let labels = pv.labels();
                (labels.get(CLUSTER_LABEL).map(String::as_str) == Some("events"))
                    .then(|| labels.get(CLUSTER_UID_LABEL).cloned())
                    .flatten()
            })
            .await
        }
    };
    let new_instance = labelled(new.clone())
        .await
        .with_context(|| operator.log_text())?;
    ensure!(
        new_instance == uid,
        "{new} labelled {new_instance}, not {uid}"
    );
    let old_instance = labelled(old.clone())
        .await
        .with_context(|| operator.log_text())?;
    ensure!(
        old_instance == UNKNOWN_INSTANCE,
        "{old} labelled {old_instance}"
    );

    // This instance's volume is recovered: rebound to a recovery claim
    // and given a flush Job.
    poll_until("flush Job of the new volume", TIMEOUT, || async {
        jobs.get_opt(&flush_job_name(&new)).await.ok()?.map(|_| ())
    })
    .await
    .with_context(|| operator.log_text())?;
    ensure!(claims.get_opt(&recovery_claim_name(&new)).await?.is_some());
    // The older one is reported and left alone until the opt-in.
    let reason = poll_until("the old volume reported stuck", TIMEOUT, || async {
        let cc = ccs.get("events").await.ok()?;
        cc.status?
            .volumes
            .into_iter()
            .find(|v| v.volume == old && v.phase == "Stuck")
            .map(|v| v.reason)
    })
    .await
    .with_context(|| operator.log_text())?;
    ensure!(reason.contains("adoptPreviousVolumes"), "{reason}");
    ensure!(jobs.get_opt(&flush_job_name(&old)).await?.is_none());
    ccs.patch(
        "events",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"orphanRecovery": {"adoptPreviousVolumes": true}}})),
    )
    .await?;
    poll_until("flush Job of the adopted volume", TIMEOUT, || async {
        jobs.get_opt(&flush_job_name(&old)).await.ok()?.map(|_| ())
    })
    .await
    .with_context(|| operator.log_text())?;
    let old_pv = pvs.get(&old).await?;
    ensure!(
        old_pv
            .spec
            .and_then(|s| s.persistent_volume_reclaim_policy)
            .as_deref()
            == Some("Retain")
    );
    operator.ensure_never_forbidden()?;
    Ok(())
}
