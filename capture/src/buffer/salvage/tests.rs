//! Real buffers, damaged the ways disks damage files, then opened, quarantined
//! and salvaged. Expected counts come from SQLite's own `dbstat` view of the
//! file before the damage.

use std::collections::HashSet;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use rusqlite::Connection;

use super::super::quarantine::{self, Verdict, unsalvaged_quarantine};
use super::super::{DB_FILE, GroupCommitWriter, NewEvent, WriterHandle, open_reader, read_batch};
use super::*;
use crate::config::Durability;

const PAGE: u64 = 4096;

fn ev(i: usize) -> NewEvent {
    // Every 50th event spills into overflow pages.
    let pad = if i % 50 == 7 { 9000 } else { 150 };
    NewEvent {
        uuid: format!("00000000-0000-7000-8000-{i:012}"),
        topic: "t".into(),
        key: format!("k{i}").into_bytes(),
        payload: format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(pad)).into_bytes(),
        captured_at_ms: 1_000 + i as i64,
        client_uuid: true,
    }
}

async fn stop(w: GroupCommitWriter, h: WriterHandle) {
    drop(h);
    tokio::task::spawn_blocking(move || w.join()).await.unwrap();
}

/// A buffer with events `0..n`, the first `delivered` of them settled
/// (deleted, leaving stale rows on freelist pages). Returns the live uuids.
async fn build(dir: &Path, n: usize, delivered: usize) -> HashSet<String> {
    let (w, h) = GroupCommitWriter::start(dir, Durability::Fsync, u64::MAX, None).unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        h.append(chunk.iter().map(|&i| ev(i)).collect())
            .await
            .unwrap();
    }
    if delivered > 0 {
        let r = open_reader(dir).unwrap();
        let done: Vec<(i64, u64)> = read_batch(&r, 0, delivered)
            .unwrap()
            .iter()
            .map(|s| (s.seq, s.event.size()))
            .collect();
        h.settle(done, vec![]).await.unwrap();
    }
    stop(w, h).await;
    (delivered..n).map(|i| ev(i).uuid).collect()
}

/// `(page number, cells)` of the `events` table's pages of one kind, from SQLite.
fn pages_of(dir: &Path, kind: &str) -> Vec<(u64, u64)> {
    let c = Connection::open(dir.join(DB_FILE)).unwrap();
    let mut s = c
        .prepare("SELECT pageno, ncell FROM dbstat WHERE name = 'events' AND pagetype = ?1 ORDER BY pageno")
        .unwrap();
    s.query_map([kind], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
    })
    .unwrap()
    .collect::<rusqlite::Result<_>>()
    .unwrap()
}

fn overwrite(path: &Path, at: u64, len: usize) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    // Deterministic garbage (an LCG), no zero runs.
    let mut x = 0x2545_f491_u32;
    let junk: Vec<u8> = (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8 | 1
        })
        .collect();
    f.write_all(&junk).unwrap();
    f.sync_all().unwrap();
}

/// Opens the damaged buffer as `serve` does, salvages, and returns the report
/// and the uuids now in the live buffer.
async fn open_and_salvage(dir: &Path) -> (SalvageReport, HashSet<String>) {
    assert!(
        matches!(quarantine::check(dir).unwrap(), Verdict::Damaged(_)),
        "damage not detected"
    );
    let (w, h) = GroupCommitWriter::start(dir, Durability::Fsync, u64::MAX, None)
        .expect("a damaged buffer must not stop the writer from starting");
    assert_eq!(h.state.events.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(unsalvaged_quarantine(dir).unwrap(), 1);
    assert_eq!(quarantine::check(dir).unwrap(), Verdict::Sound);
    let reports = salvage_quarantine(dir, &h, None).await.unwrap();
    assert_eq!(
        unsalvaged_quarantine(dir).unwrap(),
        0,
        "salvaged file left behind"
    );
    stop(w, h).await;
    let r = open_reader(dir).unwrap();
    let live: Vec<String> = read_batch(&r, 0, usize::MAX >> 1)
        .unwrap()
        .into_iter()
        .map(|s| s.event.uuid)
        .collect();
    let set: HashSet<String> = live.iter().cloned().collect();
    assert_eq!(set.len(), live.len(), "a row was salvaged twice");
    assert_eq!(reports.len(), 1);
    (reports.into_iter().next().unwrap(), set)
}

#[tokio::test]
async fn sound_or_missing_buffers_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(quarantine::check(dir.path()).unwrap(), Verdict::Missing);
    assert_eq!(
        quarantine::check_beside(dir.path(), || 7).unwrap(),
        (Verdict::Missing, None)
    );
    build(dir.path(), 10, 0).await;
    assert_eq!(quarantine::check(dir.path()).unwrap(), Verdict::Sound);
    assert_eq!(
        quarantine::check_beside(dir.path(), || 7).unwrap(),
        (Verdict::Sound, Some(7))
    );
    assert_eq!(quarantine::quarantine_if_damaged(dir.path()).unwrap(), None);
    assert_eq!(unsalvaged_quarantine(dir.path()).unwrap(), 0);
}

