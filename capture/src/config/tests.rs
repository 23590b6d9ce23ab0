use super::*;

#[test]
fn parses_stream_with_and_without_mode() {
    assert_eq!(
        parse_stream("clicks=web.clicks").unwrap(),
        (
            "clicks".to_owned(),
            Stream {
                topic: "web.clicks".to_owned(),
                mode: StreamMode::Durable
            }
        )
    );
    assert_eq!(
        parse_stream("metrics=m:direct").unwrap().1.mode,
        StreamMode::Direct
    );
}

#[test]
fn rejects_stream_with_unknown_mode_naming_the_flag() {
    let err = parse_stream("a=b:fast").unwrap_err().to_string();
    assert!(err.starts_with("--stream \"a=b:fast\""), "{err}");
    assert!(err.contains("unknown mode"), "{err}");
    assert!(parse_stream("noequals").is_err());
    assert!(parse_stream("a=bad topic").is_err());
}

#[test]
fn rejects_default_stream_that_is_not_configured() {
    let cli = Cli::try_parse_from([
        "holdfast-capture",
        "serve",
        "--kafka-bootstrap",
        "k:9092",
        "--stream",
        "a=t",
    ])
    .unwrap();
    let Command::Serve(args) = cli.command else {
        panic!("not serve")
    };
    let err = args.validate().unwrap_err().to_string();
    assert!(err.contains("--default-stream \"default\""), "{err}");
}

#[test]
fn kafka_properties_override_and_must_be_key_value() {
    let mut args = KafkaArgs {
        kafka_bootstrap: "k:1".into(),
        kafka_properties: vec!["security.protocol=SSL".into(), "linger.ms = 2".into()],
        dead_letter_topic: None,
        forward_batch_events: 10,
        forward_batch_bytes: 1 << 20,
        poison_retry_window_secs: 60,
        kafka_message_timeout_ms: 1000,
        delivery: crate::config::Delivery::AtLeastOnce,
        checkpoint_topic: "holdfast.checkpoints".into(),
        transaction_events: 25_000,
    };
    let cfg = args.validate().unwrap();
    assert_eq!(cfg.properties["linger.ms"], "2");
    args.kafka_properties.push("nonsense".into());
    assert!(
        args.validate()
            .unwrap_err()
            .to_string()
            .contains("--kafka-property")
    );
}

fn serve_args(extra: &[&str]) -> ServeArgs {
    let mut argv = vec![
        "holdfast-capture",
        "serve",
        "--kafka-bootstrap",
        "k:9092",
        "--stream",
        "default=t",
    ];
    argv.extend_from_slice(extra);
    let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
        panic!("not serve")
    };
    *args
}

#[test]
fn default_event_limit_fits_the_default_kafka_record_limit() {
    let cfg = serve_args(&[]).validate().unwrap();
    assert!(
        cfg.max_event_bytes as u64 + RECORD_OVERHEAD_BYTES <= cfg.kafka.message_max_bytes(),
        "default --max-event-bytes {} does not fit message.max.bytes {}",
        cfg.max_event_bytes,
        cfg.kafka.message_max_bytes()
    );
}

#[test]
fn refuses_an_event_limit_kafka_would_always_reject_naming_both_flags() {
    let err = serve_args(&["--max-event-bytes", "1048576"])
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("--max-event-bytes"), "{err}");
    assert!(err.contains("message.max.bytes"), "{err}");
    // Raising the producer's limit makes the same event limit valid.
    serve_args(&[
        "--max-event-bytes",
        "1048576",
        "--kafka-property",
        "message.max.bytes=2000000",
    ])
    .validate()
    .unwrap();
}

#[test]
fn refuses_properties_that_weaken_delivery_naming_the_property() {
    for bad in [
        "acks=1",
        "acks=0",
        "request.required.acks=1",
        "enable.idempotence=false",
        "max.in.flight.requests.per.connection=10",
        "retries=0",
        "transactional.id=x",
    ] {
        let err = serve_args(&["--kafka-property", bad])
            .validate()
            .unwrap_err()
            .to_string();
        let key = bad.split('=').next().unwrap();
        assert!(err.contains(key), "{bad}: {err}");
    }
    for ok in [
        "acks=all",
        "acks=-1",
        "enable.idempotence=true",
        "max.in.flight=5",
    ] {
        serve_args(&["--kafka-property", ok]).validate().unwrap();
    }
}

#[test]
fn transaction_events_default_and_zero_is_refused_naming_the_flag() {
    let cfg = serve_args(&[]).validate().unwrap();
    assert_eq!(cfg.kafka.transaction_events, DEFAULT_TRANSACTION_EVENTS);
    let cfg = serve_args(&["--transaction-events", "7"])
        .validate()
        .unwrap();
    assert_eq!(cfg.kafka.transaction_events, 7);
    let err = serve_args(&["--transaction-events", "0"])
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("--transaction-events"), "{err}");
}
