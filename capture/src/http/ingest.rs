//! Turning a request body into events: format detection, gzip, limits,
//! per-event validation, stable ids and partition keys. Pure functions: a
//! request either yields every one of its events or one [`Rejection`] naming
//! the first bad event and why.

use std::io::Read;

use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::buffer::NewEvent;

/// Body formats accepted by `POST /v1/events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A JSON object or a JSON array of objects.
    Json,
    /// One JSON object per line.
    Ndjson,
}

/// Why a request was refused, as the client will read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable reason (also the metric label).
    pub reason: &'static str,
    /// What was wrong, in words.
    pub message: String,
    /// Index of the offending event in the request, when one is to blame.
    pub index: Option<usize>,
}

impl Rejection {
    fn new(status: StatusCode, reason: &'static str, message: String) -> Self {
        Self {
            status,
            reason,
            message,
            index: None,
        }
    }

    fn event(index: usize, status: StatusCode, reason: &'static str, message: String) -> Self {
        Self {
            status,
            reason,
            message,
            index: Some(index),
        }
    }
}

/// Limits and routing that apply while parsing.
#[derive(Debug, Clone)]
pub struct ParseOptions<'a> {
    /// Topic the events go to.
    pub topic: &'a str,
    /// Largest event, bytes.
    pub max_event_bytes: usize,
    /// JSON pointer for the partition key when an event has no `key`.
    pub key_pointer: Option<&'a str>,
    /// Capture time for every event of the request.
    pub now_ms: i64,
}

/// Picks the format from `Content-Type`.
pub fn format_from_content_type(content_type: Option<&str>) -> Result<Format, Rejection> {
    let unsupported = |ct: &str| {
        Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "content type {ct:?} is not supported; use application/json or application/x-ndjson"
            ),
        )
    };
    let Some(ct) = content_type else {
        return Err(unsupported(""));
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Ok(Format::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Ok(Format::Ndjson),
        _ => Err(unsupported(ct)),
    }
}

/// Decompresses a gzip body, refusing to inflate past `limit` bytes.
pub fn gunzip(body: &[u8], limit: usize) -> Result<Vec<u8>, Rejection> {
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
    let mut decoder = flate2::read::GzDecoder::new(body).take(limit as u64 + 1);
    decoder.read_to_end(&mut out).map_err(|e| {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            "bad_gzip",
            format!("body is not valid gzip: {e}"),
        )
    })?;
    if out.len() > limit {
        return Err(Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("decompressed body exceeds {limit} bytes"),
        ));
    }
    Ok(out)
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    uuid: Option<&'a RawValue>,
    #[serde(borrow, default)]
    key: Option<&'a RawValue>,
}

/// Parses a whole body into events, or rejects it whole.
pub fn parse(
    body: &[u8],
    format: Format,
    opts: &ParseOptions<'_>,
) -> Result<Vec<NewEvent>, Rejection> {
    let text = std::str::from_utf8(body).map_err(|e| {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            "invalid_utf8",
            format!("body is not UTF-8: {e}"),
        )
    })?;
    let raws: Vec<&str> = match format {
        Format::Json => {
            let trimmed = text.trim_start();
            if trimmed.starts_with('[') {
                let items: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| {
                    Rejection::new(
                        StatusCode::BAD_REQUEST,
                        "malformed_json",
                        format!("body is not a valid JSON array: {e}"),
                    )
                })?;
                items.into_iter().map(RawValue::get).collect()
            } else {
                let one: &RawValue = serde_json::from_str(text).map_err(|e| {
                    Rejection::new(
                        StatusCode::BAD_REQUEST,
                        "malformed_json",
                        format!("body is not valid JSON: {e}"),
                    )
                })?;
                vec![one.get()]
            }
        }
        Format::Ndjson => text
            .split('\n')
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| !l.trim().is_empty())
            .collect(),
    };
    if raws.is_empty() {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            "no_events",
            "request holds no event".to_owned(),
        ));
    }
    raws.iter()
        .enumerate()
        .map(|(index, raw)| event(index, raw, opts))
        .collect()
}

