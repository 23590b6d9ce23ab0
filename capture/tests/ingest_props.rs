//! Property tests of request decoding (`holdfast_capture::http::ingest`),
//! through its public functions only: no input panics; a request is taken
//! whole or refused whole; a refusal is a 4xx that names its reason and,
//! when one event is to blame, the first such event's index; gzip bodies
//! (one member or several) decode to what was compressed.
//!
//! The coverage-guided fuzz targets in `capture/fuzz` check the same
//! contract on arbitrary bytes; these generate well-formed requests with
//! known defects, so they can say exactly which answer is right.

use std::io::Write;

use holdfast_capture::http::ingest::{
    Format, MAX_DEPTH, ParseOptions, Rejection, format_from_content_type, gunzip, parse,
};
use proptest::prelude::*;
use serde_json::{Value, json};

const MAX_EVENT_BYTES: usize = 1024;
const MAX_EVENTS: usize = 12;
const POINTER: &str = "/user/id";

fn opts() -> ParseOptions<'static> {
    ParseOptions {
        topic: "events",
        max_event_bytes: MAX_EVENT_BYTES,
        max_events: MAX_EVENTS,
        key_pointer: Some(POINTER),
        now_ms: 42,
    }
}

/// One event of a generated request: its text and what should become of it.
#[derive(Debug, Clone)]
enum Ev {
    /// Valid: the canonical uuid the client gave (if any) and the key bytes
    /// it should get (`None`: its uuid).
    Good {
        text: String,
        uuid: Option<String>,
        key: Option<Vec<u8>>,
    },
    /// Refused with this status and reason.
    Bad {
        text: String,
        status: u16,
        reason: &'static str,
    },
}

impl Ev {
    fn text(&self) -> &str {
        match self {
            Ev::Good { text, .. } | Ev::Bad { text, .. } => text,
        }
    }
    fn is_malformed(&self) -> bool {
        matches!(
            self,
            Ev::Bad {
                reason: "malformed_json",
                ..
            }
        )
    }
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        // Any characters: quotes, backslashes, controls, non-ASCII.
        any::<String>().prop_map(|s| json!(s.chars().take(12).collect::<String>())),
    ]
}

fn uuid_text() -> impl Strategy<Value = (String, String)> {
    (any::<u128>(), 0..4u8).prop_map(|(n, style)| {
        let id = uuid::Uuid::from_u128(n);
        let text = match style {
            0 => id.hyphenated().to_string(),
            1 => id.hyphenated().to_string().to_uppercase(),
            2 => id.simple().to_string(),
            _ => id.braced().to_string(),
        };
        (text, id.hyphenated().to_string())
    })
}

fn good() -> impl Strategy<Value = Ev> {
    (
        proptest::collection::btree_map("[a-z]{1,6}", scalar(), 0..4),
        proptest::option::of(uuid_text()),
        proptest::option::of(scalar()),
        proptest::option::of(scalar()),
    )
        .prop_map(|(fields, uuid, key, user_id)| {
            let mut obj: serde_json::Map<String, Value> = fields
                .into_iter()
                .filter(|(k, _)| !matches!(k.as_str(), "uuid" | "key" | "user"))
                .collect();
            if let Some((text, _)) = &uuid {
                obj.insert("uuid".into(), json!(text));
            }
            if let Some(k) = &key {
                obj.insert("key".into(), k.clone());
            }
            if let Some(id) = &user_id {
                obj.insert("user".into(), json!({ "id": id }));
            }
            let as_key = |v: &Value| match v {
                Value::Null => None,
                Value::String(s) => Some(s.as_bytes().to_vec()),
                other => Some(other.to_string().into_bytes()),
            };
            let text = Value::Object(obj).to_string();
            // A `key` field is taken as written; a pointed-to value is read
            // back by serde_json first, which may round a float's last digit.
            let reread: Value = serde_json::from_str(&text).unwrap();
            let key = key
                .as_ref()
                .and_then(as_key)
                .or_else(|| reread.pointer(POINTER).and_then(as_key));
            Ev::Good {
                text,
                uuid: uuid.map(|(_, canonical)| canonical),
                key,
            }
        })
}

fn bad() -> impl Strategy<Value = Ev> {
    let bad = |text: String, status: u16, reason: &'static str| Ev::Bad {
        text,
        status,
        reason,
    };
    prop_oneof![
        prop_oneof![
            Just("42"),
            Just("\"text\""),
            Just("[1,2]"),
            Just("true"),
            Just("null")
        ]
        .prop_map(move |t| bad(t.to_owned(), 400, "not_an_object")),
        prop_oneof![
            Just("{\"a\":"),
            Just("{\"a\" 1}"),
            Just("{\"a\":1,}"),
            Just("{'a':1}")
        ]
        .prop_map(move |t| bad(t.to_owned(), 400, "malformed_json")),
        prop_oneof![
            Just(json!({"uuid": "not-a-uuid"})),
            Just(json!({"uuid": 7})),
            Just(json!({"uuid": {"id": 1}})),
            Just(json!({"uuid": "0190a6e2-6f1b-7c3a-9f00-00000000000"})),
        ]
        .prop_map(move |v| bad(v.to_string(), 400, "invalid_uuid")),
        (MAX_EVENT_BYTES..MAX_EVENT_BYTES * 2).prop_map(move |n| bad(
            json!({ "pad": "x".repeat(n) }).to_string(),
            413,
            "event_too_large"
        )),
        (1..20usize).prop_map(move |extra| {
            let depth = MAX_DEPTH + extra;
            let text = format!(
                "{{\"a\":{}{}}}",
                "[".repeat(depth - 1),
                "]".repeat(depth - 1)
            );
            bad(text, 400, "too_deeply_nested")
        }),
    ]
}

