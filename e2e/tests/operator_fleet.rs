//! Operator at fleet scale (issue 11, item 10): a benchmark, not a timed
//! test (`make bench-operator`; ignored by `make test`).
//!
//! On the real control plane, one namespace holds 50 CaptureClusters of 20
//! replicas each, 1,000 claims of their StatefulSets' template names and
//! 1,000 PVs labelled for them, as objects only: a ResourceQuota of zero
//! pods keeps the StatefulSets from starting pods, the claims wait for a
//! first consumer and the PVs are of a class nothing claims. The operator
//! (child process, least-privilege RBAC) then watches them all. Figures:
//!
//! - time until every cluster is reconciled once (status observed);
//! - API requests per minute of the operator idle on the fleet, counted
//!   request by request from the API server's audit log of its
//!   ServiceAccount (`HOLDFAST_E2E_AUDIT=1`, which `make bench-operator`
//!   sets), by verb and resource; and the whole control plane's
//!   `apiserver_request_total` over the same minute, for scale;
//! - the operator's resident memory (`VmRSS`, peak `VmHWM`);
//! - reconcile latency per controller (mean and the histogram's p50/p99
//!   buckets, `holdfast_operator_reconcile_duration_seconds`) for the first
//!   pass, the idle minute and the whole run;
//! - for each of a few new orphans (a bound claim of an ordinal no
//!   cluster wants), the time from its claim being bound to its flush Job
//!   existing (the target: within 10 s).
//!
//! `HOLDFAST_FLEET_CLUSTERS` / `HOLDFAST_FLEET_REPLICAS` change the size.

mod operator_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::{StreamExt, TryStreamExt};
use holdfast_e2e::kube::{self as harness, poll_until};
use holdfast_operator::api::{CLAIM_LABEL, CLUSTER_LABEL, CaptureCluster, NAMESPACE_LABEL};
use holdfast_operator::orphans::job::flush_job_name;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, ResourceQuota};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Client;
use kube::api::{Api, PostParams};
use operator_support::{Operator, init_tracing, install_cluster_wide, operator_identity};
use serde_json::json;

/// Claims wait for a first consumer that never comes (no provisioner).
const CLAIM_CLASS: &str = "holdfast-bench";
/// PVs of a class no bulk claim asks for: they stay Available.
const VOLUME_CLASS: &str = "holdfast-bench-static";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cluster_name(i: usize) -> String {
    format!("fleet-{i:02}")
}

fn claim(
    ns: &str,
    cluster: &str,
    ordinal: usize,
    class: &str,
    volume: Option<&str>,
) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": {"name": format!("buffer-{cluster}-{ordinal}"), "namespace": ns,
            "labels": {CLUSTER_LABEL: cluster}},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": class,
            "volumeName": volume,
            "resources": {"requests": {"storage": "64Mi"}}},
    }))
    .expect("claim")
}

fn volume(name: &str, ns: &str, cluster: &str, claim: &str, bound_to: bool) -> PersistentVolume {
    let claim_ref = bound_to.then(|| json!({"namespace": ns, "name": claim}));
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {
            CLUSTER_LABEL: cluster, NAMESPACE_LABEL: ns, CLAIM_LABEL: claim}},
        "spec": {"accessModes": ["ReadWriteOnce"], "capacity": {"storage": "64Mi"},
            "storageClassName": VOLUME_CLASS,
            "persistentVolumeReclaimPolicy": "Retain",
            "claimRef": claim_ref,
            "hostPath": {"path": format!("/tmp/holdfast-bench/{name}")}},
    }))
    .expect("volume")
}

async fn create_all<K>(api: &Api<K>, objects: Vec<K>) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    futures::stream::iter(objects)
        .map(|o| {
            let api = api.clone();
            async move { api.create(&PostParams::default(), &o).await.map(|_| ()) }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// `apiserver_request_total` summed per resource.
async fn apiserver_requests(client: &Client) -> anyhow::Result<BTreeMap<String, f64>> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let resource = labels
            .split(',')
            .find_map(|kv| kv.strip_prefix("resource=\""))
            .map(|r| r.trim_end_matches(['"', '}']).to_string())
            .unwrap_or_default();
        *out.entry(resource).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
    }
    Ok(out)
}