fn event(index: usize, raw: &str, opts: &ParseOptions<'_>) -> Result<NewEvent, Rejection> {
    let bad = |reason: &'static str, message: String| {
        Rejection::event(index, StatusCode::BAD_REQUEST, reason, message)
    };
    let raw = raw.trim();
    if raw.len() > opts.max_event_bytes {
        return Err(Rejection::event(
            index,
            StatusCode::PAYLOAD_TOO_LARGE,
            "event_too_large",
            format!(
                "event {index} is {len} bytes, limit {limit}",
                len = raw.len(),
                limit = opts.max_event_bytes
            ),
        ));
    }
    if !raw.starts_with('{') {
        return Err(bad(
            "not_an_object",
            format!("event {index} is not a JSON object"),
        ));
    }
    let fields: Fields<'_> = serde_json::from_str(raw).map_err(|e| {
        bad(
            "malformed_json",
            format!("event {index} is not valid JSON: {e}"),
        )
    })?;
    let uuid = match fields.uuid.map(RawValue::get) {
        None | Some("null") => uuid::Uuid::now_v7().to_string(),
        Some(v) => {
            let parsed = serde_json::from_str::<&str>(v)
                .ok()
                .and_then(|s| uuid::Uuid::parse_str(s).ok())
                .ok_or_else(|| {
                    bad(
                        "invalid_uuid",
                        format!("event {index}: uuid must be a UUID string, got {v}"),
                    )
                })?;
            parsed.hyphenated().to_string()
        }
    };
    let key = match fields.key.map(RawValue::get) {
        Some("null") | None => pointer_key(raw, opts.key_pointer),
        Some(v) => Some(key_bytes(v)),
    }
    .unwrap_or_else(|| uuid.as_bytes().to_vec());
    Ok(NewEvent {
        uuid,
        topic: opts.topic.to_owned(),
        key,
        payload: raw.as_bytes().to_vec(),
        captured_at_ms: opts.now_ms,
    })
}

/// A key's bytes: a string's content, anything else as its JSON text.
fn key_bytes(raw: &str) -> Vec<u8> {
    match serde_json::from_str::<String>(raw) {
        Ok(s) => s.into_bytes(),
        Err(_) => raw.as_bytes().to_vec(),
    }
}

