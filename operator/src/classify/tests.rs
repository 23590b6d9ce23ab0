use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::api::CLAIM_LABEL;
use crate::flush::flush_labels;

fn cluster(name: &str, replicas: i32, recovery: Value) -> CaptureCluster {
    let mut c: CaptureCluster = serde_json::from_value(json!({
        "apiVersion": "holdfast.dev/v1alpha1",
        "kind": "CaptureCluster",
        "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")},
        "spec": {
            "replicas": replicas,
            "image": "holdfast/capture:dev",
            "kafka": {"bootstrapServers": "kafka:9092"},
            "storage": {"size": "1Gi"},
            "orphanRecovery": recovery,
        },
    }))
    .unwrap();
    c.metadata.namespace = Some("ns".into());
    c
}

fn claim(name: &str, volume: Option<&str>) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
            "labels": {CLUSTER_LABEL: "events", COMPONENT_LABEL: "capture"}},
        "spec": {"volumeName": volume},
        "status": {"phase": if volume.is_some() { "Bound" } else { "Pending" }},
    }))
    .unwrap()
}

fn recovery_claim(volume: &str) -> PersistentVolumeClaim {
    let mut c = claim(&recovery_claim_name(volume), Some(volume));
    c.metadata.labels = Some(flush_labels("events"));
    c
}

fn pv(name: &str, phase: &str, annotations: Value) -> PersistentVolume {
    serde_json::from_value(json!({
        "metadata": {"name": name, "resourceVersion": "1", "annotations": annotations,
            "labels": {CLUSTER_LABEL: "events", NAMESPACE_LABEL: "ns", CLAIM_LABEL: "x"}},
        "spec": {"persistentVolumeReclaimPolicy": "Retain",
            "claimRef": {"namespace": "ns", "name": "old", "uid": "old-uid"}},
        "status": {"phase": phase},
    }))
    .unwrap()
}

fn pod(name: &str, claim: &str, component: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ns",
            "labels": {CLUSTER_LABEL: "events", COMPONENT_LABEL: component}},
        "spec": {"containers": [], "volumes": [
            {"name": "buffer", "persistentVolumeClaim": {"claimName": claim}}]},
        "status": {"phase": "Running"},
    }))
    .unwrap()
}

fn job(volume: &str, claim: &str, status: Value) -> Job {
    serde_json::from_value(json!({
        "metadata": {"name": flush_job_name(volume), "namespace": "ns",
            "labels": flush_labels("events"),
            "annotations": {CLAIM_ANNOTATION: claim}},
        "status": status,
    }))
    .unwrap()
}

fn names(f: &Findings) -> Vec<(OrphanKind, String, bool)> {
    f.orphans
        .iter()
        .map(|o| (o.kind, o.claim.clone(), o.clean))
        .collect()
}

#[test]
fn reads_claim_ordinals() {
    assert_eq!(claim_ordinal("buffer-events-2", "events"), Some(2));
    assert_eq!(claim_ordinal("buffer-events-a-2", "events-a"), Some(2));
    assert_eq!(claim_ordinal("buffer-events-a-2", "events"), None);
    assert_eq!(claim_ordinal("data-events-2", "events"), None);
}

#[test]
fn scaled_away_claims_without_a_pod_are_orphans_and_wanted_ones_are_not() {
    let inv = Inventory {
        statefulsets: vec![],
        clusters: vec![cluster("events", 2, json!({}))],
        claims: vec![
            claim("buffer-events-0", Some("pv0")),
            // Ordinal 1 is wanted: its pod is only restarting.
            claim("buffer-events-1", Some("pv1")),
            claim("buffer-events-2", Some("pv2")),
            claim("buffer-events-3", Some("pv3")),
            claim("buffer-events-4", None),
        ],
        volumes: vec![
            pv("pv0", "Bound", json!({})),
            pv("pv1", "Bound", json!({})),
            pv("pv2", "Bound", json!({CLEAN_ANNOTATION: "false"})),
            pv("pv3", "Bound", json!({CLEAN_ANNOTATION: "true"})),
        ],
        pods: vec![pod("events-0", "buffer-events-0", "capture")],
        jobs: vec![],
    };
    let f = find(&inv);
    assert_eq!(
        names(&f),
        [
            (OrphanKind::ClaimWithoutPod, "buffer-events-2".into(), false),
            (OrphanKind::ClaimWithoutPod, "buffer-events-3".into(), true),
            // Never bound: holds nothing.
            (OrphanKind::ClaimWithoutPod, "buffer-events-4".into(), true),
        ]
    );
    assert!(f.orphans[0].claim_bound);
    assert!(f.stop.is_empty());
}

