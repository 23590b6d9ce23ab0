//! Orphan recovery on the real control plane with real Kafka (issue 5): a
//! client posts throughout each scenario, every uuid that got a `200` is
//! looked up in Kafka afterwards (duplicates counted), and every PV's final
//! reclaim policy is checked.
//!
//! - `killed_then_scaled_away_pod_is_drained_by_a_flush_job_on_its_node`:
//!   a pod SIGKILLed under load and scaled away before it can come back;
//!   its volume is drained by a flush Job that runs on the volume's node
//!   (local PV), flipped to `Delete` and deleted.
//! - `claim_deleted_by_hand_is_recovered_through_its_released_volume`:
//!   the claim of a loaded pod is deleted and the pod killed; the Released
//!   PV is rebound to a recovery claim and drained.
//! - `graceful_scale_down_without_kafka_is_drained_when_kafka_returns`:
//!   Kafka stops, a pod scaled away leaves `Retain` with events; a flush
//!   Job waits for Kafka; the operator is restarted in the middle; when
//!   Kafka returns the Job drains the volume.
//! - `pod_returning_to_its_claim_takes_over_from_the_flush_job`: a flush
//!   Job waits for Kafka on a scaled-away claim; scaling back up stops the
//!   Job and the returning pod drains its own buffer.
//! - `deleted_cluster_is_drained_then_cleaned_up`: a CaptureCluster deleted
//!   while Kafka is down keeps its finalizer until flush Jobs drained every
//!   volume, then everything goes.
//! - `rolling_update_under_load_loses_nothing`: no orphan, no flush Job.
//! - `volume_of_a_vanished_cluster_stays_retained_and_is_reported`: the
//!   finalizer removed by hand while a volume holds events; the volume stays
//!   `Retain` with its events, is reported (metric, Event), and can still be
//!   flushed by hand.
//! - `failed_flush_jobs_back_off_and_retry_until_kafka_returns`: with a 10 s
//!   flush timeout and Kafka down, Jobs fail, are counted on the PV and
//!   retried with backoff until Kafka returns.
//!
//! The operator runs as a child process under `operator/rbac/clusterrole.yaml`.
//! Figures (acked, found, duplicates, time from orphan to drained) are
//! printed on stderr (`--nocapture`).
//!
//! Needs: `make e2e-bins`, `make kafka`, and the workspace binaries
//! (`cargo build --bins`).

