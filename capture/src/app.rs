//! The three commands wired together: `serve`, `flush`, `inspect`.
//!
//! Shutdown order for `serve` on SIGTERM/SIGINT: unready and 503 for new
//! requests at once; wait for in-flight requests to be answered; drain the
//! buffer into Kafka until empty or the drain timeout; mark the buffer clean
//! when empty; hand over to the volume guard; close the listener; exit 0.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use crate::buffer::{self, DirLock, GroupCommitWriter, Stats, WriterOptions};
use crate::config::{Delivery, FlushArgs, InspectArgs, KafkaConfig, ServeConfig};
use crate::forward::{self, ExactlyOnce, Forwarder, RunUntil, SharedProducer};
use crate::http::{self, AppState, Health};
use crate::metrics::Metrics;
use crate::volume::VolumeGuard;

/// Result of a command.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The buffer failed to open or write.
    #[error(transparent)]
    Buffer(#[from] buffer::Error),
    /// Kafka setup failed.
    #[error(transparent)]
    Kafka(#[from] forward::Error),
    /// The listener could not be bound.
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("http server: {0}")]
    Serve(std::io::Error),
    /// `flush` delivered every event but dead letters are still kept.
    #[error("{count} dead letters remain in {dir}; {}", if *dlq { "the dead-letter topic did not take them yet" } else { "export or replay them with `holdfast-capture dead-letters`, or set --dead-letter-topic" })]
    DeadLettersRemain { count: u64, dir: String, dlq: bool },
    /// A quarantined (damaged) buffer file was not salvaged yet.
    #[error("{count} quarantined buffer files in {dir} are not salvaged yet")]
    Quarantined { count: usize, dir: String },
    /// The buffer file is damaged (`inspect`).
    #[error(
        "buffer in {dir} is damaged ({why}); the next serve or flush quarantines it and salvages every readable event"
    )]
    Damaged { dir: String, why: String },
    /// A write to the buffer failed (disk error).
    #[error("buffer write failed: {0}")]
    Write(buffer::AppendError),
    /// `flush` gave up with events left.
    #[error("{remaining} events remain in {dir} after {secs}s; kafka did not take them")]
    NotDrained {
        remaining: u64,
        dir: String,
        secs: u64,
    },
}

fn commit_observer(metrics: &Arc<Metrics>) -> buffer::writer::CommitObserver {
    let m = metrics.clone();
    Box::new(move |commands| m.commit_batch.observe(commands as f64))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "shutting down"),
    }
}

/// Guards the volume, retrying with backoff until `Retain` reads back;
/// `/readyz` shows why meanwhile.
async fn guard_volume(volume: &VolumeGuard, volume_id: &str, health: &Health) {
    let mut delay = Duration::from_millis(250);
    loop {
        match volume.before_ready(volume_id).await {
            Ok(()) => {
                *health
                    .volume_unguarded
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = None;
                return;
            }
            Err(reason) => {
                tracing::warn!(%reason, retry_ms = delay.as_millis() as u64, "volume not guarded; staying unready");
                *health
                    .volume_unguarded
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(reason);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(15));
            }
        }
    }
}

/// Quarantined buffer files not salvaged yet (they keep the volume dirty).
fn quarantined_files(dir: &std::path::Path) -> usize {
    match buffer::quarantine::unsalvaged_quarantine(dir) {
        Ok(n) => n,
        Err(e) => {
            // Unknown counts as dirty: never flip a volume we could not check.
            tracing::error!(error = %e, "could not list quarantined buffer files");
            1
        }
    }
}

fn metrics_dead_copied(metrics: &Metrics) -> u64 {
    metrics.dead_letters_copied.get()
}

/// Least room kept free while the guard is on: the WAL frames of the largest
/// settlement (1,000 deletes, their uuid index entries and the dedup window's
/// inserts) must fit, or a drained disk can stay too full to checkpoint.
const MIN_KEEP_FREE: u64 = 512 << 10;

/// Room the volume guard keeps free for half the reserve `half` (0: off).
fn keep_free_bytes(half: u64) -> u64 {
    if half == 0 {
        0
    } else {
        half.max(MIN_KEEP_FREE)
    }
}

