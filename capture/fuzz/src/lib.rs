//! Oracles for the fuzz targets: what must hold for *any* input to the request
//! decoding functions of `holdfast_capture::http::ingest`
//! (`format_from_content_type`, `gunzip`, `parse`). A violated property
//! panics, which libFuzzer reports as a crash with the input that caused it.
//!
//! The properties are the HTTP contract (DESIGN.md, invariant 2): a body is
//! accepted whole or refused whole; a refusal is a 4xx that names its reason
//! and, when one event is to blame, that event's index (the first bad one);
//! an accepted event keeps its bytes, its client uuid and its partition key.

use std::io::Read;

use holdfast_capture::http::ingest::{self, Format, ParseOptions, Rejection};
use serde_json::Value;
use serde_json::value::RawValue;

/// Topic given to the parser.
pub const TOPIC: &str = "events";
/// Capture time given to the parser.
pub const NOW_MS: i64 = 1_700_000_000_000;
/// Event size limit used by the targets (small, to reach the 413 path).
pub const MAX_EVENT_BYTES: usize = 512;
/// Events per request used by the targets (small, to reach the cap).
pub const MAX_EVENTS: usize = 64;
/// Decompressed size limit used by the gzip target.
pub const GUNZIP_LIMIT: usize = 64 * 1024;

/// Parser options the targets use.
pub fn options(key_pointer: Option<&str>) -> ParseOptions<'_> {
    ParseOptions {
        topic: TOPIC,
        max_event_bytes: MAX_EVENT_BYTES,
        max_events: MAX_EVENTS,
        key_pointer,
        now_ms: NOW_MS,
    }
}

/// Every refusal: a 4xx with a reason and words, naming the event it blames.
pub fn check_rejection(r: &Rejection) {
    assert!(r.status.is_client_error(), "refusal is not a 4xx: {r:?}");
    assert!(
        !r.reason.is_empty() && !r.message.is_empty(),
        "refusal without reason: {r:?}"
    );
    if let Some(i) = r.index {
        assert!(
            r.message.contains(&format!("event {i}")),
            "refusal blames event {i} but does not say so: {r:?}"
        );
    }
}

/// `Content-Type` → format: JSON and NDJSON media types (any case, any
/// parameters) are accepted, everything else is a 415.
pub fn check_content_type(content_type: Option<&str>) {
    match ingest::format_from_content_type(content_type) {
        Ok(format) => {
            let mime = content_type
                .expect("no content type accepted")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            let expected = match mime.as_str() {
                "application/json" => Format::Json,
                "application/x-ndjson" | "application/ndjson" | "application/jsonl" => {
                    Format::Ndjson
                }
                other => panic!("accepted media type {other:?}"),
            };
            assert_eq!(format, expected, "{content_type:?}");
        }
        Err(r) => {
            check_rejection(&r);
            assert_eq!(r.status.as_u16(), 415, "{r:?}");
        }
    }
}

/// What a conforming gzip decoder yields: every member, in order; bytes
/// after the last member are an error; `None` when invalid or over `limit`.
pub fn reference_gunzip(body: &[u8], limit: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(body)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .ok()?;
    (out.len() <= limit).then_some(out)
}

/// `gunzip` accepts exactly what the reference decoder accepts within the
/// limit, yields the same bytes, and refuses the rest with a 400 or 413.
pub fn check_gunzip(body: &[u8], limit: usize) -> Option<Vec<u8>> {
    let got = ingest::gunzip(body, limit);
    if let Err(r) = &got {
        check_rejection(r);
        assert!(
            matches!(r.status.as_u16(), 400 | 413),
            "gzip refusal must be 400 or 413: {r:?}"
        );
    }
    let got = got.ok();
    if let Some(out) = &got {
        assert!(out.len() <= limit, "inflated {} > {limit}", out.len());
    }
    // An empty body has no member: either answer is defensible.
    if !body.is_empty() {
        let want = reference_gunzip(body, limit);
        assert_eq!(
            got.as_ref().map(Vec::len),
            want.as_ref().map(Vec::len),
            "gunzip disagrees with a multi-member decoder"
        );
        assert_eq!(got, want, "gunzip output differs from the reference");
    }
    got
}

/// The items a body holds, by the documented splitting rules, or `None` when
/// the body cannot be split (not UTF-8, not JSON).
pub fn items(body: &[u8], format: Format) -> Option<Vec<&str>> {
    let text = std::str::from_utf8(body).ok()?;
    match format {
        Format::Ndjson => Some(
            text.split('\n')
                .map(|l| l.trim_end_matches('\r'))
                .filter(|l| !l.trim().is_empty())
                .collect(),
        ),
        Format::Json if text.trim_start().starts_with('[') => {
            let all: Vec<&RawValue> = serde_json::from_str(text).ok()?;
            Some(all.into_iter().map(RawValue::get).collect())
        }
        Format::Json => {
            let one: &RawValue = serde_json::from_str(text).ok()?;
            Some(vec![one.get()])
        }
    }
}

