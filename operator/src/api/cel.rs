//! CEL validation rules (`x-kubernetes-validations`) the API server runs on
//! every create and update, so `kubectl apply` refuses a bad spec at once
//! with a message that names the field. They repeat what
//! [`super::CaptureClusterSpec::validate`] checks at reconcile time (which
//! stays: it also guards specs stored before these rules existed), and
//! they keep the storage fields the claims were made with from changing.
//!
//! Each function is a schemars `transform` on one type of the spec. Rules
//! read only fields with bounded sizes (`maxItems`, `maxProperties`,
//! `maxLength`), so the API server's cost estimate accepts them.

use kube::core::{Message, Reason, Rule, validate};
use schemars::Schema;
use serde_json::json;

use super::{MAX_NAME_LEN, RESERVED_KAFKA_PROPERTIES};

/// Most streams a cluster declares (bounds the cost of the rules on them).
pub const MAX_STREAMS: u32 = 64;
/// Most Kafka properties a cluster sets.
pub const MAX_KAFKA_PROPERTIES: u32 = 256;
/// Longest quantity (`spec.storage.size`).
pub const MAX_QUANTITY_LEN: u32 = 64;
/// Longest Kafka property value.
pub const MAX_PROPERTY_VALUE_LEN: u32 = 4096;

fn add(schema: &mut Schema, rule: Rule) {
    validate(schema, rule).expect("a CEL rule serializes");
}

/// The rule on the root object: the name must fit the names derived from it.
pub fn name_rule() -> Rule {
    Rule::new(format!(
        "self.metadata.name.size() <= {MAX_NAME_LEN} && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
    ))
    .message(Message::Message(format!(
        "metadata.name must be a DNS label (lowercase letters, digits, '-', starting with a letter) of at most {MAX_NAME_LEN} characters: pods, claims and their labels are derived from it"
    )))
    .reason(Reason::FieldValueInvalid)
}

/// `spec`: the default stream names a declared stream.
pub fn spec_rules(schema: &mut Schema) {
    add(
        schema,
        Rule::new(
            "!has(self.defaultStream) || (has(self.streams) && size(self.streams) > 0 ? self.streams.exists(s, s.name == self.defaultStream) : self.defaultStream == 'default')",
        )
        .message("spec.defaultStream must name a stream of spec.streams ('default' when spec.streams is empty)")
        .field_path(".defaultStream")
        .reason(Reason::FieldValueInvalid),
    );
}

/// `spec.streams`: at most [`MAX_STREAMS`], names unique (a list map keyed
/// by `name`: the API server refuses a duplicate as `Duplicate value`).
pub fn streams_list(schema: &mut Schema) {
    let obj = schema.ensure_object();
    obj.insert("maxItems".into(), json!(MAX_STREAMS));
    obj.insert("x-kubernetes-list-type".into(), json!("map"));
    obj.insert("x-kubernetes-list-map-keys".into(), json!(["name"]));
}

/// `spec.kafka`: no reserved or malformed property.
pub fn kafka_rules(schema: &mut Schema) {
    let reserved = RESERVED_KAFKA_PROPERTIES
        .iter()
        .map(|p| format!("'{p}'"))
        .collect::<Vec<_>>()
        .join(", ");
    add(
        schema,
        Rule::new(format!(
            "!has(self.properties) || self.properties.all(k, !(k in [{reserved}]))"
        ))
        .message(Message::Message(format!(
            "spec.kafka.properties may not set {} (the operator sets them: use bootstrapServers, sasl or tls)",
            RESERVED_KAFKA_PROPERTIES.join(", ")
        )))
        .field_path(".properties")
        .reason(Reason::FieldValueForbidden),
    );
    add(
        schema,
        Rule::new(
            "!has(self.properties) || self.properties.all(k, k != '' && k.trim() == k && !k.contains('=') && !k.contains('\\n') && !self.properties[k].contains('\\n'))",
        )
        .message("spec.kafka.properties: names are non-empty, without '=', newlines or surrounding spaces; values have no newlines")
        .field_path(".properties")
        .reason(Reason::FieldValueInvalid),
    );
    // Bound the properties map (and its values) for the rules' cost.
    if let Some(props) = schema
        .ensure_object()
        .get_mut("properties")
        .and_then(|p| p.get_mut("properties"))
        .and_then(|p| p.as_object_mut())
    {
        props.insert("maxProperties".into(), json!(MAX_KAFKA_PROPERTIES));
        if let Some(values) = props
            .get_mut("additionalProperties")
            .and_then(|v| v.as_object_mut())
        {
            values.insert("maxLength".into(), json!(MAX_PROPERTY_VALUE_LEN));
        }
    }
}

/// `spec.kafka.tls`: client certificate and key go together.
pub fn tls_rules(schema: &mut Schema) {
    add(
        schema,
        Rule::new("has(self.certKey) == has(self.keyKey)")
            .message("spec.kafka.tls: certKey and keyKey go together (mutual TLS needs both)")
            .reason(Reason::FieldValueInvalid),
    );
}

/// `spec.storage`: a size in whole bytes, a quota below it, and the fields
/// the claims were made with never change (a StatefulSet's
/// volumeClaimTemplates are immutable, and existing claims would keep the
/// old values anyway).
pub fn storage_rules(schema: &mut Schema) {
    // Bounds the cost of the rules (a quantity is a short string).
    if let Some(size) = schema
        .ensure_object()
        .get_mut("properties")
        .and_then(|p| p.get_mut("size"))
        .and_then(|p| p.as_object_mut())
    {
        size.insert("maxLength".into(), json!(MAX_QUANTITY_LEN));
    }
    let size = "quantity(string(self.size))";
    add(
        schema,
        Rule::new(format!(
            "isQuantity(string(self.size)) && {size}.isInteger() && {size}.asInteger() >= 1"
        ))
        .message("spec.storage.size must be a quantity of whole bytes (e.g. 10Gi)")
        .field_path(".size")
        .reason(Reason::FieldValueInvalid),
    );
    add(
        schema,
        Rule::new(format!(
            "!has(self.bufferQuotaBytes) || !isQuantity(string(self.size)) || {size}.asApproximateFloat() > double(self.bufferQuotaBytes)"
        ))
        .message("spec.storage.bufferQuotaBytes must be below spec.storage.size: SQLite needs room beyond the events")
        .field_path(".bufferQuotaBytes")
        .reason(Reason::FieldValueInvalid),
    );
    add(
        schema,
        Rule::new(
            "!isQuantity(string(oldSelf.size)) || (isQuantity(string(self.size)) && quantity(string(self.size)).compareTo(quantity(string(oldSelf.size))) == 0)",
        )
        .message("spec.storage.size is immutable: the claims were made with the old size; create a new CaptureCluster to resize")
        .field_path(".size")
        .reason(Reason::FieldValueForbidden),
    );
    add(
        schema,
        Rule::new(
            "has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)",
        )
        .message("spec.storage.storageClassName is immutable: the claims were made with the old class")
        .field_path(".storageClassName")
        .reason(Reason::FieldValueForbidden),
    );
    add(
        schema,
        Rule::new(
            "(has(self.accessMode) ? self.accessMode : 'ReadWriteOnce') == (has(oldSelf.accessMode) ? oldSelf.accessMode : 'ReadWriteOnce')",
        )
        .message("spec.storage.accessMode is immutable: the claims were made with the old access mode")
        .field_path(".accessMode")
        .reason(Reason::FieldValueForbidden),
    );
}
