//! The settlement transaction: deletes what Kafka took (remembering its
//! uuids in the deduplication window, in the same transaction), buries what
//! it refused for good, forgets dead letters the dead-letter topic holds, and
//! prunes a bounded chunk of expired uuids.

use std::collections::HashSet;

use rusqlite::{Connection, params};

use super::{Answer, AppendError, Command, Totals, Window};
use crate::buffer::now_ms;

/// What a settlement transaction reports back to its session.
pub(super) struct Settled<'a> {
    /// The buffer's quota: remembered uuids past it are forgotten early.
    pub quota: u64,
    pub totals: &'a mut Totals,
    pub answers: &'a mut Vec<Answer>,
    pub deleted_any: &'a mut bool,
}

pub(super) fn apply_settlements(
    conn: &mut Connection,
    commands: Vec<Command>,
    window: &Window,
    out: Settled<'_>,
) -> Result<(), (rusqlite::Error, usize)> {
    let Settled {
        quota,
        totals: t,
        answers,
        deleted_any,
    } = out;
    let n = commands.len();
    let mut commands = commands.into_iter();
    let result = (|| -> rusqlite::Result<()> {
        // Immediate: the write lock is taken (waiting out the busy timeout) before
        // the first read, which a deferred transaction could not upgrade later.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut delete = tx.prepare_cached("DELETE FROM events WHERE seq = ?1")?;
            let mut delete_through = tx.prepare_cached("DELETE FROM events WHERE seq <= ?1")?;
            let mut delete_listed = tx.prepare_cached(
                "DELETE FROM events WHERE seq IN (SELECT value FROM json_each(?1)) RETURNING seq",
            )?;
            let mut count_through = tx.prepare_cached(
                "SELECT count(*), count(*) FILTER (WHERE client_uuid = 1),
                        coalesce(sum(length(uuid)) FILTER (WHERE client_uuid = 1), 0)
                 FROM events WHERE seq <= ?1",
            )?;
            let mut bury = tx.prepare_cached(
                "INSERT OR REPLACE INTO dead_letters(seq, uuid, topic, key, payload, captured_at_ms, reason, failed_at_ms)
                 SELECT seq, uuid, topic, key, payload, captured_at_ms, ?2, ?3 FROM events WHERE seq = ?1",
            )?;
            let mut forget = tx.prepare_cached(
                "DELETE FROM dead_letters WHERE seq = ?1
                 RETURNING length(payload) + length(key) + length(uuid) + length(topic)",
            )?;
            for cmd in commands.by_ref() {
                match cmd {
                    Command::Settle {
                        delivered,
                        dead,
                        reply,
                    } => {
                        let failed_at = now_ms();
                        t.window_bytes -= window.bound_index(&tx)? as i128;
                        let mut remembered = 0u64;
                        for d in &dead {
                            bury.execute(params![d.seq, d.reason, failed_at])?;
                            if delete.execute([d.seq])? == 1 {
                                t.bytes -= d.size as i128;
                                t.events -= 1;
                                t.dead += 1;
                                t.dead_bytes += d.size as i128;
                                *deleted_any = true;
                            }
                        }
                        // When a settlement covers the whole head of the queue,
                        // one range delete replaces a delete per row.
                        let through = delivered.iter().map(|(seq, _)| *seq).max().unwrap_or(0);
                        let (head_rows, client_rows, client_uuid_bytes) = if through > 0 {
                            count_through
                                .query_row([through], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                        } else {
                            (0i64, 0i64, 0i64)
                        };
                        let whole_head = through > 0 && delivered.len() as i64 == head_rows;
                        if whole_head {
                            remembered += window.remember_through(
                                &tx,
                                through,
                                client_rows,
                                client_uuid_bytes,
                                failed_at,
                            )?;
                            let n = delete_through.execute([through])?;
                            t.events -= n as i128;
                            t.bytes -= delivered.iter().map(|(_, s)| *s as i128).sum::<i128>();
                            *deleted_any |= n > 0;
                        } else if !delivered.is_empty() {
                            // Otherwise one statement deletes the listed rows
                            // (and one remembers their client uuids, if the
                            // range holds any), not two per row.
                            let listed = seq_list(&delivered);
                            if client_rows > 0 {
                                remembered += window.remember_listed(&tx, &listed, failed_at)?;
                            }
                            let mut gone = HashSet::new();
                            let mut rows = delete_listed.query([&listed])?;
                            while let Some(r) = rows.next()? {
                                gone.insert(r.get::<_, i64>(0)?);
                            }
                            *deleted_any |= !gone.is_empty();
                            for (seq, size) in &delivered {
                                if gone.remove(seq) {
                                    t.bytes -= *size as i128;
                                    t.events -= 1;
                                }
                            }
                        }
                        t.window_bytes += remembered as i128;
                        // Prune at least as many as were remembered, so the
                        // window never grows past what it expires.
                        t.window_bytes -=
                            window.prune(&tx, 2 * delivered.len(), failed_at)? as i128;
                        answers.push(Answer::Unit(reply));
                    }
                    Command::DeadLettersCopied { seqs, reply } => {
                        let now = now_ms();
                        for seq in &seqs {
                            t.window_bytes += window.remember_dead_letter(&tx, *seq, now)? as i128;
                            let size: Option<i64> = forget
                                .query_row([seq], |r| r.get(0))
                                .map(Some)
                                .or_else(|e| match e {
                                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                                    e => Err(e),
                                })?;
                            if let Some(size) = size {
                                t.dead -= 1;
                                t.dead_bytes -= size as i128;
                            }
                        }
                        answers.push(Answer::Unit(reply));
                    }
                    other => answers_unexpected(other),
                }
            }
        }
        // Events and dead letters never make room for the window.
        t.fit_window(window, &tx, quota)?;
        tx.commit()
    })();
    fail_rest(result, commands, n)
}

