//! The load generator: HTTP/1.1 `POST`s over a fixed pool of keep-alive
//! connections, either open-loop at a fixed rate or closed-loop as fast as
//! the server answers.
//!
//! Open loop keeps no coordinated omission: request `k` is *intended* at
//! `start + k / rate`, whichever connection is free takes the next ticket, and
//! when no connection was free in time its latency is measured from the
//! intended time, not from when it was sent. A server that stalls therefore
//! shows the wait of every request it delayed, as wrk2 does. (A connection
//! that was idle and woken by tokio's 1 ms timer a little late measures from
//! the wake-up: that slack is the generator's, not queueing.) Latencies go into an HDR histogram per connection (no lock on
//! the hot path), merged at the end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::BodySpec;

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pace {
    /// Open loop: this many requests per second in total.
    Fixed {
        /// Requests per second.
        rate: f64,
    },
    /// Closed loop: each connection sends its next request when the last is answered.
    Max,
}

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Request path, e.g. `/v1/events`.
    pub path: String,
    /// Pacing.
    pub pace: Pace,
    /// Keep-alive connections (one request in flight on each).
    pub connections: usize,
    /// Load before measuring (same pace, not recorded).
    pub warmup: Duration,
    /// Measured time.
    pub duration: Duration,
    /// Stop after this many requests in all (warm-up included), if set.
    pub max_requests: Option<u64>,
    /// What each request carries.
    pub body: BodySpec,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn from_micros(h: &Histogram<u64>) -> Self {
        let ms = |v: u64| v as f64 / 1000.0;
        if h.is_empty() {
            return Self::default();
        }
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }

    /// p50 <= p99 <= p99.9 <= max, all finite and non-negative.
    pub fn ordered(&self) -> bool {
        let all = [self.p50, self.p99, self.p999, self.max];
        all.iter().all(|v| v.is_finite() && *v >= 0.0) && all.windows(2).all(|w| w[0] <= w[1])
    }
}

/// What a load run measured (answers sent in the measured window only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadResult {
    /// Requests answered 200.
    pub requests: u64,
    /// Events in those requests.
    pub events: u64,
    /// Failed requests by cause: an HTTP status (`"503"`), `"io"` (connection
    /// failed or closed), `"unsent"` (open loop: the schedule's tickets no
    /// connection took before the run's hard stop).
    pub errors: BTreeMap<String, u64>,
    /// Length of the measured window (open loop: until the last answer).
    pub seconds: f64,
    /// `requests / seconds`.
    pub requests_per_sec: f64,
    /// `events / seconds`.
    pub events_per_sec: f64,
    /// Latency of 200 answers (open loop: from the intended send time).
    pub latency_ms: Percentiles,
}

impl LoadResult {
    /// Sum of every error count.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

struct Worker {
    hist: Histogram<u64>,
    ok: u64,
    attempted: u64,
    errors: BTreeMap<String, u64>,
    last_done: Option<Instant>,
}

fn histogram() -> Histogram<u64> {
    // 1 us .. 1 h, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds")
}

/// A fresh keep-alive HTTP/1.1 connection.
async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Ends when the peer closes; the sender then reports the error.
        let _ = conn.await;
    });
    Ok(sender)
}

async fn post(
    sender: &mut SendRequest<Full<Bytes>>,
    host: &str,
    path: &str,
    body: Bytes,
) -> Result<u16> {
    sender.ready().await?;
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    // Read the whole answer so the connection can carry the next request.
    resp.into_body().collect().await?;
    Ok(status)
}

