//! Appends go in multi-row statements (`commit/insert.rs`): every request
//! size around a chunk's edge, and a failure inside a chunk.

use std::sync::atomic::Ordering;

use super::tests::{ev, start, stop};
use super::*;

/// Appends go in chunks of `insert::ROWS` rows per statement: every size
/// around a chunk's edge keeps each event whole and in request order, with
/// duplicates left out and the answer naming the last event's seq.
#[tokio::test]
async fn requests_of_every_size_around_a_chunk_keep_order_and_fields() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX);
    let r = open_reader(dir.path()).unwrap();
    let mut expected = Vec::new();
    let mut next = 0;
    for n in [1, 15, 16, 17, 31, 32, 33, 100] {
        let batch: Vec<NewEvent> = (next..next + n).map(ev).collect();
        next += n;
        let last = h.append(batch.clone()).await.unwrap();
        expected.extend(batch);
        let stored = read_batch(&r, 0, 1_000).unwrap();
        assert_eq!(stored.last().unwrap().seq, last, "request of {n}");
    }
    // Duplicates of earlier client uuids, at a chunk's edges, are skipped.
    let dup_at = [0, 15, 16, 39];
    let batch: Vec<NewEvent> = (0..40)
        .map(|i| {
            if dup_at.contains(&i) {
                ev(i)
            } else {
                ev(next + i)
            }
        })
        .collect();
    let last = h.append(batch.clone()).await.unwrap();
    for (i, e) in batch.into_iter().enumerate() {
        if !dup_at.contains(&i) {
            expected.push(e);
        }
    }
    let stored = read_batch(&r, 0, 1_000).unwrap();
    assert_eq!(stored.last().unwrap().seq, last);
    let events: Vec<NewEvent> = stored.iter().map(|s| s.event.clone()).collect();
    assert_eq!(events.len(), expected.len());
    assert_eq!(events, expected);
    assert!(stored.windows(2).all(|p| p[1].seq == p[0].seq + 1));
    assert_eq!(
        h.state.events.load(Ordering::Relaxed),
        expected.len() as u64
    );
    stop(w, h).await;
}

/// One row refused in the middle of a full chunk fails the whole request:
/// none of its events, not even the chunks before, are kept.
#[tokio::test]
async fn a_row_refused_inside_a_chunk_writes_nothing_of_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX);
    h.append(vec![ev(0)]).await.unwrap();
    let other = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    other
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.key = CAST('k21' AS BLOB)
             BEGIN SELECT RAISE(ABORT, 'refused'); END;",
        )
        .unwrap();
    let err = h.append((1..41).map(ev).collect()).await.unwrap_err();
    assert!(matches!(err, AppendError::Disk(_)), "{err:?}");
    let r = open_reader(dir.path()).unwrap();
    assert_eq!(
        totals(&r).unwrap().0,
        1,
        "the refused request wrote nothing"
    );
    assert_eq!(h.state.events.load(Ordering::Relaxed), 1);
    other.execute_batch("DROP TRIGGER refuse;").unwrap();
    h.append((1..41).map(ev).collect()).await.unwrap();
    assert_eq!(totals(&r).unwrap().0, 41);
    stop(w, h).await;
}
