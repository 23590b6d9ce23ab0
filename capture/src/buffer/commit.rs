//! One round of the group-commit writer: the commands it took, applied in at
//! most two transactions, then answered. Settlements (and dead-letter
//! bookkeeping) commit first, on their own and without an fsync; appends,
//! replays and the seal commit second, synced. Nothing is answered before
//! its transaction committed.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::dedup::Window;
use super::room::{self, DiskGuard, Room};
use super::wal::WalWatch;
use super::writer::{AppendError, BufferState, SealReport};
use super::{NewEvent, now_ms};
use crate::config::Durability;

mod insert;
mod settle;
mod totals;
use settle::{answers_unexpected, apply_settlements, fail_rest};
use totals::Totals;
pub(super) use totals::update_over_quota;

/// An event Kafka rejected for good, on its way to the dead-letter table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its buffer sequence number.
    pub seq: i64,
    /// Its size ([`NewEvent::size`]).
    pub size: u64,
    /// Why Kafka rejected it.
    pub reason: String,
}

type Reply<T> = oneshot::Sender<Result<T, AppendError>>;

/// A request to the writer thread.
pub(super) enum Command {
    Append {
        /// Shared with the caller, who frees them (see `WriterHandle::append`).
        events: Arc<Vec<NewEvent>>,
        reply: Reply<i64>,
    },
    Settle {
        delivered: Vec<(i64, u64)>,
        dead: Vec<DeadLetter>,
        reply: Reply<()>,
    },
    DeadLettersCopied {
        seqs: Vec<i64>,
        reply: Reply<()>,
    },
    Replay {
        seqs: Vec<i64>,
        reply: Reply<u64>,
    },
    Seal {
        quarantined: bool,
        reply: Reply<SealReport>,
    },
    /// Re-measures the volume's room while appends are refused for it (an
    /// unready pod gets no appends that would do it), with a tiny write so
    /// a checkpointed WAL restarts and its space counts as reusable.
    Recheck {
        reply: Reply<()>,
    },
}

impl Command {
    fn is_settlement(&self) -> bool {
        matches!(
            self,
            Command::Settle { .. } | Command::DeadLettersCopied { .. }
        )
    }

    fn fail(self, err: &AppendError) {
        match self {
            Command::Append { reply, .. } => drop(reply.send(Err(err.clone()))),
            Command::Settle { reply, .. } | Command::DeadLettersCopied { reply, .. } => {
                drop(reply.send(Err(err.clone())))
            }
            Command::Replay { reply, .. } => drop(reply.send(Err(err.clone()))),
            Command::Seal { reply, .. } => drop(reply.send(Err(err.clone()))),
            Command::Recheck { reply } => drop(reply.send(Err(err.clone()))),
        }
    }
}

/// An answer held back until its transaction commits.
enum Answer {
    Seq(Reply<i64>, Result<i64, AppendError>),
    Unit(Reply<()>),
    Count(Reply<u64>, Result<u64, AppendError>),
    Seal(Reply<SealReport>, SealReport),
}

impl Answer {
    fn send(self) {
        match self {
            Answer::Seq(r, v) => drop(r.send(v)),
            Answer::Unit(r) => drop(r.send(Ok(()))),
            Answer::Count(r, n) => drop(r.send(n)),
            Answer::Seal(r, s) => drop(r.send(Ok(s))),
        }
    }

    fn fail(self, err: &AppendError) {
        match self {
            Answer::Seq(r, _) => drop(r.send(Err(err.clone()))),
            Answer::Unit(r) => drop(r.send(Err(err.clone()))),
            Answer::Count(r, _) => drop(r.send(Err(err.clone()))),
            Answer::Seal(r, _) => drop(r.send(Err(err.clone()))),
        }
    }
}

/// What one round did.
pub(super) struct Outcome {
    /// Events were appended (the forwarder has work).
    pub appended: bool,
    /// Commands in transactions that committed.
    pub committed: usize,
}