/// The writer counts the buffer beside the integrity check (`census`); a
/// file the check then quarantines must lend it none of its counts. A
/// damaged index leaves the table countable, so the count beside the check
/// succeeds on the damaged file.
#[tokio::test]
async fn a_quarantined_file_lends_the_writer_none_of_its_counts() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 400, 0).await;
    let db = dir.path().join(DB_FILE);
    let index_leaf: i64 = Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT pageno FROM dbstat WHERE name = 'events_client_uuid' AND pagetype = 'leaf'
             ORDER BY pageno LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    overwrite(&db, (index_leaf as u64 - 1) * PAGE, PAGE as usize);
    let counted = crate::buffer::census::take_read_only(dir.path()).unwrap();
    assert_eq!(
        (counted.events, counted.last_seq),
        (400, 400),
        "the damaged file must still be countable, or this test shows nothing"
    );
    let (verdict, side) = quarantine::check_beside(dir.path(), || 7).unwrap();
    assert!(matches!(verdict, Verdict::Damaged(_)), "{verdict:?}");
    assert_eq!(side, None);

    let (w, h) = GroupCommitWriter::start(dir.path(), Durability::Fsync, u64::MAX, None).unwrap();
    assert_eq!(unsalvaged_quarantine(dir.path()).unwrap(), 1);
    let s = &h.state;
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        (
            s.events.load(Relaxed),
            s.bytes.load(Relaxed),
            s.last_seq.load(Relaxed)
        ),
        (0, 0, 0),
        "counts of the quarantined file"
    );
    stop(w, h).await;
}

#[tokio::test]
async fn overwritten_leaf_loses_only_its_rows_and_delivered_rows_stay_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let mut live = build(dir.path(), 2000, 500).await;
    let leaves = pages_of(dir.path(), "leaf");
    let (page, cells) = leaves[leaves.len() / 2];
    overwrite(&dir.path().join(DB_FILE), (page - 1) * PAGE, PAGE as usize);
    let (report, salvaged) = open_and_salvage(dir.path()).await;
    assert_eq!(report.unreadable, cells, "{report:?}");
    assert_eq!(report.events, 1500 - cells, "{report:?}");
    assert_eq!(report.damaged_pages, 1);
    assert!(salvaged.is_subset(&live), "a delivered event came back");
    live.retain(|u| !salvaged.contains(u));
    assert_eq!(live.len() as u64, cells);
}

#[tokio::test]
async fn overwritten_interior_page_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let live = build(dir.path(), 2000, 300).await;
    let interior = pages_of(dir.path(), "internal");
    assert!(!interior.is_empty());
    for (page, _) in interior {
        overwrite(&dir.path().join(DB_FILE), (page - 1) * PAGE, PAGE as usize);
    }
    let (report, salvaged) = open_and_salvage(dir.path()).await;
    assert!(
        salvaged == live,
        "{} of {} salvaged: {report:?}",
        salvaged.len(),
        live.len()
    );
    assert_eq!(report.unreadable, 0);
}

#[tokio::test]
async fn overwritten_header_still_gives_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let live = build(dir.path(), 1500, 0).await;
    overwrite(&dir.path().join(DB_FILE), 0, PAGE as usize);
    match quarantine::check(dir.path()).unwrap() {
        Verdict::Damaged(why) => assert!(why.contains("not a database"), "{why}"),
        v => panic!("{v:?}"),
    }
    let (report, salvaged) = open_and_salvage(dir.path()).await;
    assert!(
        salvaged == live,
        "{} of {} salvaged: {report:?}",
        salvaged.len(),
        live.len()
    );
}

#[tokio::test]
async fn overwritten_overflow_page_loses_only_its_event() {
    let dir = tempfile::tempdir().unwrap();
    let live = build(dir.path(), 400, 0).await;
    let overflow = pages_of(dir.path(), "overflow");
    assert!(overflow.len() > 2);
    let (page, _) = overflow[overflow.len() / 2];
    // Content-only damage inside a page is invisible to SQLite (no page
    // checksums); a whole overwritten page breaks the chain's links.
    overwrite(&dir.path().join(DB_FILE), (page - 1) * PAGE, PAGE as usize);
    let (report, salvaged) = open_and_salvage(dir.path()).await;
    assert_eq!(report.unreadable, 1, "{report:?}");
    assert_eq!(salvaged.len(), live.len() - 1);
}

