//! Shared by the `chart_*` tests: run the pinned `helm` on `charts/holdfast`,
//! parse what it renders, and apply rendered documents (for real or as a
//! server-side dry-run) whatever their kind.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use holdfast_e2e::kube::{bin_dir, poll_until};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

/// Generous deadline for anything the control plane does.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The chart directory.
pub fn chart() -> PathBuf {
    repo().join("charts/holdfast")
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "holdfast_e2e=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A `helm` command that needs no cluster (lint, template), with its cache,
/// config and data directories in a fresh temporary directory.
pub fn helm_offline(args: &[&str]) -> anyhow::Result<Output> {
    let helm = bin_dir()?.join("helm");
    ensure!(
        helm.is_file(),
        "{} is missing: run `make e2e-bins`",
        helm.display()
    );
    let home = tempfile::tempdir()?;
    let output = std::process::Command::new(helm)
        .args(args)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .env("KUBECONFIG", home.path().join("no-kubeconfig"))
        .output()?;
    Ok(output)
}

/// `helm template <release> charts/holdfast --namespace <ns> <args>`: the
/// rendered documents, or the failure with helm's stderr.
pub fn template(release: &str, namespace: &str, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let chart = chart();
    let chart = chart.to_str().context("chart path")?;
    let mut all = vec!["template", release, chart, "--namespace", namespace];
    all.extend(args);
    let output = helm_offline(&all)?;
    if !output.status.success() {
        bail!(
            "helm template failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_documents(&String::from_utf8(output.stdout)?)
}

/// The stderr of a `helm template` that must fail.
pub fn template_error(args: &[&str]) -> anyhow::Result<String> {
    let chart = chart();
    let mut all = vec!["template", "t", chart.to_str().context("chart path")?];
    all.extend(args);
    let output = helm_offline(&all)?;
    ensure!(
        !output.status.success(),
        "helm template {args:?} succeeded but should have failed"
    );
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Every non-empty YAML document of a multi-document stream, as JSON.
pub fn parse_documents(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value: Value = serde::Deserialize::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The documents of `kind`.
pub fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The one document of `kind` named `name`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> anyhow::Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name} rendered"))
}

/// `kind/name` of a document, for messages.
pub fn describe(doc: &Value) -> String {
    format!(
        "{}/{}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// The API for a rendered document (discovered from its apiVersion and kind).
pub async fn api_for(client: &Client, doc: &Value) -> anyhow::Result<(Api<DynamicObject>, String)> {
    let api_version = doc["apiVersion"].as_str().context("apiVersion")?;
    let kind = doc["kind"].as_str().context("kind")?;
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, caps) = discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("discover {api_version} {kind}"))?;
    let name = doc["metadata"]["name"]
        .as_str()
        .context("metadata.name")?
        .to_string();
    let api = match caps.scope {
        Scope::Namespaced => {
            let ns = doc["metadata"]["namespace"]
                .as_str()
                .with_context(|| format!("{} has no namespace", describe(doc)))?;
            Api::namespaced_with(client.clone(), ns, &resource)
        }
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    Ok((api, name))
}

/// Server-side applies `doc` (a dry-run when `dry_run`).
pub async fn apply(client: &Client, doc: &Value, dry_run: bool) -> anyhow::Result<DynamicObject> {
    let (api, name) = api_for(client, doc).await?;
    let mut params = PatchParams::apply("holdfast-chart-test").force();
    if dry_run {
        params = params.dry_run();
    }
    api.patch(&name, &params, &Patch::Apply(doc))
        .await
        .with_context(|| format!("apply {} (dry run: {dry_run})", describe(doc)))
}

/// Applies the CRDs among `docs` for real and waits until each is established.
pub async fn install_crds(client: &Client, docs: &[Value]) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for doc in of_kind(docs, "CustomResourceDefinition") {
        apply(client, doc, false).await?;
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        poll_until(&format!("CRD {name} established"), TIMEOUT, || async {
            let crd = crds.get(name).await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        })
        .await?;
    }
    Ok(())
}

/// Minimal CRDs for the Prometheus Operator kinds the chart renders
/// (ServiceMonitor, PodMonitor, PrometheusRule): enough for the API server
/// to accept them, without the upstream schemas.
pub fn monitoring_crds() -> Vec<Value> {
    [
        ("ServiceMonitor", "servicemonitors"),
        ("PodMonitor", "podmonitors"),
        ("PrometheusRule", "prometheusrules"),
    ]
    .iter()
    .map(|(kind, plural)| {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.monitoring.coreos.com")},
            "spec": {
                "group": "monitoring.coreos.com",
                "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase()},
                "scope": "Namespaced",
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": true,
                    }},
                }],
            },
        })
    })
    .collect()
}

/// Name of a [`DynamicObject`], for messages.
pub fn name_of(obj: &DynamicObject) -> String {
    obj.name_any()
}
