//! The HTTP API as an OpenAPI 3.1 document, generated with utoipa from the
//! handlers' `#[utoipa::path]` attributes and the body types they answer with
//! ([`super::Accepted`], [`super::ErrorBody`]).
//!
//! It owns [`REASONS`], the one list of every `error` code a refusal can
//! carry, with its status. The invariant, kept by the tests beside this file:
//! the document lists every route the router registers, every code the
//! handlers and the server can send and every code of the README's table,
//! and nothing else; `docs/openapi.json` is this document byte for byte
//! (`make openapi` rewrites it), and `GET /openapi.json` serves it.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{
    Content, HeaderBuilder, Ref, RefOr, Required, ResponseBuilder, response::Response as Answer,
};
use utoipa::{IntoParams, IntoResponses, OpenApi, PartialSchema, ToSchema};

/// One `error` code: the status it comes with and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasonDoc {
    /// The machine-readable code (the body's `error`, the metric's `reason`).
    pub code: &'static str,
    /// HTTP status it is sent with.
    pub status: u16,
    /// What it means, for the document.
    pub doc: &'static str,
}

const fn reason(code: &'static str, status: u16, doc: &'static str) -> ReasonDoc {
    ReasonDoc { code, status, doc }
}

/// Every `error` code a refusal can carry, grouped by status.
pub const REASONS: &[ReasonDoc] = &[
    reason(
        "malformed_json",
        400,
        "the body, or the event at `index`, is not valid JSON",
    ),
    reason(
        "not_an_object",
        400,
        "the event at `index` is not a JSON object",
    ),
    reason(
        "too_deeply_nested",
        400,
        "the event at `index` nests arrays and objects past 100 levels",
    ),
    reason(
        "invalid_uuid",
        400,
        "the event at `index` has a `uuid` that is not a UUID string, or is the nil or max UUID (which identify no event)",
    ),
    reason("no_events", 400, "the body holds no event"),
    reason("invalid_utf8", 400, "the (decompressed) body is not UTF-8"),
    reason(
        "bad_gzip",
        400,
        "the body is not gzip, or has bytes after its last gzip member that are not gzip",
    ),
    reason(
        "body_read_failed",
        400,
        "the body could not be read to its end; the connection is closed",
    ),
    reason(
        "rejected_by_kafka",
        400,
        "direct streams: Kafka refused the event at `index` for good; the message says how many were delivered",
    ),
    reason(
        "unauthorized",
        401,
        "bearer token missing or wrong (only when the pod has `--auth-tokens-file`)",
    ),
    reason(
        "unknown_stream",
        404,
        "no stream of that name is configured",
    ),
    reason(
        "body_timeout",
        408,
        "the body did not arrive within `--body-read-timeout-secs`; the connection is closed",
    ),
    reason(
        "body_too_large",
        413,
        "the body is past `--max-body-bytes` as sent, or past `--max-decompressed-bytes` after gzip; the connection is closed",
    ),
    reason(
        "event_too_large",
        413,
        "the event at `index` is past `--max-event-bytes`",
    ),
    reason(
        "too_many_events",
        413,
        "the request holds more than `--max-events-per-request` events",
    ),
    reason(
        "request_too_large",
        413,
        "the request needs more memory than `--max-inflight-bytes` alone",
    ),
    reason(
        "request_exceeds_quota",
        413,
        "the request alone is larger than `--buffer-quota-bytes`: no retry can succeed; split it",
    ),
    reason(
        "unsupported_media_type",
        415,
        "`Content-Type` is neither `application/json` nor `application/x-ndjson`",
    ),
    reason(
        "unsupported_encoding",
        415,
        "`Content-Encoding` is neither `gzip` nor `identity`",
    ),
    reason(
        "buffer_full",
        503,
        "the buffer is at `--buffer-quota-bytes`",
    ),
    reason(
        "disk_full",
        503,
        "the volume's free space is down to what deletes and checkpoints need",
    ),
    reason(
        "buffer_unavailable",
        503,
        "the disk failed (with `--on-disk-failure reject`)",
    ),
    reason("starting", 503, "the pod has not finished starting"),
    reason("shutting_down", 503, "the pod is shutting down"),
    reason(
        "kafka_unavailable",
        503,
        "direct streams: Kafka did not acknowledge in time",
    ),
    reason(
        "server_busy",
        503,
        "requests in flight hold `--max-inflight-bytes`",
    ),
    reason(
        "too_many_connections",
        503,
        "past `--max-connections`, on any route; the connection is closed",
    ),
];

