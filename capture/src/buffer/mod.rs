//! The disk buffer: one SQLite file per volume (`<data-dir>/buffer.db`, WAL).
//!
//! Design constraints, in the order they win:
//! 1. **200 means durable.** A request is answered only after the transaction
//!    holding its events committed; in `fsync` mode (`synchronous=FULL`) the WAL
//!    is fsynced before that. A request's events go in together or not at all.
//! 2. **One writer.** [`writer::GroupCommitWriter`] owns the only write
//!    connection on a dedicated thread and commits every command waiting when
//!    it is free in one transaction (group commit): one fsync serves many
//!    requests. Forwarder settlements (delete delivered, move poison to dead
//!    letters) go through the same writer, so nothing ever waits on SQLite's
//!    write lock.
//! 3. **Sequence numbers only grow** for the life of the file:
//!    `seq INTEGER PRIMARY KEY AUTOINCREMENT` never reuses a value, even after
//!    the table empties (SQLite keeps the high-water mark in `sqlite_sequence`).
//! 4. **Bounded memory.** Nothing is queued in memory beyond the writer's
//!    bounded command channel; readers page through the file in batches.
//! 5. **One drainer per volume.** `serve` and `flush` hold an exclusive
//!    `flock` on `<data-dir>/holdfast.lock` for their whole life.
//! 6. **A retried event is stored once** ([`dedup`]): a uuid still buffered
//!    or delivered within the deduplication window is acknowledged again
//!    and not stored.
//!
//! On-disk format (schema version 2):
//! ```sql
//! meta(key TEXT PRIMARY KEY, value TEXT)      -- volume_id, schema_version, created_at_ms, ...
//! events(seq INTEGER PRIMARY KEY AUTOINCREMENT, uuid TEXT, topic TEXT,
//!        key BLOB, payload BLOB, captured_at_ms INTEGER)
//! dead_letters(seq INTEGER PRIMARY KEY, uuid, topic, key, payload,
//!        captured_at_ms, reason TEXT, failed_at_ms INTEGER, dlq_delivered INTEGER)
//! recent_uuids(id INTEGER PRIMARY KEY, uuid TEXT, delivered_at_ms INTEGER)
//! -- indexes on events(uuid), dead_letters(uuid); recent_uuids is indexed in memory
//! ```
//! Version 1 files (no `recent_uuids`, no uuid indexes) are migrated
//! forward when opened for writing; a version 2 file is refused by older
//! binaries.

mod census;
mod commit;
pub mod dedup;
pub mod quarantine;
mod read;
mod room;
pub mod salvage;
mod wal;
pub mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

use crate::config::Durability;

pub use commit::DeadLetter;
pub use read::{
    DeadLetterFilter, DeadLetterRow, dead_letter_totals, dead_letters, last_seq, meta,
    oldest_captured_at, read_batch, read_batch_bounded, stats, totals,
};
pub use writer::{AppendError, GroupCommitWriter, SealReport, WriterHandle, WriterOptions};

/// Schema version written in `meta`.
pub const SCHEMA_VERSION: i64 = 2;
/// File name of the buffer inside the data directory.
pub const DB_FILE: &str = "buffer.db";
/// File name of the drainer lock inside the data directory.
pub const LOCK_FILE: &str = "holdfast.lock";
/// File name of the disk reserve inside the data directory.
pub const RESERVE_FILE: &str = "reserve.bin";

/// Makes sure `bytes` of disk are set aside in `dir` (written, not sparse).
/// When the disk fills up, [`release_reserve`] gives them back so the
/// forwarder can still delete what Kafka acknowledged: deleting needs a
/// little space for the WAL, and draining is the only way out of a full disk.
pub fn ensure_reserve(dir: &Path, bytes: u64) -> Result<()> {
    let path = dir.join(RESERVE_FILE);
    if bytes == 0 || path.metadata().map(|m| m.len() >= bytes).unwrap_or(false) {
        return Ok(());
    }
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = File::create(&path)?;
        let chunk = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()
    };
    write().map_err(|source| {
        let _ = std::fs::remove_file(&path);
        Error::DataDir { path, source }
    })
}

