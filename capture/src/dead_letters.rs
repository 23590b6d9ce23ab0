//! `holdfast-capture dead-letters`: list, export and replay the dead letters
//! kept in a buffer. Dead letters are never destroyed with their volume: they
//! keep it from being clean until the dead-letter topic has them, an operator
//! exported them with `--delete`, or replayed them into the queue.

use std::io::Write;
use std::path::Path;

use serde_json::value::RawValue;

use crate::app::{Error, Result};
use crate::buffer::{self, DeadLetterFilter, DeadLetterRow, DirLock, GroupCommitWriter};
use crate::config::{DeadLetterCommand, DeadLetterSelect, Durability};

/// Rows read per page.
const PAGE: usize = 1000;

fn filter(select: &DeadLetterSelect) -> DeadLetterFilter {
    DeadLetterFilter {
        seqs: select.seqs.clone(),
        topic: select.topic.clone(),
        reason: select.reason.clone(),
    }
}

/// Calls `each` for every matching dead letter, oldest first, a page at a time.
fn for_each(
    dir: &Path,
    filter: &DeadLetterFilter,
    mut each: impl FnMut(&DeadLetterRow) -> Result<()>,
) -> Result<()> {
    let conn = buffer::open_reader(dir)?;
    let mut after = 0;
    loop {
        let page = buffer::dead_letters(&conn, after, PAGE, filter)?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = last.seq;
        for row in &page {
            each(row)?;
        }
    }
}

/// One NDJSON line: metadata, and the event as sent (it is JSON already).
fn export_line(row: &DeadLetterRow) -> String {
    let event = std::str::from_utf8(&row.payload)
        .ok()
        .and_then(|s| RawValue::from_string(s.to_owned()).ok());
    let mut line = serde_json::json!({
        "seq": row.seq,
        "uuid": row.uuid,
        "topic": row.topic,
        "key": String::from_utf8_lossy(&row.key),
        "reason": row.reason,
        "failed_at_ms": row.failed_at_ms,
        "captured_at_ms": row.captured_at_ms,
    });
    match event {
        Some(raw) => line["event"] = serde_json::to_value(raw).unwrap_or_default(),
        None => line["event_lossy"] = String::from_utf8_lossy(&row.payload).into(),
    }
    line.to_string()
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| {
        Error::Buffer(buffer::Error::DataDir {
            path: path.to_owned(),
            source,
        })
    }
}

/// Runs a `dead-letters` subcommand; returns what to print.
pub async fn run(cmd: DeadLetterCommand) -> Result<String> {
    match cmd {
        DeadLetterCommand::List { select, json } => {
            let mut out = String::new();
            for_each(&select.data_dir, &filter(&select), |row| {
                if json {
                    out.push_str(&serde_json::to_string(row).unwrap_or_default());
                } else {
                    out.push_str(&format!(
                        "{}\t{}\t{}\t{}\t{}",
                        row.seq, row.uuid, row.topic, row.failed_at_ms, row.reason
                    ));
                }
                out.push('\n');
                Ok(())
            })?;
            Ok(out)
        }
        DeadLetterCommand::Export {
            select,
            out,
            delete,
        } => {
            let dir = select.data_dir.clone();
            // Taken before reading, so nothing exported can change before it is deleted.
            let _lock = if delete {
                Some(DirLock::acquire(&dir)?)
            } else {
                None
            };
            let mut seqs = Vec::new();
            let mut lines = Vec::new();
            for_each(&dir, &filter(&select), |row| {
                seqs.push(row.seq);
                lines.push(export_line(row));
                Ok(())
            })?;
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            if out.as_os_str() == "-" {
                std::io::stdout()
                    .write_all(text.as_bytes())
                    .map_err(io_error(&out))?;
            } else {
                let mut f = std::fs::File::create(&out).map_err(io_error(&out))?;
                f.write_all(text.as_bytes()).map_err(io_error(&out))?;
                f.sync_all().map_err(io_error(&out))?;
            }
            if delete && !seqs.is_empty() {
                let n = seqs.len();
                with_writer(&dir, |w| async move {
                    w.delete_dead_letters(seqs).await.map(|_| ())
                })
                .await?;
                return Ok(format!("exported and deleted {n} dead letters\n"));
            }
            Ok(format!("exported {} dead letters\n", lines.len()))
        }
        DeadLetterCommand::Replay { select } => {
            let dir = select.data_dir.clone();
            let _lock = DirLock::acquire(&dir)?;
            let mut seqs = Vec::new();
            for_each(&dir, &filter(&select), |row| {
                seqs.push(row.seq);
                Ok(())
            })?;
            let mut moved = 0;
            for chunk in seqs.chunks(PAGE) {
                let chunk = chunk.to_vec();
                moved += with_writer(&dir, |w| async move { w.replay_dead_letters(chunk).await })
                    .await?;
            }
            Ok(format!("replayed {moved} dead letters into the queue\n"))
        }
    }
}

