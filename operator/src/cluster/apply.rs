//! Applying a valid spec: every object [`super::build`] makes, server-side
//! applied in order, then status (readiness, orphans by the one
//! definition in [`crate::classify`], active flush Jobs) and Events. An
//! invalid spec ([`refuse`]) applies nothing.

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::{
    BUFFER_VOLUME, CONDITION_DRAINING, CONDITION_ORPHANS_RECOVERING, CONDITION_ORPHANS_STUCK,
    CONDITION_READY, CONDITION_SPEC_VALID, CaptureCluster, CaptureClusterStatus, InvalidSpec,
    quantity_bytes,
};
use crate::runtime::nodes::{CONDITION_NODE_LOST, LostPod, REASON_NODE_LOST};
use crate::runtime::{Context, Result, api_err, apply_object, key};

use super::build::{self, Names};
use super::conditions::{self, Wanted};
use super::orphan_status;
use super::status::{count_active_flush_jobs, orphans_of, patch_status};

/// Fields of the volumeClaimTemplate that cannot change once the
/// StatefulSet exists, compared with the spec.
fn immutable_storage_change(
    cluster: &CaptureCluster,
    existing: &StatefulSet,
) -> Option<InvalidSpec> {
    let template = existing
        .spec
        .as_ref()?
        .volume_claim_templates
        .as_ref()?
        .iter()
        .find(|t| t.metadata.name.as_deref() == Some(BUFFER_VOLUME))?;
    let spec = template.spec.as_ref()?;
    let size = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"));
    if let Some(size) = size
        && quantity_bytes(size) != cluster.spec.storage_bytes()
    {
        return Some(InvalidSpec {
            field: "spec.storage.size".into(),
            reason: format!(
                "cannot change after creation (claims were made with {}); create a new CaptureCluster to resize",
                size.0
            ),
        });
    }
    let wanted_mode = cluster
        .spec
        .storage
        .access_mode
        .unwrap_or_default()
        .as_str();
    if let Some(modes) = &spec.access_modes
        && !modes.iter().any(|m| m == wanted_mode)
    {
        return Some(InvalidSpec {
            field: "spec.storage.accessMode".into(),
            reason: format!(
                "cannot change after creation (claims use {}); create a new CaptureCluster to change it",
                modes.join(",")
            ),
        });
    }
    if cluster.spec.storage.storage_class_name.is_some()
        && spec.storage_class_name != cluster.spec.storage.storage_class_name
    {
        return Some(InvalidSpec {
            field: "spec.storage.storageClassName".into(),
            reason: format!(
                "cannot change after creation (claims use {})",
                spec.storage_class_name
                    .as_deref()
                    .unwrap_or("the default class")
            ),
        });
    }
    None
}

