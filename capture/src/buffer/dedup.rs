//! Idempotent ingestion: an event whose `uuid` is still in the buffer (queued
//! or kept as a dead letter), or was delivered within the deduplication
//! window, is acknowledged again without being stored twice.
//!
//! Only uuids the client sent take part: a uuid made here (the event had
//! none) is new by construction, so such events are not looked up, indexed
//! or remembered, and cost the append path nothing.
//!
//! The window lives in the buffer file, so it survives restarts:
//! ```sql
//! recent_uuids(id INTEGER PRIMARY KEY, uuid TEXT NOT NULL, delivered_at_ms INTEGER NOT NULL)
//! -- indexes: events(uuid) WHERE client_uuid = 1, dead_letters(uuid)
//! ```
//! `recent_uuids` has no index of its own: rows are only appended (in
//! delivery order) and pruned from the oldest end, and an index in memory
//! ([`recent`]) says which few rows may hold a uuid; it is rebuilt from the
//! table at start. The settlement that deletes delivered events records
//! their uuids in the same transaction, so a uuid is always either buffered
//! or remembered: a crash between the two cannot open a gap. Every
//! settlement (and at most once a second, an append round) prunes a bounded
//! chunk of expired rows from the oldest end. A remembered uuid counts
//! [`remembered_size`] bytes against the quota, like event data, but gives
//! way: when events (or a settlement's new uuids) need the room, the oldest
//! remembered uuids are forgotten early ([`Window::evict`]), so the window
//! never makes the buffer refuse an event; it only covers less time while
//! the buffer is nearly full. The same happens when the index in memory
//! would pass its bound ([`recent::MAX_SEGMENTS`]).
//!
//! Only this buffer is consulted: a retry that lands on another pod (another
//! volume) is not deduplicated there.

mod recent;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::NewEvent;
use recent::{Hash, RecentIndex};

/// Default deduplication window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(600);
/// Bytes a remembered uuid counts against the quota besides the uuid itself
/// (its delivery time and row id).
pub const ROW_OVERHEAD: u64 = 16;
/// Fewest expired rows a prune may delete in one go.
const PRUNE_CHUNK: usize = 1024;
/// Append rounds prune at most this often (settlements prune every time).
const APPEND_PRUNE_INTERVAL: Duration = Duration::from_secs(1);

// The inserts below say `OR IGNORE` though nothing can conflict (the
// columns they fill are `NOT NULL` in the tables they read from too): a
// plain `INSERT ... SELECT` may abort half-way on a constraint, so SQLite
// keeps a statement journal for it, a copy of every page it changes written
// to a temporary file first (13 % of the writer's time with random client
// uuids, `perf record` on `window_cost`). One that cannot abort needs none.

/// Bytes one remembered uuid counts against the quota.
pub fn remembered_size(uuid: &str) -> u64 {
    uuid.len() as u64 + ROW_OVERHEAD
}

/// The deduplication window as the writer applies it. Clones share the
/// index in memory.
#[derive(Debug, Clone)]
pub(super) struct Window {
    ms: i64,
    last_append_prune: Option<Instant>,
    recent: Arc<Mutex<Recent>>,
    /// Most segments the index in memory keeps ([`recent::MAX_SEGMENTS`]).
    max_segments: usize,
}

/// The index in memory and the changes of the transaction in progress,
/// applied only once it commits: the index never holds a row that is not
/// in the table, nor misses one that is.
#[derive(Debug, Default)]
struct Recent {
    /// The index reflects the table (it is built on first use).
    loaded: bool,
    index: RecentIndex,
    inserted: Vec<(i64, Hash)>,
    removed: Vec<i64>,
}

impl Window {
    /// A window of `length` (zero: deduplication off) over an empty table.
    #[cfg(test)]
    pub fn new(length: Duration) -> Self {
        let window = Self::over_table(length);
        window.recent().loaded = true;
        window
    }

