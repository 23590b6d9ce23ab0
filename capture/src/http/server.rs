//! The HTTP/1 server: our own accept loop around hyper's connection builder,
//! because `axum::serve` has no knob for abuse.
//!
//! - at most `--max-connections` open connections; one past it gets a `503`
//!   with `Retry-After` and is closed (or, when even those answers pile up,
//!   just closed), while the connections already open keep being served;
//! - a request head larger than `--max-header-bytes` gets `431`;
//! - a connection that does not deliver a whole request head within
//!   `--header-read-timeout-secs` (a slow client, or a keep-alive connection
//!   left idle) is closed; the body deadline is the handler's
//!   (`--body-read-timeout-secs`, see [`super::limits::read_body`]);
//! - `TCP_NODELAY` on every connection (small responses on keep-alive
//!   connections never wait on Nagle's algorithm);
//! - graceful shutdown: when `shutdown` resolves the listener is closed, idle
//!   connections are closed, and requests in flight are answered before their
//!   connection closes; [`serve`] returns once every connection is gone.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::AppState;

/// Refusals being written at once; past it, extra connections are just closed.
const MAX_REFUSALS: usize = 64;

/// How long a refused connection may take to read its answer.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Serves `state`'s router on `listener` until `shutdown` resolves, then lets
/// requests in flight finish and returns when every connection has closed.
/// Also keeps the auth token file reloaded for as long as it serves.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let cfg = state.cfg.clone();
    let router = super::router(state.clone());
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_header_size(cfg.max_header_bytes)
        // hyper's read buffer: also the most a header can take before 431.
        .max_buf_size(cfg.max_header_bytes.max(8192));
    let max = cfg.max_connections;
    let connections = Arc::new(Semaphore::new(max));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let (close_tx, close_rx) = watch::channel(false);
    let watcher = tokio::spawn(cfg.auth.clone().watch(cfg.auth_reload));
    let refusal = refusal_response(cfg.retry_after_secs);
    tokio::pin!(shutdown);
    loop {
        let (tcp, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        match connections.clone().try_acquire_owned() {
            Ok(permit) => {
                let conn = builder
                    .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router.clone()));
                let mut close = close_rx.clone();
                tokio::spawn(async move {
                    tokio::pin!(conn);
                    tokio::select! {
                        r = conn.as_mut() => {
                            if let Err(e) = r {
                                tracing::debug!(error = %e, "connection closed with an error");
                            }
                        }
                        _ = close.changed() => {
                            conn.as_mut().graceful_shutdown();
                            if let Err(e) = conn.await {
                                tracing::debug!(error = %e, "connection closed with an error");
                            }
                        }
                    }
                    drop(permit);
                });
            }
            Err(_) => {
                state.metrics.reject("too_many_connections");
                if let Ok(permit) = refusals.clone().try_acquire_owned() {
                    let refusal = refusal.clone();
                    tokio::spawn(async move {
                        refuse(tcp, &refusal).await;
                        drop(permit);
                    });
                }
            }
        }
    }
    drop(listener);
    let _ = close_tx.send(true);
    // Every connection task holds one permit: all of them back means all closed.
    let _ = connections.acquire_many(max as u32).await;
    watcher.abort();
    Ok(())
}

fn refusal_response(retry_after: u64) -> Arc<[u8]> {
    let body = r#"{"error":"too_many_connections","message":"try again later"}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: {retry_after}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
    .into()
}

/// Answers 503 without parsing the request, then reads what the client sent
/// for a moment so that closing does not reset the connection before the
/// client read the answer.
async fn refuse(mut tcp: TcpStream, response: &[u8]) {
    let linger = async {
        tcp.write_all(response).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut read = 0usize;
        while read < 64 * 1024 {
            match tcp.read(&mut sink).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, linger).await;
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
