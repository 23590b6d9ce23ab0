//! Pure builders: one CaptureCluster in, the Kubernetes objects that run it
//! out. Nothing here talks to the API server, so every field is tested
//! without a cluster.
//!
//! Every object carries the cluster's labels and a controller owner reference
//! to the CaptureCluster (garbage-collected with it, once the finalizer lets
//! it go). All configuration of a pod lives in its template (flags as
//! `HOLDFAST_*` environment, Secrets as volumes or `secretKeyRef`), so any
//! spec change changes the template and the StatefulSet rolls the pods; the
//! content of referenced Secrets is not hashed (rotate it with a rollout).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy,
    StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSpec,
    PodTemplateSpec, Service, ServiceAccount, ServicePort, ServiceSpec, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{
    ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::api::{
    BUFFER_MOUNT_PATH, BUFFER_VOLUME, CLUSTER_LABEL, COMPONENT_LABEL, CaptureCluster, HTTP_PORT,
    MANAGED_BY_LABEL, NAME_LABEL, NAMESPACE_LABEL, drain_timeout_secs,
};
use crate::podspec::{self, AUTH_MOUNT, TMP_MOUNT, env, field_env};
pub use crate::podspec::{CAPTURE_UID, kafka_properties};

/// Name of the capture container.
pub const CAPTURE_CONTAINER: &str = "capture";

/// Names of a cluster's objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// StatefulSet and client Service: `<cluster>`.
    pub statefulset: String,
    /// Headless Service: `<cluster>-headless`.
    pub headless: String,
    /// ServiceAccount, Role and RoleBinding of the pods: `<cluster>-capture`.
    pub capture: String,
    /// ClusterRoleBinding of the pods (their PV):
    /// `holdfast-capture-<namespace>-<cluster>`.
    pub cluster_binding: String,
}

impl Names {
    /// The names for `cluster`.
    pub fn of(cluster: &CaptureCluster) -> Self {
        let name = cluster.name_any();
        Self {
            statefulset: name.clone(),
            headless: format!("{name}-headless"),
            capture: format!("{name}-capture"),
            cluster_binding: format!(
                "holdfast-capture-{}-{name}",
                cluster.namespace().unwrap_or_default()
            ),
        }
    }
}

/// Labels selecting a cluster's pods (also on its claims); stable for the
/// life of the StatefulSet, whose selector is immutable.
pub fn selector_labels(cluster: &CaptureCluster) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_string(), "holdfast".to_string()),
        (COMPONENT_LABEL.to_string(), "capture".to_string()),
        (CLUSTER_LABEL.to_string(), cluster.name_any()),
    ])
}

/// [`selector_labels`] as a label selector string (`status.selector`, for
/// the `scale` subresource).
pub fn selector_string(cluster: &CaptureCluster) -> String {
    selector_labels(cluster)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Labels of every object the operator makes for a cluster.
pub fn labels(cluster: &CaptureCluster) -> BTreeMap<String, String> {
    let mut labels = selector_labels(cluster);
    labels.insert(
        MANAGED_BY_LABEL.to_string(),
        "holdfast-operator".to_string(),
    );
    labels
}

fn owner(cluster: &CaptureCluster) -> OwnerReference {
    cluster
        .controller_owner_ref(&())
        .expect("a CaptureCluster from the API server has a name and uid")
}

fn meta(cluster: &CaptureCluster, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: cluster.namespace(),
        labels: Some(labels(cluster)),
        owner_references: Some(vec![owner(cluster)]),
        ..Default::default()
    }
}

/// The ServiceAccount of the capture pods.
pub fn build_service_account(cluster: &CaptureCluster) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(cluster, &Names::of(cluster).capture),
        automount_service_account_token: Some(true),
        ..Default::default()
    }
}

