//! The flush Job: one per orphaned volume, named after the PV so there is
//! never more than one drainer per volume from the operator's side (the
//! buffer's `flock` guarantees it against everyone else). Pure builders.
//!
//! The Job runs `holdfast-capture flush` in the cluster's image, with the
//! cluster's Kafka settings (bootstrap servers, properties, TLS Secret
//! volume, SASL `secretKeyRef` environment: the same derivation as the
//! StatefulSet's, [`podspec::kafka_properties`]), mounts the claim at the
//! buffer path, and is pinned to the PV's node when the PV has node
//! affinity (local volumes); otherwise it inherits the pods' node selector
//! and node affinity. Tolerations, priority class and image pull Secrets
//! are the pods' ([`podspec::with_flush_scheduling`]). It runs as the same non-root user with a
//! read-only root file system, without an API token: it needs none (the
//! operator flips the volume when the Job succeeds).

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, PersistentVolume, PersistentVolumeClaimVolumeSource, PodSpec,
    PodTemplateSpec, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use crate::api::{BUFFER_MOUNT_PATH, BUFFER_VOLUME, CaptureCluster};
use crate::podspec::{self, TMP_MOUNT, env};
pub use crate::podspec::{CAPTURE_UID, TLS_MOUNT, volume_affinity};

use crate::flush::{CLAIM_ANNOTATION, VOLUME_ANNOTATION};
pub use crate::flush::{
    JobState, flush_job_name, flush_labels, job_duration, job_failure, job_state,
};

/// Name of the flush container.
pub const FLUSH_CONTAINER: &str = "flush";
/// Pod-level retries inside one Job before it counts as failed (the
/// operator then backs off and starts a new Job).
pub const JOB_BACKOFF_LIMIT: i32 = 1;

/// What a flush Job needs to know.
#[derive(Debug, Clone)]
pub struct FlushJobInput<'a> {
    /// The cluster whose volume it is (image, Kafka, scheduling).
    pub cluster: &'a CaptureCluster,
    /// The PV being drained (its node affinity pins the Job).
    pub volume: &'a PersistentVolume,
    /// The claim to mount (bound to `volume`).
    pub claim: &'a str,
    /// `holdfast-capture flush --timeout-secs`.
    pub flush_timeout_secs: u64,
}

/// The environment of `holdfast-capture flush` (its flags' `HOLDFAST_*`
/// variables). SASL credentials come first: the properties refer to them as
/// `$(HOLDFAST_KAFKA_SASL_*)`.
pub fn flush_env(cluster: &CaptureCluster, flush_timeout_secs: u64) -> Vec<EnvVar> {
    let spec = &cluster.spec;
    let mut vars = podspec::sasl_env(cluster);
    vars.extend([
        env("HOLDFAST_DATA_DIR", BUFFER_MOUNT_PATH),
        env("HOLDFAST_DURABILITY", spec.durability.as_str()),
        env(
            "HOLDFAST_KAFKA_BOOTSTRAP",
            spec.kafka.bootstrap_servers.clone(),
        ),
        env(
            "HOLDFAST_FLUSH_TIMEOUT_SECS",
            flush_timeout_secs.to_string(),
        ),
        env("HOLDFAST_LOG_FORMAT", "json"),
        env("TMPDIR", TMP_MOUNT),
    ]);
    vars.extend(podspec::properties_env(cluster));
    vars.extend(podspec::delivery_env(cluster));
    if let Some(topic) = &spec.kafka.dead_letter_topic {
        vars.push(env("HOLDFAST_DEAD_LETTER_TOPIC", topic.clone()));
    }
    vars
}

