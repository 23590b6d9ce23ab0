//! The checkpoint topic of exactly-once delivery: one compacted record per
//! volume, `{volume, last_seq}`, keyed by the volume id and written in the
//! same transaction as the events it covers.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;

/// How long reading the checkpoint topic to its end may take.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The record covering `volume_id` through `last_seq`.
pub(super) fn record(volume_id: &str, last_seq: i64) -> Vec<u8> {
    serde_json::json!({ "volume": volume_id, "last_seq": last_seq })
        .to_string()
        .into_bytes()
}

/// `last_seq` of a checkpoint record, if it is one.
fn last_seq_of(payload: &[u8]) -> Option<i64> {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()?
        .get("last_seq")?
        .as_i64()
}

/// Client settings: the user's properties first (TLS, SASL), then ours.
fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in &cfg.properties {
        // Producer-only properties would only make the consumer warn.
        if k.starts_with("ssl.") || k.starts_with("sasl.") || k == "security.protocol" {
            c.set(k, v);
        }
    }
    c.set("bootstrap.servers", &cfg.bootstrap);
    c
}

/// Creates the checkpoint topic (`cleanup.policy=compact`, one partition,
/// the broker's replication) unless it exists.
pub(super) async fn ensure_topic(cfg: &KafkaConfig) -> Result<(), KafkaError> {
    if exists(cfg).await? {
        // Made beforehand (the principal may lack the right to create it).
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client_config(cfg).create()?;
    let topic = NewTopic::new(&cfg.checkpoint_topic, 1, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "compact");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics([&topic], &opts).await?;
    for r in results {
        match r {
            Ok(_) => tracing::info!(topic = %cfg.checkpoint_topic, "created the checkpoint topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

/// Whether the checkpoint topic exists (metadata only).
async fn exists(cfg: &KafkaConfig) -> Result<bool, KafkaError> {
    let mut c = client_config(cfg);
    c.set("allow.auto.create.topics", "false");
    let topic = cfg.checkpoint_topic.clone();
    tokio::task::spawn_blocking(move || -> Result<bool, KafkaError> {
        let consumer: BaseConsumer = c.create()?;
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        Ok(md
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()))
    })
    .await
    .unwrap_or(Err(KafkaError::Canceled))
}

/// The highest sequence a committed checkpoint of `volume_id` covers (0 when
/// none): the topic read from the start to its end, `read_committed`.
pub(super) async fn read(cfg: &KafkaConfig, volume_id: &str) -> Result<i64, KafkaError> {
    let mut c = client_config(cfg);
    c.set("group.id", format!("holdfast-checkpoint-{volume_id}"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed");
    let (topic, volume) = (cfg.checkpoint_topic.clone(), volume_id.to_owned());
    tokio::task::spawn_blocking(move || -> Result<i64, KafkaError> {
        let consumer: BaseConsumer = c.create()?;
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let partitions: Vec<i32> = md
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        // Everything written before now must be read, our own last
        // checkpoint included. read_committed stops at the last stable
        // offset, which another volume's open transaction can hold back for
        // a moment: read until the position passes the end seen now.
        let mut target = std::collections::HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            let (_, hi) = consumer.fetch_watermarks(&topic, *p, Duration::from_secs(10))?;
            if hi > 0 {
                target.insert(*p, hi);
                tpl.add_partition_offset(&topic, *p, Offset::Beginning)?;
            }
        }
        if target.is_empty() {
            return Ok(0);
        }
        consumer.assign(&tpl)?;
        let mut last = 0i64;
        let deadline = std::time::Instant::now() + READ_TIMEOUT;
        while !target.is_empty() {
            if std::time::Instant::now() > deadline {
                return Err(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::OperationTimedOut,
                ));
            }
            match consumer.poll(Duration::from_millis(100)) {
                None | Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => return Err(e),
                Some(Ok(m)) => {
                    if m.key() == Some(volume.as_bytes())
                        && let Some(seq) = m.payload().and_then(last_seq_of)
                    {
                        last = last.max(seq);
                    }
                }
            }
            let position = consumer.position()?;
            target.retain(|p, hi| {
                !matches!(
                    position.find_partition(&topic, *p).map(|e| e.offset()),
                    Some(Offset::Offset(at)) if at >= *hi
                )
            });
        }
        Ok(last)
    })
    .await
    .unwrap_or(Err(KafkaError::Canceled))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_record_reads_back() {
        assert_eq!(super::last_seq_of(&super::record("v", 42)), Some(42));
        assert_eq!(super::last_seq_of(b"not json"), None);
    }
}
