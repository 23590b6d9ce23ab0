//! Bounded memory for requests in flight (invariant 7).
//!
//! Every byte a request makes the pod hold while it is read, inflated, parsed
//! and buffered is charged to one global [`InflightBudget`] *before* it is
//! allocated: the body as received, the inflated body, and the parsed events
//! (payload copies plus [`EVENT_OVERHEAD_BYTES`] each). When the budget cannot
//! grant a charge the request is answered `503` with `Retry-After` at once
//! instead of queueing. A request's charge is returned as the buffers it paid
//! for are dropped, and in full when the request is answered.
//!
//! [`required_bytes`] is the most one request can ever hold; start-up refuses a
//! budget below it, so no valid request can be refused forever.
//!
//! [`EVENT_OVERHEAD_BYTES`]: super::ingest::EVENT_OVERHEAD_BYTES

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::Semaphore;

use super::ingest::{EVENT_OVERHEAD_BYTES, Rejection};

/// Budget granularity: permits are KiB, so budgets up to 4 TiB fit a `u32` charge.
const UNIT: usize = 1024;

/// The shared budget of bytes held by requests in flight.
#[derive(Clone)]
pub struct InflightBudget {
    sem: Arc<Semaphore>,
    total: usize,
}

impl std::fmt::Debug for InflightBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightBudget")
            .field("total", &self.total)
            .field("available", &self.available())
            .finish()
    }
}

/// The budget could not grant a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    /// Other requests hold it: answer 503 and let the client retry.
    Now,
    /// This request alone needs more than the whole budget: no retry can
    /// succeed, so it is a 413 (only reachable with keys far longer than a
    /// UUID; [`required_bytes`] covers every other request).
    Always {
        /// The whole budget, bytes.
        total: usize,
    },
}

impl Exhausted {
    /// The answer for a request the budget refused.
    pub fn rejection(self) -> Option<Rejection> {
        match self {
            Exhausted::Now => None,
            Exhausted::Always { total } => Some(Rejection {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                reason: "request_too_large",
                message: format!(
                    "request needs more than the {total} bytes of memory the pod grants to all requests together; send fewer or smaller events"
                ),
                index: None,
            }),
        }
    }
}

impl InflightBudget {
    /// A budget of `total_bytes`.
    pub fn new(total_bytes: usize) -> Self {
        let units = (total_bytes / UNIT).min(Semaphore::MAX_PERMITS);
        Self {
            sem: Arc::new(Semaphore::new(units)),
            total: units * UNIT,
        }
    }

    /// The whole budget, bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes not charged to any request now.
    pub fn available(&self) -> usize {
        self.sem.available_permits() * UNIT
    }

    /// An empty charge for one request.
    pub fn charge(&self) -> Charge {
        Charge {
            sem: self.sem.clone(),
            units: 0,
            total_units: self.total / UNIT,
        }
    }
}

/// What one request holds of the budget; returned when dropped.
#[derive(Debug)]
pub struct Charge {
    sem: Arc<Semaphore>,
    units: usize,
    total_units: usize,
}

impl Charge {
    /// Takes `bytes` more from the budget, or fails without waiting.
    pub fn grow(&mut self, bytes: usize) -> Result<(), Exhausted> {
        if bytes == 0 {
            return Ok(());
        }
        let units = bytes.div_ceil(UNIT);
        let always = Exhausted::Always {
            total: self.total_units * UNIT,
        };
        if self.units.saturating_add(units) > self.total_units {
            return Err(always);
        }
        let n = u32::try_from(units).map_err(|_| always)?;
        let permit = self.sem.try_acquire_many(n).map_err(|_| Exhausted::Now)?;
        permit.forget();
        self.units += units;
        Ok(())
    }

    /// Returns `bytes` to the budget (rounded down; never more than held).
    pub fn release(&mut self, bytes: usize) {
        let units = (bytes / UNIT).min(self.units);
        self.units -= units;
        self.sem.add_permits(units);
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.units * UNIT
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.sem.add_permits(self.units);
    }
}

/// The most one request can hold at once, with these limits: the larger of
/// (body as sent + inflated body) and (inflated body + its events, times
/// `copies` when the events are copied again: a direct stream hands them to
/// librdkafka, `--on-disk-failure direct` keeps a copy for the fallback).
pub fn required_bytes(
    max_body: usize,
    max_decompressed: usize,
    max_events: usize,
    copies: usize,
) -> usize {
    let body = max_body.max(max_decompressed);
    let events = body.saturating_add(max_events.saturating_mul(EVENT_OVERHEAD_BYTES + 256));
    max_body
        .saturating_add(max_decompressed)
        .max(body.saturating_add(events.saturating_mul(copies)))
}

/// Why a body could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// The client's fault (too large, too slow, broken); the connection is closed after the answer.
    Rejected(Rejection),
    /// The in-flight budget is exhausted.
    Busy,
}

impl From<Exhausted> for BodyError {
    fn from(e: Exhausted) -> Self {
        match e.rejection() {
            Some(r) => BodyError::Rejected(r),
            None => BodyError::Busy,
        }
    }
}

