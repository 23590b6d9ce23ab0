use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use axum::http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;
use crate::buffer::GroupCommitWriter;
use crate::config::{Durability, KafkaConfig, Stream};

struct Fixture {
    state: AppState,
    _dir: tempfile::TempDir,
    _writer: GroupCommitWriter,
}

fn fixture(tokens: &[&str], quota: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let (writer_thread, writer) =
        GroupCommitWriter::start(dir.path(), Durability::Fsync, quota, None).unwrap();
    metrics.attach_buffer(writer.state.clone());
    let kafka = KafkaConfig {
        bootstrap: "127.0.0.1:1".into(),
        properties: BTreeMap::new(),
        dead_letter_topic: None,
        batch_events: 100,
        message_timeout: Duration::from_secs(1),
    };
    let mut streams = BTreeMap::new();
    streams.insert(
        "default".to_owned(),
        Stream {
            topic: "events".into(),
            mode: StreamMode::Durable,
        },
    );
    streams.insert(
        "clicks".to_owned(),
        Stream {
            topic: "web.clicks".into(),
            mode: StreamMode::Durable,
        },
    );
    let cfg = ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        durability: Durability::Fsync,
        disk_reserve_bytes: 0,
        kafka: kafka.clone(),
        streams,
        default_stream: "default".into(),
        key_pointer: None,
        quota_bytes: quota,
        max_body_bytes: 4096,
        max_decompressed_bytes: 8192,
        max_event_bytes: 512,
        auth_tokens: tokens.iter().map(|t| t.to_string()).collect(),
        on_disk_failure: OnDiskFailure::Reject,
        drain_timeout: Duration::from_secs(1),
        retry_after_secs: 3,
        volume_claim: None,
    };
    let producer = forward::create_producer(&kafka, metrics.clone()).unwrap();
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

fn buffered(f: &Fixture) -> u64 {
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
        .map(|e| e.event.topic)
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
        "holdfast_kafka_up",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

#[tokio::test]
async fn serves_on_a_real_port() {
    let f = fixture(&[], u64::MAX);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, router(f.state.clone())).into_future());
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
