//! The Kubernetes harness against itself: a real control plane (etcd,
//! kube-apiserver with RBAC, controller-manager, scheduler), the test storage
//! provisioner and the node agent running pods as local processes.
//!
//! Needs the control-plane binaries: `make e2e-bins` (bash e2e/bins.sh).
//! Every test shares one harness and works in its own namespace.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use holdfast_e2e::kube::process::pid_alive;
use holdfast_e2e::kube::{self as harness, poll_until, storage};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "holdfast_e2e=info".into()),
        )
        .with_test_writer()
        .try_init();
}

fn testpod_binary_name() -> &'static str {
    // Cargo builds the package's binaries for its integration tests, into
    // the directory the agent looks in by default.
    let path = Path::new(env!("CARGO_BIN_EXE_holdfast-testpod"));
    assert!(path.is_file(), "{} is missing", path.display());
    "holdfast-testpod"
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn wait_pod_ready(pods: &Api<Pod>, name: &str) -> anyhow::Result<Pod> {
    Ok(poll_until(&format!("pod {name} ready"), TIMEOUT, || async {
        pods.get_opt(name).await.ok().flatten().filter(pod_ready)
    })
    .await?)
}

fn read_ms(path: &Path) -> anyhow::Result<u128> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    Ok(text.trim().parse()?)
}

/// Lets the namespace's `default` ServiceAccount read pods.
async fn grant_pod_reader(client: &Client, ns: &str) -> anyhow::Result<()> {
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
    }))?;
    Api::<Role>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &role)
        .await?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "pod-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns}],
    }))?;
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(())
}

fn statefulset(grace_seconds: i64) -> anyhow::Result<StatefulSet> {
    let bin = testpod_binary_name();
    Ok(serde_json::from_value(json!({
        "metadata": {"name": "capture"},
        "spec": {
            "replicas": 1,
            "serviceName": "capture",
            "selector": {"matchLabels": {"app": "capture"}},
            "template": {
                "metadata": {"labels": {"app": "capture"}},
                "spec": {
                    "terminationGracePeriodSeconds": grace_seconds,
                    "containers": [{
                        "name": "capture",
                        "image": "holdfast/testpod:dev",
                        "command": [bin, "serve"],
                        "args": [
                            "--listen=$(POD_IP):8080",
                            "--data=/var/lib/holdfast",
                            "--linger-ms=60000",
                            "--check-api",
                        ],
                        "env": [
                            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        ],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1},
                        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/holdfast"}],
                    }],
                },
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": storage::STORAGE_CLASS,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            }],
        },
    }))?)
}

