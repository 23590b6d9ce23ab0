//! The group-commit writer: a dedicated thread owning the only write
//! connection. It takes every command waiting when it is free, applies them in
//! one transaction, commits (one fsync for all of them) and only then answers
//! each command. A failed commit fails every command in it, and none of their
//! events is kept: a request is all or nothing.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::thread::JoinHandle;

use rusqlite::{Connection, params};
use tokio::sync::{Notify, mpsc, oneshot};

use super::{Error, NewEvent, Result, now_ms};
use crate::config::Durability;

/// Most commands applied in one transaction.
const MAX_COMMANDS_PER_COMMIT: usize = 4096;
/// Most event bytes applied in one transaction (keeps a commit's latency bounded).
const MAX_BYTES_PER_COMMIT: u64 = 32 << 20;
/// Bounded queue in front of the writer: producers wait when it is full.
const CHANNEL_CAPACITY: usize = 8192;

/// Why an append was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AppendError {
    /// The buffer would exceed its quota.
    #[error("buffer quota exceeded: {used} of {quota} bytes used, request needs {needed}")]
    QuotaExceeded { used: u64, quota: u64, needed: u64 },
    /// The commit failed (disk full, I/O error).
    #[error("buffer commit failed: {0}")]
    Disk(String),
    /// The writer is gone.
    #[error("buffer writer stopped")]
    Stopped,
}

/// Live figures of the buffer, kept by the writer, read by HTTP and metrics.
#[derive(Debug, Default)]
pub struct BufferState {
    /// Events waiting for Kafka.
    pub events: AtomicU64,
    /// Bytes of those events.
    pub bytes: AtomicU64,
    /// Capture time of the oldest waiting event (ms), 0 when empty.
    pub oldest_ms: AtomicI64,
    /// Highest sequence number committed.
    pub last_seq: AtomicI64,
    /// At or near the quota (unready).
    pub over_quota: AtomicBool,
    /// The last commit failed (unready).
    pub disk_failed: AtomicBool,
    /// Quota in bytes.
    pub quota: AtomicU64,
}

/// Observer of each commit, for metrics: `(commands, events)`.
pub type CommitObserver = Box<dyn Fn(usize) + Send + 'static>;

enum Command {
    Append {
        events: Vec<NewEvent>,
        reply: oneshot::Sender<Result<i64, AppendError>>,
    },
    Settle {
        delivered: Vec<(i64, u64)>,
        dead: Vec<(i64, u64, String)>,
        reply: oneshot::Sender<Result<(), AppendError>>,
    },
    MarkClean {
        reply: oneshot::Sender<Result<bool, AppendError>>,
    },
}

/// Cheap handle used to submit commands to the writer.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Command>,
    /// Live figures.
    pub state: Arc<BufferState>,
    /// Notified after every commit that appended events.
    pub appended: Arc<Notify>,
}

impl std::fmt::Debug for WriterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterHandle").finish_non_exhaustive()
    }
}

impl WriterHandle {
    /// Appends a request's events; resolves once they are committed (and fsynced
    /// in `fsync` mode). Returns the last sequence number assigned.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<i64, AppendError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Append { events, reply })
            .await
            .map_err(|_| AppendError::Stopped)?;
        rx.await.map_err(|_| AppendError::Stopped)?
    }

    /// Deletes delivered events and moves dead ones (with reason) to dead letters,
    /// atomically. Each entry is `(seq, size)`.
    pub async fn settle(
        &self,
        delivered: Vec<(i64, u64)>,
        dead: Vec<(i64, u64, String)>,
    ) -> Result<(), AppendError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Settle {
                delivered,
                dead,
                reply,
            })
            .await
            .map_err(|_| AppendError::Stopped)?;
        rx.await.map_err(|_| AppendError::Stopped)?
    }

    /// Records a clean shutdown if the buffer is empty; returns whether it was.
    pub async fn mark_clean_if_empty(&self) -> Result<bool, AppendError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::MarkClean { reply })
            .await
            .map_err(|_| AppendError::Stopped)?;
        rx.await.map_err(|_| AppendError::Stopped)?
    }
}

/// How often the checkpointer copies the WAL into the database file.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// The writer thread. Dropping every [`WriterHandle`] stops it; [`join`](Self::join) waits.
#[derive(Debug)]
pub struct GroupCommitWriter {
    thread: Option<JoinHandle<()>>,
    checkpointer: Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>,
}

