//! Issue 12 on the real control plane: scenario 7 (a pod returns to its
//! claim while a flush Job drains it) with `spec.kafka.exactlyOnce`, and
//! Kafka up while both may deliver. The returning pod's `init_transactions`
//! fences the Job's producer, and the checkpoint keeps it from resending what
//! the Job committed: every acknowledged uuid reaches Kafka exactly once
//! (read_committed).

mod operator_support;

use std::time::Duration;

use anyhow::{Context, ensure};
use holdfast_e2e::kafka::KafkaBroker;
use holdfast_e2e::kube::poll_until;
use holdfast_operator::orphans::job::flush_job_name;
use kube::api::ListParams;
use operator_support::init_tracing;
use operator_support::scene::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_returning_while_its_flush_job_delivers_sends_nothing_twice() -> anyhow::Result<()> {
    init_tracing();
    let mut broker = KafkaBroker::start().await?;
    broker.create_topic(TOPIC, 2, &[]).await?;
    let scene = Scene::start_exactly_once("orph-eos", &broker, 2).await?;
    let volume = scene.volume_of("buffer-events-1").await?;
    let load = Load::start(scene.client.clone(), &scene.ns, &scene.name);
    load.until_more_acked(1000, Duration::from_secs(60)).await?;
    // Kafka away: pod 1's buffer fills; then pod 1 is scaled away.
    broker.stop().await?;
    load.until_more_acked(500, Duration::from_secs(60)).await?;
    scene.scale(1).await?;
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
    // Kafka back: the Job delivers; the pod comes back at the same time.
    broker.restart().await?;
    scene.scale(2).await?;
    scene.wait_ready(2).await?;
    // Both pods take load while the Job may still deliver.
    load.until_more_acked(1000, Duration::from_secs(60)).await?;
    let (acked, refused) = load.finish().await?;
    let (found, dups) = count_in_kafka(&broker, &acked).await?;
    report(
        "7x pod returns while its job delivers, exactly-once",
        acked.len(),
        found,
        dups,
        refused,
        "read_committed",
    );
    ensure!(
        found == acked.len(),
        "{} of {} acknowledged events found",
        found,
        acked.len()
    );
    ensure!(dups == 0, "{dups} duplicates with exactly-once delivery");
    Ok(())
}