fn events() -> impl Strategy<Value = Vec<Ev>> {
    proptest::collection::vec(prop_oneof![4 => good(), 1 => bad()], 1..MAX_EVENTS + 4)
}

/// How the events are laid out in a body.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Ndjson,
    Array,
    /// A single JSON object (only with one event).
    Single,
}

/// Whitespace between and around events (JSON's own, and `\r\n` in NDJSON).
fn spacer() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![Just(" "), Just("\t"), Just("\n"), Just("\r\n")],
        0..3,
    )
    .prop_map(|v| v.concat())
}

fn body(evs: &[Ev], shape: Shape, pads: &[String]) -> Vec<u8> {
    let pad = |i: usize| {
        pads[i % pads.len()].replace(
            '\n',
            if matches!(shape, Shape::Ndjson) {
                "\n"
            } else {
                " "
            },
        )
    };
    match shape {
        Shape::Ndjson => evs
            .iter()
            .enumerate()
            // A line may start and end with spaces and tabs; blank lines and
            // `\r\n` endings are allowed.
            .map(|(i, e)| {
                format!(
                    "{}{}\t \n{}",
                    pad(i).replace(['\n', '\r'], ""),
                    e.text(),
                    pad(i + 1)
                )
            })
            .collect::<String>()
            .into_bytes(),
        Shape::Array => {
            let items: Vec<String> = evs
                .iter()
                .enumerate()
                .map(|(i, e)| format!("{}{}{}", pad(i), e.text(), pad(i + 1)))
                .collect();
            format!("{}[{}]{}", pad(0), items.join(","), pad(1)).into_bytes()
        }
        Shape::Single => format!("{}{}{}", pad(0), evs[0].text(), pad(1)).into_bytes(),
    }
}

/// The one right answer for a request of these events.
fn check(
    evs: &[Ev],
    shape: Shape,
    got: Result<Vec<holdfast_capture::buffer::NewEvent>, Rejection>,
) {
    let first_bad = evs.iter().position(|e| matches!(e, Ev::Bad { .. }));
    let malformed = evs.iter().position(Ev::is_malformed);
    let whole = |r: &Rejection, status: u16, reason: &str| {
        assert_eq!(
            (r.status.as_u16(), r.reason, r.index),
            (status, reason, None),
            "{r:?}"
        );
    };
    match shape {
        // The count is known before any event is read.
        Shape::Ndjson if evs.len() > MAX_EVENTS => {
            return whole(&got.unwrap_err(), 413, "too_many_events");
        }
        // An array is read element by element: a syntax error at or before
        // the element past the cap wins; the cap is hit otherwise.
        Shape::Array if malformed.is_some_and(|m| m <= MAX_EVENTS) => {
            return whole(&got.unwrap_err(), 400, "malformed_json");
        }
        Shape::Array if evs.len() > MAX_EVENTS => {
            return whole(&got.unwrap_err(), 413, "too_many_events");
        }
        Shape::Single if malformed.is_some() => {
            return whole(&got.unwrap_err(), 400, "malformed_json");
        }
        _ => {}
    }
    match first_bad {
        Some(i) => {
            let r = got.expect_err("a request with a bad event must be refused whole");
            let Ev::Bad { status, reason, .. } = &evs[i] else {
                unreachable!()
            };
            assert_eq!(
                (r.status.as_u16(), r.reason, r.index),
                (*status, *reason, Some(i)),
                "{r:?}"
            );
            assert!(r.message.contains(&format!("event {i}")), "{r:?}");
        }
        None => {
            let stored = got.expect("a request of good events must be taken whole");
            assert_eq!(stored.len(), evs.len());
            for (e, ev) in stored.iter().zip(evs) {
                let Ev::Good { text, uuid, key } = ev else {
                    unreachable!()
                };
                assert_eq!(e.payload, text.as_bytes(), "payload kept byte for byte");
                assert_eq!((&*e.topic, e.captured_at_ms), ("events", 42));
                match uuid {
                    Some(u) => assert_eq!(&e.uuid, u),
                    None => {
                        let id = uuid::Uuid::parse_str(&e.uuid).unwrap();
                        assert_eq!(id.get_version_num(), 7);
                    }
                }
                let want_key = key.clone().unwrap_or_else(|| e.uuid.as_bytes().to_vec());
                assert_eq!(e.key, want_key, "partition key");
            }
        }
    }
}

