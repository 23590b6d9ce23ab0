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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::Connection;

use super::NewEvent;

/// Bytes SQLite adds to a stored event (record header, rowid, timestamp, cell pointer).
const ROW_OVERHEAD: u64 = 48;
/// A request may leave a page partly filled, in the WAL and in the table.
const PAGE_SLACK: u64 = 4096 + 24;
/// Far from full, the cheap upper bound is enough and SQLite is not asked.
const EXACT_BELOW: i128 = 256 << 20;
/// WAL file header and per-frame header, bytes.
const WAL_HEADER: u64 = 32;
const FRAME_HEADER: u64 = 24;

/// Bytes SQLite writes for `events`, in the WAL or in the database file.
pub(super) fn cost(events: &[NewEvent]) -> u64 {
    events.iter().map(|e| e.size() + ROW_OVERHEAD).sum::<u64>() + PAGE_SLACK
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

    /// Takes the room `cost` bytes of events need; false, and nothing taken,
    /// when they do not fit.
    pub fn take(&mut self, cost: u64) -> bool {
        let from_tail = cost.min(self.wal_tail);
        let from_free = cost.min(self.free_pages);
        let from_disk = (cost - from_tail) as i128 + (cost - from_free) as i128;
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
    /// Frames in the WAL after the writer's last commit (from its WAL hook).
    wal_frames: Arc<AtomicU64>,
}

impl DiskGuard {
    pub fn new(dir: &Path, keep_free: u64, wal_frames: Arc<AtomicU64>) -> Self {
        Self {
            dir: dir.to_owned(),
            keep_free,
            wal_frames,
        }
    }

    /// Bytes the guard keeps free for deletes (0: off).
    pub fn keep_free(&self) -> u64 {
        self.keep_free
    }

    /// The WAL frame count the writer's hook keeps up to date.
    pub fn wal_frames(&self) -> Arc<AtomicU64> {
        self.wal_frames.clone()
    }

    /// The room appends may take now. Errors reading the volume leave
    /// appends unlimited: commits then meet the disk as it is.
    pub fn measure(&self, conn: &Connection) -> Room {
        if self.keep_free == 0 {
            return Room::unlimited();
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
            return Room {
                disk: rough,
                wal_tail: 0,
                free_pages: 0,
                keep_free: self.keep_free,
            };
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

/// Gives the writer's connection SQLite's automatic checkpoint (a passive
/// checkpoint once the WAL holds `wal_pages` frames) and records how many
/// frames the WAL holds after each commit, for [`DiskGuard::measure`].
pub(super) fn watch_wal(
    conn: &mut Connection,
    wal_pages: i64,
    frames: Arc<AtomicU64>,
) -> rusqlite::Result<()> {
    conn.wal_hook(Some(
        move |wal: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
            frames.store(pages.max(0) as u64, Ordering::Relaxed);
            if i64::from(pages) >= wal_pages {
                // As SQLite's own auto-checkpoint: a failure (busy readers, a
                // full disk) is retried after a later commit.
                if let Err(e) = wal.checkpoint() {
                    tracing::debug!(error = %e, "wal checkpoint after commit failed");
                }
            }
            // An error here would fail a statement whose commit already happened.
            Ok(())
        },
    ))
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
        assert!(room.take(4_000));
        assert_eq!(room.disk, 2_000);
        assert!(!room.take(1_001), "2,002 bytes do not fit in 2,000");
        assert_eq!(room.disk, 2_000, "a refused request takes nothing");

        let mut recycled = Room {
            disk: 0,
            wal_tail: 5_000,
            free_pages: 5_000,
            keep_free: 0,
        };
        assert!(
            recycled.take(5_000),
            "a drained buffer reuses its own space"
        );
        assert!(!recycled.take(1), "and nothing past it");

        let mut under = Room {
            disk: -3_000,
            wal_tail: 5_000,
            free_pages: 5_000,
            keep_free: 0,
        };
        assert!(
            under.take(5_000),
            "deletes took part of keep_free: reusing the buffer's own space is still fine"
        );
        assert!(!under.take(1));
    }

    #[test]
    fn cost_covers_every_event_and_a_partial_page() {
        let e = NewEvent {
            uuid: "0".repeat(36),
            topic: "t".into(),
            key: Vec::new(),
            payload: vec![0; 100],
            captured_at_ms: 0,
        };
        assert_eq!(cost(&[e.clone(), e]), 2 * (137 + ROW_OVERHEAD) + PAGE_SLACK);
    }
}
