//! The story the demo tells while its client posts: a capture pod killed and
//! scaled away (its volume stays `Retain`, a flush Job drains it, the volume
//! flips to `Delete`), then Kafka stopped for a while (events keep being
//! acknowledged and buffered, and are delivered when it returns), then the
//! count of every acknowledged uuid in Kafka.
//!
//! Each observation that the story promises is printed as a line starting
//! with `ok:`; anything that does not happen within its deadline fails the
//! story with what was awaited.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use holdfast_e2e::kafka::{self, ConsumeOptions, KafkaBroker};
use holdfast_e2e::kube::{Harness, poll_until};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::client;
use crate::tables::{self, CLEAN_ANNOTATION, CLUSTER, TOPIC, print_all};
use crate::watch::Observer;

/// The pod the first act kills: the highest ordinal, which a scale-down
/// removes.
const VICTIM: &str = "events-2";
/// Its claim.
const VICTIM_CLAIM: &str = "buffer-events-2";
/// How long a flush Job may take from the kill to the volume deleted.
const RECOVERY: Duration = Duration::from_secs(180);
/// How long delivery may take once Kafka is back.
const DELIVERY: Duration = Duration::from_secs(120);

/// Prints a section title.
pub fn section(title: &str) {
    println!("\n=== {title}\n");
}

/// Prints an observation the story promised.
pub fn ok(text: &str) {
    println!("  ok: {text}");
}

/// What the acts share.
pub struct Story<'a> {
    pub h: &'a Harness,
    pub client: Client,
    pub ns: String,
    pub broker: &'a mut KafkaBroker,
    pub load: client::Client,
    pub observer: Observer,
}

