//! One pod's life on the agent, from first sight to removal: materialise its
//! volumes and environment, run each container as a local process inside a
//! private mount namespace, probe readiness and liveness (every
//! `min(periodSeconds, 1 s)`, thresholds honoured; `exec` probes pass; a
//! failed liveness check SIGKILLs), restart per `restartPolicy` (backoff
//! 0.5 s doubling to 10 s),
//! report status, and on deletion SIGTERM, wait the grace period, SIGKILL and
//! remove the pod object.
//!
//! The worker owns its processes: when the worker's task is dropped (node
//! stopped, agent shut down) each process is killed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Client, ResourceExt};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::materialize::{self, PodAddresses};
use super::spec;
use crate::kube::process::Process;

/// Shared view of a pod's running processes, for the chaos helpers.
pub type Pids = Arc<Mutex<BTreeMap<String, u32>>>;

/// What the worker needs from the agent.
#[derive(Clone)]
pub struct PodContext {
    /// API client (the agent's identity).
    pub client: Client,
    /// Where the binaries are.
    pub bin_dir: PathBuf,
    /// Image prefix of the pods the agent runs.
    pub image_prefix: String,
    /// The pod's own directory (volumes, logs).
    pub pod_dir: PathBuf,
    /// The node's address.
    pub host_ip: String,
    /// The pod's address.
    pub pod_ip: String,
    /// API server address for in-cluster clients.
    pub api_host: String,
    /// API server port.
    pub api_port: u16,
    /// Where the pod's processes are published.
    pub pids: Pids,
}

fn now() -> Value {
    serde_json::to_value(Time(jiff::Timestamp::now())).unwrap_or(Value::Null)
}

/// One container's run state.
#[derive(Debug)]
struct ContainerRun {
    container: Container,
    process: Option<Process>,
    started_at: Value,
    restart_count: i32,
    /// When the last run ended and how.
    last_exit: Option<(i32, Value, Value)>,
    /// Set once the container has ended for good (no restart).
    finished: bool,
    restart_at: Option<Instant>,
    backoff: Duration,
    ready: bool,
    probe_successes: i32,
    probe_failures: i32,
    next_probe: Instant,
    live_failures: i32,
    next_live_probe: Instant,
    waiting: Option<(String, String)>,
}

impl ContainerRun {
    fn new(container: Container) -> Self {
        Self {
            container,
            process: None,
            started_at: Value::Null,
            restart_count: 0,
            last_exit: None,
            finished: false,
            restart_at: Some(Instant::now()),
            backoff: Duration::from_millis(500),
            ready: false,
            probe_successes: 0,
            probe_failures: 0,
            next_probe: Instant::now(),
            live_failures: 0,
            next_live_probe: Instant::now(),
            waiting: None,
        }
    }

