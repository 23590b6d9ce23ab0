//! The trivial handler: an HTTP server on the same stack as the capture pod
//! (axum on tokio, HTTP/1.1) that reads each body and answers 200 at once.
//! Its request rate is the machine's ceiling for the load generator and the
//! HTTP layer, against which the capture pod's rate is a ratio.

use std::net::SocketAddr;

use anyhow::Result;
use axum::Router;
use axum::body::Bytes;
use axum::routing::{get, post};

async fn accept(body: Bytes) -> ([(&'static str, &'static str); 1], String) {
    // Count like the real handler answers, without parsing: one object or an array.
    let n = if body.first() == Some(&b'[') {
        body.iter().filter(|b| **b == b'{').count()
    } else {
        1
    };
    (
        [("content-type", "application/json")],
        format!(r#"{{"accepted":{n}}}"#),
    )
}

/// The router: `POST /v1/events[/{stream}]` and `GET /readyz`.
pub fn router() -> Router {
    Router::new()
        .route("/v1/events", post(accept))
        .route("/v1/events/{stream}", post(accept))
        .route("/readyz", get(|| async { "ok" }))
        .route("/healthz", get(|| async { "ok" }))
}

/// Serves until the process is killed.
pub async fn serve(listen: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, router()).await?;
    Ok(())
}
