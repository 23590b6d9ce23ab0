//! Test storage: the StorageClass [`STORAGE_CLASS`] and a provisioner that
//! plays the role a CSI driver or local-static-provisioner plays in a real
//! cluster.
//!
//! - The class uses `volumeBindingMode: WaitForFirstConsumer`: the scheduler
//!   picks the node first and writes it into the claim's
//!   `volume.kubernetes.io/selected-node` annotation, so the volume is made on
//!   the node that will run the pod (how local volumes work in production).
//!   Its `reclaimPolicy` is `Delete`, so a volume is kept only when someone
//!   flips it to `Retain` (as the capture pod and the operator do).
//! - For each pending claim of a class whose provisioner is [`PROVISIONER`],
//!   it creates a directory `<volumes>/pvc-<claim uid>` and a `local` PV with
//!   node affinity to the selected node, pre-bound to the claim (`claimRef`
//!   with the claim's uid); the PV controller completes the binding.
//! - A `Released` (or `Failed`) PV of ours whose policy is `Delete` has its
//!   directory removed and is then deleted. The PV controller leaves such PVs
//!   alone because `pv.kubernetes.io/provisioned-by` names an external
//!   provisioner.
//!
//! - The class [`NETWORK_STORAGE_CLASS`] (same provisioner) plays network
//!   storage (a cloud disk that can attach on any node): its PVs are
//!   `hostPath` directories with no node affinity, so a volume whose node
//!   is lost can be mounted on another node (what the out-of-service taint
//!   allows in production).
//!
//! It is level-triggered: every watch event on claims or volumes, and a tick
//! every two seconds, reconciles everything, so a missed event or a failed
//! request only delays the work.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, LocalVolumeSource, Node, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeSpec, VolumeNodeAffinity,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The provisioner name of the test StorageClass.
pub const PROVISIONER: &str = "holdfast.dev/test-hostpath";
/// The test StorageClass (also the cluster's default class).
pub const STORAGE_CLASS: &str = "holdfast-test";
/// A second class of the same provisioner whose volumes attach anywhere
/// (network storage): no node affinity.
pub const NETWORK_STORAGE_CLASS: &str = "holdfast-test-network";
/// StorageClass parameter naming the topology of its volumes.
const TOPOLOGY_PARAMETER: &str = "topology";
/// Annotation naming the provisioner of a PV.
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// Annotation the PV controller puts on claims an external provisioner must serve.
const STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
const STORAGE_PROVISIONER_BETA: &str = "volume.beta.kubernetes.io/storage-provisioner";
/// Annotation the scheduler puts on a WaitForFirstConsumer claim.
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// The node label local PVs are pinned by.
const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// Errors of the provisioner.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request failed.
    #[error("{what}: {source}")]
    Api {
        /// What was attempted.
        what: String,
        /// Why.
        source: kube::Error,
    },
    /// A volume directory could not be made or removed.
    #[error("volume directory {path}: {source}")]
    Io {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Api { what, source }
}

/// The test StorageClass: WaitForFirstConsumer, reclaim `Delete`, default.
pub fn build_storage_class() -> StorageClass {
    StorageClass {
        metadata: ObjectMeta {
            name: Some(STORAGE_CLASS.into()),
            annotations: Some(BTreeMap::from([(
                "storageclass.kubernetes.io/is-default-class".to_string(),
                "true".to_string(),
            )])),
            ..Default::default()
        },
        provisioner: PROVISIONER.into(),
        reclaim_policy: Some("Delete".into()),
        volume_binding_mode: Some("WaitForFirstConsumer".into()),
        allow_volume_expansion: Some(false),
        ..Default::default()
    }
}

/// The network StorageClass: like the default one, but its volumes have
/// no node affinity (not the default class).
pub fn build_network_storage_class() -> StorageClass {
    StorageClass {
        metadata: ObjectMeta {
            name: Some(NETWORK_STORAGE_CLASS.into()),
            ..Default::default()
        },
        parameters: Some(BTreeMap::from([(
            TOPOLOGY_PARAMETER.to_string(),
            "network".to_string(),
        )])),
        ..build_storage_class()
    }
}

/// Creates the test StorageClasses unless they exist.
pub async fn ensure_storage_class(client: &Client) -> Result<()> {
    let classes: Api<StorageClass> = Api::all(client.clone());
    for class in [build_storage_class(), build_network_storage_class()] {
        match classes.create(&PostParams::default(), &class).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(api("create storage class")(e)),
        }
    }
    Ok(())
}

/// The running provisioner; stops when dropped.
#[derive(Debug)]
pub struct Provisioner {
    tasks: Vec<JoinHandle<()>>,
}

