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
                "command": [bin, "serve", "--listen=$(POD_IP):8080", "--data=/run/holdfast-test/data"],
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                "volumeMounts": [{"name": "data", "mountPath": "/run/holdfast-test/data"}],
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installs_a_chart_into_the_cluster() -> anyhow::Result<()> {
    init_tracing();
    let h = harness::shared().await;
    let client = h.client()?;
    let ns = h.namespace("helm").await?;
    let chart = tempfile::tempdir()?;
    std::fs::create_dir_all(chart.path().join("templates"))?;
    // kubeVersion checks both the version stamped into the API server and
    // the default helm renders with offline.
    std::fs::write(
        chart.path().join("Chart.yaml"),
        "apiVersion: v2\nname: demo\nversion: 0.1.0\nkubeVersion: \">=1.35.0-0\"\n",
    )?;
    std::fs::write(
        chart.path().join("templates/cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: demo\ndata:\n  greeting: {{ .Values.greeting | quote }}\n",
    )?;
    let template = h
        .helm()?
        .args(["template", "demo"])
        .arg(chart.path())
        .args(["--set", "greeting=offline"])
        .output()
        .await?;
    ensure!(
        template.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&template.stderr)
    );
    let install = h
        .helm()?
        .args(["install", "demo"])
        .arg(chart.path())
        .args(["--namespace", &ns, "--set", "greeting=hello"])
        .output()
        .await?;
    ensure!(
        install.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&install.stderr)
    );
    let cm = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client, &ns)
        .get("demo")
        .await?;
    let greeting = cm.data.unwrap_or_default().remove("greeting");
    ensure!(
        greeting.as_deref() == Some("hello"),
        "greeting {greeting:?}"
    );
    Ok(())
}

/// The real capture binary as a StatefulSet pod: its volume guard, talking to
/// the API server with the pod's own ServiceAccount token, marks the PV
/// `Retain` before the pod turns ready, and flips it to `Delete` after a clean
/// drain on SIGTERM. Kafka is unreachable on purpose: the buffer stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_pod_guards_its_volume() -> anyhow::Result<()> {
    init_tracing();
    let bin = holdfast_e2e::agent::AgentConfig::default_bin_dir().join("holdfast-capture");
    ensure!(
        bin.is_file(),
        "{} is missing: build it first (cargo build -p holdfast-capture, or make e2e)",
        bin.display()
    );
    let h = harness::shared().await;
    let client = h.client()?;
    let ns = h.namespace("capture").await?;
    let rbac: Vec<serde_json::Value> = vec![
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "capture", "namespace": ns},
               "rules": [{"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "capture", "namespace": ns},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "capture"},
               "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": format!("capture-{ns}")},
               "rules": [{"apiGroups": [""], "resources": ["persistentvolumes"], "verbs": ["get", "patch"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": format!("capture-{ns}")},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("capture-{ns}")},
               "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns}]}),
    ];
    Api::<Role>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(rbac[0].clone())?,
        )
        .await?;
    Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(rbac[1].clone())?,
        )
        .await?;
    Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(rbac[2].clone())?,
        )
        .await?;
    Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(rbac[3].clone())?,
        )
        .await?;

    let mut sts = statefulset(10)?;
    let pod_spec = sts
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
        .context("template")?;
    let container = &mut pod_spec.containers[0];
    container.image = Some("holdfast/capture:dev".into());
    container.command = Some(vec!["holdfast-capture".into(), "serve".into()]);
    container.args = Some(
        [
            "--listen=$(POD_IP):8080",
            "--data-dir=/var/lib/holdfast",
            "--kafka-bootstrap=127.0.0.1:1",
            "--volume-claim=data-$(POD_NAME)",
            "--namespace=$(POD_NAMESPACE)",
        ]
        .map(String::from)
        .to_vec(),
    );
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    sts_api.create(&PostParams::default(), &sts).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = wait_pod_ready(&pods, "capture-0").await?;
    let uid = pod.uid().context("uid")?;

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let pv_name = claims
        .get("data-capture-0")
        .await?
        .spec
        .and_then(|s| s.volume_name)
        .context("claim not bound")?;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let policy = |pv: &PersistentVolume| {
        (
            pv.spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.clone())
                .unwrap_or_default(),
            pv.annotations().get("holdfast.dev/clean").cloned(),
        )
    };
    // The class says Delete; the pod said Retain before it turned ready.
    let (reclaim, clean) = policy(&pvs.get(&pv_name).await?);
    ensure!(
        reclaim == "Retain",
        "ready capture pod's volume is {reclaim}"
    );
    ensure!(
        clean.as_deref() == Some("false"),
        "clean annotation {clean:?}"
    );

    pods.delete("capture-0", &DeleteParams::default()).await?;
    poll_until("capture-0 replaced", TIMEOUT, || async {
        match pods.get_opt("capture-0").await {
            Ok(Some(p)) if p.uid().as_deref() == Some(uid.as_str()) => None,
            Ok(_) => Some(()),
            Err(_) => None,
        }
    })
    .await?;
    sts_api.delete("capture", &DeleteParams::default()).await?;
    poll_until(
        "pv flipped to Delete after a clean drain",
        TIMEOUT,
        || async {
            let pv = pvs.get(&pv_name).await.ok()?;
            let (reclaim, clean) = policy(&pv);
            // The replacement pod may set Retain again before the StatefulSet
            // goes; its own clean shutdown flips it back.
            (reclaim == "Delete" && clean.as_deref() == Some("true")).then_some(())
        },
    )
    .await?;
    Ok(())
}

