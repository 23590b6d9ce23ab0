//! The server's abuse limits on a real port: 431, header and body timeouts,
//! the connection cap, endless bodies, graceful shutdown.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::super::tests::{Fixture, buffered, fixture_with};
use super::serve;

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start(f: &Fixture) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, f.state.clone(), async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        stop: Some(stop),
        task,
    }
}

fn post_head(len: usize, keep_alive: bool) -> String {
    let conn = if keep_alive { "keep-alive" } else { "close" };
    format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: {conn}\r\n\r\n"
    )
}

/// Reads one response (head and a `content-length` body) from a keep-alive connection.
async fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("response head within 10 s")
            .unwrap();
        assert_ne!(
            n,
            0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    buf.extend(body);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Reads until the server closes; what arrived, and how long it took. A
/// reset after the answer counts as closed.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + within).into(), s.read(&mut buf)).await {
            Err(_) => panic!(
                "connection still open after {within:?}; got {:?}",
                String::from_utf8_lossy(&out)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

async fn post_ok(s: &mut TcpStream) {
    let body = r#"{"a":1}"#;
    s.write_all(format!("{}{body}", post_head(body.len(), true)).as_bytes())
        .await
        .unwrap();
    let resp = read_response(s).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

#[tokio::test]
async fn an_oversized_request_head_gets_431() {
    let f = fixture_with(&[], u64::MAX, &["--max-header-bytes", "4096"]);
    let srv = start(&f).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let big = "x".repeat(5000);
    s.write_all(format!("POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (resp, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    // A head that never ends is cut at the read buffer, with the same answer.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /v1/events HTTP/1.1\r\nX-Endless: ")
        .await
        .unwrap();
    let _ = s.write_all(&vec![b'y'; 64 * 1024]).await;
    let (resp, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    // A normal request on the same server is fine.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    post_ok(&mut s).await;
}

#[tokio::test]
async fn a_stalled_request_head_and_an_idle_connection_are_closed_at_the_header_timeout() {
    let f = fixture_with(&[], u64::MAX, &["--header-read-timeout-secs", "1"]);
    let srv = start(&f).await;
    let mut slow = TcpStream::connect(srv.addr).await.unwrap();
    slow.write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (resp, took) = read_until_closed(&mut slow, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    assert!(!resp.contains("200"), "{resp}");
    let mut idle = TcpStream::connect(srv.addr).await.unwrap();
    post_ok(&mut idle).await;
    let (_, took) = read_until_closed(&mut idle, Duration::from_secs(5)).await;
    assert!(
        took >= Duration::from_millis(900),
        "idle closed after {took:?}"
    );
    assert_eq!(buffered(&f), 1);
}

#[tokio::test]
async fn a_stalled_body_gets_408_and_its_connection_is_closed() {
    let f = fixture_with(&[], u64::MAX, &["--body-read-timeout-secs", "1"]);
    let srv = start(&f).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(format!("{}{{\"a\":", post_head(100, true)).as_bytes())
        .await
        .unwrap();
    let (resp, took) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("body_timeout"), "{resp}");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert_eq!(buffered(&f), 0);
    assert_eq!(
        f.state.cfg.inflight.available(),
        f.state.cfg.inflight.total()
    );
}

#[tokio::test]
async fn a_body_that_never_ends_is_stopped_at_the_byte_limit_with_413() {
    let f = fixture_with(&[], u64::MAX, &["--max-body-bytes", "65536"]);
    let srv = start(&f).await;
    // Declared too large: refused before any of it is read.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(post_head(10 << 30, true).as_bytes())
        .await
        .unwrap();
    let (resp, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    // Chunked and endless: stopped once past the limit.
    let s = TcpStream::connect(srv.addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let head = "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    wr.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk = format!("{:x}\r\n{}\r\n", 4096, "a".repeat(4096));
        let mut sent = 0usize;
        while wr.write_all(chunk.as_bytes()).await.is_ok() {
            sent += 4096;
            if sent > 64 << 20 {
                break;
            }
        }
        sent
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline.into(), rd.read(&mut buf)).await {
            Err(_) => panic!("no answer to an endless body"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    let resp = String::from_utf8_lossy(&out);
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    let sent = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the server stops reading an endless body")
        .unwrap();
    assert!(sent < 64 << 20, "server kept reading: {sent} bytes");
    assert_eq!(buffered(&f), 0);
}

#[tokio::test]
async fn connections_past_the_cap_get_503_while_open_ones_keep_being_served() {
    let f = fixture_with(&[], u64::MAX, &["--max-connections", "2"]);
    let srv = start(&f).await;
    let mut a = TcpStream::connect(srv.addr).await.unwrap();
    post_ok(&mut a).await;
    let mut b = TcpStream::connect(srv.addr).await.unwrap();
    post_ok(&mut b).await;
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    let body = r#"{"a":1}"#;
    let _ = c
        .write_all(format!("{}{body}", post_head(body.len(), true)).as_bytes())
        .await;
    let (resp, _) = read_until_closed(&mut c, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.contains("retry-after: 3"), "{resp}");
    assert!(resp.contains("too_many_connections"), "{resp}");
    // The connections already open are still served.
    post_ok(&mut a).await;
    post_ok(&mut b).await;
    // Once one closes, a new client gets in.
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut d = TcpStream::connect(srv.addr).await.unwrap();
        let _ = d
            .write_all(format!("{}{body}", post_head(body.len(), true)).as_bytes())
            .await;
        let resp = read_response(&mut d).await;
        if resp.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
        assert!(Instant::now() < deadline, "no slot freed after a close");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(buffered(&f), 5);
    let metrics = f.state.metrics.encode();
    assert!(
        metrics.contains(r#"holdfast_requests_rejected_total{reason="too_many_connections"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn shutdown_answers_requests_in_flight_then_returns_and_accepts_nothing_more() {
    let f = fixture_with(&[], u64::MAX, &[]);
    let mut srv = start(&f).await;
    let body = r#"{"late":1}"#;
    let mut busy = TcpStream::connect(srv.addr).await.unwrap();
    busy.write_all(format!("{}{}", post_head(body.len(), true), &body[..4]).as_bytes())
        .await
        .unwrap();
    let mut idle = TcpStream::connect(srv.addr).await.unwrap();
    post_ok(&mut idle).await;
    srv.stop.take().unwrap().send(()).unwrap();
    // The listener goes away.
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(srv.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after shutdown");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // An idle keep-alive connection is closed; the one mid-request is answered.
    let (_, _) = read_until_closed(&mut idle, Duration::from_secs(5)).await;
    assert!(!srv.task.is_finished(), "returned with a request in flight");
    busy.write_all(&body.as_bytes()[4..]).await.unwrap();
    let (resp, _) = read_until_closed(&mut busy, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    tokio::time::timeout(Duration::from_secs(5), &mut srv.task)
        .await
        .expect("serve returns once every connection closed")
        .unwrap()
        .unwrap();
    assert_eq!(buffered(&f), 2);
}

#[tokio::test]
async fn requests_refused_before_their_body_is_read_keep_the_connection_usable() {
    // Answering without reading the body would close the socket with unread
    // data, and the reset can destroy the answer before the client reads it.
    let f = fixture_with(
        &["tok"],
        u64::MAX,
        &[
            "--max-body-bytes",
            "200000",
            "--max-decompressed-bytes",
            "400000",
            "--max-event-bytes",
            "150000",
        ],
    );
    let srv = start(&f).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    // Larger than hyper's read buffer, so it cannot arrive with the head.
    let body = format!(r#"{{"pad":"{}"}}"#, "x".repeat(100_000));
    let req = |auth: &str| {
        format!(
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    s.write_all(req("").as_bytes()).await.unwrap();
    let resp = read_response(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    let budget = &f.state.cfg.inflight;
    let mut hog = budget.charge();
    hog.grow(budget.total()).unwrap();
    s.write_all(req("Authorization: Bearer tok\r\n").as_bytes())
        .await
        .unwrap();
    let resp = read_response(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.contains("server_busy"), "{resp}");
    drop(hog);
    s.write_all(req("Authorization: Bearer tok\r\n").as_bytes())
        .await
        .unwrap();
    let resp = read_response(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(buffered(&f), 1);
}

#[tokio::test]
async fn a_client_expecting_100_continue_is_refused_without_uploading() {
    let f = fixture_with(&["tok"], u64::MAX, &[]);
    let srv = start(&f).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 3000\r\n\r\n",
    )
    .await
    .unwrap();
    let (resp, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    assert!(!resp.contains("100 Continue"), "{resp}");
}
