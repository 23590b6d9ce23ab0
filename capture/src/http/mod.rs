//! The HTTP API: `POST /v1/events[/{stream}]`, `/healthz`, `/readyz`, `/metrics`,
//! `/openapi.json` (the document [`openapi`] generates from the handlers below).
//!
//! A durable stream's 200 is written only after the buffer committed the
//! request's events; a direct stream's only after Kafka acknowledged each one.
//! A 4xx says exactly what was wrong (and which event); a 5xx says nothing
//! internal, the detail goes to the log.

pub mod auth;
pub mod gzip;
pub mod ingest;
pub mod limits;
pub mod openapi;
pub mod server;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use utoipa::ToSchema;

use crate::buffer::{AppendError, NewEvent, WriterHandle};
use crate::config::{OnDiskFailure, ServeConfig, StreamMode};
use crate::forward::{self, ErrorClass, SharedProducer};
use crate::metrics::{Metrics, StreamLabel};
use ingest::{ParseOptions, Rejection};
use limits::{BodyError, Exhausted};

/// Lifecycle flags read by `/readyz` and the handlers.
#[derive(Debug, Default)]
pub struct Health {
    /// Start-up finished (buffer open, volume guarded).
    pub started: AtomicBool,
    /// SIGTERM received: unready, new requests get 503.
    pub shutting_down: AtomicBool,
    /// Requests being handled (shutdown waits for them before draining).
    pub in_flight: AtomicUsize,
    /// Why the volume is not guarded yet (`Retain` not read back); `None` once it is.
    pub volume_unguarded: std::sync::Mutex<Option<String>>,
}

/// Counts a request as in flight until dropped.
struct InFlight<'a>(&'a Health);

impl<'a> InFlight<'a> {
    fn enter(h: &'a Health) -> Self {
        h.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(h)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    /// Validated configuration.
    pub cfg: Arc<ServeConfig>,
    /// The buffer's writer.
    pub writer: WriterHandle,
    /// Producer for direct streams and the disk-failure fallback.
    pub producer: SharedProducer,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Lifecycle flags.
    pub health: Arc<Health>,
}

/// The body of a `200` to `POST /v1/events`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    /// How many events the request held (all of them are kept).
    pub accepted: usize,
}

/// The body of every refusal.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable reason.
    #[schema(value_type = openapi::Reason)]
    pub error: &'static str,
    /// What was wrong, in words.
    pub message: String,
    /// Index of the event to blame (0-based), when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

impl ErrorBody {
    fn json(error: &'static str, message: impl Into<String>) -> axum::Json<Self> {
        axum::Json(Self {
            error,
            message: message.into(),
            index: None,
        })
    }
}

/// An error answer: JSON body [`ErrorBody`].
#[derive(Debug)]
pub enum ApiError {
    /// The client's fault; the message tells it what to fix.
    Rejected(Rejection),
    /// Not now: 503 with `Retry-After`.
    Unavailable {
        reason: &'static str,
        retry_after: u64,
    },
    /// Missing or wrong bearer token.
    Unauthorized,
    /// No such stream.
    UnknownStream(String),
}

impl ApiError {
    fn reason(&self) -> &'static str {
        match self {
            ApiError::Rejected(r) => r.reason,
            ApiError::Unavailable { reason, .. } => reason,
            ApiError::Unauthorized => "unauthorized",
            ApiError::UnknownStream(_) => "unknown_stream",
        }
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        ApiError::Rejected(r)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Rejected(r) => {
                let body = axum::Json(ErrorBody {
                    error: r.reason,
                    message: r.message,
                    index: r.index,
                });
                // The rest of such a body is not worth reading: close instead of keeping alive.
                let close = matches!(
                    r.reason,
                    "body_too_large" | "body_timeout" | "body_read_failed"
                );
                let mut resp = (r.status, body).into_response();
                if close {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                resp
            }
            ApiError::Unavailable {
                reason,
                retry_after,
            } => {
                let mut resp = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorBody::json(reason, "try again later"),
                )
                    .into_response();
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
                resp
            }
            ApiError::Unauthorized => {
                let mut resp = (
                    StatusCode::UNAUTHORIZED,
                    ErrorBody::json("unauthorized", "a valid bearer token is required"),
                )
                    .into_response();
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                resp
            }
            ApiError::UnknownStream(name) => (
                StatusCode::NOT_FOUND,
                ErrorBody::json(
                    "unknown_stream",
                    format!("stream {name:?} is not configured"),
                ),
            )
                .into_response(),
        }
    }
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/events", post(post_default))
        .route("/v1/events/{stream}", post(post_stream))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::serve))
        // Shared, not cloned field by field: axum clones the state for
        // every request.
        .with_state(Arc::new(state))
}

/// Liveness: `200 ok` while the process runs.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process runs", body = String, example = "ok")))]
async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: whether the pod should get traffic.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Ready", body = String, example = "ready"),
    (status = 503, description = "Not ready; the text says why: `starting`, `shutting down`, \
        `buffer over quota`, `volume nearly full`, `disk failure`, `fenced: ...`, \
        `volume not retained: ...`", body = String)))]
