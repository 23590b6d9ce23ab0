//! Idempotent ingestion: retried events are acknowledged, not stored twice.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;

fn ev(i: usize) -> NewEvent {
    NewEvent {
        uuid: format!("00000000-0000-7000-8000-{i:012}"),
        topic: "t".into(),
        key: format!("k{i}").into_bytes(),
        payload: format!(r#"{{"i":{i}}}"#).into_bytes(),
        captured_at_ms: 1_000 + i as i64,
        client_uuid: true,
    }
}

fn start(dir: &Path, quota: u64, window: Duration) -> (GroupCommitWriter, WriterHandle) {
    let opts = WriterOptions {
        quota,
        dedup_window: window,
        ..WriterOptions::drain(Durability::Fsync)
    };
    GroupCommitWriter::start_with(dir, opts, None).unwrap()
}

async fn stop(w: GroupCommitWriter, h: WriterHandle) {
    drop(h);
    tokio::task::spawn_blocking(move || w.join()).await.unwrap();
}

fn uuids(r: &Connection) -> Vec<String> {
    read_batch(r, 0, 1000)
        .unwrap()
        .into_iter()
        .map(|s| s.event.uuid)
        .collect()
}

/// The uuids the window remembers, in row order.
fn remembered_uuids(r: &Connection) -> Vec<String> {
    r.prepare("SELECT uuid FROM recent_uuids")
        .unwrap()
        .query_map([], |x| x.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Settles every buffered event as delivered; returns how many.
async fn deliver_all(h: &WriterHandle, r: &Connection) -> usize {
    let all: Vec<(i64, u64)> = read_batch(r, 0, 100_000)
        .unwrap()
        .iter()
        .map(|s| (s.seq, s.event.size()))
        .collect();
    let n = all.len();
    h.settle(all, vec![]).await.unwrap();
    n
}

/// Makes every remembered uuid look delivered `ago` earlier than it was.
fn age_window(dir: &Path, ago: Duration) {
    let c = open_writer(dir, Durability::Fsync).unwrap();
    c.execute(
        "UPDATE recent_uuids SET delivered_at_ms = delivered_at_ms - ?1",
        [ago.as_millis() as i64],
    )
    .unwrap();
}

#[tokio::test]
async fn the_same_batch_twice_is_stored_once_and_acknowledged_alike() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX, dedup::DEFAULT_WINDOW);
    let first = h.append(vec![ev(0), ev(1)]).await;
    let again = h.append(vec![ev(0), ev(1)]).await;
    assert!(first.is_ok() && again.is_ok(), "{first:?} {again:?}");
    let r = open_reader(dir.path()).unwrap();
    assert_eq!(uuids(&r), vec![ev(0).uuid, ev(1).uuid]);
    assert_eq!(h.state.events.load(Ordering::Relaxed), 2);
    assert_eq!(
        h.state.bytes.load(Ordering::Relaxed),
        ev(0).size() + ev(1).size()
    );
    // A retry overlapping the first request stores only what is new.
    h.append(vec![ev(1), ev(2)]).await.unwrap();
    assert_eq!(uuids(&r), vec![ev(0).uuid, ev(1).uuid, ev(2).uuid]);
    stop(w, h).await;
}

#[tokio::test]
async fn duplicates_inside_one_request_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX, dedup::DEFAULT_WINDOW);
    h.append(vec![ev(0), ev(1), ev(0), ev(1), ev(0)])
        .await
        .unwrap();
    let r = open_reader(dir.path()).unwrap();
    assert_eq!(uuids(&r), vec![ev(0).uuid, ev(1).uuid]);
    assert_eq!(h.state.events.load(Ordering::Relaxed), 2);
    stop(w, h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_in_one_group_commit_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX, dedup::DEFAULT_WINDOW);
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move { h.append(vec![ev(i % 4), ev(100)]).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let r = open_reader(dir.path()).unwrap();
    let mut got = uuids(&r);
    got.sort();
    let want: Vec<String> = [0, 1, 2, 3, 100].iter().map(|&i| ev(i).uuid).collect();
    assert_eq!(got, want);
    stop(w, h).await;
}