/// Runs one write through a short-lived writer (the caller holds the lock).
async fn with_writer<T, F, Fut>(dir: &Path, f: F) -> Result<T>
where
    F: FnOnce(buffer::WriterHandle) -> Fut,
    Fut: std::future::Future<Output = Result<T, buffer::AppendError>>,
{
    let (thread, writer) =
        GroupCommitWriter::start_with(dir, buffer::WriterOptions::drain(Durability::Fsync), None)?;
    let result = f(writer).await;
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .ok();
    result.map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{DeadLetter, NewEvent, read_batch};

    fn ev(i: usize, topic: &str) -> NewEvent {
        NewEvent {
            uuid: format!("00000000-0000-7000-8000-{i:012}"),
            topic: topic.into(),
            key: format!("k{i}").into_bytes(),
            payload: format!(r#"{{"i":{i}}}"#).into_bytes(),
            captured_at_ms: 1_000 + i as i64,
            client_uuid: true,
        }
    }

    fn select(dir: &Path) -> DeadLetterSelect {
        DeadLetterSelect {
            data_dir: dir.to_owned(),
            seqs: vec![],
            topic: None,
            reason: None,
        }
    }

    /// Three dead letters: two for `gone` (unknown topic), one for `t` (too large).
    async fn buffer_with_dead_letters(dir: &Path) {
        let (w, h) = GroupCommitWriter::start(dir, Durability::Fsync, u64::MAX, None).unwrap();
        h.append(vec![ev(0, "gone"), ev(1, "t"), ev(2, "gone")])
            .await
            .unwrap();
        let r = buffer::open_reader(dir).unwrap();
        let dead = read_batch(&r, 0, 10)
            .unwrap()
            .iter()
            .map(|s| DeadLetter {
                seq: s.seq,
                size: s.event.size(),
                reason: if &*s.event.topic == "gone" {
                    "unknown_topic: no such topic".into()
                } else {
                    "too_large: boom".into()
                },
            })
            .collect();
        h.settle(vec![], dead).await.unwrap();
        drop(h);
        tokio::task::spawn_blocking(move || w.join()).await.unwrap();
    }

    #[tokio::test]
    async fn export_with_delete_writes_every_event_as_sent_then_forgets_them() {
        let dir = tempfile::tempdir().unwrap();
        buffer_with_dead_letters(dir.path()).await;
        let out = dir.path().join("dead.ndjson");
        let mut sel = select(dir.path());
        sel.reason = Some("unknown_topic".into());
        let said = run(DeadLetterCommand::Export {
            select: sel,
            out: out.clone(),
            delete: true,
        })
        .await
        .unwrap();
        assert!(said.contains("deleted 2"), "{said}");
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], serde_json::json!({"i": 0}));
        assert_eq!(lines[1]["uuid"], ev(2, "gone").uuid);
        assert_eq!(lines[1]["topic"], "gone");
        // Only the exported ones are gone: the too-large one is still kept.
        let listed = run(DeadLetterCommand::List {
            select: select(dir.path()),
            json: false,
        })
        .await
        .unwrap();
        assert_eq!(listed.lines().count(), 1, "{listed}");
        assert!(listed.contains("too_large"), "{listed}");
    }

    #[tokio::test]
    async fn replay_moves_dead_letters_back_into_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        buffer_with_dead_letters(dir.path()).await;
        let mut sel = select(dir.path());
        sel.topic = Some("gone".into());
        let said = run(DeadLetterCommand::Replay { select: sel })
            .await
            .unwrap();
        assert!(said.contains("replayed 2"), "{said}");
        let r = buffer::open_reader(dir.path()).unwrap();
        let queued: Vec<NewEvent> = read_batch(&r, 0, 10)
            .unwrap()
            .into_iter()
            .map(|s| s.event)
            .collect();
        assert_eq!(queued, vec![ev(0, "gone"), ev(2, "gone")]);
        let stats = buffer::stats(&r).unwrap();
        assert_eq!((stats.events, stats.dead_letters), (2, 1));
    }

    #[tokio::test]
    async fn writing_commands_refuse_a_buffer_another_process_holds() {
        let dir = tempfile::tempdir().unwrap();
        buffer_with_dead_letters(dir.path()).await;
        let _held = DirLock::acquire(dir.path()).unwrap();
        let err = run(DeadLetterCommand::Replay {
            select: select(dir.path()),
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("held by another process"), "{err}");
    }
}