mod operator_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use holdfast_e2e::kafka::KafkaBroker;
use holdfast_e2e::kube::{poll_until, storage};
use holdfast_operator::api::CLEAN_ANNOTATION;
use holdfast_operator::orphans::job::flush_job_name;
use holdfast_operator::orphans::{FLUSH_COMPONENT, REMAINING_ANNOTATION};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use operator_support::scene::*;
use operator_support::{Operator, init_tracing, pod_ready};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_then_scaled_away_pod_is_drained_by_a_flush_job_on_its_node() -> anyhow::Result<()> {
    init_tracing();
    let broker = KafkaBroker::start().await?;
    broker.create_topic(TOPIC, 2, &[]).await?;
    let scene = Scene::start("orph-kill", &broker, 2).await?;
    let volume = scene.volume_of("buffer-events-1").await?;
    let node = scene.node_of(&volume).await?;
    let load = Load::start(scene.client.clone(), &scene.ns, &scene.name);
    tokio::time::sleep(Duration::from_secs(4)).await;

    // SIGKILL under load and scale away at once: it never comes back.
    scene.h.agent().kill_pod(&scene.ns, "events-1")?;
    scene.scale(1).await?;
    scene.kill_until_gone("events-1").await?;
    let orphaned_at = Instant::now();
    let pv = scene.pvs().get(&volume).await?;
    ensure!(
        pv.annotations().get(CLEAN_ANNOTATION).map(String::as_str) != Some("true"),
        "the killed pod marked its volume clean: nothing for a flush Job to do"
    );
    let drained = scene.wait_volume_drained(&volume, RECOVERY).await?;
    let took = orphaned_at.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked, refused) = load.finish().await?;
    let (found, dups) = count_in_kafka(&broker, &acked).await?;

    ensure_drained(&volume, &drained)?;
    ensure!(
        drained.job_nodes.iter().all(|n| n == &node) && !drained.job_nodes.is_empty(),
        "flush job of {volume} (pinned to {node}) ran on {:?}",
        drained.job_nodes
    );
    ensure!(
        scene.claims().get_opt("buffer-events-1").await?.is_none(),
        "the drained claim is still there"
    );
    scene.live_volumes_retained().await?;
    let notes = scene.events("VolumeDrained").await;
    ensure!(
        notes.iter().any(|n| n.contains(&volume)),
        "no VolumeDrained event for {volume}: {notes:?}"
    );
    scene.operator.ensure_never_forbidden()?;
    report(
        "1 kill+scale-down (8 local PV node)",
        acked.len(),
        found,
        dups,
        refused,
        &format!(
            "{}; orphan to drained+deleted {:.1}s, job on {:?} (pv pinned to {node})",
            drained.to_running(orphaned_at),
            took.as_secs_f64(),
            drained.job_nodes
        ),
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_deleted_by_hand_is_recovered_through_its_released_volume() -> anyhow::Result<()> {
    init_tracing();
    let broker = KafkaBroker::start().await?;
    broker.create_topic(TOPIC, 2, &[]).await?;
    let scene = Scene::start("orph-claim", &broker, 1).await?;
    let volume = scene.volume_of("buffer-events-0").await?;
    let load = Load::start(scene.client.clone(), &scene.ns, &scene.name);
    tokio::time::sleep(Duration::from_secs(4)).await;

    // The claim goes (held by its pod until the pod is gone), the pod dies
    // without draining: the PV is Released with events on it.
    scene
        .claims()
        .delete("buffer-events-0", &DeleteParams::default())
        .await?;
    scene
        .pods()
        .delete("events-0", &DeleteParams::default())
        .await?;
    let old_uid = scene
        .pods()
        .get_opt("events-0")
        .await?
        .and_then(|p| p.uid());
    poll_until("old pod events-0 gone", Duration::from_secs(60), || async {
        let _ = scene.h.agent().kill_pod(&scene.ns, "events-0");
        let now = scene.pods().get_opt("events-0").await.ok()?;
        (now.and_then(|p| p.uid()) != old_uid || old_uid.is_none()).then_some(())
    })
    .await?;
    let released_at = Instant::now();
    let pv = poll_until("volume released", Duration::from_secs(60), || async {
        let pv = scene.pvs().get(&volume).await.ok()?;
        (pv.status.as_ref()?.phase.as_deref() != Some("Bound")).then_some(pv)
    })
    .await?;
    ensure!(
        pv.annotations().get(CLEAN_ANNOTATION).map(String::as_str) != Some("true"),
        "the killed pod marked its volume clean"
    );
    let drained = scene.wait_volume_drained(&volume, RECOVERY).await?;
    let took = released_at.elapsed();
    // The StatefulSet's new pod serves on a new claim meanwhile.
    scene.wait_ready(1).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked, refused) = load.finish().await?;
    let (found, dups) = count_in_kafka(&broker, &acked).await?;
    ensure_drained(&volume, &drained)?;
    let rebound = scene.events("VolumeRebound").await;
    ensure!(
        rebound.iter().any(|n| n.contains(&volume)),
        "no VolumeRebound event: {rebound:?}"
    );
    ensure!(
        scene
            .claims()
            .get_opt(&format!("hf-recover-{volume}"))
            .await?
            .is_none(),
        "recovery claim left behind"
    );
    scene.live_volumes_retained().await?;
    scene.operator.ensure_never_forbidden()?;
    report(
        "4 claim deleted by hand",
        acked.len(),
        found,
        dups,
        refused,
        &format!(
            "claim deleted: {}; released to drained+deleted {:.1}s",
            drained.to_running(released_at),
            took.as_secs_f64()
        ),
    );
    Ok(())
}