impl Provisioner {
    /// Starts provisioning into `volumes` (a host directory). Must run inside
    /// the runtime that should own the tasks.
    pub fn start(client: Client, volumes: PathBuf) -> Self {
        let wake = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        {
            let wake = wake.clone();
            let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
            tasks.push(tokio::spawn(async move {
                let mut stream = watcher(claims, watcher::Config::default())
                    .default_backoff()
                    .boxed();
                while stream.next().await.is_some() {
                    wake.notify_one();
                }
            }));
        }
        {
            let wake = wake.clone();
            let pvs: Api<PersistentVolume> = Api::all(client.clone());
            tasks.push(tokio::spawn(async move {
                let mut stream = watcher(pvs, watcher::Config::default())
                    .default_backoff()
                    .boxed();
                while stream.next().await.is_some() {
                    wake.notify_one();
                }
            }));
        }
        tasks.push(tokio::spawn(async move {
            loop {
                if let Err(e) = reconcile(&client, &volumes).await {
                    tracing::warn!(error = %e, "provisioner pass failed");
                }
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }));
        Self { tasks }
    }
}

impl Drop for Provisioner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One level-triggered pass: provision pending claims, delete released
/// volumes whose policy is `Delete`.
async fn reconcile(client: &Client, volumes: &Path) -> Result<()> {
    let classes: BTreeMap<String, StorageClass> = Api::<StorageClass>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api("list storage classes"))?
        .into_iter()
        .filter(|c| c.provisioner == PROVISIONER)
        .map(|c| (c.name_any(), c))
        .collect();
    let claims = Api::<PersistentVolumeClaim>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api("list claims"))?;
    for claim in claims {
        if let Some(pv) = build_volume_for(&claim, &classes, volumes, client).await? {
            let path = volume_path(&pv).unwrap_or_default();
            std::fs::create_dir_all(&path).map_err(|source| Error::Io {
                path: path.display().to_string(),
                source,
            })?;
            let name = pv.name_any();
            match Api::<PersistentVolume>::all(client.clone())
                .create(&PostParams::default(), &pv)
                .await
            {
                Ok(_) => {
                    tracing::info!(pv = %name, claim = %claim.name_any(), "provisioned volume")
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(api(format!("create volume {name}"))(e)),
            }
        }
    }
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    for pv in pvs
        .list(&ListParams::default())
        .await
        .map_err(api("list volumes"))?
    {
        let ours = pv.annotations().get(PROVISIONED_BY).map(String::as_str) == Some(PROVISIONER);
        let spec = pv.spec.clone().unwrap_or_default();
        let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
        let delete = spec.persistent_volume_reclaim_policy.as_deref() == Some("Delete");
        if !ours
            || !delete
            || pv.metadata.deletion_timestamp.is_some()
            || !matches!(phase, Some("Released" | "Failed"))
        {
            continue;
        }
        if let Some(path) = volume_path(&pv)
            && path.starts_with(volumes)
        {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Io {
                        path: path.display().to_string(),
                        source,
                    });
                }
            }
        }
        let name = pv.name_any();
        match pvs.delete(&name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(pv = %name, "deleted released volume and its directory"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(api(format!("delete volume {name}"))(e)),
        }
    }
    Ok(())
}

/// The host directory behind a PV of ours.
pub fn volume_path(pv: &PersistentVolume) -> Option<PathBuf> {
    let spec = pv.spec.as_ref()?;
    spec.local
        .as_ref()
        .map(|l| PathBuf::from(&l.path))
        .or_else(|| spec.host_path.as_ref().map(|h| PathBuf::from(&h.path)))
}

/// The PV to create for `claim`, or `None` when the claim is not ours or not
/// ready to be provisioned.
async fn build_volume_for(
    claim: &PersistentVolumeClaim,
    classes: &BTreeMap<String, StorageClass>,
    volumes: &Path,
    client: &Client,
) -> Result<Option<PersistentVolume>> {
    let annotations = claim.annotations();
    let requested = annotations
        .get(STORAGE_PROVISIONER)
        .or_else(|| annotations.get(STORAGE_PROVISIONER_BETA))
        .map(String::as_str);
    let spec = claim.spec.clone().unwrap_or_default();
    let pending = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending");
    if requested != Some(PROVISIONER)
        || spec.volume_name.is_some()
        || !pending
        || claim.metadata.deletion_timestamp.is_some()
    {
        return Ok(None);
    }
    let Some(class) = spec
        .storage_class_name
        .as_ref()
        .and_then(|name| classes.get(name))
    else {
        return Ok(None);
    };
    let node = match annotations.get(SELECTED_NODE) {
        Some(node) => node.clone(),
        None if class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer") => {
            return Ok(None);
        }
        // Immediate binding: any node will do; take the first.
        None => match Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(api("list nodes"))?
            .items
            .first()
        {
            Some(node) => node.name_any(),
            None => return Ok(None),
        },
    };
    let Some(uid) = claim.uid() else {
        return Ok(None);
    };
    let name = format!("pvc-{uid}");
    let storage = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .cloned();
    let network = class
        .parameters
        .as_ref()
        .and_then(|p| p.get(TOPOLOGY_PARAMETER))
        .is_some_and(|t| t == "network");
    let path = volumes.join(&name).display().to_string();
    Ok(Some(PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            annotations: Some(BTreeMap::from([(
                PROVISIONED_BY.to_string(),
                PROVISIONER.to_string(),
            )])),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: storage.map(|s| BTreeMap::from([("storage".to_string(), s)])),
            access_modes: spec.access_modes.clone(),
            persistent_volume_reclaim_policy: Some(
                class
                    .reclaim_policy
                    .clone()
                    .unwrap_or_else(|| "Delete".into()),
            ),
            storage_class_name: Some(class.name_any()),
            volume_mode: spec.volume_mode.clone(),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: claim.namespace(),
                name: Some(claim.name_any()),
                uid: Some(uid.clone()),
                ..Default::default()
            }),
            local: (!network).then(|| LocalVolumeSource {
                path: path.clone(),
                fs_type: None,
            }),
            host_path: network.then(|| HostPathVolumeSource {
                path: path.clone(),
                type_: None,
            }),
            node_affinity: (!network).then(|| VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: HOSTNAME_LABEL.into(),
                            operator: "In".into(),
                            values: Some(vec![node]),
                        }]),
                        ..Default::default()
                    }],
                }),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }))
}
