//! Operator safety on the real control plane with real Kafka (issue 11): a
//! client posts throughout, every acknowledged uuid is looked up in Kafka.
//!
//! - `live_pod_volume_marked_clean_is_forced_back_to_retain` (item 1): the
//!   PV of a serving pod is marked `Delete` + `clean=true` (what a pod whose
//!   own `Retain` patch failed leaves behind after an earlier clean drain).
//!   The operator must force it back to `Retain` + `clean=false` with a
//!   Warning Event; the pod is then SIGKILLed and scaled away, and its
//!   events must reach Kafka through a flush Job. Before the fix the
//!   operator left the clean PV alone, and the scale-down released (deleted)
//!   the volume with its events.
//! - `refused_scale_down_keeps_the_claim_of_a_restarting_pod` (item 3): a
//!   scale-down from 2 to 1 that the operator refuses (invalid spec in the
//!   same change) leaves the StatefulSet at 2; pod `events-1` is killed and
//!   cannot come back for a while (a ResourceQuota refuses it). Its claim
//!   is wanted by the StatefulSet: no flush Job, no claim deletion. Before
//!   the fix orphans were judged by the resource's replicas only, and a
//!   flush Job was started on the claim under its returning pod.
//! - `foreground_cascade_deletion_drains_every_volume_first` (item 2): a
//!   CaptureCluster deleted with `propagationPolicy: Foreground` (Argo CD's
//!   default prune) while Kafka is down and its pod left events. The
//!   garbage collector deletes every dependent of the cluster as it is
//!   created; flush Jobs and recovery claims are not dependents any more,
//!   so they drain the volume once Kafka returns and the finalizer lets
//!   the cluster go. Before the fix each new flush Job was owned by the
//!   cluster and deleted at once: recovery livelocked and the deletion hung.
//! - `recreated_cluster_drains_old_volumes_only_on_opt_in` (item 7): a
//!   cluster is deleted with its finalizer removed by hand while a volume
//!   holds events, its claim is deleted (the PV is Released), and a cluster
//!   of the same name is created again. The volume carries the first
//!   instance's uid: it is reported and left alone until the new cluster
//!   sets `orphanRecovery.adoptPreviousVolumes`, then drained. Before the
//!   fix the new instance drained it at once (into whatever Kafka it had).
//!
//! Needs: `make e2e-bins`, `make kafka`, and the workspace binaries.

mod operator_support;

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use holdfast_e2e::kafka::KafkaBroker;
use holdfast_e2e::kube::poll_until;
use holdfast_operator::api::{CLEAN_ANNOTATION, CLUSTER_UID_LABEL};
use holdfast_operator::orphans::REMAINING_ANNOTATION;
use holdfast_operator::orphans::job::flush_job_name;
use k8s_openapi::api::core::v1::ResourceQuota;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use operator_support::scene::*;
use operator_support::{condition, init_tracing};
use serde_json::json;

