//! Room on the volume for appends.
//!
//! SQLite in WAL mode cannot get out of a full disk by itself: a delete needs
//! new WAL frames, and the WAL only restarts after a checkpoint has copied it
//! into the database file, which must first grow to the snapshot's page
//! count. Once the disk is full with most of the buffer still in the WAL, no
//! checkpoint completes, no delete commits, and the pod is wedged.
//!
//! So the writer never lets appends take the space that way out needs. Before
//! a round of appends it measures the volume ([`DiskGuard::measure`]) and
//! admits a request only while, after it, the free space still covers the
//! checkpoint's pending growth of the database file plus `keep_free` bytes
//! for the forwarder's deletes. A request's cost is counted twice, once as
//! WAL frames and once as database pages, less what the WAL's reusable tail
//! and the database's free pages absorb.
//!
//! Measuring costs the writer a `statfs` and a `stat` of the WAL, and on ext4
//! a `statfs` can block (about one context switch per round, ~20 % of the
//! single-event throughput at 4 connections). So a measurement that finds the
//! volume far from full stands for [`REMEASURE_AFTER`], each round starting
//! from what the previous one left ([`DiskGuard::left`]): the appends' own
//! priced cost is still taken from it, and the margin of [`EXACT_BELOW`]
//! covers what settlements and other writers add in that time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::NewEvent;

/// SQLite's page size (the default; the buffer never changes it).
const PAGE: u64 = 4096;
/// Bytes SQLite adds to a stored row (record header, rowid, timestamp).
const ROW_OVERHEAD: u64 = 48;
/// A cell's pointer on its page.
const CELL_POINTER: u64 = 2;
/// Bytes a leaf page gives its cells (the page less its header).
const LEAF_ROOM: u64 = PAGE - 8;
/// Largest row a table leaf keeps whole; longer ones spill into overflow pages.
const MAX_LOCAL: u64 = PAGE - 35;
/// Content bytes of an overflow page.
const OVERFLOW_ROOM: u64 = PAGE - 4;
/// Bytes an entry of the uuid index adds besides the uuid (header, rowid).
const INDEX_OVERHEAD: u64 = 12;
/// Pages a commit rewrites besides the rows' own: page 1, the AUTOINCREMENT
/// counter, the partly filled last pages and interior pages of both trees.
const FIXED_PAGES: u64 = 10;
/// Frames a leaf split of the uuid index writes: the new page, a sibling
/// rebalanced with it and their parent.
const SPLIT_FRAMES: u64 = 3;
/// Far from full, the cheap upper bound is enough and SQLite is not asked.
const EXACT_BELOW: i128 = 256 << 20;
/// How long a far-from-full measurement stands in for a new one.
const REMEASURE_AFTER: Duration = Duration::from_millis(100);
/// WAL file header and per-frame header, bytes.
const WAL_HEADER: u64 = 32;
const FRAME_HEADER: u64 = 24;
const FRAME: u64 = PAGE + FRAME_HEADER;

/// What a commit of some events takes on the volume: WAL frames, and the
/// pages the checkpoint later adds to the database file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cost {
    pub wal: u64,
    pub db: u64,
}

impl Cost {
    /// `bytes` both in the WAL and in the database file.
    pub const fn both(bytes: u64) -> Self {
        Self {
            wal: bytes,
            db: bytes,
        }
    }
}

/// Least part of a spilling row SQLite keeps on the leaf: ((4096 − 12) × 32 / 255) − 23.
const MIN_LOCAL: u64 = 489;
/// The pointer to the first overflow page.
const OVERFLOW_POINTER: u64 = 4;

/// Bytes one row takes in the events table: its share of a leaf page (a
/// row just over half a page has the page to itself), plus its overflow
/// pages when it spills, split as SQLite splits it.
fn table_bytes(e: &NewEvent) -> u64 {
    let share = |cell: u64| PAGE.div_ceil(LEAF_ROOM / (cell + CELL_POINTER));
    let row = e.size() + ROW_OVERHEAD;
    if row <= MAX_LOCAL {
        return share(row);
    }
    let k = MIN_LOCAL + (row - MIN_LOCAL) % OVERFLOW_ROOM;
    let local = if k <= MAX_LOCAL { k } else { MIN_LOCAL };
    (row - local).div_ceil(OVERFLOW_ROOM) * PAGE + share(local + OVERFLOW_POINTER)
}

