//! `holdfast-demo-cluster` (`make demo-cluster`): Holdfast on Kubernetes,
//! told as a story a user can watch.
//!
//! Starts a real Kafka broker, the local Kubernetes control plane and node
//! agent of the e2e tests, installs `charts/holdfast` with `helm install`
//! (the operator runs under the chart's own ServiceAccount), creates a
//! CaptureCluster of three replicas and, while a client posts events, kills
//! and scales away a pod, then stops Kafka for a while (see [`story`]). It
//! ends with `acknowledged N, found N in Kafka, lost 0` and leaves
//! everything up, with a kubeconfig and a kubectl command, until Ctrl-C;
//! `--exit-when-done` tears down at once (the smoke in `make test`).
//!
//! Exits non-zero when a step of the story did not happen or an
//! acknowledged event is missing from Kafka.

mod client;
mod story;
mod tables;
mod watch;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use holdfast_e2e::agent::AgentConfig;
use holdfast_e2e::kafka::KafkaBroker;
use holdfast_e2e::kube::{self as harness, Harness, HarnessConfig, poll_until, storage};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

use story::{Story, ok, section};
use tables::{CAPTURE_SELECTOR, CLUSTER, TOPIC, print_all, ready};

#[derive(Debug, Parser)]
#[command(
    name = "holdfast-demo-cluster",
    about = "Holdfast on a local Kubernetes control plane: a pod killed, Kafka stopped, nothing lost"
)]
struct Cli {
    /// Tear down as soon as the story is told instead of waiting for Ctrl-C.
    #[arg(long, env = "HOLDFAST_DEMO_EXIT_WHEN_DONE")]
    exit_when_done: bool,
    /// How long Kafka stays stopped in the second act.
    #[arg(long, default_value_t = 15, env = "HOLDFAST_DEMO_OUTAGE_SECS")]
    outage_secs: u64,
    /// Namespace of the release and the CaptureCluster.
    #[arg(long, default_value = "holdfast", env = "HOLDFAST_DEMO_NAMESPACE")]
    namespace: String,
    /// The chart to install.
    #[arg(long, env = "HOLDFAST_DEMO_CHART", default_value_os_t = repo().join("charts/holdfast"))]
    chart: PathBuf,
}

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("holdfast-demo-cluster: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let bins = AgentConfig::default_bin_dir();
    for binary in ["holdfast-capture", "holdfast-operator"] {
        if !bins.join(binary).is_file() {
            bail!(
                "{} is missing: build the workspace first (cargo build --bins)",
                bins.join(binary).display()
            );
        }
    }
    let started = Instant::now();
    section("Starting Kafka and the Kubernetes control plane");
    let mut broker = KafkaBroker::start().await?;
    broker.create_topic(TOPIC, 3, &[]).await?;
    println!(
        "  kafka {} ready, topic {TOPIC} (3 partitions)",
        broker.bootstrap()
    );
    let h = Harness::start(HarnessConfig::default()).await?;
    println!(
        "  kubernetes {} ready at {} ({:.0}s), nodes {}",
        harness::kubernetes_version(),
        h.control_plane().url(),
        started.elapsed().as_secs_f64(),
        h.agent().nodes().join(", ")
    );
    let result = tell(&cli, &h, &mut broker).await;
    if let Err(error) = &result {
        println!("\nFAILED: {error:#}");
        print_all(&h.client()?, &cli.namespace, None).await;
        match keep_logs(h.dir()) {
            Ok(dir) => println!("  pod logs kept in {}", dir.display()),
            Err(e) => println!("  could not keep the pod logs: {e:#}"),
        }
    }
    if !cli.exit_when_done {
        leave_up(&h, &cli.namespace, &broker).await?;
    }
    println!("\nstopping: capture pods, operator, control plane, Kafka");
    h.stop().await;
    broker.stop().await?;
    println!("stopped");
    result
}

