//! Checkpoints: who copies the WAL into the database file, and when.
//!
//! The WAL only restarts at its beginning once a checkpoint has copied every
//! frame in it, and under steady appends only the writer can make that
//! happen (a checkpoint on another connection races the next commit). But a
//! checkpoint syncs the WAL and then the database file, even with
//! `--durability os`, and every request waiting on the writer waits for it.
//! So the work is split:
//!
//! - a checkpointer thread on a connection of its own runs passive
//!   checkpoints (they never block the writer) every [`CHECKPOINT_INTERVAL`],
//!   and also whenever the writer's hook sees the WAL pass another quarter of
//!   its limit, so most frames are copied (and, with `--durability os`,
//!   synced) and the database file synced off the writer's path;
//! - once the WAL holds its limit, the writer checkpoints the remainder
//!   itself, after it has answered the round that filled it
//!   ([`WalWatch::checkpoint_if_due`]), which lets the WAL restart. The WAL
//!   so stays within the limit plus one round, as SQLite's own
//!   auto-checkpoint would keep it, and that round's acknowledgements never
//!   wait for the copy.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

use super::{Error, Result};
use crate::config::Durability;

/// How often the checkpointer copies the WAL when nothing asks it sooner.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);

/// What the writer's WAL hook tracks, shared with the checkpointer and the
/// volume guard.
#[derive(Debug, Clone)]
pub(super) struct WalWatch {
    /// Frames the writer checkpoints at (and past which the WAL does not grow
    /// by more than a round).
    limit: u64,
    /// Frames in the WAL after the writer's last commit.
    frames: Arc<AtomicU64>,
    /// The WAL reached `limit`: the writer checkpoints after its round.
    due: Arc<AtomicBool>,
    /// Wakes the checkpointer early (a full queue means it is awake already).
    kick: SyncSender<()>,
    /// Held by whoever checkpoints. SQLite lets one checkpoint run at a time
    /// and fails the other at once; the writer's must not fail (the WAL would
    /// grow until a later one wins), so it waits out the checkpointer's pass.
    turn: Arc<Mutex<()>>,
}

impl WalWatch {
    /// The WAL frame count the writer's hook keeps up to date.
    pub fn frames(&self) -> Arc<AtomicU64> {
        self.frames.clone()
    }

    /// Installs the hook on the writer's connection: it records the frame
    /// count after each commit, wakes the checkpointer each time the WAL
    /// passes another quarter of the limit, and marks the writer's own
    /// checkpoint due once it reaches the limit. This replaces SQLite's
    /// automatic checkpoint, which would run inside the commit.
    pub fn install(&self, conn: &mut Connection) -> rusqlite::Result<()> {
        let watch = self.clone();
        let quarter = (self.limit / 4).max(1);
        let mut kicked_at = 0u64;
        conn.wal_hook(Some(
            move |_: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
                let pages = pages.max(0) as u64;
                watch.frames.store(pages, Ordering::Relaxed);
                // Not at the limit itself: there the writer checkpoints, and
                // a checkpointer holding the checkpoint lock would make it fail.
                if pages / quarter > kicked_at && pages < watch.limit {
                    // Full: a wake-up is pending already. Disconnected: stopping.
                    let _ = watch.kick.try_send(());
                }
                kicked_at = pages / quarter;
                if pages >= watch.limit {
                    watch.due.store(true, Ordering::Relaxed);
                }
                // An error here would fail a statement whose commit already happened.
                Ok(())
            },
        ))
    }

    /// Checkpoints on the writer's connection if the WAL reached its limit
    /// (call it after a round's answers went out).
    pub fn checkpoint_if_due(&self, conn: Option<&Connection>) {
        let due = self.due.swap(false, Ordering::Relaxed);
        self.checkpoint_when(due, conn);
    }

    /// Checkpoints on the writer's connection when `now`. Also used before a
    /// commit while the volume is (nearly) full: the commit then restarts the
    /// WAL at its beginning (reusing the file) instead of growing it into the
    /// space the checkpoint itself needs to extend the database file; deletes
    /// that outrun the checkpoint can otherwise leave an empty buffer whose
    /// WAL can neither restart nor grow. As with SQLite's own auto-checkpoint,
    /// a failure (busy readers, a full disk) is retried after a later commit.
    pub fn checkpoint_when(&self, now: bool, conn: Option<&Connection>) {
        if let (true, Some(conn)) = (now, conn) {
            let _turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::debug!(error = %e, "the writer's wal checkpoint failed");
            }
        }
    }
}

/// WAL pages allowed before the writer checkpoints, for a WAL limit in bytes.
pub(super) fn limit_pages(max_wal_bytes: u64) -> u64 {
    if max_wal_bytes == 0 {
        return 2000;
    }
    // SQLite's default page size; the WAL holds a few more bytes a frame.
    (max_wal_bytes / 4096).clamp(16, 2000)
}

/// The checkpointer thread; dropping every [`WalWatch`] and the
/// checkpointer's own sender stops it.
#[derive(Debug)]
pub(super) struct Checkpointer {
    kick: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the checkpointer on a connection of its own, and the watch the
    /// writer's hook wakes it with.
    pub fn start(
        dir: &Path,
        durability: Durability,
        max_wal_bytes: u64,
    ) -> Result<(Self, WalWatch)> {
        Self::start_every(dir, durability, max_wal_bytes, CHECKPOINT_INTERVAL)
    }

