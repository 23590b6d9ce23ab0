//! The `CaptureCluster` custom resource (`holdfast.dev/v1alpha1`), and the
//! labels, annotations and names every other module and the capture pods
//! agree on.
//!
//! The schema carries what the API server can check by itself (required
//! fields, enums, minimums, patterns, and the CEL rules of [`cel`]:
//! cross-field checks, quantities, reserved Kafka properties, immutable
//! storage fields), so `kubectl apply` refuses a bad spec at once;
//! [`CaptureClusterSpec::validate`] checks it all again and names the
//! offending field, so the reconciler can refuse a spec (stored before a
//! rule existed, or one CEL cannot express) without applying anything.
//!
//! `spec.replicas` is also the `scale` subresource (`kubectl scale`,
//! HorizontalPodAutoscaler): `status.replicas` counts the StatefulSet's pods
//! and `status.selector` selects them. Scaling down is safe: orphaned
//! volumes are drained.
//!
//! Contract with the capture pod (orphan recovery builds on it): a PV whose
//! annotation [`CLEAN_ANNOTATION`] is `"true"` holds no events. The pod sets
//! it after a clean drain, and clears it before it accepts events again; the
//! operator keeps every other PV bound to a Holdfast claim at reclaim policy
//! `Retain`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod cel;
mod validate;

pub use validate::{InvalidSpec, quantity_bytes};

/// API group of Holdfast's resources.
pub const GROUP: &str = "holdfast.dev";
/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "holdfast-operator";
/// Finalizer on a CaptureCluster: its volumes are drained before it goes.
pub const FINALIZER: &str = "holdfast.dev/drain";

/// Label: the CaptureCluster an object (pod, claim, PV) belongs to.
pub const CLUSTER_LABEL: &str = "holdfast.dev/cluster";
/// Label on a PV: the name of the claim it was bound to.
pub const CLAIM_LABEL: &str = "holdfast.dev/claim";
/// Label on a PV: the namespace of the claim it was bound to.
pub const NAMESPACE_LABEL: &str = "holdfast.dev/namespace";
/// Label: which part of Holdfast an object is (`capture`).
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Label: the application (`holdfast`).
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// Label: the tool managing the object (`holdfast-operator`).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Label on a PV: the uid of the CaptureCluster instance whose claim it was
/// first bound to. A cluster recreated under the same name is another
/// instance: it drains such a volume only when it opts in
/// (`spec.orphanRecovery.adoptPreviousVolumes`).
pub const CLUSTER_UID_LABEL: &str = "holdfast.dev/cluster-uid";
/// [`CLUSTER_UID_LABEL`] of a volume whose instance is not known (found
/// through its `claimRef` and older than the cluster): treated as another
/// instance's.
pub const UNKNOWN_INSTANCE: &str = "unknown";
/// Annotation on a PV: `"true"` once its buffer was seen empty (clean drain).
pub const CLEAN_ANNOTATION: &str = "holdfast.dev/clean";

/// Default name of the ClusterRole that lets capture pods read and patch
/// PersistentVolumes (`rbac/capture-clusterrole.yaml`, shipped by the chart;
/// an admission policy narrows it to their own volume). The operator binds it
/// per CaptureCluster.
pub const CAPTURE_CLUSTER_ROLE: &str = "holdfast-capture";

/// Name of the volumeClaimTemplate (claims are `buffer-<pod>`).
pub const BUFFER_VOLUME: &str = "buffer";
/// Where the buffer volume is mounted in a capture pod.
pub const BUFFER_MOUNT_PATH: &str = "/var/lib/holdfast";
/// The capture pod's HTTP port (events, probes, metrics).
pub const HTTP_PORT: i32 = 8080;

