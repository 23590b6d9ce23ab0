//! The one place that decides what a Kafka error means for an event: retry it,
//! bury it in dead letters, or treat the producer as broken.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::buffer::{DeadLetter, StoredEvent};

/// What to do with an event whose delivery failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Transient (broker down, timeout, leader change): keep it and retry.
    Retry,
    /// Kafka will never take it: move it to dead letters with this reason.
    DeadLetter(&'static str),
    /// Kafka refused the whole topic (unknown, not authorised). That can be
    /// transient (a topic created late, an ACL propagating): retry for the
    /// poison window, then treat as [`DeadLetter`](Self::DeadLetter).
    TopicRefused(&'static str),
    /// The producer itself is unusable (fenced, fatal idempotence error): keep
    /// the event; the producer must be recreated.
    Fatal,
}

/// Classifies a produce error.
pub fn classify(error: &KafkaError) -> ErrorClass {
    use RDKafkaErrorCode as C;
    let Some(code) = error.rdkafka_error_code() else {
        return ErrorClass::Retry;
    };
    match code {
        C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge => {
            ErrorClass::DeadLetter("too_large")
        }
        C::InvalidTopic => ErrorClass::DeadLetter("invalid_topic"),
        C::UnknownTopic | C::UnknownTopicOrPartition => ErrorClass::TopicRefused("unknown_topic"),
        C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed => {
            ErrorClass::TopicRefused("not_authorized")
        }
        C::InvalidRecord => ErrorClass::DeadLetter("invalid_record"),
        C::Fatal | C::ProducerFenced | C::InvalidProducerEpoch | C::Fenced => ErrorClass::Fatal,
        _ => ErrorClass::Retry,
    }
}

/// The dead letter for an event Kafka rejected for good, logged (by seq,
/// uuid and topic: never its payload).
pub fn dead_letter(stored: &StoredEvent, reason: &'static str, error: &KafkaError) -> DeadLetter {
    tracing::warn!(seq = stored.seq, uuid = %stored.event.uuid, topic = %stored.event.topic, reason, error = %error, "kafka rejected event for good; moving it to dead letters");
    DeadLetter {
        seq: stored.seq,
        size: stored.event.size(),
        reason: format!("{reason}: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poison_goes_to_dead_letters_and_outages_are_retried() {
        let e = |c| KafkaError::MessageProduction(c);
        assert_eq!(
            classify(&e(RDKafkaErrorCode::MessageSizeTooLarge)),
            ErrorClass::DeadLetter("too_large")
        );
        // Topic-level refusals may be transient: retried before judged poison.
        assert_eq!(
            classify(&e(RDKafkaErrorCode::TopicAuthorizationFailed)),
            ErrorClass::TopicRefused("not_authorized")
        );
        assert_eq!(
            classify(&e(RDKafkaErrorCode::UnknownTopic)),
            ErrorClass::TopicRefused("unknown_topic")
        );
        assert_eq!(
            classify(&e(RDKafkaErrorCode::UnknownTopicOrPartition)),
            ErrorClass::TopicRefused("unknown_topic")
        );
        assert_eq!(
            classify(&e(RDKafkaErrorCode::MessageTimedOut)),
            ErrorClass::Retry
        );
        assert_eq!(
            classify(&e(RDKafkaErrorCode::AllBrokersDown)),
            ErrorClass::Retry
        );
        assert_eq!(
            classify(&e(RDKafkaErrorCode::NotLeaderForPartition)),
            ErrorClass::Retry
        );
        assert_eq!(
            classify(&e(RDKafkaErrorCode::ProducerFenced)),
            ErrorClass::Fatal
        );
        assert_eq!(classify(&KafkaError::Canceled), ErrorClass::Retry);
    }
}