/// The agent resolves what a container's spec refers to: downward API,
/// Secret and ConfigMap keys, `envFrom` with a prefix, `$(VAR)` expansion,
/// Secret and ConfigMap volumes (with `items`), and a projected token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_environment_and_volumes_are_resolved() -> anyhow::Result<()> {
    init_tracing();
    let h = harness::shared().await;
    let client = h.client()?;
    let ns = h.namespace("env").await?;
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "creds"},
        "stringData": {"token": "s3cret", "user": "alice"},
    }))?;
    Api::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await?;
    let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "settings"},
        "data": {"mode": "durable", "level": "debug"},
    }))?;
    Api::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &cm)
        .await?;
    let out = h.dir().join(format!("dump-{ns}"));
    let bin = testpod_binary_name();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "dump", "labels": {"app": "dump"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "main",
                "image": "holdfast/testpod:dev",
                "command": [bin, "dump", "--out=/run/holdfast-test/out",
                    "--read", "/run/holdfast-test/creds/token",
                    "--read", "/run/holdfast-test/settings/renamed",
                    "--read", "/var/run/secrets/kubernetes.io/serviceaccount/namespace"],
                "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                    {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                    {"name": "GREETING", "value": "$(POD_NAME) in $(CFG_level) mode"},
                ],
                "volumeMounts": [
                    {"name": "out", "mountPath": "/run/holdfast-test/out"},
                    {"name": "creds", "mountPath": "/run/holdfast-test/creds", "readOnly": true},
                    {"name": "settings", "mountPath": "/run/holdfast-test/settings"},
                ],
            }],
            "volumes": [
                {"name": "out", "hostPath": {"path": out.display().to_string(), "type": "DirectoryOrCreate"}},
                {"name": "creds", "secret": {"secretName": "creds"}},
                {"name": "settings", "configMap": {"name": "settings", "items": [{"key": "level", "path": "renamed"}]}},
            ],
        },
    }))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(&PostParams::default(), &pod).await?;
    let phase = poll_until("dump pod finished", TIMEOUT, || async {
        let phase = pods.get("dump").await.ok()?.status?.phase?;
        matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
    })
    .await?;
    let log = h
        .agent()
        .pod_dir(&ns, "dump")
        .and_then(|d| std::fs::read_to_string(d.join("main.log")).ok())
        .unwrap_or_default();
    ensure!(phase == "Succeeded", "dump pod {phase}: {log}");
    let env = std::fs::read_to_string(out.join("env"))?;
    let node = pods
        .get("dump")
        .await?
        .spec
        .and_then(|s| s.node_name)
        .context("node")?;
    for line in [
        "POD_NAME=dump".to_string(),
        format!("NODE={node}"),
        "APP=dump".into(),
        "TOKEN=s3cret".into(),
        "MODE=durable".into(),
        "CFG_mode=durable".into(),
        "CFG_level=debug".into(),
        "GREETING=dump in debug mode".into(),
        format!("KUBERNETES_SERVICE_PORT={}", h.control_plane().api_port()),
    ] {
        ensure!(env.lines().any(|l| l == line), "{line} not in env:\n{env}");
    }
    let read = std::fs::read_to_string(out.join("read"))?;
    for line in [
        "/run/holdfast-test/creds/token=s3cret".to_string(),
        "/run/holdfast-test/settings/renamed=debug".into(),
        format!("/var/run/secrets/kubernetes.io/serviceaccount/namespace={ns}"),
    ] {
        ensure!(read.lines().any(|l| l == line), "{line} not read:\n{read}");
    }
    Ok(())
}
