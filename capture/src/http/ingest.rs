//! Turning a request body into events: format detection, gzip, limits,
//! per-event validation, stable ids and partition keys. Pure functions: a
//! request either yields every one of its events or one [`Rejection`] naming
//! the first bad event and why.

use std::cell::Cell;
use std::sync::Arc;

use axum::http::StatusCode;
use serde::Deserialize;
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
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
    pub(crate) fn new(status: StatusCode, reason: &'static str, message: String) -> Self {
        Self {
            status,
            reason,
            message,
            index: None,
        }
    }

    pub(crate) fn event(
        index: usize,
        status: StatusCode,
        reason: &'static str,
        message: String,
    ) -> Self {
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
    /// Most events in one request.
    pub max_events: usize,
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

pub use super::gzip::gunzip;

#[derive(Deserialize, Default)]
struct Fields<'a> {
    #[serde(borrow, default)]
    uuid: Option<&'a RawValue>,
    #[serde(borrow, default)]
    key: Option<&'a RawValue>,
}

/// Deepest nesting of arrays and objects accepted in one event (the event
/// object itself is level 1). serde_json's own recursion limit (128) does not
/// apply to the raw-value paths used here (they skip values iteratively), so
/// depth is checked by a scan of its own, below serde_json's limit so that a
/// partition key pointer can always parse an accepted event.
pub const MAX_DEPTH: usize = 100;

/// Memory one parsed event costs beyond its payload bytes, its topic name and
/// a key longer than a UUID: the `NewEvent` itself (104 bytes), its uuid and
/// key allocations, allocator rounding of four allocations, and the split
/// step's slice. Measured: 6,000,000 `{}` events took ~286 bytes each with
/// the `Vec` growing by doubling; this figure is an upper bound with the
/// `Vec` allocated at its exact size.
pub const EVENT_OVERHEAD_BYTES: usize = 320;

/// Parses a whole body into events, or rejects it whole.
pub fn parse(
    body: &[u8],
    format: Format,
    opts: &ParseOptions<'_>,
) -> Result<Vec<NewEvent>, Rejection> {
    parse_bounded(body, format, opts, |_| Ok(()))
}

/// Like [`parse`], but calls `reserve(n)` before allocating `n` bytes of
/// events (an estimate that is never below what is allocated); its error
/// aborts parsing.
pub fn parse_bounded<E: From<Rejection>>(
    body: &[u8],
    format: Format,
    opts: &ParseOptions<'_>,
    mut reserve: impl FnMut(usize) -> Result<(), E>,
) -> Result<Vec<NewEvent>, E> {
    let raws = split(body, format, opts.max_events)?;
    // A JSON body was parsed whole into raw values, which checks every
    // event's syntax; an NDJSON line is only checked when read below.
    let checked = format == Format::Json;
    let fixed = EVENT_OVERHEAD_BYTES + opts.topic.len();
    let payload: usize = raws.iter().map(|r| r.len()).sum();
    reserve(payload + raws.len() * fixed)?;
    let mut events = Vec::with_capacity(raws.len());
    let topic: Arc<str> = Arc::from(opts.topic);
    let mut long_keys = 0usize;
    for (index, raw) in raws.iter().enumerate() {
        let e = event(index, raw, checked, &topic, opts)?;
        long_keys += e.key.len().saturating_sub(36);
        if long_keys >= 64 * 1024 {
            reserve(long_keys)?;
            long_keys = 0;
        }
        events.push(e);
    }
    reserve(long_keys)?;
    Ok(events)
}

fn too_many(max: usize) -> Rejection {
    Rejection::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_events",
        format!("request holds more than {max} events, the limit per request"),
    )
}