/// Would this one item, sent alone, be accepted?
fn accepted_alone(item: &str, format: Format, opts: &ParseOptions<'_>) -> bool {
    match format {
        Format::Ndjson => ingest::parse(item.as_bytes(), Format::Ndjson, opts).is_ok(),
        // An array item that is itself an array would be read as a batch.
        Format::Json => {
            item.trim_start().starts_with('{')
                && ingest::parse(item.as_bytes(), Format::Json, opts).is_ok()
        }
    }
}

/// The whole-or-nothing contract of `parse`, plus what an accepted event
/// must look like. Returns how many events were accepted.
pub fn check_parse(body: &[u8], format: Format, opts: &ParseOptions<'_>) -> Option<usize> {
    let result = ingest::parse(body, format, opts);
    let items = items(body, format);
    match result {
        Ok(events) => {
            let items = items.expect("accepted a body that does not split into items");
            assert!(items.len() <= opts.max_events, "accepted past the cap");
            assert_eq!(events.len(), items.len(), "events lost or invented");
            for (event, raw) in events.iter().zip(&items) {
                check_event(event, raw, opts);
            }
            Some(events.len())
        }
        Err(r) => {
            check_rejection(&r);
            if let Some(items) = &items
                && items.len() > opts.max_events
            {
                assert_eq!(
                    (r.status.as_u16(), r.index),
                    (413, None),
                    "{} events, cap {}: {r:?}",
                    items.len(),
                    opts.max_events
                );
                return None;
            }
            match (r.index, items) {
                (Some(i), Some(items)) => {
                    assert!(i < items.len(), "blames event {i} of {}", items.len());
                    assert!(
                        !accepted_alone(items[i], format, opts),
                        "blames event {i}, which is fine alone: {r:?}"
                    );
                    if let Some(j) = (0..i).find(|&j| !accepted_alone(items[j], format, opts)) {
                        panic!("blames event {i}, but event {j} is the first bad one: {r:?}");
                    }
                }
                (Some(i), None) => panic!("blames event {i} of a body with no events: {r:?}"),
                (None, Some(items)) if !items.is_empty() => {
                    // Only a limit on the request as a whole may refuse a
                    // body whose every event is fine on its own.
                    if items.iter().all(|it| accepted_alone(it, format, opts)) {
                        assert_eq!(r.status.as_u16(), 413, "refused good events: {r:?}");
                    }
                }
                (None, _) => {}
            }
            None
        }
    }
}

fn check_event(e: &holdfast_capture::buffer::NewEvent, raw: &str, opts: &ParseOptions<'_>) {
    assert_eq!(&*e.topic, opts.topic);
    assert_eq!(e.captured_at_ms, opts.now_ms);
    assert_eq!(e.payload, raw.trim().as_bytes(), "payload not kept as sent");
    assert!(
        e.payload.len() <= opts.max_event_bytes,
        "event over the limit"
    );
    let id = uuid::Uuid::parse_str(&e.uuid).expect("stored uuid is not a UUID");
    assert_eq!(e.uuid, id.hyphenated().to_string(), "uuid not canonical");
    let value: Value = match serde_json::from_slice(&e.payload) {
        Ok(v) => v,
        // serde_json's tree has no numbers past f64 (`1e400`); the parser
        // skips fields it ignores, so such an event is still accepted.
        // Nesting is capped below serde_json's recursion limit, so a depth
        // error here is a bug. serde_json (with `raw_value`, as here) also
        // reads an object whose first key is its private token
        // `$serde_json::private::RawValue` as a raw value and fails on it:
        // valid JSON that every other reader takes, so it is accepted.
        Err(err) => {
            let m = err.to_string();
            let raw_value_token = raw.contains("$serde_json::private::RawValue");
            assert!(
                m.contains("out of range") || raw_value_token,
                "accepted an event serde_json cannot read: {m}"
            );
            return;
        }
    };
    let object = value.as_object().expect("accepted a non-object");
    match object.get("uuid") {
        None | Some(Value::Null) => assert_eq!(id.get_version_num(), 7, "generated id not v7"),
        Some(Value::String(s)) => {
            let client = uuid::Uuid::parse_str(s).expect("accepted an invalid uuid");
            assert_eq!(id, client, "client uuid not kept");
        }
        Some(other) => panic!("accepted uuid {other}"),
    }
    let pointed = opts
        .key_pointer
        .and_then(|p| value.pointer(p))
        .filter(|v| !v.is_null());
    match (object.get("key").filter(|v| !v.is_null()), pointed) {
        // A `key` field: a string's content, anything else as written.
        (Some(Value::String(s)), _) => assert_eq!(e.key, s.as_bytes(), "key field"),
        (Some(v), _) => {
            let got: Option<Value> = serde_json::from_slice(&e.key).ok();
            assert_eq!(got.as_ref(), Some(v), "key field");
        }
        // The pointed-to value as serde_json reads and writes it (a float may
        // come back with its last digit rounded; the same input always gives
        // the same key).
        (None, Some(Value::String(s))) => assert_eq!(e.key, s.as_bytes(), "pointer key"),
        (None, Some(v)) => assert_eq!(e.key, v.to_string().into_bytes(), "pointer key"),
        (None, None) => assert_eq!(e.key, e.uuid.as_bytes(), "uuid key"),
    }
}