/// Starts the drainer `--delivery` asks for: the at-least-once forwarder, or
/// the transactional one.
fn spawn_drainer(
    dir: &std::path::Path,
    writer: buffer::WriterHandle,
    producer: SharedProducer,
    kafka: KafkaConfig,
    metrics: Arc<Metrics>,
    volume_id: &str,
    (stop, until): (watch::Receiver<bool>, RunUntil),
) -> Result<tokio::task::JoinHandle<forward::Result<()>>> {
    Ok(match kafka.delivery {
        Delivery::AtLeastOnce => {
            let f = Forwarder::new(dir, writer, producer, kafka, metrics)?;
            tokio::spawn(f.run(stop, until))
        }
        Delivery::ExactlyOnce => {
            let f = ExactlyOnce::new(dir, writer, producer, kafka, metrics, volume_id.to_owned())?;
            tokio::spawn(f.run(stop, until))
        }
    })
}

/// Runs the capture pod until SIGTERM/SIGINT.
pub async fn serve(cfg: ServeConfig) -> Result<()> {
    // Bound first: probes are answered while the lock is awaited.
    let listener = std::net::TcpListener::bind(cfg.listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| Error::Listen {
            addr: cfg.listen,
            source,
        })?;
    let _lock = match crate::lockwait::acquire(&cfg.data_dir, &listener, shutdown_signal()).await? {
        crate::lockwait::Acquired::Lock(lock) => lock,
        crate::lockwait::Acquired::Stopped => return Ok(()),
    };
    // Half the reserve is a file, released if the disk fills anyway; the
    // other half is kept free by refusing appends before they would take it.
    let reserve_file = cfg.disk_reserve_bytes / 2;
    if let Err(e) = buffer::ensure_reserve(&cfg.data_dir, reserve_file) {
        tracing::warn!(error = %e, bytes = reserve_file, "could not set the disk reserve aside");
    }
    let metrics = Arc::new(Metrics::new());
    let (writer_thread, writer) = GroupCommitWriter::start_with(
        &cfg.data_dir,
        WriterOptions {
            durability: cfg.durability,
            quota: cfg.quota_bytes,
            commit_timeout: cfg.commit_timeout,
            // Half the reserve: once released, it always holds a checkpoint.
            max_wal_bytes: cfg.disk_reserve_bytes / 2,
            keep_free_bytes: keep_free_bytes(cfg.disk_reserve_bytes - reserve_file),
            dedup_window: cfg.dedup_window,
        },
        Some(commit_observer(&metrics)),
    )?;
    metrics.attach_buffer(writer.state.clone());
    // An unready pod gets no appends, so a volume that was nearly full is
    // measured again on a timer until there is room.
    let rechecks = {
        let writer = writer.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if writer.state.disk_low.load(Ordering::Relaxed) {
                    let _ = writer.recheck_room().await;
                }
            }
        })
    };
    // Damaged files moved aside at open are salvaged while the pod serves.
    let salvage = buffer::salvage::spawn_background(
        cfg.data_dir.clone(),
        writer.clone(),
        Some(metrics.salvage.observer()),
    );
    let volume_id = {
        let conn = buffer::open_reader(&cfg.data_dir)?;
        buffer::meta(&conn, "volume_id")?.unwrap_or_default()
    };
    {
        let s = &writer.state;
        tracing::info!(
            data_dir = %cfg.data_dir.display(),
            volume_id,
            events = s.events.load(Ordering::Relaxed),
            bytes = s.bytes.load(Ordering::Relaxed),
            last_seq = s.last_seq.load(Ordering::Relaxed),
            durability = ?cfg.durability,
            "buffer open"
        );
    }
    let direct_producer = SharedProducer::new(&cfg.kafka, metrics.clone())?;
    let forward_producer = SharedProducer::new(&cfg.kafka, metrics.clone())?;
    let health = Arc::new(Health::default());
    let cfg = Arc::new(cfg);
    let state = AppState {
        cfg: cfg.clone(),
        writer: writer.clone(),
        producer: direct_producer.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let forwarder = spawn_drainer(
        &cfg.data_dir,
        writer.clone(),
        forward_producer.clone(),
        cfg.kafka.clone(),
        metrics.clone(),
        &volume_id,
        (stop_rx, RunUntil::Stopped),
    )?;

    let volume = match &cfg.volume_claim {
        Some((namespace, claim)) => VolumeGuard::kubernetes(namespace.clone(), claim.clone()).await,
        None => VolumeGuard::local(),
    };

    let listener = tokio::net::TcpListener::from_std(listener).map_err(|source| Error::Listen {
        addr: cfg.listen,
        source,
    })?;
    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::server::serve(listener, state.clone(), async {
        let _ = close_rx.await;
    }));
    tracing::info!(listen = %cfg.listen, streams = cfg.streams.len(), "listening");
    let signal = shutdown_signal();
    tokio::pin!(signal);
    // Ready (and accepting events) only once the volume reads back `Retain`.
    let guarded = tokio::select! {
        _ = guard_volume(&volume, &volume_id, &health) => true,
        _ = &mut signal => false,
    };
    // The drainer ends on its own only when exactly-once delivery stopped
    // for good (fenced, or a fatal producer error such as a transaction the
    // coordinator timed out during a long Kafka outage): the pod then shuts
    // down and exits non-zero, so the restarted process fences again and
    // delivers, instead of serving unready forever.
    let mut forwarder = forwarder;
    let mut stopped: Option<String> = None;
    if guarded {
        health.started.store(true, Ordering::SeqCst);
        tracing::info!("serving");
        tokio::select! {
            _ = &mut signal => {}
            ended = &mut forwarder => {
                let why = match ended {
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(())) => "delivery ended".to_owned(),
                    Err(e) => e.to_string(),
                };
                tracing::error!(error = %why, "delivery stopped for good; shutting down so a restart delivers again");
                stopped = Some(why);
            }
        }
    }
    health.shutting_down.store(true, Ordering::SeqCst);
    rechecks.abort();
    // A file salvage has not finished stays in quarantine (volume not clean).
    salvage.abort();
    let _ = salvage.await;
    let deadline = tokio::time::Instant::now() + cfg.drain_timeout;
    // Requests that passed the shutdown check finish before the drain is judged.
    while health.in_flight.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if stopped.is_none() {
        forward::wait_empty(&writer, deadline).await;
        let _ = stop_tx.send(true);
        let abort = forwarder.abort_handle();
        match tokio::time::timeout(Duration::from_secs(5), forwarder).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "forwarder failed"),
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("forwarder did not stop within 5s; aborting it");
                abort.abort();
            }
        }
    }
    // Sealing refuses every later append (a slow upload still in flight gets
    // a 503), so a clean verdict stays true while the volume is flipped.
    let quarantined = quarantined_files(&cfg.data_dir);
    let left = match writer.seal(quarantined > 0).await {
        Ok(r) if r.clean => 0,
        Ok(r) => {
            tracing::warn!(
                events = r.events,
                dead_letters = r.dead_letters,
                quarantined,
                "buffer not empty at shutdown; it stays on the volume"
            );
            (r.events + r.dead_letters + quarantined as u64).max(1)
        }
        Err(e) => {
            tracing::error!(error = %e, "could not seal the buffer; it stays on the volume");
            writer.state.events.load(Ordering::Relaxed).max(1)
        }
    };
    volume.after_drain(left).await;
    if left == 0 {
        tracing::info!("buffer drained; exiting");
    }
    let _ = close_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    drop(state);
    drop(writer);
    forward::flush_producer(&direct_producer.get(), Duration::from_secs(1));
    // Every handle is gone, so the writer finishes its last commit and stops.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || writer_thread.join()),
    )
    .await;
    match stopped {
        Some(why) => Err(forward::Error::Fenced(why).into()),
        None => Ok(()),
    }
}