fn pointer_key(raw: &str, pointer: Option<&str>) -> Option<Vec<u8>> {
    let pointer = pointer?;
    let value: serde_json::Value = serde_json::from_str(raw).ok()?;
    match value.pointer(pointer)? {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.as_bytes().to_vec()),
        other => Some(other.to_string().into_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ParseOptions<'static> {
        ParseOptions {
            topic: "t",
            max_event_bytes: 64,
            key_pointer: None,
            now_ms: 7,
        }
    }

    #[test]
    fn parses_object_array_and_ndjson_keeping_payload_bytes() {
        let one = parse(br#"{"a":1}"#, Format::Json, &opts()).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].payload, br#"{"a":1}"#);
        assert_eq!(one[0].captured_at_ms, 7);
        let arr = parse(br#"[{"a":1}, {"b":2}]"#, Format::Json, &opts()).unwrap();
        assert_eq!(arr.len(), 2);
        assert_eq!(arr[1].payload, br#"{"b":2}"#);
        let nd = parse(b"{\"a\":1}\r\n\n{\"b\":2}\n", Format::Ndjson, &opts()).unwrap();
        assert_eq!(nd.len(), 2);
        assert_eq!(nd[1].payload, br#"{"b":2}"#);
    }

    #[test]
    fn keeps_client_uuid_and_generates_v7_otherwise() {
        let evs = parse(
            br#"[{"uuid":"0190A6E2-6F1B-7C3A-9F00-000000000001"},{"x":1}]"#,
            Format::Json,
            &opts(),
        )
        .unwrap();
        assert_eq!(evs[0].uuid, "0190a6e2-6f1b-7c3a-9f00-000000000001");
        let generated = uuid::Uuid::parse_str(&evs[1].uuid).unwrap();
        assert_eq!(generated.get_version_num(), 7);
        assert_eq!(
            evs[1].key,
            evs[1].uuid.as_bytes(),
            "uuid is the default key"
        );
    }

    #[test]
    fn partition_key_from_key_field_then_pointer_then_uuid() {
        let mut o = opts();
        o.key_pointer = Some("/user/id");
        let evs = parse(
            br#"[{"key":"k1","user":{"id":"u"}},{"user":{"id":42}},{"key":5},{"z":0}]"#,
            Format::Json,
            &o,
        )
        .unwrap();
        assert_eq!(evs[0].key, b"k1");
        assert_eq!(evs[1].key, b"42");
        assert_eq!(evs[2].key, b"5");
        assert_eq!(evs[3].key, evs[3].uuid.as_bytes());
    }

    #[test]
    fn rejects_whole_request_when_one_event_is_too_large() {
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(100));
        let body = format!(r#"[{{"a":1}},{big}]"#);
        let r = parse(body.as_bytes(), Format::Json, &opts()).unwrap_err();
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(r.index, Some(1));
        assert!(
            r.message.contains("event 1 is 108 bytes, limit 64"),
            "{}",
            r.message
        );
    }

    #[test]
    fn names_the_bad_event_in_ndjson() {
        let r = parse(b"{\"a\":1}\n{\"a\":\n", Format::Ndjson, &opts()).unwrap_err();
        assert_eq!(
            (r.status, r.index, r.reason),
            (StatusCode::BAD_REQUEST, Some(1), "malformed_json")
        );
        let r = parse(b"[{\"a\":1}, 3]", Format::Json, &opts()).unwrap_err();
        assert_eq!((r.index, r.reason), (Some(1), "not_an_object"));
        let r = parse(br#"{"uuid":"nope"}"#, Format::Json, &opts()).unwrap_err();
        assert_eq!((r.index, r.reason), (Some(0), "invalid_uuid"));
    }

    #[test]
    fn rejects_malformed_and_empty_bodies() {
        assert_eq!(
            parse(b"{\"a\":", Format::Json, &opts()).unwrap_err().reason,
            "malformed_json"
        );
        assert_eq!(
            parse(b"[1,", Format::Json, &opts()).unwrap_err().reason,
            "malformed_json"
        );
        assert_eq!(
            parse(b"[]", Format::Json, &opts()).unwrap_err().reason,
            "no_events"
        );
        assert_eq!(
            parse(b"\n\n", Format::Ndjson, &opts()).unwrap_err().reason,
            "no_events"
        );
        assert_eq!(
            parse(&[0xff, 0xfe], Format::Json, &opts())
                .unwrap_err()
                .reason,
            "invalid_utf8"
        );
    }

    #[test]
    fn gzip_is_bounded_and_validated() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&vec![b'a'; 10_000]).unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(gunzip(&gz, 10_000).unwrap().len(), 10_000);
        assert_eq!(
            gunzip(&gz, 9_999).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(gunzip(b"not gzip", 100).unwrap_err().reason, "bad_gzip");
    }

    #[test]
    fn content_type_selects_format() {
        assert_eq!(
            format_from_content_type(Some("application/json; charset=utf-8")).unwrap(),
            Format::Json
        );
        assert_eq!(
            format_from_content_type(Some("application/x-ndjson")).unwrap(),
            Format::Ndjson
        );
        assert_eq!(
            format_from_content_type(Some("text/plain"))
                .unwrap_err()
                .status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert!(format_from_content_type(None).is_err());
    }
}