async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    match unready_reason(&s) {
        None => (StatusCode::OK, "ready").into_response(),
        Some(reason) => {
            let detail = s
                .health
                .volume_unguarded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            match detail {
                Some(detail) if reason == "volume not retained" => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{reason}: {detail}"),
                )
                    .into_response(),
                _ => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
            }
        }
    }
}

/// Why the pod should not get traffic, if it should not.
pub fn unready_reason(s: &AppState) -> Option<&'static str> {
    let buf = &s.writer.state;
    let unguarded = s
        .health
        .volume_unguarded
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some();
    if unguarded {
        Some("volume not retained")
    } else if !s.health.started.load(Ordering::Relaxed) {
        Some("starting")
    } else if s.health.shutting_down.load(Ordering::Relaxed) {
        Some("shutting down")
    } else if s.metrics.fenced.get() == 1 {
        Some("fenced: a newer drainer of this volume delivers its events")
    } else if buf.over_quota.load(Ordering::Relaxed) {
        Some("buffer over quota")
    } else if buf.disk_low.load(Ordering::Relaxed) {
        Some("volume nearly full")
    } else if (buf.disk_failed.load(Ordering::Relaxed)
        || buf.commit_stalled.load(Ordering::Relaxed))
        && s.cfg.on_disk_failure == OnDiskFailure::Reject
    {
        Some("disk failure")
    } else {
        None
    }
}

/// Metrics (`holdfast_*`) in OpenMetrics text.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200,
    description = "Prometheus/OpenMetrics exposition", body = String,
    content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8")))]
async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

/// Events for the default stream (`--default-stream`).
#[utoipa::path(post, path = "/v1/events", operation_id = "post_events", tag = "events",
    params(openapi::IngestHeaders), request_body(content(
        (openapi::Events = "application/json"), (openapi::NdjsonEvents = "application/x-ndjson"))),
    responses(openapi::IngestResponses), security((), ("bearer" = [])))]
async fn post_default(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    respond(&s, &s.cfg.default_stream, &headers, body).await
}

/// Events for a named stream (`--stream name=topic:mode`).
#[utoipa::path(post, path = "/v1/events/{stream}", operation_id = "post_stream_events",
    tag = "events", params(("stream" = String, Path, description = "A configured stream's name"),
        openapi::IngestHeaders), request_body(content(
        (openapi::Events = "application/json"), (openapi::NdjsonEvents = "application/x-ndjson"))),
    responses(openapi::StreamIngestResponses), security((), ("bearer" = [])))]
async fn post_stream(
    State(s): State<Arc<AppState>>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(&s, &stream, &headers, body).await
}

async fn respond(s: &AppState, stream: &str, headers: &HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let mut body = Some(body);
    match accept(s, stream, headers, &mut body).await {
        Ok(n) => {
            s.metrics
                .accepted
                .get_or_create(&StreamLabel {
                    stream: stream.to_owned(),
                })
                .inc_by(n as u64);
            s.metrics
                .ack_latency
                .observe(started.elapsed().as_secs_f64());
            (StatusCode::OK, axum::Json(Accepted { accepted: n })).into_response()
        }
        Err(e) => {
            s.metrics.reject(e.reason());
            // Refused before its body was read: read and drop the body (bounded)
            // so that closing does not reset the connection under the answer.
            // A client waiting for `100 Continue` has sent no body: reading it
            // would only invite the upload.
            let expects_continue = headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            if let Some(body) = body
                && !expects_continue
            {
                limits::discard(body, s.cfg.max_body_bytes, s.cfg.body_read_timeout).await;
            }
            e.into_response()
        }
    }
}

