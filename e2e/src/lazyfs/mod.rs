//! A FUSE file system that forgets what was not synced: the power-cut
//! harness (the approach of Jepsen's LazyFS).
//!
//! A killed process keeps the kernel's page cache, so a SIGKILL test passes
//! even if nothing is ever fsynced. [`LazyFs`] keeps every write that no
//! `fsync`/`fdatasync` has covered, and every directory entry created,
//! renamed or removed since its directory's last fsync, in memory; only
//! synced data reach the backing directory. [`LazyFs::power_cut`] throws the
//! memory away (from that instant every request fails with `EIO`, so nothing
//! more becomes durable), and [`LazyFs::remount`] mounts what the "disk"
//! kept, as a machine coming back from a power loss would see it.
//!
//! What it models: the loss of every unsynced write, whole. It does not
//! model torn or reordered writes within the unsynced layer (a real disk may
//! persist any subset of it); SQLite's own guarantees rely on fsync order,
//! which this layer honours. Metadata (mode, times) is not kept.
//!
//! SQLite in WAL mode works on it: files open in page-cache mode (no
//! `direct_io`) so the `-shm` wal-index can be `mmap`ed shared; the `-shm`
//! is never synced, so it is always lost, as on a real disk after a crash,
//! and SQLite rebuilds it from the WAL on the next open. Mounting needs
//! root and `/dev/fuse` (fuser mounts with `mount(2)` directly, no
//! `fusermount`).

mod fuse;
pub mod state;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fuser::{BackgroundSession, Config, MountOption};

use self::fuse::{Inner, LazyFuse};
use self::state::State;

/// Whether this machine can mount a FUSE file system (root and
/// `/dev/fuse`); the reason when it cannot.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root: mounting FUSE needs root".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing".into());
    }
    None
}

/// What a power cut threw away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutReport {
    /// Dirty 4 KiB pages of files that were never synced.
    pub unsynced_pages: usize,
    /// File syncs that reached the disk since the last mount.
    pub synced_files: u64,
    /// Directory syncs since the last mount.
    pub synced_dirs: u64,
}

/// A mounted lazy file system; unmounted on drop.
#[derive(Debug)]
pub struct LazyFs {
    backing: PathBuf,
    mountpoint: PathBuf,
    inner: Arc<Mutex<Inner>>,
    session: Option<BackgroundSession>,
}

impl LazyFs {
    /// Mounts at `mountpoint` (created if needed) what `backing` holds
    /// durably (an empty file system the first time).
    pub fn mount(backing: &Path, mountpoint: &Path) -> Result<Self> {
        std::fs::create_dir_all(backing)?;
        std::fs::create_dir_all(mountpoint)?;
        let mut fs = Self {
            backing: backing.to_owned(),
            mountpoint: mountpoint.to_owned(),
            inner: Arc::new(Mutex::new(Inner {
                state: State::load(backing)?,
                dead: false,
            })),
            session: None,
        };
        fs.start()?;
        Ok(fs)
    }

    fn start(&mut self) -> Result<()> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("holdfast-lazyfs".into()),
            MountOption::NoAtime,
        ];
        let session =
            fuser::spawn_mount(LazyFuse::new(self.inner.clone()), &self.mountpoint, &config)
                .with_context(|| format!("mounting lazyfs at {}", self.mountpoint.display()))?;
        self.session = Some(session);
        Ok(())
    }

    /// Where programs see the file system.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Cuts the power: everything not synced is gone, and every request from
    /// now on fails with `EIO`. Kill the programs using the mount, then
    /// [`remount`](Self::remount).
    pub fn power_cut(&self) -> CutReport {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.dead = true;
        CutReport {
            unsynced_pages: g.state.unsynced_pages(),
            synced_files: g.state.synced_files,
            synced_dirs: g.state.synced_dirs,
        }
    }

    /// Unmounts (after a [`power_cut`](Self::power_cut), or to simulate a
    /// clean shutdown of the disk with nothing lost only if all was synced)
    /// and mounts again what the backing directory kept.
    pub fn remount(&mut self) -> Result<()> {
        self.unmount()?;
        self.inner = Arc::new(Mutex::new(Inner {
            state: State::load(&self.backing)?,
            dead: false,
        }));
        self.start()
    }

    fn unmount(&mut self) -> Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        // Lazy: the mount leaves the namespace now, and the session ends when
        // the last open file on it is closed (the killed program's are).
        nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)
            .with_context(|| format!("unmounting {}", self.mountpoint.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !session.guard.is_finished() {
            if Instant::now() > deadline {
                bail!(
                    "lazyfs session at {} still busy 30 s after unmount (a process keeps a file open?)",
                    self.mountpoint.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        session
            .join()
            .with_context(|| format!("lazyfs session at {}", self.mountpoint.display()))
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            tracing::warn!(error = %e, "lazyfs unmount");
        }
    }
}
