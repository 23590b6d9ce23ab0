//! Two operator processes on one Lease: only the leader reconciles; when it
//! stops (SIGTERM releases the Lease), the standby takes over and applies
//! the next change.
//!
//! Needs: `make e2e-bins` and the workspace binaries (`cargo build --bins`).

mod operator_support;

use std::time::Duration;

use anyhow::{Context, ensure};
use holdfast_e2e::kube::{self as harness, poll_until};
use holdfast_operator::api::CaptureCluster;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams, PostParams};
use operator_support::{Operator, TIMEOUT, init_tracing, install_cluster_wide, operator_identity};
use serde_json::json;

fn linger_of(sts: &StatefulSet) -> Option<String> {
    sts.spec.as_ref()?.template.spec.as_ref()?.containers[0]
        .env
        .iter()
        .flatten()
        .find(|v| v.name == "HOLDFAST_KAFKA_PROPERTIES")?
        .value
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_reconciles_and_a_standby_takes_over() -> anyhow::Result<()> {
    init_tracing();
    let h = harness::shared().await;
    let client = h.client()?;
    install_cluster_wide(&client).await?;
    let ns = h.namespace("op-leader").await?;
    let kubeconfig = operator_identity(h, &ns).await?;
    let mut a = Operator::start(h, &ns, &kubeconfig, "op-a")?;
    let mut b = Operator::start(h, &ns, &kubeconfig, "op-b")?;

    // One of them leads, per the Lease and its /readyz.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = poll_until("a leader", TIMEOUT, || async {
        let lease = leases.get_opt("holdfast-operator").await.ok()??;
        let holder = lease.spec?.holder_identity?;
        (!holder.is_empty()).then_some(holder)
    })
    .await
    .with_context(|| format!("{}\n{}", a.log_text(), b.log_text()))?;
    let (leader, standby) = if holder == a.identity {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    poll_until("leader ready", TIMEOUT, || async {
        leader.leads().await.then_some(())
    })
    .await?;
    ensure!(!standby.leads().await, "the standby says it leads");

    // A cluster (no pods needed: replicas 0) is reconciled by the leader only.
    let ccs: Api<CaptureCluster> = Api::namespaced(client.clone(), &ns);
    let cc: CaptureCluster = serde_json::from_value(json!({
        "apiVersion": "holdfast.dev/v1alpha1",
        "kind": "CaptureCluster",
        "metadata": {"name": "lead"},
        "spec": {
            "replicas": 0,
            "image": "holdfast/capture:dev",
            "kafka": {"bootstrapServers": "127.0.0.1:9", "properties": {"linger.ms": "1"}},
            "storage": {"size": "64Mi"},
        },
    }))?;
    ccs.create(&PostParams::default(), &cc).await?;
    let stss: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    poll_until("statefulset applied by the leader", TIMEOUT, || async {
        stss.get_opt("lead").await.ok()?.map(|_| ())
    })
    .await
    .with_context(|| leader.log_text())?;
    let led = leader
        .reconciles("capturecluster")
        .await
        .context("leader metrics")?;
    ensure!(led >= 1.0, "leader reconciled {led} times");
    let idle = standby
        .reconciles("capturecluster")
        .await
        .context("standby metrics")?;
    ensure!(idle == 0.0, "the standby reconciled {idle} times");
    let text = leader.metrics().await.context("leader metrics")?;
    for wanted in [
        "holdfast_operator_leader 1",
        "holdfast_operator_reconcile_duration_seconds_bucket{",
    ] {
        ensure!(text.contains(wanted), "no {wanted:?} in\n{text}");
    }
    let text = standby.metrics().await.context("standby metrics")?;
    ensure!(text.contains("holdfast_operator_leader 0"), "{text}");

    // The leader stops; the standby takes the released Lease and applies
    // the next change.
    let status = leader.stop().await?;
    ensure!(status.success(), "leader exited with {status}");
    let new_holder = poll_until("standby leads", Duration::from_secs(60), || async {
        standby.leads().await.then_some(())?;
        leases
            .get("holdfast-operator")
            .await
            .ok()?
            .spec?
            .holder_identity
    })
    .await
    .with_context(|| standby.log_text())?;
    ensure!(new_holder == standby.identity, "lease held by {new_holder}");
    ccs.patch(
        "lead",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"kafka": {"properties": {"linger.ms": "7"}}}})),
    )
    .await?;
    poll_until("change applied by the new leader", TIMEOUT, || async {
        let sts = stss.get("lead").await.ok()?;
        (linger_of(&sts)? == "linger.ms=7").then_some(())
    })
    .await
    .with_context(|| standby.log_text())?;
    let now = standby.reconciles("capturecluster").await.unwrap_or(0.0);
    ensure!(now >= 1.0, "new leader reconciled {now} times");
    leader.ensure_never_forbidden()?;
    standby.ensure_never_forbidden()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lease_is_taken_stops_at_once() -> anyhow::Result<()> {
    init_tracing();
    let h = harness::shared().await;
    let client = h.client()?;
    install_cluster_wide(&client).await?;
    let ns = h.namespace("op-lost").await?;
    let kubeconfig = operator_identity(h, &ns).await?;
    let mut a = Operator::start(h, &ns, &kubeconfig, "op-a")?;
    poll_until("op-a leads", TIMEOUT, || async {
        a.leads().await.then_some(())
    })
    .await
    .with_context(|| a.log_text())?;

    // Someone else holds the Lease now (a partition healed, a clock jumped).
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let taken = std::time::Instant::now();
    leases
        .patch(
            "holdfast-operator",
            &PatchParams::apply("intruder").force(),
            &Patch::Apply(json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "spec": {
                    "holderIdentity": "intruder",
                    "leaseDurationSeconds": 60,
                    "renewTime": micro_time_now(),
                    "acquireTime": micro_time_now(),
                },
            })),
        )
        .await?;
    // It notices at its next renewal (every lease − grace = 4 s) and exits.
    let status = a
        .exited_within(Duration::from_secs(15))
        .await
        .with_context(|| format!("op-a still runs after losing its Lease:\n{}", a.log_text()))?;
    let took = taken.elapsed();
    ensure!(!status.success(), "op-a exited 0 after losing its Lease");
    let log = a.log_text();
    ensure!(
        log.contains("stopped every controller"),
        "op-a did not stop its controllers at once:\n{log}"
    );
    let holder = leases
        .get("holdfast-operator")
        .await?
        .spec
        .and_then(|s| s.holder_identity);
    ensure!(
        holder.as_deref() == Some("intruder"),
        "op-a overwrote the new holder: {holder:?}"
    );
    eprintln!(
        "LEADER lease taken to operator exited: {:.1}s",
        took.as_secs_f64()
    );
    Ok(())
}

/// Now as a Kubernetes MicroTime (RFC 3339 with microseconds).
fn micro_time_now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S.000000Z")
        .to_string()
}
