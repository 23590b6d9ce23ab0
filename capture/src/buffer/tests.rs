use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

pub(super) fn ev(i: usize) -> NewEvent {
    NewEvent {
        uuid: format!("00000000-0000-7000-8000-{i:012}"),
        topic: "t".into(),
        key: format!("k{i}").into_bytes(),
        payload: format!(r#"{{"i":{i}}}"#).into_bytes(),
        captured_at_ms: 1_000 + i as i64,
        client_uuid: true,
    }
}

pub(super) fn start(dir: &Path, quota: u64) -> (GroupCommitWriter, WriterHandle) {
    GroupCommitWriter::start(dir, Durability::Fsync, quota, None).unwrap()
}

pub(super) async fn stop(w: GroupCommitWriter, h: WriterHandle) {
    drop(h);
    tokio::task::spawn_blocking(move || w.join()).await.unwrap();
}

#[tokio::test]
async fn appended_events_read_back_in_order_with_growing_seq() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX);
    let a = h.append(vec![ev(0), ev(1)]).await.unwrap();
    let b = h.append(vec![ev(2)]).await.unwrap();
    assert!(b > a);
    let r = open_reader(dir.path()).unwrap();
    let batch = read_batch(&r, 0, 10).unwrap();
    assert_eq!(batch.len(), 3);
    assert_eq!(batch[2].event, ev(2));
    assert!(batch.windows(2).all(|p| p[0].seq < p[1].seq));
    assert_eq!(h.state.events.load(Ordering::Relaxed), 3);
    assert_eq!(h.state.oldest_ms.load(Ordering::Relaxed), 1_000);
    stop(w, h).await;
}

#[tokio::test]
async fn sequence_numbers_are_never_reused_after_the_table_empties() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX);
    let last = h.append(vec![ev(0), ev(1)]).await.unwrap();
    let r = open_reader(dir.path()).unwrap();
    let all: Vec<(i64, u64)> = read_batch(&r, 0, 10)
        .unwrap()
        .iter()
        .map(|s| (s.seq, s.event.size()))
        .collect();
    h.settle(all, vec![]).await.unwrap();
    assert_eq!(totals(&r).unwrap(), (0, 0));
    stop(w, h).await;
    // Reopen: the high-water mark survives.
    let (w, h) = start(dir.path(), u64::MAX);
    let next = h.append(vec![ev(2)]).await.unwrap();
    assert!(next > last, "seq {next} reused (last was {last})");
    stop(w, h).await;
}

#[tokio::test]
async fn refuses_a_request_over_quota_and_writes_nothing_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let one = ev(0).size();
    let (w, h) = start(dir.path(), one * 3);
    h.append(vec![ev(0), ev(1)]).await.unwrap();
    let err = h.append(vec![ev(2), ev(3)]).await.unwrap_err();
    assert!(matches!(err, AppendError::QuotaExceeded { .. }), "{err:?}");
    // Two thirds used: a smaller request still fits, so the pod stays ready.
    assert!(!h.state.over_quota.load(Ordering::Relaxed));
    h.append(vec![ev(9)]).await.unwrap();
    assert!(h.state.over_quota.load(Ordering::Relaxed));
    let r = open_reader(dir.path()).unwrap();
    assert_eq!(totals(&r).unwrap().0, 3);
    // Draining brings readiness back by itself.
    let all: Vec<(i64, u64)> = read_batch(&r, 0, 10)
        .unwrap()
        .iter()
        .map(|s| (s.seq, s.event.size()))
        .collect();
    h.settle(all, vec![]).await.unwrap();
    assert!(!h.state.over_quota.load(Ordering::Relaxed));
    h.append(vec![ev(2), ev(3)]).await.unwrap();
    assert_eq!(totals(&r).unwrap().0, 2);
    stop(w, h).await;
}

#[tokio::test]
async fn settle_moves_poison_to_dead_letters_with_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX);
    h.append(vec![ev(0), ev(1), ev(2)]).await.unwrap();
    let r = open_reader(dir.path()).unwrap();
    let b = read_batch(&r, 0, 10).unwrap();
    h.settle(
        vec![(b[0].seq, b[0].event.size()), (b[2].seq, b[2].event.size())],
        vec![DeadLetter {
            seq: b[1].seq,
            size: b[1].event.size(),
            reason: "too_large: boom".into(),
        }],
    )
    .await
    .unwrap();
    assert_eq!(totals(&r).unwrap(), (0, 0));
    let dead = dead_letters(&r, 0, 10, &DeadLetterFilter::default()).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].uuid, ev(1).uuid);
    assert_eq!(dead[0].reason, "too_large: boom");
    assert_eq!(dead[0].payload, ev(1).payload);
    let s = stats(&r).unwrap();
    assert_eq!((s.events, s.dead_letters), (0, 1));
    stop(w, h).await;
}