async fn accept(
    s: &AppState,
    stream_name: &str,
    headers: &HeaderMap,
    body: &mut Option<Body>,
) -> Result<usize, ApiError> {
    let cfg = &s.cfg;
    let unavailable = |reason| ApiError::Unavailable {
        reason,
        retry_after: cfg.retry_after_secs,
    };
    // Entered before the check: shutdown sets the flag, then waits for in_flight to reach 0.
    let _in_flight = InFlight::enter(&s.health);
    if s.health.shutting_down.load(Ordering::SeqCst) {
        return Err(unavailable("shutting_down"));
    }
    // Nothing is acknowledged before the volume is known to be `Retain`.
    if !s.health.started.load(Ordering::SeqCst) {
        return Err(unavailable("starting"));
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !cfg.auth.authorize(presented).await {
        return Err(ApiError::Unauthorized);
    }
    let stream = cfg
        .streams
        .get(stream_name)
        .ok_or_else(|| ApiError::UnknownStream(stream_name.to_owned()))?;
    let format =
        ingest::format_from_content_type(header_list(headers, &header::CONTENT_TYPE).as_deref())
            .map_err(ApiError::Rejected)?;
    let encoding =
        header_list(headers, &header::CONTENT_ENCODING).map(|v| v.trim().to_ascii_lowercase());
    let gzip = match encoding.as_deref() {
        None | Some("identity") => false,
        Some("gzip") | Some("x-gzip") => true,
        Some(other) => {
            return Err(ApiError::Rejected(Rejection {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                reason: "unsupported_encoding",
                message: format!("content encoding {other:?} is not supported; use gzip"),
                index: None,
            }));
        }
    };
    // Everything this request holds from here on is charged to the budget first.
    let mut charge = cfg.inflight.charge();
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let raw = limits::read_body(
        body.take().unwrap_or_default(),
        content_length,
        cfg.max_body_bytes,
        cfg.body_read_timeout,
        &mut charge,
    )
    .await
    .map_err(|e| match e {
        BodyError::Rejected(r) => ApiError::Rejected(r),
        BodyError::Busy => unavailable("server_busy"),
    })?;
    let budget = |e: Exhausted| {
        e.rejection()
            .map_or(unavailable("server_busy"), ApiError::Rejected)
    };
    let body = if gzip {
        let raw_held = charge.held();
        let inflated = gzip::gunzip_bounded(&raw, cfg.max_decompressed_bytes, |n| {
            charge.grow(n).map_err(budget)
        })?;
        drop(raw);
        charge.release(raw_held);
        bytes::Bytes::from(inflated)
    } else {
        raw
    };
    // A direct stream's events are copied again into librdkafka, and the disk
    // fallback keeps a clone: charge those copies too.
    let copies =
        if stream.mode == StreamMode::Direct || cfg.on_disk_failure == OnDiskFailure::Direct {
            2
        } else {
            1
        };
    let body_held = charge.held();
    let events = ingest::parse_bounded(
        &body,
        format,
        &ParseOptions {
            topic: &stream.topic,
            max_event_bytes: cfg.max_event_bytes,
            max_events: cfg.max_events_per_request,
            key_pointer: cfg.key_pointer.as_deref(),
            now_ms: crate::buffer::now_ms(),
        },
        |n| charge.grow(n.saturating_mul(copies)).map_err(budget),
    )?;
    drop(body);
    charge.release(body_held);
    let n = events.len();
    match stream.mode {
        StreamMode::Direct => direct(s, &events).await?,
        StreamMode::Durable => {
            // Kept only when a failed disk may route the request to Kafka instead.
            let fallback = (cfg.on_disk_failure == OnDiskFailure::Direct).then(|| events.clone());
            match s.writer.append(events).await {
                Ok(_) => {}
                Err(AppendError::QuotaExceeded { .. }) => return Err(unavailable("buffer_full")),
                Err(AppendError::DiskFull { .. }) => return Err(unavailable("disk_full")),
                Err(AppendError::LargerThanQuota { quota, needed }) => {
                    return Err(ApiError::Rejected(Rejection {
                        status: StatusCode::PAYLOAD_TOO_LARGE,
                        reason: "request_exceeds_quota",
                        message: format!(
                            "the request's events take {needed} bytes, more than the whole buffer quota of {quota}; split it"
                        ),
                        index: None,
                    }));
                }
                Err(AppendError::Sealed) => return Err(unavailable("shutting_down")),
                Err(
                    e @ (AppendError::Disk(_) | AppendError::Stalled(_) | AppendError::Stopped),
                ) => match fallback {
                    Some(events) => {
                        tracing::warn!(error = %e, events = n, "buffer failed; delivering directly to kafka");
                        direct(s, &events).await?;
                    }
                    None => {
                        tracing::error!(error = %e, "buffer append failed");
                        return Err(unavailable("buffer_unavailable"));
                    }
                },
            }
        }
    }
    Ok(n)
}

async fn direct(s: &AppState, events: &[NewEvent]) -> Result<(), ApiError> {
    match forward::send_direct(&s.producer, events).await {
        Ok(()) => Ok(()),
        Err(forward::Error::Direct {
            index,
            reason,
            class: ErrorClass::DeadLetter(code),
            delivered,
        }) => Err(ApiError::Rejected(Rejection {
            status: StatusCode::BAD_REQUEST,
            reason: "rejected_by_kafka",
            message: format!(
                "event {index}: kafka rejected it for good ({code}): {reason}; {delivered} of the request's {} events were delivered (retry the others with the same uuids)",
                events.len()
            ),
            index: Some(index),
        })),
        Err(e) => {
            tracing::warn!(error = %e, "direct delivery failed");
            Err(ApiError::Unavailable {
                reason: "kafka_unavailable",
                retry_after: s.cfg.retry_after_secs,
            })
        }
    }
}

/// A header's value, its lines joined into one list as RFC 9110 §5.3 reads
/// them (so `identity` on one line and `gzip` on the next is `identity,
/// gzip`, not `identity`); bytes that are not text stay visible (as U+FFFD)
/// so they are refused rather than read as an absent header. One line of
/// text, the usual case, is borrowed.
fn header_list<'a>(
    headers: &'a HeaderMap,
    name: &header::HeaderName,
) -> Option<std::borrow::Cow<'a, str>> {
    let mut values = headers.get_all(name).iter();
    let first = String::from_utf8_lossy(values.next()?.as_bytes());
    Some(values.fold(first, |all, v| {
        let mut all = all.into_owned();
        all.push_str(", ");
        all.push_str(&String::from_utf8_lossy(v.as_bytes()));
        all.into()
    }))
}

#[cfg(test)]
mod tests;
