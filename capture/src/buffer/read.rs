//! Reading the buffer: batches for the forwarder, counts and figures for
//! start-up and `inspect`, dead letters for the API. Every read is on a
//! connection of its own ([`super::open_reader`]), never the writer's.

use std::path::Path;
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::{NewEvent, Result, Stats, StoredEvent, now_ms, salvage};

/// Reads a `meta` value.
pub fn meta(conn: &Connection, key: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?)
}

/// Columns of `events` as [`stored_event`] reads them.
const EVENT_COLUMNS: &str = "seq, uuid, topic, key, payload, captured_at_ms";

/// One row as an event. The events of a read share one copy of each run of
/// the same topic (`last`): the row's topic is compared before it is copied.
fn stored_event(
    r: &rusqlite::Row<'_>,
    last: &mut Option<Arc<str>>,
) -> rusqlite::Result<StoredEvent> {
    let name = r.get_ref(2)?.as_str()?;
    let topic = match last {
        Some(t) if **t == *name => t.clone(),
        _ => last.insert(Arc::from(name)).clone(),
    };
    Ok(StoredEvent {
        seq: r.get(0)?,
        event: NewEvent {
            uuid: r.get(1)?,
            topic,
            key: r.get(3)?,
            payload: r.get(4)?,
            captured_at_ms: r.get(5)?,
            // Read back for delivery, where it does not matter.
            client_uuid: true,
        },
    })
}

/// Reads up to `limit` of the oldest events with `seq > after`.
pub fn read_batch(conn: &Connection, after: i64, limit: usize) -> Result<Vec<StoredEvent>> {
    let limit = sql_limit(limit);
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE seq > ?1 ORDER BY seq LIMIT {limit}"
    ))?;
    let mut last = None;
    let rows = stmt.query_map(params![after], |r| stored_event(r, &mut last))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Reads the oldest events with `seq > after`, at most `limit` of them and
/// at most `max_bytes` of them (but always one, however large), skipping
/// `exclude_topics`.
pub fn read_batch_bounded(
    conn: &Connection,
    after: i64,
    limit: usize,
    max_bytes: u64,
    exclude_topics: &[&str],
) -> Result<Vec<StoredEvent>> {
    let exclude = (!exclude_topics.is_empty())
        .then(|| serde_json::to_string(exclude_topics).unwrap_or_else(|_| "[]".into()));
    let mut stmt = conn.prepare_cached(&batch_statement(exclude_topics, limit))?;
    let mut rows = stmt.query(params![exclude, after])?;
    let mut out = Vec::new();
    let mut bytes = 0u64;
    let mut last = None;
    while let Some(r) = rows.next()? {
        let event = stored_event(r, &mut last)?;
        bytes += event.event.size();
        if !out.is_empty() && bytes > max_bytes {
            break;
        }
        out.push(event);
    }
    Ok(out)
}

/// The forwarder's read of at most `limit` rows, for `exclude_topics` (only
/// whether there are any matters).
///
/// The limit is written into the statement, not bound: SQLite plans with a
/// bound `LIMIT`'s value, so each new binding (every batch) made it parse
/// and plan the statement again. One statement is cached per limit, and a
/// forwarder reads with one.
pub(super) fn batch_statement(exclude_topics: &[&str], limit: usize) -> String {
    // Without parked topics, no row pays for the topic test (?1 is then
    // bound to NULL and unused).
    let filter = match exclude_topics {
        [] => "?1 IS NULL",
        _ => "topic NOT IN (SELECT value FROM json_each(?1))",
    };
    let limit = sql_limit(limit);
    format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE seq > ?2 AND {filter} ORDER BY seq LIMIT {limit}"
    )
}

