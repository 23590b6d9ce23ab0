//! The group-commit writer: a dedicated thread owning the only write
//! connection. It takes every command waiting when it is free, applies them in
//! one transaction, commits (one fsync for all of them) and only then answers
//! each command. A failed commit fails every command in it, and none of their
//! events is kept: a request is all or nothing.
//!
//! Settlements (deleting what Kafka took) commit in a transaction of their own,
//! before the appends of the same round: clients retrying against a full disk
//! can never roll back the deletes that are the only way out of it. While the
//! disk is failed, appends are refused at once, without touching SQLite,
//! except for one probe per [`DISK_PROBE_INTERVAL`]; a settlement that commits
//! (space was freed) or a probe that commits ends the failure.
//!
//! [`WriterHandle::seal`] makes "clean" final: from the moment the writer
//! handles it, every later append is refused, so an emptiness check that
//! passed stays true.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot};

use super::census;
use super::commit::{self, Command, DeadLetter};
use super::wal::Checkpointer;
use super::{Error, NewEvent, Result};
use crate::config::Durability;

/// Most commands applied in one transaction.
const MAX_COMMANDS_PER_COMMIT: usize = 4096;
/// Most event bytes applied in one transaction (keeps a commit's latency bounded).
const MAX_BYTES_PER_COMMIT: u64 = 32 << 20;
/// Bounded queue in front of the writer: producers wait when it is full.
const CHANNEL_CAPACITY: usize = 8192;
/// While the disk is failed, at most one append transaction per interval.
pub const DISK_PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Why an append (or another write) was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AppendError {
    /// The buffer would exceed its quota; retrying later may succeed.
    #[error("buffer quota exceeded: {used} of {quota} bytes used, request needs {needed}")]
    QuotaExceeded { used: u64, quota: u64, needed: u64 },
    /// The request alone is larger than the whole quota: no retry can succeed.
    #[error("request needs {needed} bytes, more than the whole buffer quota of {quota}")]
    LargerThanQuota { quota: u64, needed: u64 },
    /// The volume is nearly full: the room left is kept for deleting what
    /// Kafka took; retrying once delivery freed space succeeds.
    #[error(
        "the volume is nearly full: {keep_free} bytes are kept free for delivery; retry once events are delivered"
    )]
    DiskFull { keep_free: u64 },
    /// The commit failed (disk full, I/O error), or the disk is known failed.
    #[error("buffer commit failed: {0}")]
    Disk(String),
    /// The commit did not finish within the commit timeout (a hung disk).
    #[error("buffer commit did not finish within {0:?}")]
    Stalled(Duration),
    /// The buffer was sealed for shutdown: it takes no more events.
    #[error("buffer is sealed for shutdown")]
    Sealed,
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
    /// Dead letters kept in the buffer (not yet copied to the dead-letter topic).
    pub dead_letters: AtomicU64,
    /// Bytes of those dead letters (they count against the quota too).
    pub dead_bytes: AtomicU64,
    /// Bytes of the deduplication window: uuids remembered as delivered
    /// (they count against the quota too; see [`super::dedup`]).
    pub window_bytes: AtomicU64,
    /// Capture time of the oldest waiting event (ms), 0 when empty.
    pub oldest_ms: AtomicI64,
    /// Highest sequence number committed.
    pub last_seq: AtomicI64,
    /// At or near the quota (unready).
    pub over_quota: AtomicBool,
    /// The last commit failed (unready).
    pub disk_failed: AtomicBool,
    /// Appends were refused for room on the volume (unready until there is room again).
    pub disk_low: AtomicBool,
    /// A commit took longer than the commit timeout (unready until one finishes).
    pub commit_stalled: AtomicBool,
    /// Sealed for shutdown: appends are refused.
    pub sealed: AtomicBool,
    /// Quota in bytes.
    pub quota: AtomicU64,
}

impl BufferState {
    /// Bytes counted against the quota: waiting events, kept dead letters
    /// and the deduplication window.
    pub fn used_bytes(&self) -> u64 {
        self.held_bytes() + self.window_bytes.load(Ordering::Relaxed)
    }

    /// The part of [`used_bytes`](Self::used_bytes) only delivery frees:
    /// events and dead letters. The window gives way to them, so admission
    /// and readiness go by this.
    pub fn held_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed) + self.dead_bytes.load(Ordering::Relaxed)
    }
}

/// Observer of each successful commit, for metrics: commands in it.
pub type CommitObserver = Box<dyn Fn(usize) + Send + 'static>;

/// What [`WriterHandle::seal`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealReport {
    /// Events still waiting for Kafka.
    pub events: u64,
    /// Dead letters not yet copied to the dead-letter topic.
    pub dead_letters: u64,
    /// Whether the buffer was marked clean (nothing left, nothing quarantined).
    pub clean: bool,
}

/// Cheap handle used to submit commands to the writer.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Command>,
    /// Live figures.
    pub state: Arc<BufferState>,
    /// Notified after every commit that appended events.
    pub appended: Arc<Notify>,
    commit_timeout: Duration,
}