async fn http_status(addr: &str, path: &str) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let code = response
        .split_whitespace()
        .nth(1)
        .context("empty response")?;
    Ok(code.parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_pod_runs_with_its_volume_and_honours_the_grace_period() -> anyhow::Result<()> {
    init_tracing();
    let h = harness::shared().await;
    let client = h.client()?;
    let ns = h.namespace("smoke").await?;
    grant_pod_reader(&client, &ns).await?;
    let grace = 3;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    sts.create(&PostParams::default(), &statefulset(grace)?)
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    let pod = wait_pod_ready(&pods, "capture-0").await?;
    eprintln!(
        "capture-0 ready after {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // A claim from the template, bound to a local PV of the test class,
    // pinned to the node the pod runs on.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let claim = claims.get("data-capture-0").await?;
    let pv_name = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .context("claim not bound")?;
    ensure!(claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"));
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv = pvs.get(&pv_name).await?;
    let dir = storage::volume_path(&pv).context("pv has no path")?;
    ensure!(
        dir.starts_with(h.volumes_dir()),
        "{} outside the volumes dir",
        dir.display()
    );
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .context("no node")?;
    let affinity = serde_json::to_string(&pv.spec.as_ref().and_then(|s| s.node_affinity.clone()))?;
    ensure!(
        affinity.contains(&node),
        "pv affinity {affinity} does not name {node}"
    );

    // The process wrote into its mountPath, which is the PV's directory, and
    // read its own pod through the in-cluster config with its token.
    let uid = pod.uid().context("pod uid")?;
    ensure!(
        std::fs::read_to_string(dir.join("api-ok"))? == uid,
        "api-ok is not the pod's uid"
    );
    ensure!(std::fs::read_to_string(dir.join("starts"))?.lines().count() == 1);

    // Its own address, reported in the status and served by the process.
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .context("no pod ip")?;
    ensure!(ip.starts_with("127.1."), "pod ip {ip}");
    ensure!(http_status(&format!("{ip}:8080"), "/readyz").await? == 200);
    let pids = h.agent().pod_pids(&ns, "capture-0");
    let pid = *pids.get("capture").context("no pid")?;
    ensure!(pid_alive(pid));

    // Delete: SIGTERM, the process lingers (it would for 60 s), SIGKILL at
    // the end of the 3 s grace period, then the object goes away.
    let deleted = Instant::now();
    pods.delete("capture-0", &DeleteParams::default()).await?;
    poll_until("old capture-0 removed", TIMEOUT, || async {
        match pods.get_opt("capture-0").await {
            Ok(Some(p)) if p.uid().as_deref() == Some(uid.as_str()) => None,
            Ok(_) => Some(()),
            Err(_) => None,
        }
    })
    .await?;
    let gone_after = deleted.elapsed();
    let sigterm = read_ms(&dir.join("sigterm"))?;
    let alive = read_ms(&dir.join("alive"))?;
    let lived = alive.saturating_sub(sigterm);
    eprintln!("after SIGTERM the process lived {lived} ms; pod gone after {gone_after:?}");
    ensure!(
        lived >= 2_500,
        "killed {lived} ms after SIGTERM, before the {grace} s grace period"
    );
    ensure!(
        lived < 10_000,
        "still alive {lived} ms after SIGTERM: no SIGKILL"
    );
    ensure!(!pid_alive(pid), "process {pid} survived its pod");

    // The StatefulSet replaces the pod; it gets the same claim and volume.
    let pod = wait_pod_ready(&pods, "capture-0").await?;
    ensure!(pod.uid().as_deref() != Some(uid.as_str()));
    poll_until("second start recorded", TIMEOUT, || async {
        let starts = std::fs::read_to_string(dir.join("starts")).ok()?;
        (starts.lines().count() == 2).then_some(())
    })
    .await?;

    // Keep the volume (Retain), drop the StatefulSet and the claim: the PV is
    // Released and its directory stays.
    pvs.patch(
        &pv_name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"persistentVolumeReclaimPolicy": "Retain"}})),
    )
    .await?;
    sts.delete("capture", &DeleteParams::foreground()).await?;
    poll_until("statefulset pods gone", TIMEOUT, || async {
        pods.list(&ListParams::default())
            .await
            .ok()
            .filter(|l| l.items.is_empty())
            .map(|_| ())
    })
    .await?;
    claims
        .delete("data-capture-0", &DeleteParams::default())
        .await?;
    poll_until("pv released", TIMEOUT, || async {
        let pv = pvs.get(&pv_name).await.ok()?;
        (pv.status?.phase.as_deref() == Some("Released")).then_some(())
    })
    .await?;
    ensure!(
        dir.join("starts").is_file(),
        "retained volume lost its data"
    );

    // Flip it to Delete: the provisioner removes the directory and the PV.
    pvs.patch(
        &pv_name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"persistentVolumeReclaimPolicy": "Delete"}})),
    )
    .await?;
    poll_until("released pv deleted", TIMEOUT, || async {
        matches!(pvs.get_opt(&pv_name).await, Ok(None)).then_some(())
    })
    .await?;
    ensure!(!dir.exists(), "{} still exists", dir.display());
    Ok(())
}

fn job(name: &str, code: i32) -> anyhow::Result<Job> {
    let bin = testpod_binary_name();
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "main",
                        "image": "holdfast/testpod:dev",
                        "command": [bin, "exit", format!("--code={code}")],
                    }],
                },
            },
        },
    }))?)
}