#[test]
fn a_scaled_away_pod_still_terminating_keeps_its_claim() {
    let mut terminating = pod("events-1", "buffer-events-1", "capture");
    terminating.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
    );
    let inv = Inventory {
        statefulsets: vec![],
        clusters: vec![cluster("events", 1, json!({}))],
        claims: vec![claim("buffer-events-1", Some("pv1"))],
        volumes: vec![pv("pv1", "Bound", json!({}))],
        pods: vec![terminating],
        jobs: vec![],
    };
    assert!(find(&inv).orphans.is_empty());
}

#[test]
fn every_claim_of_a_deleted_or_deleting_cluster_is_an_orphan() {
    let mut deleting = cluster("events", 3, json!({}));
    deleting.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
    );
    for clusters in [vec![deleting], vec![]] {
        let inv = Inventory {
            statefulsets: vec![],
            clusters,
            claims: vec![claim("buffer-events-0", Some("pv0"))],
            volumes: vec![pv("pv0", "Bound", json!({}))],
            ..Default::default()
        };
        assert_eq!(
            names(&find(&inv)),
            [(OrphanKind::ClaimWithoutPod, "buffer-events-0".into(), false)]
        );
    }
}

#[test]
fn a_released_dirty_volume_is_an_orphan_to_rebind_and_a_clean_deleting_one_is_not() {
    let mut deleting = pv("pv8", "Released", json!({CLEAN_ANNOTATION: "true"}));
    deleting
        .spec
        .as_mut()
        .unwrap()
        .persistent_volume_reclaim_policy = Some("Delete".into());
    let inv = Inventory {
        statefulsets: vec![],
        clusters: vec![cluster("events", 1, json!({}))],
        volumes: vec![
            pv("pv9", "Released", json!({})),
            deleting,
            pv("pv7", "Available", json!({})),
        ],
        ..Default::default()
    };
    let f = find(&inv);
    assert_eq!(
        names(&f),
        [(OrphanKind::ReleasedVolume, "hf-recover-pv9".into(), false)]
    );
    assert!(!f.orphans[0].claim_exists);
}

#[test]
fn a_volume_pre_bound_to_its_recovery_claim_that_does_not_exist_yet_is_still_found() {
    let mut v = pv("pv9", "Available", json!({}));
    let r = v.spec.as_mut().unwrap().claim_ref.as_mut().unwrap();
    r.name = Some("hf-recover-pv9".into());
    r.uid = None;
    let inv = Inventory {
        statefulsets: vec![],
        clusters: vec![cluster("events", 1, json!({}))],
        volumes: vec![v],
        ..Default::default()
    };
    let f = find(&inv);
    assert_eq!(f.orphans.len(), 1);
    assert!(!f.orphans[0].claim_exists);
}

#[test]
fn a_rebound_volume_is_followed_through_its_recovery_claim() {
    let inv = Inventory {
        statefulsets: vec![],
        clusters: vec![cluster("events", 1, json!({}))],
        claims: vec![recovery_claim("pv9")],
        volumes: vec![pv("pv9", "Bound", json!({}))],
        ..Default::default()
    };
    let f = find(&inv);
    assert_eq!(
        names(&f),
        [(OrphanKind::ReleasedVolume, "hf-recover-pv9".into(), false)]
    );
    assert!(f.orphans[0].claim_exists && f.orphans[0].claim_bound);
}

#[test]
fn a_flush_job_is_stopped_when_a_capture_pod_uses_its_claim_again() {
    let inv = Inventory {
        statefulsets: vec![],
        clusters: vec![cluster("events", 2, json!({}))],
        claims: vec![claim("buffer-events-1", Some("pv1"))],
        volumes: vec![pv("pv1", "Bound", json!({}))],
        pods: vec![
            pod("events-1", "buffer-events-1", "capture"),
            pod("hf-flush-pv1-x", "buffer-events-1", FLUSH_COMPONENT),
        ],
        jobs: vec![job("pv1", "buffer-events-1", json!({"active": 1}))],
    };
    let f = find(&inv);
    assert!(f.orphans.is_empty());
    assert_eq!(f.stop.len(), 1);
    assert_eq!(f.stop[0].job, "hf-flush-pv1");
}

