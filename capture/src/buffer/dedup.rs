//! Idempotent ingestion: an event whose `uuid` is still in the buffer (queued
//! or kept as a dead letter), or was delivered within the deduplication
//! window, is acknowledged again without being stored twice.
//!
//! The window lives in the buffer file, so it survives restarts. One row per
//! uuid, written once when its event is appended:
//! ```sql
//! uuids(seq INTEGER PRIMARY KEY, uuid TEXT NOT NULL, delivered_at_ms INTEGER NOT NULL)
//! -- indexes: uuids(uuid), uuids(delivered_at_ms)
//! ```
//! `seq` is the event's sequence number (kept while it is a dead letter);
//! `delivered_at_ms` is [`BUFFERED`] while the event or dead letter is in the
//! buffer, and the delivery time once it is gone. The settlement that deletes
//! delivered events sets that time in the same transaction, so a uuid is
//! always either buffered or remembered: a crash between the two cannot open
//! a gap. Only the uuid index takes a write at a random place (and only once
//! per event, at append); the `seq` rows and the delivery-time index grow at
//! their ends. Every settlement (and at most once a second, an append round)
//! prunes a bounded chunk of the oldest expired rows. A remembered uuid
//! counts [`remembered_size`] bytes against the quota, like event data, but
//! gives way: when events (or a settlement's new uuids) need the room, the
//! oldest remembered uuids are forgotten early ([`Window::evict`]), so the
//! window never makes the buffer refuse an event; it only covers less time
//! while the buffer is nearly full. With the window off the table is empty.
//!
//! Only this buffer is consulted: a retry that lands on another pod (another
//! volume) is not deduplicated there.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::NewEvent;

/// Default deduplication window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(600);
/// `delivered_at_ms` of a uuid whose event (or dead letter) is still buffered.
pub const BUFFERED: i64 = i64::MAX;

/// Bytes a remembered uuid counts against the quota besides the uuid itself
/// (its delivery time and row id).
pub const ROW_OVERHEAD: u64 = 16;
/// Fewest expired rows a prune may delete in one go.
const PRUNE_CHUNK: usize = 1024;
/// Append rounds prune at most this often (settlements prune every time).
const APPEND_PRUNE_INTERVAL: Duration = Duration::from_secs(1);

/// Bytes one remembered uuid counts against the quota.
pub fn remembered_size(uuid: &str) -> u64 {
    uuid.len() as u64 + ROW_OVERHEAD
}

/// The deduplication window as the writer applies it.
#[derive(Debug, Clone)]
pub(super) struct Window {
    ms: i64,
    last_append_prune: Option<Instant>,
}

impl Window {
    /// A window of `length` (zero: deduplication off).
    pub fn new(length: Duration) -> Self {
        Self {
            ms: i64::try_from(length.as_millis()).unwrap_or(i64::MAX),
            last_append_prune: None,
        }
    }

    /// Whether appends are checked at all.
    pub fn is_on(&self) -> bool {
        self.ms > 0
    }