#[tokio::test]
async fn clean_mark_needs_an_empty_buffer_and_seals_it() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX);
    h.append(vec![ev(0)]).await.unwrap();
    assert!(!h.seal(false).await.unwrap().clean);
    let r = open_reader(dir.path()).unwrap();
    let b = read_batch(&r, 0, 10).unwrap();
    h.settle(vec![(b[0].seq, b[0].event.size())], vec![])
        .await
        .unwrap();
    assert!(h.seal(false).await.unwrap().clean);
    assert!(stats(&r).unwrap().clean);
    // Sealed: nothing more is taken, so the clean verdict stays true.
    assert_eq!(h.append(vec![ev(1)]).await, Err(AppendError::Sealed));
    assert!(stats(&r).unwrap().clean);
    stop(w, h).await;
    // A new writer (the next start) takes events again, and they make it dirty.
    let (w, h) = start(dir.path(), u64::MAX);
    h.append(vec![ev(1)]).await.unwrap();
    assert!(!stats(&r).unwrap().clean);
    stop(w, h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let commits = Arc::new(AtomicUsize::new(0));
    let c = commits.clone();
    let (w, h) = GroupCommitWriter::start(
        dir.path(),
        Durability::Fsync,
        u64::MAX,
        Some(Box::new(move |_| {
            c.fetch_add(1, Ordering::Relaxed);
        })),
    )
    .unwrap();
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move { h.append(vec![ev(i)]).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let r = open_reader(dir.path()).unwrap();
    assert_eq!(totals(&r).unwrap().0, 400);
    let n = commits.load(Ordering::Relaxed);
    assert!(n < 400, "{n} commits for 400 requests: no group commit");
    stop(w, h).await;
}

#[test]
fn one_drainer_per_directory() {
    let dir = tempfile::tempdir().unwrap();
    let held = DirLock::acquire(dir.path()).unwrap();
    assert!(matches!(
        DirLock::acquire(dir.path()),
        Err(Error::Locked { .. })
    ));
    drop(held);
    DirLock::acquire(dir.path()).unwrap();
}

#[tokio::test]
async fn volume_id_is_made_once_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX);
    stop(w, h).await;
    let id = meta(&open_reader(dir.path()).unwrap(), "volume_id")
        .unwrap()
        .unwrap();
    assert!(uuid::Uuid::parse_str(&id).is_ok());
    let (w, h) = start(dir.path(), u64::MAX);
    stop(w, h).await;
    let again = stats(&open_reader(dir.path()).unwrap()).unwrap();
    assert_eq!(again.volume_id, id);
    assert_eq!(again.schema_version, SCHEMA_VERSION);
}

#[tokio::test]
async fn settling_part_of_a_batch_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX);
    h.append(vec![ev(0), ev(1), ev(2), ev(3)]).await.unwrap();
    let r = open_reader(dir.path()).unwrap();
    let b = read_batch(&r, 0, 10).unwrap();
    // Only the second and fourth were delivered: the first and third stay.
    h.settle(
        vec![(b[1].seq, b[1].event.size()), (b[3].seq, b[3].event.size())],
        vec![],
    )
    .await
    .unwrap();
    let left: Vec<i64> = read_batch(&r, 0, 10)
        .unwrap()
        .iter()
        .map(|s| s.seq)
        .collect();
    assert_eq!(left, vec![b[0].seq, b[2].seq]);
    assert_eq!(h.state.events.load(Ordering::Relaxed), 2);
    assert_eq!(
        h.state.bytes.load(Ordering::Relaxed),
        b[0].event.size() + b[2].event.size()
    );
    // Then the whole head at once (range delete).
    h.settle(
        vec![(b[0].seq, b[0].event.size()), (b[2].seq, b[2].event.size())],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(totals(&r).unwrap(), (0, 0));
    assert_eq!(h.state.bytes.load(Ordering::Relaxed), 0);
    stop(w, h).await;
}

