//! The local Kafka of `holdfast_e2e::kafka` is a real broker: idempotent and
//! transactional producers work, aborted records stay hidden from
//! read-committed consumers, headers round-trip, data survives a restart.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use holdfast_e2e::kafka::{ConsumeOptions, Isolation, KafkaBroker, KafkaOptions};
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

const WAIT: Duration = Duration::from_secs(30);

fn idempotent_producer(bootstrap: &str) -> Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?)
}

fn transactional_producer(bootstrap: &str, id: &str) -> Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?)
}

async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &str,
) -> Result<(i32, i64)> {
    let delivery = producer
        .send(FutureRecord::to(topic).key(key).payload(payload), WAIT)
        .await
        .map_err(|(error, _)| error)?;
    Ok((delivery.partition, delivery.offset))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_and_transactional_producers_work_and_aborts_stay_hidden() -> Result<()> {
    let broker = KafkaBroker::start().await?;
    let bootstrap = broker.bootstrap();

    // Idempotent producer, headers, and auto-created topic (the default).
    let producer = idempotent_producer(&bootstrap)?;
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "holdfast-id",
            value: Some("evt-1"),
        })
        .insert(Header {
            key: "binary",
            value: Some(&[0_u8, 159, 255][..]),
        })
        .insert(Header {
            key: "null",
            value: None::<&[u8]>,
        });
    producer
        .send(
            FutureRecord::to("idempotent")
                .key("k1")
                .payload(r#"{"n":1}"#)
                .headers(headers),
            WAIT,
        )
        .await
        .map_err(|(error, _)| error)?;
    send(&producer, "idempotent", "k2", r#"{"n":2}"#).await?;

    let records = broker.consume("idempotent", 2, WAIT).await?;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0].key_str(), Some("k1"));
    assert_eq!(records[0].payload_str(), Some(r#"{"n":1}"#));
    assert_eq!(
        records[0].headers,
        vec![
            ("holdfast-id".to_owned(), b"evt-1".to_vec()),
            ("binary".to_owned(), vec![0, 159, 255]),
            ("null".to_owned(), Vec::new()),
        ]
    );
    assert_eq!(records[0].header("holdfast-id"), Some(&b"evt-1"[..]));
    assert_eq!(records[1].key_str(), Some("k2"));
    assert!(records[1].headers.is_empty());
    assert_eq!(
        records.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![0, 1]
    );

    // Transactional producer: commit, abort, commit on one partition.
    broker
        .create_topic("txn", 1, &[("retention.ms", "-1")])
        .await?;
    let txn = transactional_producer(&bootstrap, "holdfast-test-txn")?;
    txn.init_transactions(WAIT)?;
    txn.begin_transaction()?;
    send(&txn, "txn", "a", "committed-1").await?;
    send(&txn, "txn", "b", "committed-2").await?;
    txn.commit_transaction(WAIT)?;
    txn.begin_transaction()?;
    send(&txn, "txn", "c", "aborted").await?;
    txn.abort_transaction(WAIT)?;
    txn.begin_transaction()?;
    send(&txn, "txn", "d", "committed-3").await?;
    txn.commit_transaction(WAIT)?;

    // The aborted record sits between committed ones on the only
    // partition: reaching committed-3 means the consumer went past it.
    let committed = broker.consume("txn", 3, WAIT).await?;
    let payloads: Vec<_> = committed.iter().map(|r| r.payload_str().unwrap()).collect();
    assert_eq!(payloads, ["committed-1", "committed-2", "committed-3"]);

    // It was written, though: read_uncommitted sees it.
    let everything = broker
        .consume_with(
            "txn",
            &ConsumeOptions::new(4, WAIT).isolation(Isolation::ReadUncommitted),
        )
        .await?;
    let payloads: Vec<_> = everything
        .iter()
        .map(|r| r.payload_str().unwrap())
        .collect();
    assert_eq!(
        payloads,
        ["committed-1", "committed-2", "aborted", "committed-3"]
    );

    // A consumer stops at its deadline with what it has.
    let short = broker.consume("txn", 10, Duration::from_secs(2)).await?;
    assert_eq!(short.len(), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_ports_and_data() -> Result<()> {
    let mut broker = KafkaBroker::start().await?;
    let bootstrap = broker.bootstrap();
    broker.create_topic("durable", 3, &[]).await?;

    let producer = idempotent_producer(&bootstrap)?;
    for i in 0..30 {
        send(
            &producer,
            "durable",
            &format!("key-{i}"),
            &format!("before-{i}"),
        )
        .await?;
    }

    broker.stop().await?;
    assert!(!broker.is_running());
    let down = broker.consume("durable", 1, Duration::from_secs(2)).await?;
    assert!(down.is_empty(), "read from a stopped broker: {down:?}");

    broker.restart().await?;
    assert_eq!(broker.bootstrap(), bootstrap);
    // The same producer reconnects by itself.
    for i in 0..30 {
        send(
            &producer,
            "durable",
            &format!("key-{i}"),
            &format!("after-{i}"),
        )
        .await?;
    }

    let records = broker.consume("durable", 60, WAIT).await?;
    assert_eq!(records.len(), 60);
    for i in 0..30 {
        for phase in ["before", "after"] {
            let payload = format!("{phase}-{i}");
            assert!(
                records
                    .iter()
                    .any(|r| r.payload_str() == Some(payload.as_str())),
                "{payload} missing after restart"
            );
        }
    }
    // Same key, same partition, in order across the restart.
    let key7: Vec<_> = records
        .iter()
        .filter(|r| r.key_str() == Some("key-7"))
        .map(|r| (r.partition, r.payload_str().unwrap().to_owned()))
        .collect();
    assert_eq!(key7.len(), 2);
    assert_eq!(key7[0].0, key7[1].0);
    assert_eq!(key7[0].1, "before-7");
    assert_eq!(key7[1].1, "after-7");

    // Crash recovery: SIGKILL, restart, nothing acknowledged is lost.
    broker.kill();
    broker.restart().await?;
    let records = broker.consume("durable", 60, WAIT).await?;
    assert_eq!(records.len(), 60);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_create_can_be_disabled_and_drop_kills_the_broker() -> Result<()> {
    let broker = KafkaBroker::start_with(KafkaOptions {
        auto_create_topics: false,
        ..KafkaOptions::default()
    })
    .await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("message.timeout.ms", "3000")
        .create()?;
    let error = send(&producer, "never-created", "k", "v")
        .await
        .expect_err("produced to a topic that should not exist");
    let code = error
        .downcast_ref::<KafkaError>()
        .and_then(KafkaError::rdkafka_error_code);
    assert!(
        matches!(
            code,
            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::MessageTimedOut)
        ),
        "unexpected error {error:#}"
    );
    let missing = broker
        .consume("never-created", 1, Duration::from_secs(2))
        .await?;
    assert!(missing.is_empty());

    let pid = broker.pid().context("broker has no pid")?;
    let proc = format!("/proc/{pid}");
    assert!(Path::new(&proc).exists());
    drop(broker);
    assert!(
        !Path::new(&proc).exists(),
        "java {pid} outlived its KafkaBroker"
    );
    Ok(())
}

/// A picked free port can be taken before Kafka binds it (a test beside
/// this one). The start is then tried again on other ports, which relies on
/// recognising Kafka's own failure: shown here on a port held for good,
/// where every attempt fails the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_a_taken_port_fails_as_a_taken_port() -> Result<()> {
    let held = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    let options = KafkaOptions {
        controller_port: Some(held.local_addr()?.port()),
        ..KafkaOptions::default()
    };
    let err = match KafkaBroker::start_with(options).await {
        Ok(_) => anyhow::bail!("kafka started on a port another socket holds"),
        Err(e) => e,
    };
    anyhow::ensure!(
        holdfast_e2e::kafka::port_was_taken(&err),
        "not recognised as a taken port: {err:#}"
    );
    Ok(())
}
