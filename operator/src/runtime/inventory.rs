//! Lists what the orphan classifier ([`crate::classify`]) looks at, for
//! recovery and for status alike (one definition of an orphan).

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
    let labelled = ListParams::default().labels(CLUSTER_LABEL);
    let clusters = scoped::<CaptureCluster>(client, namespace)
        .list(&ListParams::default())
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
        .list(&ListParams::default().labels(&format!("{COMPONENT_LABEL}={FLUSH_COMPONENT}")))
        .await
        .map_err(api_err("list flush jobs"))?
        .items;
    let mut volumes = Api::<PersistentVolume>::all(client.clone())
        .list(&labelled)
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