/// Splits a body into the raw text of each event, at most `max_events`.
fn split(body: &[u8], format: Format, max_events: usize) -> Result<Vec<&str>, Rejection> {
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
                json_array(text, max_events)?
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
        Format::Ndjson => {
            let mut raws = Vec::new();
            for line in text.split('\n') {
                let line = line.trim_end_matches('\r');
                if line.trim().is_empty() {
                    continue;
                }
                if raws.len() == max_events {
                    return Err(too_many(max_events));
                }
                raws.push(line);
            }
            raws
        }
    };
    if raws.is_empty() {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            "no_events",
            "request holds no event".to_owned(),
        ));
    }
    Ok(raws)
}

/// A JSON array's elements as raw text, stopping at `max` + 1 elements
/// instead of collecting millions of them first.
fn json_array(text: &str, max: usize) -> Result<Vec<&str>, Rejection> {
    struct Capped<'c> {
        max: usize,
        seen: &'c Cell<usize>,
        exceeded: &'c Cell<bool>,
    }
    impl<'de> Visitor<'de> for Capped<'_> {
        type Value = Vec<&'de str>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                if out.len() == self.max {
                    self.exceeded.set(true);
                    return Err(serde::de::Error::custom("too many events"));
                }
                out.push(raw.get());
                self.seen.set(out.len());
            }
            Ok(out)
        }
    }
    impl<'de> DeserializeSeed<'de> for Capped<'_> {
        type Value = Vec<&'de str>;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
    }
    let seen = Cell::new(0);
    let exceeded = Cell::new(false);
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = Capped {
        max,
        seen: &seen,
        exceeded: &exceeded,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    parsed.map_err(|e| {
        if exceeded.get() {
            too_many(max)
        } else {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("body is not a valid JSON array: {e}"),
            )
        }
    })
}

/// What a scan of an event's text found wrong beyond what serde_json checks
/// on the paths used here.
#[derive(Debug, PartialEq, Eq)]
enum Flaw {
    /// Arrays and objects nested deeper than allowed.
    TooDeep,
    /// A `\uXXXX` escape of half a surrogate pair, unpaired. serde_json skips
    /// ignored strings without decoding their escapes, so this is the only
    /// place it is caught; strict readers (serde_json's own `Value`, Go's
    /// `encoding/json` into a string) refuse or mangle such an event.
    LoneSurrogate(u16),
}

/// Scans `raw` (already valid JSON syntax, or about to be checked) for
/// nesting deeper than `max` levels (`[`/`{` outside strings) and unpaired
/// surrogate escapes.
///
/// Nesting can never be deeper than the count of opening brackets, and a
/// surrogate needs a `\u` escape; an event with neither too many brackets nor
/// any `\u` (nearly every event) is cleared by two vectorised passes instead
/// of the byte-by-byte walk, which was a tenth of the request path's CPU.
fn scan_event(raw: &str, max: usize) -> Result<(), Flaw> {
    let b = raw.as_bytes();
    // Counted in byte-wide lanes (255 bytes at most per lane sum), which the
    // compiler vectorises; a plain `filter().count()` it does not.
    let opening: usize = b
        .chunks(255)
        .map(|chunk| {
            let n = chunk
                .iter()
                .fold(0u8, |n, &c| n + u8::from(c == b'[' || c == b'{'));
            usize::from(n)
        })
        .sum();
    if opening <= max && !raw.contains("\\u") {
        return Ok(());
    }
    walk_event(b, max)
}