/// Requests per minute per resource over `window`.
async fn request_rate(client: &Client, window: Duration) -> anyhow::Result<BTreeMap<String, f64>> {
    let before = apiserver_requests(client).await?;
    tokio::time::sleep(window).await;
    let after = apiserver_requests(client).await?;
    let per_min = 60.0 / window.as_secs_f64();
    Ok(after
        .iter()
        .map(|(r, v)| {
            (
                r.clone(),
                (v - before.get(r).copied().unwrap_or(0.0)) * per_min,
            )
        })
        .filter(|(_, v)| *v > 0.0)
        .collect())
}

/// Requests per minute of `user` between `from` and `to`, by verb and
/// resource, from the API server's audit log (`HOLDFAST_E2E_AUDIT`); `None`
/// when there is no audit log.
fn audited_rate(
    log: &std::path::Path,
    user: &str,
    from: jiff::Timestamp,
    to: jiff::Timestamp,
) -> Option<(f64, Vec<(String, f64)>)> {
    let text = std::fs::read_to_string(log).ok()?;
    let mut seen = std::collections::BTreeSet::new();
    let mut by: BTreeMap<String, f64> = BTreeMap::new();
    for line in text.lines() {
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if entry["user"]["username"].as_str() != Some(user) {
            continue;
        }
        let Some(at) = entry["requestReceivedTimestamp"]
            .as_str()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        else {
            continue;
        };
        let id = entry["auditID"].as_str().unwrap_or_default().to_string();
        if at < from || at > to || !seen.insert(id) {
            continue;
        }
        let key = format!(
            "{} {}",
            entry["verb"].as_str().unwrap_or("?"),
            entry["objectRef"]["resource"].as_str().unwrap_or("?")
        );
        *by.entry(key).or_insert(0.0) += 1.0;
    }
    let minutes = to.duration_since(from).as_secs_f64() / 60.0;
    let total = by.values().sum::<f64>() / minutes;
    let mut by: Vec<(String, f64)> = by.into_iter().map(|(k, n)| (k, n / minutes)).collect();
    by.sort_by(|a, b| b.1.total_cmp(&a.1));
    Some((total, by))
}

/// The pid of the operator serving metrics on `addr` (from /proc environ).
fn operator_pid(addr: &str) -> Option<u32> {
    let needle = format!("HOLDFAST_OPERATOR_LISTEN={addr}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        environ
            .split(|b| *b == 0)
            .any(|kv| kv == needle.as_bytes())
            .then_some(pid)
    })
}

/// `VmRSS` and `VmHWM` of `pid`, in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Sum, count and cumulative buckets of the reconcile histogram of
/// `controller` in a `/metrics` text.
fn histogram(metrics: &str, controller: &str) -> (f64, f64, Vec<(f64, f64)>) {
    let sample = |suffix: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "holdfast_operator_reconcile_duration_seconds_{suffix}{{controller=\"{controller}\"}} "
                ))?
                .trim()
                .parse::<f64>()
                .ok()
            })
            .unwrap_or(0.0)
    };
    let buckets = metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("holdfast_operator_reconcile_duration_seconds_bucket{")?;
            if !rest.contains(&format!("controller=\"{controller}\"")) {
                return None;
            }
            let le = rest.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let n = rest.rsplit_once(' ')?.1.trim().parse().ok()?;
            Some((le, n))
        })
        .collect();
    (sample("sum"), sample("count"), buckets)
}