/// The capture pods' Role: read their own pod and claim (to find their PV),
/// post Events. Patching their PV is cluster-scoped: see
/// [`build_cluster_role_binding`].
pub fn build_role(cluster: &CaptureCluster) -> Role {
    let rule = |groups: &[&str], resources: &[&str], verbs: &[&str]| PolicyRule {
        api_groups: Some(groups.iter().map(|s| s.to_string()).collect()),
        resources: Some(resources.iter().map(|s| s.to_string()).collect()),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    Role {
        metadata: meta(cluster, &Names::of(cluster).capture),
        rules: Some(vec![
            rule(&[""], &["pods", "persistentvolumeclaims"], &["get"]),
            rule(&["events.k8s.io"], &["events"], &["create", "patch"]),
        ]),
    }
}

/// Binds [`build_role`] to [`build_service_account`].
pub fn build_role_binding(cluster: &CaptureCluster) -> RoleBinding {
    let names = Names::of(cluster);
    RoleBinding {
        metadata: meta(cluster, &names.capture),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: names.capture.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: names.capture,
            namespace: cluster.namespace(),
            ..Default::default()
        }]),
    }
}

/// Binds ClusterRole `role` (PV get/patch, see
/// [`crate::api::CAPTURE_CLUSTER_ROLE`]) to the capture ServiceAccount, so a
/// pod can keep its own volume `Retain` and flip it after a clean drain. A
/// cluster-scoped object cannot be owned by a namespaced one: it carries the
/// cluster's labels and the finalizer deletes it after the last drain.
pub fn build_cluster_role_binding(cluster: &CaptureCluster, role: &str) -> ClusterRoleBinding {
    let names = Names::of(cluster);
    let mut labels = labels(cluster);
    labels.insert(
        NAMESPACE_LABEL.to_string(),
        cluster.namespace().unwrap_or_default(),
    );
    ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(names.cluster_binding),
            labels: Some(labels),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: role.to_string(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: names.capture,
            namespace: cluster.namespace(),
            ..Default::default()
        }]),
    }
}

