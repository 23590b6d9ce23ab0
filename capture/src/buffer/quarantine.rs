//! Damaged buffer files are moved aside, never opened for writing.
//!
//! At start (before the writer opens the file) [`quarantine_if_damaged`]
//! checks `buffer.db`: its header, its size, and SQLite's `PRAGMA
//! quick_check` on a read-only connection (which never writes to the file or
//! replays its WAL into it). A damaged file is renamed, with its WAL, into
//! `<data-dir>/quarantine/buffer-<ms>.db` on the same volume (a rename: no
//! copy, no extra space, atomic), and the pod starts a fresh buffer, so a
//! damaged file never wedges a pod. [`super::salvage`] then reads every
//! readable row out of the quarantined file into the live buffer.
//!
//! Invariant: a volume holding a quarantined file that was not salvaged is
//! not clean ([`unsalvaged_quarantine`] > 0). A salvaged file is deleted and
//! leaves a report (`buffer-<ms>.salvaged.json`) behind.

use std::io;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, ErrorCode, OpenFlags};

use super::salvage::pages::MAGIC;
use super::{DB_FILE, Error, Result, now_ms};

/// Folder inside the data directory that holds damaged files.
pub const QUARANTINE_DIR: &str = "quarantine";
/// Suffix of a salvage report next to where its file was.
pub const REPORT_SUFFIX: &str = ".salvaged.json";

/// What the start-up check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No buffer file yet.
    Missing,
    /// The file passed the check.
    Sound,
    /// The file is damaged; why, in words.
    Damaged(String),
}

fn wal_of(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

fn shm_of(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-shm");
    PathBuf::from(p)
}

fn len_of(path: &Path) -> io::Result<Option<u64>> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn data_dir_error(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::DataDir {
        path: path.to_owned(),
        source,
    }
}

/// Checks the buffer file of `dir` without changing it. I/O errors (as
/// opposed to damage) are errors: a disk that cannot be read is not a reason
/// to move a file aside.
pub fn check(dir: &Path) -> Result<Verdict> {
    Ok(check_beside(dir, || ())?.0)
}

/// [`check`], running `beside` on a thread of its own while the integrity
/// check (a pass over every page) runs, once the file passed the checks
/// before it. `beside`'s answer comes back only when the file proved sound.
pub fn check_beside<T: Send>(
    dir: &Path,
    beside: impl FnOnce() -> T + Send,
) -> Result<(Verdict, Option<T>)> {
    let db = match screen(dir)? {
        Screened::Judged(verdict) => return Ok((verdict, None)),
        Screened::Checkable(db) => db,
    };
    let (checked, side) = std::thread::scope(|s| {
        let side = s.spawn(beside);
        let checked = quick_check(&db);
        (checked, side.join().ok())
    });
    let verdict = match checked {
        Ok(problems) if problems.is_empty() => Verdict::Sound,
        Ok(problems) => Verdict::Damaged(format!("quick_check: {}", problems.join("; "))),
        Err(rusqlite::Error::SqliteFailure(e, msg))
            if matches!(e.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) =>
        {
            Verdict::Damaged(msg.unwrap_or_else(|| e.to_string()))
        }
        Err(e) => return Err(e.into()),
    };
    let side = side.filter(|_| verdict == Verdict::Sound);
    Ok((verdict, side))
}

/// What the checks before the integrity check found.
enum Screened {
    /// A verdict already (missing, or damaged in a way SQLite would not notice).
    Judged(Verdict),
    /// The file, ready for the integrity check.
    Checkable(PathBuf),
}

/// The cheap checks, before the integrity check.
fn screen(dir: &Path) -> Result<Screened> {
    use Screened::Judged;
    let db = dir.join(DB_FILE);
    let wal = wal_of(&db);
    let wal_len = len_of(&wal).map_err(data_dir_error(&wal))?.unwrap_or(0);
    let Some(len) = len_of(&db).map_err(data_dir_error(&db))? else {
        // SQLite would start a new file and delete this log.
        return Ok(Judged(if wal_len > 32 {
            Verdict::Damaged("write-ahead log without its database file".into())
        } else {
            Verdict::Missing
        }));
    };
    // A file SQLite opened once is never empty again: the switch to WAL mode
    // writes page 1 straight into it. An empty file was truncated (and
    // SQLite would delete a WAL next to it without reading it).
    if len == 0 {
        return Ok(Judged(Verdict::Damaged(
            "database file is empty (truncated)".into(),
        )));
    }
    let mut head = [0u8; 100];
    let read = std::fs::File::open(&db)
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0));
    if read.is_err() || &head[..16] != MAGIC {
        return Ok(Judged(Verdict::Damaged(
            "not a database: the file header is overwritten or truncated".into(),
        )));
    }
    let page = match u16::from_be_bytes([head[16], head[17]]) {
        1 => 65536,
        n => n as u64,
    };
    if !page.is_power_of_two() || !(512..=65536).contains(&page) {
        return Ok(Judged(Verdict::Damaged(format!(
            "invalid page size {page}"
        ))));
    }
    if !len.is_multiple_of(page) {
        return Ok(Judged(Verdict::Damaged(format!(
            "file size {len} is not a multiple of the page size {page} (truncated)"
        ))));
    }
    // SQLite stops reading a WAL at the first bad frame and drops every
    // commit after it without a word; quick_check would pass.
    if let Some(why) = super::salvage::pages::wal_damage(&wal).map_err(data_dir_error(&wal))? {
        return Ok(Judged(Verdict::Damaged(why)));
    }
    roll_back_hot_journal(&db)?;
    Ok(Screened::Checkable(db))
}