/// Deletes the disk reserve; returns its size if there was one.
pub fn release_reserve(dir: &Path) -> Option<u64> {
    let path = dir.join(RESERVE_FILE);
    let len = path.metadata().ok()?.len();
    std::fs::remove_file(&path).ok()?;
    Some(len)
}

/// Result of buffer operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong with the buffer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SQLite failed (I/O error, disk full, corruption).
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The data directory could not be prepared.
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another process (a capture pod or a flush Job) holds this buffer.
    #[error("buffer {path} is held by another process (lock {lock})")]
    Locked { path: PathBuf, lock: PathBuf },
    /// The file was written by a newer Holdfast.
    #[error("buffer schema version {found} is newer than this binary's {SCHEMA_VERSION}")]
    SchemaVersion { found: i64 },
    /// No buffer file exists where one was expected.
    #[error("no buffer at {0}")]
    Missing(PathBuf),
    /// The writer thread is gone (it failed or the process is stopping).
    #[error("buffer writer stopped")]
    WriterStopped,
}

/// An event ready to be appended: routing resolved, payload as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Stable id (client `uuid` or generated UUIDv7).
    pub uuid: String,
    /// Kafka topic, shared by the events of a request (and of a read).
    pub topic: Arc<str>,
    /// Partition key.
    pub key: Vec<u8>,
    /// The event's JSON, byte for byte as the client sent it.
    pub payload: Vec<u8>,
    /// Capture time, ms since the Unix epoch.
    pub captured_at_ms: i64,
    /// The client sent the `uuid`. Only such events are deduplicated: a uuid
    /// made here is new by construction, so it is never looked up, indexed
    /// or remembered (see [`dedup`]).
    pub client_uuid: bool,
}

impl NewEvent {
    /// Bytes this event counts against the quota.
    pub fn size(&self) -> u64 {
        (self.payload.len() + self.key.len() + self.uuid.len() + self.topic.len()) as u64
    }
}

/// An event read back from the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Buffer sequence number.
    pub seq: i64,
    /// The event.
    pub event: NewEvent,
}

/// Buffer figures, as `inspect` prints them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    /// Volume id (UUID made with the file).
    pub volume_id: String,
    /// Events waiting for Kafka.
    pub events: u64,
    /// Bytes of those events.
    pub bytes: u64,
    /// Age of the oldest waiting event, seconds (0 when empty).
    pub oldest_event_age_seconds: f64,
    /// Events moved to dead letters.
    pub dead_letters: u64,
    /// Highest sequence number ever assigned.
    pub last_seq: i64,
    /// Schema version.
    pub schema_version: i64,
    /// Last clean shutdown recorded (`clean_at_ms`), if the buffer was left empty.
    pub clean: bool,
    /// Quarantined (damaged) buffer files not salvaged yet: not clean while any.
    pub quarantined_files: u64,
    /// Events salvaged from quarantined files (over the volume's salvage reports).
    pub salvaged_events: u64,
    /// Rows of quarantined files that could not be read (same reports).
    pub unreadable_events: u64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Exclusive hold on a data directory: one drainer per volume.
#[derive(Debug)]
pub struct DirLock {
    _lock: Flock<File>,
}

impl DirLock {
    /// Takes the lock or fails at once with [`Error::Locked`].
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| Error::DataDir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(LOCK_FILE);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| Error::DataDir {
                path: path.clone(),
                source,
            })?;
        let lock =
            Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| Error::Locked {
                path: dir.to_owned(),
                lock: path,
            })?;
        Ok(Self { _lock: lock })
    }
}

/// Opens (creating if needed) the buffer's write connection and applies the schema.
pub fn open_writer(dir: &Path, durability: Durability) -> Result<Connection> {
    std::fs::create_dir_all(dir).map_err(|source| Error::DataDir {
        path: dir.to_owned(),
        source,
    })?;
    let conn = Connection::open(dir.join(DB_FILE))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let sync = synchronous_mode(durability);
    conn.pragma_update(None, "synchronous", sync)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // SQLite's automatic checkpoint, for connections that write without the
    // group-commit writer; the writer's connection replaces it with its WAL
    // hook and a checkpointer thread (see `wal`).
    conn.pragma_update(None, "wal_autocheckpoint", 2000)?;
    migrate(&conn)?;
    Ok(conn)
}