    /// Uuids delivered at or before this time are forgotten.
    fn cutoff(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.ms)
    }

    /// Whether an append round should prune now (at most once an interval).
    pub fn append_prune_due(&mut self) -> bool {
        let due = self
            .last_append_prune
            .is_none_or(|t| t.elapsed() >= APPEND_PRUNE_INTERVAL);
        if due {
            self.last_append_prune = Some(Instant::now());
        }
        due
    }

    /// Marks the events of one request that must not be stored again: a
    /// uuid seen earlier in the request, buffered (queued, or a dead letter),
    /// or delivered within the window. All false when the window is off.
    pub fn duplicates(
        &self,
        conn: &Connection,
        events: &[NewEvent],
        now_ms: i64,
    ) -> rusqlite::Result<Vec<bool>> {
        if !self.is_on() {
            return Ok(vec![false; events.len()]);
        }
        // BUFFERED is past any cutoff: buffered uuids count as seen.
        let mut known = conn.prepare_cached(
            "SELECT EXISTS(SELECT 1 FROM uuids WHERE uuid = ?1 AND delivered_at_ms > ?2)",
        )?;
        let cutoff = self.cutoff(now_ms);
        let mut seen = HashSet::with_capacity(if events.len() > 1 { events.len() } else { 0 });
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            let repeated = events.len() > 1 && !seen.insert(e.uuid.as_str());
            let dup = repeated || known.query_row((&e.uuid, cutoff), |r| r.get::<_, bool>(0))?;
            out.push(dup);
        }
        Ok(out)
    }

    /// Records the uuid of event `seq`, just appended, as buffered.
    pub fn record(&self, conn: &Connection, seq: i64, uuid: &str) -> rusqlite::Result<()> {
        if !self.is_on() {
            return Ok(());
        }
        conn.prepare_cached(
            "INSERT OR REPLACE INTO uuids(seq, uuid, delivered_at_ms) VALUES (?1, ?2, ?3)",
        )?
        .execute((seq, uuid, BUFFERED))?;
        Ok(())
    }

    /// A dead letter went back into the queue as event `to`.
    pub fn moved(&self, conn: &Connection, from: i64, to: i64) -> rusqlite::Result<()> {
        if !self.is_on() {
            return Ok(());
        }
        conn.prepare_cached("UPDATE uuids SET seq = ?2 WHERE seq = ?1")?
            .execute((from, to))?;
        Ok(())
    }

    /// Remembers the uuid of event or dead letter `seq` (about to be deleted:
    /// delivered, copied to the dead-letter topic, or exported) as delivered
    /// now; returns the bytes it now counts against the quota (0 when off or
    /// gone).
    pub fn remember(&self, conn: &Connection, seq: i64, now_ms: i64) -> rusqlite::Result<u64> {
        if !self.is_on() {
            return Ok(0);
        }
        let mut update = conn.prepare_cached(
            "UPDATE uuids SET delivered_at_ms = ?2 WHERE seq = ?1 AND delivered_at_ms = ?3
             RETURNING length(uuid)",
        )?;
        sum_remembered(update.query((seq, now_ms, BUFFERED))?)
    }

    /// Remembers the uuids of every event with `seq <= through` (about to be
    /// deleted by one range delete); returns the bytes they now count against
    /// the quota (0 when off).
    pub fn remember_through(
        &self,
        conn: &Connection,
        through: i64,
        now_ms: i64,
    ) -> rusqlite::Result<u64> {
        if !self.is_on() {
            return Ok(0);
        }
        let mut update = conn.prepare_cached(
            "UPDATE uuids SET delivered_at_ms = ?2
             WHERE seq IN (SELECT seq FROM events WHERE seq <= ?1) AND delivered_at_ms = ?3
             RETURNING length(uuid)",
        )?;
        sum_remembered(update.query((through, now_ms, BUFFERED))?)
    }

    /// Forgets the oldest remembered uuids, expired or not, until `bytes`
    /// are freed or none is left; returns the bytes freed.
    pub fn evict(&self, conn: &Connection, bytes: u64) -> rusqlite::Result<u64> {
        let mut evict = conn.prepare_cached(
            "DELETE FROM uuids WHERE seq IN (
                 SELECT seq FROM uuids WHERE delivered_at_ms < ?2
                 ORDER BY delivered_at_ms LIMIT ?1)
             RETURNING length(uuid)",
        )?;
        let mut freed = 0;
        while freed < bytes {
            // Rows of a hyphenated uuid; a shorter one only takes another pass.
            let n = ((bytes - freed) / (36 + ROW_OVERHEAD)).max(1);
            let got = sum_remembered(evict.query((n as i64, BUFFERED))?)?;
            if got == 0 {
                break;
            }
            freed += got;
        }
        Ok(freed)
    }

    /// Forgets expired uuids: at most `max(at_least, 1024)` of the oldest,
    /// so one prune's work is bounded however large the window is. Returns
    /// the bytes freed from the quota.
    pub fn prune(&self, conn: &Connection, at_least: usize, now_ms: i64) -> rusqlite::Result<u64> {
        let mut prune = conn.prepare_cached(
            "DELETE FROM uuids WHERE seq IN (
                 SELECT seq FROM uuids WHERE delivered_at_ms <= ?1
                 ORDER BY delivered_at_ms LIMIT ?2)
             RETURNING length(uuid)",
        )?;
        let chunk = at_least.max(PRUNE_CHUNK) as i64;
        sum_remembered(prune.query((self.cutoff(now_ms), chunk))?)
    }

    /// Brings the table in line with the buffer when the writer starts: with
    /// the window off, forgets everything (an off window remembers nothing);
    /// on, records the uuids of events and dead letters buffered while it was
    /// off, and releases rows whose event is gone without a settlement that
    /// said so (none are expected; a row left buffered would never expire).
    pub fn reconcile(&self, conn: &Connection, now_ms: i64) -> rusqlite::Result<()> {
        if !self.is_on() {
            conn.execute("DELETE FROM uuids", [])?;
            return Ok(());
        }
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = (|| {
            let known: i64 =
                conn.query_row("SELECT coalesce(max(seq), 0) FROM uuids", [], |r| r.get(0))?;
            for table in ["events", "dead_letters"] {
                conn.execute(
                    &format!(
                        "INSERT OR IGNORE INTO uuids(seq, uuid, delivered_at_ms)
                         SELECT seq, uuid, ?2 FROM {table} WHERE seq > ?1"
                    ),
                    (known, BUFFERED),
                )?;
            }
            conn.execute(
                "UPDATE uuids SET delivered_at_ms = ?2 WHERE delivered_at_ms = ?1
                   AND NOT EXISTS (SELECT 1 FROM events e WHERE e.seq = uuids.seq)
                   AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.seq = uuids.seq)",
                (BUFFERED, now_ms),
            )?;
            Ok(())
        })();
        conn.execute_batch(if result.is_ok() { "COMMIT" } else { "ROLLBACK" })?;
        result
    }
}

/// Sums [`remembered_size`] over rows of `length(uuid)`.
fn sum_remembered(mut rows: rusqlite::Rows<'_>) -> rusqlite::Result<u64> {
    let mut bytes = 0;
    while let Some(r) = rows.next()? {
        bytes += r.get::<_, i64>(0)?.max(0) as u64 + ROW_OVERHEAD;
    }
    Ok(bytes)
}

/// Bytes the remembered uuids count against the quota (a scan; at start-up).
pub fn window_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT coalesce(sum(length(uuid)), 0) + ?1 * count(*) FROM uuids
         WHERE delivered_at_ms < ?2",
        [ROW_OVERHEAD as i64, BUFFERED],
        |r| r.get::<_, i64>(0).map(|n| n.max(0) as u64),
    )
}

/// Uuids remembered as delivered within the last `window` (for `inspect` and tests).
pub fn remembered(conn: &Connection, window: Duration, now_ms: i64) -> rusqlite::Result<u64> {
    let cutoff = Window::new(window).cutoff(now_ms);
    conn.query_row(
        "SELECT count(*) FROM uuids WHERE delivered_at_ms > ?1 AND delivered_at_ms < ?2",
        [cutoff, BUFFERED],
        |r| r.get::<_, i64>(0).map(|n| n.max(0) as u64),
    )
}