/// A limit as SQLite reads an integer literal: past `i64::MAX` it would
/// read a real number, which `LIMIT` refuses.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Counts and sizes what is buffered (a scan; used at start-up and by `inspect`).
pub fn totals(conn: &Connection) -> Result<(u64, u64)> {
    Ok(conn.query_row(
        "SELECT count(*), coalesce(sum(length(payload) + length(key) + length(uuid) + length(topic)), 0)
         FROM events",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )?)
}

/// Counts and sizes the dead letters kept in the buffer.
pub fn dead_letter_totals(conn: &Connection) -> Result<(u64, u64)> {
    Ok(conn.query_row(
        "SELECT count(*), coalesce(sum(length(payload) + length(key) + length(uuid) + length(topic)), 0)
         FROM dead_letters",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )?)
}

/// Capture time of the oldest buffered event, if any.
pub fn oldest_captured_at(conn: &Connection) -> Result<Option<i64>> {
    // Cached: the writer asks after every settlement that deleted events.
    Ok(conn
        .prepare_cached("SELECT captured_at_ms FROM events ORDER BY seq LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()?)
}

/// Highest sequence number ever assigned (0 for a new file).
pub fn last_seq(conn: &Connection) -> Result<i64> {
    Ok(conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'events'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

/// A dead letter as kept in the buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterRow {
    /// Sequence number the event had in the queue.
    pub seq: i64,
    /// Stable id.
    pub uuid: String,
    /// Topic it was meant for.
    pub topic: String,
    /// Why Kafka rejected it.
    pub reason: String,
    /// When it was moved to dead letters (ms since the epoch).
    pub failed_at_ms: i64,
    /// Capture time (ms since the epoch).
    pub captured_at_ms: i64,
    /// Partition key.
    #[serde(skip)]
    pub key: Vec<u8>,
    /// The event as sent.
    #[serde(skip)]
    pub payload: Vec<u8>,
}

/// Which dead letters a command applies to.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    /// Only these sequence numbers (all when empty).
    pub seqs: Vec<i64>,
    /// Only this topic.
    pub topic: Option<String>,
    /// Only reasons starting with this (e.g. `unknown_topic`).
    pub reason: Option<String>,
}

impl DeadLetterFilter {
    fn matches(&self, row: &DeadLetterRow) -> bool {
        (self.seqs.is_empty() || self.seqs.contains(&row.seq))
            && self.topic.as_ref().is_none_or(|t| *t == row.topic)
            && self
                .reason
                .as_ref()
                .is_none_or(|r| row.reason.starts_with(r.as_str()))
    }
}

/// Up to `limit` dead letters with `seq > after` matching `filter`, oldest first.
pub fn dead_letters(
    conn: &Connection,
    after: i64,
    limit: usize,
    filter: &DeadLetterFilter,
) -> Result<Vec<DeadLetterRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, uuid, topic, reason, failed_at_ms, captured_at_ms, key, payload
         FROM dead_letters WHERE seq > ?1 ORDER BY seq",
    )?;
    let rows = stmt.query_map([after], |r| {
        Ok(DeadLetterRow {
            seq: r.get(0)?,
            uuid: r.get(1)?,
            topic: r.get(2)?,
            reason: r.get(3)?,
            failed_at_ms: r.get(4)?,
            captured_at_ms: r.get(5)?,
            key: r.get(6)?,
            payload: r.get(7)?,
        })
    })?;
    let mut out = Vec::new();
    for row in rows {
        let row = row?;
        if filter.matches(&row) {
            out.push(row);
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(out)
}

/// Buffer figures.
pub fn stats(conn: &Connection) -> Result<Stats> {
    let (events, bytes) = totals(conn)?;
    let oldest = oldest_captured_at(conn)?;
    let dead: i64 = conn.query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0))?;
    let (quarantined_files, salvaged_events, unreadable_events) = conn
        .path()
        .and_then(|p| Path::new(p).parent())
        .map(salvage::figures)
        .unwrap_or_default();
    Ok(Stats {
        volume_id: meta(conn, "volume_id")?.unwrap_or_default(),
        events,
        bytes,
        oldest_event_age_seconds: oldest
            .map(|t| ((now_ms() - t).max(0) as f64) / 1000.0)
            .unwrap_or(0.0),
        dead_letters: dead as u64,
        last_seq: last_seq(conn)?,
        schema_version: meta(conn, "schema_version")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        clean: events == 0
            && quarantined_files == 0
            && dead == 0
            && meta(conn, "clean_at_ms")?.is_some(),
        quarantined_files,
        salvaged_events,
        unreadable_events,
    })
}
