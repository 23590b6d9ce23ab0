use k8s_openapi::api::core::v1::EnvVar;
use kube::core::ObjectMeta;

use super::*;
use crate::api::{
    CLUSTER_LABEL, CaptureClusterSpec, KafkaSasl, KafkaTls, SaslMechanism, SecretKeyRef,
};

fn cluster_with(spec: serde_json::Value) -> CaptureCluster {
    let mut base = serde_json::json!({
        "image": "holdfast/capture:dev",
        "kafka": {"bootstrapServers": "kafka:9092", "properties": {"linger.ms": "5"}},
        "storage": {"size": "1Gi", "storageClassName": "fast"},
        "replicas": 3,
        "shutdownGracePeriodSeconds": 40,
        "streams": [
            {"name": "clicks", "topic": "web.clicks"},
            {"name": "audit", "topic": "audit", "mode": "direct"},
        ],
    });
    for (k, v) in spec.as_object().unwrap() {
        base[k] = v.clone();
    }
    let spec: CaptureClusterSpec = serde_json::from_value(base).unwrap();
    let mut cluster = CaptureCluster::new("events", spec);
    cluster.metadata = ObjectMeta {
        name: Some("events".into()),
        namespace: Some("shop".into()),
        uid: Some("uid-1".into()),
        generation: Some(1),
        ..Default::default()
    };
    cluster
}

fn cluster() -> CaptureCluster {
    cluster_with(serde_json::json!({}))
}

fn env_map(vars: &[EnvVar]) -> BTreeMap<String, String> {
    vars.iter()
        .filter_map(|v| Some((v.name.clone(), v.value.clone()?)))
        .collect()
}

fn capture(sts: &StatefulSet) -> &Container {
    &sts.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
}

#[test]
fn every_object_is_owned_by_the_cluster_and_labelled() {
    let c = cluster();
    let metas = [
        build_service_account(&c).metadata,
        build_role(&c).metadata,
        build_role_binding(&c).metadata,
        build_headless_service(&c).metadata,
        build_client_service(&c).metadata,
        build_pod_disruption_budget(&c).metadata,
        build_statefulset(&c, 3).metadata,
    ];
    for meta in metas {
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "CaptureCluster");
        assert_eq!(owner.uid, "uid-1");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        assert_eq!(meta.labels.as_ref().unwrap()[CLUSTER_LABEL], "events");
    }
}

#[test]
fn statefulset_runs_capture_serve_with_the_spec_as_environment() {
    let sts = build_statefulset(&cluster(), 3);
    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.service_name.as_deref(), Some("events-headless"));
    let c = capture(&sts);
    assert_eq!(
        c.command.as_deref(),
        Some(&["holdfast-capture".to_string(), "serve".to_string()][..])
    );
    let vars = c.env.as_ref().unwrap();
    // POD_IP is defined before the listen address that refers to it.
    let pod_ip = vars.iter().position(|v| v.name == "POD_IP").unwrap();
    let listen = vars
        .iter()
        .position(|v| v.name == "HOLDFAST_LISTEN")
        .unwrap();
    assert!(pod_ip < listen);
    assert_eq!(
        vars[pod_ip]
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "status.podIP"
    );
    let env = env_map(vars);
    assert_eq!(env["HOLDFAST_LISTEN"], "$(POD_IP):8080");
    assert_eq!(env["HOLDFAST_DATA_DIR"], "/var/lib/holdfast");
    assert_eq!(env["HOLDFAST_KAFKA_BOOTSTRAP"], "kafka:9092");
    assert_eq!(env["HOLDFAST_KAFKA_PROPERTIES"], "linger.ms=5");
    assert_eq!(
        env["HOLDFAST_STREAMS"],
        "clicks=web.clicks:durable,audit=audit:direct"
    );
    assert_eq!(env["HOLDFAST_DEFAULT_STREAM"], "clicks");
    assert_eq!(env["HOLDFAST_DURABILITY"], "fsync");
    assert_eq!(env["HOLDFAST_DRAIN_TIMEOUT_SECS"], "35");
    assert_eq!(
        env["HOLDFAST_BUFFER_QUOTA_BYTES"],
        ((1u64 << 30) / 10 * 8).to_string()
    );
    assert!(!env.contains_key("HOLDFAST_AUTH_TOKENS_FILE"));
}

#[test]
fn pods_drain_within_their_grace_period_and_probe_readyz() {
    let sts = build_statefulset(&cluster(), 3);
    let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.termination_grace_period_seconds, Some(40));
    assert_eq!(pod.service_account_name.as_deref(), Some("events-capture"));
    let c = capture(&sts);
    let probe = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/readyz"));
    assert_eq!(probe.port, IntOrString::String("http".into()));
    assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 8080);
}

#[test]
fn pods_run_non_root_read_only_without_capabilities() {
    let sts = build_statefulset(&cluster(), 1);
    let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.run_as_user, Some(CAPTURE_UID));
    let sc = capture(&sts).security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
}