    fn status(&self) -> Value {
        let state = if self.process.is_some() {
            json!({"running": {"startedAt": self.started_at}})
        } else if let (true, Some((code, started, finished))) = (self.finished, &self.last_exit) {
            json!({"terminated": {
                "exitCode": code,
                "reason": if *code == 0 { "Completed" } else { "Error" },
                "startedAt": started,
                "finishedAt": finished,
            }})
        } else {
            let (reason, message) = self
                .waiting
                .clone()
                .unwrap_or_else(|| ("ContainerCreating".into(), String::new()));
            json!({"waiting": {"reason": reason, "message": message}})
        };
        let last_state = match (&self.last_exit, self.finished) {
            (Some((code, started, finished)), false) => json!({"terminated": {
                "exitCode": code,
                "reason": if *code == 0 { "Completed" } else { "Error" },
                "startedAt": started,
                "finishedAt": finished,
            }}),
            _ => json!({}),
        };
        let pid = self.process.as_ref().map(|p| p.pid()).unwrap_or_default();
        json!({
            "name": self.container.name,
            "image": self.container.image,
            "imageID": "",
            "containerID": format!("holdfast://{pid}"),
            "ready": self.ready && self.process.is_some(),
            "started": self.process.is_some(),
            "restartCount": self.restart_count,
            "state": state,
            "lastState": last_state,
        })
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Runs `pod` until it is deleted (or the task is dropped). `updates` carries
/// the newest version of the pod from the node's watch.
pub async fn run(ctx: PodContext, mut updates: watch::Receiver<Pod>) {
    let pod = updates.borrow().clone();
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let terminal = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    if terminal || !spec::is_runnable(&pod, &ctx.image_prefix) {
        if !terminal {
            let _ = patch_status(
                &api,
                &name,
                json!({"status": {
                    "reason": "NotAHoldfastImage",
                    "message": format!("the test node agent runs only images starting with {}", ctx.image_prefix),
                }}),
            )
            .await;
        }
        // Nothing runs; remove it once it is deleted.
        loop {
            let pod = updates.borrow_and_update().clone();
            if pod.metadata.deletion_timestamp.is_some() {
                finalize_deletion(&api, &pod).await;
                return;
            }
            if updates.changed().await.is_err() {
                return;
            }
        }
    }
    let mut worker = Worker::new(ctx, api, pod);
    worker.run(updates).await;
}

struct Worker {
    ctx: PodContext,
    api: Api<Pod>,
    pod: Pod,
    start_time: Value,
    containers: Vec<ContainerRun>,
    init: Vec<ContainerRun>,
    prepared: Option<Prepared>,
    last_status: Value,
    phase: &'static str,
    message: String,
}

struct Prepared {
    volumes: BTreeMap<String, PathBuf>,
}

impl Worker {
    fn new(ctx: PodContext, api: Api<Pod>, pod: Pod) -> Self {
        let spec = pod.spec.clone().unwrap_or_default();
        let containers = spec.containers.into_iter().map(ContainerRun::new).collect();
        let init = spec
            .init_containers
            .unwrap_or_default()
            .into_iter()
            .map(ContainerRun::new)
            .collect();
        Self {
            ctx,
            api,
            pod,
            start_time: now(),
            containers,
            init,
            prepared: None,
            last_status: Value::Null,
            phase: "Pending",
            message: String::new(),
        }
    }

    fn restart_policy(&self) -> &str {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .unwrap_or("Always")
    }

    async fn run(&mut self, mut updates: watch::Receiver<Pod>) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.pod.metadata.deletion_timestamp.is_some() {
                self.terminate().await;
                finalize_deletion(&self.api, &self.pod).await;
                return;
            }
            if self.phase != "Succeeded" && self.phase != "Failed" {
                self.step().await;
            }
            self.report().await;
            tokio::select! {
                changed = updates.changed() => {
                    if changed.is_err() {
                        // The agent dropped this pod (it was removed or the node stopped).
                        return;
                    }
                    self.pod = updates.borrow_and_update().clone();
                }
                _ = tick.tick() => {}
            }
        }
    }

    /// One pass: prepare, start or restart containers, reap exits, probe.
    async fn step(&mut self) {
        if self.prepared.is_none() {
            let addresses = self.addresses();
            match materialize::volumes(&self.ctx.client, &self.pod, &self.ctx.pod_dir, &addresses)
                .await
            {
                Ok(volumes) => self.prepared = Some(Prepared { volumes }),
                Err(e) => {
                    self.message = e.to_string();
                    tracing::debug!(pod = %self.pod.name_any(), error = %e, "pod not ready to start");
                    return;
                }
            }
            self.message.clear();
        }
        // Init containers run one after the other, each to completion.
        let mut init_index = None;
        for (i, run) in self.init.iter().enumerate() {
            if !(run.finished && run.last_exit.as_ref().is_some_and(|e| e.0 == 0)) {
                init_index = Some(i);
                break;
            }
        }
        let policy = self.restart_policy().to_string();
        if let Some(i) = init_index {
            // Init containers restart on failure unless the policy is Never.
            let init_policy = if policy == "Never" {
                "Never"
            } else {
                "OnFailure"
            };
            self.drive(true, i, init_policy).await;
            if self.init[i].finished && self.init[i].last_exit.as_ref().is_some_and(|e| e.0 != 0) {
                self.phase = "Failed";
            }
            return;
        }
        for i in 0..self.containers.len() {
            self.drive(false, i, &policy).await;
        }
        if self.containers.iter().all(|c| c.finished) {
            let ok = self
                .containers
                .iter()
                .all(|c| c.last_exit.as_ref().is_some_and(|e| e.0 == 0));
            self.phase = if ok { "Succeeded" } else { "Failed" };
        } else if self.containers.iter().any(|c| c.process.is_some()) {
            self.phase = "Running";
        }
        self.publish_pids();
    }