/// Runs one load and returns what it measured.
pub async fn run(spec: &LoadSpec) -> Result<LoadResult> {
    if spec.connections == 0 {
        bail!("connections must be at least 1");
    }
    if let Pace::Fixed { rate } = spec.pace
        && !(rate > 0.0 && rate.is_finite())
    {
        bail!("rate must be positive, got {rate}");
    }
    let mut senders = Vec::with_capacity(spec.connections);
    for _ in 0..spec.connections {
        senders.push(
            connect(spec.addr)
                .await
                .with_context(|| format!("connecting to {}", spec.addr))?,
        );
    }
    let fixed_body = spec.body.body(0);
    let host = Arc::<str>::from(spec.addr.to_string());
    let path = Arc::<str>::from(spec.path.as_str());
    let tickets = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    // Open loop: a server that falls behind gets this long to catch up.
    let hard_stop = end + spec.duration.max(Duration::from_secs(1));
    let mut tasks = Vec::with_capacity(spec.connections);
    for mut sender in senders {
        let (tickets, host, path) = (tickets.clone(), host.clone(), path.clone());
        let (spec, fixed_body) = (spec.clone(), fixed_body.clone());
        tasks.push(tokio::spawn(async move {
            let mut w = Worker {
                hist: histogram(),
                ok: 0,
                attempted: 0,
                errors: BTreeMap::new(),
                last_done: None,
            };
            tokio::time::sleep_until(start).await;
            loop {
                let k = tickets.fetch_add(1, Ordering::Relaxed);
                if spec.max_requests.is_some_and(|m| k >= m) {
                    break;
                }
                // `intended`: the schedule's time (decides the window);
                // `clock`: where this request's latency starts.
                let (intended, clock) = match spec.pace {
                    Pace::Fixed { rate } => {
                        let at = start + Duration::from_secs_f64(k as f64 / rate);
                        let now = Instant::now();
                        if at >= end || now >= hard_stop {
                            break;
                        }
                        if now >= at {
                            // Taken late because every connection was busy:
                            // the wait is the server's doing and counts.
                            (at, at)
                        } else {
                            // The connection was idle: tokio's timer (1 ms
                            // granularity) may wake it late, and that slack is
                            // the generator's own, not the server's.
                            tokio::time::sleep_until(at).await;
                            (at, Instant::now())
                        }
                    }
                    Pace::Max => {
                        let now = Instant::now();
                        if now >= end {
                            break;
                        }
                        (now, now)
                    }
                };
                let body = if spec.body.varies() {
                    spec.body.body(k as usize)
                } else {
                    fixed_body.clone()
                };
                let answer = post(&mut sender, &host, &path, body).await;
                let done = Instant::now();
                let measured = intended >= measure_from;
                w.attempted += u64::from(measured);
                match answer {
                    Ok(200) if measured => {
                        w.ok += 1;
                        w.last_done = Some(done);
                        let micros = (done - clock).as_micros() as u64;
                        w.hist.saturating_record(micros.max(1));
                    }
                    Ok(200) => {}
                    Ok(status) => {
                        if measured {
                            *w.errors.entry(status.to_string()).or_default() += 1;
                        }
                    }
                    Err(_) => {
                        if measured {
                            *w.errors.entry("io".to_owned()).or_default() += 1;
                        }
                        // The connection is gone: open another, backing off
                        // while the server refuses.
                        loop {
                            match connect(spec.addr).await {
                                Ok(s) => {
                                    sender = s;
                                    break;
                                }
                                Err(_) if Instant::now() < hard_stop => {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                                Err(_) => return w,
                            }
                        }
                    }
                }
            }
            w
        }));
    }
    let mut hist = histogram();
    let mut ok = 0;
    let mut attempted = 0;
    let mut errors = BTreeMap::new();
    let mut last_done = end;
    for task in tasks {
        let w = task.await?;
        hist.add(&w.hist)?;
        ok += w.ok;
        attempted += w.attempted;
        for (k, v) in w.errors {
            *errors.entry(k).or_default() += v;
        }
        if let Some(d) = w.last_done {
            last_done = last_done.max(d);
        }
    }
    let seconds = match spec.pace {
        Pace::Fixed { rate } => {
            // Tickets whose intended time falls in the measured window.
            let first = (spec.warmup.as_secs_f64() * rate).ceil() as u64;
            let last = ((spec.warmup + spec.duration).as_secs_f64() * rate).ceil() as u64;
            let scheduled = last - first;
            if spec.max_requests.is_none() && attempted < scheduled {
                errors.insert("unsent".to_owned(), scheduled - attempted);
            }
            (last_done - measure_from)
                .as_secs_f64()
                .max(spec.duration.as_secs_f64())
        }
        Pace::Max => spec.duration.as_secs_f64(),
    };
    let events = ok * spec.body.events_per_request as u64;
    let seconds = seconds.max(1e-9);
    Ok(LoadResult {
        requests: ok,
        events,
        errors,
        seconds,
        requests_per_sec: ok as f64 / seconds,
        events_per_sec: events as f64 / seconds,
        latency_ms: Percentiles::from_micros(&hist),
    })
}

/// `host:port` or `http://host:port/path` into an address and a path.
pub fn parse_url(url: &str) -> Result<(SocketAddr, String)> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/v1/events".to_owned()),
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .with_context(|| format!("resolving {authority:?}"))?
        .next()
        .with_context(|| format!("{authority:?} resolves to no address"))?;
    Ok((addr, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram_in_milliseconds() {
        let mut h = histogram();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        let p = Percentiles::from_micros(&h);
        assert!((p.p50 - 5.0).abs() < 0.01, "{p:?}");
        assert!((p.p99 - 9.9).abs() < 0.01, "{p:?}");
        assert!((p.max - 10.0).abs() < 0.01, "{p:?}");
        assert!(p.ordered());
        assert!(!Percentiles { p50: 20.0, ..p }.ordered());
        assert!(!Percentiles { p50: f64::NAN, ..p }.ordered());
    }

    #[test]
    fn urls_split_into_address_and_path() {
        let (addr, path) = parse_url("http://127.0.0.1:8080/v1/events/clicks").unwrap();
        assert_eq!(addr.port(), 8080);
        assert_eq!(path, "/v1/events/clicks");
        assert_eq!(parse_url("127.0.0.1:1").unwrap().1, "/v1/events");
    }
}