#[tokio::test]
async fn truncated_file_gives_every_row_before_the_cut() {
    for aligned in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        build(dir.path(), 2000, 0).await;
        let db = dir.path().join(DB_FILE);
        let len = std::fs::metadata(&db).unwrap().len();
        let cut_page = len / PAGE / 2;
        let leaves = pages_of(dir.path(), "leaf");
        let kept: u64 = leaves
            .iter()
            .filter(|(p, _)| *p <= cut_page)
            .map(|(_, c)| c)
            .sum();
        let cut = cut_page * PAGE + if aligned { 0 } else { 1000 };
        std::fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let (report, salvaged) = open_and_salvage(dir.path()).await;
        // Overflow pages past the cut can take an event of a kept leaf.
        assert!(
            (kept - 3..=kept).contains(&(salvaged.len() as u64)),
            "aligned {aligned}: kept {kept}, {report:?}"
        );
        assert_eq!(report.events + report.unreadable, 2000, "{report:?}");
    }
}

#[tokio::test]
async fn empty_file_is_quarantined_and_the_pod_starts_fresh() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 10, 0).await;
    std::fs::File::create(dir.path().join(DB_FILE)).unwrap();
    let (report, salvaged) = open_and_salvage(dir.path()).await;
    assert!(salvaged.is_empty());
    assert_eq!(report.events, 0);
}

#[tokio::test]
async fn rows_only_in_the_wal_are_salvaged_too() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let mut live = build(dir.path(), 1000, 0).await;
    let leaves = pages_of(dir.path(), "leaf");
    {
        // A writer that died before any checkpoint: the WAL holds the rest.
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        for i in 1000..1200 {
            let e = ev(i);
            c.execute(
                "INSERT INTO events(uuid, topic, key, payload, captured_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![e.uuid, e.topic, e.key, e.payload, e.captured_at_ms],
            )
            .unwrap();
            live.insert(e.uuid);
        }
        for f in [DB_FILE, "buffer.db-wal"] {
            std::fs::copy(dir.path().join(f), crashed.path().join(f)).unwrap();
        }
    }
    let (page, cells) = leaves[1];
    overwrite(
        &crashed.path().join(DB_FILE),
        (page - 1) * PAGE,
        PAGE as usize,
    );
    let (report, salvaged) = open_and_salvage(crashed.path()).await;
    assert_eq!(report.unreadable, cells, "{report:?}");
    assert_eq!(salvaged.len() as u64, 1200 - cells);
    assert!(salvaged.is_subset(&live));
}

#[tokio::test]
async fn dead_letters_not_yet_copied_come_back_as_events() {
    let dir = tempfile::tempdir().unwrap();
    let live = build(dir.path(), 300, 0).await;
    {
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.execute_batch(
            "INSERT INTO dead_letters(seq, uuid, topic, key, payload, captured_at_ms, reason, failed_at_ms)
               SELECT seq, uuid, topic, key, payload, captured_at_ms, 'too_large', 1 FROM events WHERE seq <= 20;
             UPDATE dead_letters SET dlq_delivered = 1 WHERE seq <= 5;
             DELETE FROM events WHERE seq <= 20;",
        )
        .unwrap();
    }
    let leaves = pages_of(dir.path(), "leaf");
    let (page, cells) = leaves[leaves.len() / 2];
    overwrite(&dir.path().join(DB_FILE), (page - 1) * PAGE, PAGE as usize);
    let (report, salvaged) = open_and_salvage(dir.path()).await;
    assert_eq!(report.dead_letters, 15, "{report:?}");
    assert_eq!(report.dead_letters_copied, 5);
    assert_eq!(report.unreadable, cells);
    assert_eq!(salvaged.len() as u64, 295 - cells);
    assert!(salvaged.is_subset(&live));
}

#[tokio::test]
async fn a_quarantine_interrupted_by_a_crash_keeps_its_wal() {
    let dir = tempfile::tempdir().unwrap();
    let pending = dir
        .path()
        .join(quarantine::QUARANTINE_DIR)
        .join("pending-1");
    std::fs::create_dir_all(&pending).unwrap();
    std::fs::write(pending.join(DB_FILE), b"garbage").unwrap();
    std::fs::write(dir.path().join("buffer.db-wal"), b"wal").unwrap();
    assert_eq!(unsalvaged_quarantine(dir.path()).unwrap(), 1);
    assert_eq!(quarantine::quarantine_if_damaged(dir.path()).unwrap(), None);
    assert!(!dir.path().join("buffer.db-wal").exists());
    let files = quarantine::unsalvaged(dir.path()).unwrap();
    assert_eq!(files.len(), 1);
    let wal = format!("{}-wal", files[0].display());
    assert_eq!(std::fs::read(wal).unwrap(), b"wal");
}