/// The flush Job for one orphaned volume.
pub fn build_flush_job(input: &FlushJobInput<'_>) -> Job {
    let FlushJobInput {
        cluster,
        volume,
        claim,
        flush_timeout_secs,
    } = *input;
    let spec = &cluster.spec;
    let cluster_name = cluster.name_any();
    let volume_name = volume.name_any();
    let labels = flush_labels(&cluster_name);
    let annotations = BTreeMap::from([
        (VOLUME_ANNOTATION.to_string(), volume_name.clone()),
        (CLAIM_ANNOTATION.to_string(), claim.to_string()),
    ]);
    let (shared_volumes, mounts) = podspec::capture_volumes(spec, false);
    let mut volumes = vec![Volume {
        name: BUFFER_VOLUME.into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.to_string(),
            read_only: Some(false),
        }),
        ..Default::default()
    }];
    volumes.extend(shared_volumes);
    let container = Container {
        name: FLUSH_CONTAINER.into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(vec!["holdfast-capture".into(), "flush".into()]),
        env: Some(flush_env(cluster, flush_timeout_secs)),
        resources: spec.resources.clone(),
        volume_mounts: Some(mounts),
        security_context: Some(podspec::container_security_context()),
        ..Default::default()
    };
    // The flush gives up after its timeout; the deadline only catches a pod
    // that never starts (image, scheduling), so it leaves a wide margin.
    let deadline = i64::try_from(flush_timeout_secs)
        .unwrap_or(i64::MAX / 2)
        .saturating_add(600);
    Job {
        metadata: ObjectMeta {
            name: Some(flush_job_name(&volume_name)),
            namespace: cluster.namespace(),
            labels: Some(labels.clone()),
            annotations: Some(annotations.clone()),
            // No owner reference: a foreground cascade or the garbage
            // collector must not delete a Job that drains events (the
            // operator deletes it once it has acted on its result).
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(JOB_BACKOFF_LIMIT),
            // One drainer per buffer: a replacement pod starts only once
            // the previous one has failed for good, never while it is
            // still terminating (the default, `TerminatingOrFailed`).
            pod_replacement_policy: Some("Failed".into()),
            active_deadline_seconds: Some(deadline),
            // The operator deletes a Job once it has acted on its result;
            // this only collects what an operator outage left behind.
            ttl_seconds_after_finished: Some(24 * 3600),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(podspec::with_flush_scheduling(
                    PodSpec {
                        restart_policy: Some("Never".into()),
                        automount_service_account_token: Some(false),
                        security_context: Some(podspec::pod_security_context()),
                        containers: vec![container],
                        volumes: Some(volumes),
                        ..Default::default()
                    },
                    spec,
                    volume,
                )),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::{CLUSTER_LABEL, COMPONENT_LABEL};
    use crate::flush::FLUSH_COMPONENT;
    use k8s_openapi::api::core::v1::{
        NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PersistentVolumeSpec,
        VolumeNodeAffinity,
    };
    use serde_json::json;

    pub(crate) fn cluster(extra: serde_json::Value) -> CaptureCluster {
        let mut spec = json!({
            "image": "holdfast/capture:dev",
            "kafka": {"bootstrapServers": "kafka:9092", "properties": {"linger.ms": "5"}},
            "storage": {"size": "1Gi"},
        });
        if let (Some(base), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                base.insert(k.clone(), v.clone());
            }
        }
        let mut c = CaptureCluster::new("events", serde_json::from_value(spec).unwrap());
        c.metadata.namespace = Some("ns".into());
        c.metadata.uid = Some("cc-uid".into());
        c
    }

    fn local_pv(name: &str, node: Option<&str>) -> PersistentVolume {
        PersistentVolume {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeSpec {
                node_affinity: node.map(|n| VolumeNodeAffinity {
                    required: Some(NodeSelector {
                        node_selector_terms: vec![NodeSelectorTerm {
                            match_expressions: Some(vec![NodeSelectorRequirement {
                                key: "kubernetes.io/hostname".into(),
                                operator: "In".into(),
                                values: Some(vec![n.into()]),
                            }]),
                            ..Default::default()
                        }],
                    }),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn env_map(job: &Job) -> BTreeMap<String, EnvVar> {
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        pod.containers[0]
            .env
            .iter()
            .flatten()
            .map(|v| (v.name.clone(), v.clone()))
            .collect()
    }

    #[test]
    fn job_name_is_deterministic_per_volume_and_fits_a_label() {
        assert_eq!(flush_job_name("pvc-1234"), "hf-flush-pvc-1234");
        assert_eq!(flush_job_name("pvc-1234"), flush_job_name("pvc-1234"));
        let long = format!("local.{}", "x".repeat(80));
        let name = flush_job_name(&long);
        assert!(name.len() <= 63, "{name}");
        assert!(name.starts_with("hf-flush-local-x"));
        assert_ne!(name, flush_job_name(&format!("{long}y")));
    }

    #[test]
    fn flush_job_runs_flush_on_the_claim_with_the_clusters_kafka_settings() {
        let c = cluster(json!({"kafka": {
            "bootstrapServers": "k1:9092,k2:9092",
            "properties": {"linger.ms": "5"},
            "deadLetterTopic": "dlq",
        }}));
        let pv = local_pv("pvc-1", None);
        let job = build_flush_job(&FlushJobInput {
            cluster: &c,
            volume: &pv,
            claim: "buffer-events-1",
            flush_timeout_secs: 300,
        });
        assert_eq!(job.metadata.name.as_deref(), Some("hf-flush-pvc-1"));
        assert_eq!(job.metadata.namespace.as_deref(), Some("ns"));
        // Not owned: deleting the cluster (foreground cascade, namespace
        // deletion) must not take a draining Job with it.
        assert_eq!(job.metadata.owner_references, None);
        assert_eq!(
            job.spec.as_ref().unwrap().pod_replacement_policy.as_deref(),
            Some("Failed")
        );
        assert_eq!(job.labels()[COMPONENT_LABEL], FLUSH_COMPONENT);
        assert_eq!(job.labels()[CLUSTER_LABEL], "events");
        assert_eq!(job.annotations()[VOLUME_ANNOTATION], "pvc-1");
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.backoff_limit, Some(JOB_BACKOFF_LIMIT));
        assert!(spec.active_deadline_seconds.unwrap() > 300);
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.affinity, None);
        let container = &pod.containers[0];
        assert_eq!(container.image.as_deref(), Some("holdfast/capture:dev"));
        assert_eq!(
            container.command.as_deref(),
            Some(&["holdfast-capture".to_string(), "flush".to_string()][..])
        );
        let env = env_map(&job);
        let value = |k: &str| env[k].value.clone().unwrap();
        assert_eq!(value("HOLDFAST_KAFKA_BOOTSTRAP"), "k1:9092,k2:9092");
        assert_eq!(value("HOLDFAST_KAFKA_PROPERTIES"), "linger.ms=5");
        assert_eq!(value("HOLDFAST_DATA_DIR"), BUFFER_MOUNT_PATH);
        assert_eq!(value("HOLDFAST_FLUSH_TIMEOUT_SECS"), "300");
        assert_eq!(value("HOLDFAST_DEAD_LETTER_TOPIC"), "dlq");
        let claim = pod.volumes.as_ref().unwrap()[0]
            .persistent_volume_claim
            .as_ref()
            .unwrap();
        assert_eq!(claim.claim_name, "buffer-events-1");
        let mount = &container.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(mount.mount_path, BUFFER_MOUNT_PATH);
        assert_eq!(mount.name, "buffer");
    }

    #[test]
    fn flush_job_is_non_root_like_the_capture_pods() {
        let c = cluster(json!({}));
        let job = build_flush_job(&FlushJobInput {
            cluster: &c,
            volume: &local_pv("pvc-1", None),
            claim: "c",
            flush_timeout_secs: 60,
        });
        let pod = job.spec.unwrap().template.spec.unwrap();
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(CAPTURE_UID));
        assert_eq!(psc.fs_group, Some(CAPTURE_UID));
        let sc = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
    }

    fn scheduled() -> CaptureCluster {
        cluster(json!({
            "nodeSelector": {"pool": "capture"},
            "tolerations": [{"key": "dedicated", "operator": "Exists"}],
            "affinity": {
                "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [
                        {"key": "zone", "operator": "In", "values": ["a"]},
                    ]}],
                }},
                "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "capture"}},
                    "topologyKey": "kubernetes.io/hostname",
                }]},
            },
            "priorityClassName": "holdfast-high",
            "imagePullSecrets": [{"name": "registry"}],
            "topologySpreadConstraints": [{
                "maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule",
            }],
        }))
    }

    #[test]
    fn flush_job_inherits_the_pods_scheduling_fields() {
        let c = scheduled();
        // A network volume: no node of its own.
        let pv = local_pv("net-1", None);
        let job = build_flush_job(&FlushJobInput {
            cluster: &c,
            volume: &pv,
            claim: "c",
            flush_timeout_secs: 60,
        });
        let pod = job.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.node_selector, c.spec.node_selector);
        assert_eq!(pod.tolerations, c.spec.tolerations);
        assert_eq!(pod.priority_class_name.as_deref(), Some("holdfast-high"));
        assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "registry");
        let affinity = pod.affinity.unwrap();
        assert_eq!(
            affinity.node_affinity,
            c.spec.affinity.as_ref().unwrap().node_affinity
        );
        // Replica placement is not a flush Job's: it would keep the Job off
        // every node that runs a capture pod.
        assert_eq!(affinity.pod_anti_affinity, None);
        assert_eq!(pod.topology_spread_constraints, None);
    }

    #[test]
    fn flush_job_on_a_local_volume_keeps_its_node_pin_and_inherits_the_rest() {
        let c = scheduled();
        let pv = local_pv("local-1", Some("holdfast-node-2"));
        let job = build_flush_job(&FlushJobInput {
            cluster: &c,
            volume: &pv,
            claim: "c",
            flush_timeout_secs: 60,
        });
        let pod = job.spec.unwrap().template.spec.unwrap();
        // Pinned by the PV alone: the pods' node constraints could only
        // make it unschedulable on the one node that has the data.
        assert_eq!(pod.affinity, volume_affinity(&pv));
        assert_eq!(pod.node_selector, None);
        assert_eq!(pod.tolerations, c.spec.tolerations);
        assert_eq!(pod.priority_class_name.as_deref(), Some("holdfast-high"));
        assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "registry");
    }

    #[test]
    fn flush_job_is_pinned_to_the_node_of_a_local_volume() {
        let c = cluster(json!({"tolerations": [{"key": "dedicated", "operator": "Exists"}]}));
        let pv = local_pv("local-1", Some("holdfast-node-2"));
        let job = build_flush_job(&FlushJobInput {
            cluster: &c,
            volume: &pv,
            claim: "c",
            flush_timeout_secs: 60,
        });
        let pod = job.spec.unwrap().template.spec.unwrap();
        let required = pod
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap();
        let expr = &required.node_selector_terms[0]
            .match_expressions
            .as_ref()
            .unwrap()[0];
        assert_eq!(expr.key, "kubernetes.io/hostname");
        assert_eq!(expr.values, Some(vec!["holdfast-node-2".to_string()]));
        assert_eq!(
            pod.tolerations.unwrap()[0].key.as_deref(),
            Some("dedicated")
        );
    }

    #[test]
    fn secrets_reach_the_job_by_reference_only() {
        let c = cluster(json!({"kafka": {
            "bootstrapServers": "k:9093",
            "tls": {"secretName": "kafka-tls", "certKey": "tls.crt", "keyKey": "tls.key"},
            "sasl": {"mechanism": "SCRAM-SHA-512", "secretName": "kafka-user"},
        }}));
        let job = build_flush_job(&FlushJobInput {
            cluster: &c,
            volume: &local_pv("pvc-1", None),
            claim: "c",
            flush_timeout_secs: 60,
        });
        let env = env_map(&job);
        let user = env["HOLDFAST_KAFKA_SASL_USERNAME"]
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(user.name, "kafka-user");
        assert_eq!(user.key, "username");
        let props = env["HOLDFAST_KAFKA_PROPERTIES"].value.clone().unwrap();
        assert!(props.contains("sasl.password=$(HOLDFAST_KAFKA_SASL_PASSWORD)"));
        assert!(props.contains("security.protocol=SASL_SSL"));
        // The properties point at the Secret where this Job mounts it.
        assert!(props.contains(&format!("ssl.ca.location={TLS_MOUNT}/ca.crt")));
        assert!(props.contains(&format!("ssl.key.location={TLS_MOUNT}/tls.key")));
        let order: Vec<_> = job
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .env
            .iter()
            .flatten()
            .map(|v| v.name.clone())
            .collect();
        assert!(
            order
                .iter()
                .position(|n| n == "HOLDFAST_KAFKA_SASL_PASSWORD")
                < order.iter().position(|n| n == "HOLDFAST_KAFKA_PROPERTIES"),
            "{order:?}"
        );
        let pod = job.spec.unwrap().template.spec.unwrap();
        let tls = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "kafka-tls")
            .unwrap();
        assert_eq!(
            tls.secret.unwrap().secret_name.as_deref(),
            Some("kafka-tls")
        );
    }

    fn job_with(status: serde_json::Value) -> Job {
        serde_json::from_value(json!({"metadata": {"name": "j"}, "status": status})).unwrap()
    }

    #[test]
    fn reads_the_state_and_duration_of_a_job() {
        assert_eq!(job_state(&job_with(json!({"active": 1}))), JobState::Active);
        let done = job_with(json!({
            "succeeded": 1,
            "startTime": "2026-01-01T00:00:00Z",
            "completionTime": "2026-01-01T00:00:07Z",
            "conditions": [{"type": "Complete", "status": "True"}],
        }));
        assert_eq!(job_state(&done), JobState::Succeeded);
        assert_eq!(job_duration(&done), Some(std::time::Duration::from_secs(7)));
        let failed = job_with(json!({
            "failed": 2,
            "startTime": "2026-01-01T00:00:00Z",
            "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
                "lastTransitionTime": "2026-01-01T00:01:00Z"}],
        }));
        assert_eq!(job_state(&failed), JobState::Failed);
        assert_eq!(
            job_duration(&failed),
            Some(std::time::Duration::from_secs(60))
        );
        assert!(job_failure(&failed).starts_with("BackoffLimitExceeded"));
    }
}