#[test]
fn buffer_claims_are_labelled_retained_and_mounted() {
    let sts = build_statefulset(&cluster(), 1);
    let spec = sts.spec.as_ref().unwrap();
    let claim = &spec.volume_claim_templates.as_ref().unwrap()[0];
    assert_eq!(claim.metadata.name.as_deref(), Some("buffer"));
    assert_eq!(
        claim.metadata.labels.as_ref().unwrap()[CLUSTER_LABEL],
        "events"
    );
    let claim_spec = claim.spec.as_ref().unwrap();
    assert_eq!(claim_spec.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(
        claim_spec
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"]
            .0,
        "1Gi"
    );
    let retention = spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .unwrap();
    assert_eq!(retention.when_deleted.as_deref(), Some("Retain"));
    assert_eq!(retention.when_scaled.as_deref(), Some("Retain"));
    let mount = capture(&sts)
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "buffer")
        .unwrap();
    assert_eq!(mount.mount_path, "/var/lib/holdfast");
    // The selector is a subset of the pod labels.
    let selector = spec.selector.match_labels.as_ref().unwrap();
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
}

#[test]
fn a_spec_change_changes_the_pod_template() {
    let before = build_statefulset(&cluster(), 3);
    let after = build_statefulset(
        &cluster_with(serde_json::json!({
            "kafka": {"bootstrapServers": "kafka:9092", "properties": {"linger.ms": "50"}},
        })),
        3,
    );
    assert_ne!(
        before.spec.as_ref().unwrap().template,
        after.spec.as_ref().unwrap().template
    );
    // Scaling does not touch the template (no rollout).
    let scaled = build_statefulset(&cluster(), 1);
    assert_eq!(
        before.spec.as_ref().unwrap().template,
        scaled.spec.as_ref().unwrap().template
    );
}

#[test]
fn tls_sasl_and_auth_come_from_secrets_never_inline() {
    let mut c = cluster();
    c.spec.kafka.tls = Some(KafkaTls {
        secret_name: "kafka-tls".into(),
        ca_key: "ca.crt".into(),
        cert_key: Some("tls.crt".into()),
        key_key: Some("tls.key".into()),
    });
    c.spec.kafka.sasl = Some(KafkaSasl {
        mechanism: SaslMechanism::ScramSha512,
        secret_name: "kafka-user".into(),
        username_key: "username".into(),
        password_key: "password".into(),
    });
    c.spec.auth_secret = Some(SecretKeyRef {
        name: "tokens".into(),
        key: "tokens".into(),
    });
    let sts = build_statefulset(&c, 1);
    let container = capture(&sts);
    let env = env_map(container.env.as_ref().unwrap());
    let props = &env["HOLDFAST_KAFKA_PROPERTIES"];
    assert!(props.contains("security.protocol=SASL_SSL"), "{props}");
    assert!(props.contains("sasl.mechanism=SCRAM-SHA-512"), "{props}");
    assert!(
        props.contains("sasl.password=$(HOLDFAST_KAFKA_SASL_PASSWORD)"),
        "{props}"
    );
    assert!(
        props.contains("ssl.ca.location=/etc/holdfast/kafka-tls/ca.crt"),
        "{props}"
    );
    let password = container
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "HOLDFAST_KAFKA_SASL_PASSWORD")
        .unwrap();
    let secret = password
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (secret.name.as_str(), secret.key.as_str()),
        ("kafka-user", "password")
    );
    // The password variable is defined before the properties that expand it.
    let vars = container.env.as_ref().unwrap();
    let pw = vars
        .iter()
        .position(|v| v.name == "HOLDFAST_KAFKA_SASL_PASSWORD");
    let pr = vars
        .iter()
        .position(|v| v.name == "HOLDFAST_KAFKA_PROPERTIES");
    assert!(pw < pr);
    assert_eq!(
        env["HOLDFAST_AUTH_TOKENS_FILE"],
        "/etc/holdfast/auth/tokens"
    );
    let volumes = sts
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .as_ref()
        .unwrap();
    let secret_names: Vec<_> = volumes
        .iter()
        .filter_map(|v| v.secret.as_ref()?.secret_name.clone())
        .collect();
    assert_eq!(secret_names, ["kafka-tls", "tokens"]);
}

#[test]
fn services_select_the_pods_and_the_headless_one_lists_unready_pods() {
    let c = cluster();
    let headless = build_headless_service(&c);
    let client = build_client_service(&c);
    let hs = headless.spec.as_ref().unwrap();
    assert_eq!(hs.cluster_ip.as_deref(), Some("None"));
    assert_eq!(hs.publish_not_ready_addresses, Some(true));
    assert_eq!(client.metadata.name.as_deref(), Some("events"));
    let pod_labels = build_statefulset(&c, 1)
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .labels
        .unwrap();
    for svc in [&headless, &client] {
        let selector = svc.spec.as_ref().unwrap().selector.as_ref().unwrap();
        assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    }
    let pdb = build_pod_disruption_budget(&c);
    assert_eq!(
        pdb.spec.as_ref().unwrap().max_unavailable,
        Some(IntOrString::Int(1))
    );
}

