//! Salvage: every readable row of a quarantined (damaged) buffer file goes
//! back into the live buffer, and the file is deleted only after that commit.
//!
//! Reading does not go through SQLite, which refuses a damaged file or stops
//! at the first bad page: [`pages`] overlays the file with its WAL's committed
//! frames and [`btree`] walks the `events` and `dead_letters` b-trees,
//! recovering pages whose parent was lost by scanning for orphan leaves, as
//! SQLite's `.recover` does (not in the bundled SQLite). Pages are read on
//! demand and rows are handed over in bounded batches, so a file larger than
//! memory is salvaged in bounded memory.
//!
//! Rows are appended through the normal [`WriterHandle`]: the same uuid,
//! topic, key, payload and capture time, a new sequence number. The normal
//! forwarder then delivers them, with no second delivery path to keep
//! correct; the quota applies (salvage waits while the buffer is full).
//! Dead letters not yet copied to the dead-letter topic are appended as
//! events too (a replay): still poison, they are dead-lettered again.
//!
//! A crash during salvage leaves the file in quarantine; the next salvage
//! appends its rows again, so a crash can duplicate (same uuid), never lose.
//! When page 1 itself is lost, the freelist is unknown too, and rows already
//! delivered may come back from freed pages: duplicates again, never a loss.
//!
//! Unreadable rows are counted from the b-tree: a lost page's key range is
//! bounded by its parent's keys (and the top by `sqlite_sequence`), and the
//! buffer's sequence numbers are dense (the forwarder deletes oldest first),
//! so the rows missing from that range are the rows lost. Where a range has
//! no bound, the average rows per leaf page stands in: an estimate.

pub(super) mod btree;
pub(crate) mod pages;

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use self::btree::{Damage, Table, Value, Walk};
use self::pages::Pages;
use super::quarantine::{self, REPORT_SUFFIX};
use super::writer::{AppendError, WriterHandle};
use super::{Error, NewEvent, Result, now_ms};

/// Rows per batch handed from the reader to the writer.
const BATCH_ROWS: usize = 1000;
/// Event bytes per batch.
const BATCH_BYTES: u64 = 4 << 20;

/// What the salvage of one quarantined file found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SalvageReport {
    /// The quarantined file.
    pub file: String,
    /// Events read and appended to the live buffer.
    pub events: u64,
    /// Dead letters read and appended to the live buffer as events (replayed).
    pub dead_letters: u64,
    /// Dead letters already copied to the dead-letter topic (not kept).
    pub dead_letters_copied: u64,
    /// Rows that could not be read (see the module docs for how they are counted).
    pub unreadable: u64,
    /// Table pages that could not be read.
    pub damaged_pages: u64,
    /// When the salvage finished (ms since the Unix epoch).
    pub salvaged_at_ms: i64,
}