#[test]
fn no_second_drainer_while_an_old_flush_pod_still_holds_the_claim() {
    let inv = Inventory {
        statefulsets: vec![],
        clusters: vec![cluster("events", 0, json!({}))],
        claims: vec![claim("buffer-events-0", Some("pv0"))],
        volumes: vec![pv("pv0", "Bound", json!({}))],
        pods: vec![pod("hf-flush-pv0-x", "buffer-events-0", FLUSH_COMPONENT)],
        jobs: vec![],
    };
    assert!(find(&inv).orphans.is_empty());
}

#[test]
fn a_finished_job_of_a_volume_that_needs_nothing_is_cleared() {
    let inv = Inventory {
        statefulsets: vec![],
        clusters: vec![cluster("events", 1, json!({}))],
        jobs: vec![job("gone", "buffer-events-5", json!({"succeeded": 1}))],
        ..Default::default()
    };
    let f = find(&inv);
    assert_eq!(f.stop.len(), 1);
    assert_eq!(
        f.stop[0].reason,
        "finished and its volume needs nothing more"
    );
}

fn orphan(kind: OrphanKind, clean: bool) -> Orphan {
    Orphan {
        kind,
        namespace: "ns".into(),
        cluster: "events".into(),
        volume: Some("pv2".into()),
        claim: "buffer-events-2".into(),
        claim_exists: true,
        claim_bound: true,
        clean,
    }
}

fn situation<'a>(
    c: Option<&'a CaptureCluster>,
    v: Option<&'a PersistentVolume>,
    j: Option<&'a Job>,
) -> Situation<'a> {
    Situation {
        cluster: c,
        volume: v,
        job: j,
        orphaned_for: Duration::from_secs(3600),
        now: jiff::Timestamp::now(),
        slot_free: true,
    }
}

#[test]
fn a_dirty_orphan_gets_a_flush_job_after_the_delay_and_within_the_parallel_limit() {
    let c = cluster("events", 1, json!({"delaySeconds": 30}));
    let v = pv("pv2", "Bound", json!({}));
    let o = orphan(OrphanKind::ClaimWithoutPod, false);
    assert_eq!(
        decide(&o, &situation(Some(&c), Some(&v), None)),
        Step::StartJob
    );
    let mut early = situation(Some(&c), Some(&v), None);
    early.orphaned_for = Duration::from_secs(10);
    assert_eq!(decide(&o, &early), Step::Wait("recovery delay"));
    let mut full = situation(Some(&c), Some(&v), None);
    full.slot_free = false;
    assert_eq!(
        decide(&o, &full),
        Step::Wait("maxParallelFlushJobs reached")
    );
    let mut unbound = o.clone();
    unbound.claim_bound = false;
    assert_eq!(
        decide(&unbound, &situation(Some(&c), Some(&v), None)),
        Step::Wait("claim not bound yet")
    );
}

#[test]
fn a_job_result_decides_finish_or_failure() {
    let c = cluster("events", 1, json!({}));
    let v = pv("pv2", "Bound", json!({}));
    let o = orphan(OrphanKind::ClaimWithoutPod, false);
    let running = job("pv2", "buffer-events-2", json!({"active": 1}));
    let done = job("pv2", "buffer-events-2", json!({"succeeded": 1}));
    let failed = job(
        "pv2",
        "buffer-events-2",
        json!({"conditions": [{"type": "Failed", "status": "True"}]}),
    );
    let d = |j| decide(&o, &situation(Some(&c), Some(&v), Some(j)));
    assert_eq!(d(&running), Step::Wait("flush job running"));
    assert_eq!(d(&done), Step::Finish);
    assert_eq!(d(&failed), Step::RecordFailure);
    // A success is acted on only with the PV in hand (it must be flipped).
    assert_eq!(
        decide(&o, &situation(Some(&c), None, Some(&done))),
        Step::Wait("volume not visible yet")
    );
}

#[test]
fn failures_back_off_before_the_next_job() {
    let c = cluster("events", 1, json!({"delaySeconds": 0}));
    let now = jiff::Timestamp::now();
    let recent = now - jiff::SignedDuration::from_secs(3);
    let v = pv(
        "pv2",
        "Bound",
        json!({FAILURES_ANNOTATION: "2", FAILED_AT_ANNOTATION: recent.to_string()}),
    );
    assert_eq!(failures(&v), (2, Some(recent)));
    let o = orphan(OrphanKind::ClaimWithoutPod, false);
    let mut s = situation(Some(&c), Some(&v), None);
    s.now = now;
    // Two failures: 4 s of backoff, 3 s passed.
    assert_eq!(
        decide(&o, &s),
        Step::Wait("backing off after a failed flush")
    );
    s.now = now + jiff::SignedDuration::from_secs(2);
    assert_eq!(decide(&o, &s), Step::StartJob);
}