    /// A window of `length` (zero: deduplication off) over the uuids the
    /// table remembers. Its index is built on the first append
    /// ([`ensure_loaded`](Self::ensure_loaded)), so a drain that never
    /// appends (`flush`) spends neither the pass nor the memory.
    pub fn over_table(length: Duration) -> Self {
        Self {
            ms: i64::try_from(length.as_millis()).unwrap_or(i64::MAX),
            last_append_prune: None,
            recent: Arc::default(),
            max_segments: recent::MAX_SEGMENTS,
        }
    }

    /// A window of `length` with its index built from `conn`'s table.
    #[cfg(test)]
    pub fn load(conn: &Connection, length: Duration) -> rusqlite::Result<Self> {
        let window = Self::over_table(length);
        window.ensure_loaded(conn)?;
        Ok(window)
    }

    /// Builds the index from the table (a pass over it) unless it was.
    /// Called outside any transaction, so it reads only what committed.
    pub fn ensure_loaded(&self, conn: &Connection) -> rusqlite::Result<()> {
        let mut recent = self.recent();
        if recent.loaded || !self.is_on() {
            return Ok(());
        }
        let started = Instant::now();
        let mut index = RecentIndex::default();
        let mut rows = conn.prepare("SELECT id, uuid FROM recent_uuids")?;
        let mut rows = rows.query([])?;
        let mut n = 0u64;
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            let hash = index.hash(r.get_ref(1)?.as_str()?);
            index.insert(id, hash);
            n += 1;
        }
        recent.index = index;
        recent.loaded = true;
        recent.inserted.clear();
        recent.removed.clear();
        tracing::info!(
            remembered = n,
            ms = started.elapsed().as_millis() as u64,
            "deduplication window indexed"
        );
        Ok(())
    }

    fn recent(&self) -> MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The transaction that remembered and forgot uuids since the last call
    /// committed: the index takes its changes.
    pub fn committed(&self) {
        let mut recent = self.recent();
        let Recent {
            loaded,
            index,
            inserted,
            removed,
        } = &mut *recent;
        if !*loaded {
            // The table holds them; the index is built from it when needed.
            inserted.clear();
            removed.clear();
            return;
        }
        for (id, hash) in inserted.drain(..) {
            index.insert(id, hash);
        }
        for id in removed.drain(..) {
            index.remove(id);
        }
    }

    /// The transaction failed: its changes never happened.
    pub fn rolled_back(&self) {
        let mut recent = self.recent();
        recent.inserted.clear();
        recent.removed.clear();
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
    /// uuid seen earlier in the request, buffered (queued, or a dead letter:
    /// `dead_letters` says whether the buffer holds any), or delivered
    /// within the window. All false when the window is off.
    pub fn duplicates(
        &self,
        conn: &Connection,
        events: &[NewEvent],
        now_ms: i64,
        dead_letters: bool,
    ) -> rusqlite::Result<Vec<bool>> {
        if !self.is_on() {
            return Ok(vec![false; events.len()]);
        }
        // Dead letters are rare: their index is looked at only when the
        // buffer holds some.
        let mut buffered = conn.prepare_cached(if dead_letters {
            "SELECT EXISTS(SELECT 1 FROM events WHERE uuid = ?1 AND client_uuid = 1)
                 OR EXISTS(SELECT 1 FROM dead_letters WHERE uuid = ?1)"
        } else {
            "SELECT EXISTS(SELECT 1 FROM events WHERE uuid = ?1 AND client_uuid = 1)"
        })?;
        let mut remembered = conn.prepare_cached(
            "SELECT EXISTS(SELECT 1 FROM recent_uuids
                 WHERE id BETWEEN ?1 AND ?2 AND uuid = ?3 AND delivered_at_ms > ?4)",
        )?;
        let recent = self.recent();
        debug_assert!(recent.loaded, "appends ensure the index is loaded first");
        let cutoff = self.cutoff(now_ms);
        let mut seen = HashSet::with_capacity(if events.len() > 1 { events.len() } else { 0 });
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            if !e.client_uuid {
                out.push(false);
                continue;
            }
            let repeated = events.len() > 1 && !seen.insert(e.uuid.as_str());
            let mut dup = repeated || buffered.query_row([&e.uuid], |r| r.get::<_, bool>(0))?;
            if !dup {
                for (lo, hi) in recent.index.candidates(recent.index.hash(&e.uuid)) {
                    if remembered.query_row((lo, hi, &e.uuid, cutoff), |r| r.get::<_, bool>(0))? {
                        dup = true;
                        break;
                    }
                }
            }
            out.push(dup);
        }
        Ok(out)
    }

    /// Remembers the client uuids of the events whose sequence numbers
    /// `listed` holds as a JSON array (about to be deleted as delivered);
    /// returns the bytes they now count against the quota (0 when off).
    pub fn remember_listed(
        &self,
        conn: &Connection,
        listed: &str,
        now_ms: i64,
    ) -> rusqlite::Result<u64> {
        if !self.is_on() {
            return Ok(0);
        }
        let mut insert = conn.prepare_cached(
            "INSERT OR IGNORE INTO recent_uuids(uuid, delivered_at_ms)
             SELECT uuid, ?2 FROM events
             WHERE seq IN (SELECT value FROM json_each(?1)) AND client_uuid = 1
             RETURNING id, uuid",
        )?;
        self.inserted(insert.query((listed, now_ms))?)
    }

    /// Remembers the uuid of dead letter `seq` (about to be forgotten: copied
    /// to the dead-letter topic, or exported), so a retry of it is not
    /// stored and dead-lettered again.
    pub fn remember_dead_letter(
        &self,
        conn: &Connection,
        seq: i64,
        now_ms: i64,
    ) -> rusqlite::Result<u64> {
        if !self.is_on() {
            return Ok(0);
        }
        let mut insert = conn.prepare_cached(
            "INSERT OR IGNORE INTO recent_uuids(uuid, delivered_at_ms)
             SELECT uuid, ?2 FROM dead_letters WHERE seq = ?1 RETURNING id, uuid",
        )?;
        self.inserted(insert.query((seq, now_ms))?)
    }

    /// Remembers the client uuids of every event with `seq <= through` (about
    /// to be deleted by one range delete). `rows` and `uuid_bytes` are what
    /// the caller counted of client uuids in that range; returns the bytes
    /// they count against the quota (0 when off).
    pub fn remember_through(
        &self,
        conn: &Connection,
        through: i64,
        rows: i64,
        uuid_bytes: i64,
        now_ms: i64,
    ) -> rusqlite::Result<u64> {
        // No client uuid in the range (the caller counted in this
        // transaction): spare the scan.
        if !self.is_on() || rows <= 0 {
            return Ok(0);
        }
        let mut insert = conn.prepare_cached(
            "INSERT OR IGNORE INTO recent_uuids(uuid, delivered_at_ms)
             SELECT uuid, ?2 FROM events WHERE seq <= ?1 AND client_uuid = 1
             RETURNING id, uuid",
        )?;
        self.inserted(insert.query((through, now_ms))?)?;
        Ok(uuid_bytes.max(0) as u64 + rows.max(0) as u64 * ROW_OVERHEAD)
    }

    /// Notes rows `(id, uuid)` just inserted; returns the bytes they count.
    fn inserted(&self, mut rows: rusqlite::Rows<'_>) -> rusqlite::Result<u64> {
        let mut recent = self.recent();
        let mut bytes = 0;
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            let uuid = r.get_ref(1)?.as_str()?;
            bytes += uuid.len() as u64 + ROW_OVERHEAD;
            let hash = recent.index.hash(uuid);
            recent.inserted.push((id, hash));
        }
        Ok(bytes)
    }

    /// Notes rows `(id, length(uuid))` just deleted; returns the bytes freed
    /// and how many.
    fn removed(&self, mut rows: rusqlite::Rows<'_>) -> rusqlite::Result<(u64, usize)> {
        let mut recent = self.recent();
        let (mut bytes, mut n) = (0, 0);
        while let Some(r) = rows.next()? {
            recent.removed.push(r.get(0)?);
            bytes += r.get::<_, i64>(1)? as u64 + ROW_OVERHEAD;
            n += 1;
        }
        Ok((bytes, n))
    }

    /// Forgets the oldest remembered uuids, expired or not, if the index in
    /// memory holds as many segments as it may; returns the bytes freed.
    /// Called before remembering more.
    pub fn bound_index(&self, conn: &Connection) -> rusqlite::Result<u64> {
        let Some(below) = self.recent().index.overflow_below(self.max_segments - 1) else {
            return Ok(0);
        };
        let mut forget = conn
            .prepare_cached("DELETE FROM recent_uuids WHERE id < ?1 RETURNING id, length(uuid)")?;
        let (bytes, n) = self.removed(forget.query([below])?)?;
        tracing::warn!(
            forgotten = n,
            "the deduplication window's index reached its memory bound; the oldest remembered uuids were forgotten early"
        );
        Ok(bytes)
    }

    /// Forgets the oldest remembered uuids, expired or not, until `bytes`
    /// are freed or none is left; returns the bytes freed.
    pub fn evict(&self, conn: &Connection, bytes: u64) -> rusqlite::Result<u64> {
        let mut evict = conn.prepare_cached(
            "DELETE FROM recent_uuids
             WHERE id IN (SELECT id FROM recent_uuids ORDER BY id LIMIT ?1)
             RETURNING id, length(uuid)",
        )?;
        let mut freed = 0;
        while freed < bytes {
            // Rows of a hyphenated uuid; a shorter one only takes another pass.
            let n = ((bytes - freed) / (36 + ROW_OVERHEAD)).max(1);
            let (got_bytes, got) = self.removed(evict.query([n as i64])?)?;
            freed += got_bytes;
            if got == 0 {
                break;
            }
        }
        Ok(freed)
    }

    /// Forgets expired uuids: only among the oldest `max(at_least, 1024)`
    /// rows, so one prune's work is bounded however large the window is, and
    /// only once the oldest has expired.
    /// Returns the bytes freed from the quota.
    pub fn prune(&self, conn: &Connection, at_least: usize, now_ms: i64) -> rusqlite::Result<u64> {
        // Rows are in delivery order: while the oldest is unexpired, so is
        // every other (one probe instead of reading a chunk).
        let mut oldest =
            conn.prepare_cached("SELECT delivered_at_ms FROM recent_uuids ORDER BY id LIMIT 1")?;
        let cutoff = self.cutoff(now_ms);
        let expired = match oldest.query_row([], |r| r.get::<_, i64>(0)) {
            Ok(at) => at <= cutoff,
            Err(rusqlite::Error::QueryReturnedNoRows) => false,
            Err(e) => return Err(e),
        };
        if !expired {
            return Ok(0);
        }
        let mut prune = conn.prepare_cached(
            "DELETE FROM recent_uuids
             WHERE id IN (SELECT id FROM recent_uuids ORDER BY id LIMIT ?2)
               AND delivered_at_ms <= ?1
             RETURNING id, length(uuid)",
        )?;
        let chunk = at_least.max(PRUNE_CHUNK) as i64;
        Ok(self.removed(prune.query((cutoff, chunk))?)?.0)
    }
}

/// Bytes the remembered uuids count against the quota (a scan; at start-up).
pub fn window_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT coalesce(sum(length(uuid)), 0) + ?1 * count(*) FROM recent_uuids",
        [ROW_OVERHEAD as i64],
        |r| r.get::<_, i64>(0).map(|n| n.max(0) as u64),
    )
}

/// Uuids remembered as delivered within the last `window` (for `inspect` and tests).
pub fn remembered(conn: &Connection, window: Duration, now_ms: i64) -> rusqlite::Result<u64> {
    let cutoff = Window::over_table(window).cutoff(now_ms);
    conn.query_row(
        "SELECT count(*) FROM recent_uuids WHERE delivered_at_ms > ?1",
        [cutoff],
        |r| r.get::<_, i64>(0).map(|n| n.max(0) as u64),
    )
}