fn service_ports() -> Vec<ServicePort> {
    vec![ServicePort {
        name: Some("http".into()),
        port: HTTP_PORT,
        target_port: Some(IntOrString::String("http".into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    }]
}

/// The headless Service that gives each pod a stable DNS name; it lists
/// pods before they are ready so peers and tools can reach a draining pod.
pub fn build_headless_service(cluster: &CaptureCluster) -> Service {
    Service {
        metadata: meta(cluster, &Names::of(cluster).headless),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(cluster)),
            ports: Some(service_ports()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The client Service: ready pods only.
pub fn build_client_service(cluster: &CaptureCluster) -> Service {
    Service {
        metadata: meta(cluster, &Names::of(cluster).statefulset),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(cluster)),
            ports: Some(service_ports()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// At most one capture pod voluntarily disrupted at a time: a draining pod
/// must finish before the next one goes.
pub fn build_pod_disruption_budget(cluster: &CaptureCluster) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(cluster, &Names::of(cluster).statefulset),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(cluster)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The capture container's environment (every flag of `holdfast-capture
/// serve` has an `HOLDFAST_*` variable). `POD_IP` comes first so the listen
/// address can refer to it: the pod listens on its own address, which is
/// what the probes and Services use.
pub fn capture_env(cluster: &CaptureCluster) -> Vec<EnvVar> {
    let spec = &cluster.spec;
    let mut vars = vec![
        field_env("POD_IP", "status.podIP"),
        field_env("POD_NAME", "metadata.name"),
        field_env("HOLDFAST_NAMESPACE", "metadata.namespace"),
        env("HOLDFAST_LISTEN", format!("$(POD_IP):{HTTP_PORT}")),
        env("HOLDFAST_DATA_DIR", BUFFER_MOUNT_PATH),
        // The pod's own claim: its volume guard keeps the PV behind it
        // `Retain` and flips it after a clean drain.
        env(
            "HOLDFAST_VOLUME_CLAIM",
            format!("{BUFFER_VOLUME}-$(POD_NAME)"),
        ),
        env("HOLDFAST_DURABILITY", spec.durability.as_str()),
        env(
            "HOLDFAST_KAFKA_BOOTSTRAP",
            spec.kafka.bootstrap_servers.clone(),
        ),
        env(
            "HOLDFAST_STREAMS",
            spec.effective_streams()
                .iter()
                .map(|s| format!("{}={}:{}", s.name, s.topic, s.mode.as_str()))
                .collect::<Vec<_>>()
                .join(","),
        ),
        env("HOLDFAST_DEFAULT_STREAM", spec.effective_default_stream()),
        env(
            "HOLDFAST_BUFFER_QUOTA_BYTES",
            spec.buffer_quota_bytes().to_string(),
        ),
        env(
            "HOLDFAST_DRAIN_TIMEOUT_SECS",
            drain_timeout_secs(spec.shutdown_grace_period_seconds).to_string(),
        ),
        env("HOLDFAST_LOG_FORMAT", "json"),
        env("TMPDIR", TMP_MOUNT),
    ];
    vars.extend(podspec::sasl_env(cluster));
    vars.extend(podspec::properties_env(cluster));
    vars.extend(podspec::delivery_env(cluster));
    if let Some(topic) = &spec.kafka.dead_letter_topic {
        vars.push(env("HOLDFAST_DEAD_LETTER_TOPIC", topic.clone()));
    }
    if let Some(pointer) = &spec.partition_key_pointer {
        vars.push(env("HOLDFAST_PARTITION_KEY_POINTER", pointer.clone()));
    }
    if let Some(auth) = &spec.auth_secret {
        vars.push(env(
            "HOLDFAST_AUTH_TOKENS_FILE",
            format!("{AUTH_MOUNT}/{}", auth.key),
        ));
    }
    vars
}

/// The capture StatefulSet with `replicas` pods (the spec's, or 0 while the
/// cluster is being deleted).
pub fn build_statefulset(cluster: &CaptureCluster, replicas: i32) -> StatefulSet {
    let spec = &cluster.spec;
    let names = Names::of(cluster);
    let (volumes, mounts) = podspec::capture_volumes(spec, true);
    let container = Container {
        name: CAPTURE_CONTAINER.into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(vec!["holdfast-capture".into(), "serve".into()]),
        env: Some(capture_env(cluster)),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: HTTP_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(podspec::http_probe("/readyz", 2, 2)),
        liveness_probe: Some(podspec::http_probe("/healthz", 10, 6)),
        resources: spec.resources.clone(),
        volume_mounts: Some(mounts),
        security_context: Some(podspec::container_security_context()),
        ..Default::default()
    };
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(BUFFER_VOLUME.into()),
            labels: Some(selector_labels(cluster)),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![
                spec.storage.access_mode.unwrap_or_default().as_str().into(),
            ]),
            storage_class_name: spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    spec.storage.size.clone(),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    StatefulSet {
        metadata: meta(cluster, &names.statefulset),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(names.headless),
            // Pods are independent buffers: start and stop them in parallel.
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(cluster)),
                ..Default::default()
            },
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateStatefulSetStrategy {
                    max_unavailable: Some(IntOrString::Int(1)),
                    partition: Some(0),
                }),
            }),
            // Claims outlive their pods: a claim with events is drained by
            // its next pod or by orphan recovery, never deleted with the set.
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Retain".into()),
                    when_scaled: Some("Retain".into()),
                },
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(cluster)),
                    ..Default::default()
                }),
                spec: Some(podspec::with_capture_scheduling(
                    PodSpec {
                        service_account_name: Some(names.capture),
                        automount_service_account_token: Some(true),
                        termination_grace_period_seconds: Some(spec.shutdown_grace_period_seconds),
                        security_context: Some(podspec::pod_security_context()),
                        containers: vec![container],
                        volumes: Some(volumes),
                        ..Default::default()
                    },
                    spec,
                    &selector_labels(cluster),
                )),
            },
            volume_claim_templates: Some(vec![claim]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
