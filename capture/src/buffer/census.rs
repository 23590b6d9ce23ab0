//! What the writer counts at start: the figures its quota and gauges start
//! from, each a pass (or a probe) over the file.
//!
//! The passes are the slow part of a start on a large buffer, so the writer
//! takes the census on a read-only connection of its own while the file's
//! integrity check runs beside it (see [`super::quarantine`]), and uses it
//! only if the file proved sound; otherwise it counts again on the file it
//! starts with.

use std::path::Path;

use rusqlite::Connection;

use super::Result;

/// The buffer's figures at start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Census {
    pub events: u64,
    pub bytes: u64,
    pub dead_letters: u64,
    pub dead_bytes: u64,
    /// Bytes the remembered uuids count against the quota.
    pub window_bytes: u64,
    /// Capture time of the oldest queued event (0 when none).
    pub oldest_ms: i64,
    pub last_seq: i64,
}

/// Takes the census on `conn`.
pub(super) fn take(conn: &Connection) -> Result<Census> {
    let (events, bytes) = super::totals(conn)?;
    let (dead_letters, dead_bytes) = super::dead_letter_totals(conn)?;
    Ok(Census {
        events,
        bytes,
        dead_letters,
        dead_bytes,
        window_bytes: super::dedup::window_bytes(conn)?,
        oldest_ms: super::oldest_captured_at(conn)?.unwrap_or(0),
        last_seq: super::last_seq(conn)?,
    })
}

/// Takes the census of `dir`'s buffer on a read-only connection of its own.
pub(super) fn take_read_only(dir: &Path) -> Result<Census> {
    take(&super::open_reader(dir)?)
}
