//! The settlement transaction: deletes what Kafka took, buries what it
//! refused for good, forgets dead letters the dead-letter topic holds.

use rusqlite::{Connection, params};

use super::{Answer, AppendError, Command, Totals};
use crate::buffer::now_ms;

pub(super) fn apply_settlements(
    conn: &mut Connection,
    commands: Vec<Command>,
    t: &mut Totals,
    answers: &mut Vec<Answer>,
    deleted_any: &mut bool,
) -> Result<(), (rusqlite::Error, usize)> {
    let n = commands.len();
    let mut commands = commands.into_iter();
    let result = (|| -> rusqlite::Result<()> {
        let tx = conn.transaction()?;
        {
            let mut delete = tx.prepare_cached("DELETE FROM events WHERE seq = ?1")?;
            let mut delete_through = tx.prepare_cached("DELETE FROM events WHERE seq <= ?1")?;
            let mut count_through =
                tx.prepare_cached("SELECT count(*) FROM events WHERE seq <= ?1")?;
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
                        let whole_head = through > 0
                            && delivered.len() as i64
                                == count_through.query_row([through], |r| r.get::<_, i64>(0))?;
                        if whole_head {
                            let n = delete_through.execute([through])?;
                            t.events -= n as i128;
                            t.bytes -= delivered.iter().map(|(_, s)| *s as i128).sum::<i128>();
                            *deleted_any |= n > 0;
                        } else {
                            for (seq, size) in &delivered {
                                if delete.execute([seq])? == 1 {
                                    t.bytes -= *size as i128;
                                    t.events -= 1;
                                    *deleted_any = true;
                                }
                            }
                        }
                        answers.push(Answer::Unit(reply));
                    }
                    Command::DeadLettersCopied { seqs, reply } => {
                        for seq in &seqs {
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
        tx.commit()
    })();
    fail_rest(result, commands, n)
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