pub(super) async fn apply(cluster: &CaptureCluster, ns: &str, ctx: &Context) -> Result<Action> {
    let name = cluster.name_any();
    let names = Names::of(cluster);
    let statefulsets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let existing = statefulsets
        .get_opt(&names.statefulset)
        .await
        .map_err(api_err(format!(
            "get statefulset {ns}/{}",
            names.statefulset
        )))?;
    let refusal = cluster.spec.validate(&name).err().or_else(|| {
        existing
            .as_ref()
            .and_then(|sts| immutable_storage_change(cluster, sts))
    });
    if let Some(invalid) = refusal {
        return refuse(cluster, ns, ctx, invalid).await;
    }
    apply_object(ctx, ns, &build::build_service_account(cluster)).await?;
    apply_object(ctx, ns, &build::build_role(cluster)).await?;
    apply_object(ctx, ns, &build::build_role_binding(cluster)).await?;
    super::capture_binding::bind(ctx, cluster).await?;
    apply_object(ctx, ns, &build::build_headless_service(cluster)).await?;
    apply_object(ctx, ns, &build::build_client_service(cluster)).await?;
    apply_object(ctx, ns, &build::build_pod_disruption_budget(cluster)).await?;
    let sts = apply_object(
        ctx,
        ns,
        &build::build_statefulset(cluster, cluster.spec.replicas),
    )
    .await?;
    let ready = sts
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    // The same definition orphan recovery acts on: a claim whose pod is
    // only restarting (rolling update) is not an orphan, so the count and
    // the Warning do not flicker.
    let (states, lost) = orphans_of(ctx, cluster).await?;
    let orphans: Vec<String> = states.iter().map(|s| s.volume.clone()).collect();
    let orphaned = i32::try_from(orphans.len()).unwrap_or(i32::MAX);
    let status = cluster.status.clone().unwrap_or_default();
    if orphaned != status.orphaned_volumes {
        // Until orphan recovery drains them, say which volumes wait.
        let list = orphans.join(", ");
        if orphaned > 0 {
            warn!(cluster = %key(cluster), volumes = %list, "volumes without a pod may hold events");
            ctx.publish(
                cluster,
                EventType::Warning,
                "OrphanedVolumes",
                "Inspect",
                format!("{orphaned} volume(s) without a pod may hold events: {list}"),
            )
            .await;
        }
    }
    let generation = cluster.meta().generation;
    if status.observed_generation != generation
        || !conditions::is(&status.conditions, CONDITION_SPEC_VALID, true)
    {
        ctx.publish(
            cluster,
            EventType::Normal,
            "Applied",
            "Apply",
            format!(
                "applied generation {} ({} replicas)",
                generation.unwrap_or_default(),
                cluster.spec.replicas
            ),
        )
        .await;
        info!(cluster = %key(cluster), generation, replicas = cluster.spec.replicas, "applied");
    }
    let desired = cluster.spec.replicas;
    let all_ready = ready >= desired
        && sts
            .status
            .as_ref()
            .and_then(|s| s.updated_replicas)
            .unwrap_or(0)
            >= desired;
    let now = jiff::Timestamp::now();
    let mut conds = conditions::set(
        &status.conditions,
        Wanted {
            type_: CONDITION_SPEC_VALID,
            status: true,
            reason: "Valid",
            message: "spec accepted".into(),
        },
        generation,
        now,
    );
    conds = conditions::set(
        &conds,
        Wanted {
            type_: CONDITION_READY,
            status: all_ready,
            reason: if all_ready {
                "AllReplicasReady"
            } else {
                "Progressing"
            },
            message: format!("{ready}/{desired} capture pods ready"),
        },
        generation,
        now,
    );
    conds = conditions::remove(&conds, CONDITION_DRAINING);
    let (is_stuck, stuck_message) = orphan_status::stuck(&states);
    conds = conditions::set(
        &conds,
        Wanted {
            type_: CONDITION_ORPHANS_STUCK,
            status: is_stuck,
            reason: if is_stuck {
                "NeedsAttention"
            } else {
                "NoneStuck"
            },
            message: stuck_message,
        },
        generation,
        now,
    );
    conds = node_lost(cluster, ctx, &conds, &lost, generation, now).await;
    let recovering = states.iter().filter(|s| s.phase != "Stuck").count();
    conds = conditions::set(
        &conds,
        Wanted {
            type_: CONDITION_ORPHANS_RECOVERING,
            status: recovering > 0,
            reason: if recovering > 0 {
                "FlushJobs"
            } else {
                "NoOrphans"
            },
            message: format!("{recovering} orphaned volume(s) being drained"),
        },
        generation,
        now,
    );
    patch_status(
        cluster,
        ns,
        ctx,
        CaptureClusterStatus {
            observed_generation: generation,
            ready_replicas: ready,
            replicas: sts.status.as_ref().map_or(0, |s| s.replicas),
            selector: Some(build::selector_string(cluster)),
            conditions: conds,
            orphaned_volumes: orphaned,
            active_flush_jobs: count_active_flush_jobs(&ctx.client, ns, &name).await?,
            volumes: states,
        },
    )
    .await?;
    // Owned objects wake us on change; the periodic pass catches drift in
    // what we do not watch (Roles, RoleBindings). Nodes are not watched:
    // while a pod is stranded on a lost node, look again soon.
    if lost.is_empty() {
        Ok(Action::requeue(Duration::from_secs(300)))
    } else {
        Ok(Action::requeue(NODE_LOST_RECHECK))
    }
}

/// How soon a cluster with pods on a lost node is looked at again.
const NODE_LOST_RECHECK: Duration = Duration::from_secs(15);