/// An upper bound of what SQLite writes to append `events` to a table that
/// holds `buffered` events. Random uuids land anywhere in the uuid index, so
/// each event may dirty an index leaf of its own until there are more events
/// than leaves; index pages split half full, so an entry takes twice its size.
pub(super) fn cost(events: &[NewEvent], buffered: u64) -> Cost {
    let table: u64 = events.iter().map(table_bytes).sum();
    let entries: u64 = events
        .iter()
        .map(|e| 2 * (e.uuid.len() as u64 + INDEX_OVERHEAD))
        .sum();
    let index_leaves = (buffered * 2 * (36 + INDEX_OVERHEAD) + entries).div_ceil(PAGE) + 1;
    let leaves_touched = (events.len() as u64).min(index_leaves);
    let db = table + entries + FIXED_PAGES * PAGE;
    // A leaf that splits rewrites its siblings and parent as well: a few
    // frames for each page the index grows by, and for one split besides.
    let index_pages = entries.div_ceil(PAGE) + 1;
    let frames = table.div_ceil(PAGE) + leaves_touched + SPLIT_FRAMES * index_pages + FIXED_PAGES;
    Cost {
        wal: WAL_HEADER + frames * FRAME,
        db,
    }
}

/// What appends may still take in this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Room {
    /// Free bytes on the volume past the checkpoint's growth and `keep_free`.
    pub disk: i128,
    /// Bytes at the end of the WAL file that new frames overwrite.
    pub wal_tail: u64,
    /// Bytes of free pages inside the database file.
    pub free_pages: u64,
    /// What the guard keeps free (for the refusal's message).
    pub keep_free: u64,
}

impl Room {
    /// No limit (the guard is off, or the volume could not be measured).
    pub fn unlimited() -> Self {
        Self {
            disk: i128::MAX / 4,
            wal_tail: 0,
            free_pages: 0,
            keep_free: 0,
        }
    }

    /// Takes the room a commit of `cost` needs; false, and nothing taken,
    /// when it does not fit.
    pub fn take(&mut self, cost: Cost) -> bool {
        let from_tail = cost.wal.min(self.wal_tail);
        let from_free = cost.db.min(self.free_pages);
        let from_disk = (cost.wal - from_tail) as i128 + (cost.db - from_free) as i128;
        // Below `keep_free` (deletes took some of it) the buffer still
        // reuses its own space: that takes nothing from the volume.
        if from_disk > 0 && from_disk > self.disk {
            return false;
        }
        self.disk -= from_disk;
        self.wal_tail -= from_tail;
        self.free_pages -= from_free;
        true
    }
}

/// Measures the room of one volume; off when `keep_free` is 0.
#[derive(Debug)]
pub(super) struct DiskGuard {
    dir: PathBuf,
    keep_free: u64,
    /// Frames in the WAL after the writer's last commit (see [`super::wal`]).
    wal_frames: Arc<AtomicU64>,
    /// The last far-from-full measurement, as the rounds since left it.
    far: Option<(Instant, Room)>,
}

impl DiskGuard {
    pub fn new(dir: &Path, keep_free: u64, wal_frames: Arc<AtomicU64>) -> Self {
        Self {
            dir: dir.to_owned(),
            keep_free,
            wal_frames,
            far: None,
        }
    }

    /// Bytes the guard keeps free for deletes (0: off).
    pub fn keep_free(&self) -> u64 {
        self.keep_free
    }