/// A set of capture pods with their buffers, Services and RBAC.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "holdfast.dev",
    version = "v1alpha1",
    kind = "CaptureCluster",
    doc = "A set of Holdfast capture pods: HTTP in, a durable buffer on a retained volume per pod, Kafka out.",
    plural = "captureclusters",
    shortname = "hfc",
    namespaced,
    status = "CaptureClusterStatus",
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Orphans","type":"integer","jsonPath":".status.orphanedVolumes"}"#,
    printcolumn = r#"{"name":"Stuck","type":"string","jsonPath":".status.conditions[?(@.type==\"OrphansStuck\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    validation = cel::name_rule()
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = cel::spec_rules)]
pub struct CaptureClusterSpec {
    /// Number of capture pods.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// Container image holding `holdfast-capture`.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Pull policy of the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// Resource requests and limits of the capture container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels a capture pod must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of the capture pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Affinity of the capture pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of the capture pods (and of their flush Jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// How the capture pods spread over zones or nodes. A constraint
    /// without `labelSelector` selects this cluster's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// Secrets for pulling the image (capture pods and flush Jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
    /// Where and how events are delivered.
    pub kafka: KafkaSpec,
    /// Streams (name → topic, mode); empty means one stream `default` to topic `events`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(transform = cel::streams_list)]
    pub streams: Vec<StreamSpec>,
    /// Stream of `POST /v1/events`; defaults to the first stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 249))]
    pub default_stream: Option<String>,
    /// JSON pointer (e.g. `/user/id`) for the partition key of events without `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"))]
    pub partition_key_pointer: Option<String>,
    /// The buffer volume of each pod.
    pub storage: StorageSpec,
    /// `fsync` (default: a 200 survives power loss) or `os` (no fsync).
    #[serde(default)]
    pub durability: Durability,
    /// Secret with accepted bearer tokens (one per line); unset: no auth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret: Option<SecretKeyRef>,
    /// Termination grace period of a capture pod; the pod drains into Kafka
    /// for this long less a margin (see [`drain_timeout_secs`]).
    #[serde(default = "default_grace")]
    #[schemars(range(min = 10))]
    pub shutdown_grace_period_seconds: i64,
    /// Draining of volumes left without a pod.
    #[serde(default)]
    pub orphan_recovery: OrphanRecoverySpec,
}

fn default_replicas() -> i32 {
    1
}

fn default_grace() -> i64 {
    60
}

/// Image pull policy.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ImagePullPolicy {
    /// Always pull.
    Always,
    /// Pull when the node lacks it.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl ImagePullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Kafka settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = cel::kafka_rules)]
pub struct KafkaSpec {
    /// Bootstrap servers, `host:port[,host:port...]`.
    #[schemars(length(min = 1))]
    pub bootstrap_servers: String,
    /// librdkafka producer properties (they win over Holdfast's defaults).
    /// Secrets do not belong here: use `tls` and `sasl`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
    /// TLS to the brokers, with certificates from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<KafkaTls>,
    /// SASL authentication, with credentials from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<KafkaSasl>,
    /// Exactly-once delivery (transactional producer, checkpoint topic).
    #[serde(default)]
    pub exactly_once: bool,
    /// Also copy dead letters to this topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
}

/// TLS material for Kafka, from one Secret mounted in the pod.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = cel::tls_rules)]
pub struct KafkaTls {
    /// Secret in the CaptureCluster's namespace.
    #[schemars(length(min = 1))]
    pub secret_name: String,
    /// Key of the CA certificate (PEM).
    #[serde(default = "default_ca_key")]
    pub ca_key: String,
    /// Key of the client certificate (PEM), for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_key: Option<String>,
    /// Key of the client private key (PEM), for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_key: Option<String>,
}

fn default_ca_key() -> String {
    "ca.crt".into()
}

/// SASL credentials for Kafka, from a Secret (passed as environment).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSasl {
    /// SASL mechanism.
    pub mechanism: SaslMechanism,
    /// Secret in the CaptureCluster's namespace.
    #[schemars(length(min = 1))]
    pub secret_name: String,
    /// Key of the user name.
    #[serde(default = "default_username_key")]
    pub username_key: String,
    /// Key of the password.
    #[serde(default = "default_password_key")]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}

fn default_password_key() -> String {
    "password".into()
}