impl GroupCommitWriter {
    /// Opens the buffer in `dir` and starts the writer thread.
    pub fn start(
        dir: &Path,
        durability: Durability,
        quota: u64,
        observer: Option<CommitObserver>,
    ) -> Result<(Self, WriterHandle)> {
        super::quarantine::quarantine_if_damaged(dir)?;
        let conn = super::open_writer(dir, durability)?;
        let (events, bytes) = super::totals(&conn)?;
        let state = Arc::new(BufferState::default());
        state.events.store(events, Ordering::Relaxed);
        state.bytes.store(bytes, Ordering::Relaxed);
        state.quota.store(quota, Ordering::Relaxed);
        state.oldest_ms.store(
            super::oldest_captured_at(&conn)?.unwrap_or(0),
            Ordering::Relaxed,
        );
        state
            .last_seq
            .store(super::last_seq(&conn)?, Ordering::Relaxed);
        update_over_quota(&state, true);
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let appended = Arc::new(Notify::new());
        let handle = WriterHandle {
            tx,
            state: state.clone(),
            appended: appended.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("buffer-writer".into())
            .spawn(move || run(conn, rx, state, appended, observer))
            .map_err(|source| Error::DataDir {
                path: dir.to_owned(),
                source,
            })?;
        let checkpointer = start_checkpointer(dir, durability)?;
        Ok((
            Self {
                thread: Some(thread),
                checkpointer: Some(checkpointer),
            },
            handle,
        ))
    }

    /// Waits for the thread to finish (after every handle is dropped).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some((stop, t)) = self.checkpointer.take() {
            drop(stop);
            let _ = t.join();
        }
    }
}

/// Runs passive WAL checkpoints on a connection of its own, so the writer's
/// commits (and so the acknowledgements) never pay for copying pages into
/// the database file. Passive checkpoints never block the writer.
fn start_checkpointer(
    dir: &Path,
    durability: Durability,
) -> Result<(std::sync::mpsc::Sender<()>, JoinHandle<()>)> {
    let conn = super::open_writer(dir, durability)?;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("buffer-checkpoint".into())
        .spawn(move || {
            // Wakes every interval until the sender is dropped.
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(CHECKPOINT_INTERVAL)
            {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "wal checkpoint failed");
                }
            }
        })
        .map_err(|source| Error::DataDir {
            path: dir.to_owned(),
            source,
        })?;
    Ok((stop, thread))
}

/// Unready from 95% of the quota or after a refusal; ready again only once
/// draining (`drained`) brought it under 90%, so a pod at its quota does not flap.
fn update_over_quota(state: &BufferState, drained: bool) {
    let quota = state.quota.load(Ordering::Relaxed);
    let bytes = state.bytes.load(Ordering::Relaxed);
    if bytes.saturating_mul(100) >= quota.saturating_mul(95) {
        state.over_quota.store(true, Ordering::Relaxed);
    } else if drained && bytes.saturating_mul(100) < quota.saturating_mul(90) {
        state.over_quota.store(false, Ordering::Relaxed);
    }
}

fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Command>,
    state: Arc<BufferState>,
    appended: Arc<Notify>,
    observer: Option<CommitObserver>,
) {
    let mut batch: Vec<Command> = Vec::with_capacity(256);
    // The file may carry a clean mark from the last shutdown.
    let mut marked_clean = true;
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        let mut bytes = 0u64;
        while batch.len() < MAX_COMMANDS_PER_COMMIT && bytes < MAX_BYTES_PER_COMMIT {
            match rx.try_recv() {
                Ok(cmd) => {
                    if let Command::Append { events, .. } = &cmd {
                        bytes += events.iter().map(NewEvent::size).sum::<u64>();
                    }
                    batch.push(cmd)
                }
                Err(_) => break,
            }
        }
        let n = batch.len();
        commit(&mut conn, &mut batch, &state, &appended, &mut marked_clean);
        if let Some(observe) = &observer {
            observe(n);
        }
    }
}

/// Outcome of one command inside a transaction, answered after the commit.
enum Pending {
    Append(
        oneshot::Sender<Result<i64, AppendError>>,
        Result<i64, AppendError>,
    ),
    Settle(oneshot::Sender<Result<(), AppendError>>),
    Clean(oneshot::Sender<Result<bool, AppendError>>, bool),
}

