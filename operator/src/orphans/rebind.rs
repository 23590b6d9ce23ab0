//! Race-free rebinding of a `Released` PV to a new claim, so a flush Job
//! can mount it (pure builders).
//!
//! The PV's `claimRef` is set to the new claim's namespace and name without
//! a uid (pre-binding: the PV controller binds it to that claim and to no
//! other), and the claim names the PV in `volumeName`, with the PV's storage
//! class (`""` when it has none, so no default class is filled in), access
//! modes and capacity.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use serde_json::{Value, json};

use crate::api::CaptureCluster;

use crate::flush::{VOLUME_ANNOTATION, flush_labels};
pub use crate::flush::{pre_bound_to, recovery_claim_name};

/// The merge patch that pre-binds `volume` to claim `namespace/claim`: the
/// old claim's uid and resourceVersion are cleared, and the PV's own
/// resourceVersion makes the patch fail (409) if the PV changed since it was
/// read, rather than steal a volume someone else just bound.
pub fn build_claim_ref_patch(volume: &PersistentVolume, namespace: &str, claim: &str) -> Value {
    json!({
        "metadata": {"resourceVersion": volume.resource_version()},
        "spec": {"claimRef": {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "namespace": namespace,
            "name": claim,
            "uid": null,
            "resourceVersion": null,
        }},
    })
}

/// The claim that takes over a Released PV for its flush Job, labelled as a
/// flush object of the cluster; not owned by it, so deleting the cluster
/// (foreground cascade) cannot pull it from under a draining Job. The
/// operator deletes it once the volume is drained.
pub fn build_recovery_claim(
    cluster: &CaptureCluster,
    volume: &PersistentVolume,
) -> PersistentVolumeClaim {
    let pv_spec = volume.spec.clone().unwrap_or_default();
    let capacity = pv_spec
        .capacity
        .as_ref()
        .and_then(|c| c.get("storage"))
        .cloned();
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(recovery_claim_name(&volume.name_any())),
            namespace: cluster.namespace(),
            labels: Some(flush_labels(&cluster.name_any())),
            annotations: Some(BTreeMap::from([(
                VOLUME_ANNOTATION.to_string(),
                volume.name_any(),
            )])),
            // Not owned by the cluster: its deletion must not take the
            // claim a flush Job drains through (the operator deletes it).
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: pv_spec
                .access_modes
                .clone()
                .or_else(|| Some(vec!["ReadWriteOnce".into()])),
            storage_class_name: Some(pv_spec.storage_class_name.clone().unwrap_or_default()),
            volume_mode: pv_spec.volume_mode.clone(),
            volume_name: Some(volume.name_any()),
            resources: capacity.map(|size| VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), size)])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CLUSTER_LABEL, COMPONENT_LABEL};
    use crate::orphans::FLUSH_COMPONENT;

    fn released(class: Option<&str>) -> PersistentVolume {
        serde_json::from_value(json!({
            "metadata": {"name": "pvc-abc", "resourceVersion": "42"},
            "spec": {
                "capacity": {"storage": "64Mi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": class,
                "persistentVolumeReclaimPolicy": "Retain",
                "claimRef": {"kind": "PersistentVolumeClaim", "namespace": "ns",
                    "name": "buffer-events-0", "uid": "old-uid", "resourceVersion": "7"},
            },
            "status": {"phase": "Released"},
        }))
        .unwrap()
    }

    fn cluster() -> CaptureCluster {
        crate::orphans::job::tests::cluster(json!({}))
    }

    #[test]
    fn claim_ref_patch_names_the_new_claim_without_a_uid_guarded_by_resource_version() {
        let patch = build_claim_ref_patch(&released(None), "ns", "hf-recover-pvc-abc");
        let r = &patch["spec"]["claimRef"];
        assert_eq!(r["namespace"], "ns");
        assert_eq!(r["name"], "hf-recover-pvc-abc");
        assert!(r["uid"].is_null() && r.as_object().unwrap().contains_key("uid"));
        assert!(r["resourceVersion"].is_null());
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        assert!(!pre_bound_to(&released(None), "ns", "hf-recover-pvc-abc"));
        assert!(pre_bound_to(&released(None), "ns", "buffer-events-0"));
    }

    #[test]
    fn recovery_claim_matches_the_volume_class_modes_and_size() {
        let claim = build_recovery_claim(&cluster(), &released(Some("holdfast-test")));
        assert_eq!(claim.metadata.name.as_deref(), Some("hf-recover-pvc-abc"));
        assert_eq!(claim.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(claim.labels()[COMPONENT_LABEL], FLUSH_COMPONENT);
        assert_eq!(claim.labels()[CLUSTER_LABEL], "events");
        let spec = claim.spec.unwrap();
        assert_eq!(spec.volume_name.as_deref(), Some("pvc-abc"));
        assert_eq!(spec.storage_class_name.as_deref(), Some("holdfast-test"));
        assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_string()]));
        assert_eq!(
            spec.resources.unwrap().requests.unwrap()["storage"].0,
            "64Mi"
        );
    }

    #[test]
    fn recovery_claim_of_a_classless_volume_asks_for_no_class() {
        let claim = build_recovery_claim(&cluster(), &released(None));
        // "" (not absent), or the default class would be filled in and the
        // claim could never bind to this volume.
        assert_eq!(claim.spec.unwrap().storage_class_name.as_deref(), Some(""));
    }
}