impl std::fmt::Debug for WriterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterHandle").finish_non_exhaustive()
    }
}

impl WriterHandle {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, AppendError>>) -> Command,
    ) -> Result<T, AppendError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| AppendError::Stopped)?;
        match rx.await {
            Ok(answer) => answer,
            // The writer still runs but dropped the reply: the command failed
            // half-way through its transaction (the error is in its log).
            Err(_) if !self.tx.is_closed() => Err(AppendError::Disk(
                "the buffer's commit failed; see the capture log".into(),
            )),
            Err(_) => Err(AppendError::Stopped),
        }
    }

    /// Appends a request's events; resolves once they are committed (and fsynced
    /// in `fsync` mode). Returns the last sequence number assigned (0 when
    /// every event was a duplicate: see [`super::dedup`]).
    ///
    /// Events whose uuid is already buffered, or was delivered within the
    /// deduplication window, or repeats an earlier event of the same request,
    /// are not stored again; the request still succeeds as a whole, exactly
    /// as the first time.
    ///
    /// Gives up with [`AppendError::Stalled`] after the commit timeout (a hung
    /// disk): the events may still be committed later, so the client's retry
    /// can produce a duplicate (same uuid), never a loss.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<i64, AppendError> {
        // The writer thread, the bottleneck under batches, only lets go of
        // its reference; the events are freed here, once answered.
        let events = Arc::new(events);
        let keep = events.clone();
        let answer = tokio::time::timeout(
            self.commit_timeout,
            self.call(|reply| Command::Append { events, reply }),
        )
        .await;
        drop(keep);
        match answer {
            Ok(r) => r,
            Err(_) => {
                if !self.state.commit_stalled.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        timeout_ms = self.commit_timeout.as_millis() as u64,
                        "buffer commit is stalled (hung disk?); unready until a commit finishes"
                    );
                }
                Err(AppendError::Stalled(self.commit_timeout))
            }
        }
    }

    /// Deletes delivered events and moves dead ones (with reason) to dead letters,
    /// atomically. Each delivered entry is `(seq, size)`.
    pub async fn settle(
        &self,
        delivered: Vec<(i64, u64)>,
        dead: Vec<DeadLetter>,
    ) -> Result<(), AppendError> {
        self.call(|reply| Command::Settle {
            delivered,
            dead,
            reply,
        })
        .await
    }

    /// Forgets dead letters that the dead-letter topic now holds.
    pub async fn dead_letters_copied(&self, seqs: Vec<i64>) -> Result<(), AppendError> {
        self.call(|reply| Command::DeadLettersCopied { seqs, reply })
            .await
    }

    /// Deletes the given dead letters (after an export the operator asked to delete).
    pub async fn delete_dead_letters(&self, seqs: Vec<i64>) -> Result<(), AppendError> {
        self.dead_letters_copied(seqs).await
    }

    /// Moves dead letters back into the queue (new sequence numbers, same
    /// uuids); returns how many moved.
    pub async fn replay_dead_letters(&self, seqs: Vec<i64>) -> Result<u64, AppendError> {
        self.call(|reply| Command::Replay { seqs, reply }).await
    }

    /// While appends are refused for room on the volume, measures it again
    /// (readiness comes back once there is room, without an append).
    pub async fn recheck_room(&self) -> Result<(), AppendError> {
        self.call(|reply| Command::Recheck { reply }).await
    }

    /// Seals the buffer for shutdown: from here on every append is refused.
    /// Then, if nothing is left (no events, no dead letters waiting for the
    /// dead-letter topic, and `quarantined` is false), records a clean mark.
    /// Because appends are refused first, a clean report stays true.
    pub async fn seal(&self, quarantined: bool) -> Result<SealReport, AppendError> {
        self.call(|reply| Command::Seal { quarantined, reply })
            .await
    }
}

/// The writer thread. Dropping every [`WriterHandle`] stops it; [`join`](Self::join) waits.
#[derive(Debug)]
pub struct GroupCommitWriter {
    thread: Option<JoinHandle<()>>,
    checkpointer: Option<Checkpointer>,
}

/// How the writer is opened.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// `fsync` or `os`.
    pub durability: Durability,
    /// Quota in bytes (events and dead letters).
    pub quota: u64,
    /// How long an append may wait for its commit before answering `Stalled`.
    pub commit_timeout: Duration,
    /// Keep the WAL under this many bytes by checkpointing (0: SQLite's
    /// default policy of this crate, 2000 pages). Set it under the disk
    /// reserve: on a full disk, releasing the reserve must leave room for a
    /// checkpoint to complete, or the WAL never restarts and no delete can
    /// ever commit.
    pub max_wal_bytes: u64,
    /// Appends are refused when they would leave less than this much free on
    /// the volume past what a checkpoint needs (0: no check). See [`super::room`].
    pub keep_free_bytes: u64,
    /// How long a delivered uuid is remembered to acknowledge retries
    /// without storing them again (zero: no deduplication at all). See
    /// [`super::dedup`].
    pub dedup_window: Duration,
}

