//! Issue 9 item 5: a capture pod that cannot make its volume `Retain` stays
//! unready and acknowledges nothing, and turns ready by itself once it can.
//!
//! On a real control plane: a PersistentVolume left `Delete` and
//! `holdfast.dev/clean=true` by an earlier clean drain, a claim bound to it,
//! and the real `holdfast-capture serve` binary run as a local process under
//! a ServiceAccount token that may read its claim but not PersistentVolumes.
//! Kafka is unreachable (127.0.0.1:1): readiness and acceptance do not depend
//! on it, and an accepted event simply waits in the buffer.
//!
//! Why this fails on the code before the fix (bcde454): there
//! `VolumeGuard::before_ready` only logged a failed patch and `serve` set
//! `started` right after, so `/readyz` answered 200 `ready` (and a POST 200)
//! while the PV was still `Delete` and marked clean; the first wait below
//! stops at that 200 with "ready while its volume is not Retain".
//!
//! Needs the control-plane binaries (`make e2e-bins`) and a built
//! `holdfast-capture` (`cargo build --bins`, or `HOLDFAST_BIN_DIR`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use holdfast_e2e::capture::capture_bin;
use holdfast_e2e::kube::control_plane::free_port;
use holdfast_e2e::kube::process::Process;
use holdfast_e2e::kube::{Harness, HarnessConfig, poll_until};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const CLAIM: &str = "data-capture-0";
const SA: &str = "capture";
/// The guard's backoff tops out at 15 s (capture/src/app.rs `guard_volume`);
/// a retry is due within that after the grant, plus slack for a loaded machine.
const READY_AFTER_GRANT: Duration = Duration::from_secs(20);
const TIMEOUT: Duration = Duration::from_secs(30);

/// Reclaim policy and `holdfast.dev/clean` of a PV.
fn guard_state(pv: &PersistentVolume) -> (String, Option<String>) {
    (
        pv.spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.clone())
            .unwrap_or_default(),
        pv.annotations().get("holdfast.dev/clean").cloned(),
    )
}

/// `GET /readyz`: status and body, `None` while the port does not answer.
async fn readyz(http: &reqwest::Client, url: &str) -> Option<(u16, String)> {
    let r = http.get(format!("{url}/readyz")).send().await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.ok()?))
}

/// `POST /v1/events` of one event: status and body.
async fn post_event(http: &reqwest::Client, url: &str, i: u32) -> anyhow::Result<(u16, String)> {
    let r = http
        .post(format!("{url}/v1/events"))
        .header("content-type", "application/json")
        .body(json!({"probe": i}).to_string())
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.text().await?))
}

/// `holdfast_buffer_events` from `/metrics`.
async fn buffered_events(http: &reqwest::Client, url: &str) -> anyhow::Result<f64> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix("holdfast_buffer_events "))
        .context("no holdfast_buffer_events in /metrics")?
        .trim()
        .parse()
        .context("holdfast_buffer_events value")
}

/// A ServiceAccount that may `get` claims in `ns` and nothing else, and a
/// kubeconfig authenticating as it (a TokenRequest token).
async fn claim_reader_identity(h: &Harness, ns: &str) -> anyhow::Result<std::path::PathBuf> {
    let client = h.client()?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": SA}}))?,
    )
    .await?;
    Api::<Role>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "read-claims"},
                "rules": [{"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get"]}],
            }))?,
        )
        .await?;
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "read-claims"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-claims"},
                "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": ns}],
            }))?,
        )
        .await?;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let token = sas
        .create_token_request(SA, &PostParams::default(), &request)
        .await?
        .status
        .context("token request without status")?
        .token;
    let cp = h.control_plane();
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": cp.url(),
            "certificate-authority": cp.pki().ca_cert.display().to_string(),
        }}],
        "users": [{"name": SA, "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": SA, "namespace": ns}}],
        "current-context": "test",
    });
    let path = h.dir().join(format!("capture-{ns}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&kubeconfig)?)?;
    Ok(path)
}

/// Grants the shipped capture ClusterRole (`operator/rbac/capture-clusterrole.yaml`:
/// get and patch on PersistentVolumes) to the ServiceAccount.
async fn grant_capture_role(h: &Harness, ns: &str) -> anyhow::Result<()> {
    let client = h.client()?;
    let role: ClusterRole = serde_yaml::from_str(&std::fs::read_to_string(format!(
        "{REPO}/operator/rbac/capture-clusterrole.yaml"
    ))?)?;
    Api::<ClusterRole>::all(client.clone())
        .patch(
            &role.name_any(),
            &PatchParams::apply("holdfast-e2e").force(),
            &Patch::Apply(&role),
        )
        .await
        .context("apply the capture ClusterRole")?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("holdfast-capture-{ns}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role.name_any()},
        "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": ns}],
    }))?;
    Api::<ClusterRoleBinding>::all(client)
        .create(&PostParams::default(), &binding)
        .await
        .context("bind the capture ClusterRole")?;
    Ok(())
}