#[test]
fn a_clean_orphan_is_released_after_the_delay_even_without_its_cluster() {
    let o = orphan(OrphanKind::ClaimWithoutPod, true);
    assert_eq!(decide(&o, &situation(None, None, None)), Step::Release);
    let c = cluster("events", 1, json!({"delaySeconds": 30}));
    assert_eq!(decide(&o, &situation(Some(&c), None, None)), Step::Release);
    let mut early = situation(Some(&c), None, None);
    early.orphaned_for = Duration::from_secs(5);
    assert_eq!(decide(&o, &early), Step::Wait("recovery delay"));
    // Recovery disabled: the operator leaves the claims alone.
    let off = cluster("events", 1, json!({"enabled": false}));
    assert_eq!(
        decide(&o, &situation(Some(&off), None, None)),
        Step::Wait("orphan recovery disabled")
    );
}

#[test]
fn an_orphan_whose_cluster_is_gone_or_disabled_recovery_is_reported_never_released() {
    let v = pv("pv2", "Released", json!({}));
    let o = orphan(OrphanKind::ReleasedVolume, false);
    let Step::Report(why) = decide(&o, &situation(None, Some(&v), None)) else {
        panic!("expected a report");
    };
    assert!(why.contains("is gone"), "{why}");
    let off = cluster("events", 1, json!({"enabled": false}));
    let Step::Report(why) = decide(&o, &situation(Some(&off), Some(&v), None)) else {
        panic!("expected a report");
    };
    assert!(why.contains("disabled"), "{why}");
}

#[test]
fn a_released_volume_is_rebound_before_its_job() {
    let c = cluster("events", 1, json!({}));
    let v = pv("pv2", "Released", json!({}));
    let mut o = orphan(OrphanKind::ReleasedVolume, false);
    o.claim = recovery_claim_name("pv2");
    o.claim_exists = false;
    o.claim_bound = false;
    assert_eq!(
        decide(&o, &situation(Some(&c), Some(&v), None)),
        Step::Rebind
    );
    // The claim exists but the PV still points at the deleted one.
    o.claim_exists = true;
    assert_eq!(
        decide(&o, &situation(Some(&c), Some(&v), None)),
        Step::Rebind
    );
    let mut rebound = v.clone();
    let r = rebound.spec.as_mut().unwrap().claim_ref.as_mut().unwrap();
    r.name = Some(o.claim.clone());
    r.uid = None;
    o.claim_bound = true;
    assert_eq!(
        decide(&o, &situation(Some(&c), Some(&rebound), None)),
        Step::StartJob
    );
}

#[test]
fn active_jobs_are_counted_per_cluster() {
    let jobs = [
        job("a", "c1", json!({"active": 1})),
        job("b", "c2", json!({})),
        job("c", "c3", json!({"succeeded": 1})),
    ];
    let counts = active_jobs(&jobs);
    assert_eq!(counts[&("ns".to_string(), "events".to_string())], 2);
}

fn statefulset(name: &str, spec: i32, status: i32) -> StatefulSet {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ns", "labels": {CLUSTER_LABEL: name}},
        "spec": {"replicas": spec, "selector": {}, "template": {}, "serviceName": name},
        "status": {"replicas": status},
    }))
    .unwrap()
}

#[test]
fn an_ordinal_the_statefulset_still_runs_is_wanted_whatever_the_resource_says() {
    // The resource asks for 1, but the scale-down was refused (invalid
    // spec) or its apply failed: the StatefulSet still runs 2, and pod
    // events-1 is only restarting.
    let inv = Inventory {
        clusters: vec![cluster("events", 1, json!({}))],
        statefulsets: vec![statefulset("events", 2, 2)],
        claims: vec![claim("buffer-events-1", Some("pv1"))],
        volumes: vec![pv("pv1", "Bound", json!({}))],
        pods: vec![],
        jobs: vec![],
    };
    assert_eq!(find(&inv).orphans, vec![]);
    // Spec already 1, but the StatefulSet's status still counts 2 pods.
    let inv = Inventory {
        statefulsets: vec![statefulset("events", 1, 2)],
        ..inv
    };
    assert_eq!(find(&inv).orphans, vec![]);
    // Once the StatefulSet agrees, ordinal 1 is scaled away.
    let inv = Inventory {
        statefulsets: vec![statefulset("events", 1, 1)],
        ..inv
    };
    assert_eq!(
        names(&find(&inv)),
        [(OrphanKind::ClaimWithoutPod, "buffer-events-1".into(), false)]
    );
    assert_eq!(
        wanted_replicas(inv.clusters.first(), inv.statefulsets.first()),
        1
    );
    assert_eq!(wanted_replicas(None, Some(&statefulset("events", 0, 3))), 3);
    assert_eq!(wanted_replicas(None, None), 0);
}