/// Reads every readable row of the damaged file `db` (and `db-wal`), handing
/// the rows to `sink` in batches; returns the counts (file and time unset).
pub fn read_damaged(
    db: &Path,
    sink: &mut dyn FnMut(Vec<NewEvent>) -> io::Result<()>,
) -> io::Result<SalvageReport> {
    let pages = Pages::open(db, &quarantine::wal_path(db))?;
    let mut seen = vec![false; pages.count() as usize + 1];
    let mut damage: Vec<Damage> = Vec::new();
    let mut walk = Walk {
        pages: &pages,
        seen: &mut seen,
        damage: &mut damage,
        bad_cells: 0,
        leaves: 0,
        rows: 0,
    };
    let mut roots = Roots::default();
    if pages.header().is_some() {
        walk.table(Table::Other, 1, &mut |_, v| {
            roots.note(&v);
            Ok(())
        })?;
    }
    let mut last_seq = None;
    if let Some(root) = roots.sequence {
        walk.table(Table::Other, root, &mut |_, v| {
            if let [Value::Text(name), Value::Int(seq)] = v.as_slice()
                && name == b"events"
            {
                last_seq = Some(*seq);
            }
            Ok(())
        })?;
    }
    // The small tables' pages are not counted as lost rows.
    walk.damage.clear();
    walk.bad_cells = 0;
    let (other_leaves, other_rows) = (walk.leaves, walk.rows);
    let mut out = Output::new(sink);
    let mut dead_seqs = Vec::new();
    if let Some(root) = roots.dead_letters {
        walk.table(Table::DeadLetters, root, &mut |seq, v| {
            dead_seqs.push(seq);
            out.row(Table::DeadLetters, seq, v)
        })?;
    }
    if let Some(root) = roots.events {
        walk.table(Table::Events, root, &mut |seq, v| {
            out.row(Table::Events, seq, v)
        })?;
    }
    let (leaves, rows) = (walk.leaves - other_leaves, walk.rows - other_rows);
    let mut unreadable = walk.bad_cells;
    let free = pages.freelist();
    let mut orphans: [HashSet<i64>; 2] = [HashSet::new(), HashSet::new()];
    for n in 1..=pages.count() {
        if seen[n as usize] || free.as_ref().is_some_and(|f| f[n as usize]) {
            continue;
        }
        for cell in btree::orphan_cells(&pages, n) {
            let Ok((seq, v)) = cell else {
                if roots.events.is_none() {
                    unreadable += 1;
                }
                continue;
            };
            let Some(table) = btree::shape(&v) else {
                continue;
            };
            let (root, slot) = match table {
                Table::Events => (roots.events, 0),
                _ => (roots.dead_letters, 1),
            };
            let wanted = match root {
                None => true,
                Some(_) => damage.iter_mut().any(|d| d.claims(table, seq)),
            };
            if wanted && orphans[slot].insert(seq) {
                if table == Table::DeadLetters {
                    dead_seqs.push(seq);
                }
                out.row(table, seq, v)?;
            }
        }
    }
    out.flush()?;
    unreadable += out.rejected;
    dead_seqs.sort_unstable();
    let per_leaf = rows.div_ceil(leaves.max(1)).max(1);
    let top = last_seq.or(out.max_seq);
    for d in &damage {
        unreadable += d.lost(top, &dead_seqs, per_leaf);
    }
    Ok(SalvageReport {
        file: String::new(),
        events: out.events,
        dead_letters: out.dead,
        dead_letters_copied: out.copied,
        unreadable,
        damaged_pages: damage.iter().filter(|d| d.table != Table::Other).count() as u64,
        salvaged_at_ms: 0,
    })
}

/// Root pages named in the schema.
#[derive(Default)]
struct Roots {
    events: Option<u32>,
    dead_letters: Option<u32>,
    sequence: Option<u32>,
}

impl Roots {
    fn note(&mut self, v: &[Value]) {
        if let [
            Value::Text(kind),
            Value::Text(name),
            _,
            Value::Int(root),
            ..,
        ] = v
            && kind == b"table"
            && *root > 0
        {
            let root = u32::try_from(*root).ok();
            match name.as_slice() {
                b"events" => self.events = root,
                b"dead_letters" => self.dead_letters = root,
                b"sqlite_sequence" => self.sequence = root,
                _ => {}
            }
        }
    }
}

impl Damage {
    /// Whether `seq` of `table` falls in this lost range (and counts it found).
    fn claims(&mut self, table: Table, seq: i64) -> bool {
        let inside = self.table == table
            && self.lo.is_none_or(|lo| seq > lo)
            && self.hi.is_none_or(|hi| seq <= hi);
        if inside {
            self.found += 1;
        }
        inside
    }

    /// Rows of this range that were not found anywhere.
    fn lost(&self, top: Option<i64>, dead_seqs: &[i64], per_leaf: u64) -> u64 {
        let hi = self.hi.or(top);
        match (self.table, self.lo, hi) {
            (Table::Events, Some(lo), Some(hi)) if hi > lo => {
                let span = (hi - lo) as u64;
                let start = dead_seqs.partition_point(|&s| s <= lo);
                let end = dead_seqs.partition_point(|&s| s <= hi);
                span.saturating_sub(self.found + (end - start) as u64)
            }
            (Table::Other, ..) => 0,
            _ => per_leaf.saturating_sub(self.found),
        }
    }
}

/// Turns rows into events and hands them over in batches.
struct Output<'a> {
    sink: &'a mut dyn FnMut(Vec<NewEvent>) -> io::Result<()>,
    batch: Vec<NewEvent>,
    bytes: u64,
    events: u64,
    dead: u64,
    copied: u64,
    rejected: u64,
    max_seq: Option<i64>,
}

