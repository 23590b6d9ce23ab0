//! Request bodies for the load generator: JSON events of a fixed size, one
//! object per request or an array of N, with or without a client `uuid`.

use bytes::Bytes;

/// What one request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BodySpec {
    /// Events per request: 1 sends a JSON object, more a JSON array.
    pub events_per_request: usize,
    /// Bytes of each event's JSON (padded to this size; at least the fixed fields).
    pub event_bytes: usize,
    /// Each event carries a fresh random `uuid` (UUIDv4), so the server's
    /// deduplication index sees random keys; otherwise the server generates one.
    pub client_uuids: bool,
}

impl Default for BodySpec {
    fn default() -> Self {
        Self {
            events_per_request: 1,
            event_bytes: 300,
            client_uuids: false,
        }
    }
}

const UUID_FIELD: usize = r#""uuid":"00000000-0000-0000-0000-000000000000","#.len();

/// One event of exactly `bytes` bytes (or the smallest possible), numbered `i`.
pub fn event(i: usize, bytes: usize, uuid: Option<uuid::Uuid>) -> String {
    let head = match uuid {
        Some(u) => format!(r#"{{"uuid":"{u}","#),
        None => "{".to_owned(),
    };
    let fields = format!(
        r#""type":"page_view","user":"u-{:06}","path":"/pricing","ms":{},"pad":""#,
        i % 1_000_000,
        i % 1000
    );
    let fixed = head.len() + fields.len() + 2;
    let pad = "x".repeat(bytes.saturating_sub(fixed));
    format!(r#"{head}{fields}{pad}"}}"#)
}

impl BodySpec {
    /// A request body; `seed` varies the event fields between requests.
    pub fn body(&self, seed: usize) -> Bytes {
        let n = self.events_per_request.max(1);
        let one = |i: usize| {
            let uuid = self.client_uuids.then(uuid::Uuid::new_v4);
            event(seed.wrapping_add(i), self.event_bytes, uuid)
        };
        if n == 1 {
            return Bytes::from(one(0));
        }
        let mut out = String::with_capacity(n * (self.event_bytes + 1) + 2);
        out.push('[');
        for i in 0..n {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&one(i));
        }
        out.push(']');
        Bytes::from(out)
    }

    /// Whether every request needs a fresh body (client uuids must differ).
    pub fn varies(&self) -> bool {
        self.client_uuids
    }

    /// The smallest event this spec can make.
    pub fn min_event_bytes(&self) -> usize {
        event(0, 0, None).len() + if self.client_uuids { UUID_FIELD } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_the_requested_size_and_parse() {
        for uuid in [None, Some(uuid::Uuid::new_v4())] {
            let e = event(7, 300, uuid);
            assert_eq!(e.len(), 300, "{e}");
            let v: serde_json::Value = serde_json::from_str(&e).unwrap();
            assert_eq!(v["type"], "page_view");
            assert_eq!(v.get("uuid").is_some(), uuid.is_some());
        }
    }

    #[test]
    fn batch_bodies_are_arrays_of_distinct_uuids() {
        let spec = BodySpec {
            events_per_request: 100,
            event_bytes: 300,
            client_uuids: true,
        };
        let body = spec.body(0);
        let v: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
        assert_eq!(v.len(), 100);
        let uuids: std::collections::BTreeSet<_> =
            v.iter().map(|e| e["uuid"].as_str().unwrap()).collect();
        assert_eq!(uuids.len(), 100);
        assert!(spec.min_event_bytes() < 300);
    }
}