/// Drains `args.buffer.data_dir` into Kafka; `Ok` only once it is empty.
pub async fn flush(args: FlushArgs, kafka: KafkaConfig) -> Result<Stats> {
    let dir = &args.buffer.data_dir;
    if !dir.join(buffer::DB_FILE).exists() && buffer::salvage::figures(dir).0 == 0 {
        tracing::info!(data_dir = %dir.display(), "no buffer in directory; nothing to flush");
        return Ok(Stats {
            volume_id: String::new(),
            events: 0,
            bytes: 0,
            oldest_event_age_seconds: 0.0,
            dead_letters: 0,
            last_seq: 0,
            schema_version: 0,
            clean: true,
            quarantined_files: 0,
            salvaged_events: 0,
            unreadable_events: 0,
        });
    }
    let _lock = DirLock::acquire(dir)?;
    let metrics = Arc::new(Metrics::new());
    let (writer_thread, writer) =
        GroupCommitWriter::start_with(dir, WriterOptions::drain(args.buffer.durability), None)?;
    // Damaged files moved aside at open go back into the buffer first.
    buffer::salvage::salvage_quarantine(dir, &writer, None).await?;
    let before = writer.state.events.load(Ordering::Relaxed);
    let dead_before = writer.state.dead_letters.load(Ordering::Relaxed);
    tracing::info!(data_dir = %dir.display(), events = before, dead_letters = dead_before, "flushing buffer");
    let dlq = kafka.dead_letter_topic.clone();
    let producer = SharedProducer::new(&kafka, metrics.clone())?;
    let volume_id = {
        let conn = buffer::open_reader(dir)?;
        buffer::meta(&conn, "volume_id")?.unwrap_or_default()
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    // A drain Job: speed over the duplicates a kill of it could cause.
    let kafka = KafkaConfig {
        in_flight_events: crate::config::FLUSH_IN_FLIGHT_EVENTS,
        ..kafka
    };
    let mut task = spawn_drainer(
        dir,
        writer.clone(),
        producer,
        kafka,
        metrics.clone(),
        &volume_id,
        (stop_rx, RunUntil::Empty),
    )?;
    let timeout = Duration::from_secs(args.timeout_secs);
    let outcome = match tokio::time::timeout(timeout, &mut task).await {
        Ok(joined) => joined,
        Err(_) => {
            let _ = stop_tx.send(true);
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .unwrap_or(Ok(Ok(())))
        }
    };
    if let Ok(Err(e)) = outcome {
        tracing::error!(error = %e, "forwarder failed");
    }
    let quarantined = quarantined_files(dir);
    let sealed = writer.seal(quarantined > 0).await;
    let remaining = writer.state.events.load(Ordering::Relaxed);
    let dead_left = writer.state.dead_letters.load(Ordering::Relaxed);
    let stats = {
        let conn = buffer::open_reader(dir)?;
        buffer::stats(&conn)?
    };
    drop(writer);
    tokio::task::spawn_blocking(move || writer_thread.join())
        .await
        .ok();
    if remaining > 0 {
        return Err(Error::NotDrained {
            remaining,
            dir: dir.display().to_string(),
            secs: args.timeout_secs,
        });
    }
    // Events that left the queue either reached Kafka or became dead letters.
    let dead_new = (dead_left + metrics_dead_copied(&metrics)).saturating_sub(dead_before);
    tracing::info!(
        delivered = before.saturating_sub(dead_new),
        dead_lettered = dead_new,
        dead_letters_copied = metrics_dead_copied(&metrics),
        "buffer flushed"
    );
    if dead_left > 0 {
        return Err(Error::DeadLettersRemain {
            count: dead_left,
            dir: dir.display().to_string(),
            dlq: dlq.is_some(),
        });
    }
    if quarantined > 0 {
        return Err(Error::Quarantined {
            count: quarantined,
            dir: dir.display().to_string(),
        });
    }
    match sealed {
        Ok(r) if r.clean => Ok(stats),
        Ok(_) => Err(Error::NotDrained {
            remaining: remaining.max(1),
            dir: dir.display().to_string(),
            secs: args.timeout_secs,
        }),
        Err(e) => Err(Error::Write(e)),
    }
}

/// Reads buffer figures without taking the drainer lock.
pub fn inspect(args: &InspectArgs) -> Result<Stats> {
    let read = || -> Result<Stats> {
        let conn = buffer::open_reader(&args.data_dir)?;
        Ok(buffer::stats(&conn)?)
    };
    read().map_err(|e| match buffer::quarantine::check(&args.data_dir) {
        // Say what is wrong with the file: the next `serve` or `flush`
        // quarantines it and salvages what is readable.
        Ok(buffer::quarantine::Verdict::Damaged(why)) => Error::Damaged {
            dir: args.data_dir.display().to_string(),
            why,
        },
        _ => e,
    })
}

/// Renders figures as text.
pub fn render_stats(s: &Stats) -> String {
    format!(
        "volume_id: {}\nevents: {}\nbytes: {}\noldest_event_age_seconds: {:.3}\ndead_letters: {}\nlast_seq: {}\nschema_version: {}\nclean: {}\nquarantined_files: {}\nsalvaged_events: {}\nunreadable_events: {}\n",
        s.volume_id,
        s.events,
        s.bytes,
        s.oldest_event_age_seconds,
        s.dead_letters,
        s.last_seq,
        s.schema_version,
        s.clean,
        s.quarantined_files,
        s.salvaged_events,
        s.unreadable_events
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspect_names_the_damage_of_a_damaged_buffer() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(buffer::DB_FILE), vec![0x5au8; 8192]).unwrap();
        let err = inspect(&InspectArgs {
            data_dir: dir.path().to_owned(),
            json: false,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("is damaged"), "{err}");
        assert!(err.contains("salvages"), "{err}");
    }
}