fn dead(b: &StoredEvent, reason: &str) -> DeadLetter {
    DeadLetter {
        seq: b.seq,
        size: b.event.size(),
        reason: reason.into(),
    }
}

#[tokio::test]
async fn a_request_larger_than_the_whole_quota_is_refused_for_good_and_keeps_the_pod_ready() {
    let dir = tempfile::tempdir().unwrap();
    let one = ev(0).size();
    let (w, h) = start(dir.path(), one * 3);
    let err = h
        .append(vec![ev(0), ev(1), ev(2), ev(3)])
        .await
        .unwrap_err();
    assert_eq!(
        err,
        AppendError::LargerThanQuota {
            quota: one * 3,
            needed: one * 4
        }
    );
    assert!(!h.state.over_quota.load(Ordering::Relaxed));
    h.append(vec![ev(0)]).await.unwrap();
    stop(w, h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_append_is_acknowledged_after_a_clean_seal() {
    // Appends race the seal from many tasks, many times: an append that got
    // Ok must never coexist with a clean report.
    for round in 0..30 {
        let dir = tempfile::tempdir().unwrap();
        let (w, h) = start(dir.path(), u64::MAX);
        let appends: Vec<_> = (0..16)
            .map(|i| {
                let h = h.clone();
                tokio::spawn(async move { h.append(vec![ev(i)]).await })
            })
            .collect();
        let seal = {
            let h = h.clone();
            tokio::spawn(async move { h.seal(false).await })
        };
        let report = seal.await.unwrap().unwrap();
        let mut acked = 0;
        for a in appends {
            match a.await.unwrap() {
                Ok(_) => acked += 1,
                Err(e) => assert_eq!(e, AppendError::Sealed),
            }
        }
        let r = open_reader(dir.path()).unwrap();
        assert_eq!(totals(&r).unwrap().0, acked, "round {round}");
        assert_eq!(report.events, acked, "round {round}");
        assert_eq!(
            report.clean,
            acked == 0,
            "round {round}: {report:?} with {acked} acked"
        );
        assert_eq!(stats(&r).unwrap().clean, acked == 0, "round {round}");
        stop(w, h).await;
    }
}

#[tokio::test]
async fn dead_letters_count_against_the_quota_and_keep_the_buffer_dirty_until_copied() {
    let dir = tempfile::tempdir().unwrap();
    let one = ev(0).size();
    let (w, h) = start(dir.path(), one * 2);
    h.append(vec![ev(0), ev(1)]).await.unwrap();
    let r = open_reader(dir.path()).unwrap();
    let b = read_batch(&r, 0, 10).unwrap();
    h.settle(vec![(b[0].seq, one)], vec![dead(&b[1], "too_large: x")])
        .await
        .unwrap();
    assert_eq!(h.state.events.load(Ordering::Relaxed), 0);
    assert_eq!(h.state.dead_letters.load(Ordering::Relaxed), 1);
    // The delivered uuid would not fit beside the dead letter: the
    // deduplication window gives way.
    assert_eq!(h.state.used_bytes(), one);
    // One event's room is left, not two.
    assert!(matches!(
        h.append(vec![ev(2), ev(3)]).await,
        Err(AppendError::QuotaExceeded { .. })
    ));
    // Not clean while the dead letter is only here.
    let report = h.seal(false).await.unwrap();
    assert_eq!(
        (report.events, report.dead_letters, report.clean),
        (0, 1, false)
    );
    assert!(!stats(&r).unwrap().clean);
    stop(w, h).await;
    // The figures survive a restart; once copied, the dead letter is gone.
    let (w, h) = start(dir.path(), one * 2);
    assert_eq!(h.state.dead_letters.load(Ordering::Relaxed), 1);
    assert_eq!(h.state.dead_bytes.load(Ordering::Relaxed), one);
    h.dead_letters_copied(vec![b[1].seq]).await.unwrap();
    // Copied, the dead letter's uuid is remembered in its place.
    assert_eq!(h.state.used_bytes(), dedup::remembered_size(&ev(1).uuid));
    assert!(h.seal(false).await.unwrap().clean);
    stop(w, h).await;
}

#[tokio::test]
async fn a_quarantined_file_keeps_the_buffer_from_being_clean() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX);
    let report = h.seal(true).await.unwrap();
    assert!(!report.clean);
    assert!(!stats(&open_reader(dir.path()).unwrap()).unwrap().clean);
    stop(w, h).await;
}

