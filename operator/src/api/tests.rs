use super::*;

pub(crate) fn spec() -> CaptureClusterSpec {
    serde_json::from_value(serde_json::json!({
        "image": "holdfast/capture:dev",
        "kafka": {"bootstrapServers": "kafka:9092"},
        "storage": {"size": "1Gi"},
    }))
    .unwrap()
}

#[test]
fn defaults_fill_a_minimal_spec() {
    let s = spec();
    assert_eq!(s.replicas, 1);
    assert_eq!(s.durability, Durability::Fsync);
    assert_eq!(s.shutdown_grace_period_seconds, 60);
    assert!(s.orphan_recovery.enabled);
    assert_eq!(s.effective_default_stream(), "default");
    assert_eq!(s.buffer_quota_bytes(), (1u64 << 30) / 10 * 8);
    assert_eq!(s.validate("events"), Ok(()));
}

#[test]
fn the_documented_example_is_valid() {
    let text = include_str!("../../examples/capturecluster.yaml");
    let cluster: CaptureCluster = serde_yaml::from_str(text).unwrap();
    assert_eq!(cluster.spec.validate("events"), Ok(()));
    assert_eq!(cluster.spec.streams.len(), 2);
    assert_eq!(
        cluster.spec.kafka.sasl.unwrap().mechanism,
        SaslMechanism::ScramSha512
    );
}

#[test]
fn parses_quantities() {
    let q = |s: &str| quantity_bytes(&Quantity(s.into()));
    assert_eq!(q("1Gi"), Some(1 << 30));
    assert_eq!(q("512Mi"), Some(512 << 20));
    assert_eq!(q("2G"), Some(2_000_000_000));
    assert_eq!(q("1.5Ki"), Some(1536));
    assert_eq!(q("1e3"), Some(1000));
    assert_eq!(q("100m"), None);
    assert_eq!(q("lots"), None);
}

#[test]
fn drain_timeout_leaves_a_margin_below_the_grace_period() {
    assert_eq!(drain_timeout_secs(60), 54);
    assert_eq!(drain_timeout_secs(10), 5);
    assert_eq!(drain_timeout_secs(300), 270);
}

#[test]
fn rejects_specs_naming_the_field() {
    let field = |f: &dyn Fn(&mut CaptureClusterSpec)| {
        let mut s = spec();
        f(&mut s);
        s.validate("events").unwrap_err().field
    };
    assert_eq!(
        field(&|s| s.storage.buffer_quota_bytes = Some(2 << 30)),
        "spec.storage.bufferQuotaBytes"
    );
    assert_eq!(
        field(&|s| s.storage.size = Quantity("big".into())),
        "spec.storage.size"
    );
    assert_eq!(
        field(&|s| {
            s.kafka
                .properties
                .insert("bootstrap.servers".into(), "x:1".into());
        }),
        "spec.kafka.properties[bootstrap.servers]"
    );
    assert_eq!(
        field(&|s| s.kafka.bootstrap_servers = "nohost".into()),
        "spec.kafka.bootstrapServers"
    );
    assert_eq!(
        field(&|s| {
            let stream = StreamSpec {
                name: "a".into(),
                topic: "t".into(),
                mode: StreamMode::Durable,
            };
            s.streams = vec![stream.clone(), stream];
        }),
        "spec.streams[1].name"
    );
    assert_eq!(
        field(&|s| s.default_stream = Some("nope".into())),
        "spec.defaultStream"
    );
    let long = "a".repeat(MAX_NAME_LEN + 1);
    assert_eq!(spec().validate(&long).unwrap_err().field, "metadata.name");
    assert_eq!(
        spec().validate("Events").unwrap_err().field,
        "metadata.name"
    );
}