/// Room (beyond what the volume guard keeps free) a pod refused for room
/// needs before it turns ready again: a drained buffer reuses its own free
/// pages and WAL, so this is about what the next requests need, not the disk.
const READY_ROOM: u64 = 256 << 10;

/// The writer's connection and what it remembers between rounds.
pub(super) struct Session {
    conn: Option<Connection>,
    path: PathBuf,
    durability: Durability,
    wal: WalWatch,
    guard: DiskGuard,
    window: Window,
    state: Arc<BufferState>,
    /// `meta` may hold a clean mark, so the next append must remove it.
    marked_clean: bool,
    /// When a settlement last failed: while the forwarder fights for space
    /// to delete what Kafka took, appends must not take that space first.
    pub(super) settle_failed_at: Option<std::time::Instant>,
}

impl Session {
    pub(super) fn new(
        conn: Connection,
        path: PathBuf,
        durability: Durability,
        wal: WalWatch,
        keep_free: u64,
        window: Window,
        state: Arc<BufferState>,
    ) -> Self {
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        let guard = DiskGuard::new(dir, keep_free, wal.frames());
        let mut session = Self {
            conn: None,
            path,
            durability,
            wal,
            guard,
            window,
            state,
            marked_clean: true,
            settle_failed_at: None,
        };
        session.conn = session.watched(conn);
        session
    }

    /// The connection with the WAL hook installed; `None` (reopened on use)
    /// if that failed.
    fn watched(&self, mut conn: Connection) -> Option<Connection> {
        match self.wal.install(&mut conn) {
            Ok(()) => Some(conn),
            Err(e) => {
                tracing::error!(error = %e, "could not watch the buffer's WAL");
                None
            }
        }
    }

    /// After an I/O error the connection is reopened before it is used again:
    /// SQLite may hold file handles or state that a remount made stale.
    fn connection(&mut self) -> Result<&mut Connection, AppendError> {
        if self.conn.is_none() {
            let dir = self.path.parent().unwrap_or(std::path::Path::new("."));
            let conn = super::open_writer(dir, self.durability)
                .map_err(|e| AppendError::Disk(e.to_string()))?;
            self.conn = self.watched(conn);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| AppendError::Disk("the buffer could not be reopened".into()))
    }

