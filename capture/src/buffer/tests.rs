use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

fn ev(i: usize) -> NewEvent {
    NewEvent {
        uuid: format!("00000000-0000-7000-8000-{i:012}"),
        topic: "t".into(),
        key: format!("k{i}").into_bytes(),
        payload: format!(r#"{{"i":{i}}}"#).into_bytes(),
        captured_at_ms: 1_000 + i as i64,
    }
}

fn start(dir: &Path, quota: u64) -> (GroupCommitWriter, WriterHandle) {
    GroupCommitWriter::start(dir, Durability::Fsync, quota, None).unwrap()
}

async fn stop(w: GroupCommitWriter, h: WriterHandle) {
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
    assert!(h.state.over_quota.load(Ordering::Relaxed));
    let r = open_reader(dir.path()).unwrap();
    assert_eq!(totals(&r).unwrap().0, 2);
    // Draining brings readiness back by itself.
    let all: Vec<(i64, u64)> = read_batch(&r, 0, 10)
        .unwrap()
        .iter()
        .map(|s| (s.seq, s.event.size()))
        .collect();
    h.settle(all, vec![]).await.unwrap();
    assert!(!h.state.over_quota.load(Ordering::Relaxed));
    h.append(vec![ev(2), ev(3)]).await.unwrap();
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
        vec![(b[1].seq, b[1].event.size(), "too_large: boom".into())],
    )
    .await
    .unwrap();
    assert_eq!(totals(&r).unwrap(), (0, 0));
    let dead = dead_letters(&r).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1, ev(1).uuid);
    assert_eq!(dead[0].3, "too_large: boom");
    let s = stats(&r).unwrap();
    assert_eq!((s.events, s.dead_letters), (0, 1));
    stop(w, h).await;
}

#[tokio::test]
async fn clean_mark_needs_an_empty_buffer_and_is_cleared_by_new_events() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = start(dir.path(), u64::MAX);
    h.append(vec![ev(0)]).await.unwrap();
    assert!(!h.mark_clean_if_empty().await.unwrap());
    let r = open_reader(dir.path()).unwrap();
    let b = read_batch(&r, 0, 10).unwrap();
    h.settle(vec![(b[0].seq, b[0].event.size())], vec![])
        .await
        .unwrap();
    assert!(h.mark_clean_if_empty().await.unwrap());
    assert!(stats(&r).unwrap().clean);
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