fn job_condition(job: &Job) -> Option<String> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        .map(|c| c.type_.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_completes_by_its_exit_code() -> anyhow::Result<()> {
    init_tracing();
    let h = harness::shared().await;
    let client = h.client()?;
    let ns = h.namespace("job").await?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    jobs.create(&PostParams::default(), &job("ok", 0)?).await?;
    jobs.create(&PostParams::default(), &job("fails", 3)?)
        .await?;
    for (name, want) in [("ok", "Complete"), ("fails", "Failed")] {
        let got = poll_until(&format!("job {name} finished"), TIMEOUT, || async {
            jobs.get(name).await.ok().as_ref().and_then(job_condition)
        })
        .await?;
        ensure!(got == want, "job {name} ended {got}, expected {want}");
    }
    // The failed pod's status carries the exit code.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let failed = pods
        .list(&ListParams::default().labels("job-name=fails"))
        .await?;
    let code = failed
        .items
        .first()
        .and_then(|p| {
            p.status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .first()?
                .state
                .as_ref()?
                .terminated
                .as_ref()
        })
        .map(|t| t.exit_code);
    ensure!(code == Some(3), "exit code {code:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_refuses_identities_without_permission() -> anyhow::Result<()> {
    init_tracing();
    let h = harness::shared().await;
    let admin = h.client()?;
    let ns = h.namespace("rbac").await?;

    // A user with a valid client certificate but no bindings.
    let nobody = h
        .control_plane()
        .user_client("nobody", &["holdfast:testers"])?;
    let err = Api::<Pod>::namespaced(nobody, &ns)
        .list(&ListParams::default())
        .await
        .expect_err("a user without bindings listed pods");
    ensure!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "{err}"
    );

    // A ServiceAccount token: refused, then allowed once bound to a Role.
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create_token_request(
            "default",
            &PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    audiences: vec![],
                    expiration_seconds: Some(600),
                    bound_object_ref: None,
                },
                ..Default::default()
            },
        )
        .await?
        .status
        .context("no token")?
        .token;
    let sa = h.control_plane().token_client(&token)?;
    let sa_pods: Api<Pod> = Api::namespaced(sa, &ns);
    let err = sa_pods
        .list(&ListParams::default())
        .await
        .expect_err("an unbound service account listed pods");
    ensure!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "{err}"
    );
    grant_pod_reader(&admin, &ns).await?;
    poll_until("role binding effective", TIMEOUT, || async {
        sa_pods.list(&ListParams::default()).await.ok().map(|_| ())
    })
    .await?;
    // Still nothing beyond the Role.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(h.control_plane().token_client(&token)?, &ns);
    let err = secrets
        .list(&ListParams::default())
        .await
        .expect_err("pod reader listed secrets");
    ensure!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_process_is_restarted_per_policy() -> anyhow::Result<()> {
    init_tracing();
    let h = harness::shared().await;
    let client = h.client()?;
    let ns = h.namespace("chaos").await?;
    let bin = testpod_binary_name();
    let data: PathBuf = h.dir().join(format!("chaos-{ns}"));
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "victim"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": "holdfast/testpod:dev",
                "command": [bin, "serve", "--listen=$(POD_IP):8080", "--data=/data"],
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }],
            "volumes": [{"name": "data", "hostPath": {"path": data.display().to_string(), "type": "DirectoryOrCreate"}}],
        },
    }))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(&PostParams::default(), &pod).await?;
    wait_pod_ready(&pods, "victim").await?;
    let before: BTreeMap<String, u32> = h.agent().pod_pids(&ns, "victim");
    h.agent().kill_pod(&ns, "victim")?;
    let pod = poll_until("victim restarted and ready", TIMEOUT, || async {
        let pod = pods.get("victim").await.ok()?;
        let restarts = pod
            .status
            .as_ref()?
            .container_statuses
            .as_ref()?
            .first()?
            .restart_count;
        (restarts == 1 && pod_ready(&pod)).then_some(pod)
    })
    .await?;
    let after = h.agent().pod_pids(&ns, "victim");
    ensure!(
        after != before && !after.is_empty(),
        "pids {before:?} -> {after:?}"
    );
    ensure!(pod.status.and_then(|s| s.container_statuses).is_some());
    ensure!(
        std::fs::read_to_string(data.join("starts"))?
            .lines()
            .count()
            == 2
    );
    pods.delete("victim", &DeleteParams::default()).await?;
    poll_until("victim removed", TIMEOUT, || async {
        matches!(pods.get_opt("victim").await, Ok(None)).then_some(())
    })
    .await?;
    ensure!(after.values().all(|pid| !pid_alive(*pid)));
    Ok(())
}