/// SASL mechanisms librdkafka supports with a user name and password.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SaslMechanism {
    /// PLAIN.
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM-SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM-SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// One stream: a name clients post to, the topic it feeds, how it is delivered.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamSpec {
    /// Stream name (`POST /v1/events/{name}`).
    #[schemars(regex(pattern = r"^[A-Za-z0-9._-]{1,249}$"))]
    pub name: String,
    /// Kafka topic.
    #[schemars(regex(pattern = r"^[A-Za-z0-9._-]{1,249}$"))]
    pub topic: String,
    /// `durable` (through the disk buffer) or `direct` (acknowledged by Kafka).
    #[serde(default)]
    pub mode: StreamMode,
}

/// Delivery mode of a stream.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StreamMode {
    /// Buffered on disk; 200 once durable.
    #[default]
    Durable,
    /// Straight to Kafka; 200 once Kafka acknowledged.
    Direct,
}

impl StreamMode {
    /// The capture flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Durable => "durable",
            Self::Direct => "direct",
        }
    }
}

/// The buffer volume of each pod.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = cel::storage_rules)]
pub struct StorageSpec {
    /// Size of each pod's claim (a quantity, e.g. `10Gi`).
    pub size: Quantity,
    /// StorageClass of the claims; unset: the cluster default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Event bytes a buffer may hold before the pod answers 503; default:
    /// 80 % of `size`. Must be below `size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub buffer_quota_bytes: Option<u64>,
    /// Access mode of the claims: `ReadWriteOnce` (default; any storage) or
    /// `ReadWriteOncePod` (CSI storage only: the volume can be mounted by one
    /// pod at a time, so a flush Job and a returning pod can never share it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<AccessMode>,
}

/// Access mode of the buffer claims.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AccessMode {
    /// One node at a time (several pods on that node could mount it).
    #[default]
    ReadWriteOnce,
    /// One pod at a time (CSI volumes only).
    ReadWriteOncePod,
}

impl AccessMode {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadWriteOnce => "ReadWriteOnce",
            Self::ReadWriteOncePod => "ReadWriteOncePod",
        }
    }
}

/// Durability of a `200` on a durable stream.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync before answering: survives power loss.
    #[default]
    Fsync,
    /// Written to the OS only: survives a crash of the process, not of the node.
    Os,
}

impl Durability {
    /// The capture flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fsync => "fsync",
            Self::Os => "os",
        }
    }
}

/// A key of a Secret in the CaptureCluster's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key in the Secret.
    #[serde(default = "default_tokens_key")]
    pub key: String,
}

fn default_tokens_key() -> String {
    "tokens".into()
}

/// How volumes left without a pod are drained (orphan recovery).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrphanRecoverySpec {
    /// Drain orphaned volumes with flush Jobs.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How long a volume must be without a pod before a flush Job starts.
    /// Default 0: an orphan's pod will not come back (its ordinal is scaled
    /// away, its cluster or claim deleted), so waiting only delays delivery;
    /// a pod that does return takes over from the Job.
    #[serde(default = "default_orphan_delay")]
    #[schemars(range(min = 0))]
    pub delay_seconds: u32,
    /// Flush Jobs of this cluster running at once.
    #[serde(default = "default_parallel_jobs")]
    #[schemars(range(min = 1))]
    pub max_parallel_flush_jobs: u32,
    /// Drain volumes left by a previous instance of this cluster (a
    /// CaptureCluster deleted and recreated under the same name) into this
    /// cluster's Kafka. Off by default: such volumes stay `Retain` and are
    /// reported, since the new instance may deliver elsewhere.
    #[serde(default)]
    pub adopt_previous_volumes: bool,
}

