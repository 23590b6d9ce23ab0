//! The Helm chart without a cluster: `helm lint`, `helm template` with the
//! default values, with every optional part on, and with bad values (the
//! schema refuses them naming the value); the chart's CRDs are the
//! generated `crds/`, its RBAC is the operator's `rbac/`, and its default
//! image is the one `scripts/image.sh` builds.
//!
//! Needs: the pinned helm (`make e2e-bins`).

mod chart_support;

use anyhow::{Context, ensure};
use chart_support::{
    chart, find, helm_offline, of_kind, parse_documents, repo, template, template_error,
};
use serde_json::{Value, json};

/// What `--api-versions` says once the CRD is served (any install after
/// the first; see templates/capturecluster.yaml).
const SERVED: &str = "holdfast.dev/v1alpha1/CaptureCluster";

/// Values that turn every optional part of the chart on.
pub fn all_on_values() -> Value {
    json!({
        "crds": {"enabled": true, "keep": true},
        "operator": {
            "replicas": 2,
            "watchNamespace": "events",
            "podAnnotations": {"example.com/a": "b"},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "system-cluster-critical",
            "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "serviceAccount": {"annotations": {"example.com/role": "operator"}},
        "captureCluster": {
            "enabled": true,
            "name": "events",
            "replicas": 3,
            "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
            "kafka": {
                "bootstrapServers": "kafka-0.kafka:9092,kafka-1.kafka:9092",
                "properties": {"linger.ms": "5", "compression.type": "zstd"},
                "tls": {"secretName": "kafka-tls", "caKey": "ca.crt"},
                "sasl": {"mechanism": "SCRAM-SHA-512", "secretName": "kafka-user"},
                "deadLetterTopic": "events.dead",
            },
            "streams": [
                {"name": "clicks", "topic": "web.clicks"},
                {"name": "audit", "topic": "audit", "mode": "direct"},
            ],
            "defaultStream": "clicks",
            "partitionKeyPointer": "/user/id",
            "storage": {"size": "10Gi", "storageClassName": "local", "bufferQuotaBytes": 8_000_000_000u64},
            "durability": "fsync",
            "authSecret": {"name": "capture-tokens", "key": "tokens"},
            "shutdownGracePeriodSeconds": 90,
            "orphanRecovery": {"enabled": true, "delaySeconds": 30, "maxParallelFlushJobs": 4},
        },
        "metrics": {
            "serviceMonitor": {"enabled": true, "labels": {"release": "prometheus"}},
            "prometheusRule": {"enabled": true, "labels": {"release": "prometheus"}},
            "grafanaDashboard": {"enabled": true, "annotations": {"grafana_folder": "Holdfast"}},
        },
    })
}

/// Writes `values` to a temporary file for `-f`.
pub fn values_file(values: &Value) -> anyhow::Result<tempfile::NamedTempFile> {
    let file = tempfile::Builder::new().suffix(".yaml").tempfile()?;
    std::fs::write(file.path(), serde_json::to_string_pretty(values)?)?;
    Ok(file)
}

fn app_version() -> anyhow::Result<String> {
    let chart: Value = serde_yaml::from_str(&std::fs::read_to_string(chart().join("Chart.yaml"))?)?;
    Ok(chart["appVersion"]
        .as_str()
        .context("Chart.yaml has no appVersion")?
        .to_string())
}

#[test]
fn helm_lint_passes_with_defaults_and_with_every_option_on() -> anyhow::Result<()> {
    let chart = chart();
    let chart = chart.to_str().context("chart path")?;
    let output = helm_offline(&["lint", "--strict", chart])?;
    ensure!(
        output.status.success(),
        "helm lint (defaults) failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let values = values_file(&all_on_values())?;
    let path = values.path().to_str().context("values path")?;
    let output = helm_offline(&["lint", "--strict", chart, "-f", path])?;
    ensure!(
        output.status.success(),
        "helm lint (all on) failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[test]
fn defaults_render_a_hardened_leader_elected_operator_and_no_optional_parts() -> anyhow::Result<()>
{
    let docs = template("holdfast", "holdfast-system", &[])?;
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "CustomResourceDefinition",
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ] {
        ensure!(
            kinds.contains(&kind),
            "no {kind} in the defaults: {kinds:?}"
        );
    }
    for kind in [
        "CaptureCluster",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
    ] {
        ensure!(!kinds.contains(&kind), "{kind} rendered by default");
    }

    let deployment = find(&docs, "Deployment", "holdfast-operator")?;
    let pod = &deployment["spec"]["template"]["spec"];
    ensure!(pod["serviceAccountName"] == "holdfast-operator", "{pod}");
    ensure!(pod["securityContext"]["runAsNonRoot"] == true, "{pod}");
    let container = &pod["containers"][0];
    ensure!(container["command"] == json!(["holdfast-operator", "run"]));
    let security = &container["securityContext"];
    ensure!(security["readOnlyRootFilesystem"] == true, "{security}");
    ensure!(security["allowPrivilegeEscalation"] == false, "{security}");
    ensure!(
        security["capabilities"]["drop"] == json!(["ALL"]),
        "{security}"
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        ensure!(container[probe]["httpGet"]["port"] == "http", "no {probe}");
    }
    ensure!(
        container["resources"]["requests"]["memory"].is_string()
            && container["resources"]["limits"]["memory"].is_string(),
        "no resources: {}",
        container["resources"]
    );
    let env = |name: &str| {
        container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    ensure!(env("HOLDFAST_LEADER_ELECT") == Some(json!("true")));
    ensure!(env("HOLDFAST_LEASE_NAMESPACE") == Some(json!("holdfast-system")));
    ensure!(env("HOLDFAST_CAPTURE_CLUSTER_ROLE") == Some(json!("holdfast-capture")));
    ensure!(env("HOLDFAST_WATCH_NAMESPACE").is_none());

    let image = container["image"].as_str().context("image")?;
    ensure!(
        image == format!("holdfast/holdfast:{}", app_version()?),
        "default image {image}"
    );
    Ok(())
}

#[test]
fn every_optional_part_renders_and_uses_the_chart_image() -> anyhow::Result<()> {
    let values = values_file(&all_on_values())?;
    let path = values.path().to_str().context("values path")?;
    let docs = template("hf", "events", &["-f", path, "--api-versions", SERVED])?;
    for kind in [
        "CaptureCluster",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
    ] {
        ensure!(!of_kind(&docs, kind).is_empty(), "no {kind} rendered");
    }
    // The dashboard itself: e2e/tests/chart_dashboard.rs.
    let dashboard = find(&docs, "ConfigMap", "hf-holdfast-dashboard")?;
    ensure!(dashboard["metadata"]["labels"]["grafana_dashboard"] == "1");
    let cc = find(&docs, "CaptureCluster", "events")?;
    let deployment = find(&docs, "Deployment", "hf-holdfast-operator")?;
    ensure!(
        cc["spec"]["image"] == deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "capture image {} differs from the operator's",
        cc["spec"]["image"]
    );
    ensure!(cc["spec"]["replicas"] == 3);
    ensure!(cc["spec"]["kafka"]["properties"]["linger.ms"] == "5");
    ensure!(cc["spec"]["storage"]["bufferQuotaBytes"] == 8_000_000_000u64);
    ensure!(cc["spec"]["streams"][1]["mode"] == "direct");
    ensure!(
        cc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep",
        "the CaptureCluster must survive helm uninstall"
    );

    let rule = of_kind(&docs, "PrometheusRule")[0];
    let alerts: Vec<&str> = rule["spec"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for alert in [
        "HoldfastBufferGrowing",
        "HoldfastOldestEventTooOld",
        "HoldfastOrphanedVolumeNotRecovered",
        "HoldfastDeadLettersGrowing",
        "HoldfastKafkaDown",
    ] {
        ensure!(alerts.contains(&alert), "no alert {alert}: {alerts:?}");
    }
    let growing = rule["spec"]["groups"][0]["rules"][0].clone();
    ensure!(growing["for"] == "10m", "{growing}");

    let monitor = find(&docs, "ServiceMonitor", "hf-holdfast-operator")?;
    ensure!(monitor["metadata"]["labels"]["release"] == "prometheus");
    let env = &deployment["spec"]["template"]["spec"]["containers"][0]["env"];
    ensure!(
        env.as_array()
            .into_iter()
            .flatten()
            .any(|e| e["name"] == "HOLDFAST_WATCH_NAMESPACE" && e["value"] == "events"),
        "{env}"
    );
    Ok(())
}

#[test]
fn the_capture_cluster_waits_until_its_crd_is_served() -> anyhow::Result<()> {
    // Helm maps every object before creating any: on the first install the
    // CRD of this same release is not served yet, so a CaptureCluster would
    // fail the whole install. It is left out until an upgrade.
    let values = values_file(&all_on_values())?;
    let path = values.path().to_str().context("values path")?;
    let first = template("hf", "events", &["-f", path])?;
    ensure!(of_kind(&first, "CaptureCluster").is_empty());
    ensure!(!of_kind(&first, "CustomResourceDefinition").is_empty());
    let later = template("hf", "events", &["-f", path, "--api-versions", SERVED])?;
    ensure!(of_kind(&later, "CaptureCluster").len() == 1);
    Ok(())
}

#[test]
fn bad_values_are_refused_naming_the_value() -> anyhow::Result<()> {
    let cases: &[(&[&str], &str)] = &[
        (&["--set", "operator.replicas=0"], "/operator/replicas"),
        (
            &["--set", "image.pullPolicy=Sometimes"],
            "/image/pullPolicy",
        ),
        (&["--set", "operator.logFormat=xml"], "/operator/logFormat"),
        (&["--set", "operator.port=80"], "/operator/port"),
        (&["--set", "crds.enabled=maybe"], "/crds/enabled"),
        (&["--set", "operatr.replicas=2"], "operatr"),
        (
            &["--set", "captureCluster.durability=sometimes"],
            "/captureCluster/durability",
        ),
        (
            &["--set", "captureCluster.storage.size=ten"],
            "/captureCluster/storage/size",
        ),
        (
            &["--set", "captureCluster.kafka.bootstrapServers=no-port"],
            "/captureCluster/kafka/bootstrapServers",
        ),
        (
            &["--set", "captureCluster.enabled=true"],
            "/captureCluster/kafka/bootstrapServers",
        ),
        (
            &["--set", "captureCluster.name=Not_A_Name"],
            "/captureCluster/name",
        ),
        (
            &[
                "--set",
                "metrics.prometheusRule.bufferGrowingFor=ten minutes",
            ],
            "/metrics/prometheusRule/bufferGrowingFor",
        ),
        (
            &["--set", "operator.leaderElection.leaseGraceSeconds=20"],
            "operator.leaderElection.leaseGraceSeconds",
        ),
        (
            &[
                "--set",
                "operator.replicas=2",
                "--set",
                "operator.leaderElection.enabled=false",
            ],
            "operator.leaderElection.enabled",
        ),
    ];
    for (args, named) in cases {
        let error = template_error(args)?;
        ensure!(
            error.contains(named),
            "helm template {args:?} failed without naming {named}:\n{error}"
        );
    }
    Ok(())
}

/// The CRD documents of a file or a render, keyed by name.
fn crds_by_name(docs: &[Value]) -> std::collections::BTreeMap<String, Value> {
    of_kind(docs, "CustomResourceDefinition")
        .into_iter()
        .map(|d| {
            (
                d["metadata"]["name"].as_str().unwrap_or("").to_string(),
                d.clone(),
            )
        })
        .collect()
}

#[test]
fn the_charts_crds_are_the_generated_ones() -> anyhow::Result<()> {
    // files/crds/ is a verbatim copy of crds/ (sync: cp crds/*.yaml charts/holdfast/files/crds/).
    let mut generated = Vec::new();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo().join("crds"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path.file_name().context("file name")?.to_owned();
            let copy = chart().join("files/crds").join(&name);
            let original = std::fs::read_to_string(&path)?;
            ensure!(
                std::fs::read_to_string(&copy).ok().as_deref() == Some(original.as_str()),
                "{} differs from {}: run `cp crds/*.yaml charts/holdfast/files/crds/`",
                copy.display(),
                path.display()
            );
            generated.extend(parse_documents(&original)?);
            names.push(name);
        }
    }
    let copies = std::fs::read_dir(chart().join("files/crds"))?.count();
    ensure!(
        copies == names.len(),
        "charts/holdfast/files/crds has {copies} files, crds/ {}: {names:?}",
        names.len()
    );

    // What the chart renders is that, plus labels and the keep annotation.
    let rendered = crds_by_name(&template("holdfast", "holdfast-system", &[])?);
    let generated = crds_by_name(&generated);
    ensure!(
        rendered.keys().eq(generated.keys()),
        "rendered CRDs {:?}, generated {:?}",
        rendered.keys(),
        generated.keys()
    );
    for (name, mut crd) in rendered {
        let meta = crd["metadata"].as_object_mut().context("metadata")?;
        let annotations = meta.remove("annotations").unwrap_or_default();
        ensure!(
            annotations["helm.sh/resource-policy"] == "keep",
            "CRD {name} is not kept on uninstall"
        );
        meta.remove("labels");
        // Helm re-serialises the YAML: `minimum: 0.0` comes out as `0`.
        ensure!(
            numbers_as_f64(crd) == numbers_as_f64(generated[&name].clone()),
            "CRD {name} differs from crds/"
        );
    }

    // Without the switch there is no CRD at all.
    let off = template(
        "holdfast",
        "holdfast-system",
        &["--set", "crds.enabled=false"],
    )?;
    ensure!(of_kind(&off, "CustomResourceDefinition").is_empty());
    Ok(())
}

/// `value` with every number as a float, so `1` and `1.0` compare equal.
fn numbers_as_f64(value: Value) -> Value {
    match value {
        Value::Number(n) => json!(n.as_f64()),
        Value::Array(items) => Value::Array(items.into_iter().map(numbers_as_f64).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, numbers_as_f64(v)))
                .collect(),
        ),
        other => other,
    }
}

fn rules_of(doc: &Value) -> Value {
    doc["rules"].clone()
}

#[test]
fn the_charts_rbac_is_the_operators() -> anyhow::Result<()> {
    // files/rbac/ is a verbatim copy of operator/rbac/ (sync: cp
    // operator/rbac/*.yaml charts/holdfast/files/rbac/).
    for entry in std::fs::read_dir(repo().join("operator/rbac"))? {
        let path = entry?.path();
        let copy = chart()
            .join("files/rbac")
            .join(path.file_name().context("file name")?);
        ensure!(
            std::fs::read_to_string(&copy).ok() == Some(std::fs::read_to_string(&path)?),
            "{} differs from {}: run `cp operator/rbac/*.yaml charts/holdfast/files/rbac/`",
            copy.display(),
            path.display()
        );
    }
    let docs = template("holdfast", "holdfast-system", &[])?;
    let rbac = |file: &str| -> anyhow::Result<Value> {
        let text = std::fs::read_to_string(repo().join("operator/rbac").join(file))?;
        Ok(parse_documents(&text)?.remove(0))
    };
    // With the release named holdfast, every name is the operator's default.
    for (file, kind, name) in [
        ("clusterrole.yaml", "ClusterRole", "holdfast-operator"),
        (
            "capture-clusterrole.yaml",
            "ClusterRole",
            "holdfast-capture",
        ),
        (
            "leader-election-role.yaml",
            "Role",
            "holdfast-leader-election",
        ),
    ] {
        let chart_rules = rules_of(find(&docs, kind, name)?);
        let operator_rules = rules_of(&rbac(file)?);
        ensure!(
            chart_rules == operator_rules,
            "{kind} {name} differs from operator/rbac/{file}:\nchart: {chart_rules}\noperator: {operator_rules}"
        );
    }
    // Another release binds its own capture role.
    let other = template("blue", "ops", &[])?;
    let role = find(&other, "ClusterRole", "blue-holdfast-operator")?;
    ensure!(
        role["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["verbs"] == json!(["bind"])
                && r["resourceNames"] == json!(["blue-holdfast-capture"])),
        "bind is not limited to the release's capture role: {role}"
    );
    Ok(())
}

#[test]
fn the_default_image_is_the_one_scripts_image_sh_builds() -> anyhow::Result<()> {
    let script = std::fs::read_to_string(repo().join("scripts/image.sh"))?;
    // image.sh reads repository and tag from the chart, so they cannot drift.
    ensure!(
        script.contains("charts/holdfast/Chart.yaml")
            && script.contains("charts/holdfast/values.yaml"),
        "scripts/image.sh does not take its name from the chart"
    );
    let cargo = std::fs::read_to_string(repo().join("Cargo.toml"))?;
    let version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("version = "))
        .context("workspace version")?
        .trim_matches('"');
    ensure!(
        version == app_version()?,
        "Chart.yaml appVersion {} is not the workspace version {version}",
        app_version()?
    );
    Ok(())
}