/// How many times the log says the guard failed and will retry.
fn guard_failures(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("volume not guarded")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_stays_unready_until_its_volume_reads_back_retain() -> anyhow::Result<()> {
    let h = Harness::start(HarnessConfig::default()).await?;
    let result = scenario(&h).await;
    h.stop().await;
    result
}

async fn scenario(h: &Harness) -> anyhow::Result<()> {
    let client = h.client()?;
    let ns = h.namespace("guard").await?;

    // The volume as an earlier clean drain left it: Delete, clean=true.
    let data_dir = h.dir().join(format!("guard-{ns}"));
    std::fs::create_dir_all(&data_dir)?;
    let pv_name = format!("guard-{ns}");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    pvs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": pv_name, "annotations": {"holdfast.dev/clean": "true"}},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": "",
                "hostPath": {"path": data_dir.display().to_string()},
                "claimRef": {"namespace": ns, "name": CLAIM},
            },
        }))?,
    )
    .await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    claims
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": CLAIM},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "",
                    "volumeName": pv_name,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            }))?,
        )
        .await?;
    poll_until("claim bound to the volume", TIMEOUT, || async {
        let c = claims.get(CLAIM).await.ok()?;
        (c.status?.phase.as_deref() == Some("Bound")).then_some(())
    })
    .await?;

    let kubeconfig = claim_reader_identity(h, &ns).await?;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = h.dir().join(format!("capture-{ns}.log"));
    let started = Instant::now();
    let mut capture = Process::spawn(
        "holdfast-capture",
        &capture_bin()?,
        |c| {
            c.arg("serve")
                .arg(format!("--listen=127.0.0.1:{port}"))
                .arg(format!("--data-dir={}", data_dir.display()))
                .arg("--kafka-bootstrap=127.0.0.1:1")
                .arg(format!("--volume-claim={CLAIM}"))
                .arg(format!("--namespace={ns}"))
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("KUBECONFIG", &kubeconfig)
                .env("HOLDFAST_LOG", "info,librdkafka=warn");
        },
        &log,
    )?;
    let tail = |log: &Path| {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;

    // Unready, naming the problem; never ready while the PV is Delete.
    let body = poll_until("/readyz naming the unguarded volume", TIMEOUT, || async {
        match readyz(&http, &url).await? {
            (200, body) => Some(Err(body)),
            (503, body) if body.contains("volume not retained") => Some(Ok(body)),
            _ => None,
        }
    })
    .await
    .with_context(|| tail(&log))?;
    let body = match body {
        Ok(body) => body,
        Err(body) => bail!(
            "ready ({body:?}) while its volume is not Retain: {:?}",
            guard_state(&pvs.get(&pv_name).await?)
        ),
    };
    ensure!(
        body.contains("missing permission") && body.contains("PersistentVolume"),
        "/readyz does not name the missing permission: {body:?}"
    );
    ensure!(
        body.contains(&format!("{ns}/{CLAIM}")),
        "/readyz does not name the claim: {body:?}"
    );

    // Nothing is acknowledged: 503 `starting`, nothing in the buffer.
    let (status, reply) = post_event(&http, &url, 0).await?;
    ensure!(
        status == 503 && reply.contains("starting"),
        "POST before the volume is guarded: {status} {reply}"
    );
    ensure!(
        buffered_events(&http, &url).await? == 0.0,
        "a refused event was buffered"
    );

    // It keeps trying (at least one retry seen), and the PV is untouched.
    poll_until("a retry of the volume guard", TIMEOUT, || async {
        (guard_failures(&log) >= 2).then_some(())
    })
    .await
    .with_context(|| tail(&log))?;
    let (policy, clean) = guard_state(&pvs.get(&pv_name).await?);
    ensure!(
        policy == "Delete" && clean.as_deref() == Some("true"),
        "PV changed without permission: {policy} clean={clean:?}"
    );
    let (status, body) = readyz(&http, &url).await.context("/readyz")?;
    ensure!(status == 503, "ready without permission: {status} {body}");
    ensure!(
        capture.try_wait().is_none(),
        "holdfast-capture exited: {}",
        tail(&log)
    );

    // Grant the shipped role: ready by itself, no restart.
    grant_capture_role(h, &ns).await?;
    let granted = Instant::now();
    poll_until("ready after the grant", READY_AFTER_GRANT, || async {
        (readyz(&http, &url).await?.0 == 200).then_some(())
    })
    .await
    .with_context(|| tail(&log))?;
    let ready_after = granted.elapsed();
    ensure!(
        capture.try_wait().is_none(),
        "holdfast-capture restarted or exited: {}",
        tail(&log)
    );
    let pv = pvs.get(&pv_name).await?;
    let (policy, clean) = guard_state(&pv);
    ensure!(
        policy == "Retain" && clean.as_deref() == Some("false"),
        "ready but PV reads {policy} clean={clean:?}"
    );
    ensure!(
        pv.annotations()
            .get("holdfast.dev/volume-id")
            .is_some_and(|id| !id.is_empty()),
        "PV has no holdfast.dev/volume-id"
    );
    let (status, reply) = post_event(&http, &url, 1).await?;
    ensure!(status == 200, "POST once guarded: {status} {reply}");
    ensure!(
        buffered_events(&http, &url).await? == 1.0,
        "the accepted event is not (alone) in the buffer"
    );
    eprintln!(
        "capture_volume_guard: unready {:.1}s with {} failed guard attempts, ready {:.1}s after the grant",
        (granted - started).as_secs_f64(),
        guard_failures(&log),
        ready_after.as_secs_f64()
    );
    // SIGKILL: a SIGTERM would wait out the drain for an unreachable Kafka.
    drop(capture);
    Ok(())
}