/// SQLite's `synchronous` setting for a durability mode.
///
/// - `fsync` → `FULL`: every commit fsyncs the WAL before it returns, so a
///   `200` survives a power cut.
/// - `os` → `NORMAL`: commits are written to the OS without fsync; the WAL is
///   synced at checkpoints, so a power cut loses the last commits but never
///   corrupts the file (`OFF` would skip those syncs too and can).
pub fn synchronous_mode(durability: Durability) -> &'static str {
    match durability {
        Durability::Fsync => "FULL",
        Durability::Os => "NORMAL",
    }
}

/// Opens a read-only connection for the forwarder or `inspect`.
pub fn open_reader(dir: &Path) -> Result<Connection> {
    let path = dir.join(DB_FILE);
    if !path.exists() {
        return Err(Error::Missing(path));
    }
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

fn migrate(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS events (
             seq INTEGER PRIMARY KEY AUTOINCREMENT,
             uuid TEXT NOT NULL,
             topic TEXT NOT NULL,
             key BLOB NOT NULL,
             payload BLOB NOT NULL,
             captured_at_ms INTEGER NOT NULL,
             client_uuid INTEGER NOT NULL DEFAULT 1);
         CREATE TABLE IF NOT EXISTS dead_letters (
             seq INTEGER PRIMARY KEY,
             uuid TEXT NOT NULL,
             topic TEXT NOT NULL,
             key BLOB NOT NULL,
             payload BLOB NOT NULL,
             captured_at_ms INTEGER NOT NULL,
             reason TEXT NOT NULL,
             failed_at_ms INTEGER NOT NULL,
             dlq_delivered INTEGER NOT NULL DEFAULT 0);
         -- Version 2: the deduplication window (see `dedup`).
         CREATE TABLE IF NOT EXISTS recent_uuids (
             id INTEGER PRIMARY KEY,
             uuid TEXT NOT NULL,
             delivered_at_ms INTEGER NOT NULL);
         -- Its uuids are indexed in memory (see `dedup`); an older binary
         -- (a rollback) recreates this index on its own.
         DROP INDEX IF EXISTS recent_uuids_uuid;
         CREATE INDEX IF NOT EXISTS dead_letters_uuid ON dead_letters(uuid);",
    )?;
    // Only client uuids are indexed. Rows of older files count as the
    // client's (the column's default), so they stay deduplicated. Not a new
    // version: an older binary (a rollback) still reads and writes this file
    // correctly (its inserts take the default; it recreates its own index).
    let has_flag: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM pragma_table_info('events') WHERE name = 'client_uuid')",
        [],
        |r| r.get(0),
    )?;
    if !has_flag {
        conn.execute_batch(
            "ALTER TABLE events ADD COLUMN client_uuid INTEGER NOT NULL DEFAULT 1;",
        )?;
    }
    conn.execute_batch(
        "DROP INDEX IF EXISTS events_uuid;
         CREATE INDEX IF NOT EXISTS events_client_uuid ON events(uuid) WHERE client_uuid = 1;",
    )?;
    let version: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match version.and_then(|v| v.parse::<i64>().ok()) {
        Some(found) if found > SCHEMA_VERSION => return Err(Error::SchemaVersion { found }),
        Some(found) if found < SCHEMA_VERSION => {
            // The tables and indexes above are the whole migration.
            conn.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
                [SCHEMA_VERSION.to_string()],
            )?;
        }
        Some(_) => {}
        None => {
            conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES
                 ('schema_version', ?1), ('volume_id', ?2), ('created_at_ms', ?3)",
                params![
                    SCHEMA_VERSION.to_string(),
                    uuid::Uuid::new_v4().to_string(),
                    now_ms().to_string()
                ],
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod chunk_tests;
#[cfg(test)]
mod dedup_bench;
#[cfg(test)]
mod dedup_tests;
#[cfg(test)]
mod tests;
