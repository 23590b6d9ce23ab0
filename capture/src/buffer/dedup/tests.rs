//! The window against its table: what the index in memory finds, after
//! commits, rollbacks, prunes, a restart and at its memory bound.

use super::recent::SEGMENT_IDS;
use super::*;
use crate::buffer::{Durability, open_writer};

const MINUTE_MS: i64 = 60_000;

fn event(uuid: &str) -> NewEvent {
    NewEvent {
        uuid: uuid.to_owned(),
        topic: "t".into(),
        key: Vec::new(),
        payload: b"{}".to_vec(),
        captured_at_ms: 0,
        client_uuid: true,
    }
}

fn uuid(i: i64) -> String {
    format!("u-{i}")
}

/// Buffers client uuids `u-from` .. `u-to` (exclusive) as events.
fn buffer(conn: &Connection, from: i64, to: i64) {
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?2)
         INSERT INTO events(uuid, topic, key, payload, captured_at_ms, client_uuid)
         SELECT 'u-' || i, 't', x'', x'7b7d', 0, 1 FROM n",
        (from, to),
    )
    .unwrap();
}

/// Delivers every buffered event at `now` in one committed transaction, as
/// a settlement does; returns the change in remembered bytes.
fn deliver_all(conn: &mut Connection, w: &Window, now: i64) -> i64 {
    let tx = conn.transaction().unwrap();
    let (through, rows, bytes): (i64, i64, i64) = tx
        .query_row(
            "SELECT coalesce(max(seq), 0), count(*), coalesce(sum(length(uuid)), 0) FROM events",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let freed = w.bound_index(&tx).unwrap();
    let added = w.remember_through(&tx, through, rows, bytes, now).unwrap();
    tx.execute("DELETE FROM events WHERE seq <= ?1", [through])
        .unwrap();
    tx.commit().unwrap();
    w.committed();
    added as i64 - freed as i64
}

fn is_duplicate(conn: &Connection, w: &Window, uuid: &str, now: i64) -> bool {
    w.duplicates(conn, &[event(uuid)], now, true).unwrap()[0]
}

#[test]
fn a_rolled_back_prune_leaves_its_uuids_found() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open_writer(dir.path(), Durability::Os).unwrap();
    let w = Window::new(DEFAULT_WINDOW);
    buffer(&c, 0, 10);
    deliver_all(&mut c, &w, 0);
    let later = 11 * MINUTE_MS;
    {
        // Everything is expired by `later`; the prune deletes it, then the
        // transaction fails.
        let tx = c.transaction().unwrap();
        assert!(w.prune(&tx, 0, later).unwrap() > 0);
        drop(tx);
        w.rolled_back();
    }
    // Still in the table, still within the window at time 0 + 1 minute.
    assert!(is_duplicate(&c, &w, &uuid(3), MINUTE_MS));
    // The same prune committed: forgotten, and the index lets go.
    let tx = c.transaction().unwrap();
    w.prune(&tx, 0, later).unwrap();
    tx.commit().unwrap();
    w.committed();
    assert!(!is_duplicate(&c, &w, &uuid(3), MINUTE_MS));
    assert_eq!(
        w.recent().index.segments(),
        0,
        "an empty table needs no segment"
    );
}

#[test]
fn a_rolled_back_remember_adds_nothing_and_a_later_one_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open_writer(dir.path(), Durability::Os).unwrap();
    let w = Window::new(DEFAULT_WINDOW);
    buffer(&c, 0, 5);
    {
        let tx = c.transaction().unwrap();
        w.remember_through(&tx, i64::MAX, 5, 15, 0).unwrap();
        drop(tx);
        w.rolled_back();
    }
    assert_eq!(w.recent().index.segments(), 0);
    // The rows the rolled-back insert would have had get other uuids.
    c.execute("DELETE FROM events", []).unwrap();
    assert!(!is_duplicate(&c, &w, &uuid(1), 0));
    buffer(&c, 100, 105);
    deliver_all(&mut c, &w, 0);
    assert!(is_duplicate(&c, &w, &uuid(102), 0));
    assert!(!is_duplicate(&c, &w, &uuid(2), 0));
}

/// More than a segment of uuids, remembered live and then loaded back from
/// the table: every one inside the window is found, none outside it.
#[test]
fn every_remembered_uuid_is_found_live_after_pruning_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open_writer(dir.path(), Durability::Os).unwrap();
    let w = Window::new(DEFAULT_WINDOW);
    let total = SEGMENT_IDS + SEGMENT_IDS / 2;
    // Two deliveries, ten minutes apart.
    buffer(&c, 0, total / 2);
    deliver_all(&mut c, &w, 0);
    buffer(&c, total / 2, total);
    deliver_all(&mut c, &w, 9 * MINUTE_MS);
    let sample = |w: &Window, c: &Connection, now: i64, want_old: bool| {
        for i in (0..total).step_by(997) {
            let old = i < total / 2;
            let want = if old { want_old } else { true };
            assert_eq!(
                is_duplicate(c, w, &uuid(i), now),
                want,
                "{} at {now}",
                uuid(i)
            );
            assert!(!is_duplicate(c, w, &format!("absent-{i}"), now));
        }
    };
    sample(&w, &c, 9 * MINUTE_MS, true);
    // Past the first delivery's window: its uuids are no longer duplicates,
    // pruned or not.
    sample(&w, &c, 11 * MINUTE_MS, false);
    loop {
        let tx = c.transaction().unwrap();
        let freed = w.prune(&tx, 100_000, 11 * MINUTE_MS).unwrap();
        tx.commit().unwrap();
        w.committed();
        if freed == 0 {
            break;
        }
    }
    sample(&w, &c, 11 * MINUTE_MS, false);
    let loaded = Window::load(&c, DEFAULT_WINDOW).unwrap();
    sample(&loaded, &c, 11 * MINUTE_MS, false);
    assert_eq!(
        loaded.recent().index.segments(),
        w.recent().index.segments(),
        "the pruned segment is freed in both"
    );
}

/// At its memory bound the index forgets the oldest uuids (their rows go
/// too, and their bytes leave the quota), and keeps finding the rest.
#[test]
fn at_its_bound_the_index_forgets_the_oldest_uuids() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open_writer(dir.path(), Durability::Os).unwrap();
    let mut w = Window::new(DEFAULT_WINDOW);
    w.max_segments = 2;
    let step = SEGMENT_IDS / 2;
    let mut remembered = 0;
    for round in 0..5 {
        buffer(&c, round * step, (round + 1) * step);
        remembered += deliver_all(&mut c, &w, 0);
        assert!(w.recent().index.segments() <= 3, "round {round}");
    }
    assert_eq!(
        remembered,
        window_bytes(&c).unwrap() as i64,
        "the quota's count follows the rows"
    );
    let first_kept: i64 = c
        .query_row("SELECT min(id) FROM recent_uuids", [], |r| r.get(0))
        .unwrap();
    assert!(first_kept > 1, "the oldest were forgotten");
    for i in (0..5 * step).step_by(1009) {
        let kept = i + 1 >= first_kept;
        assert_eq!(is_duplicate(&c, &w, &uuid(i), 0), kept, "{}", uuid(i));
    }
}