/// Reads a whole body of at most `limit` bytes within `timeout`, charging its
/// buffer to `charge` before growing it. `content_length` sizes the buffer
/// exactly when the client sent one; a body that never ends is stopped at the
/// limit, a stalled one at the timeout.
pub async fn read_body(
    body: Body,
    content_length: Option<u64>,
    limit: usize,
    timeout: Duration,
    charge: &mut Charge,
) -> Result<Bytes, BodyError> {
    let too_large = || {
        BodyError::Rejected(Rejection {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            reason: "body_too_large",
            message: format!("body exceeds {limit} bytes"),
            index: None,
        })
    };
    let mut buf: Vec<u8> = Vec::new();
    if let Some(len) = content_length {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > limit {
            return Err(too_large());
        }
        if let Err(e) = charge.grow(len) {
            // Busy now: read the body away so the 503 is not lost to a reset.
            discard(body, limit, timeout).await;
            return Err(e.into());
        }
        buf.reserve_exact(len);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut stream = body.into_data_stream();
    loop {
        let chunk = match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => {
                return Err(BodyError::Rejected(Rejection {
                    status: StatusCode::REQUEST_TIMEOUT,
                    reason: "body_timeout",
                    message: format!(
                        "request body was not received within {} s",
                        timeout.as_secs_f64()
                    ),
                    index: None,
                }));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(BodyError::Rejected(Rejection {
                    status: StatusCode::BAD_REQUEST,
                    reason: "body_read_failed",
                    message: format!("request body could not be read: {e}"),
                    index: None,
                }));
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        let needed = buf.len() + chunk.len();
        if needed > limit {
            return Err(too_large());
        }
        if needed > buf.capacity() {
            let target = (buf.capacity() * 2).max(64 * 1024).max(needed).min(limit);
            charge.grow(target - buf.capacity())?;
            buf.reserve_exact(target - buf.len());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// Reads and drops a body, up to `limit` bytes or `timeout`, holding at most
/// one frame at a time. Used before answering a request that is refused
/// without reading its body: closing a socket with unread data resets the
/// connection, and the client may lose the answer.
pub async fn discard(body: Body, limit: usize, timeout: Duration) {
    let mut stream = body.into_data_stream();
    let mut read = 0usize;
    let drain = async {
        while let Some(Ok(chunk)) = stream.next().await {
            read += chunk.len();
            if read > limit {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(timeout, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_granted_until_the_budget_is_spent_and_returned_on_drop() {
        let budget = InflightBudget::new(10 * UNIT);
        let mut a = budget.charge();
        a.grow(6 * UNIT).unwrap();
        let mut b = budget.charge();
        assert_eq!(b.grow(5 * UNIT), Err(Exhausted::Now));
        assert_eq!(
            budget.charge().grow(11 * UNIT),
            Err(Exhausted::Always { total: 10 * UNIT })
        );
        b.grow(4 * UNIT).unwrap();
        assert_eq!(budget.available(), 0);
        a.release(2 * UNIT + 1);
        assert_eq!(budget.available(), 2 * UNIT);
        drop(a);
        drop(b);
        assert_eq!(budget.available(), 10 * UNIT);
    }

    #[tokio::test]
    async fn reads_a_body_within_its_limit_and_charges_its_buffer() {
        let budget = InflightBudget::new(1 << 20);
        let mut charge = budget.charge();
        let body = Body::from(vec![b'x'; 100_000]);
        let got = read_body(body, None, 200_000, Duration::from_secs(5), &mut charge)
            .await
            .unwrap();
        assert_eq!(got.len(), 100_000);
        assert!(charge.held() >= 100_000, "{}", charge.held());
        let mut charge = budget.charge();
        let r = read_body(
            Body::from(vec![b'x'; 100]),
            Some(100),
            99,
            Duration::from_secs(5),
            &mut charge,
        )
        .await;
        assert!(matches!(r, Err(BodyError::Rejected(r)) if r.reason == "body_too_large"));
        assert_eq!(
            charge.held(),
            0,
            "nothing charged for a body refused by its length"
        );
    }

    #[tokio::test]
    async fn an_endless_body_stops_at_the_limit_and_a_stalled_one_at_the_timeout() {
        let budget = InflightBudget::new(64 << 20);
        let endless =
            futures::stream::repeat_with(|| Ok::<_, std::io::Error>(Bytes::from(vec![b'a'; 8192])));
        let mut charge = budget.charge();
        let r = read_body(
            Body::from_stream(endless),
            None,
            1 << 20,
            Duration::from_secs(30),
            &mut charge,
        )
        .await;
        assert!(
            matches!(r, Err(BodyError::Rejected(r)) if r.status == StatusCode::PAYLOAD_TOO_LARGE)
        );
        assert!(charge.held() <= 1 << 20);
        let stalled =
            futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"{")) })
                .chain(futures::stream::pending());
        let started = std::time::Instant::now();
        let r = read_body(
            Body::from_stream(stalled),
            None,
            1 << 20,
            Duration::from_millis(200),
            &mut budget.charge(),
        )
        .await;
        assert!(
            matches!(r, Err(BodyError::Rejected(r)) if r.status == StatusCode::REQUEST_TIMEOUT)
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn an_exhausted_budget_refuses_instead_of_waiting() {
        let budget = InflightBudget::new(64 * UNIT);
        let mut hog = budget.charge();
        hog.grow(60 * UNIT).unwrap();
        let r = read_body(
            Body::from(vec![b'x'; 10 * UNIT]),
            Some(10 * UNIT as u64),
            1 << 20,
            Duration::from_secs(5),
            &mut budget.charge(),
        )
        .await;
        assert!(matches!(r, Err(BodyError::Busy)));
        assert_eq!(budget.available(), 4 * UNIT);
    }

    #[test]
    fn one_request_never_needs_more_than_required_bytes() {
        // Defaults: 5 MiB body, 20 MiB inflated, 10,000 events, one copy.
        let need = required_bytes(5 << 20, 20 << 20, 10_000, 1);
        assert!(((25 << 20)..48 << 20).contains(&need), "{need}");
        assert!(required_bytes(5 << 20, 20 << 20, 10_000, 2) > need);
    }
}