/// `marked_clean`: whether `meta` may hold a clean mark (so the first append
/// after it must remove it); spares every other commit that statement.
fn commit(
    conn: &mut Connection,
    batch: &mut Vec<Command>,
    state: &BufferState,
    appended: &Notify,
    marked_clean: &mut bool,
) {
    let quota = state.quota.load(Ordering::Relaxed);
    let mut bytes = state.bytes.load(Ordering::Relaxed) as i128;
    let mut events = state.events.load(Ordering::Relaxed) as i128;
    let was_empty = events == 0;
    let mut first_ms = None;
    let mut any_append = false;
    let mut settled = false;
    let mut last_seq = 0;
    let mut marked_clean_now = false;
    let mut pending = Vec::with_capacity(batch.len());
    let result = (|| -> rusqlite::Result<()> {
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO events(uuid, topic, key, payload, captured_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut delete = tx.prepare_cached("DELETE FROM events WHERE seq = ?1")?;
            let mut delete_through = tx.prepare_cached("DELETE FROM events WHERE seq <= ?1")?;
            let mut count_through =
                tx.prepare_cached("SELECT count(*) FROM events WHERE seq <= ?1")?;
            let mut bury = tx.prepare_cached(
                "INSERT OR REPLACE INTO dead_letters(seq, uuid, topic, key, payload, captured_at_ms, reason, failed_at_ms)
                 SELECT seq, uuid, topic, key, payload, captured_at_ms, ?2, ?3 FROM events WHERE seq = ?1",
            )?;
            for cmd in batch.drain(..) {
                match cmd {
                    Command::Append { events: evs, reply } => {
                        let needed: u64 = evs.iter().map(NewEvent::size).sum();
                        if bytes.max(0) as u64 + needed > quota {
                            state.over_quota.store(true, Ordering::Relaxed);
                            pending.push(Pending::Append(
                                reply,
                                Err(AppendError::QuotaExceeded {
                                    used: bytes.max(0) as u64,
                                    quota,
                                    needed,
                                }),
                            ));
                            continue;
                        }
                        let mut last = 0;
                        for e in &evs {
                            insert.execute(params![
                                e.uuid,
                                e.topic,
                                e.key,
                                e.payload,
                                e.captured_at_ms
                            ])?;
                            last = tx.last_insert_rowid();
                            first_ms.get_or_insert(e.captured_at_ms);
                        }
                        bytes += needed as i128;
                        events += evs.len() as i128;
                        last_seq = last;
                        any_append |= !evs.is_empty();
                        pending.push(Pending::Append(reply, Ok(last)));
                    }
                    Command::Settle {
                        delivered,
                        dead,
                        reply,
                    } => {
                        let failed_at = now_ms();
                        for (seq, size, reason) in &dead {
                            bury.execute(params![seq, reason, failed_at])?;
                            if delete.execute([seq])? == 1 {
                                bytes -= *size as i128;
                                events -= 1;
                            }
                        }
                        // The forwarder reads the oldest events in order, so when a
                        // whole batch is settled one range delete replaces a delete per row.
                        let through = delivered.iter().map(|(seq, _)| *seq).max().unwrap_or(0);
                        let whole_head = through > 0
                            && delivered.len() as i128
                                == count_through.query_row([through], |r| r.get::<_, i64>(0))?
                                    as i128;
                        if whole_head {
                            let n = delete_through.execute([through])?;
                            events -= n as i128;
                            bytes -= delivered
                                .iter()
                                .map(|(_, size)| *size as i128)
                                .sum::<i128>();
                        } else {
                            for (seq, size) in &delivered {
                                if delete.execute([seq])? == 1 {
                                    bytes -= *size as i128;
                                    events -= 1;
                                }
                            }
                        }
                        settled = true;
                        pending.push(Pending::Settle(reply));
                    }
                    Command::MarkClean { reply } => {
                        let empty = events == 0;
                        if empty {
                            marked_clean_now = true;
                            tx.execute(
                                "INSERT OR REPLACE INTO meta(key, value) VALUES ('clean_at_ms', ?1)",
                                [now_ms().to_string()],
                            )?;
                        }
                        pending.push(Pending::Clean(reply, empty));
                    }
                }
            }
            if any_append && (*marked_clean || marked_clean_now) {
                // Appending makes the volume dirty again.
                tx.execute("DELETE FROM meta WHERE key = 'clean_at_ms'", [])?;
            }
        }
        tx.commit()
    })();
    match result {
        Ok(()) => {
            // Conservative: true whenever a mark may exist.
            *marked_clean = marked_clean_now || (*marked_clean && !any_append);
            state.disk_failed.store(false, Ordering::Relaxed);
            state.bytes.store(bytes.max(0) as u64, Ordering::Relaxed);
            state.events.store(events.max(0) as u64, Ordering::Relaxed);
            if events <= 0 {
                state.oldest_ms.store(0, Ordering::Relaxed);
            } else if was_empty {
                state
                    .oldest_ms
                    .store(first_ms.unwrap_or_else(now_ms), Ordering::Relaxed);
            } else if settled && let Ok(Some(oldest)) = super::oldest_captured_at(conn) {
                // Only deletes can move the oldest event.
                state.oldest_ms.store(oldest, Ordering::Relaxed);
            }
            if last_seq > 0 {
                state.last_seq.store(last_seq, Ordering::Relaxed);
            }
            update_over_quota(state, settled);
            for p in pending {
                match p {
                    Pending::Append(reply, r) => {
                        let _ = reply.send(r);
                    }
                    Pending::Settle(reply) => {
                        let _ = reply.send(Ok(()));
                    }
                    Pending::Clean(reply, empty) => {
                        let _ = reply.send(Ok(empty));
                    }
                }
            }
            if any_append {
                appended.notify_one();
            }
        }
        Err(e) => {
            tracing::error!(error = %e, commands = pending.len() + batch.len(), "buffer commit failed");
            state.disk_failed.store(true, Ordering::Relaxed);
            let err = AppendError::Disk(e.to_string());
            // Commands not reached before the failure are answered too.
            for cmd in batch.drain(..) {
                match cmd {
                    Command::Append { reply, .. } => {
                        let _ = reply.send(Err(err.clone()));
                    }
                    Command::Settle { reply, .. } => {
                        let _ = reply.send(Err(err.clone()));
                    }
                    Command::MarkClean { reply } => {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            }
            for p in pending {
                match p {
                    Pending::Append(reply, _) => {
                        let _ = reply.send(Err(err.clone()));
                    }
                    Pending::Settle(reply) => {
                        let _ = reply.send(Err(err.clone()));
                    }
                    Pending::Clean(reply, _) => {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            }
        }
    }
}