impl<'a> Output<'a> {
    fn new(sink: &'a mut dyn FnMut(Vec<NewEvent>) -> io::Result<()>) -> Self {
        Self {
            sink,
            batch: Vec::new(),
            bytes: 0,
            events: 0,
            dead: 0,
            copied: 0,
            rejected: 0,
            max_seq: None,
        }
    }

    fn row(&mut self, table: Table, seq: i64, v: Vec<Value>) -> io::Result<()> {
        self.max_seq = self.max_seq.max(Some(seq));
        let mut v = v.into_iter();
        let (_, Some(Value::Text(uuid)), Some(Value::Text(topic))) = (v.next(), v.next(), v.next())
        else {
            self.rejected += 1;
            return Ok(());
        };
        let (Some(Value::Blob(key)), Some(Value::Blob(payload)), Some(Value::Int(at))) =
            (v.next(), v.next(), v.next())
        else {
            self.rejected += 1;
            return Ok(());
        };
        // The payload is the client's JSON as sent; bytes that do not parse
        // are damage that decoded by chance, not an event.
        if serde_json::from_slice::<serde::de::IgnoredAny>(&payload).is_err()
            || std::str::from_utf8(&uuid).is_err()
            || std::str::from_utf8(&topic).is_err()
        {
            self.rejected += 1;
            return Ok(());
        }
        if table == Table::DeadLetters {
            // reason, failed_at_ms, then dlq_delivered when the schema has it.
            if let Some(Value::Int(1)) = v.nth(2) {
                self.copied += 1;
                return Ok(());
            }
            self.dead += 1;
        } else {
            self.events += 1;
        }
        let event = NewEvent {
            uuid: String::from_utf8_lossy(&uuid).into_owned(),
            topic: String::from_utf8_lossy(&topic).into(),
            key,
            payload,
            captured_at_ms: at,
            // Unknown once salvaged: kept deduplicated, as in older files.
            client_uuid: true,
        };
        self.bytes += event.size();
        self.batch.push(event);
        if self.batch.len() >= BATCH_ROWS || self.bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.bytes = 0;
        if self.batch.is_empty() {
            return Ok(());
        }
        (self.sink)(std::mem::take(&mut self.batch))
    }
}

/// Observer of salvage progress, for metrics: quarantined files still
/// waiting, and the report of the file just salvaged (if one was).
pub type SalvageObserver = Box<dyn Fn(usize, Option<&SalvageReport>) + Send + Sync + 'static>;

/// How long the background salvage waits before trying a failed file again.
const RETRY_AFTER: Duration = Duration::from_secs(30);

fn dir_error(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::DataDir {
        path: path.to_owned(),
        source,
    }
}

/// Salvages every quarantined file of `dir` into the live buffer through
/// `writer`, oldest first; one report per file. A file is deleted only after
/// all its rows are committed; on error it stays in quarantine.
pub async fn salvage_quarantine(
    dir: &Path,
    writer: &WriterHandle,
    observer: Option<&SalvageObserver>,
) -> Result<Vec<SalvageReport>> {
    let files = quarantine::unsalvaged(dir).map_err(dir_error(dir))?;
    if let Some(observe) = observer {
        observe(files.len(), None);
    }
    let mut reports = Vec::with_capacity(files.len());
    for (i, file) in files.iter().enumerate() {
        let report = salvage_file(file, writer).await?;
        if let Some(observe) = observer {
            observe(files.len() - i - 1, Some(&report));
        }
        reports.push(report);
    }
    Ok(reports)
}

/// Runs [`salvage_quarantine`] in the background of a serving pod, trying
/// again every 30 s while a file fails. Abort it before judging the volume
/// clean: a file it has not finished stays in quarantine, so the volume
/// stays not clean.
pub fn spawn_background(
    dir: PathBuf,
    writer: WriterHandle,
    observer: Option<SalvageObserver>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match salvage_quarantine(&dir, &writer, observer.as_ref()).await {
                Ok(_) => return,
                Err(Error::WriterStopped) => return,
                Err(e) => {
                    tracing::error!(error = %e, retry_in_s = RETRY_AFTER.as_secs(), "salvage of a quarantined buffer file failed");
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        }
    })
}

