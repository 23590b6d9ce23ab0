//! The capture process as both the StatefulSet's pods and the flush Jobs
//! run it: Kafka settings (properties, TLS Secret volume, SASL
//! `secretKeyRef` environment), scratch space and buffer mount, security
//! contexts, and the scheduling fields a flush Job inherits. One derivation,
//! so a flush Job always talks to Kafka exactly as the cluster's pods do.
//! Pure functions.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction,
    NodeAffinity, ObjectFieldSelector, PersistentVolume, PodSecurityContext, PodSpec, Probe,
    SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::api::{BUFFER_MOUNT_PATH, BUFFER_VOLUME, CaptureCluster, CaptureClusterSpec};

/// The user id capture pods and flush Jobs run as (not root).
pub const CAPTURE_UID: i64 = 65532;
/// Where the Kafka TLS Secret is mounted; [`kafka_properties`] points here.
pub const TLS_MOUNT: &str = "/etc/holdfast/kafka-tls";
/// Where the auth tokens Secret is mounted (capture pods only).
pub const AUTH_MOUNT: &str = "/etc/holdfast/auth";
/// Scratch space (the root file system is read-only); SQLite looks in
/// `/var/tmp` for temporary files.
pub const TMP_MOUNT: &str = "/var/tmp";

/// Non-root, `RuntimeDefault` seccomp, the buffer owned by [`CAPTURE_UID`].
pub fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(CAPTURE_UID),
        run_as_group: Some(CAPTURE_UID),
        fs_group: Some(CAPTURE_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// No privilege escalation, read-only root file system, no capabilities.
pub fn container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The PV's node affinity as a pod affinity (local volumes live on one node).
pub fn volume_affinity(volume: &PersistentVolume) -> Option<Affinity> {
    let required = volume
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .clone()?;
    Some(Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(required),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The capture pods' scheduling fields on `pod`: node selector, affinity,
/// tolerations, priority class, image pull Secrets, and topology spread
/// constraints (one without a `labelSelector` gets `selector`, the pods'
/// own labels: a spread over no pods would be no spread).
pub fn with_capture_scheduling(
    mut pod: PodSpec,
    spec: &CaptureClusterSpec,
    selector: &BTreeMap<String, String>,
) -> PodSpec {
    pod.node_selector = spec.node_selector.clone();
    pod.affinity = spec.affinity.clone();
    pod.tolerations = spec.tolerations.clone();
    pod.priority_class_name = spec.priority_class_name.clone();
    pod.image_pull_secrets = spec.image_pull_secrets.clone();
    pod.topology_spread_constraints = spec.topology_spread_constraints.clone().map(|all| {
        all.into_iter()
            .map(|mut c| {
                c.label_selector.get_or_insert_with(|| LabelSelector {
                    match_labels: Some(selector.clone()),
                    ..Default::default()
                });
                c
            })
            .collect()
    });
    pod
}

/// A flush Job's scheduling fields on `pod`, inherited from the capture
/// pods: tolerations, priority class and image pull Secrets always (it
/// runs where they run, as urgently, from the same registry).
///
/// Node choice: a volume with node affinity (a local volume) lives on one
/// node, so the Job is pinned there by the PV's affinity alone; the pods'
/// node selector and node affinity could only make it unschedulable there
/// (e.g. after a spec change). Otherwise it inherits them. Pod
/// (anti-)affinity and topology spread are not inherited: they place
/// replicas relative to each other, and a flush Job is not a replica (a
/// required anti-affinity against capture pods would keep it off every
/// node that runs one).
pub fn with_flush_scheduling(
    mut pod: PodSpec,
    spec: &CaptureClusterSpec,
    volume: &PersistentVolume,
) -> PodSpec {
    pod.tolerations = spec.tolerations.clone();
    pod.priority_class_name = spec.priority_class_name.clone();
    pod.image_pull_secrets = spec.image_pull_secrets.clone();
    match volume_affinity(volume) {
        Some(pinned) => {
            pod.affinity = Some(pinned);
            pod.node_selector = None;
        }
        None => {
            pod.node_selector = spec.node_selector.clone();
            pod.affinity = spec
                .affinity
                .as_ref()
                .and_then(|a| a.node_affinity.clone())
                .map(|node_affinity| Affinity {
                    node_affinity: Some(node_affinity),
                    ..Default::default()
                });
        }
    }
    pod
}

/// The properties as `HOLDFAST_KAFKA_PROPERTIES` wants them (one per line).
pub fn properties_env(cluster: &CaptureCluster) -> Option<EnvVar> {
    let props = kafka_properties(cluster);
    (!props.is_empty()).then(|| {
        env(
            "HOLDFAST_KAFKA_PROPERTIES",
            props
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("\n"),
        )
    })
}

/// `HOLDFAST_DELIVERY=exactly-once` when the cluster asks for it: pods and
/// flush Jobs of one cluster must deliver the same way (they share each
/// volume's transactional id and fence each other).
pub fn delivery_env(cluster: &CaptureCluster) -> Option<EnvVar> {
    cluster
        .spec
        .kafka
        .exactly_once
        .then(|| env("HOLDFAST_DELIVERY", "exactly-once"))
}

/// SASL credentials as `secretKeyRef` environment (the properties refer to
/// them as `$(HOLDFAST_KAFKA_SASL_*)`, so they must come first).
pub fn sasl_env(cluster: &CaptureCluster) -> Vec<EnvVar> {
    cluster
        .spec
        .kafka
        .sasl
        .iter()
        .flat_map(|sasl| {
            [
                secret_env(
                    "HOLDFAST_KAFKA_SASL_USERNAME",
                    &sasl.secret_name,
                    &sasl.username_key,
                ),
                secret_env(
                    "HOLDFAST_KAFKA_SASL_PASSWORD",
                    &sasl.secret_name,
                    &sasl.password_key,
                ),
            ]
        })
        .collect()
}

pub fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

pub fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An environment variable read from a Secret key (required).
pub fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The librdkafka properties of the pods: TLS and SASL settings derived from
/// the spec first, then the spec's own properties (which win). SASL
/// credentials are `$(VAR)` references to environment from the Secret, so
/// they never appear in the pod spec.
pub fn kafka_properties(cluster: &CaptureCluster) -> BTreeMap<String, String> {
    let kafka = &cluster.spec.kafka;
    let mut props = BTreeMap::new();
    let protocol = match (kafka.tls.is_some(), kafka.sasl.is_some()) {
        (true, true) => Some("SASL_SSL"),
        (true, false) => Some("SSL"),
        (false, true) => Some("SASL_PLAINTEXT"),
        (false, false) => None,
    };
    if let Some(protocol) = protocol {
        props.insert("security.protocol".to_string(), protocol.to_string());
    }
    if let Some(tls) = &kafka.tls {
        props.insert(
            "ssl.ca.location".into(),
            format!("{TLS_MOUNT}/{}", tls.ca_key),
        );
        if let (Some(cert), Some(key)) = (&tls.cert_key, &tls.key_key) {
            props.insert(
                "ssl.certificate.location".into(),
                format!("{TLS_MOUNT}/{cert}"),
            );
            props.insert("ssl.key.location".into(), format!("{TLS_MOUNT}/{key}"));
        }
    }
    if let Some(sasl) = &kafka.sasl {
        props.insert("sasl.mechanism".into(), sasl.mechanism.as_str().into());
        props.insert(
            "sasl.username".into(),
            "$(HOLDFAST_KAFKA_SASL_USERNAME)".into(),
        );
        props.insert(
            "sasl.password".into(),
            "$(HOLDFAST_KAFKA_SASL_PASSWORD)".into(),
        );
    }
    for (k, v) in &kafka.properties {
        props.insert(k.clone(), v.clone());
    }
    props
}

pub fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// The volumes and mounts a capture process needs besides its buffer claim:
/// scratch space, the Kafka TLS Secret and (for `serve`) the auth Secret. The
/// buffer mount is included; the buffer volume itself comes from the claim
/// (template for the StatefulSet, the orphaned claim for a flush Job).
pub fn capture_volumes(
    spec: &CaptureClusterSpec,
    with_auth: bool,
) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }];
    let mut mounts = vec![
        VolumeMount {
            name: BUFFER_VOLUME.into(),
            mount_path: BUFFER_MOUNT_PATH.into(),
            ..Default::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: TMP_MOUNT.into(),
            ..Default::default()
        },
    ];
    if let Some(tls) = &spec.kafka.tls {
        volumes.push(Volume {
            name: "kafka-tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(tls.secret_name.clone()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "kafka-tls".into(),
            mount_path: TLS_MOUNT.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    if let Some(auth) = spec.auth_secret.as_ref().filter(|_| with_auth) {
        volumes.push(Volume {
            name: "auth".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(auth.name.clone()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "auth".into(),
            mount_path: AUTH_MOUNT.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    (volumes, mounts)
}
