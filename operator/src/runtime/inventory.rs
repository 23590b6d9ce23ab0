//! Lists what the orphan classifier ([`crate::classify`]) looks at, for
//! recovery and for status alike (one definition of an orphan): everything
//! of a namespace for recovery ([`inventory`]), one cluster's objects for
//! its status ([`cluster_inventory`]).

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use super::{Result, api_err, scoped};
use crate::api::{CLUSTER_LABEL, COMPONENT_LABEL, CaptureCluster, NAMESPACE_LABEL};
use crate::classify::Inventory;
use crate::flush::FLUSH_COMPONENT;

/// Lists the CaptureClusters, StatefulSets, claims, pods and flush Jobs of
/// `namespace` (all when `None`) and the PVs labelled for them.
pub async fn inventory(client: &Client, namespace: Option<&str>) -> Result<Inventory> {
    list(client, namespace, None).await
}

/// The same for cluster `name` in `namespace` only: its own objects (all
/// labelled [`CLUSTER_LABEL`]` = name`), so the status of one cluster costs
/// requests the size of that cluster, not of the namespace or the fleet
/// (the classifier judges each claim and PV by its own cluster's objects,
/// so its findings for this cluster are the same).
pub async fn cluster_inventory(client: &Client, namespace: &str, name: &str) -> Result<Inventory> {
    list(client, Some(namespace), Some(name)).await
}

async fn list(
    client: &Client,
    namespace: Option<&str>,
    cluster: Option<&str>,
) -> Result<Inventory> {
    let labelled = ListParams::default().labels(&cluster.map_or_else(
        || CLUSTER_LABEL.to_string(),
        |c| format!("{CLUSTER_LABEL}={c}"),
    ));
    let flush_jobs = ListParams::default().labels(&cluster.map_or_else(
        || format!("{COMPONENT_LABEL}={FLUSH_COMPONENT}"),
        |c| format!("{COMPONENT_LABEL}={FLUSH_COMPONENT},{CLUSTER_LABEL}={c}"),
    ));
    let clusters_params = cluster.map_or_else(ListParams::default, |c| {
        ListParams::default().fields(&format!("metadata.name={c}"))
    });
    let clusters = scoped::<CaptureCluster>(client, namespace)
        .list(&clusters_params)
        .await
        .map_err(api_err("list captureclusters"))?
        .items;
    let claims = scoped::<PersistentVolumeClaim>(client, namespace)
        .list(&labelled)
        .await
        .map_err(api_err("list claims"))?
        .items;
    let pods = scoped::<Pod>(client, namespace)
        .list(&labelled)
        .await
        .map_err(api_err("list pods"))?
        .items;
    let jobs = scoped::<Job>(client, namespace)
        .list(&flush_jobs)
        .await
        .map_err(api_err("list flush jobs"))?
        .items;
    let volume_params = match (namespace, cluster) {
        (Some(ns), Some(c)) => {
            ListParams::default().labels(&format!("{CLUSTER_LABEL}={c},{NAMESPACE_LABEL}={ns}"))
        }
        _ => labelled.clone(),
    };
    let mut volumes = Api::<PersistentVolume>::all(client.clone())
        .list(&volume_params)
        .await
        .map_err(api_err("list volumes"))?
        .items;
    if let Some(ns) = namespace {
        volumes.retain(|pv| pv.labels().get(NAMESPACE_LABEL).map(String::as_str) == Some(ns));
    }
    let statefulsets = scoped::<StatefulSet>(client, namespace)
        .list(&labelled)
        .await
        .map_err(api_err("list statefulsets"))?
        .items;
    Ok(Inventory {
        statefulsets,
        clusters,
        claims,
        volumes,
        pods,
        jobs,
    })
}
