//! Buffer figures as one transaction sees them, and the quota's split
//! between what only delivery frees and the deduplication window.

use std::sync::atomic::Ordering;

use rusqlite::Connection;

use super::super::dedup::Window;
use super::super::writer::BufferState;

/// Figures as a transaction sees them; copied to [`BufferState`] on commit.
#[derive(Debug, Clone, Copy)]
pub(super) struct Totals {
    pub events: i128,
    pub bytes: i128,
    pub dead: i128,
    pub dead_bytes: i128,
    pub window_bytes: i128,
}

impl Totals {
    pub fn read(s: &BufferState) -> Self {
        Self {
            events: s.events.load(Ordering::Relaxed) as i128,
            bytes: s.bytes.load(Ordering::Relaxed) as i128,
            dead: s.dead_letters.load(Ordering::Relaxed) as i128,
            dead_bytes: s.dead_bytes.load(Ordering::Relaxed) as i128,
            window_bytes: s.window_bytes.load(Ordering::Relaxed) as i128,
        }
    }

    pub fn store(&self, s: &BufferState) {
        s.events.store(self.events.max(0) as u64, Ordering::Relaxed);
        s.bytes.store(self.bytes.max(0) as u64, Ordering::Relaxed);
        s.dead_letters
            .store(self.dead.max(0) as u64, Ordering::Relaxed);
        s.dead_bytes
            .store(self.dead_bytes.max(0) as u64, Ordering::Relaxed);
        s.window_bytes
            .store(self.window_bytes.max(0) as u64, Ordering::Relaxed);
    }

    pub fn used(&self) -> u64 {
        self.held() + self.window_bytes.max(0) as u64
    }

    /// What only delivery frees (the window gives way to it).
    pub fn held(&self) -> u64 {
        (self.bytes.max(0) + self.dead_bytes.max(0)) as u64
    }

    /// Forgets remembered uuids until everything fits the quota again.
    pub fn fit_window(
        &mut self,
        window: &Window,
        conn: &Connection,
        quota: u64,
    ) -> rusqlite::Result<()> {
        let over = self.used().saturating_sub(quota);
        if over > 0 && self.window_bytes > 0 {
            self.window_bytes -= window.evict(conn, over)? as i128;
        }
        Ok(())
    }
}

/// Unready from 95% of the quota, or from 90% once a request was refused for
/// lack of room; ready again only under 90%, so a pod at its quota does not
/// flap. Evaluated after every commit.
pub(in crate::buffer) fn update_over_quota(state: &BufferState, refused: bool) {
    let quota = state.quota.load(Ordering::Relaxed);
    // The deduplication window gives way to events: it never makes a pod unready.
    let used = state.held_bytes();
    let high = used.saturating_mul(100) >= quota.saturating_mul(95);
    let band = used.saturating_mul(100) >= quota.saturating_mul(90);
    if high || (refused && band) {
        state.over_quota.store(true, Ordering::Relaxed);
    } else if used.saturating_mul(100) < quota.saturating_mul(90) {
        state.over_quota.store(false, Ordering::Relaxed);
    }
}