/// A power cut right after a volume's first start can leave the rollback
/// journal of the switch to WAL mode behind. A read-only connection cannot
/// roll it back (`SQLITE_READONLY_ROLLBACK`), so open the file for writing
/// once and let SQLite do it, exactly as the writer's open would.
fn roll_back_hot_journal(db: &Path) -> Result<()> {
    let mut journal = db.as_os_str().to_owned();
    journal.push("-journal");
    let journal = PathBuf::from(journal);
    if len_of(&journal)
        .map_err(data_dir_error(&journal))?
        .unwrap_or(0)
        == 0
    {
        return Ok(());
    }
    let conn = Connection::open(db)?;
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))?;
    Ok(())
}

/// `PRAGMA quick_check` on a read-only connection: the problems it lists
/// (at most 5), empty when the file is sound.
fn quick_check(db: &Path) -> rusqlite::Result<Vec<String>> {
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let mut stmt = conn.prepare("PRAGMA quick_check(5)")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut problems = Vec::new();
    for row in rows {
        let row = row?;
        if row != "ok" {
            problems.push(row);
        }
    }
    Ok(problems)
}

/// Checks `dir`'s buffer and, when it is damaged, moves it (with its WAL)
/// into the quarantine folder. Returns the quarantined path.
pub fn quarantine_if_damaged(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(quarantine_if_damaged_beside(dir, || ())?.0)
}