/// Reads PV `volume`'s reclaim policy and clean mark.
async fn pv_state(scene: &Scene, volume: &str) -> Option<(String, Option<String>)> {
    let pv = scene.pvs().get(volume).await.ok()?;
    Some((
        pv.spec
            .as_ref()?
            .persistent_volume_reclaim_policy
            .clone()
            .unwrap_or_default(),
        pv.annotations().get(CLEAN_ANNOTATION).cloned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_pod_volume_marked_clean_is_forced_back_to_retain() -> anyhow::Result<()> {
    init_tracing();
    let broker = KafkaBroker::start().await?;
    broker.create_topic(TOPIC, 2, &[]).await?;
    let scene = Scene::start("safe-clean", &broker, 2).await?;
    let volume = scene.volume_of("buffer-events-1").await?;
    let load = Load::start(scene.client.clone(), &scene.ns, &scene.name);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // What a pod whose Retain patch failed serves on: the mark of an
    // earlier clean drain.
    scene
        .pvs()
        .patch(
            &volume,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"annotations": {CLEAN_ANNOTATION: "true"}},
                "spec": {"persistentVolumeReclaimPolicy": "Delete"},
            })),
        )
        .await?;
    let marked = Instant::now();
    poll_until(
        &format!("volume {volume} of live pod events-1 forced back to Retain + clean=false"),
        Duration::from_secs(30),
        || async {
            let (policy, clean) = pv_state(&scene, &volume).await?;
            (policy == "Retain" && clean.as_deref() == Some("false")).then_some(())
        },
    )
    .await
    .with_context(|| scene.operator.log_text())?;
    let forced_in = marked.elapsed();
    let notes = poll_until(
        "VolumeRetainForced event",
        Duration::from_secs(20),
        || async {
            let notes = scene.events("VolumeRetainForced").await;
            notes.iter().any(|n| n.contains(&volume)).then_some(notes)
        },
    )
    .await?;
    ensure!(
        notes.iter().any(|n| n.contains("events-1")),
        "the event does not name the pod: {notes:?}"
    );

    // Now the pod dies with events and its ordinal is scaled away: the
    // volume must be drained, not released.
    tokio::time::sleep(Duration::from_secs(2)).await;
    scene.h.agent().kill_pod(&scene.ns, "events-1")?;
    scene.scale(1).await?;
    scene.kill_until_gone("events-1").await?;
    let orphaned_at = Instant::now();
    let drained = scene.wait_volume_drained(&volume, RECOVERY).await?;
    let took = orphaned_at.elapsed();
    let (acked, refused) = load.finish().await?;
    let (found, dups) = count_in_kafka(&broker, &acked).await?;
    ensure_drained(&volume, &drained)?;
    scene.live_volumes_retained().await?;
    scene.operator.ensure_never_forbidden()?;
    report(
        "12 stale clean mark on a live pod's volume, then kill+scale-down",
        acked.len(),
        found,
        dups,
        refused,
        &format!(
            "forced back to Retain {:.1}s after the mark; {}; orphan to drained+deleted {:.1}s",
            forced_in.as_secs_f64(),
            drained.to_running(orphaned_at),
            took.as_secs_f64()
        ),
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_scale_down_keeps_the_claim_of_a_restarting_pod() -> anyhow::Result<()> {
    init_tracing();
    let broker = KafkaBroker::start().await?;
    broker.create_topic(TOPIC, 2, &[]).await?;
    let scene = Scene::start_with(
        "safe-wanted",
        &broker,
        2,
        &[("HOLDFAST_ORPHAN_SCAN_INTERVAL_SECS", "1")],
    )
    .await?;
    let volume = scene.volume_of("buffer-events-1").await?;
    let claim_uid = scene.claims().get("buffer-events-1").await?.uid();
    let load = Load::start(scene.client.clone(), &scene.ns, &scene.name);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A scale-down to 1 that is refused: the same change breaks a field.
    scene
        .ccs()
        .patch(
            &scene.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "replicas": 1,
                "kafka": {"bootstrapServers": "no-port"},
            }})),
        )
        .await?;
    poll_until("scale-down refused", Duration::from_secs(30), || async {
        let cc = scene.ccs().get(&scene.name).await.ok()?;
        let (status, _, _) = condition(&cc, "SpecValid")?;
        (status == "False").then_some(())
    })
    .await
    .with_context(|| scene.operator.log_text())?;

    // events-1 dies and cannot come back for now: the quota refuses new pods.
    let quotas: Api<ResourceQuota> = Api::namespaced(scene.client.clone(), &scene.ns);
    quotas
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "no-new-pods"},
                "spec": {"hard": {"pods": "1"}},
            }))?,
        )
        .await?;
    scene.h.agent().kill_pod(&scene.ns, "events-1")?;
    scene
        .pods()
        .delete("events-1", &DeleteParams::default().grace_period(0))
        .await?;
    poll_until("pod events-1 gone", Duration::from_secs(30), || async {
        scene
            .pods()
            .get_opt("events-1")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await?;
    // Several orphan passes (1 s apart, recovery delay 1 s) with the pod absent.
    let passes = |text: Option<f64>| text.unwrap_or(0.0);
    let start = passes(scene.operator.reconciles("orphans").await);
    poll_until("five orphan passes", Duration::from_secs(30), || async {
        let now = passes(scene.operator.reconciles("orphans").await);
        (now >= start + 5.0).then_some(())
    })
    .await?;
    let job = flush_job_name(&volume);
    ensure!(
        scene.jobs().get_opt(&job).await?.is_none()
            && !scene
                .history
                .lock()
                .unwrap()
                .get(&volume)
                .is_some_and(|d| d.job_seen),
        "a flush Job was started on buffer-events-1 while the StatefulSet still wants ordinal 1"
    );
    let claim = scene.claims().get("buffer-events-1").await?;
    ensure!(
        claim.uid() == claim_uid && claim.metadata.deletion_timestamp.is_none(),
        "claim buffer-events-1 was deleted or replaced"
    );
    let (policy, clean) = pv_state(&scene, &volume).await.context("volume gone")?;
    ensure!(
        policy == "Retain" && clean.as_deref() != Some("true"),
        "volume {volume} is {policy} clean={clean:?}"
    );

    // The pod comes back to its claim and drains its own buffer.
    quotas
        .delete("no-new-pods", &DeleteParams::default())
        .await?;
    scene.wait_ready(2).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked, refused) = load.finish().await?;
    let (found, dups) = count_in_kafka(&broker, &acked).await?;
    ensure!(
        scene.events("FlushJobStarted").await.is_empty(),
        "a flush Job was started"
    );
    scene.operator.ensure_never_forbidden()?;
    report(
        "3 refused scale-down, higher ordinal restarting",
        acked.len(),
        found,
        dups,
        refused,
        "no flush job, claim kept, pod drained its own buffer",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_cascade_deletion_drains_every_volume_first() -> anyhow::Result<()> {
    init_tracing();
    let mut broker = KafkaBroker::start().await?;
    broker.create_topic(TOPIC, 2, &[]).await?;
    let scene = Scene::start("safe-fg", &broker, 1).await?;
    let volume = scene.volume_of("buffer-events-0").await?;
    let load = Load::start(scene.client.clone(), &scene.ns, &scene.name);
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.stop().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deleted_at = Instant::now();
    scene
        .ccs()
        .delete(&scene.name, &DeleteParams::foreground())
        .await?;
    poll_until(
        &format!("volume {volume} left Retain with events"),
        Duration::from_secs(60),
        || async {
            let pv = scene.pvs().get(&volume).await.ok()?;
            let policy = pv.spec.as_ref()?.persistent_volume_reclaim_policy.clone()?;
            let remaining = pv.annotations().get(REMAINING_ANNOTATION)?.clone();
            (policy == "Retain" && remaining != "0").then_some(())
        },
    )
    .await?;
    // A flush Job exists and survives the cascade while Kafka is away.
    let job = flush_job_name(&volume);
    poll_until("flush job created", Duration::from_secs(30), || async {
        scene.jobs().get_opt(&job).await.ok()?.map(|_| ())
    })
    .await
    .with_context(|| scene.operator.log_text())?;
    broker.restart().await?;
    let restarted = Instant::now();
    let drained = scene.wait_volume_drained(&volume, RECOVERY).await?;
    let drained_in = restarted.elapsed();
    ensure_drained(&volume, &drained)?;
    poll_until("capturecluster gone", Duration::from_secs(60), || async {
        scene
            .ccs()
            .get_opt(&scene.name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .with_context(|| scene.operator.log_text())?;
    let took = deleted_at.elapsed();
    let (acked, refused) = load.finish().await?;
    let (found, dups) = count_in_kafka(&broker, &acked).await?;
    scene.operator.ensure_never_forbidden()?;
    report(
        "11 foreground cascade deletion, Kafka down",
        acked.len(),
        found,
        dups,
        refused,
        &format!(
            "Kafka back to drained+deleted {:.1}s; delete to cluster gone {:.1}s (incl. Kafka outage)",
            drained_in.as_secs_f64(),
            took.as_secs_f64()
        ),
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreated_cluster_drains_old_volumes_only_on_opt_in() -> anyhow::Result<()> {
    init_tracing();
    let mut broker = KafkaBroker::start().await?;
    broker.create_topic(TOPIC, 2, &[]).await?;
    let scene = Scene::start("safe-adopt", &broker, 1).await?;
    let volume = scene.volume_of("buffer-events-0").await?;
    let first_uid = scene.ccs().get(&scene.name).await?.uid().context("uid")?;
    poll_until(
        "volume labelled with its instance",
        Duration::from_secs(30),
        || async {
            let pv = scene.pvs().get(&volume).await.ok()?;
            (pv.labels().get(CLUSTER_UID_LABEL) == Some(&first_uid)).then_some(())
        },
    )
    .await
    .with_context(|| scene.operator.log_text())?;
    let load = Load::start(scene.client.clone(), &scene.ns, &scene.name);
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.stop().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    scene
        .ccs()
        .delete(&scene.name, &DeleteParams::default())
        .await?;
    poll_until(
        &format!("volume {volume} left Retain with events"),
        Duration::from_secs(60),
        || async {
            let pv = scene.pvs().get(&volume).await.ok()?;
            let remaining = pv.annotations().get(REMAINING_ANNOTATION)?.clone();
            (remaining != "0").then_some(())
        },
    )
    .await?;
    let (acked, _) = load.finish().await?;
    // The finalizer removed by hand, the old flush Jobs and the claim
    // deleted: a Released volume of an instance that is gone.
    scene
        .ccs()
        .patch(
            &scene.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await?;
    poll_until("first instance gone", Duration::from_secs(60), || async {
        scene
            .ccs()
            .get_opt(&scene.name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await?;
    scene
        .jobs()
        .delete_collection(&DeleteParams::background(), &Default::default())
        .await?;
    scene
        .claims()
        .delete("buffer-events-0", &DeleteParams::default())
        .await?;
    // The same name again, zero pods, Kafka back.
    let mut again = cluster(&scene.name, &broker.bootstrap(), 0)?;
    again.metadata.namespace = Some(scene.ns.clone());
    scene.ccs().create(&PostParams::default(), &again).await?;
    broker.restart().await?;
    let notes = poll_until(
        "previous instance reported",
        Duration::from_secs(60),
        || async {
            let notes = scene.events("VolumeUnrecoverable").await;
            notes
                .iter()
                .any(|n| n.contains(&volume) && n.contains("previous instance"))
                .then_some(notes)
        },
    )
    .await
    .with_context(|| scene.operator.log_text())?;
    // The stuck orphan explains itself in status (item 12).
    let cc = poll_until(
        "OrphansStuck in status",
        Duration::from_secs(60),
        || async {
            let cc = scene.ccs().get(&scene.name).await.ok()?;
            let (status, _, message) = condition(&cc, "OrphansStuck")?;
            (status == "True" && message.contains(&volume)).then_some(cc)
        },
    )
    .await
    .with_context(|| scene.operator.log_text())?;
    let status = cc.status.clone().unwrap_or_default();
    let entry = status
        .volumes
        .iter()
        .find(|v| v.volume == volume)
        .context("no status.volumes entry for the stuck volume")?;
    ensure!(
        entry.phase == "Stuck" && entry.reason.contains("adoptPreviousVolumes"),
        "status entry does not say why: {entry:?}"
    );
    eprintln!("{}", describe(&cc));
    let start = scene.operator.reconciles("orphans").await.unwrap_or(0.0);
    poll_until(
        "three more orphan passes",
        Duration::from_secs(60),
        || async {
            let now = scene.operator.reconciles("orphans").await?;
            (now >= start + 3.0).then_some(())
        },
    )
    .await?;
    ensure!(
        scene
            .jobs()
            .get_opt(&flush_job_name(&volume))
            .await?
            .is_none()
            && pv_state(&scene, &volume)
                .await
                .is_some_and(|(p, _)| p == "Retain"),
        "the new instance drained or released a previous instance's volume: {notes:?}"
    );
    // Opting in drains it.
    let adopted = Instant::now();
    scene
        .ccs()
        .patch(
            &scene.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"orphanRecovery": {"adoptPreviousVolumes": true}}})),
        )
        .await?;
    let drained = scene.wait_volume_drained(&volume, RECOVERY).await?;
    ensure_drained(&volume, &drained)?;
    let (found, dups) = count_in_kafka(&broker, &acked).await?;
    scene.operator.ensure_never_forbidden()?;
    report(
        "7 recreated cluster, previous instance's volume",
        acked.len(),
        found,
        dups,
        0,
        &format!(
            "kept and reported until opt-in; opt-in to drained+deleted {:.1}s",
            adopted.elapsed().as_secs_f64()
        ),
    );
    Ok(())
}

/// `kubectl get capturecluster` and the status part of `kubectl describe`,
/// as a user would see them.
fn describe(cc: &holdfast_operator::api::CaptureCluster) -> String {
    let status = cc.status.clone().unwrap_or_default();
    let cond = |t: &str| condition(cc, t).map(|c| c.0).unwrap_or_default();
    let mut out = format!(
        "$ kubectl get capturecluster\nNAME     DESIRED   READY   STATUS   ORPHANS   STUCK\n{:<8} {:<9} {:<7} {:<8} {:<9} {}\n\n$ kubectl describe capturecluster {} (status)\n",
        cc.name_any(),
        cc.spec.replicas,
        status.ready_replicas,
        condition(cc, "Ready").map(|c| c.1).unwrap_or_default(),
        status.orphaned_volumes,
        cond("OrphansStuck"),
        cc.name_any()
    );
    for c in &status.conditions {
        out.push_str(&format!(
            "  Condition {:<18} {:<5} {:<16} {}\n",
            c.type_, c.status, c.reason, c.message
        ));
    }
    for v in &status.volumes {
        out.push_str(&format!(
            "  Volume {} (claim {}, {}): {} - {} (failures {}, next retry {})\n",
            v.volume,
            v.claim,
            v.kind,
            v.phase,
            v.reason,
            v.failures,
            v.next_retry.as_deref().unwrap_or("-")
        ));
    }
    out
}