#[tokio::test]
async fn a_uuid_delivered_within_the_window_is_acknowledged_and_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX, dedup::DEFAULT_WINDOW);
    let r = open_reader(dir.path()).unwrap();
    // The whole head delivered: the range-delete path.
    h.append(vec![ev(0), ev(1)]).await.unwrap();
    assert_eq!(deliver_all(&h, &r).await, 2);
    // Part of the queue delivered: the row-by-row path.
    h.append(vec![ev(2), ev(3), ev(4)]).await.unwrap();
    let b = read_batch(&r, 0, 10).unwrap();
    h.settle(vec![(b[1].seq, b[1].event.size())], vec![])
        .await
        .unwrap();
    assert_eq!(uuids(&r), vec![ev(2).uuid, ev(4).uuid]);
    let retry: Vec<NewEvent> = (0..5).map(ev).collect();
    assert_eq!(h.append(retry).await.unwrap(), 0, "nothing new stored");
    assert_eq!(uuids(&r), vec![ev(2).uuid, ev(4).uuid]);
    assert_eq!(h.state.events.load(Ordering::Relaxed), 2);
    assert_eq!(
        dedup::remembered(&r, dedup::DEFAULT_WINDOW, now_ms()).unwrap(),
        3
    );
    stop(w, h).await;
}

#[tokio::test]
async fn after_the_window_a_uuid_is_stored_again() {
    let dir = tempfile::tempdir().unwrap();
    let window = Duration::from_secs(600);
    let (w, h) = start(dir.path(), u64::MAX, window);
    let r = open_reader(dir.path()).unwrap();
    h.append(vec![ev(0), ev(1)]).await.unwrap();
    deliver_all(&h, &r).await;
    // Just inside the window: still a duplicate.
    age_window(dir.path(), window - Duration::from_secs(30));
    h.append(vec![ev(0)]).await.unwrap();
    assert!(uuids(&r).is_empty());
    // Past it: a new event.
    age_window(dir.path(), Duration::from_secs(60));
    h.append(vec![ev(0)]).await.unwrap();
    assert_eq!(uuids(&r), vec![ev(0).uuid]);
    stop(w, h).await;
}

#[tokio::test]
async fn the_window_and_the_buffered_uuids_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX, dedup::DEFAULT_WINDOW);
    let r = open_reader(dir.path()).unwrap();
    h.append(vec![ev(0)]).await.unwrap();
    deliver_all(&h, &r).await;
    h.append(vec![ev(1)]).await.unwrap();
    let window_bytes = h.state.window_bytes.load(Ordering::Relaxed);
    assert_eq!(window_bytes, dedup::remembered_size(&ev(0).uuid));
    stop(w, h).await;
    let (w, h) = start(dir.path(), u64::MAX, dedup::DEFAULT_WINDOW);
    assert_eq!(h.state.window_bytes.load(Ordering::Relaxed), window_bytes);
    h.append(vec![ev(0), ev(1), ev(2)]).await.unwrap();
    assert_eq!(uuids(&r), vec![ev(1).uuid, ev(2).uuid]);
    stop(w, h).await;
}

/// A writer that delivers before it ever appends (a drain, or a pod whose
/// first work after a restart is forwarding) builds its index only at the
/// first append, from the table: what it delivered meanwhile is found.
#[tokio::test]
async fn deliveries_before_the_first_append_are_found_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX, dedup::DEFAULT_WINDOW);
    h.append(vec![ev(0), ev(1)]).await.unwrap();
    stop(w, h).await;
    let (w, h) = start(dir.path(), u64::MAX, dedup::DEFAULT_WINDOW);
    let r = open_reader(dir.path()).unwrap();
    assert_eq!(deliver_all(&h, &r).await, 2);
    h.append(vec![ev(0), ev(1), ev(2)]).await.unwrap();
    assert_eq!(uuids(&r), vec![ev(2).uuid]);
    stop(w, h).await;
}

#[tokio::test]
async fn with_the_window_off_retries_are_stored_again() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX, Duration::ZERO);
    let r = open_reader(dir.path()).unwrap();
    h.append(vec![ev(0), ev(0)]).await.unwrap();
    deliver_all(&h, &r).await;
    h.append(vec![ev(0)]).await.unwrap();
    assert_eq!(uuids(&r), vec![ev(0).uuid]);
    assert_eq!(h.state.window_bytes.load(Ordering::Relaxed), 0);
    stop(w, h).await;
}

