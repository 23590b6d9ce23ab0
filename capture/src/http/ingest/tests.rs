use super::*;

fn opts() -> ParseOptions<'static> {
    ParseOptions {
        topic: "t",
        max_event_bytes: 64,
        max_events: 10,
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
        br#"[{"uuid":"0190A6E2-6F1B-7C3A-9F00-000000000001"},{"x":1},{"uuid":null}]"#,
        Format::Json,
        &opts(),
    )
    .unwrap();
    assert_eq!(evs[0].uuid, "0190a6e2-6f1b-7c3a-9f00-000000000001");
    assert_eq!(
        evs.iter().map(|e| e.client_uuid).collect::<Vec<_>>(),
        [true, false, false],
        "only a uuid the client sent is deduplicated"
    );
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
fn caps_events_per_request_before_building_them() {
    let nd = "{}\n".repeat(11);
    let r = parse(nd.as_bytes(), Format::Ndjson, &opts()).unwrap_err();
    assert_eq!(
        (r.status, r.reason),
        (StatusCode::PAYLOAD_TOO_LARGE, "too_many_events")
    );
    assert!(r.message.contains("more than 10 events"), "{}", r.message);
    assert_eq!(
        parse(&nd.as_bytes()[3..], Format::Ndjson, &opts())
            .unwrap()
            .len(),
        10
    );
    let arr = format!("[{}{{}}]", "{},".repeat(10));
    assert_eq!(
        parse(arr.as_bytes(), Format::Json, &opts())
            .unwrap_err()
            .reason,
        "too_many_events"
    );
    // Six million events in a 20 MB array are refused at the eleventh.
    let huge = format!("[{}{{}}]", "{},".repeat(6_000_000));
    assert_eq!(
        parse(huge.as_bytes(), Format::Json, &opts())
            .unwrap_err()
            .reason,
        "too_many_events"
    );
}

#[test]
fn reserves_at_least_what_the_events_take() {
    let body = "{\"key\":\"a-partition-key-longer-than-a-uuid-string-by-far\"}\n{}\n";
    let mut reserved = 0;
    let evs = parse_bounded::<Rejection>(body.as_bytes(), Format::Ndjson, &opts(), |n| {
        reserved += n;
        Ok(())
    })
    .unwrap();
    let used: usize = evs
        .iter()
        .map(|e| {
            std::mem::size_of::<NewEvent>()
                + e.uuid.capacity()
                + e.topic.len()
                + e.key.capacity()
                + e.payload.capacity()
        })
        .sum();
    assert!(reserved >= used, "reserved {reserved} < used {used}");
    let refused = parse_bounded(body.as_bytes(), Format::Ndjson, &opts(), |_| {
        Err(Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            String::new(),
        ))
    });
    assert_eq!(refused.unwrap_err().reason, "busy");
}

#[test]
fn event_overhead_covers_what_a_minimal_event_allocates() {
    // glibc hands out 16-byte-aligned chunks with an 8-byte header.
    let chunk = |n: usize| (n + 8).div_ceil(16) * 16;
    let e = parse(b"{}", Format::Json, &opts()).unwrap().remove(0);
    let cost = std::mem::size_of::<NewEvent>()
        + chunk(e.uuid.len())
        + chunk(e.key.len())
        + (chunk(e.topic.len()) - e.topic.len())
        + (chunk(e.payload.len()) - e.payload.len())
        + std::mem::size_of::<&str>();
    assert!(
        cost <= EVENT_OVERHEAD_BYTES,
        "a minimal event costs {cost} bytes beyond payload and topic"
    );
}

