use std::io::Write;

use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

use super::*;
use crate::buffer::GroupCommitWriter;
use crate::config::Durability;
use clap::Parser;

pub(super) struct Fixture {
    pub(super) state: AppState,
    _dir: tempfile::TempDir,
    _writer: GroupCommitWriter,
}

/// The `serve` flags every fixture starts from; `extra` flags are appended.
fn serve_config(dir: &std::path::Path, quota: u64, extra: &[&str]) -> ServeConfig {
    let quota = quota.to_string();
    let mut argv = vec![
        "holdfast-capture",
        "serve",
        "--kafka-bootstrap",
        "127.0.0.1:1",
        "--kafka-message-timeout-ms",
        "1000",
        "--forward-batch-events",
        "100",
        "--data-dir",
        dir.to_str().unwrap(),
        "--disk-reserve-bytes",
        "0",
        "--stream",
        "default=events:durable",
        "--stream",
        "clicks=web.clicks:durable",
        "--buffer-quota-bytes",
        &quota,
        "--max-body-bytes",
        "4096",
        "--max-decompressed-bytes",
        "8192",
        "--max-event-bytes",
        "512",
        "--retry-after-secs",
        "3",
        "--drain-timeout-secs",
        "1",
    ];
    // A flag in `extra` replaces the base one (clap refuses a repeated flag).
    let mut i = 2;
    while i < argv.len() {
        if argv[i] != "--stream" && extra.contains(&argv[i]) {
            argv.drain(i..i + 2);
        } else {
            i += 2;
        }
    }
    argv.extend_from_slice(extra);
    let cli = crate::config::Cli::try_parse_from(argv).unwrap();
    let crate::config::Command::Serve(args) = cli.command else {
        panic!("not serve")
    };
    args.validate().unwrap()
}

fn fixture(tokens: &[&str], quota: u64) -> Fixture {
    fixture_with(tokens, quota, &[])
}

pub(super) fn fixture_with(tokens: &[&str], quota: u64, extra: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let (writer_thread, writer) =
        GroupCommitWriter::start(dir.path(), Durability::Fsync, quota, None).unwrap();
    metrics.attach_buffer(writer.state.clone());
    let mut cfg = serve_config(dir.path(), quota, extra);
    cfg.auth = auth::AuthTokens::fixed(tokens);
    let producer = forward::SharedProducer::new(&cfg.kafka, metrics.clone()).unwrap();
    let health = Arc::new(Health::default());
    health.started.store(true, Ordering::Relaxed);
    Fixture {
        state: AppState {
            cfg: Arc::new(cfg),
            writer,
            producer,
            metrics,
            health,
        },
        _dir: dir,
        _writer: writer_thread,
    }
}

fn post(path: &str, content_type: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, content_type)
        .body(body.into())
        .unwrap()
}

async fn send(f: &Fixture, req: Request<Body>) -> (StatusCode, HeaderMap, serde_json::Value) {
    let resp = router(f.state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::String(
        String::from_utf8_lossy(&bytes).into_owned(),
    ));
    (status, headers, json)
}