#[tokio::test]
async fn the_window_counts_against_the_quota_and_gives_way_to_events() {
    let dir = tempfile::tempdir().unwrap();
    let one = ev(0).size();
    let remembered = dedup::remembered_size(&ev(0).uuid);
    assert!(
        remembered > one,
        "the test needs a uuid larger than an event"
    );
    let quota = 3 * one;
    let (w, h) = start(dir.path(), quota, dedup::DEFAULT_WINDOW);
    let r = open_reader(dir.path()).unwrap();
    h.append(vec![ev(0)]).await.unwrap();
    deliver_all(&h, &r).await;
    assert_eq!(h.state.used_bytes(), remembered);
    assert_eq!(h.state.held_bytes(), 0);
    assert_eq!(
        h.state.window_bytes.load(Ordering::Relaxed),
        dedup::window_bytes(&r).unwrap()
    );
    // Two events and the remembered uuid do not fit together: the window
    // gives way, the events are taken, the quota holds.
    h.append(vec![ev(1), ev(2)]).await.unwrap();
    assert_eq!(h.state.window_bytes.load(Ordering::Relaxed), 0);
    assert_eq!(dedup::window_bytes(&r).unwrap(), 0);
    assert!(h.state.used_bytes() <= quota);
    // So a late retry of the evicted uuid is stored again.
    h.append(vec![ev(0)]).await.unwrap();
    assert_eq!(uuids(&r), vec![ev(1).uuid, ev(2).uuid, ev(0).uuid]);
    assert!(h.state.over_quota.load(Ordering::Relaxed));
    let refused = h.append(vec![ev(3)]).await;
    assert!(
        matches!(refused, Err(AppendError::QuotaExceeded { .. })),
        "{refused:?}"
    );
    // At the quota, a retry of what is buffered needs no room: acknowledged.
    h.append(vec![ev(0), ev(1), ev(2)]).await.unwrap();
    assert_eq!(h.state.events.load(Ordering::Relaxed), 3);
    stop(w, h).await;
}

#[tokio::test]
async fn a_settlement_never_lets_the_window_past_the_quota() {
    let dir = tempfile::tempdir().unwrap();
    let quota = 12 * ev(39).size();
    let (w, h) = start(dir.path(), quota, dedup::DEFAULT_WINDOW);
    let r = open_reader(dir.path()).unwrap();
    for round in 0..4 {
        h.append((round * 10..round * 10 + 10).map(ev).collect())
            .await
            .unwrap();
        deliver_all(&h, &r).await;
        assert!(h.state.used_bytes() <= quota, "round {round}");
        assert_eq!(
            h.state.window_bytes.load(Ordering::Relaxed),
            dedup::window_bytes(&r).unwrap()
        );
    }
    // The newest uuids are the ones kept.
    h.append(vec![ev(39)]).await.unwrap();
    assert!(uuids(&r).is_empty());
    stop(w, h).await;
}

#[test]
fn pruning_forgets_only_expired_uuids_a_bounded_chunk_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let c = open_writer(dir.path(), Durability::Os).unwrap();
    let now = now_ms();
    let window = dedup::DEFAULT_WINDOW.as_millis() as i64;
    let insert = |n: usize, at: i64| {
        for i in 0..n {
            c.execute(
                "INSERT INTO recent_uuids(uuid, delivered_at_ms) VALUES (?1, ?2)",
                (format!("{at}-{i}"), at),
            )
            .unwrap();
        }
    };
    insert(3000, now - window - 1);
    insert(10, now);
    let count = || -> i64 {
        c.query_row("SELECT count(*) FROM recent_uuids", [], |r| r.get(0))
            .unwrap()
    };
    let w = dedup::Window::new(dedup::DEFAULT_WINDOW);
    let before = dedup::window_bytes(&c).unwrap();
    let freed = w.prune(&c, 0, now).unwrap();
    assert_eq!(count(), 3010 - 1024, "one prune is bounded");
    assert_eq!(dedup::window_bytes(&c).unwrap(), before - freed);
    // A settlement of many events prunes as many as it remembers, twice over.
    w.prune(&c, 1500, now).unwrap();
    assert_eq!(count(), 3010 - 1024 - 1500);
    while w.prune(&c, 0, now).unwrap() > 0 {}
    assert_eq!(count(), 10, "unexpired uuids are kept");
}

#[tokio::test]
async fn settlements_keep_the_window_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX, Duration::from_secs(600));
    let r = open_reader(dir.path()).unwrap();
    for round in 0..5 {
        let batch: Vec<NewEvent> = (round * 500..(round + 1) * 500).map(ev).collect();
        h.append(batch).await.unwrap();
        deliver_all(&h, &r).await;
        // Everything remembered so far is now past the window.
        age_window(dir.path(), Duration::from_secs(601));
    }
    let left: i64 = r
        .query_row("SELECT count(*) FROM recent_uuids", [], |x| x.get(0))
        .unwrap();
    // Each settlement prunes at least what it remembered: only the last
    // round's uuids (expired by now, pruned by the next write) can be left.
    assert!(left <= 500, "{left} uuids left in the window");
    assert_eq!(
        h.state.window_bytes.load(Ordering::Relaxed),
        dedup::window_bytes(&r).unwrap()
    );
    stop(w, h).await;
}