/// The machine-readable `error` code of a refusal: a string enum of [`REASONS`].
pub struct Reason;

impl PartialSchema for Reason {
    fn schema() -> RefOr<Schema> {
        let list: String = REASONS
            .iter()
            .map(|r| format!("\n- `{}` ({}): {}", r.code, r.status, r.doc))
            .collect();
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(REASONS.iter().map(|r| r.code)))
            .description(Some(format!(
                "Why the request was refused. Stable: clients may branch on it.{list}"
            )))
            .into()
    }
}

impl ToSchema for Reason {}

/// One event: a JSON object, stored and forwarded byte for byte as sent.
pub struct Event;

impl PartialSchema for Event {
    fn schema() -> RefOr<Schema> {
        let uuid = ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::SchemaType::Array(vec![
                Type::String,
                Type::Null,
            ]))
            .format(Some(utoipa::openapi::SchemaFormat::Custom("uuid".to_owned())))
            .description(Some(
                "Stable id (Kafka header `holdfast-uuid`); a UUIDv7 is generated when absent or null. \
                 An event whose uuid was stored recently is acknowledged again, not stored twice.",
            ));
        let key = ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::SchemaType::AnyValue)
            .description(Some(
                "Partition key: a string's content, any other value as its JSON text. When absent \
                 or null: the value at `--partition-key-pointer`, else the uuid.",
            ));
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("uuid", uuid)
            .property("key", key)
            .additional_properties(Some(
                utoipa::openapi::schema::AdditionalProperties::FreeForm(true),
            ))
            .description(Some(
                "Any JSON object up to `--max-event-bytes`, nesting at most 100 levels.",
            ))
            .into()
    }
}

impl ToSchema for Event {
    fn schemas(out: &mut Vec<(String, RefOr<Schema>)>) {
        out.push((Event::name().into_owned(), Event::schema()));
    }
}

/// An `application/json` body: one event or an array of events.
pub struct Events;

impl PartialSchema for Events {
    fn schema() -> RefOr<Schema> {
        let event = Ref::from_schema_name(Event::name());
        OneOfBuilder::new()
            .item(event.clone())
            .item(ArrayBuilder::new().items(event))
            .description(Some(
                "One event, or an array of events (at most `--max-events-per-request`).",
            ))
            .into()
    }
}

impl ToSchema for Events {
    fn schemas(out: &mut Vec<(String, RefOr<Schema>)>) {
        Event::schemas(out);
    }
}

/// An `application/x-ndjson` body: one event per line.
pub struct NdjsonEvents;

impl PartialSchema for NdjsonEvents {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "One event (see `Event`) per line; blank lines are skipped. \
                 `application/ndjson` and `application/jsonl` are accepted too.",
            ))
            .into()
    }
}

impl ToSchema for NdjsonEvents {}

/// The request headers of `POST /v1/events` besides `Content-Type` and `Authorization`.
pub struct IngestHeaders;

impl IntoParams for IngestHeaders {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let encoding = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(["gzip", "x-gzip", "identity"]));
        vec![
            ParameterBuilder::new()
                .name("Content-Encoding")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .schema(Some(encoding))
                .description(Some(
                    "`gzip` for a gzip body (several members are decoded in turn); \
                     limited before and after decompression.",
                ))
                .build(),
        ]
    }
}

/// Every answer of `POST /v1/events` (the default stream: never 404).
pub struct IngestResponses;

impl IntoResponses for IngestResponses {
    fn responses() -> BTreeMap<String, RefOr<Answer>> {
        ingest_responses(false)
    }
}

/// Every answer of `POST /v1/events/{stream}`.
pub struct StreamIngestResponses;