    /// The room appends may take now. Errors reading the volume leave
    /// appends unlimited: commits then meet the disk as it is.
    pub fn measure(&mut self, conn: &Connection) -> Room {
        if self.keep_free == 0 {
            return Room::unlimited();
        }
        if let Some((at, room)) = self.far.take()
            && room.disk >= EXACT_BELOW
            && at.elapsed() < REMEASURE_AFTER
        {
            self.far = Some((at, room));
            return room;
        }
        let Ok(fs) = nix::sys::statvfs::statvfs(&self.dir) else {
            return Room::unlimited();
        };
        let avail = fs.blocks_available() as u128 * fs.fragment_size() as u128;
        let avail = avail.min(i128::MAX as u128 / 4) as i128;
        let db_path = self.dir.join(super::DB_FILE);
        let wal_len = file_len(&wal_path(&db_path));
        // The checkpoint grows the file by at most what the WAL holds.
        let rough = avail - wal_len as i128 - self.keep_free as i128;
        if rough >= EXACT_BELOW {
            let room = Room {
                disk: rough,
                wal_tail: 0,
                free_pages: 0,
                keep_free: self.keep_free,
            };
            self.far = Some((Instant::now(), room));
            return room;
        }
        let exact = || -> rusqlite::Result<Room> {
            let read = |pragma: &str| -> rusqlite::Result<u64> {
                let v: i64 = conn.query_row(pragma, [], |r| r.get(0))?;
                Ok(v.max(0) as u64)
            };
            let page_size = read("PRAGMA page_size")?;
            let pages = read("PRAGMA page_count")?;
            let free = read("PRAGMA freelist_count")?;
            let growth = (pages * page_size).saturating_sub(file_len(&db_path));
            let frames = self.wal_frames.load(Ordering::Relaxed);
            let wal_used = if frames == 0 {
                0
            } else {
                WAL_HEADER + frames * (page_size + FRAME_HEADER)
            };
            Ok(Room {
                disk: avail - growth as i128 - self.keep_free as i128,
                wal_tail: wal_len.saturating_sub(wal_used),
                free_pages: free * page_size,
                keep_free: self.keep_free,
            })
        };
        exact().unwrap_or(Room {
            disk: rough,
            wal_tail: 0,
            free_pages: 0,
            keep_free: self.keep_free,
        })
    }
}

impl DiskGuard {
    /// What a round of appends left of the room [`measure`](Self::measure)
    /// gave it: the next round within [`REMEASURE_AFTER`] starts from there.
    pub fn left(&mut self, room: Room) {
        if let Some((_, far)) = &mut self.far {
            *far = room;
        }
    }

    /// Drops the standing measurement (a commit failed): the next round measures.
    pub fn forget(&mut self) {
        self.far = None;
    }
}

fn wal_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