#[test]
fn capture_role_binds_the_capture_service_account() {
    let c = cluster();
    let binding = build_role_binding(&c);
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(binding.role_ref.name, "events-capture");
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(subject.name, "events-capture");
    assert_eq!(subject.namespace.as_deref(), Some("shop"));
    let role = build_role(&c);
    // Read-only on pods and claims; nothing that could touch other pods' data.
    for rule in role.rules.as_ref().unwrap() {
        assert!(
            rule.verbs
                .iter()
                .all(|v| ["get", "create", "patch"].contains(&v.as_str())),
            "{rule:?}"
        );
    }
}

#[test]
fn capture_pods_get_their_volume_access_through_a_labelled_cluster_binding() {
    let binding = build_cluster_role_binding(&cluster(), "holdfast-capture");
    assert_eq!(
        binding.metadata.name.as_deref(),
        Some("holdfast-capture-shop-events")
    );
    // Cluster-scoped: no owner reference (the finalizer deletes it), labels instead.
    assert!(binding.metadata.owner_references.is_none());
    let labels = binding.metadata.labels.as_ref().unwrap();
    assert_eq!(labels[CLUSTER_LABEL], "events");
    assert_eq!(labels[crate::api::NAMESPACE_LABEL], "shop");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, "holdfast-capture");
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        ("events-capture", Some("shop"))
    );
    // The pod finds its claim from its own name and namespace.
    let sts = build_statefulset(&cluster(), 1);
    let vars = capture(&sts).env.as_ref().unwrap();
    let env = env_map(vars);
    assert_eq!(env["HOLDFAST_VOLUME_CLAIM"], "buffer-$(POD_NAME)");
    let pod_name = vars.iter().position(|v| v.name == "POD_NAME").unwrap();
    let claim = vars
        .iter()
        .position(|v| v.name == "HOLDFAST_VOLUME_CLAIM")
        .unwrap();
    assert!(pod_name < claim);
    assert!(vars.iter().any(|v| {
        v.name == "HOLDFAST_NAMESPACE"
            && v.value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path
                == "metadata.namespace"
    }));
}

#[test]
fn statefulset_pods_carry_the_scheduling_fields() {
    let c = cluster_with(serde_json::json!({
        "nodeSelector": {"pool": "capture"},
        "tolerations": [{"key": "dedicated", "operator": "Exists"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 1,
            "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"},
        }]}},
        "priorityClassName": "holdfast-high",
        "imagePullSecrets": [{"name": "registry"}],
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"},
            {"maxSkew": 2, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
             "labelSelector": {"matchLabels": {"team": "web"}}},
        ],
    }));
    let sts = build_statefulset(&c, 3);
    let pod = sts.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.node_selector, c.spec.node_selector);
    assert_eq!(pod.tolerations, c.spec.tolerations);
    assert_eq!(pod.affinity, c.spec.affinity);
    assert_eq!(pod.priority_class_name.as_deref(), Some("holdfast-high"));
    assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "registry");
    let spread = pod.topology_spread_constraints.unwrap();
    // Without a selector a constraint counts this cluster's pods...
    assert_eq!(
        spread[0].label_selector.as_ref().unwrap().match_labels,
        Some(selector_labels(&c))
    );
    // ...and one the user gave is kept.
    assert_eq!(
        spread[1].label_selector.as_ref().unwrap().match_labels,
        Some(BTreeMap::from([("team".to_string(), "web".to_string())]))
    );
}

#[test]
fn selector_string_selects_the_pods() {
    let c = cluster();
    assert_eq!(
        selector_string(&c),
        "app.kubernetes.io/component=capture,app.kubernetes.io/name=holdfast,holdfast.dev/cluster=events"
    );
}

#[test]
fn exactly_once_reaches_the_pods_and_their_flush_jobs_alike() {
    let at_least_once = cluster();
    let exactly_once = cluster_with(serde_json::json!({
        "kafka": {"bootstrapServers": "kafka:9092", "exactlyOnce": true},
    }));
    let delivery = |c: &CaptureCluster| {
        let sts = build_statefulset(c, 1);
        let pod = env_map(capture(&sts).env.as_deref().unwrap_or_default());
        let flush = env_map(&crate::orphans::job::flush_env(c, 60));
        (
            pod.get("HOLDFAST_DELIVERY").cloned(),
            flush.get("HOLDFAST_DELIVERY").cloned(),
        )
    };
    assert_eq!(delivery(&at_least_once), (None, None));
    let eos = Some("exactly-once".to_owned());
    assert_eq!(delivery(&exactly_once), (eos.clone(), eos));
}