    fn addresses(&self) -> PodAddresses {
        PodAddresses {
            pod_ip: self.ctx.pod_ip.clone(),
            host_ip: self.ctx.host_ip.clone(),
        }
    }

    /// Starts, reaps, restarts and probes container `i`.
    async fn drive(&mut self, init: bool, i: usize, policy: &str) {
        let run = if init {
            &mut self.init[i]
        } else {
            &mut self.containers[i]
        };
        if let Some(process) = run.process.as_mut()
            && let Some(status) = process.try_wait()
        {
            let code = exit_code(status);
            tracing::info!(pod = %self.pod.name_any(), container = %run.container.name, code, "container exited");
            run.process = None;
            run.ready = false;
            run.last_exit = Some((code, run.started_at.clone(), now()));
            let restart = match policy {
                "Always" => true,
                "OnFailure" => code != 0,
                _ => false,
            };
            if restart {
                run.restart_at = Some(Instant::now() + run.backoff);
                run.backoff = (run.backoff * 2).min(Duration::from_secs(10));
                run.restart_count += 1;
                run.waiting = Some(("CrashLoopBackOff".into(), format!("exited with {code}")));
            } else {
                run.finished = true;
            }
        }
        if run.process.is_none()
            && !run.finished
            && run.restart_at.is_some_and(|t| Instant::now() >= t)
        {
            let container = run.container.clone();
            match self.start(&container).await {
                Ok(process) => {
                    let run = if init {
                        &mut self.init[i]
                    } else {
                        &mut self.containers[i]
                    };
                    run.process = Some(process);
                    run.started_at = now();
                    run.restart_at = None;
                    run.waiting = None;
                    run.probe_successes = 0;
                    run.probe_failures = 0;
                    run.next_probe = Instant::now();
                    run.live_failures = 0;
                    run.next_live_probe = Instant::now()
                        + Duration::from_secs(
                            run.container
                                .liveness_probe
                                .as_ref()
                                .and_then(|p| p.initial_delay_seconds)
                                .unwrap_or(0)
                                .max(0) as u64,
                        );
                    run.ready = run.container.readiness_probe.is_none();
                }
                Err(message) => {
                    let run = if init {
                        &mut self.init[i]
                    } else {
                        &mut self.containers[i]
                    };
                    tracing::warn!(pod = %self.pod.name_any(), container = %run.container.name, %message, "cannot start container");
                    run.waiting = Some(("CreateContainerError".into(), message));
                    run.restart_at = Some(Instant::now() + Duration::from_secs(1));
                }
            }
        }
        let pod_ip = self.ctx.pod_ip.clone();
        let run = if init {
            &mut self.init[i]
        } else {
            &mut self.containers[i]
        };
        if run.process.is_some()
            && let Some(probe) = run.container.readiness_probe.clone()
            && Instant::now() >= run.next_probe
        {
            let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64)
                .min(Duration::from_secs(1));
            run.next_probe = Instant::now() + period;
            let ok = probe_once(&probe, &run.container, &pod_ip).await;
            if ok {
                run.probe_successes += 1;
                run.probe_failures = 0;
                if run.probe_successes >= probe.success_threshold.unwrap_or(1) {
                    run.ready = true;
                }
            } else {
                run.probe_failures += 1;
                run.probe_successes = 0;
                if run.probe_failures >= probe.failure_threshold.unwrap_or(3) {
                    run.ready = false;
                }
            }
        }
        if run.process.is_some()
            && let Some(probe) = run.container.liveness_probe.clone()
            && Instant::now() >= run.next_live_probe
        {
            let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64)
                .min(Duration::from_secs(1));
            run.next_live_probe = Instant::now() + period;
            if probe_once(&probe, &run.container, &pod_ip).await {
                run.live_failures = 0;
            } else {
                run.live_failures += 1;
                if run.live_failures >= probe.failure_threshold.unwrap_or(3)
                    && let Some(process) = run.process.as_mut()
                {
                    // The kubelet would stop it with its grace period; a
                    // failed liveness check here is a SIGKILL, and the
                    // restart policy decides what follows.
                    tracing::info!(container = %run.container.name, "liveness probe failed, killing");
                    process.signal(Signal::SIGKILL);
                    run.live_failures = 0;
                }
            }
        }
    }

    /// Starts one container as a process in its own mount namespace.
    async fn start(&self, container: &Container) -> Result<Process, String> {
        let (binary, args) = spec::binary_for(container, &self.ctx.bin_dir)
            .ok_or_else(|| format!("container {} names no binary", container.name))?;
        if !binary.is_file() {
            return Err(format!(
                "binary {} not found (build it, or set the agent's bin dir)",
                binary.display()
            ));
        }
        let prepared = self.prepared.as_ref().ok_or("volumes not prepared")?;
        let mounts =
            materialize::mounts(container, &prepared.volumes).map_err(|e| e.to_string())?;
        let base = BTreeMap::from([
            (
                "PATH".to_string(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ),
            ("HOSTNAME".to_string(), self.pod.name_any()),
            // A home of its own: clients must not find the host's
            // ~/.kube/config and skip the in-cluster configuration.
            (
                "HOME".to_string(),
                self.ctx.pod_dir.join("home").display().to_string(),
            ),
            (
                "KUBERNETES_SERVICE_HOST".to_string(),
                self.ctx.api_host.clone(),
            ),
            (
                "KUBERNETES_SERVICE_PORT".to_string(),
                self.ctx.api_port.to_string(),
            ),
            (
                "KUBERNETES_SERVICE_PORT_HTTPS".to_string(),
                self.ctx.api_port.to_string(),
            ),
            (
                "KUBERNETES_PORT".to_string(),
                format!("tcp://{}:{}", self.ctx.api_host, self.ctx.api_port),
            ),
        ]);
        let env = materialize::environment(
            &self.ctx.client,
            &self.pod,
            container,
            &base,
            &self.addresses(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let args: Vec<String> = args.iter().map(|a| spec::expand(a, &env)).collect();
        let workdir = container.working_dir.clone().unwrap_or_else(|| "/".into());
        let script = spec::mount_script(&mounts, &workdir);
        let log = self.ctx.pod_dir.join(format!("{}.log", container.name));
        std::fs::create_dir_all(self.ctx.pod_dir.join("home")).map_err(|e| e.to_string())?;
        let name = format!(
            "{}/{}/{}",
            self.pod.namespace().unwrap_or_default(),
            self.pod.name_any(),
            container.name
        );
        Process::spawn(
            name,
            Path::new("unshare"),
            |c| {
                c.env_clear()
                    .envs(&env)
                    .arg("--mount")
                    .arg("--propagation")
                    .arg("private")
                    .arg("--")
                    .arg("/bin/sh")
                    .arg("-c")
                    .arg(&script)
                    .arg("sh")
                    .arg(&binary)
                    .args(&args);
            },
            &log,
        )
        .map_err(|e| e.to_string())
    }

    fn publish_pids(&self) {
        let mut pids = self.ctx.pids.lock().expect("pids lock");
        pids.clear();
        for run in self.init.iter().chain(&self.containers) {
            if let Some(p) = &run.process {
                pids.insert(run.container.name.clone(), p.pid());
            }
        }
    }

    /// Patches the pod's status when it changed.
    async fn report(&mut self) {
        let ready = self.phase == "Running"
            && self
                .containers
                .iter()
                .all(|c| c.ready && c.process.is_some());
        let initialized = self.init.iter().all(|c| c.finished);
        let cond =
            |t: &str, s: bool| json!({"type": t, "status": if s { "True" } else { "False" }});
        let status = json!({
            "phase": self.phase,
            "hostIP": self.ctx.host_ip,
            "hostIPs": [{"ip": self.ctx.host_ip}],
            "podIP": self.ctx.pod_ip,
            "podIPs": [{"ip": self.ctx.pod_ip}],
            "message": self.message,
            "conditions": [
                cond("PodReadyToStartContainers", self.prepared.is_some()),
                cond("Initialized", initialized),
                cond("ContainersReady", ready),
                cond("Ready", ready),
                cond("PodScheduled", true),
            ],
            "initContainerStatuses": self.init.iter().map(ContainerRun::status).collect::<Vec<_>>(),
            "containerStatuses": self.containers.iter().map(ContainerRun::status).collect::<Vec<_>>(),
        });
        if status == self.last_status {
            return;
        }
        // Transition times only when something changed.
        let mut patch = status.clone();
        patch["startTime"] = self.start_time.clone();
        if let Some(conditions) = patch["conditions"].as_array_mut() {
            for c in conditions {
                c["lastTransitionTime"] = now();
            }
        }
        match patch_status(&self.api, &self.pod.name_any(), json!({"status": patch})).await {
            Ok(()) => self.last_status = status,
            Err(e) => {
                tracing::debug!(pod = %self.pod.name_any(), error = %e, "status patch failed")
            }
        }
    }

    /// SIGTERM every running container, wait up to the grace period, SIGKILL.
    async fn terminate(&mut self) {
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .max(0) as u64;
        let deadline = Instant::now() + Duration::from_secs(grace);
        let runs: Vec<&mut ContainerRun> = self
            .init
            .iter_mut()
            .chain(self.containers.iter_mut())
            .collect();
        let mut running: Vec<&mut ContainerRun> =
            runs.into_iter().filter(|r| r.process.is_some()).collect();
        for run in running.iter_mut() {
            if let Some(p) = run.process.as_mut() {
                p.signal(Signal::SIGTERM);
            }
        }
        tracing::info!(pod = %self.pod.name_any(), grace_seconds = grace, "sent SIGTERM");
        loop {
            let mut alive = false;
            for run in running.iter_mut() {
                if let Some(p) = run.process.as_mut() {
                    if let Some(status) = p.try_wait() {
                        run.last_exit = Some((exit_code(status), run.started_at.clone(), now()));
                        run.process = None;
                        run.finished = true;
                    } else {
                        alive = true;
                    }
                }
            }
            if !alive {
                break;
            }
            if Instant::now() >= deadline {
                for run in running.iter_mut() {
                    if let Some(p) = run.process.as_mut() {
                        tracing::info!(pod = %self.pod.name_any(), container = %run.container.name, "grace period over, SIGKILL");
                        p.signal(Signal::SIGKILL);
                        let status = p.wait().await.ok();
                        run.last_exit = Some((
                            status.map(exit_code).unwrap_or(137),
                            run.started_at.clone(),
                            now(),
                        ));
                        run.process = None;
                        run.finished = true;
                    }
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for run in self.init.iter_mut().chain(self.containers.iter_mut()) {
            run.finished = true;
            run.ready = false;
        }
        self.publish_pids();
        let ok = self
            .containers
            .iter()
            .all(|c| c.last_exit.as_ref().is_some_and(|e| e.0 == 0));
        self.phase = if ok { "Succeeded" } else { "Failed" };
        self.report().await;
    }
}

/// Removes a deleted pod's object (grace 0, guarded by its uid), as the
/// kubelet does once its containers are gone.
async fn finalize_deletion(api: &Api<Pod>, pod: &Pod) {
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&pod.name_any(), &params).await {
        Ok(_) => tracing::info!(pod = %pod.name_any(), "pod removed"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => tracing::warn!(pod = %pod.name_any(), error = %e, "cannot remove pod"),
    }
}

async fn patch_status(api: &Api<Pod>, name: &str, patch: Value) -> Result<(), kube::Error> {
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// One readiness or liveness probe: `httpGet` (2xx/3xx is success) or `tcpSocket`
/// against the pod's address. `exec` probes cannot run without a container
/// image and count as success.
async fn probe_once(probe: &Probe, container: &Container, pod_ip: &str) -> bool {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let port_of = |port: &IntOrString| -> Option<u16> {
        match port {
            IntOrString::Int(p) => u16::try_from(*p).ok(),
            IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok()),
        }
    };
    if let Some(get) = &probe.http_get {
        let Some(port) = port_of(&get.port) else {
            return false;
        };
        let host = get.host.clone().unwrap_or_else(|| pod_ip.to_string());
        let path = get.path.clone().unwrap_or_else(|| "/".into());
        return tokio::time::timeout(timeout, http_get_status(&host, port, &path))
            .await
            .ok()
            .flatten()
            .is_some_and(|code| (200..400).contains(&code));
    }
    if let Some(tcp) = &probe.tcp_socket {
        let Some(port) = port_of(&tcp.port) else {
            return false;
        };
        return tokio::time::timeout(timeout, tokio::net::TcpStream::connect((pod_ip, port)))
            .await
            .is_ok_and(|r| r.is_ok());
    }
    true
}

/// The status code of a plain HTTP/1.1 GET.
async fn http_get_status(host: &str, port: u16, path: &str) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/holdfast\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        let n = stream.read(&mut head[read..]).await.ok()?;
        if n == 0 {
            break;
        }
        read += n;
    }
    let line = std::str::from_utf8(&head[..read]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}