impl Default for OrphanRecoverySpec {
    fn default() -> Self {
        Self {
            enabled: true,
            delay_seconds: default_orphan_delay(),
            max_parallel_flush_jobs: default_parallel_jobs(),
            adopt_previous_volumes: false,
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_orphan_delay() -> u32 {
    0
}

fn default_parallel_jobs() -> u32 {
    2
}

/// What the operator last saw and did.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaptureClusterStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Capture pods that pass their readiness probe.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Capture pods the StatefulSet has (the `scale` subresource's status).
    #[serde(default)]
    pub replicas: i32,
    /// Label selector of the capture pods, as a string (the `scale`
    /// subresource's selector, for HorizontalPodAutoscalers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Standard conditions: `Ready`, `SpecValid`, `Draining`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Volumes of this cluster without a pod that still hold events.
    #[serde(default)]
    pub orphaned_volumes: i32,
    /// Flush Jobs draining this cluster's orphaned volumes now.
    #[serde(default)]
    pub active_flush_jobs: i32,
    /// Where each orphaned volume that may hold events stands.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeRecoveryStatus>,
}

/// Where one orphaned volume's recovery stands (`status.volumes`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRecoveryStatus {
    /// The PV (or `claim/<name>` for a claim without one).
    pub volume: String,
    /// The claim a flush Job mounts.
    pub claim: String,
    /// `claim-without-pod` or `released-volume`.
    pub kind: String,
    /// `Pending`, `Draining`, `Retrying`, `Waiting`, `Drained` or `Stuck`.
    pub phase: String,
    /// Why it is in that phase, and for `Stuck` what unblocks it.
    pub reason: String,
    /// Flush Jobs that failed on it in a row.
    #[serde(default)]
    pub failures: u32,
    /// When the next flush Job may start (after failures), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry: Option<String>,
}

/// Condition type: every pod is ready and the spec is applied.
pub const CONDITION_READY: &str = "Ready";
/// Condition type: the spec passed validation (False names the field).
pub const CONDITION_SPEC_VALID: &str = "SpecValid";
/// Condition type: the cluster is being deleted and its volumes drained.
pub const CONDITION_DRAINING: &str = "Draining";
/// Condition type: orphaned volumes are being drained.
pub const CONDITION_ORPHANS_RECOVERING: &str = "OrphansRecovering";
/// Condition type: an orphaned volume cannot be drained without a human
/// (True names the volumes and why), or its flush Jobs keep failing.
pub const CONDITION_ORPHANS_STUCK: &str = "OrphansStuck";

/// Kafka properties the operator sets itself (or that exactly-once mode
/// derives from the volume); a spec may not override them.
pub const RESERVED_KAFKA_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "transactional.id",
    "sasl.username",
    "sasl.password",
    "ssl.key.password",
];

/// The longest CaptureCluster name: pods are `<name>-<ordinal>` and their
/// claims `buffer-<name>-<ordinal>`, and StatefulSet pods carry a
/// `controller-revision-hash` label of `<name>-<hash>` (63 characters at most).
pub const MAX_NAME_LEN: usize = 42;

/// The drain deadline a pod gets: the grace period less a margin of a tenth
/// (at least 5 s) for the process to mark its volume and exit.
pub fn drain_timeout_secs(grace: i64) -> i64 {
    let margin = (grace / 10).max(5);
    (grace - margin).max(1)
}

impl CaptureClusterSpec {
    /// The streams the pods serve (the spec's, or `default` → `events`).
    pub fn effective_streams(&self) -> Vec<StreamSpec> {
        if self.streams.is_empty() {
            vec![StreamSpec {
                name: "default".into(),
                topic: "events".into(),
                mode: StreamMode::Durable,
            }]
        } else {
            self.streams.clone()
        }
    }

    /// The stream of `POST /v1/events`.
    pub fn effective_default_stream(&self) -> String {
        self.default_stream
            .clone()
            .or_else(|| self.effective_streams().first().map(|s| s.name.clone()))
            .unwrap_or_else(|| "default".into())
    }

    /// Size of each claim in bytes (validated by [`Self::validate`]).
    pub fn storage_bytes(&self) -> Option<u64> {
        quantity_bytes(&self.storage.size)
    }

    /// The buffer quota: the spec's, else 80 % of the claim size.
    pub fn buffer_quota_bytes(&self) -> u64 {
        self.storage
            .buffer_quota_bytes
            .unwrap_or_else(|| self.storage_bytes().unwrap_or(1 << 30) / 10 * 8)
    }
}

#[cfg(test)]
mod tests;
