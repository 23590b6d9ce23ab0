//! The machine's own limits, measured in the same run as the scenarios: the
//! buffer disk's fsync latency (4 KiB overwritten, then `fdatasync`, in a loop)
//! and, through scenarios against [`crate::trivial`], the request rate the
//! load generator and HTTP stack reach with nothing behind them.

use std::io::{Seek as _, SeekFrom, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// Latency of write + `fdatasync` on the buffer's disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FsyncProbe {
    /// Directory probed (where the buffers live).
    pub dir: String,
    /// Writes timed.
    pub writes: u64,
    /// Bytes per write.
    pub bytes_per_write: usize,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Mean, ms.
    pub mean_ms: f64,
    /// Largest, ms.
    pub max_ms: f64,
}

/// Bytes of the probe file, preallocated and then overwritten in a ring.
const PROBE_FILE_BYTES: u64 = 4 << 20;

/// Writes 4 KiB and `fdatasync`s, again and again for `budget` (at least 20
/// times), over a preallocated file: like SQLite's WAL in steady state, the
/// writes overwrite blocks already allocated, so what is timed is the data
/// reaching the disk, not a file system journal commit for a growing file.
pub fn probe_fsync(dir: &Path, budget: Duration) -> Result<FsyncProbe> {
    const BYTES: usize = 4096;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    let block = vec![0x5a_u8; BYTES];
    for _ in 0..PROBE_FILE_BYTES / BYTES as u64 {
        file.write_all(&block)?;
    }
    file.sync_all()?;
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let started = Instant::now();
    let mut writes = 0u64;
    while writes < 20 || started.elapsed() < budget {
        let offset = (writes * BYTES as u64) % PROBE_FILE_BYTES;
        let t = Instant::now();
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(&block)?;
        file.sync_data()?;
        hist.saturating_record((t.elapsed().as_micros() as u64).max(1));
        writes += 1;
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    let ms = |us: u64| us as f64 / 1000.0;
    Ok(FsyncProbe {
        dir: dir.display().to_string(),
        writes,
        bytes_per_write: BYTES,
        p50_ms: ms(hist.value_at_quantile(0.5)),
        p99_ms: ms(hist.value_at_quantile(0.99)),
        mean_ms: hist.mean() / 1000.0,
        max_ms: ms(hist.max()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_probe_times_at_least_twenty_writes() {
        let dir = std::env::temp_dir().join(format!("holdfast-fsync-{}", std::process::id()));
        let p = probe_fsync(&dir, Duration::ZERO).unwrap();
        assert!(p.writes >= 20);
        assert!(
            p.p50_ms > 0.0 && p.p50_ms <= p.p99_ms && p.p99_ms <= p.max_ms,
            "{p:?}"
        );
        assert!(!dir.join("fsync-probe").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
