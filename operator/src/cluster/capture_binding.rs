//! The capture pods' access to their PersistentVolumes: one
//! ClusterRoleBinding, named like the capture ClusterRole it binds
//! ([`crate::api::CAPTURE_CLUSTER_ROLE`] or `--capture-cluster-role`), whose
//! subjects are the capture ServiceAccounts (`<cluster>-capture`) of every
//! CaptureCluster this operator runs. A cluster's ServiceAccount is added
//! before its pods start and removed once its last volume is clean.
//!
//! One binding with a known name, rather than one per cluster, is what lets
//! the operator's RBAC name it (`resourceNames`): the operator may get,
//! create and patch that binding only, and bind only that ClusterRole, so it
//! cannot touch any other ClusterRoleBinding. Several operators (one per
//! watched namespace) may share the binding: each adds and removes only its
//! own clusters' subjects, with a merge patch that carries the
//! resourceVersion it read (a concurrent change fails with 409 and is
//! retried), never a whole list computed from a partial view.

use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, Patch};
use serde_json::{Value, json};

use crate::api::{COMPONENT_LABEL, CaptureCluster, MANAGED_BY_LABEL, NAME_LABEL};
use crate::runtime::{Context, Result, api_err, apply_cluster_object, key, update_params};

use super::build::Names;

/// The binding (without subjects: those are patched one by one).
pub fn build_capture_binding(role: &str) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(role.to_string()),
            labels: Some(
                [
                    (NAME_LABEL, "holdfast"),
                    (COMPONENT_LABEL, "capture"),
                    (MANAGED_BY_LABEL, "holdfast-operator"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: role.to_string(),
        },
        subjects: None,
    }
}

/// The capture ServiceAccount of `cluster`.
pub fn subject_of(cluster: &CaptureCluster) -> Subject {
    Subject {
        kind: "ServiceAccount".into(),
        name: Names::of(cluster).capture,
        namespace: cluster.namespace(),
        api_group: None,
    }
}

fn same(a: &Subject, b: &Subject) -> bool {
    a.kind == b.kind && a.name == b.name && a.namespace == b.namespace
}

/// The merge patch that adds `subject` to `binding`, `None` when it is there.
/// Pure.
pub fn add_patch(binding: &ClusterRoleBinding, subject: &Subject) -> Option<Value> {
    let subjects = binding.subjects.clone().unwrap_or_default();
    if subjects.iter().any(|s| same(s, subject)) {
        return None;
    }
    let mut subjects = subjects;
    subjects.push(subject.clone());
    Some(patch(binding, &subjects))
}

/// The merge patch that removes `subject` from `binding`, `None` when it is
/// not there. Pure.
pub fn remove_patch(binding: &ClusterRoleBinding, subject: &Subject) -> Option<Value> {
    let subjects = binding.subjects.clone().unwrap_or_default();
    if !subjects.iter().any(|s| same(s, subject)) {
        return None;
    }
    let kept: Vec<Subject> = subjects.into_iter().filter(|s| !same(s, subject)).collect();
    Some(patch(binding, &kept))
}

fn patch(binding: &ClusterRoleBinding, subjects: &[Subject]) -> Value {
    // The resourceVersion makes the patch fail (409) if anyone changed the
    // list since it was read, instead of dropping their subject.
    json!({
        "metadata": {"resourceVersion": binding.resource_version()},
        "subjects": subjects,
    })
}

/// Attempts at a subject change that conflicts with another writer. Every
/// cluster's reconciliation changes this one binding, so at fleet scale
/// they race: a conflict is retried at once with a fresh read, not through
/// the reconcile backoff (2 s doubling), which made the first pass over 50
/// new clusters take 108–133 s (`make bench-operator`).
const CONFLICT_ATTEMPTS: u32 = 8;

/// Adds `cluster`'s capture ServiceAccount to the binding (creating the
/// binding when missing).
pub(super) async fn bind(ctx: &Context, cluster: &CaptureCluster) -> Result<()> {
    let mut binding =
        apply_cluster_object(ctx, &build_capture_binding(&ctx.capture_cluster_role)).await?;
    for attempt in 1..=CONFLICT_ATTEMPTS {
        let Some(patch) = add_patch(&binding, &subject_of(cluster)) else {
            return Ok(());
        };
        match write(ctx, cluster, &binding, patch, "add").await {
            Err(e) if e.reason() == "conflict" && attempt < CONFLICT_ATTEMPTS => {
                match read(ctx).await? {
                    Some(fresh) => binding = fresh,
                    None => return Err(e),
                }
            }
            other => return other,
        }
    }
    Ok(())
}