async fn salvage_file(db: &Path, writer: &WriterHandle) -> Result<SalvageReport> {
    tracing::info!(file = %db.display(), "salvaging quarantined buffer file");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<NewEvent>>(2);
    let path = db.to_owned();
    let reader = tokio::task::spawn_blocking(move || {
        read_damaged(&path, &mut |batch| {
            tx.blocking_send(batch)
                .map_err(|_| io::Error::other("salvage stopped"))
        })
    });
    while let Some(batch) = rx.recv().await {
        append_all(db, writer, batch).await?;
    }
    let mut report = reader
        .await
        .map_err(|e| io::Error::other(e.to_string()))
        .and_then(|r| r)
        .map_err(dir_error(db))?;
    report.file = db.display().to_string();
    report.salvaged_at_ms = now_ms();
    write_report(db, &report).map_err(dir_error(db))?;
    quarantine::remove_salvaged(db).map_err(dir_error(db))?;
    let lost = report.unreadable;
    let rows = report.events + report.dead_letters;
    if lost > 0 {
        tracing::warn!(file = %db.display(), salvaged = rows, unreadable = lost, damaged_pages = report.damaged_pages, "salvaged a quarantined buffer file; some rows could not be read");
    } else {
        tracing::info!(file = %db.display(), salvaged = rows, "salvaged a quarantined buffer file; every row was readable");
    }
    Ok(report)
}

/// Writes `<file>.salvaged.json` next to the quarantined file (synced).
fn write_report(db: &Path, report: &SalvageReport) -> io::Result<()> {
    use std::io::Write;
    let mut name = db.as_os_str().to_owned();
    name.push(REPORT_SUFFIX);
    let path = PathBuf::from(name);
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(report).map_err(io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// Salvage reports left in `dir`'s quarantine folder.
pub fn reports(dir: &Path) -> io::Result<Vec<SalvageReport>> {
    let qdir = dir.join(quarantine::QUARANTINE_DIR);
    let entries = match std::fs::read_dir(&qdir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.to_string_lossy().ends_with(REPORT_SUFFIX) {
            let text = std::fs::read(&path)?;
            out.push(serde_json::from_slice(&text).map_err(io::Error::other)?);
        }
    }
    Ok(out)
}

/// Appends one batch, waiting while the buffer is over its quota and
/// retrying a failed disk a while; a batch larger than the whole quota is
/// split in halves until the halves fit.
async fn append_all(db: &Path, writer: &WriterHandle, events: Vec<NewEvent>) -> Result<()> {
    let quota = writer
        .state
        .quota
        .load(std::sync::atomic::Ordering::Relaxed);
    let needed: u64 = events.iter().map(NewEvent::size).sum();
    if needed > quota {
        if events.len() == 1 {
            return Err(Error::DataDir {
                path: db.to_owned(),
                source: io::Error::other(format!(
                    "salvaged event needs {needed} bytes, more than the buffer quota of {quota}; run `flush` on this volume"
                )),
            });
        }
        let mut first = events;
        let second = first.split_off(first.len() / 2);
        Box::pin(append_all(db, writer, first)).await?;
        return Box::pin(append_all(db, writer, second)).await;
    }
    let mut failures = 0u32;
    loop {
        match writer.append(events.clone()).await {
            Ok(_) => return Ok(()),
            Err(AppendError::Stopped) => return Err(Error::WriterStopped),
            // The forwarder makes room; no failure counted.
            Err(AppendError::QuotaExceeded { .. }) => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Err(e) => {
                failures += 1;
                if failures >= 20 {
                    return Err(Error::DataDir {
                        path: db.to_owned(),
                        source: io::Error::other(format!("appending salvaged events: {e}")),
                    });
                }
                tokio::time::sleep(Duration::from_millis(100) * failures.min(30)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;

/// Figures for `inspect`: `(quarantined files not salvaged, events salvaged,
/// rows unreadable)`, the last two summed over the salvage reports kept on
/// the volume. A folder that cannot be read counts as one unsalvaged file,
/// so it never passes for clean.
pub fn figures(dir: &Path) -> (u64, u64, u64) {
    let waiting = quarantine::unsalvaged_quarantine(dir).map_or(1, |n| n as u64);
    let reports = reports(dir).unwrap_or_default();
    (
        waiting,
        reports.iter().map(|r| r.events + r.dead_letters).sum(),
        reports.iter().map(|r| r.unreadable).sum(),
    )
}