#[tokio::test]
async fn a_sound_buffer_left_by_a_crash_with_its_wal_is_not_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 200, 0).await;
    for keep_shm in [true, false] {
        let crashed = tempfile::tempdir().unwrap();
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        c.execute("DELETE FROM events WHERE seq <= 10", []).unwrap();
        let mut files = vec![DB_FILE, "buffer.db-wal"];
        if keep_shm {
            files.push("buffer.db-shm");
        }
        for f in files {
            std::fs::copy(dir.path().join(f), crashed.path().join(f)).unwrap();
        }
        drop(c);
        assert_eq!(quarantine::check(crashed.path()).unwrap(), Verdict::Sound);
        let (w, h) =
            GroupCommitWriter::start(crashed.path(), Durability::Fsync, u64::MAX, None).unwrap();
        assert_eq!(unsalvaged_quarantine(crashed.path()).unwrap(), 0);
        assert!(h.state.events.load(std::sync::atomic::Ordering::Relaxed) > 0);
        stop(w, h).await;
    }
}

#[tokio::test]
async fn commits_after_a_damaged_wal_frame_are_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let mut live = build(dir.path(), 500, 0).await;
    {
        // Ten commits of 20 events each, all still in the WAL.
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        for t in 0..10 {
            let tx = c.unchecked_transaction().unwrap();
            for i in 0..20 {
                let e = ev(1000 + t * 20 + i);
                tx.execute(
                    "INSERT INTO events(uuid, topic, key, payload, captured_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                    rusqlite::params![e.uuid, e.topic, e.key, e.payload, e.captured_at_ms],
                )
                .unwrap();
                live.insert(e.uuid);
            }
            tx.commit().unwrap();
        }
        for f in [DB_FILE, "buffer.db-wal"] {
            std::fs::copy(dir.path().join(f), crashed.path().join(f)).unwrap();
        }
    }
    // Garbage over the data of the fifth frame: SQLite would keep only what
    // came before it, with no error.
    let frame = 24 + PAGE;
    overwrite(
        &crashed.path().join("buffer.db-wal"),
        32 + 4 * frame + 24,
        PAGE as usize,
    );
    match quarantine::check(crashed.path()).unwrap() {
        Verdict::Damaged(why) => assert!(why.contains("write-ahead log"), "{why}"),
        v => panic!("{v:?}"),
    }
    let (report, salvaged) = open_and_salvage(crashed.path()).await;
    // The damaged frame may hold an event's only overflow page (that event is
    // lost and counted); every other page was rewritten by later commits.
    assert!(report.unreadable <= 1, "{report:?}");
    assert!(salvaged.is_subset(&live));
    assert_eq!(salvaged.len() as u64 + report.unreadable, live.len() as u64);
    for i in 1180..1200 {
        assert!(salvaged.contains(&ev(i).uuid), "last commit dropped");
    }
}

#[tokio::test]
async fn salvage_into_a_small_quota_waits_for_the_forwarder() {
    let dir = tempfile::tempdir().unwrap();
    let live = build(dir.path(), 600, 0).await;
    let leaves = pages_of(dir.path(), "leaf");
    let (page, cells) = leaves[leaves.len() / 2];
    overwrite(&dir.path().join(DB_FILE), (page - 1) * PAGE, PAGE as usize);
    // Room for about 150 small events: salvage must wait for settlements.
    let quota = ev(0).size() * 150;
    let (w, h) = GroupCommitWriter::start(dir.path(), Durability::Fsync, quota, None).unwrap();
    let salvage = {
        let (dir, h) = (dir.path().to_owned(), h.clone());
        tokio::spawn(async move { salvage_quarantine(&dir, &h, None).await })
    };
    // A stand-in forwarder: take what is buffered, settle it, until salvage ends.
    let reader = open_reader(dir.path()).unwrap();
    let mut seen = HashSet::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !salvage.is_finished() || !read_batch(&reader, 0, 1).unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "salvage stalled");
        let batch = read_batch(&reader, 0, 50).unwrap();
        if batch.is_empty() {
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(50), h.appended.notified())
                    .await;
            continue;
        }
        seen.extend(batch.iter().map(|s| s.event.uuid.clone()));
        h.settle(
            batch.iter().map(|s| (s.seq, s.event.size())).collect(),
            vec![],
        )
        .await
        .unwrap();
    }
    let reports = salvage.await.unwrap().unwrap();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].unreadable, cells);
    assert_eq!(seen.len() as u64, 600 - cells);
    assert!(seen.is_subset(&live));
    assert_eq!(unsalvaged_quarantine(dir.path()).unwrap(), 0);
    drop(reader);
    stop(w, h).await;
}