/// Everything between a running control plane and the final count.
async fn tell(cli: &Cli, h: &Harness, broker: &mut KafkaBroker) -> Result<()> {
    let client = h.client()?;
    let ns = cli.namespace.as_str();
    create_namespace(&client, ns).await?;
    section("Installing the chart and a CaptureCluster");
    let chart = cli.chart.to_str().context("chart path")?;
    println!("  $ helm install holdfast {chart} -n {ns} --wait");
    let output = h
        .helm()?
        .args(["install", "holdfast", chart, "-n", ns, "--wait"])
        .args(["--timeout", "3m"])
        .output()
        .await?;
    if !output.status.success() {
        bail!(
            "helm install failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let notes = String::from_utf8_lossy(&output.stdout);
    for line in notes.lines().filter(|l| l.starts_with("STATUS:")) {
        println!("  {line}");
    }
    let image = chart_image(&cli.chart)?;
    let cc = json!({
        "apiVersion": "holdfast.dev/v1alpha1",
        "kind": "CaptureCluster",
        "metadata": {"name": CLUSTER},
        "spec": {
            "replicas": 3,
            "image": image,
            // A second of lingering keeps a backlog in each buffer, so the
            // killed pod leaves events behind; a short reconnect backoff
            // finds Kafka soon after it returns.
            "kafka": {"bootstrapServers": broker.bootstrap(), "properties": {
                "linger.ms": "1000",
                "reconnect.backoff.max.ms": "1000",
            }},
            "storage": {"size": "64Mi", "storageClassName": storage::STORAGE_CLASS},
            "shutdownGracePeriodSeconds": 10,
        },
    });
    println!(
        "  $ kubectl apply -n {ns} -f - <<EOF\n{}\n    EOF",
        indent(&serde_yaml::to_string(&cc)?, "    ")
    );
    tables::captureclusters(&client, ns)
        .create(&PostParams::default(), &serde_json::from_value(cc)?)
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let ccs = tables::captureclusters(&client, ns);
    poll_until(
        "3 ready capture pods, counted in the CaptureCluster's status",
        Duration::from_secs(180),
        || async {
            let list = pods
                .list(&ListParams::default().labels(CAPTURE_SELECTOR))
                .await
                .ok()?;
            let status = ccs.get(CLUSTER).await.ok()?.data["status"]["readyReplicas"].as_i64();
            (list.items.iter().filter(|p| ready(p)).count() == 3 && status == Some(3)).then_some(())
        },
    )
    .await?;
    ok("3 capture pods ready, each on its own Retain volume");
    print_all(&client, ns, Some(&broker.bootstrap())).await;

    section("A client posts events to the ready capture pods, 5 per request, throughout");
    let observer = watch::Observer::start(&client, ns);
    let load = client::Client::start(client.clone(), ns);
    let mut story = Story {
        h,
        client: client.clone(),
        ns: ns.to_string(),
        broker,
        load,
        observer,
    };
    story.kill_and_scale_down().await?;
    story
        .kafka_outage(Duration::from_secs(cli.outage_secs))
        .await?;

    section("The count");
    let stats = story.load.finish().await;
    let bootstrap = story.broker.bootstrap();
    let (found, duplicates) = story::count_in_kafka(&bootstrap, &stats.acked).await?;
    let acked = stats.acked.len();
    println!(
        "  ({} requests refused or failed and retried on another pod; {duplicates} duplicates in Kafka, same uuid delivered twice)",
        stats.refused
    );
    println!(
        "acknowledged {acked}, found {found} in Kafka, lost {}",
        acked - found
    );
    if found != acked {
        bail!("{} acknowledged events are not in Kafka", acked - found);
    }
    if acked == 0 {
        bail!("no event was acknowledged");
    }
    Ok(())
}

/// Creates `ns` and waits for what pods need in it (its `default`
/// ServiceAccount and root CA ConfigMap).
async fn create_namespace(client: &kube::Client, ns: &str) -> Result<()> {
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .with_context(|| format!("creating namespace {ns}"))?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    poll_until(
        "namespace's service account and root CA",
        Duration::from_secs(60),
        || async {
            let sa = sas.get_opt("default").await.ok().flatten();
            let ca = cms.get_opt("kube-root-ca.crt").await.ok().flatten();
            (sa.is_some() && ca.is_some()).then_some(())
        },
    )
    .await?;
    Ok(())
}

/// Copies every pod's container logs (`<harness>/pods/<pod>/*.log`) to a
/// directory that outlives the harness, for a failed story.
fn keep_logs(harness_dir: &Path) -> Result<PathBuf> {
    let keep = std::env::temp_dir().join(format!("holdfast-demo-cluster-{}", std::process::id()));
    for pod in std::fs::read_dir(harness_dir.join("pods"))?.flatten() {
        for file in std::fs::read_dir(pod.path())?.flatten() {
            let name = file.file_name();
            if name.to_string_lossy().ends_with(".log") {
                let to = keep.join(pod.file_name());
                std::fs::create_dir_all(&to)?;
                std::fs::copy(file.path(), to.join(name))?;
            }
        }
    }
    Ok(keep)
}

/// `holdfast/holdfast:<appVersion>`: the chart's default image.
fn chart_image(chart: &Path) -> Result<String> {
    let text = std::fs::read_to_string(chart.join("Chart.yaml"))
        .with_context(|| format!("reading {}/Chart.yaml", chart.display()))?;
    let meta: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let version = meta["appVersion"]
        .as_str()
        .context("Chart.yaml has no appVersion")?;
    Ok(format!("holdfast/holdfast:{version}"))
}

fn indent(text: &str, prefix: &str) -> String {
    text.trim_end()
        .lines()
        .map(|l| format!("{prefix}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A kubectl to suggest: `HOLDFAST_KUBECTL`, one next to the control-plane
/// binaries, or one on `PATH`.
fn kubectl() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("HOLDFAST_KUBECTL") {
        return Some(PathBuf::from(path));
    }
    if let Ok(dir) = harness::bin_dir()
        && dir.join("kubectl").is_file()
    {
        return Some(dir.join("kubectl"));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("kubectl"))
        .find(|p| p.is_file())
}

/// Prints how to reach everything, then waits for Ctrl-C (or SIGTERM).
async fn leave_up(h: &Harness, ns: &str, broker: &KafkaBroker) -> Result<()> {
    let kubeconfig = h.control_plane().kubeconfig();
    let pods: Api<Pod> = Api::namespaced(h.client()?, ns);
    let ip = pods
        .list(&ListParams::default().labels(CAPTURE_SELECTOR))
        .await
        .ok()
        .and_then(|l| l.items.into_iter().find(ready))
        .and_then(|p| p.status?.pod_ip);
    section("Everything stays up until Ctrl-C");
    println!("  export KUBECONFIG={}", kubeconfig.display());
    match kubectl() {
        Some(kubectl) => println!(
            "  {} get capturecluster,pods,pvc,pv,jobs -n {ns}",
            kubectl.display()
        ),
        None => println!(
            "  kubectl get capturecluster,pods,pvc,pv,jobs -n {ns}\n  (no kubectl found: any recent kubectl works with this kubeconfig; or set HOLDFAST_KUBECTL)"
        ),
    }
    if let Some(ip) = ip {
        println!(
            "  curl -H 'content-type: application/json' -d '{{\"action\":\"hello\"}}' http://{ip}:8080/v1/events"
        );
    }
    println!(
        "  cargo run -q -p holdfast-e2e --bin holdfast-dev -- consume --bootstrap {} --topic {TOPIC} --count 1",
        broker.bootstrap()
    );
    println!(
        "  (control plane, pod logs and volumes under {})",
        h.dir().display()
    );
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
    }
    Ok(())
}