#[tokio::test]
async fn a_version_1_buffer_is_migrated_and_its_events_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    {
        let c = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             INSERT INTO meta VALUES ('schema_version', '1'), ('volume_id', 'v1-volume');
             CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, uuid TEXT NOT NULL,
                 topic TEXT NOT NULL, key BLOB NOT NULL, payload BLOB NOT NULL,
                 captured_at_ms INTEGER NOT NULL);
             CREATE TABLE dead_letters (seq INTEGER PRIMARY KEY, uuid TEXT NOT NULL,
                 topic TEXT NOT NULL, key BLOB NOT NULL, payload BLOB NOT NULL,
                 captured_at_ms INTEGER NOT NULL, reason TEXT NOT NULL,
                 failed_at_ms INTEGER NOT NULL, dlq_delivered INTEGER NOT NULL DEFAULT 0);",
        )
        .unwrap();
        let e = ev(0);
        c.execute(
            "INSERT INTO events(uuid, topic, key, payload, captured_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            (&e.uuid, &e.topic, &e.key, &e.payload, e.captured_at_ms),
        )
        .unwrap();
    }
    let (w, h) = start(dir.path(), u64::MAX, dedup::DEFAULT_WINDOW);
    h.append(vec![ev(0), ev(1)]).await.unwrap();
    let r = open_reader(dir.path()).unwrap();
    assert_eq!(uuids(&r), vec![ev(0).uuid, ev(1).uuid]);
    let s = stats(&r).unwrap();
    assert_eq!(
        (s.schema_version, s.volume_id.as_str()),
        (SCHEMA_VERSION, "v1-volume")
    );
    stop(w, h).await;
}

#[tokio::test]
async fn a_dead_lettered_uuid_is_not_stored_again_kept_or_copied() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX, dedup::DEFAULT_WINDOW);
    let r = open_reader(dir.path()).unwrap();
    h.append(vec![ev(0), ev(1)]).await.unwrap();
    let b = read_batch(&r, 0, 10).unwrap();
    let dead = |s: &StoredEvent| DeadLetter {
        seq: s.seq,
        size: s.event.size(),
        reason: "too_large: x".into(),
    };
    h.settle(vec![], vec![dead(&b[0]), dead(&b[1])])
        .await
        .unwrap();
    // Kept as dead letters: a retry is acknowledged, not queued again.
    h.append(vec![ev(0), ev(1)]).await.unwrap();
    assert!(uuids(&r).is_empty());
    // One copied to the dead-letter topic: remembered in its place.
    h.dead_letters_copied(vec![b[0].seq]).await.unwrap();
    h.append(vec![ev(0)]).await.unwrap();
    assert!(uuids(&r).is_empty());
    // A replayed dead letter keeps its uuid and returns to the queue once.
    assert_eq!(h.replay_dead_letters(vec![b[1].seq]).await.unwrap(), 1);
    h.append(vec![ev(1)]).await.unwrap();
    assert_eq!(uuids(&r), vec![ev(1).uuid]);
    stop(w, h).await;
}

/// A uuid made by the server is new by construction: such events are not
/// indexed, looked up or remembered, even when (as a test can arrange, and
/// no client can) two of them carry the same uuid; client uuids among them
/// are deduplicated as before, delivered one at a time or by range.
#[tokio::test]
async fn server_made_uuids_are_neither_indexed_nor_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX, dedup::DEFAULT_WINDOW);
    let r = open_reader(dir.path()).unwrap();
    let made = |i| NewEvent {
        client_uuid: false,
        ..ev(i)
    };
    h.append(vec![made(0), made(0), ev(1)]).await.unwrap();
    assert_eq!(uuids(&r), vec![ev(0).uuid, ev(0).uuid, ev(1).uuid]);
    let indexed: i64 = r
        .query_row(
            "SELECT count(*) FROM events INDEXED BY events_client_uuid WHERE client_uuid = 1",
            [],
            |x| x.get(0),
        )
        .unwrap();
    assert_eq!(indexed, 1, "only the client's uuid is in the index");
    assert_eq!(deliver_all(&h, &r).await, 3);
    let remembered = remembered_uuids(&r);
    assert_eq!(remembered, vec![ev(1).uuid]);
    assert_eq!(
        h.state.window_bytes.load(Ordering::Relaxed),
        dedup::window_bytes(&r).unwrap(),
        "the quota counts what is remembered, no more"
    );
    // The client's retry is acknowledged without being stored; the server's
    // events are new again.
    h.append(vec![ev(1), made(0)]).await.unwrap();
    assert_eq!(uuids(&r), vec![ev(0).uuid]);
    // Delivered one by one (not the whole head): the same.
    h.append(vec![ev(2), made(3)]).await.unwrap();
    let b = read_batch(&r, 0, 10).unwrap();
    h.settle(vec![(b[1].seq, b[1].event.size())], vec![])
        .await
        .unwrap();
    h.settle(vec![(b[2].seq, b[2].event.size())], vec![])
        .await
        .unwrap();
    let n: i64 = r
        .query_row("SELECT count(*) FROM recent_uuids", [], |x| x.get(0))
        .unwrap();
    assert_eq!(n, 2, "ev(1) and ev(2), not the server's uuid");
    stop(w, h).await;
}