pub(super) fn buffered(f: &Fixture) -> u64 {
    f.state.writer.state.events.load(Ordering::Relaxed)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

#[tokio::test]
async fn accepts_object_array_ndjson_and_gzip_and_buffers_them() {
    let f = fixture(&[], u64::MAX);
    let (s, _, body) = send(&f, post("/v1/events", "application/json", r#"{"a":1}"#)).await;
    assert_eq!((s, body), (StatusCode::OK, json!({"accepted": 1})));
    let (s, _, body) = send(
        &f,
        post(
            "/v1/events/clicks",
            "application/json",
            r#"[{"a":1},{"a":2}]"#,
        ),
    )
    .await;
    assert_eq!((s, body), (StatusCode::OK, json!({"accepted": 2})));
    let mut req = post(
        "/v1/events",
        "application/x-ndjson",
        gzip(b"{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n"),
    );
    req.headers_mut()
        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    let (s, _, body) = send(&f, req).await;
    assert_eq!((s, body), (StatusCode::OK, json!({"accepted": 3})));
    assert_eq!(buffered(&f), 6);
    let conn = crate::buffer::open_reader(&f.state.cfg.data_dir).unwrap();
    let topics: Vec<String> = crate::buffer::read_batch(&conn, 0, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.event.topic.to_string())
        .collect();
    assert_eq!(&topics[1..3], ["web.clicks", "web.clicks"]);
}

#[tokio::test]
async fn bad_input_gets_the_right_4xx_and_writes_nothing() {
    let f = fixture(&[], u64::MAX);
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(600));
    let mut bad_gzip = post("/v1/events", "application/json", "definitely not gzip");
    bad_gzip
        .headers_mut()
        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    let cases = vec![
        (
            post("/v1/events", "application/json", r#"{"a":"#),
            StatusCode::BAD_REQUEST,
            "malformed_json",
            None,
        ),
        (
            post(
                "/v1/events",
                "application/json",
                format!(r#"[{{"a":1}},{big}]"#),
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "event_too_large",
            Some(1),
        ),
        (bad_gzip, StatusCode::BAD_REQUEST, "bad_gzip", None),
        (
            post("/v1/events", "text/plain", r#"{"a":1}"#),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            None,
        ),
        (
            post("/v1/events", "application/json", "x".repeat(5000)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            None,
        ),
        (
            post("/v1/events", "application/x-ndjson", "{\"a\":1}\n[2]\n"),
            StatusCode::BAD_REQUEST,
            "not_an_object",
            Some(1),
        ),
        (
            post("/v1/events/nope", "application/json", r#"{"a":1}"#),
            StatusCode::NOT_FOUND,
            "unknown_stream",
            None,
        ),
    ];
    for (req, status, reason, index) in cases {
        let (s, _, body) = send(&f, req).await;
        assert_eq!(s, status, "{body}");
        assert_eq!(body["error"], reason, "{body}");
        assert_eq!(body.get("index").and_then(|i| i.as_u64()), index, "{body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(buffered(&f), 0);
    let metrics = f.state.metrics.encode();
    assert!(
        metrics.contains(r#"holdfast_requests_rejected_total{reason="event_too_large"} 1"#),
        "{metrics}"
    );
}

/// A header sent on several lines is one list (RFC 9110 §5.3): a body
/// labelled `identity` and then `gzip` is gzip applied last, which a
/// reading of the first line alone would take for plain JSON. Both such
/// lists are refused as a whole, like their one-line forms, and nothing is
/// written.
#[tokio::test]
async fn a_header_repeated_on_several_lines_is_read_as_one_list() {
    let f = fixture(&[], u64::MAX);
    let mut twice_encoded = post("/v1/events", "application/json", gzip(br#"{"a":1}"#));
    for v in ["identity", "gzip"] {
        twice_encoded
            .headers_mut()
            .append(header::CONTENT_ENCODING, HeaderValue::from_static(v));
    }
    let (s, _, body) = send(&f, twice_encoded).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");
    assert_eq!(body["error"], "unsupported_encoding", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("identity, gzip"),
        "{body}"
    );
    let mut two_types = post("/v1/events", "application/json", r#"{"a":1}"#);
    two_types
        .headers_mut()
        .append(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    let (s, _, body) = send(&f, two_types).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");
    assert_eq!(body["error"], "unsupported_media_type", "{body}");
    let mut not_text = post("/v1/events", "application/json", gzip(br#"{"a":1}"#));
    not_text.headers_mut().insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_bytes(b"gzip\xff").unwrap(),
    );
    let (s, _, body) = send(&f, not_text).await;
    assert_eq!(body["error"], "unsupported_encoding", "{body}");
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(buffered(&f), 0);
}

#[tokio::test]
async fn requires_a_valid_bearer_token_when_configured() {
    let f = fixture(&["s3cret", "other"], u64::MAX);
    let (s, h, _) = send(&f, post("/v1/events", "application/json", r#"{"a":1}"#)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(h[header::WWW_AUTHENTICATE], "Bearer");
    let mut wrong = post("/v1/events", "application/json", r#"{"a":1}"#);
    wrong.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer s3cre"),
    );
    assert_eq!(send(&f, wrong).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(buffered(&f), 0);
    let mut right = post("/v1/events", "application/json", r#"{"a":1}"#);
    right.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer other"),
    );
    assert_eq!(send(&f, right).await.0, StatusCode::OK);
    assert_eq!(buffered(&f), 1);
}

#[tokio::test]
async fn over_quota_answers_503_with_retry_after_and_turns_unready() {
    let f = fixture(&[], 200);
    let event = format!(r#"{{"pad":"{}"}}"#, "x".repeat(100));
    let (s, _, _) = send(&f, post("/v1/events", "application/json", event.clone())).await;
    assert_eq!(s, StatusCode::OK);
    let (s, h, body) = send(&f, post("/v1/events", "application/json", event)).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h[header::RETRY_AFTER], "3");
    assert_eq!(body["error"], "buffer_full");
    assert_eq!(buffered(&f), 1);
    let ready = router(f.state.clone())
        .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn readiness_follows_the_lifecycle_and_shutdown_refuses_new_events() {
    let f = fixture(&[], u64::MAX);
    let ready = |f: &Fixture| {
        let r = router(f.state.clone());
        async move {
            r.oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
                .await
                .unwrap()
                .status()
        }
    };
    f.state.health.started.store(false, Ordering::Relaxed);
    assert_eq!(ready(&f).await, StatusCode::SERVICE_UNAVAILABLE);
    f.state.health.started.store(true, Ordering::Relaxed);
    assert_eq!(ready(&f).await, StatusCode::OK);
    f.state.health.shutting_down.store(true, Ordering::Relaxed);
    assert_eq!(ready(&f).await, StatusCode::SERVICE_UNAVAILABLE);
    let (s, h, _) = send(&f, post("/v1/events", "application/json", r#"{"a":1}"#)).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(h.contains_key(header::RETRY_AFTER));
    assert_eq!(buffered(&f), 0);
    f.state.health.shutting_down.store(false, Ordering::Relaxed);
    f.state
        .writer
        .state
        .disk_failed
        .store(true, Ordering::Relaxed);
    assert_eq!(ready(&f).await, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn metrics_expose_accepted_events_and_buffer_figures() {
    let f = fixture(&[], u64::MAX);
    send(
        &f,
        post("/v1/events", "application/json", r#"[{"a":1},{"a":2}]"#),
    )
    .await;
    let (s, _, body) = send(&f, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    let text = body.as_str().unwrap();
    for needle in [
        r#"holdfast_events_accepted_total{stream="default"} 2"#,
        "holdfast_buffer_events 2",
        "holdfast_ack_latency_seconds_count 1",
        "holdfast_buffer_dead_letters 0",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    // A sample line, not the HELP text: this fixture's Kafka is unreachable
    // and nothing was ever delivered, so the gauge must say 0.
    let sample = text.lines().find(|l| l.starts_with("holdfast_kafka_up "));
    assert_eq!(sample, Some("holdfast_kafka_up 0"), "in\n{text}");
}

#[tokio::test]
async fn serves_on_a_real_port() {
    let f = fixture(&[], u64::MAX);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::serve(
        listener,
        f.state.clone(),
        std::future::pending(),
    ));
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = r#"{"a":1}"#;
    stream
        .write_all(
            format!(
                "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with(r#"{"accepted":1}"#), "{out}");
    assert_eq!(buffered(&f), 1);
}

fn gzip_post(path: &str, content_type: &str, body: Vec<u8>) -> Request<Body> {
    let mut req = post(path, content_type, body);
    req.headers_mut()
        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    req
}

#[tokio::test]
async fn multi_member_gzip_stores_every_members_events() {
    let f = fixture(&[], u64::MAX);
    let mut body = gzip(b"{\"m\":1}\n{\"m\":1}\n");
    body.extend(gzip(b"{\"m\":2}\n"));
    body.extend(gzip(b"{\"m\":3}\n{\"m\":3}\n"));
    let (s, _, json) = send(&f, gzip_post("/v1/events", "application/x-ndjson", body)).await;
    assert_eq!((s, json), (StatusCode::OK, json!({"accepted": 5})));
    assert_eq!(buffered(&f), 5);
}

#[tokio::test]
async fn trailing_bytes_after_gzip_are_a_400_and_write_nothing() {
    let f = fixture(&[], u64::MAX);
    let mut body = gzip(b"{\"m\":1}\n");
    body.extend(b"{\"m\":2}\n");
    let (s, _, json) = send(&f, gzip_post("/v1/events", "application/x-ndjson", body)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{json}");
    assert_eq!(json["error"], "bad_gzip");
    assert_eq!(buffered(&f), 0);
}

#[tokio::test]
async fn a_gzip_bomb_of_tiny_events_is_refused_at_the_event_cap() {
    // The 17.5 KB body that used to inflate to 6,000,000 events and 1.6 GiB.
    let f = fixture_with(
        &[],
        u64::MAX,
        &[
            "--max-body-bytes",
            "5242880",
            "--max-decompressed-bytes",
            "20971520",
        ],
    );
    let bomb = {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let chunk = "{}\n".repeat(100_000);
        for _ in 0..60 {
            enc.write_all(chunk.as_bytes()).unwrap();
        }
        enc.finish().unwrap()
    };
    assert!(bomb.len() < 40_000, "{}", bomb.len());
    let (s, _, json) = send(&f, gzip_post("/v1/events", "application/x-ndjson", bomb)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
    assert_eq!(json["error"], "too_many_events");
    assert!(
        json["message"].as_str().unwrap().contains("10000"),
        "the message names the cap: {json}"
    );
    assert_eq!(buffered(&f), 0);
    assert_eq!(
        f.state.cfg.inflight.available(),
        f.state.cfg.inflight.total(),
        "every charge returned"
    );
}

#[tokio::test]
async fn more_events_than_the_cap_is_a_413_naming_it() {
    let f = fixture_with(&[], u64::MAX, &["--max-events-per-request", "3"]);
    let (s, _, json) = send(&f, post("/v1/events", "application/json", "[{},{},{},{}]")).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json["error"], "too_many_events");
    assert!(
        json["message"]
            .as_str()
            .unwrap()
            .contains("more than 3 events")
    );
    let (s, _, _) = send(&f, post("/v1/events", "application/json", "[{},{},{}]")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(buffered(&f), 3);
}

#[tokio::test]
async fn deeply_nested_json_is_a_400_naming_the_event() {
    let f = fixture_with(
        &[],
        u64::MAX,
        &["--max-event-bytes", "4096", "--max-body-bytes", "8192"],
    );
    let deep = format!("{{\"a\":{}{}}}", "[".repeat(1000), "]".repeat(1000));
    let body = format!("{{\"ok\":1}}\n{deep}\n");
    let (s, _, json) = send(&f, post("/v1/events", "application/x-ndjson", body)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{json}");
    assert_eq!(json["error"], "too_deeply_nested");
    assert_eq!(json["index"], 1);
    assert_eq!(buffered(&f), 0);
}

#[tokio::test]
async fn an_exhausted_inflight_budget_is_a_503_with_retry_after_not_a_queue() {
    let f = fixture(&[], u64::MAX);
    let budget = &f.state.cfg.inflight;
    let mut hog = budget.charge();
    hog.grow(budget.total() - 1024).unwrap();
    let (s, h, json) = send(&f, post("/v1/events", "application/json", "x".repeat(2000))).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{json}");
    assert_eq!(json["error"], "server_busy");
    assert_eq!(h[header::RETRY_AFTER], "3");
    drop(hog);
    let (s, _, _) = send(&f, post("/v1/events", "application/json", r#"{"a":1}"#)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(budget.available(), budget.total(), "every charge returned");
}

#[tokio::test]
async fn a_token_file_rotated_on_disk_is_honoured_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = dir.path().join("..v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("tokens"), "first-token\n").unwrap();
    std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tokens", dir.path().join("tokens")).unwrap();
    let file = dir.path().join("tokens");
    let mut f = fixture(&[], u64::MAX);
    let mut cfg = f.state.cfg.as_ref().clone();
    cfg.auth = auth::AuthTokens::from_file(&file).unwrap();
    f.state.cfg = Arc::new(cfg);
    let with = |token: Option<&str>| {
        let mut req = post("/v1/events", "application/json", r#"{"a":1}"#);
        if let Some(t) = token {
            req.headers_mut().insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
            );
        }
        req
    };
    assert_eq!(send(&f, with(None)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        send(&f, with(Some("wrong"))).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(send(&f, with(Some("first-token"))).await.0, StatusCode::OK);
    // Kubelet's atomic update: new directory, `..data` swapped by rename.
    let v2 = dir.path().join("..v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("tokens"), "second-token\n").unwrap();
    std::os::unix::fs::symlink("..v2", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while send(&f, with(Some("second-token"))).await.0 != StatusCode::OK {
        assert!(
            std::time::Instant::now() < deadline,
            "rotated token not accepted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        send(&f, with(Some("first-token"))).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(buffered(&f), 2);
}

#[test]
fn every_abuse_limit_is_validated_naming_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let parse = |extra: &[&str]| {
        let mut argv = vec![
            "holdfast-capture",
            "serve",
            "--kafka-bootstrap",
            "k:1",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ];
        argv.extend_from_slice(extra);
        let cli = crate::config::Cli::try_parse_from(argv).unwrap();
        let crate::config::Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        args.validate().map(|_| ()).map_err(|e| e.to_string())
    };
    parse(&[]).unwrap();
    for flag in [
        "--max-events-per-request",
        "--header-read-timeout-secs",
        "--body-read-timeout-secs",
        "--max-connections",
        "--auth-reload-secs",
        "--max-header-bytes",
        "--max-inflight-bytes",
    ] {
        let err = parse(&[flag, "0"]).unwrap_err();
        assert!(err.starts_with(flag), "{flag}: {err}");
    }
    let err = parse(&["--max-inflight-bytes", "40000000"]).unwrap_err();
    assert!(err.contains("--max-decompressed-bytes"), "{err}");
    // A direct stream copies events again: the same budget is then too small.
    parse(&["--max-inflight-bytes", "50000000"]).unwrap();
    let err = parse(&[
        "--max-inflight-bytes",
        "50000000",
        "--stream",
        "default=events:direct",
    ])
    .unwrap_err();
    assert!(err.contains("2 copies"), "{err}");
    // Unset, the budget grows to what one request needs (a direct stream: two copies).
    parse(&["--stream", "default=events:direct"]).unwrap();
    let missing = dir.path().join("no-such-file");
    let err = parse(&["--auth-tokens-file", missing.to_str().unwrap()]).unwrap_err();
    assert!(err.starts_with("--auth-tokens-file"), "{err}");
}