#[tokio::test]
async fn replayed_dead_letters_return_to_the_queue_with_new_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX);
    h.append(vec![ev(0), ev(1)]).await.unwrap();
    let r = open_reader(dir.path()).unwrap();
    let b = read_batch(&r, 0, 10).unwrap();
    h.settle(
        vec![],
        vec![dead(&b[0], "unknown_topic: x"), dead(&b[1], "too_large: y")],
    )
    .await
    .unwrap();
    let moved = h.replay_dead_letters(vec![b[0].seq]).await.unwrap();
    assert_eq!(moved, 1);
    let back = read_batch(&r, 0, 10).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].event, ev(0));
    assert!(back[0].seq > b[1].seq, "sequence numbers only grow");
    assert_eq!(h.state.events.load(Ordering::Relaxed), 1);
    assert_eq!(h.state.dead_letters.load(Ordering::Relaxed), 1);
    assert_eq!(h.state.bytes.load(Ordering::Relaxed), ev(0).size());
    stop(w, h).await;
}

#[tokio::test]
async fn bounded_reads_stop_at_the_byte_limit_and_skip_parked_topics() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX);
    let mut parked = ev(1);
    parked.topic = "parked".into();
    h.append(vec![ev(0), parked, ev(2), ev(3)]).await.unwrap();
    let r = open_reader(dir.path()).unwrap();
    let one = ev(0).size();
    let b = read_batch_bounded(&r, 0, 10, one * 2, &["parked"]).unwrap();
    let got: Vec<_> = b.iter().map(|s| s.event.clone()).collect();
    assert_eq!(got, vec![ev(0), ev(2)]);
    // A single event larger than the byte limit is still read, alone.
    let b = read_batch_bounded(&r, 0, 10, 1, &[]).unwrap();
    assert_eq!(b.len(), 1);
    // A read ahead starts past the batch already read.
    let b = read_batch_bounded(&r, 3, 10, u64::MAX, &[]).unwrap();
    assert_eq!(b.iter().map(|s| s.seq).collect::<Vec<_>>(), vec![4]);
    stop(w, h).await;
}

/// A read shares one topic string across each run of events of the same
/// topic, and never hands an event another run's topic.
#[tokio::test]
async fn a_read_shares_each_run_of_a_topic_and_keeps_every_topic_right() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX);
    let topics = ["a", "a", "b", "a", "ab", "ab", "a"];
    let events: Vec<NewEvent> = topics
        .iter()
        .enumerate()
        .map(|(i, t)| NewEvent {
            topic: (*t).into(),
            ..ev(i)
        })
        .collect();
    h.append(events.clone()).await.unwrap();
    let r = open_reader(dir.path()).unwrap();
    let b = read_batch_bounded(&r, 0, 10, u64::MAX, &[]).unwrap();
    let got: Vec<NewEvent> = b.iter().map(|s| s.event.clone()).collect();
    assert_eq!(got, events);
    let t = |i: usize| &b[i].event.topic;
    assert!(Arc::ptr_eq(t(0), t(1)) && Arc::ptr_eq(t(4), t(5)));
    assert!(!Arc::ptr_eq(t(1), t(3)), "a new run reads its topic again");
    stop(w, h).await;
}

