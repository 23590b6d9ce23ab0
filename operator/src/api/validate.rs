//! What the schema cannot check: cross-field rules, quantities, reserved
//! Kafka properties. Each refusal names the field ([`InvalidSpec`]), so the
//! reconciler can refuse a spec without applying anything.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::{CaptureClusterSpec, MAX_NAME_LEN, RESERVED_KAFKA_PROPERTIES};

/// A spec the reconciler refuses, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidSpec {
    /// JSON path of the field, e.g. `spec.storage.bufferQuotaBytes`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InvalidSpec {
    InvalidSpec {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Parses a Kubernetes quantity into bytes (`512Mi`, `10Gi`, `1G`, `1e9`,
/// `1000`); `None` when it is not one or is fractional below a byte.
pub fn quantity_bytes(quantity: &Quantity) -> Option<u64> {
    let text = quantity.0.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    let bytes = number * factor;
    (bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

impl CaptureClusterSpec {
    /// What the schema cannot check. `name` is the CaptureCluster's name.
    pub fn validate(&self, name: &str) -> Result<(), InvalidSpec> {
        if !is_dns_label(name) || name.len() > MAX_NAME_LEN {
            return Err(invalid(
                "metadata.name",
                format!(
                    "must be a DNS label (lowercase letters, digits, '-', starting with a letter) of at most {MAX_NAME_LEN} characters"
                ),
            ));
        }
        if self.replicas < 0 {
            return Err(invalid("spec.replicas", "must be 0 or more"));
        }
        if self.image.trim().is_empty() {
            return Err(invalid("spec.image", "must not be empty"));
        }
        let kafka = &self.kafka;
        if kafka.bootstrap_servers.trim().is_empty()
            || kafka.bootstrap_servers.split(',').any(|s| {
                s.trim()
                    .rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            })
        {
            return Err(invalid(
                "spec.kafka.bootstrapServers",
                format!(
                    "{:?} is not a comma-separated list of host:port",
                    kafka.bootstrap_servers
                ),
            ));
        }
        for (key, value) in &kafka.properties {
            let field = format!("spec.kafka.properties[{key}]");
            if key.trim().is_empty() || key.contains(['=', '\n']) || key.trim() != key {
                return Err(invalid(
                    field,
                    "property names are non-empty, without '=', newlines or surrounding spaces",
                ));
            }
            if value.contains('\n') {
                return Err(invalid(field, "values must not contain newlines"));
            }
            if RESERVED_KAFKA_PROPERTIES.contains(&key.as_str()) {
                return Err(invalid(
                    field,
                    "is set by the operator (use bootstrapServers, sasl or tls)",
                ));
            }
        }
        if let Some(tls) = &kafka.tls
            && tls.cert_key.is_some() != tls.key_key.is_some()
        {
            return Err(invalid(
                "spec.kafka.tls",
                "certKey and keyKey go together (mutual TLS needs both)",
            ));
        }
        let mut names = BTreeSet::new();
        for (i, stream) in self.streams.iter().enumerate() {
            let valid = |s: &str| {
                !s.is_empty()
                    && s.len() <= 249
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            };
            if !valid(&stream.name) {
                return Err(invalid(
                    format!("spec.streams[{i}].name"),
                    "must match [A-Za-z0-9._-]{1,249}",
                ));
            }
            if !valid(&stream.topic) {
                return Err(invalid(
                    format!("spec.streams[{i}].topic"),
                    "must be a Kafka topic name [A-Za-z0-9._-]{1,249}",
                ));
            }
            if !names.insert(stream.name.as_str()) {
                return Err(invalid(
                    format!("spec.streams[{i}].name"),
                    format!("stream {} is declared twice", stream.name),
                ));
            }
        }
        if let Some(default) = &self.default_stream
            && !self.effective_streams().iter().any(|s| &s.name == default)
        {
            return Err(invalid(
                "spec.defaultStream",
                format!("names no stream in spec.streams ({default})"),
            ));
        }
        if let Some(pointer) = &self.partition_key_pointer
            && !pointer.starts_with('/')
        {
            return Err(invalid(
                "spec.partitionKeyPointer",
                "a JSON pointer starts with '/'",
            ));
        }
        let Some(size) = self.storage_bytes() else {
            return Err(invalid(
                "spec.storage.size",
                format!(
                    "{:?} is not a quantity of bytes (e.g. 10Gi)",
                    self.storage.size.0
                ),
            ));
        };
        if let Some(quota) = self.storage.buffer_quota_bytes {
            if quota == 0 {
                return Err(invalid(
                    "spec.storage.bufferQuotaBytes",
                    "must be at least 1",
                ));
            }
            if quota >= size {
                return Err(invalid(
                    "spec.storage.bufferQuotaBytes",
                    format!(
                        "{quota} must be below spec.storage.size ({size} bytes): SQLite needs room beyond the events"
                    ),
                ));
            }
        }
        if self.shutdown_grace_period_seconds < 10 {
            return Err(invalid(
                "spec.shutdownGracePeriodSeconds",
                "must be at least 10",
            ));
        }
        if self.orphan_recovery.max_parallel_flush_jobs == 0 {
            return Err(invalid(
                "spec.orphanRecovery.maxParallelFlushJobs",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}