/// `conds` with the `NodeLost` condition: `True` while a pod of the
/// cluster is on a node that is not `Ready`, naming each pod, its node,
/// since when, and the remedy. A Warning Event (with how long) is posted
/// whenever that list changes.
async fn node_lost(
    cluster: &CaptureCluster,
    ctx: &Context,
    conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    lost: &[LostPod],
    generation: Option<i64>,
    now: jiff::Timestamp,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    if lost.is_empty() {
        return conditions::set(
            conds,
            Wanted {
                type_: CONDITION_NODE_LOST,
                status: false,
                reason: "NodesReady",
                message: "every pod of the cluster is on a Ready node".into(),
            },
            generation,
            now,
        );
    }
    let message = lost
        .iter()
        .map(LostPod::condition_text)
        .collect::<Vec<_>>()
        .join("; ");
    let known = conds
        .iter()
        .any(|c| c.type_ == CONDITION_NODE_LOST && c.status == "True" && c.message == message);
    if !known {
        for pod in lost {
            warn!(cluster = %key(cluster), pod = %pod.pod, node = %pod.node, terminating = pod.terminating, "pod on a lost node");
            ctx.publish(
                cluster,
                EventType::Warning,
                REASON_NODE_LOST,
                "Inspect",
                pod.event_text(now),
            )
            .await;
        }
    }
    conditions::set(
        conds,
        Wanted {
            type_: CONDITION_NODE_LOST,
            status: true,
            reason: "PodsOnLostNode",
            message,
        },
        generation,
        now,
    )
}

/// Records an invalid spec without applying anything.
pub(super) async fn refuse(
    cluster: &CaptureCluster,
    ns: &str,
    ctx: &Context,
    invalid: InvalidSpec,
) -> Result<Action> {
    ctx.metrics.invalid_specs.inc();
    let status = cluster.status.clone().unwrap_or_default();
    let generation = cluster.meta().generation;
    let message = invalid.to_string();
    let already =
        status.conditions.iter().any(|c| {
            c.type_ == CONDITION_SPEC_VALID && c.status == "False" && c.message == message
        }) && status.observed_generation == generation;
    if !already {
        warn!(cluster = %key(cluster), field = %invalid.field, reason = %invalid.reason, "invalid spec, nothing applied");
        ctx.publish(
            cluster,
            EventType::Warning,
            "InvalidSpec",
            "Validate",
            format!("{message}; nothing was applied"),
        )
        .await;
    }
    let now = jiff::Timestamp::now();
    let mut conds = conditions::set(
        &status.conditions,
        Wanted {
            type_: CONDITION_SPEC_VALID,
            status: false,
            reason: "InvalidSpec",
            message: message.clone(),
        },
        generation,
        now,
    );
    conds = conditions::set(
        &conds,
        Wanted {
            type_: CONDITION_READY,
            status: false,
            reason: "InvalidSpec",
            message: format!("spec refused, nothing applied: {message}"),
        },
        generation,
        now,
    );
    patch_status(
        cluster,
        ns,
        ctx,
        CaptureClusterStatus {
            observed_generation: generation,
            conditions: conds,
            ..status
        },
    )
    .await?;
    // A new spec wakes us; nothing to retry until then.
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster(size: &str, class: Option<&str>) -> CaptureCluster {
        let spec = serde_json::from_value(json!({
            "image": "holdfast/capture:dev",
            "kafka": {"bootstrapServers": "kafka:9092"},
            "storage": {"size": size, "storageClassName": class},
        }))
        .unwrap();
        let mut c = CaptureCluster::new("events", spec);
        c.metadata.namespace = Some("ns".into());
        c.metadata.uid = Some("u".into());
        c
    }

    #[test]
    fn storage_cannot_change_once_the_claims_exist() {
        let existing = build::build_statefulset(&cluster("1Gi", Some("fast")), 1);
        assert_eq!(
            immutable_storage_change(&cluster("1024Mi", Some("fast")), &existing),
            None
        );
        assert_eq!(
            immutable_storage_change(&cluster("2Gi", Some("fast")), &existing)
                .unwrap()
                .field,
            "spec.storage.size"
        );
        assert_eq!(
            immutable_storage_change(&cluster("1Gi", Some("slow")), &existing)
                .unwrap()
                .field,
            "spec.storage.storageClassName"
        );
        let mut rwop = cluster("1Gi", Some("fast"));
        rwop.spec.storage.access_mode = Some(crate::api::AccessMode::ReadWriteOncePod);
        assert_eq!(
            immutable_storage_change(&rwop, &existing).unwrap().field,
            "spec.storage.accessMode"
        );
        let made_rwop = build::build_statefulset(&rwop, 1);
        let template = &made_rwop
            .spec
            .as_ref()
            .unwrap()
            .volume_claim_templates
            .as_ref()
            .unwrap()[0];
        assert_eq!(
            template.spec.as_ref().unwrap().access_modes,
            Some(vec!["ReadWriteOncePod".to_string()])
        );
        assert_eq!(immutable_storage_change(&rwop, &made_rwop), None);
    }
}