/// [`scan_event`]'s full walk: one pass over the bytes, tracking strings;
/// escapes are decoded only when a `\u` is seen.
fn walk_event(b: &[u8], max: usize) -> Result<(), Flaw> {
    let hex4 = |at: usize| -> Option<u16> {
        let digits = std::str::from_utf8(b.get(at..at + 4)?).ok()?;
        u16::from_str_radix(digits, 16).ok()
    };
    let mut depth = 0usize;
    let mut in_string = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        i += 1;
        if in_string {
            match c {
                b'"' => in_string = false,
                b'\\' if b.get(i) == Some(&b'u') => {
                    // Malformed hex is serde_json's to report.
                    let Some(unit) = hex4(i + 1) else { continue };
                    i += 5;
                    match unit {
                        0xD800..=0xDBFF => {
                            let low = (b.get(i..i + 2) == Some(b"\\u"))
                                .then(|| hex4(i + 2))
                                .flatten();
                            match low {
                                Some(0xDC00..=0xDFFF) => i += 6,
                                _ => return Err(Flaw::LoneSurrogate(unit)),
                            }
                        }
                        0xDC00..=0xDFFF => return Err(Flaw::LoneSurrogate(unit)),
                        _ => {}
                    }
                }
                b'\\' => i += 1,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(Flaw::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Whether an object's text may hold a member named `uuid` or `key`: such a
/// name is written out in quotes, or with an escape.
fn may_name_a_field(raw: &str) -> bool {
    raw.contains('\\') || raw.contains("\"uuid\"") || raw.contains("\"key\"")
}

/// One event from its raw text; `checked`: its syntax is known to be valid.
fn event(
    index: usize,
    raw: &str,
    checked: bool,
    topic: &Arc<str>,
    opts: &ParseOptions<'_>,
) -> Result<NewEvent, Rejection> {
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
    match scan_event(raw, MAX_DEPTH) {
        Ok(()) => {}
        Err(Flaw::TooDeep) => {
            return Err(bad(
                "too_deeply_nested",
                format!("event {index} nests arrays and objects deeper than {MAX_DEPTH} levels"),
            ));
        }
        Err(Flaw::LoneSurrogate(unit)) => {
            return Err(bad(
                "malformed_json",
                format!(
                    "event {index} is not valid JSON: \\u{unit:04X} is half of a UTF-16 \
                     surrogate pair without its other half"
                ),
            ));
        }
    }
    // Reading the two fields parses the whole object again; valid text that
    // cannot name them has neither, and nothing there to reject.
    let fields: Fields<'_> = if checked && !may_name_a_field(raw) {
        Fields::default()
    } else {
        serde_json::from_str(raw).map_err(|e| {
            bad(
                "malformed_json",
                format!("event {index} is not valid JSON: {e}"),
            )
        })?
    };
    let given = fields.uuid.map(RawValue::get).filter(|v| *v != "null");
    let client_uuid = given.is_some();
    let uuid = match given {
        // A UUIDv7 of the request's capture time and 74 random bits (from
        // the thread's generator, as `new_v4` draws them): no clock read and
        // no lock per event, as `Uuid::now_v7` takes. Ids of one request then
        // share their millisecond and are not ordered within it; the buffer's
        // sequence numbers carry the order.
        None => generated_uuid(opts.now_ms),
        Some(v) => {
            // An owned String: a uuid written with JSON escapes is still a uuid.
            let parsed = serde_json::from_str::<String>(v)
                .ok()
                .and_then(|s| uuid::Uuid::parse_str(&s).ok())
                .ok_or_else(|| {
                    bad(
                        "invalid_uuid",
                        format!("event {index}: uuid must be a UUID string, got {v}"),
                    )
                })?;
            // A zero-valued id field would make every event of a client "one
            // event", which deduplication would then store once.
            if parsed.is_nil() || parsed.is_max() {
                return Err(bad(
                    "invalid_uuid",
                    format!(
                        "event {index}: uuid {parsed} is a sentinel that identifies no event; \
                         send a unique id or none (one is generated)"
                    ),
                ));
            }
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
        topic: topic.clone(),
        key,
        payload: raw.as_bytes().to_vec(),
        captured_at_ms: opts.now_ms,
        client_uuid,
    })
}

fn generated_uuid(now_ms: i64) -> String {
    // Bytes 6..16 of a v4: their version and variant bits fall exactly where
    // the builder overwrites a v7's, so all 74 bits it keeps are random.
    let random = uuid::Uuid::new_v4().into_bytes();
    let mut tail = [0u8; 10];
    tail.copy_from_slice(&random[6..]);
    let ms = u64::try_from(now_ms).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(ms, &tail)
        .into_uuid()
        .to_string()
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
mod tests;