/// Removes `cluster`'s capture ServiceAccount from the binding.
pub(super) async fn unbind(ctx: &Context, cluster: &CaptureCluster) -> Result<()> {
    for attempt in 1..=CONFLICT_ATTEMPTS {
        let Some(binding) = read(ctx).await? else {
            return Ok(());
        };
        let Some(patch) = remove_patch(&binding, &subject_of(cluster)) else {
            return Ok(());
        };
        match write(ctx, cluster, &binding, patch, "remove").await {
            Err(e) if e.reason() == "conflict" && attempt < CONFLICT_ATTEMPTS => {}
            other => return other,
        }
    }
    Ok(())
}

/// The binding, if it exists.
async fn read(ctx: &Context) -> Result<Option<ClusterRoleBinding>> {
    let name = &ctx.capture_cluster_role;
    Api::<ClusterRoleBinding>::all(ctx.client.clone())
        .get_opt(name)
        .await
        .map_err(api_err(format!("get clusterrolebinding {name}")))
}

async fn write(
    ctx: &Context,
    cluster: &CaptureCluster,
    binding: &ClusterRoleBinding,
    patch: Value,
    verb: &str,
) -> Result<()> {
    let name = binding.name_any();
    let what = || format!("{verb} {} in clusterrolebinding {name}", key(cluster));
    ctx.may_write(what)?;
    Api::<ClusterRoleBinding>::all(ctx.client.clone())
        .patch(&name, &update_params(), &Patch::Merge(patch))
        .await
        .map_err(api_err(what()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(ns: &str, name: &str) -> CaptureCluster {
        serde_json::from_value(json!({
            "apiVersion": "holdfast.dev/v1alpha1", "kind": "CaptureCluster",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": 1, "image": "i", "kafka": {"bootstrapServers": "k:9092"},
                "storage": {"size": "1Gi"}},
        }))
        .unwrap()
    }

    fn existing(subjects: &[Subject]) -> ClusterRoleBinding {
        let mut b = build_capture_binding("holdfast-capture");
        b.metadata.resource_version = Some("42".into());
        b.subjects = (!subjects.is_empty()).then(|| subjects.to_vec());
        b
    }

    #[test]
    fn the_binding_is_named_after_the_role_it_binds_and_has_no_subjects_to_apply() {
        let b = build_capture_binding("blue-holdfast-capture");
        assert_eq!(b.metadata.name.as_deref(), Some("blue-holdfast-capture"));
        assert_eq!(b.role_ref.kind, "ClusterRole");
        assert_eq!(b.role_ref.name, "blue-holdfast-capture");
        // Server-side apply must not own the list other clusters share.
        assert!(serde_json::to_value(&b).unwrap().get("subjects").is_none());
    }

    #[test]
    fn adds_and_removes_only_its_own_subject_guarded_by_the_resource_version() {
        let shop = subject_of(&cluster("shop", "events"));
        assert_eq!(shop.name, "events-capture");
        assert_eq!(shop.namespace.as_deref(), Some("shop"));
        let other = subject_of(&cluster("web", "events"));

        let patch = add_patch(&existing(std::slice::from_ref(&other)), &shop).unwrap();
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        let names: Vec<&str> = patch["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["namespace"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["web", "shop"]);
        assert!(add_patch(&existing(&[other.clone(), shop.clone()]), &shop).is_none());
        assert!(add_patch(&existing(&[]), &shop).is_some());

        let patch = remove_patch(&existing(&[shop.clone(), other.clone()]), &shop).unwrap();
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        assert_eq!(patch["subjects"].as_array().unwrap().len(), 1);
        assert_eq!(patch["subjects"][0]["namespace"], "web");
        assert!(remove_patch(&existing(&[other]), &shop).is_none());
        assert!(remove_patch(&existing(&[]), &shop).is_none());
    }
}