#[test]
fn a_volume_of_a_previous_instance_is_drained_only_on_opt_in() {
    let c = cluster("events", 1, json!({}));
    let mut volume = pv("pv1", "Released", json!({}));
    volume
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(CLUSTER_UID_LABEL.into(), "uid-of-an-earlier-events".into());
    let orphan = Orphan {
        kind: OrphanKind::ReleasedVolume,
        namespace: "ns".into(),
        cluster: "events".into(),
        volume: Some("pv1".into()),
        claim: recovery_claim_name("pv1"),
        claim_exists: false,
        claim_bound: false,
        clean: false,
    };
    let situation = |c: &CaptureCluster, v: &PersistentVolume| {
        decide(
            &orphan,
            &Situation {
                cluster: Some(c),
                volume: Some(v),
                job: None,
                orphaned_for: Duration::from_secs(600),
                now: jiff::Timestamp::now(),
                slot_free: true,
            },
        )
    };
    match situation(&c, &volume) {
        Step::Report(why) => assert!(why.contains("adoptPreviousVolumes"), "{why}"),
        other => panic!("expected a report, got {other:?}"),
    }
    let adopting = cluster("events", 1, json!({"adoptPreviousVolumes": true}));
    assert_eq!(situation(&adopting, &volume), Step::Rebind);
    // Its own volume is drained as usual.
    let own = pv("pv1", "Released", json!({}));
    assert_eq!(situation(&c, &own), Step::Rebind);
}

#[test]
fn a_volume_found_through_its_claim_ref_is_recovered_like_a_labelled_one() {
    use crate::volumes::claim_ref::{build_claim_ref_patch, released_claim_ref};
    let mut c = cluster("events", 1, json!({}));
    c.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-01T00:00:05Z".parse().unwrap(),
    ));
    // Its claim buffer-events-1 was deleted before the PV got any label.
    let unlabelled = |created: &str| -> PersistentVolume {
        serde_json::from_value(json!({
            "metadata": {"name": "pv9", "creationTimestamp": created},
            "spec": {"persistentVolumeReclaimPolicy": "Retain",
                "claimRef": {"namespace": "ns", "name": "buffer-events-1", "uid": "gone"}},
            "status": {"phase": "Released"},
        }))
        .unwrap()
    };
    // What the finder's patch makes of it.
    let labelled = |pv: PersistentVolume| {
        let found = released_claim_ref(&pv).expect("found through its claimRef");
        let patch = build_claim_ref_patch(&pv, &found, &c);
        let mut pv = pv;
        pv.metadata.labels = serde_json::from_value(patch["metadata"]["labels"].clone()).unwrap();
        pv
    };
    let decide_for = |c: &CaptureCluster, pv: &PersistentVolume| {
        let inv = Inventory {
            clusters: vec![c.clone()],
            volumes: vec![pv.clone()],
            ..Default::default()
        };
        let found = find(&inv);
        assert_eq!(
            names(&found),
            vec![(
                OrphanKind::ReleasedVolume,
                recovery_claim_name("pv9"),
                false
            )]
        );
        decide(&found.orphans[0], &situation(Some(c), Some(pv), None))
    };
    // Before: invisible to recovery.
    let inv = Inventory {
        clusters: vec![c.clone()],
        volumes: vec![unlabelled("2026-01-01T00:00:09Z")],
        ..Default::default()
    };
    assert!(find(&inv).orphans.is_empty());
    // Provisioned for this instance: recovered at once.
    let own = labelled(unlabelled("2026-01-01T00:00:09Z"));
    assert_eq!(decide_for(&c, &own), Step::Rebind);
    // Older than this instance: maybe a previous one's, so only on opt-in.
    let old = labelled(unlabelled("2026-01-01T00:00:01Z"));
    match decide_for(&c, &old) {
        Step::Report(why) => assert!(why.contains("adoptPreviousVolumes"), "{why}"),
        other => panic!("expected a report, got {other:?}"),
    }
    let mut adopting = cluster("events", 1, json!({"adoptPreviousVolumes": true}));
    adopting.metadata.creation_timestamp = c.metadata.creation_timestamp.clone();
    assert_eq!(decide_for(&adopting, &old), Step::Rebind);
}
