//! The chart's RBAC without a cluster: the operator can touch no
//! ClusterRoleBinding but the one that binds the capture pods' ClusterRole
//! (`resourceNames`, in `operator/rbac/` and in the rendered chart alike),
//! and with `operator.watchNamespace` set every namespaced right is a Role
//! in that namespace, the ClusterRole keeping only cluster-scoped resources.
//!
//! Needs: the pinned helm (`make e2e-bins`).

mod chart_support;

use anyhow::{Context, ensure};
use chart_support::{of_kind, repo, template};
use serde_json::{Value, json};

fn rules_of(doc: &Value) -> Value {
    doc["rules"].clone()
}

/// Resources the API server keeps outside namespaces (of those the
/// operator's rules name).
const CLUSTER_SCOPED: [&str; 5] = [
    "persistentvolumes",
    "clusterrolebindings",
    "clusterroles",
    "namespaces",
    "nodes",
];

/// `(namespace or "" for cluster-wide, rule)` of every rule the rendered
/// `docs` grant ServiceAccount `ns/sa`, through ClusterRoleBindings and
/// RoleBindings.
fn granted(docs: &[Value], ns: &str, sa: &str) -> anyhow::Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    for (kind, role_kind) in [
        ("ClusterRoleBinding", "ClusterRole"),
        ("RoleBinding", "Role"),
    ] {
        for binding in of_kind(docs, kind) {
            let to_sa = binding["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["kind"] == "ServiceAccount" && s["name"] == sa && s["namespace"] == ns);
            if !to_sa {
                continue;
            }
            let at = binding["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default();
            let role = of_kind(docs, role_kind)
                .into_iter()
                .find(|r| {
                    r["metadata"]["name"] == binding["roleRef"]["name"]
                        && r["metadata"]["namespace"].as_str().unwrap_or_default() == at
                })
                .with_context(|| {
                    format!(
                        "{kind} {} binds a missing role",
                        binding["metadata"]["name"]
                    )
                })?;
            for rule in role["rules"].as_array().into_iter().flatten() {
                out.push((at.to_string(), rule.clone()));
            }
        }
    }
    Ok(out)
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// Whether `rules` (of one namespace) allow `verb` on `group/resource`
/// (`name`: the object, when the request names one).
fn allows(rules: &[&Value], group: &str, resource: &str, verb: &str, name: Option<&str>) -> bool {
    rules.iter().any(|r| {
        strings(&r["apiGroups"]).contains(&group)
            && strings(&r["resources"]).contains(&resource)
            && strings(&r["verbs"]).contains(&verb)
            && (r.get("resourceNames").is_none()
                || name.is_some_and(|n| strings(&r["resourceNames"]).contains(&n)))
    })
}

#[test]
fn no_clusterrolebinding_but_the_capture_one_can_be_touched_by_the_operator() -> anyhow::Result<()>
{
    let operator: Value = serde_yaml::from_str(&std::fs::read_to_string(
        repo().join("operator/rbac/clusterrole.yaml"),
    )?)?;
    let defaults = template("blue", "ops", &[])?;
    let scoped = template("blue", "ops", &["--set", "operator.watchNamespace=apps"])?;
    let sources = [
        ("operator/rbac", rules_of(&operator), "holdfast-capture"),
        (
            "chart",
            json!(
                granted(&defaults, "ops", "blue-holdfast-operator")?
                    .into_iter()
                    .map(|(_, r)| r)
                    .collect::<Vec<_>>()
            ),
            "blue-holdfast-capture",
        ),
        (
            "chart with watchNamespace",
            json!(
                granted(&scoped, "ops", "blue-holdfast-operator")?
                    .into_iter()
                    .map(|(_, r)| r)
                    .collect::<Vec<_>>()
            ),
            "blue-holdfast-capture",
        ),
    ];
    for (source, rules, capture_role) in sources {
        let mut seen = 0;
        for rule in rules.as_array().into_iter().flatten() {
            let resources = strings(&rule["resources"]);
            if !resources.iter().any(|r| {
                [
                    "clusterrolebindings",
                    "clusterroles",
                    "rolebindings",
                    "roles",
                    "*",
                ]
                .contains(r)
            }) {
                continue;
            }
            let verbs = strings(&rule["verbs"]);
            ensure!(
                !verbs
                    .iter()
                    .any(|v| ["*", "escalate", "impersonate", "deletecollection"].contains(v)),
                "{source}: {rule}"
            );
            if resources.contains(&"clusterrolebindings") || resources.contains(&"clusterroles") {
                seen += 1;
                ensure!(
                    strings(&rule["resourceNames"]) == [capture_role],
                    "{source}: cluster-wide RBAC verbs not limited to {capture_role}: {rule}"
                );
                ensure!(
                    !verbs.contains(&"delete") && !verbs.contains(&"update"),
                    "{source}: {rule}"
                );
            }
        }
        ensure!(seen == 2, "{source}: {seen} rules on cluster RBAC objects");
    }
    Ok(())
}

#[test]
fn with_watch_namespace_namespaced_rights_are_roles_in_that_namespace() -> anyhow::Result<()> {
    let operator: Value = serde_yaml::from_str(&std::fs::read_to_string(
        repo().join("operator/rbac/clusterrole.yaml"),
    )?)?;
    let docs = template("hf", "ops", &["--set", "operator.watchNamespace=apps"])?;
    let grants = granted(&docs, "ops", "hf-holdfast-operator")?;
    let at = |ns: &str| -> Vec<&Value> {
        grants
            .iter()
            .filter(|(n, _)| n == ns)
            .map(|(_, r)| r)
            .collect()
    };
    let cluster_wide = at("");
    // Cluster-wide: only what has no namespace, Namespaces only the watched one.
    for rule in &cluster_wide {
        for resource in strings(&rule["resources"]) {
            ensure!(
                CLUSTER_SCOPED.contains(&resource),
                "{resource} granted cluster-wide with watchNamespace set: {rule}"
            );
            if resource == "namespaces" {
                ensure!(strings(&rule["resourceNames"]) == ["apps"], "{rule}");
            }
        }
    }
    ensure!(!allows(
        &cluster_wide,
        "",
        "namespaces",
        "get",
        Some("kube-system")
    ));
    ensure!(allows(&cluster_wide, "", "namespaces", "get", Some("apps")));
    // Every right of the operator's ClusterRole is still granted: the
    // namespaced ones in `apps`, through a Role there.
    let apps = at("apps");
    ensure!(!apps.is_empty(), "no Role in the watched namespace");
    for rule in operator["rules"].as_array().context("operator rules")? {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    let name = strings(&rule["resourceNames"]).first().map(|n| match *n {
                        "holdfast-capture" => "hf-holdfast-capture",
                        other => other,
                    });
                    let (rules, name) = if CLUSTER_SCOPED.contains(&resource) {
                        let name = name.or((resource == "namespaces").then_some("apps"));
                        (&cluster_wide, name)
                    } else {
                        (&apps, name)
                    };
                    ensure!(
                        allows(rules, group, resource, verb, name),
                        "{verb} {group}/{resource} is not granted with watchNamespace"
                    );
                    if !CLUSTER_SCOPED.contains(&resource) {
                        ensure!(
                            !allows(&at("ops"), group, resource, verb, None)
                                || resource == "leases",
                            "{verb} {resource} granted in the release namespace"
                        );
                    }
                }
            }
        }
    }
    // Events about PersistentVolumes live in `default`: only those there.
    let default = at("default");
    ensure!(allows(&default, "events.k8s.io", "events", "create", None));
    ensure!(
        default
            .iter()
            .all(|r| strings(&r["resources"]) == ["events"]),
        "{default:?}"
    );
    // Nothing else anywhere: the release namespace holds only the Lease.
    let namespaces: std::collections::BTreeSet<&str> =
        grants.iter().map(|(n, _)| n.as_str()).collect();
    ensure!(
        namespaces == ["", "apps", "default", "ops"].into_iter().collect(),
        "{namespaces:?}"
    );
    ensure!(
        at("ops")
            .iter()
            .all(|r| strings(&r["resources"]) == ["leases"]),
        "{:?}",
        at("ops")
    );
    Ok(())
}