impl Story<'_> {
    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn show(&self) {
        print_all(&self.client, &self.ns, Some(&self.broker.bootstrap())).await;
    }

    /// Act 1: SIGKILL + scale-down → `Retain` → flush Job → `Delete`.
    pub async fn kill_and_scale_down(&mut self) -> Result<()> {
        section(&format!(
            "1. {VICTIM} is SIGKILLed and the cluster scaled down to 2: it never comes back"
        ));
        poll_until(
            "the client's first 500 acknowledged events",
            Duration::from_secs(60),
            || async { (self.load.counts().0 >= 500).then_some(()) },
        )
        .await?;
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &self.ns);
        let volume = claims
            .get(VICTIM_CLAIM)
            .await?
            .spec
            .and_then(|s| s.volume_name)
            .context("the victim's claim is not bound")?;
        let ip = self
            .pods()
            .get(VICTIM)
            .await?
            .status
            .and_then(|s| s.pod_ip)
            .context("the victim has no IP")?;
        let held = tables::buffered(&ip).await;
        println!(
            "  {VICTIM} has {} events in its buffer on {volume} (client: {} acknowledged so far)",
            held.map_or("?".into(), |n| n.to_string()),
            self.load.counts().0
        );
        println!("  $ kill -9 <{VICTIM} processes>");
        println!(
            "  $ kubectl patch capturecluster {CLUSTER} -n {} --type merge -p '{{\"spec\":{{\"replicas\":2}}}}'",
            self.ns
        );
        self.h.agent().kill_pod(&self.ns, VICTIM)?;
        tables::captureclusters(&self.client, &self.ns)
            .patch(
                CLUSTER,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 2}})),
            )
            .await?;
        // It is killed again whenever it restarts before the StatefulSet
        // deletes it, so it never drains its buffer itself.
        let killed_at = Instant::now();
        poll_until(
            &format!("pod {VICTIM} gone"),
            Duration::from_secs(60),
            || async {
                let _ = self.h.agent().kill_pod(&self.ns, VICTIM);
                self.pods()
                    .get_opt(VICTIM)
                    .await
                    .ok()?
                    .is_none()
                    .then_some(())
            },
        )
        .await?;
        let pv: PersistentVolume = Api::all(self.client.clone()).get(&volume).await?;
        let policy = pv
            .spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.clone());
        let clean = pv.annotations().get(CLEAN_ANNOTATION).cloned();
        self.show().await;
        ensure!(
            policy.as_deref() == Some("Retain") && clean.as_deref() != Some("true"),
            "volume {volume} is {policy:?} clean={clean:?} after its pod was killed"
        );
        ok(&format!(
            "volume {volume} of {VICTIM} stays Retain (clean={}): no pod will drain it",
            clean.as_deref().unwrap_or("unset")
        ));

        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.ns);
        let job = poll_until("the operator's flush Job", RECOVERY, || async {
            let list = jobs.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .map(|j| j.name_any())
                .find(|n| n.contains(&volume))
                .or_else(|| {
                    // Succeeded and already deleted between two polls.
                    let seen = self.observer.seen.lock().expect("seen lock");
                    seen.succeeded_jobs
                        .iter()
                        .find(|n| n.contains(&volume))
                        .cloned()
                })
        })
        .await?;
        println!(
            "  the operator started flush Job {job} {:.1}s after the kill",
            killed_at.elapsed().as_secs_f64()
        );
        self.show().await;

        poll_until(
            &format!("volume {volume} drained and deleted"),
            RECOVERY,
            || async { self.observer.volume(&volume).deleted.then_some(()) },
        )
        .await?;
        let life = self.observer.volume(&volume);
        ensure!(
            self.observer.job_succeeded(&job),
            "flush Job {job} was never seen succeeded"
        );
        ok(&format!("flush Job {job} succeeded"));
        ensure!(
            life.retain_then_delete() && life.clean.as_deref() == Some("true"),
            "volume {volume} went through {:?}, clean={:?}",
            life.policies,
            life.clean
        );
        ok(&format!(
            "volume {volume} went {} (clean=true) and was deleted, {:.1}s after the kill",
            life.policies.join(" -> "),
            killed_at.elapsed().as_secs_f64()
        ));
        self.show().await;
        self.print_events(&["FlushJobStarted", "VolumeDrained"])
            .await;
        Ok(())
    }

    /// Prints the namespace's Events with these reasons, oldest first.
    async fn print_events(&self, reasons: &[&str]) {
        println!(
            "  $ kubectl get events -n {} (the operator's, about the orphan)",
            self.ns
        );
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        let mut items = events
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        items.retain(|e| e.reason.as_deref().is_some_and(|r| reasons.contains(&r)));
        items.sort_by_key(|e| e.event_time.clone().map(|t| t.0));
        for event in items {
            println!(
                "    {:<16} {}",
                event.reason.unwrap_or_default(),
                event.note.unwrap_or_default()
            );
        }
        println!();
    }

    /// Act 2: Kafka stops for `outage`; acknowledged events are buffered,
    /// then delivered when it returns.
    pub async fn kafka_outage(&mut self, outage: Duration) -> Result<()> {
        section(&format!(
            "2. Kafka stops for {}s: events keep being acknowledged and buffered",
            outage.as_secs()
        ));
        self.broker.stop().await?;
        self.load.set_outage(true);
        println!("  $ (Kafka stopped)");
        let stopped_at = Instant::now();
        // The display is paced; the deadline is the condition's.
        let mut next_line = Duration::from_secs(3);
        loop {
            let (_, in_outage, _) = self.load.counts();
            let elapsed = stopped_at.elapsed();
            if elapsed >= outage && in_outage > 0 {
                break;
            }
            ensure!(
                elapsed < outage + Duration::from_secs(60),
                "no event was acknowledged in {}s without Kafka",
                elapsed.as_secs()
            );
            if elapsed >= next_line {
                let held: u64 = tables::buffers(&self.client, &self.ns)
                    .await
                    .iter()
                    .filter_map(|(_, n)| *n)
                    .sum();
                println!(
                    "  +{:>2}s without Kafka: {in_outage} events acknowledged, {held} buffered on the pods' volumes",
                    elapsed.as_secs()
                );
                next_line += Duration::from_secs(3);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        print_all(&self.client, &self.ns, None).await;
        println!("  kafka: stopped\n");
        let buffers = tables::buffers(&self.client, &self.ns).await;
        let held: u64 = buffers.iter().filter_map(|(_, n)| *n).sum();
        let (_, in_outage, _) = self.load.counts();
        ok(&format!(
            "Kafka down {}s: {in_outage} events acknowledged while it was down; {held} events buffered on {} pods",
            stopped_at.elapsed().as_secs(),
            buffers.len()
        ));
        self.load.set_outage(false);
        let outage_uuids = self.load.acked_in_outage();
        self.broker.restart().await?;
        let back_at = Instant::now();
        println!("  $ (Kafka started again)");
        let bootstrap = self.broker.bootstrap();
        poll_until(
            "the events acknowledged during the outage in Kafka",
            DELIVERY,
            || async {
                let found = uuids_in_kafka(&bootstrap).await.ok()?;
                outage_uuids
                    .iter()
                    .all(|u| found.contains_key(u))
                    .then_some(())
            },
        )
        .await?;
        ok(&format!(
            "Kafka back: all {} events acknowledged during the outage are in Kafka, {:.1}s after it returned",
            outage_uuids.len(),
            back_at.elapsed().as_secs_f64()
        ));
        self.show().await;
        Ok(())
    }
}

/// How many times each uuid (the `holdfast-uuid` header) is in the topic.
pub async fn uuids_in_kafka(bootstrap: &str) -> Result<HashMap<String, usize>> {
    let total = kafka::record_count(bootstrap, TOPIC).await?;
    let records = kafka::consume(
        bootstrap,
        TOPIC,
        &ConsumeOptions::new(total, Duration::from_secs(60)),
    )
    .await?;
    let mut counts = HashMap::new();
    for record in &records {
        if let Some(uuid) = record.header("holdfast-uuid") {
            *counts
                .entry(String::from_utf8_lossy(uuid).into_owned())
                .or_default() += 1;
        }
    }
    Ok(counts)
}

/// The final count: acknowledged uuids, how many are in Kafka, duplicates.
/// Waits (up to [`DELIVERY`]) for the last acknowledged events to arrive.
pub async fn count_in_kafka(bootstrap: &str, acked: &HashSet<String>) -> Result<(usize, usize)> {
    let deadline = Instant::now() + DELIVERY;
    loop {
        let counts = uuids_in_kafka(bootstrap).await?;
        let found = acked.iter().filter(|u| counts.contains_key(*u)).count();
        if found == acked.len() || Instant::now() >= deadline {
            let duplicates = acked
                .iter()
                .filter_map(|u| counts.get(u))
                .map(|n| n - 1)
                .sum();
            return Ok((found, duplicates));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