/// The client-uuid column is not a new schema version because a rolled-back
/// binary still works on the file: its inserts (without the column) count as
/// client uuids and stay deduplicated, and its own full index is dropped
/// again when this binary returns.
#[tokio::test]
async fn a_rolled_back_binary_writes_rows_that_stay_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    drop(open_writer(dir.path(), Durability::Fsync).unwrap());
    {
        // What the previous release does on open and on append.
        let c = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.execute_batch("CREATE INDEX IF NOT EXISTS events_uuid ON events(uuid);")
            .unwrap();
        let e = ev(0);
        c.execute(
            "INSERT INTO events(uuid, topic, key, payload, captured_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            (&e.uuid, &e.topic, &e.key, &e.payload, e.captured_at_ms),
        )
        .unwrap();
    }
    let (w, h) = start(dir.path(), u64::MAX, dedup::DEFAULT_WINDOW);
    h.append(vec![ev(0), ev(1)]).await.unwrap();
    let r = open_reader(dir.path()).unwrap();
    assert_eq!(uuids(&r), vec![ev(0).uuid, ev(1).uuid]);
    let indexes: Vec<String> = r
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events'")
        .unwrap()
        .query_map([], |x| x.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(indexes, ["events_client_uuid"]);
    assert_eq!(stats(&r).unwrap().schema_version, 2);
    stop(w, h).await;
}

/// A settlement that is not the whole head (Kafka acknowledges partitions
/// out of order) deletes exactly the listed rows in one statement: the
/// counts stay true with a seq listed twice or already gone, and only the
/// client uuids among the delivered rows are remembered.
#[tokio::test]
async fn an_interleaved_settlement_deletes_and_remembers_exactly_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX, dedup::DEFAULT_WINDOW);
    let r = open_reader(dir.path()).unwrap();
    // Client uuids at even i, server-made at odd i.
    let made = |i: usize| NewEvent {
        client_uuid: i.is_multiple_of(2),
        ..ev(i)
    };
    h.append((0..60).map(made).collect()).await.unwrap();
    let b = read_batch(&r, 0, 100).unwrap();
    // Every third row from the second on, the head left in place.
    let picked: Vec<&StoredEvent> = b.iter().skip(1).step_by(3).collect();
    let mut delivered: Vec<(i64, u64)> = picked.iter().map(|s| (s.seq, s.event.size())).collect();
    // One listed twice, and one a seq that is not (or no longer) there.
    delivered.push(delivered[0]);
    delivered.push((b.last().unwrap().seq + 1_000, 7));
    h.settle(delivered, vec![]).await.unwrap();

    let kept: Vec<String> = b
        .iter()
        .filter(|s| !picked.iter().any(|p| p.seq == s.seq))
        .map(|s| s.event.uuid.clone())
        .collect();
    assert_eq!(uuids(&r), kept);
    let (events, bytes) = totals(&r).unwrap();
    assert_eq!(h.state.events.load(Ordering::Relaxed), events);
    assert_eq!(h.state.bytes.load(Ordering::Relaxed), bytes);
    let mut remembered = remembered_uuids(&r);
    remembered.sort();
    // (Read back, every event says `client_uuid`: the rows are what tell.)
    let mut expected: Vec<String> = (1..60)
        .step_by(3)
        .filter(|i| made(*i).client_uuid)
        .map(|i| ev(i).uuid)
        .collect();
    expected.sort();
    assert!(!expected.is_empty());
    assert_eq!(remembered, expected);
    assert_eq!(
        h.state.window_bytes.load(Ordering::Relaxed),
        dedup::window_bytes(&r).unwrap()
    );
    // A retry of the client's events stores nothing: those not delivered
    // are still buffered, the delivered ones remembered.
    let retry: Vec<NewEvent> = (0..60usize)
        .filter(|i| i.is_multiple_of(2))
        .map(made)
        .collect();
    assert_eq!(h.append(retry).await.unwrap(), 0, "nothing new stored");
    stop(w, h).await;
}