/// Waits until PV `volume` is `Retain` with events recorded by its pod.
async fn wait_left_with_events(scene: &Scene, volume: &str) -> anyhow::Result<String> {
    Ok(poll_until(
        &format!("volume {volume} left Retain with events"),
        Duration::from_secs(60),
        || async {
            let pv = scene.pvs().get(volume).await.ok()?;
            let policy = pv.spec.as_ref()?.persistent_volume_reclaim_policy.clone()?;
            let remaining = pv.annotations().get(REMAINING_ANNOTATION)?.clone();
            (policy == "Retain" && remaining != "0").then_some(remaining)
        },
    )
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_scale_down_without_kafka_is_drained_when_kafka_returns() -> anyhow::Result<()> {
    init_tracing();
    let mut broker = KafkaBroker::start().await?;
    broker.create_topic(TOPIC, 2, &[]).await?;
    let mut scene = Scene::start("orph-down", &broker, 2).await?;
    let volume = scene.volume_of("buffer-events-1").await?;
    let load = Load::start(scene.client.clone(), &scene.ns, &scene.name);
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.stop().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    scene.scale(1).await?;
    let remaining = wait_left_with_events(&scene, &volume).await?;
    poll_until("pod events-1 gone", Duration::from_secs(60), || async {
        scene
            .pods()
            .get_opt("events-1")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await?;
    let orphaned_at = Instant::now();
    // A flush Job starts and waits for Kafka.
    let job_name = flush_job_name(&volume);
    poll_until("flush job started", Duration::from_secs(60), || async {
        scene.jobs().get_opt(&job_name).await.ok()?.map(|_| ())
    })
    .await
    .with_context(|| scene.operator.log_text())?;
    // Scenario 6: the operator restarts in the middle of the recovery.
    scene.operator.stop().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    scene.operator = Operator::start(scene.h, &scene.ns, &scene.kubeconfig, "op-b")?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pv = scene.pvs().get(&volume).await?;
    ensure!(
        pv.spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
            == Some("Retain"),
        "volume flipped while Kafka is down"
    );
    broker.restart().await?;
    let drained = scene.wait_volume_drained(&volume, RECOVERY).await?;
    let took = orphaned_at.elapsed();
    let (acked, refused) = load.finish().await?;
    let (found, dups) = count_in_kafka(&broker, &acked).await?;
    ensure_drained(&volume, &drained)?;
    scene.live_volumes_retained().await?;
    scene.operator.ensure_never_forbidden()?;
    report(
        "2+6 scale-down without Kafka, operator restarted",
        acked.len(),
        found,
        dups,
        refused,
        &format!(
            "pod left {remaining} events; orphan to drained+deleted {:.1}s (incl. Kafka outage)",
            took.as_secs_f64()
        ),
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_returning_to_its_claim_takes_over_from_the_flush_job() -> anyhow::Result<()> {
    init_tracing();
    let mut broker = KafkaBroker::start().await?;
    broker.create_topic(TOPIC, 2, &[]).await?;
    let scene = Scene::start("orph-return", &broker, 2).await?;
    let volume = scene.volume_of("buffer-events-1").await?;
    let load = Load::start(scene.client.clone(), &scene.ns, &scene.name);
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.stop().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    scene.scale(1).await?;
    wait_left_with_events(&scene, &volume).await?;
    let job_name = flush_job_name(&volume);
    poll_until("flush job running", Duration::from_secs(90), || async {
        let pods = scene
            .pods()
            .list(&ListParams::default().labels(&format!("job-name={job_name}")))
            .await
            .ok()?;
        pods.items
            .iter()
            .any(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .then_some(())
    })
    .await
    .with_context(|| scene.operator.log_text())?;
    // The pod comes back to its claim: the operator stops the Job.
    scene.scale(2).await?;
    poll_until("flush job deleted", Duration::from_secs(60), || async {
        scene
            .jobs()
            .get_opt(&job_name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .with_context(|| scene.operator.log_text())?;
    // One drainer at a time: no flush pod runs once the capture pod is ready.
    scene.wait_ready(2).await?;
    let flush_pods = scene
        .pods()
        .list(
            &ListParams::default()
                .labels(&format!("app.kubernetes.io/component={FLUSH_COMPONENT}")),
        )
        .await?;
    ensure!(
        flush_pods
            .items
            .iter()
            .all(|p| p.metadata.deletion_timestamp.is_some()
                || matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )),
        "a flush pod still runs next to the returned capture pod"
    );
    broker.restart().await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (acked, refused) = load.finish().await?;
    let (found, dups) = count_in_kafka(&broker, &acked).await?;
    let pv = scene.pvs().get(&volume).await?;
    ensure!(
        pv.spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
            == Some("Retain"),
        "the returned pod's volume is not Retain"
    );
    let stopped = scene.events("FlushJobStopped").await;
    ensure!(!stopped.is_empty(), "no FlushJobStopped event");
    scene.operator.ensure_never_forbidden()?;
    report(
        "7 pod returns while a job drains",
        acked.len(),
        found,
        dups,
        refused,
        "job stopped, pod took over its buffer",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_cluster_is_drained_then_cleaned_up() -> anyhow::Result<()> {
    init_tracing();
    let mut broker = KafkaBroker::start().await?;
    broker.create_topic(TOPIC, 2, &[]).await?;
    let scene = Scene::start("orph-delete", &broker, 2).await?;
    let volumes = [
        scene.volume_of("buffer-events-0").await?,
        scene.volume_of("buffer-events-1").await?,
    ];
    let load = Load::start(scene.client.clone(), &scene.ns, &scene.name);
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.stop().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deleted_at = Instant::now();
    scene
        .ccs()
        .delete(&scene.name, &DeleteParams::default())
        .await?;
    for volume in &volumes {
        wait_left_with_events(&scene, volume).await?;
    }
    // Held by its finalizer while the volumes hold events.
    tokio::time::sleep(Duration::from_secs(5)).await;
    ensure!(
        scene.ccs().get_opt(&scene.name).await?.is_some(),
        "the cluster went while its volumes hold events"
    );
    broker.restart().await?;
    for volume in &volumes {
        let drained = scene.wait_volume_drained(volume, RECOVERY).await?;
        ensure_drained(volume, &drained)?;
    }
    poll_until("capturecluster gone", Duration::from_secs(120), || async {
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
    let claims = scene.claims().list(&ListParams::default()).await?;
    ensure!(
        claims.items.is_empty(),
        "claims left: {}",
        claims.items.len()
    );
    scene.operator.ensure_never_forbidden()?;
    report(
        "3 cluster deleted with full buffers",
        acked.len(),
        found,
        dups,
        refused,
        &format!(
            "delete to everything gone {:.1}s (incl. Kafka outage)",
            took.as_secs_f64()
        ),
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_under_load_loses_nothing() -> anyhow::Result<()> {
    init_tracing();
    let broker = KafkaBroker::start().await?;
    broker.create_topic(TOPIC, 2, &[]).await?;
    let scene = Scene::start("orph-roll", &broker, 2).await?;
    let load = Load::start(scene.client.clone(), &scene.ns, &scene.name);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before: BTreeSet<String> = scene
        .capture_pods()
        .await
        .iter()
        .filter_map(|p| p.uid())
        .collect();
    scene
        .ccs()
        .patch(
            &scene.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"kafka": {"properties": {"linger.ms": "900"}}}})),
        )
        .await?;
    poll_until(
        "every pod replaced and ready",
        Duration::from_secs(180),
        || async {
            let pods = scene.capture_pods().await;
            (pods.len() == 2
                && pods
                    .iter()
                    .all(|p| pod_ready(p) && p.uid().is_some_and(|u| !before.contains(&u))))
            .then_some(())
        },
    )
    .await
    .with_context(|| scene.operator.log_text())?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (acked, refused) = load.finish().await?;
    let (found, dups) = count_in_kafka(&broker, &acked).await?;
    scene.live_volumes_retained().await?;
    let jobs = scene.jobs().list(&ListParams::default()).await?;
    ensure!(
        jobs.items.is_empty(),
        "a rolling update started flush jobs: {:?}",
        jobs.items.iter().map(|j| j.name_any()).collect::<Vec<_>>()
    );
    // One definition of an orphan (issue 11, item 11): a pod replaced by
    // the rollout is never counted as one, so no Warning flickers.
    let warned = scene.events("OrphanedVolumes").await;
    ensure!(
        warned.is_empty(),
        "a rolling update reported orphaned volumes: {warned:?}"
    );
    report(
        "5 rolling update",
        acked.len(),
        found,
        dups,
        refused,
        "no orphan, no flush job",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_of_a_vanished_cluster_stays_retained_and_is_reported() -> anyhow::Result<()> {
    init_tracing();
    let mut broker = KafkaBroker::start().await?;
    broker.create_topic(TOPIC, 2, &[]).await?;
    let scene = Scene::start("orph-gone", &broker, 1).await?;
    let volume = scene.volume_of("buffer-events-0").await?;
    let load = Load::start(scene.client.clone(), &scene.ns, &scene.name);
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.stop().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    scene
        .ccs()
        .delete(&scene.name, &DeleteParams::default())
        .await?;
    wait_left_with_events(&scene, &volume).await?;
    let (acked, _) = load.finish().await?;
    // Someone removes the finalizer by hand: the cluster (and with it the
    // Kafka settings) is gone while its volume holds events.
    scene
        .ccs()
        .patch(
            &scene.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await?;
    poll_until("capturecluster gone", Duration::from_secs(60), || async {
        scene
            .ccs()
            .get_opt(&scene.name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await?;
    poll_until(
        "unrecoverable volume reported",
        Duration::from_secs(60),
        || async {
            let n = scene
                .operator
                .metric("holdfast_operator_unrecoverable_volumes")
                .await?;
            (n >= 1.0).then_some(())
        },
    )
    .await
    .with_context(|| scene.operator.log_text())?;
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(scene.client.clone(), "default");
    poll_until(
        "VolumeUnrecoverable event",
        Duration::from_secs(30),
        || async {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("VolumeUnrecoverable")
                        && e.note.as_deref().is_some_and(|n| n.contains(&volume))
                })
                .then_some(())
        },
    )
    .await?;
    // Several passes later it is still there, Retain, with its events.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let pv = scene.pvs().get(&volume).await?;
    ensure!(
        pv.spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
            == Some("Retain"),
        "an undrainable volume is not Retain"
    );
    // No flush pod holds the buffer any more (the Jobs went with the cluster).
    poll_until("flush pods gone", Duration::from_secs(60), || async {
        scene
            .pods()
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await?;
    let dir = storage::volume_path(&pv).context("volume path")?;
    let stats = holdfast_e2e::capture::inspect(&dir)?;
    let held = stats["events"].as_u64().unwrap_or(0);
    ensure!(held > 0, "the volume holds no events: {stats}");
    // A human can still drain it.
    broker.restart().await?;
    let (status, stderr) = holdfast_e2e::capture::flush(&dir, &broker.bootstrap(), 120)?;
    ensure!(status.success(), "manual flush failed: {stderr}");
    let (found, dups) = count_in_kafka(&broker, &acked).await?;
    scene.operator.ensure_never_forbidden()?;
    report(
        "cluster gone (unrecoverable)",
        acked.len(),
        found,
        dups,
        0,
        &format!("volume kept Retain with {held} events, reported; drained by hand afterwards"),
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_flush_jobs_back_off_and_retry_until_kafka_returns() -> anyhow::Result<()> {
    init_tracing();
    let mut broker = KafkaBroker::start().await?;
    broker.create_topic(TOPIC, 2, &[]).await?;
    // A flush gives up after 10 s without Kafka: its Job fails.
    let scene = Scene::start_with(
        "orph-fail",
        &broker,
        2,
        &[("HOLDFAST_FLUSH_TIMEOUT_SECS", "10")],
    )
    .await?;
    let volume = scene.volume_of("buffer-events-1").await?;
    let load = Load::start(scene.client.clone(), &scene.ns, &scene.name);
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.stop().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    scene.scale(1).await?;
    wait_left_with_events(&scene, &volume).await?;
    let orphaned_at = Instant::now();
    let failures = poll_until(
        "a failed flush job recorded on the volume",
        Duration::from_secs(120),
        || async {
            let pv = scene.pvs().get(&volume).await.ok()?;
            let n: u32 = pv
                .annotations()
                .get(holdfast_operator::orphans::FAILURES_ANNOTATION)?
                .parse()
                .ok()?;
            let policy = pv.spec?.persistent_volume_reclaim_policy?;
            (n >= 1 && policy == "Retain").then_some(n)
        },
    )
    .await
    .with_context(|| scene.operator.log_text())?;
    // The operator records the failure on the PV first and publishes the
    // Event after it: wait for the Event rather than read it once.
    poll_until(
        "a FlushJobFailed event naming the volume",
        Duration::from_secs(30),
        || async {
            let failed = scene.events("FlushJobFailed").await;
            failed.iter().any(|n| n.contains(&volume)).then_some(())
        },
    )
    .await
    .with_context(|| format!("no FlushJobFailed event: {:?}", scene.operator.log_text()))?;
    let failed_metric = scene
        .operator
        .metric("holdfast_operator_flush_jobs_total{result=\"failed\"}")
        .await
        .unwrap_or(0.0);
    ensure!(failed_metric >= 1.0, "failed jobs metric {failed_metric}");
    broker.restart().await?;
    let drained = scene.wait_volume_drained(&volume, RECOVERY).await?;
    ensure_drained(&volume, &drained)?;
    let took = orphaned_at.elapsed();
    let (acked, refused) = load.finish().await?;
    let (found, dups) = count_in_kafka(&broker, &acked).await?;
    scene.live_volumes_retained().await?;
    scene.operator.ensure_never_forbidden()?;
    report(
        "failed flush job retried",
        acked.len(),
        found,
        dups,
        refused,
        &format!(
            "{failures} failed job(s) before Kafka returned; orphan to drained+deleted {:.1}s",
            took.as_secs_f64()
        ),
    );
    Ok(())
}