    fn failed(&mut self, e: &rusqlite::Error, commands: usize, what: &str) -> AppendError {
        tracing::error!(error = %e, commands, "buffer {what} commit failed");
        self.guard.forget();
        self.state.disk_failed.store(true, Ordering::Relaxed);
        let full = matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DiskFull));
        if !full {
            self.conn = None;
        } else if let Some(freed) = self.path.parent().and_then(super::release_reserve) {
            // The forwarder does the same when a settlement fails; a commit
            // of the writer's own (a recheck, an append the guard let
            // through) failing for room is as much a sign of a full volume.
            tracing::warn!(
                bytes = freed,
                "released the disk reserve: the volume is full"
            );
        }
        AppendError::Disk(e.to_string())
    }

    /// Checkpoints before a commit while the volume is (nearly) full, and
    /// after a round once the WAL reached its limit (see [`super::wal`]).
    fn checkpoint_when_low(&self) {
        let low = self.state.disk_low.load(Ordering::Relaxed)
            || self.state.disk_failed.load(Ordering::Relaxed);
        self.wal.checkpoint_when(low, self.conn.as_ref());
    }

    pub(super) fn checkpoint_if_due(&self) {
        self.wal.checkpoint_if_due(self.conn.as_ref());
    }

    /// Unready once an append was refused for room on the volume; ready again
    /// only when another [`READY_ROOM`] bytes of events would fit, so a pod
    /// at the edge does not flap.
    fn update_disk_low(&self, refused: bool, mut room_left: Room) {
        if refused {
            if !self.state.disk_low.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    keep_free = self.guard.keep_free(),
                    "the volume is nearly full: refusing events until delivery frees space"
                );
            }
        } else if self.state.disk_low.load(Ordering::Relaxed)
            && room_left.take(room::Cost::both(READY_ROOM))
        {
            self.state.disk_low.store(false, Ordering::Relaxed);
            tracing::info!("room on the volume again: accepting events");
        }
    }

    fn committed(&self, refused: bool) {
        self.state.disk_failed.store(false, Ordering::Relaxed);
        self.state.commit_stalled.store(false, Ordering::Relaxed);
        update_over_quota(&self.state, refused);
    }

    /// Applies `batch` (drained): settlements in one transaction, then the rest.
    /// With `refuse_appends` (disk known failed), appends fail without a try.
    pub(super) fn apply(&mut self, batch: &mut Vec<Command>, refuse_appends: bool) -> Outcome {
        let (settlements, rest): (Vec<Command>, Vec<Command>) =
            batch.drain(..).partition(Command::is_settlement);
        let mut outcome = Outcome {
            appended: false,
            committed: 0,
        };
        if !settlements.is_empty() {
            let n = settlements.len();
            if self.settle(settlements) {
                outcome.committed += n;
            }
        }
        if !rest.is_empty() {
            let n = rest.len();
            let (ok, appended) = self.append(rest, refuse_appends);
            outcome.appended = appended;
            if ok {
                outcome.committed += n;
            }
        }
        outcome
    }

    fn settle(&mut self, commands: Vec<Command>) -> bool {
        let state = self.state.clone();
        let mut t = Totals::read(&state);
        let mut answers = Vec::with_capacity(commands.len());
        let mut deleted_any = false;
        let window = self.window.clone();
        let durability = self.durability;
        self.checkpoint_when_low();
        let result = match self.connection() {
            Err(e) => Err(e),
            Ok(conn) => {
                let settled = settle::Settled {
                    quota: state.quota.load(Ordering::Relaxed),
                    totals: &mut t,
                    answers: &mut answers,
                    deleted_any: &mut deleted_any,
                };
                let (result, restored) = settle::unsynced(conn, durability, |conn| {
                    apply_settlements(conn, commands, &window, settled)
                });
                if !restored {
                    self.conn = None;
                }
                result.map_err(|(e, n)| self.failed(&e, n, "settlement"))
            }
        };
        self.settle_failed_at = result.is_err().then(std::time::Instant::now);
        match result {
            Ok(()) => {
                self.window.committed();
                t.store(&state);
                if t.events <= 0 {
                    state.oldest_ms.store(0, Ordering::Relaxed);
                } else if deleted_any
                    && let Some(conn) = &self.conn
                    && let Ok(Some(oldest)) = super::oldest_captured_at(conn)
                {
                    state.oldest_ms.store(oldest, Ordering::Relaxed);
                }
                self.committed(false);
                answers.into_iter().for_each(Answer::send);
                true
            }
            Err(err) => {
                self.window.rolled_back();
                answers.into_iter().for_each(|a| a.fail(&err));
                false
            }
        }
    }

    /// Returns (committed, appended events).
    fn append(&mut self, commands: Vec<Command>, refuse_appends: bool) -> (bool, bool) {
        let state = self.state.clone();
        let mut t = Totals::read(&state);
        let was_empty = t.events == 0;
        let mut answers = Vec::with_capacity(commands.len());
        let mut round = AppendRound::default();
        let marked_clean = self.marked_clean;
        let mut room = Room::unlimited();
        round.prune = self.window.append_prune_due();
        let window = self.window.clone();
        self.checkpoint_when_low();
        let result = match self.connection().map(|_| ()) {
            Err(e) => Err(e),
            Ok(()) => {
                let conn = self.conn.as_mut().expect("connection opened above");
                if !refuse_appends {
                    room = self.guard.measure(conn);
                }
                apply_appends(
                    conn,
                    commands,
                    &window,
                    &state,
                    refuse_appends,
                    marked_clean,
                    &mut t,
                    &mut answers,
                    &mut round,
                    &mut room,
                )
                .map_err(|(e, n)| self.failed(&e, n, "append"))
            }
        };
        if result.is_ok() && !refuse_appends {
            self.guard.left(room);
        }
        match result {
            Ok(()) => {
                self.window.committed();
                // Conservative: true whenever a mark may exist.
                self.marked_clean = round.marked_clean_now || (marked_clean && !round.appended);
                t.store(&state);
                if t.events <= 0 {
                    state.oldest_ms.store(0, Ordering::Relaxed);
                } else if was_empty {
                    state
                        .oldest_ms
                        .store(round.first_ms.unwrap_or_else(now_ms), Ordering::Relaxed);
                }
                if round.last_seq > 0 {
                    state.last_seq.store(round.last_seq, Ordering::Relaxed);
                }
                if round.wrote {
                    self.committed(round.refused_for_room);
                } else {
                    update_over_quota(&state, round.refused_for_room);
                }
                if !refuse_appends {
                    self.update_disk_low(round.refused_for_disk, room);
                }
                answers.into_iter().for_each(Answer::send);
                (true, round.appended)
            }
            Err(err) => {
                self.window.rolled_back();
                answers.into_iter().for_each(|a| a.fail(&err));
                (false, false)
            }
        }
    }
}