/// The sequence numbers of `delivered` as a JSON array, for `json_each`.
fn seq_list(delivered: &[(i64, u64)]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(delivered.len() * 8 + 2);
    out.push('[');
    for (i, (seq, _)) in delivered.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{seq}");
    }
    out.push(']');
    out
}

/// Commands reached before a failure are failed by the caller through their
/// answers; the ones not reached yet are failed here.
pub(super) fn fail_rest(
    result: rusqlite::Result<()>,
    rest: impl Iterator<Item = Command>,
    n: usize,
) -> Result<(), (rusqlite::Error, usize)> {
    result.map_err(|e| {
        let err = AppendError::Disk(e.to_string());
        rest.for_each(|c| c.fail(&err));
        (e, n)
    })
}

pub(super) fn answers_unexpected(cmd: Command) {
    cmd.fail(&AppendError::Disk(
        "command routed to the wrong transaction".into(),
    ));
}

/// Runs `settle` with its commit written but not fsynced, then restores
/// `durability`'s setting for the appends that follow; the flag is false if
/// that failed, and the connection must then be reopened before any append.
///
/// Only acknowledgements need an fsync before they are answered. A
/// settlement lost to a power cut (its WAL frames unsynced) leaves delivered
/// events buffered, to be sent again, which at-least-once delivery allows and
/// exactly-once delivery drops on start from Kafka's own checkpoint; the next
/// synced commit (every acknowledged append) syncs its frames too. Spares a
/// second fsync in every round that settles and appends.
pub(super) fn unsynced<T>(
    conn: &mut Connection,
    durability: crate::config::Durability,
    settle: impl FnOnce(&mut Connection) -> Result<T, (rusqlite::Error, usize)>,
) -> (Result<T, (rusqlite::Error, usize)>, bool) {
    let normal = crate::buffer::synchronous_mode(crate::config::Durability::Os);
    let own = crate::buffer::synchronous_mode(durability);
    // Setting it cannot fail for I/O; if it fails anyway, the settlement is
    // synced like an append, which is merely slower.
    if own == normal || conn.pragma_update(None, "synchronous", normal).is_err() {
        return (settle(conn), true);
    }
    let result = settle(conn);
    let restored = conn.pragma_update(None, "synchronous", own).is_ok();
    (result, restored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;

    fn synchronous(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_settlement_commits_unsynced_and_appends_are_synced_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::buffer::open_writer(dir.path(), Durability::Fsync).unwrap();
        const NORMAL: i64 = 1;
        const FULL: i64 = 2;
        assert_eq!(synchronous(&conn), FULL);
        let (inside, restored) = unsynced(&mut conn, Durability::Fsync, |c| Ok(synchronous(c)));
        assert_eq!((inside.unwrap(), restored), (NORMAL, true));
        assert_eq!(synchronous(&conn), FULL, "restored after a settlement");
        let (failed, restored): (Result<(), _>, _) = unsynced(&mut conn, Durability::Fsync, |_| {
            Err((rusqlite::Error::InvalidQuery, 1))
        });
        assert!(failed.is_err() && restored);
        assert_eq!(
            synchronous(&conn),
            FULL,
            "restored after a failed settlement"
        );

        let mut os = crate::buffer::open_writer(dir.path(), Durability::Os).unwrap();
        let (inside, _) = unsynced(&mut os, Durability::Os, |c| Ok(synchronous(c)));
        assert_eq!((inside.unwrap(), synchronous(&os)), (NORMAL, NORMAL));
    }
}