fn file_len(path: &Path) -> u64 {
    path.metadata().map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_pays_twice_unless_the_wal_tail_and_free_pages_absorb_it() {
        let mut room = Room {
            disk: 10_000,
            wal_tail: 0,
            free_pages: 0,
            keep_free: 0,
        };
        assert!(room.take(Cost::both(4_000)));
        assert_eq!(room.disk, 2_000);
        assert!(
            !room.take(Cost::both(1_001)),
            "2,002 bytes do not fit in 2,000"
        );
        assert_eq!(room.disk, 2_000, "a refused request takes nothing");

        let mut recycled = Room {
            disk: 0,
            wal_tail: 5_000,
            free_pages: 5_000,
            keep_free: 0,
        };
        assert!(
            recycled.take(Cost::both(5_000)),
            "a drained buffer reuses its own space"
        );
        assert!(!recycled.take(Cost::both(1)), "and nothing past it");

        let mut under = Room {
            disk: -3_000,
            wal_tail: 5_000,
            free_pages: 5_000,
            keep_free: 0,
        };
        assert!(
            under.take(Cost::both(5_000)),
            "deletes took part of keep_free: reusing the buffer's own space is still fine"
        );
        assert!(!under.take(Cost::both(1)));
    }

    /// The guard admits a request on `cost` counted once as WAL frames and
    /// once as database pages; an estimate below either lets a full disk
    /// wedge. Measured on a real buffer for the sizes where SQLite packs
    /// worst: rows just over half a page (one per page), rows that spill into
    /// overflow pages, and random uuids splitting the index mid-tree.
    #[test]
    fn cost_is_at_least_what_sqlite_writes_to_the_wal_and_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::open_writer(dir.path(), crate::config::Durability::Fsync).unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        let db = dir.path().join(super::super::DB_FILE);
        let page_count = |c: &Connection| -> u64 {
            c.query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))
                .unwrap() as u64
        };
        let insert = |events: &[NewEvent]| {
            let tx = conn.unchecked_transaction().unwrap();
            for e in events {
                tx.execute(
                    "INSERT INTO events(uuid, topic, key, payload, captured_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                    rusqlite::params![e.uuid, e.topic, e.key, e.payload, e.captured_at_ms],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        };
        let events = |n: usize, payload: usize| -> Vec<NewEvent> {
            (0..n)
                .map(|_| NewEvent {
                    uuid: uuid::Uuid::new_v4().to_string(),
                    topic: "events".into(),
                    key: b"key".to_vec(),
                    payload: vec![b'x'; payload],
                    captured_at_ms: 1_700_000_000_000,
                    client_uuid: true,
                })
                .collect()
        };
        // A table that already holds rows, so index inserts land mid-tree.
        insert(&events(3_000, 300));
        let mut buffered = 3_000;
        let mut short = Vec::new();
        for payload in [
            1, 100, 400, 1_000, 1_300, 1_900, 1_990, 2_000, 2_040, 2_100, 3_000, 4_000, 4_050,
            4_100, 5_000, 9_000, 100_000, 1_000_000,
        ] {
            for n in [1, 7, 200] {
                if payload * n > 30_000_000 {
                    continue;
                }
                conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                    .unwrap();
                assert_eq!(file_len(&wal_path(&db)), 0, "the WAL starts empty");
                let before = page_count(&conn);
                let batch = events(n, payload);
                insert(&batch);
                let wal = file_len(&wal_path(&db));
                let growth = (page_count(&conn) - before) * 4096;
                let cost = cost(&batch, buffered);
                buffered += n as u64;
                if cost.wal < wal || cost.db < growth {
                    short.push(format!(
                        "{n} events of {payload} bytes: cost {cost:?} < WAL {wal} or growth {growth}"
                    ));
                }
                eprintln!("{n} x {payload}: cost {cost:?} wal {wal} growth {growth}");
            }
        }
        assert!(short.is_empty(), "{short:#?}");
    }

    #[test]
    fn a_row_just_over_half_a_page_has_the_page_to_itself() {
        let e = |payload: usize| NewEvent {
            uuid: "0".repeat(36),
            topic: "t".into(),
            key: Vec::new(),
            payload: vec![0; payload],
            captured_at_ms: 0,
            client_uuid: true,
        };
        assert_eq!(table_bytes(&e(2_100)), PAGE);
        assert_eq!(table_bytes(&e(1_900)), PAGE / 2);
        assert!(table_bytes(&e(10)) < 128);
        assert_eq!(
            table_bytes(&e(10_000)),
            2 * PAGE + PAGE / 2,
            "two overflow pages, and the 1,901 bytes kept on the leaf take half of it"
        );
        assert_eq!(
            table_bytes(&e(4_000)),
            PAGE + PAGE / 8,
            "one overflow page, 489 bytes on the leaf"
        );
        let small = cost(&[e(10), e(10)], 1_000_000);
        assert_eq!(
            small.wal,
            WAL_HEADER + (1 + 2 + SPLIT_FRAMES * 2 + FIXED_PAGES) * FRAME
        );
    }

    #[test]
    fn a_far_from_full_measurement_stands_for_a_while_less_what_rounds_took() {
        let dir = tempfile::tempdir().unwrap();
        let conn =
            crate::buffer::open_writer(dir.path(), crate::config::Durability::Fsync).unwrap();
        let mut guard = DiskGuard::new(dir.path(), 1 << 20, Default::default());
        // A figure no statfs of this disk returns, so its return proves none ran.
        let planted = Room {
            disk: EXACT_BELOW + 12_345,
            wal_tail: 0,
            free_pages: 0,
            keep_free: 1 << 20,
        };
        guard.far = Some((Instant::now(), planted));
        assert_eq!(
            guard.measure(&conn),
            planted,
            "within the interval: not measured"
        );

        let mut round = guard.measure(&conn);
        assert!(round.take(Cost::both(6_000)));
        guard.left(round);
        assert_eq!(
            guard.measure(&conn).disk,
            EXACT_BELOW + 12_345 - 12_000,
            "the next round starts from what the last one left"
        );

        let mut near = planted;
        near.disk = EXACT_BELOW - 1;
        guard.left(near);
        assert_ne!(
            guard.measure(&conn),
            near,
            "closer to full than the margin: measured again"
        );

        let long_ago = Instant::now()
            .checked_sub(REMEASURE_AFTER * 2)
            .expect("the clock runs longer than 200 ms");
        guard.far = Some((long_ago, planted));
        assert_ne!(
            guard.measure(&conn),
            planted,
            "past the interval: measured again"
        );

        guard.far = Some((Instant::now(), planted));
        guard.forget();
        assert_ne!(
            guard.measure(&conn),
            planted,
            "after a failed commit: measured again"
        );

        let mut off = DiskGuard::new(dir.path(), 0, Default::default());
        off.far = Some((Instant::now(), planted));
        assert_eq!(
            off.measure(&conn),
            Room::unlimited(),
            "keep_free 0: no guard"
        );
    }
}