/// Mean, p50 and p99 bucket bounds of the reconciles of `controller`
/// between two `/metrics` texts.
fn reconcile_latency(before: &str, after: &str, controller: &str) -> String {
    let (sum0, count0, buckets0) = histogram(before, controller);
    let (sum1, count1, buckets1) = histogram(after, controller);
    let (sum, count) = (sum1 - sum0, count1 - count0);
    if count <= 0.0 {
        return format!("{controller}: no reconciles");
    }
    let buckets: Vec<(f64, f64)> = buckets1
        .iter()
        .map(|(le, n)| {
            let n0 = buckets0
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, n)| *n);
            (*le, n - n0)
        })
        .collect();
    let quantile = |q: f64| {
        buckets
            .iter()
            .find(|(_, n)| *n >= q * count)
            .map_or(f64::INFINITY, |(le, _)| *le)
    };
    format!(
        "{controller}: {count} reconciles, mean {:.1} ms, p50 <= {} s, p99 <= {} s",
        1000.0 * sum / count.max(1.0),
        quantile(0.5),
        quantile(0.99)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with make bench-operator"]
async fn fleet_of_50_clusters_and_1000_volumes() -> anyhow::Result<()> {
    init_tracing();
    let clusters = env_or("HOLDFAST_FLEET_CLUSTERS", 50);
    let replicas = env_or("HOLDFAST_FLEET_REPLICAS", 20);
    let h = harness::shared().await;
    let client = h.client()?;
    install_cluster_wide(&client).await?;
    let ns = h.namespace("fleet").await?;
    let classes: Api<StorageClass> = Api::all(client.clone());
    for name in [CLAIM_CLASS, VOLUME_CLASS] {
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": {"name": name},
            "provisioner": "holdfast.dev/bench-none",
            "volumeBindingMode": "WaitForFirstConsumer",
        }))?;
        match classes.create(&PostParams::default(), &class).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Objects only: no capture pod may start.
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-pods"},
        "spec": {"hard": {"pods": "0"}},
    }))?;
    Api::<ResourceQuota>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &quota)
        .await?;

    let started = Instant::now();
    let ccs: Api<CaptureCluster> = Api::namespaced(client.clone(), &ns);
    let mut specs = Vec::new();
    for i in 0..clusters {
        let mut cc: CaptureCluster = serde_json::from_value(json!({
            "apiVersion": "holdfast.dev/v1alpha1", "kind": "CaptureCluster",
            "metadata": {"name": cluster_name(i)},
            "spec": {"replicas": replicas, "image": "holdfast/capture:dev",
                "kafka": {"bootstrapServers": "127.0.0.1:9"},
                "storage": {"size": "64Mi", "storageClassName": CLAIM_CLASS},
                "orphanRecovery": {"delaySeconds": 0}},
        }))?;
        cc.metadata.namespace = Some(ns.clone());
        specs.push(cc);
    }
    create_all(&ccs, specs).await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let mut bulk_claims = Vec::new();
    let mut bulk_volumes = Vec::new();
    for i in 0..clusters {
        let c = cluster_name(i);
        for n in 0..replicas {
            bulk_claims.push(claim(&ns, &c, n, CLAIM_CLASS, None));
            let claim_name = format!("buffer-{c}-{n}");
            bulk_volumes.push(volume(
                &format!("bench-{ns}-{c}-{n}"),
                &ns,
                &c,
                &claim_name,
                false,
            ));
        }
    }
    let objects = bulk_claims.len() + bulk_volumes.len();
    create_all(&claims, bulk_claims).await?;
    create_all(&pvs, bulk_volumes).await?;
    eprintln!(
        "BENCH fleet: {clusters} clusters, {objects} claims+PVs created in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let kubeconfig = operator_identity(h, &ns).await?;
    let operator = Operator::start(h, &ns, &kubeconfig, "op-bench")?;
    let operator_started = Instant::now();
    poll_until(
        "every cluster reconciled",
        Duration::from_secs(600),
        || async {
            let list = ccs.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .all(|c| {
                    c.status.as_ref().and_then(|s| s.observed_generation) == c.metadata.generation
                })
                .then_some(())
        },
    )
    .await
    .with_context(|| operator.log_text())?;
    let first_pass = operator_started.elapsed();
    let pid = operator_pid(&operator.metrics_addr).context("operator pid")?;
    let (rss_first, _) = memory_mib(pid);
    let at_first_pass = operator.metrics().await.unwrap_or_default();

    // Settle: the StatefulSet controller retries the pods the quota
    // refuses (with its own backoff), and each change of a StatefulSet's
    // status wakes its cluster; wait until no cluster was reconciled for
    // 15 s (at most 3 minutes), then measure a minute.
    let settle_from = Instant::now();
    let mut last = operator.reconciles("capturecluster").await.unwrap_or(0.0);
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(15)
        && settle_from.elapsed() < Duration::from_secs(180)
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = operator.reconciles("capturecluster").await.unwrap_or(0.0);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
    let settled = settle_from.elapsed();
    let at_idle_start = operator.metrics().await.unwrap_or_default();
    let idle_from = jiff::Timestamp::now();
    let all = request_rate(&client, Duration::from_secs(60)).await?;
    let idle_to = jiff::Timestamp::now();
    let at_idle_end = operator.metrics().await.unwrap_or_default();

    // New orphans, one at a time: a bound claim of an ordinal no one wants.
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let mut to_job = Vec::new();
    for k in 0..3.min(clusters) {
        let c = cluster_name(k);
        let claim_name = format!("buffer-{c}-{replicas}");
        let pv_name = format!("bench-{ns}-{c}-orphan");
        pvs.create(
            &PostParams::default(),
            &volume(&pv_name, &ns, &c, &claim_name, true),
        )
        .await?;
        let created = Instant::now();
        claims
            .create(
                &PostParams::default(),
                &claim(&ns, &c, replicas, VOLUME_CLASS, Some(&pv_name)),
            )
            .await?;
        poll_until("orphan claim bound", Duration::from_secs(60), || async {
            let c = claims.get(&claim_name).await.ok()?;
            (c.status?.phase.as_deref() == Some("Bound")).then_some(())
        })
        .await?;
        let bound = Instant::now();
        poll_until(
            "flush job of the new orphan",
            Duration::from_secs(120),
            || async {
                jobs.get_opt(&flush_job_name(&pv_name))
                    .await
                    .ok()?
                    .map(|_| ())
            },
        )
        .await
        .with_context(|| operator.log_text())?;
        let job = Instant::now();
        to_job.push(format!(
            "{claim_name}: created->bound {:.1}s, bound->flush Job {:.1}s",
            bound.duration_since(created).as_secs_f64(),
            job.duration_since(bound).as_secs_f64()
        ));
    }
    let (rss, hwm) = memory_mib(pid);
    let at_end = operator.metrics().await.unwrap_or_default();
    let mut triggers: BTreeMap<String, usize> = BTreeMap::new();
    for line in operator.log_text().lines() {
        if let Some(reason) = line
            .split("object.reason=")
            .nth(1)
            .and_then(|r| r.split(['}', ':']).next())
        {
            *triggers.entry(reason.to_string()).or_default() += 1;
        }
    }
    operator.ensure_never_forbidden()?;
    let user = format!("system:serviceaccount:{ns}:holdfast-operator");
    let audit = h.control_plane().audit_log();

    eprintln!(
        "BENCH fleet: first reconcile of all {clusters} clusters {:.1}s after the operator started",
        first_pass.as_secs_f64()
    );
    let total: f64 = all.values().sum();
    match audited_rate(&audit, &user, idle_from, idle_to) {
        Some((rate, by)) => eprintln!(
            "BENCH fleet: API requests/min of the operator, idle on the fleet: {rate:.0} (whole control plane {total:.0}); by verb and resource: {}",
            by.iter()
                .map(|(k, v)| format!("{k} {v:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => eprintln!(
            "BENCH fleet: API requests/min of the whole control plane with the operator idle: {total:.0} (set HOLDFAST_E2E_AUDIT=1, as make bench-operator does, for the operator's own count)"
        ),
    }
    eprintln!(
        "BENCH fleet: settled (no cluster reconciled for 15 s) {:.1}s after the first pass; log lines of reconciles by trigger: {triggers:?}",
        settled.as_secs_f64()
    );
    eprintln!(
        "BENCH fleet: operator memory (debug build): RSS {rss_first:.1} MiB after the first pass, {rss:.1} MiB at the end, peak {hwm:.1} MiB"
    );
    for controller in ["capturecluster", "orphans", "volume"] {
        eprintln!(
            "BENCH fleet: reconcile latency, first pass: {}; idle minute: {}; whole run: {}",
            reconcile_latency("", &at_first_pass, controller),
            reconcile_latency(&at_idle_start, &at_idle_end, controller),
            reconcile_latency("", &at_end, controller),
        );
    }
    for line in &to_job {
        eprintln!("BENCH fleet: new orphan {line}");
    }
    ensure!(
        to_job.len() == 3.min(clusters),
        "not every orphan got its Job"
    );
    Ok(())
}
