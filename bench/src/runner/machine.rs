//! The machine's own limits, measured in the same run as the scenarios: the
//! buffer disk's fsync latency (4 KiB appended, then `fdatasync`, in a loop)
//! and, through scenarios against [`crate::trivial`], the request rate the
//! load generator and HTTP stack reach with nothing behind them.

use std::io::Write as _;
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

/// Appends 4 KiB and `fdatasync`s, again and again for `budget` (at least 20 times).
pub fn probe_fsync(dir: &Path, budget: Duration) -> Result<FsyncProbe> {
    const BYTES: usize = 4096;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    let block = vec![0x5a_u8; BYTES];
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let started = Instant::now();
    let mut writes = 0u64;
    while writes < 20 || started.elapsed() < budget {
        let t = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        hist.saturating_record((t.elapsed().as_micros() as u64).max(1));
        writes += 1;
        // Keep the file small: what is timed is the sync, not a growing extent map.
        if writes.is_multiple_of(1024) {
            file.set_len(0)?;
            file = std::fs::OpenOptions::new().append(true).open(&path)?;
        }
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