fn gz(members: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in members {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(m).unwrap();
        out.extend(enc.finish().unwrap());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_refusals_are_4xx(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        for format in [Format::Json, Format::Ndjson] {
            if let Err(r) = parse(&bytes, format, &opts()) {
                prop_assert!(r.status.is_client_error(), "{r:?}");
                prop_assert!(!r.reason.is_empty() && !r.message.is_empty());
            }
        }
        if let Err(r) = gunzip(&bytes, 4096) {
            prop_assert!(matches!(r.status.as_u16(), 400 | 413), "{r:?}");
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Err(r) = format_from_content_type(Some(&text)) {
            prop_assert_eq!(r.status.as_u16(), 415);
        }
    }

    #[test]
    fn a_request_is_taken_whole_or_refused_whole_naming_the_first_bad_event(
        evs in events(),
        shape in 0..3u8,
        pads in proptest::collection::vec(spacer(), 1..4),
    ) {
        let shape = match shape {
            0 => Shape::Ndjson,
            1 => Shape::Array,
            _ => Shape::Single,
        };
        let evs = if matches!(shape, Shape::Single) { evs[..1].to_vec() } else { evs };
        let format = if matches!(shape, Shape::Ndjson) { Format::Ndjson } else { Format::Json };
        let b = body(&evs, shape, &pads);
        check(&evs, shape, parse(&b, format, &opts()));
    }

    #[test]
    fn gzip_bodies_in_any_number_of_members_decode_to_what_was_compressed(
        evs in proptest::collection::vec(good(), 1..MAX_EVENTS),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
    ) {
        let plain = body(&evs, Shape::Ndjson, &[String::new()]);
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(plain.len() + 1)).collect();
        at.sort_unstable();
        let mut members = Vec::new();
        let mut from = 0;
        for to in at.into_iter().chain([plain.len()]) {
            members.push(&plain[from..to]);
            from = to;
        }
        let body = gz(&members);
        prop_assert_eq!(gunzip(&body, plain.len()).unwrap(), plain.clone());
        if !plain.is_empty() {
            let r = gunzip(&body, plain.len() - 1).unwrap_err();
            prop_assert_eq!((r.status.as_u16(), r.reason), (413, "body_too_large"));
        }
        check(&evs, Shape::Ndjson, parse(&gunzip(&body, 1 << 20).unwrap(), Format::Ndjson, &opts()));
        // Bytes after the last member are not gzip: refused, not ignored.
        let mut trailing = body.clone();
        trailing.extend_from_slice(b"{\"smuggled\":1}\n");
        let r = gunzip(&trailing, 1 << 20).unwrap_err();
        prop_assert_eq!((r.status.as_u16(), r.reason), (400, "bad_gzip"));
        // A truncated body is refused.
        let r = gunzip(&body[..body.len() - 1], 1 << 20).unwrap_err();
        prop_assert_eq!(r.status.as_u16(), 400);
    }

    #[test]
    fn content_type_is_matched_without_case_or_parameters(
        base in prop_oneof![
            Just(("application/json", Some(Format::Json))),
            Just(("application/x-ndjson", Some(Format::Ndjson))),
            Just(("application/ndjson", Some(Format::Ndjson))),
            Just(("application/jsonl", Some(Format::Ndjson))),
            Just(("text/plain", None)),
            Just(("application/json-patch", None)),
            Just(("application/xml", None)),
        ],
        upper in proptest::collection::vec(any::<bool>(), 24),
        params in "(; ?[a-z]{1,8}=[a-z0-9-]{1,8}){0,2}",
        space in " {0,2}",
    ) {
        let (mime, want) = base;
        let mixed: String = mime
            .chars()
            .zip(upper.iter().cycle())
            .map(|(c, &u)| if u { c.to_ascii_uppercase() } else { c })
            .collect();
        let header = format!("{space}{mixed}{space}{params}");
        match (format_from_content_type(Some(&header)), want) {
            (Ok(f), Some(w)) => prop_assert_eq!(f, w),
            (Err(r), None) => {
                prop_assert_eq!(r.status.as_u16(), 415);
                prop_assert!(r.message.contains(header.as_str()), "{:?}", r);
            }
            (got, want) => prop_assert!(false, "{header:?}: got {got:?}, want {want:?}"),
        }
    }
}

/// A uuid is a JSON string like any other: `"\u0030190…"` is the same uuid
/// as `"0190…"`. The parser reads it as a borrowed `&str`, which serde_json
/// cannot give for a string with escapes, so the event is refused with
/// `invalid_uuid`. Fix: read it as `String` (or `Cow<str>`) in
/// `ingest::event`.
#[test]
fn accepts_a_client_uuid_written_with_json_escapes() {
    let body = br#"{"uuid":"\u0030190a6e2-6f1b-7c3a-9f00-000000000001"}"#;
    let evs = parse(body, Format::Json, &opts()).expect("valid uuid refused");
    assert_eq!(evs[0].uuid, "0190a6e2-6f1b-7c3a-9f00-000000000001");
}