#[derive(Default)]
struct AppendRound {
    first_ms: Option<i64>,
    last_seq: i64,
    appended: bool,
    marked_clean_now: bool,
    /// Something was written (so a commit happened, proving the disk works).
    wrote: bool,
    /// An append was refused because the quota had no room left for it.
    refused_for_room: bool,
    /// An append was refused because the volume had no room left for it.
    refused_for_disk: bool,
    /// Expired uuids of the deduplication window are pruned in this round.
    prune: bool,
}

#[allow(clippy::too_many_arguments)]
fn apply_appends(
    conn: &mut Connection,
    commands: Vec<Command>,
    window: &Window,
    state: &BufferState,
    refuse_appends: bool,
    marked_clean: bool,
    t: &mut Totals,
    answers: &mut Vec<Answer>,
    round: &mut AppendRound,
    room: &mut Room,
) -> Result<(), (rusqlite::Error, usize)> {
    let n = commands.len();
    let quota = state.quota.load(Ordering::Relaxed);
    let keep_free = room.keep_free;
    let mut commands = commands.into_iter();
    let now = now_ms();
    let result = (|| -> rusqlite::Result<()> {
        // Before the transaction: the index is built from what committed.
        window.ensure_loaded(conn)?;
        // Immediate: the write lock is taken (waiting out the busy timeout) before
        // the first read, which a deferred transaction could not upgrade later.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if round.prune && !refuse_appends {
            let freed = window.prune(&tx, 0, now)?;
            t.window_bytes -= freed as i128;
            round.wrote |= freed > 0;
        }
        {
            let mut revive = tx.prepare_cached(
                "INSERT INTO events(uuid, topic, key, payload, captured_at_ms)
                 SELECT uuid, topic, key, payload, captured_at_ms FROM dead_letters WHERE seq = ?1",
            )?;
            let mut forget = tx.prepare_cached(
                "DELETE FROM dead_letters WHERE seq = ?1
                 RETURNING length(payload) + length(key) + length(uuid) + length(topic), captured_at_ms",
            )?;
            for cmd in commands.by_ref() {
                match cmd {
                    Command::Append { events, reply } => {
                        // Duplicates are acknowledged with the rest, not stored.
                        let dup = if state.sealed.load(Ordering::Relaxed) || refuse_appends {
                            vec![false; events.len()]
                        } else {
                            window.duplicates(&tx, &events, now, t.dead > 0)?
                        };
                        let fresh = || {
                            events
                                .iter()
                                .zip(&dup)
                                .filter(|(_, d)| !**d)
                                .map(|(e, _)| e)
                        };
                        let needed: u64 = fresh().map(NewEvent::size).sum();
                        let refusal = if state.sealed.load(Ordering::Relaxed) {
                            Some(AppendError::Sealed)
                        } else if refuse_appends {
                            Some(AppendError::Disk(
                                "the disk failed; waiting for it to recover".into(),
                            ))
                        } else if needed == 0 {
                            // Nothing new: acknowledged even at the quota.
                            None
                        } else if needed > quota {
                            Some(AppendError::LargerThanQuota { quota, needed })
                        } else if t.held() + needed > quota {
                            Some(AppendError::QuotaExceeded {
                                used: t.held(),
                                quota,
                                needed,
                            })
                        } else if !room.take(room::cost(&events, t.events.max(0) as u64)) {
                            Some(AppendError::DiskFull { keep_free })
                        } else {
                            None
                        };
                        round.refused_for_room |=
                            matches!(refusal, Some(AppendError::QuotaExceeded { .. }));
                        round.refused_for_disk |=
                            matches!(refusal, Some(AppendError::DiskFull { .. }));
                        if let Some(err) = refusal {
                            answers.push(Answer::Seq(reply, Err(err)));
                            continue;
                        }
                        // Remembered uuids give way to new events.
                        t.bytes += needed as i128;
                        t.fit_window(window, &tx, quota)?;
                        let fresh: Vec<&NewEvent> = fresh().collect();
                        let (stored, last) = insert::insert(&tx, &fresh)?;
                        if let Some(e) = fresh.first() {
                            round.first_ms.get_or_insert(e.captured_at_ms);
                        }
                        t.events += stored as i128;
                        if last > 0 {
                            round.last_seq = last;
                        }
                        round.appended |= stored > 0;
                        round.wrote |= stored > 0 || events.is_empty();
                        answers.push(Answer::Seq(reply, Ok(last)));
                    }
                    Command::Replay { seqs, reply } => {
                        if state.sealed.load(Ordering::Relaxed) {
                            answers.push(Answer::Count(reply, Err(AppendError::Sealed)));
                            continue;
                        }
                        let mut moved = 0u64;
                        for seq in &seqs {
                            if revive.execute([seq])? == 1 {
                                let (size, captured): (i64, i64) =
                                    forget.query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))?;
                                round.last_seq = tx.last_insert_rowid();
                                round.first_ms.get_or_insert(captured);
                                t.dead -= 1;
                                t.dead_bytes -= size as i128;
                                t.events += 1;
                                t.bytes += size as i128;
                                moved += 1;
                            }
                        }
                        round.appended |= moved > 0;
                        round.wrote = true;
                        answers.push(Answer::Count(reply, Ok(moved)));
                    }
                    Command::Recheck { reply } => {
                        if state.disk_low.load(Ordering::Relaxed)
                            && !state.sealed.load(Ordering::Relaxed)
                        {
                            tx.execute(
                                "INSERT OR REPLACE INTO meta(key, value) VALUES ('room_checked_ms', ?1)",
                                [now_ms().to_string()],
                            )?;
                            round.wrote = true;
                        }
                        answers.push(Answer::Unit(reply));
                    }
                    Command::Seal { quarantined, reply } => {
                        // From here on (this round included) every append is refused.
                        state.sealed.store(true, Ordering::SeqCst);
                        let clean = t.events <= 0 && t.dead <= 0 && !quarantined;
                        if clean {
                            round.marked_clean_now = true;
                            round.wrote = true;
                            tx.execute(
                                "INSERT OR REPLACE INTO meta(key, value) VALUES ('clean_at_ms', ?1)",
                                [now_ms().to_string()],
                            )?;
                        }
                        let report = SealReport {
                            events: t.events.max(0) as u64,
                            dead_letters: t.dead.max(0) as u64,
                            clean,
                        };
                        answers.push(Answer::Seal(reply, report));
                    }
                    other => answers_unexpected(other),
                }
            }
            if round.appended && marked_clean {
                // New events make the volume dirty again.
                tx.execute("DELETE FROM meta WHERE key = 'clean_at_ms'", [])?;
            }
        }
        tx.commit()
    })();
    fail_rest(result, commands, n)
}