/// [`quarantine_if_damaged`], running `beside` while the integrity check
/// runs (see [`check_beside`]); its answer comes back only if the file
/// proved sound and stays where it is.
pub fn quarantine_if_damaged_beside<T: Send>(
    dir: &Path,
    beside: impl FnOnce() -> T + Send,
) -> Result<(Option<PathBuf>, Option<T>)> {
    finish_pending(dir).map_err(data_dir_error(dir))?;
    let reason = match check_beside(dir, beside)? {
        (Verdict::Missing | Verdict::Sound, side) => return Ok((None, side)),
        (Verdict::Damaged(reason), _) => reason,
    };
    let to = move_aside(dir).map_err(data_dir_error(dir))?;
    tracing::error!(
        data_dir = %dir.display(),
        quarantined = %to.display(),
        reason,
        "buffer file is damaged: moved into quarantine, starting a fresh buffer; \
         its readable events are salvaged into the new one (serve does it in the \
         background, flush before draining)"
    );
    Ok((Some(to), None))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Moves `buffer.db` and `buffer.db-wal` into the quarantine folder under
/// one fresh name and drops the shared-memory index. The two renames go
/// through a `pending-<ms>` folder so that a crash between them is finished
/// at the next start ([`finish_pending`]) rather than splitting the pair.
fn move_aside(dir: &Path) -> io::Result<PathBuf> {
    let qdir = dir.join(QUARANTINE_DIR);
    std::fs::create_dir_all(&qdir)?;
    let pending = qdir.join(format!("{PENDING_PREFIX}{}", now_ms()));
    std::fs::create_dir_all(&pending)?;
    sync_dir(&qdir)?;
    let db = dir.join(DB_FILE);
    for (from, to) in [
        (db.clone(), pending.join(DB_FILE)),
        (wal_of(&db), wal_of(&pending.join(DB_FILE))),
    ] {
        if from.exists() {
            std::fs::rename(from, to)?;
        }
    }
    match std::fs::remove_file(shm_of(&db)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    sync_dir(&pending)?;
    sync_dir(dir)?;
    finish(&qdir, &pending)
}

const PENDING_PREFIX: &str = "pending-";

/// Gives the pair in `pending` its final name and removes the folder.
fn finish(qdir: &Path, pending: &Path) -> io::Result<PathBuf> {
    let mut ms = now_ms();
    let mut to = qdir.join(format!("buffer-{ms}.db"));
    while to.exists() || wal_of(&to).exists() {
        ms += 1;
        to = qdir.join(format!("buffer-{ms}.db"));
    }
    let from = pending.join(DB_FILE);
    for (from, to) in [(wal_of(&from), wal_of(&to)), (from, to.clone())] {
        if from.exists() {
            std::fs::rename(from, to)?;
        }
    }
    sync_dir(qdir)?;
    std::fs::remove_dir_all(pending)?;
    sync_dir(qdir)?;
    Ok(to)
}

/// Completes a quarantine a crash interrupted: the half of the pair still
/// in the data directory joins the half already moved. Runs before the check,
/// while nothing else has the data directory open.
fn finish_pending(dir: &Path) -> io::Result<()> {
    let qdir = dir.join(QUARANTINE_DIR);
    let Ok(entries) = std::fs::read_dir(&qdir) else {
        return Ok(());
    };
    for entry in entries {
        let pending = entry?.path();
        let is_pending = pending
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(PENDING_PREFIX));
        if !is_pending {
            continue;
        }
        let (db, moved) = (dir.join(DB_FILE), pending.join(DB_FILE));
        if moved.exists() && !wal_of(&moved).exists() && wal_of(&db).exists() {
            std::fs::rename(wal_of(&db), wal_of(&moved))?;
        }
        let _ = std::fs::remove_file(shm_of(&db));
        sync_dir(dir)?;
        let to = finish(&qdir, &pending)?;
        tracing::warn!(quarantined = %to.display(), "finished a quarantine interrupted by a crash");
    }
    Ok(())
}

/// Quarantined files of `dir` not yet salvaged, oldest first (the database
/// path, which may exist only as its `-wal`).
pub fn unsalvaged(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let qdir = dir.join(QUARANTINE_DIR);
    let entries = match std::fs::read_dir(&qdir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(PENDING_PREFIX) {
            // A quarantine a crash interrupted: finished at the next start.
            out.push(entry.path().join(DB_FILE));
            continue;
        }
        let db = name.strip_suffix("-wal").unwrap_or(&name);
        if db.ends_with(".db") {
            out.push(qdir.join(db));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// How many quarantined files of `dir` still wait for salvage. A volume with
/// any is not clean: it must not be flipped to `Delete`.
pub fn unsalvaged_quarantine(dir: &Path) -> io::Result<usize> {
    Ok(unsalvaged(dir)?.len())
}

/// Removes a salvaged file (its WAL and shared-memory index too) and syncs
/// the folder. Called only after its rows are committed in the live buffer.
pub(super) fn remove_salvaged(db: &Path) -> io::Result<()> {
    for p in [wal_of(db), shm_of(db), db.to_owned()] {
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    match db.parent() {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// Path of the WAL that belongs to `db`.
pub(super) fn wal_path(db: &Path) -> PathBuf {
    wal_of(db)
}