#[test]
fn deep_nesting_is_a_clean_400_naming_the_event() {
    let mut o = opts();
    o.max_event_bytes = 10 << 20;
    o.key_pointer = Some("/a");
    let deep = |levels: usize| format!("{{\"a\":{}1{}}}", "[".repeat(levels), "]".repeat(levels));
    // Accepted up to the limit, and the key pointer still parses it.
    let ok = deep(MAX_DEPTH - 1);
    let evs = parse(ok.as_bytes(), Format::Json, &o).unwrap();
    assert!(evs[0].key.starts_with(b"[[["));
    for levels in [MAX_DEPTH, 1_000_000] {
        let bad = deep(levels);
        let body = format!("{{}}\n{bad}\n");
        let r = parse(body.as_bytes(), Format::Ndjson, &o).unwrap_err();
        assert_eq!(
            (r.status, r.reason, r.index),
            (StatusCode::BAD_REQUEST, "too_deeply_nested", Some(1))
        );
        let arr = format!("[{{}},{{}},{bad}]");
        let r = parse(arr.as_bytes(), Format::Json, &o).unwrap_err();
        assert_eq!((r.reason, r.index), ("too_deeply_nested", Some(2)));
        let r = parse(bad.as_bytes(), Format::Json, &o).unwrap_err();
        assert_eq!((r.reason, r.index), ("too_deeply_nested", Some(0)));
    }
    // Brackets inside strings do not count.
    let quoted = format!("{{\"s\":\"{}\\\"{}\"}}", "[".repeat(500), "{".repeat(500));
    assert!(parse(quoted.as_bytes(), Format::Json, &o).is_ok());
    // A deep array that is not an event at all.
    let r = parse("[".repeat(1_000_000).as_bytes(), Format::Json, &o).unwrap_err();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

/// `scan_event` clears most events without walking them; on every text it
/// must still answer what the full walk answers, at its edges above all: the
/// bracket count exactly at the limit, brackets inside strings, `\\u` that
/// is an escaped backslash before a `u`, surrogates split or paired.
#[test]
fn the_scan_shortcut_answers_what_the_full_walk_does() {
    let edges = [
        "{}",
        "{\"a\":[[1]]}",
        "{\"a\":[[[1]]]}",
        "{\"s\":\"[[[[\"}",
        "{\"s\":\"\\\\uD800\"}",
        "{\"s\":\"\\uD800\"}",
        "{\"s\":\"\\uDC00\"}",
        "{\"s\":\"\\uD83D\\uDE00\"}",
        "{\"s\":\"\\uD83D\\u0041\"}",
        "{\"s\":\"\\u00e9\",\"a\":[[[[1]]]]}",
    ];
    for max in 0..6 {
        for raw in edges {
            assert_eq!(
                scan_event(raw, max),
                walk_event(raw.as_bytes(), max),
                "{raw} at depth limit {max}"
            );
        }
    }
    // Every short text over the characters that matter, exhaustively.
    let alphabet = ['[', '{', ']', '"', '\\', 'u', 'D', '8', '0'];
    let mut text = String::new();
    let mut checked = 0;
    fn each(text: &mut String, left: usize, alphabet: &[char], f: &mut dyn FnMut(&str)) {
        f(text);
        if left == 0 {
            return;
        }
        for &c in alphabet {
            text.push(c);
            each(text, left - 1, alphabet, f);
            text.pop();
        }
    }
    each(&mut text, 6, &alphabet, &mut |raw| {
        for max in 0..4 {
            assert_eq!(
                scan_event(raw, max),
                walk_event(raw.as_bytes(), max),
                "{raw:?} at {max}"
            );
        }
        checked += 1;
    });
    assert!(checked > 500_000, "{checked}");
}

/// A JSON body skips re-reading an event for its `uuid` and `key` when its
/// text cannot name them; a name spelled with escapes must still count, and
/// an NDJSON line (whose syntax nothing else checked) must still be checked.
#[test]
fn fields_named_with_escapes_count_and_ndjson_lines_are_still_checked() {
    let id = "0190a6e2-6f1b-7c3a-9f00-00000000000a";
    let body = format!(
        r#"[{{"u\u0075id":"{id}","x":1}},{{"k\u0065y":"kk"}},{{"uuid" : "{id}"}},{{"x":"\"key\""}},{{"x":2}}]"#
    );
    let mut o = opts();
    o.max_event_bytes = 1024;
    let evs = parse(body.as_bytes(), Format::Json, &o).unwrap();
    assert_eq!((evs[0].uuid.as_str(), evs[0].client_uuid), (id, true));
    assert_eq!(evs[1].key, b"kk");
    assert!(!evs[1].client_uuid);
    assert_eq!((evs[2].uuid.as_str(), evs[2].client_uuid), (id, true));
    assert!(!evs[3].client_uuid && !evs[4].client_uuid);
    assert_eq!(evs[4].key, evs[4].uuid.as_bytes());
    // Duplicate names are still refused wherever they are.
    let dup = format!(r#"[{{"uuid":"{id}","uuid":"{id}"}}]"#);
    let r = parse(dup.as_bytes(), Format::Json, &o).unwrap_err();
    assert_eq!((r.index, r.reason), (Some(0), "malformed_json"));
    // Lines that name neither field but are not JSON.
    for line in [
        "{\"a\":}",
        "{\"a\":1",
        "{\"a\":1}}",
        "{\"a\":tru}",
        "{\"a\":\"\u{1}\"}",
    ] {
        let body = format!("{{\"ok\":1}}\n{line}\n");
        let r = parse(body.as_bytes(), Format::Ndjson, &o).unwrap_err();
        assert_eq!((r.index, r.reason), (Some(1), "malformed_json"), "{line}");
    }
}

/// Generated ids are UUIDv7s of the request's capture time, distinct within
/// a request and across requests of the same millisecond.
#[test]
fn generated_uuids_are_v7_of_the_capture_time_and_distinct() {
    let mut o = opts();
    o.max_events = 10_000;
    o.now_ms = 1_765_000_000_123;
    let body = "{}\n".repeat(10_000);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2 {
        for e in parse(body.as_bytes(), Format::Ndjson, &o).unwrap() {
            let u = uuid::Uuid::parse_str(&e.uuid).unwrap();
            assert_eq!(u.get_version_num(), 7);
            assert_eq!(u.get_variant(), uuid::Variant::RFC4122);
            let (secs, nanos) = u.get_timestamp().unwrap().to_unix();
            assert_eq!(
                secs * 1000 + u64::from(nanos / 1_000_000),
                1_765_000_000_123
            );
            assert!(seen.insert(u), "{u} generated twice");
        }
    }
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

/// Found by the fuzzer (parse_ndjson, CI of stop 9): serde_json skips the
/// fields it ignores without checking `\u` escapes, so an event with a lone
/// surrogate was stored although no strict JSON reader (serde_json, Go's
/// encoding/json in strict mode) can read it back.
#[test]
fn lone_surrogate_escapes_are_malformed_json_naming_the_event() {
    let o = opts();
    for bad in [
        r#"{"a":"\uDDDD"}"#,
        r#"{"a":"x\uD800"}"#,
        r#"{"a":"\uD800\u0041"}"#,
        r#"{"a":"\uDBFF\n"}"#,
        r#"{"a":{"b":["\udc00"]}}"#,
        r#"{"\uD83D":1}"#,
        r#"{"key":"\uDFFF"}"#,
    ] {
        let body = format!("{{}}\n{bad}\n");
        let r = parse(body.as_bytes(), Format::Ndjson, &o).unwrap_err();
        assert_eq!(
            (r.status, r.reason, r.index),
            (StatusCode::BAD_REQUEST, "malformed_json", Some(1)),
            "{bad}"
        );
        assert!(r.message.contains("surrogate"), "{}", r.message);
        let arr = format!("[{{}},{bad}]");
        let r = parse(arr.as_bytes(), Format::Json, &o).unwrap_err();
        assert_eq!((r.reason, r.index), ("malformed_json", Some(1)), "{bad}");
    }
    for good in [
        r#"{"a":"\uD83D\uDE00"}"#,
        r#"{"a":"\\uDDDD"}"#,
        r#"{"a":"\\\uD83D\uDE00\\"}"#,
        r#"{"a":"\u00e9\"\uDBFF\uDFFF"}"#,
        r#"{"a":"plain é 😀"}"#,
    ] {
        let evs = parse(good.as_bytes(), Format::Json, &o).unwrap();
        serde_json::from_slice::<serde_json::Value>(&evs[0].payload).unwrap();
    }
}

/// A zero-valued uuid field (Go's `uuid.Nil`, Java's `new UUID(0, 0)`) would
/// make every event of a buggy client "the same event": the deduplication
/// window would answer `200` for each and store only the first. Such ids are
/// refused, in every spelling the parser accepts, and a real uuid next to
/// them in the request is not stored either.
#[test]
fn refuses_the_nil_and_max_uuids_which_identify_no_event() {
    for id in [
        "00000000-0000-0000-0000-000000000000",
        "00000000000000000000000000000000",
        "urn:uuid:00000000-0000-0000-0000-000000000000",
        "{00000000-0000-0000-0000-000000000000}",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF",
    ] {
        let body =
            format!(r#"[{{"uuid":"0190a6e2-6f1b-7c3a-9f00-000000000001"}},{{"uuid":"{id}"}}]"#);
        let r = parse(body.as_bytes(), Format::Json, &opts()).unwrap_err();
        assert_eq!(
            (r.status, r.index, r.reason),
            (StatusCode::BAD_REQUEST, Some(1), "invalid_uuid"),
            "{id}"
        );
        assert!(r.message.contains("identifies no event"), "{}", r.message);
    }
    // One bit off either sentinel is an ordinary id.
    for id in [
        "00000000-0000-0000-0000-000000000001",
        "7fffffff-ffff-ffff-ffff-ffffffffffff",
    ] {
        let body = format!(r#"{{"uuid":"{id}"}}"#);
        let evs = parse(body.as_bytes(), Format::Json, &opts()).unwrap();
        assert_eq!(evs[0].uuid, id);
    }
}