impl IntoResponses for StreamIngestResponses {
    fn responses() -> BTreeMap<String, RefOr<Answer>> {
        ingest_responses(true)
    }
}

fn ingest_responses(named_stream: bool) -> BTreeMap<String, RefOr<Answer>> {
    let mut out = BTreeMap::new();
    let accepted = Content::new(Some(Ref::from_schema_name(super::Accepted::name())));
    out.insert(
        "200".to_owned(),
        ResponseBuilder::new()
            .description(
                "Every event of the request is kept: in a committed (by default fsynced) SQLite \
                 transaction for a durable stream, acknowledged by Kafka for a direct one.",
            )
            .content("application/json", accepted)
            .build()
            .into(),
    );
    let mut statuses: Vec<u16> = REASONS.iter().map(|r| r.status).collect();
    statuses.dedup();
    for status in statuses {
        let codes: Vec<&ReasonDoc> = REASONS
            .iter()
            .filter(|r| r.status == status && (named_stream || r.code != "unknown_stream"))
            .collect();
        if codes.is_empty() {
            continue;
        }
        let list: String = codes
            .iter()
            .map(|r| format!("\n- `{}`: {}", r.code, r.doc))
            .collect();
        let summary = match status {
            503 => "Not now: nothing was written; retry after `Retry-After` seconds.",
            _ => "Refused: nothing of the request was written.",
        };
        let body = Content::new(Some(Ref::from_schema_name(super::ErrorBody::name())));
        let mut answer = ResponseBuilder::new()
            .description(format!("{summary} `error` is one of:{list}"))
            .content("application/json", body);
        if status == 503 {
            answer = answer.header(
                "Retry-After",
                HeaderBuilder::new()
                    .schema(Some(<u64 as PartialSchema>::schema()))
                    .description(Some("Seconds to wait (`--retry-after-secs`)."))
                    .build(),
            );
        }
        if status == 401 {
            answer = answer.header(
                "WWW-Authenticate",
                HeaderBuilder::new()
                    .schema(Some(<String as PartialSchema>::schema()))
                    .description(Some("`Bearer`"))
                    .build(),
            );
        }
        out.insert(status.to_string(), answer.build().into());
    }
    out.insert(
        "431".to_owned(),
        ResponseBuilder::new()
            .description("The request head is past `--max-header-bytes` (no body); on any route.")
            .build()
            .into(),
    );
    out
}

/// Adds the optional bearer-token scheme.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description = Some(
            "Only when the pod runs with `--auth-tokens-file`: one of its tokens, compared in \
             constant time. Without that flag the POST routes need no token."
                .to_owned(),
        );
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Holdfast capture",
        description = "Events over HTTP, acknowledged once they are safe on the pod's own disk \
            (or, for a direct stream, in Kafka), delivered to Kafka in the background. A request \
            is kept whole or not at all: a refusal writes nothing and its JSON body says why \
            (`error`, see `Reason`) and, when one event is to blame, which (`index`). Any route \
            may also get `431` (request head too large) or `503 too_many_connections` from the \
            server before routing."
    ),
    paths(
        super::post_default,
        super::post_stream,
        super::healthz,
        super::readyz,
        super::metrics,
        serve
    ),
    components(schemas(super::Accepted, super::ErrorBody, Reason, Event, Events, NdjsonEvents)),
    modifiers(&BearerAuth),
    tags(
        (name = "events", description = "Event ingestion"),
        (name = "operations", description = "Probes, metrics and this document")
    )
)]
struct ApiDoc;

/// The OpenAPI document of the capture HTTP API.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as `docs/openapi.json` holds it (pretty JSON, final newline).
pub fn document_json() -> String {
    let mut text = document()
        .to_pretty_json()
        .expect("an OpenAPI document serializes to JSON");
    text.push('\n');
    text
}

static DOCUMENT: LazyLock<String> = LazyLock::new(document_json);

/// This document (what `docs/openapi.json` holds).
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI document", body = serde_json::Value))
)]
pub(super) async fn serve() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
        .into_response()
}

#[cfg(test)]
#[path = "openapi_tests.rs"]
mod tests;