    fn start_every(
        dir: &Path,
        durability: Durability,
        max_wal_bytes: u64,
        interval: Duration,
    ) -> Result<(Self, WalWatch)> {
        let conn = super::open_writer(dir, durability)?;
        let (kick, kicked) = mpsc::sync_channel::<()>(1);
        let turn = Arc::new(Mutex::new(()));
        let theirs = turn.clone();
        let thread = std::thread::Builder::new()
            .name("buffer-checkpoint".into())
            .spawn(move || run(&conn, &kicked, &theirs, interval))
            .map_err(|source| Error::DataDir {
                path: dir.to_owned(),
                source,
            })?;
        let watch = WalWatch {
            limit: limit_pages(max_wal_bytes),
            frames: Arc::default(),
            due: Arc::default(),
            kick: kick.clone(),
            turn,
        };
        Ok((
            Self {
                kick: Some(kick),
                thread: Some(thread),
            },
            watch,
        ))
    }

    /// Waits for the thread (after the writer, which holds the other senders, stopped).
    pub fn join(mut self) {
        drop(self.kick.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(conn: &Connection, kicked: &mpsc::Receiver<()>, turn: &Mutex<()>, interval: Duration) {
    loop {
        match kicked.recv_timeout(interval) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {
                let _turn = turn.lock().unwrap_or_else(PoisonError::into_inner);
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::debug!(error = %e, "wal checkpoint failed");
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer's connection with the hook installed, its checkpointer
    /// (waking every `interval` unless kicked) and the directory.
    struct Bed {
        _dir: tempfile::TempDir,
        db: std::path::PathBuf,
        checkpointer: Checkpointer,
        watch: WalWatch,
        conn: Connection,
    }

    impl Bed {
        fn new(limit_pages: u64, interval: Duration) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let (checkpointer, watch) =
                Checkpointer::start_every(dir.path(), Durability::Os, limit_pages * 4096, interval)
                    .unwrap();
            let mut conn = super::super::open_writer(dir.path(), Durability::Os).unwrap();
            watch.install(&mut conn).unwrap();
            let db = dir.path().join(super::super::DB_FILE);
            Self {
                _dir: dir,
                db,
                checkpointer,
                watch,
                conn,
            }
        }

        fn frames(&self) -> u64 {
            self.watch.frames.load(Ordering::Relaxed)
        }

        /// Stops the checkpointer the way the writer does: its senders first.
        fn close(self) {
            drop(self.conn);
            drop(self.watch);
            self.checkpointer.join();
        }
    }

    fn insert(conn: &Connection, uuid: &str) {
        conn.execute(
            "INSERT INTO events(uuid, topic, key, payload, captured_at_ms) \
             VALUES (?1, 't', x'', ?2, 0)",
            rusqlite::params![uuid, vec![b'x'; 3_000]],
        )
        .unwrap();
    }

    /// A writer that commits without pause still restarts the WAL, with
    /// neither SQLite's auto-checkpoint nor a checkpoint inside the commit:
    /// its own checkpoint after each round that reached the limit does it,
    /// although the checkpointer keeps racing its commits.
    #[test]
    fn the_wal_restarts_under_steady_commits_and_stays_near_its_limit() {
        let bed = Bed::new(64, CHECKPOINT_INTERVAL);
        let (mut largest, mut restarts, mut last) = (0, 0, 0);
        for round in 0..3_000 {
            insert(&bed.conn, &format!("u{round}"));
            let frames = bed.frames();
            if frames < last {
                restarts += 1;
            }
            last = frames;
            largest = largest.max(frames);
            bed.watch.checkpoint_if_due(Some(&bed.conn));
        }
        assert!(restarts >= 20, "the WAL restarted only {restarts} times");
        // The limit plus one round (a 3 KB row: its page, an index leaf, and
        // a split now and then): the writer's checkpoint waits out the
        // checkpointer's instead of failing.
        assert!(largest <= 64 + 8, "the WAL held {largest} frames");
        bed.close();
    }

    /// Without the writer's checkpoint the WAL would only grow: a
    /// checkpointer cannot restart a WAL that a writer keeps appending to.
    /// (The converse of the test above, so that it proves something.)
    #[test]
    fn without_the_writers_checkpoint_the_wal_grows_past_its_limit() {
        let bed = Bed::new(64, Duration::from_secs(3600));
        for round in 0..1_000 {
            insert(&bed.conn, &format!("u{round}"));
        }
        let frames = bed.frames();
        assert!(frames > 4 * 64, "the WAL holds {frames} frames");
        bed.close();
    }

    /// The hook wakes the checkpointer: with an interval of an hour, a WAL
    /// past a quarter of its limit is still copied into the database file
    /// while the writer does nothing.
    #[test]
    fn a_quarter_of_the_limit_wakes_the_checkpointer() {
        let bed = Bed::new(2000, Duration::from_secs(3600));
        let tx = bed.conn.unchecked_transaction().unwrap();
        for i in 0..600 {
            insert(&tx, &format!("u{i}"));
        }
        tx.commit().unwrap();
        let frames = bed.frames();
        assert!(frames > 500, "the commit wrote {frames} frames");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::fs::metadata(&bed.db).unwrap().len() < 500 * 4096 {
            assert!(
                std::time::Instant::now() < deadline,
                "the checkpointer was not woken"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            !bed.watch.due.load(Ordering::Relaxed),
            "under the limit the writer's own checkpoint is not due"
        );
        bed.close();
    }
}