impl WriterOptions {
    /// Options for tools that only drain (`flush`, dead-letter commands): no quota.
    pub fn drain(durability: Durability) -> Self {
        Self {
            durability,
            quota: u64::MAX,
            commit_timeout: Duration::from_secs(3600),
            max_wal_bytes: 0,
            keep_free_bytes: 0,
            // Deliveries by a flush keep the window a returning pod relies on.
            dedup_window: super::dedup::DEFAULT_WINDOW,
        }
    }
}

impl GroupCommitWriter {
    /// Opens the buffer in `dir` and starts the writer thread.
    pub fn start(
        dir: &Path,
        durability: Durability,
        quota: u64,
        observer: Option<CommitObserver>,
    ) -> Result<(Self, WriterHandle)> {
        Self::start_with(
            dir,
            WriterOptions {
                durability,
                quota,
                commit_timeout: Duration::from_secs(10),
                max_wal_bytes: 0,
                keep_free_bytes: 0,
                dedup_window: super::dedup::DEFAULT_WINDOW,
            },
            observer,
        )
    }

    /// Opens the buffer in `dir` with `opts` and starts the writer thread.
    pub fn start_with(
        dir: &Path,
        opts: WriterOptions,
        observer: Option<CommitObserver>,
    ) -> Result<(Self, WriterHandle)> {
        // The census is taken beside the integrity check, and kept only if
        // the file it counted proved sound (see `census`).
        let (_, ahead) =
            super::quarantine::quarantine_if_damaged_beside(dir, || census::take_read_only(dir))?;
        let conn = super::open_writer(dir, opts.durability)?;
        let census = match ahead {
            Some(Ok(census)) => census,
            // Quarantined, missing, or not countable read-only: count the
            // file the writer starts with.
            _ => census::take(&conn)?,
        };
        let state = Arc::new(BufferState::default());
        state.events.store(census.events, Ordering::Relaxed);
        state.bytes.store(census.bytes, Ordering::Relaxed);
        state
            .dead_letters
            .store(census.dead_letters, Ordering::Relaxed);
        state.dead_bytes.store(census.dead_bytes, Ordering::Relaxed);
        state
            .window_bytes
            .store(census.window_bytes, Ordering::Relaxed);
        state.quota.store(opts.quota, Ordering::Relaxed);
        state.oldest_ms.store(census.oldest_ms, Ordering::Relaxed);
        state.last_seq.store(census.last_seq, Ordering::Relaxed);
        commit::update_over_quota(&state, false);
        let window = super::dedup::Window::over_table(opts.dedup_window);
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let appended = Arc::new(Notify::new());
        let handle = WriterHandle {
            tx,
            state: state.clone(),
            appended: appended.clone(),
            commit_timeout: opts.commit_timeout,
        };
        let path = dir.join(super::DB_FILE);
        let (checkpointer, wal) = Checkpointer::start(dir, opts.durability, opts.max_wal_bytes)?;
        let thread = std::thread::Builder::new()
            .name("buffer-writer".into())
            .spawn(move || {
                let session = commit::Session::new(
                    conn,
                    path,
                    opts.durability,
                    wal,
                    opts.keep_free_bytes,
                    window,
                    state.clone(),
                );
                run(session, rx, state, appended, observer)
            })
            .map_err(|source| Error::DataDir {
                path: dir.to_owned(),
                source,
            })?;
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
        if let Some(checkpointer) = self.checkpointer.take() {
            checkpointer.join();
        }
    }
}

fn run(
    mut session: commit::Session,
    mut rx: mpsc::Receiver<Command>,
    state: Arc<BufferState>,
    appended: Arc<Notify>,
    observer: Option<CommitObserver>,
) {
    let mut last_probe: Option<Instant> = None;
    let mut batch: Vec<Command> = Vec::with_capacity(256);
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
        // While the disk is failed, appends are refused without a transaction,
        // but one round per interval probes whether it works again, unless
        // the forwarder's deletes failed lately: the space they need (the
        // released reserve, freed pages) must not go to new events first.
        let settling_blocked = session
            .settle_failed_at
            .is_some_and(|t| t.elapsed() < DISK_PROBE_INTERVAL * 4);
        let refuse_appends = state.disk_failed.load(Ordering::Relaxed)
            && (settling_blocked || last_probe.is_some_and(|t| t.elapsed() < DISK_PROBE_INTERVAL));
        if state.disk_failed.load(Ordering::Relaxed) && !refuse_appends {
            last_probe = Some(Instant::now());
        }
        let outcome = session.apply(&mut batch, refuse_appends);
        if outcome.appended {
            appended.notify_one();
        }
        session.checkpoint_if_due();
        if outcome.committed > 0
            && let Some(observe) = &observer
        {
            observe(outcome.committed);
        }
    }
}
