//! Appends events with one multi-row `INSERT` per chunk of [`ROWS`]: a
//! statement's fixed cost (its reset, the `AUTOINCREMENT` counter's lookup
//! and update) is paid once per chunk, not once per event. SQLite inserts a
//! statement's rows in order, so sequence numbers still follow the request.

use std::sync::LazyLock;

use rusqlite::types::ToSql;
use rusqlite::{Transaction, params_from_iter};

use crate::buffer::NewEvent;

/// Rows per statement. Binding 6 values per row, 16 rows stay far below
/// SQLite's limit on bound parameters (32,766) and keep the statement small.
pub(super) const ROWS: usize = 16;

static FULL: LazyLock<String> = LazyLock::new(|| statement(ROWS));
static ONE: LazyLock<String> = LazyLock::new(|| statement(1));

fn statement(rows: usize) -> String {
    let values: Vec<String> = (0..rows)
        .map(|r| {
            let b = r * 6;
            format!(
                "(?{},?{},?{},?{},?{},?{})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6
            )
        })
        .collect();
    format!(
        "INSERT INTO events(uuid, topic, key, payload, captured_at_ms, client_uuid) VALUES {}",
        values.join(",")
    )
}

fn columns(e: &NewEvent) -> [&dyn ToSql; 6] {
    [
        &e.uuid,
        &e.topic,
        &e.key,
        &e.payload,
        &e.captured_at_ms,
        &e.client_uuid,
    ]
}

/// Inserts `events` in order; returns how many and the last one's sequence
/// number (0 when there were none).
pub(super) fn insert(tx: &Transaction<'_>, events: &[&NewEvent]) -> rusqlite::Result<(usize, i64)> {
    if events.is_empty() {
        return Ok((0, 0));
    }
    let mut full = tx.prepare_cached(&FULL)?;
    let mut one = tx.prepare_cached(&ONE)?;
    let mut chunks = events.chunks_exact(ROWS);
    for chunk in chunks.by_ref() {
        full.execute(params_from_iter(chunk.iter().flat_map(|e| columns(e))))?;
    }
    for e in chunks.remainder() {
        one.execute(params_from_iter(columns(e)))?;
    }
    Ok((events.len(), tx.last_insert_rowid()))
}