#[test]
fn durability_modes_map_to_sqlite_synchronous_settings() {
    for (mode, expected) in [(Durability::Fsync, 2), (Durability::Os, 1)] {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(dir.path(), mode).unwrap();
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        // 0 = OFF (a power cut may corrupt the WAL), 1 = NORMAL, 2 = FULL.
        assert_eq!(sync, expected, "{mode:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_commit_answers_stalled_in_time_and_clears_when_the_disk_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = GroupCommitWriter::start_with(
        dir.path(),
        WriterOptions {
            durability: Durability::Fsync,
            quota: u64::MAX,
            commit_timeout: std::time::Duration::from_millis(200),
            max_wal_bytes: 0,
            keep_free_bytes: 0,
            dedup_window: dedup::DEFAULT_WINDOW,
        },
        None,
    )
    .unwrap();
    // Another connection holds the write lock: the writer's commit blocks
    // (busy timeout), as on a hung disk.
    let blocker = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let started = std::time::Instant::now();
    let err = h.append(vec![ev(0)]).await.unwrap_err();
    assert!(matches!(err, AppendError::Stalled(_)), "{err:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "held the request for {:?}",
        started.elapsed()
    );
    assert!(h.state.commit_stalled.load(Ordering::Relaxed));
    blocker.execute_batch("COMMIT").unwrap();
    drop(blocker);
    // The disk answers again: the next commit clears the stall.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if h.append(vec![ev(1)]).await.is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!h.state.commit_stalled.load(Ordering::Relaxed));
    stop(w, h).await;
}

/// The volume's room is measured before appends: keeping more free than the
/// volume has refuses every append (nothing written, the pod unready), while
/// the forwarder's settlements still commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_that_would_take_the_room_kept_for_deletes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let open = |keep_free_bytes| {
        GroupCommitWriter::start_with(
            dir.path(),
            WriterOptions {
                durability: Durability::Fsync,
                quota: u64::MAX,
                commit_timeout: std::time::Duration::from_secs(10),
                max_wal_bytes: 0,
                keep_free_bytes,
                dedup_window: dedup::DEFAULT_WINDOW,
            },
            None,
        )
        .unwrap()
    };
    let (w, h) = open(1);
    let last = h.append(vec![ev(1)]).await.unwrap();
    stop(w, h).await;

    let (w, h) = open(u64::MAX / 8);
    let refused = h.append(vec![ev(2)]).await;
    assert!(
        matches!(refused, Err(AppendError::DiskFull { .. })),
        "{refused:?}"
    );
    assert!(
        h.state.disk_low.load(Ordering::Relaxed),
        "unready while the volume has no room"
    );
    h.settle(vec![(last, ev(1).size())], vec![])
        .await
        .expect("deletes still commit");
    assert_eq!(h.state.events.load(Ordering::Relaxed), 0);
    stop(w, h).await;

    let (w, h) = open(1);
    h.append(vec![ev(3)]).await.unwrap();
    let conn = open_reader(dir.path()).unwrap();
    let uuids: Vec<String> = conn
        .prepare("SELECT uuid FROM events")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(uuids, [ev(3).uuid], "the refused append wrote nothing");
    stop(w, h).await;
}

/// A statement failing half-way through a request's transaction answers
/// that request with a disk error (not "stopped", as a dropped reply once
/// did), and the writer goes on.
#[tokio::test]
async fn a_commit_failing_mid_request_answers_it_with_a_disk_error() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = GroupCommitWriter::start(dir.path(), Durability::Fsync, u64::MAX, None).unwrap();
    h.append(vec![ev(0)]).await.unwrap();
    let other = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    other
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'refused'); END;",
        )
        .unwrap();
    let err = h.append(vec![ev(1)]).await.unwrap_err();
    assert!(matches!(err, AppendError::Disk(_)), "{err:?}");
    other.execute_batch("DROP TRIGGER refuse;").unwrap();
    h.append(vec![ev(2)]).await.unwrap();
    assert_eq!(h.state.events.load(Ordering::Relaxed), 2);
    drop(h);
    w.join();
}

/// A statement SQLite has to plan again on every run costs a parse: the
/// forwarder's read runs for every batch, so it must be planned once.
#[tokio::test]
async fn the_forwarders_read_is_planned_once_not_per_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX);
    h.append((0..20).map(ev).collect()).await.unwrap();
    let r = open_reader(dir.path()).unwrap();
    for (after, parked) in [
        (0, &[][..]),
        (3, &[]),
        (7, &["u"][..]),
        (9, &["u"]),
        (11, &[]),
    ] {
        let batch = read_batch_bounded(&r, after, 4, u64::MAX, parked).unwrap();
        assert_eq!(batch.len(), 4, "after {after}");
        assert!(batch.iter().all(|e| e.seq > after));
    }
    // A limit past what SQLite reads as an integer still reads.
    assert_eq!(
        read_batch_bounded(&r, 0, usize::MAX, u64::MAX, &[])
            .unwrap()
            .len(),
        20
    );
    assert_eq!(read_batch(&r, 0, usize::MAX).unwrap().len(), 20);
    for parked in [&[][..], &["u"][..]] {
        let stmt = r.prepare_cached(&read::batch_statement(parked, 4)).unwrap();
        assert_eq!(
            stmt.get_status(rusqlite::StatementStatus::RePrepare),
            0,
            "re-planned per run with {} parked topics",
            parked.len()
        );
    }
    stop(w, h).await;
}
