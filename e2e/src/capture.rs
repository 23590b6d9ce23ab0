//! Runs the real `holdfast-capture` binary as a child process: start it on a
//! free port, wait for `/readyz`, kill it (SIGKILL) or stop it (SIGTERM) the
//! way a kubelet would, run `flush` and `inspect` on its directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Where the workspace's binaries are: `HOLDFAST_BIN_DIR`, else `target/debug`.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("HOLDFAST_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("debug")
        })
}

/// Path of `holdfast-capture`, failing with a hint when it was not built.
pub fn capture_bin() -> Result<PathBuf> {
    let path = bin_dir().join("holdfast-capture");
    if !path.exists() {
        bail!(
            "{} not found: run `cargo build --bins` (make test does) or set HOLDFAST_BIN_DIR",
            path.display()
        );
    }
    Ok(path)
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A running `holdfast-capture serve`.
#[derive(Debug)]
pub struct CaptureProcess {
    child: Option<Child>,
    port: u16,
    data_dir: PathBuf,
    args: Vec<String>,
    log: PathBuf,
}

impl CaptureProcess {
    /// Starts `serve` on `data_dir` with `bootstrap` and extra `args`, and
    /// waits until `/readyz` answers 200.
    pub async fn start(data_dir: &Path, bootstrap: &str, args: &[&str]) -> Result<Self> {
        let port = free_port()?;
        let mut all = vec![
            "serve".to_owned(),
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--data-dir".to_owned(),
            data_dir.display().to_string(),
            "--kafka-bootstrap".to_owned(),
            bootstrap.to_owned(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        let mut p = Self {
            child: None,
            port,
            data_dir: data_dir.to_owned(),
            args: all,
            log: data_dir.with_extension("capture.log"),
        };
        p.spawn().await?;
        Ok(p)
    }

    async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(capture_bin()?)
            .args(&self.args)
            .env("HOLDFAST_LOG", "info,librdkafka=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning holdfast-capture")?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30)).await
    }

    /// Polls `/readyz` until 200 or the deadline.
    pub async fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let client = reqwest::Client::new();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "holdfast-capture exited with {status}; log: {}",
                    self.log_tail()
                );
            }
            if let Ok(r) = client.get(format!("{}/readyz", self.url())).send().await
                && r.status() == 200
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "holdfast-capture not ready after {within:?}; log: {}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The buffer directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The whole process log (every start of this process appends to it).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Last lines of the process log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGKILL, as a crash or OOM kill would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and directory (after [`kill`](Self::kill)).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }

    /// Sends SIGTERM; returns the process without waiting.
    pub fn terminate(&mut self) -> Result<()> {
        let child = self.child.as_ref().context("not running")?;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
        Ok(())
    }

    /// Waits for exit (after [`terminate`](Self::terminate)), up to `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().context("not running")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("holdfast-capture still running after {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for CaptureProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `holdfast-capture inspect --json` on `dir`.
pub fn inspect(dir: &Path) -> Result<serde_json::Value> {
    let out = Command::new(capture_bin()?)
        .args(["inspect", "--json", "--data-dir"])
        .arg(dir)
        .output()?;
    if !out.status.success() {
        bail!("inspect failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Runs `holdfast-capture flush` on `dir`; returns the exit status and stderr.
pub fn flush(dir: &Path, bootstrap: &str, timeout_secs: u64) -> Result<(ExitStatus, String)> {
    flush_with(dir, bootstrap, timeout_secs, &[])
}

/// [`flush`] with extra arguments.
pub fn flush_with(
    dir: &Path,
    bootstrap: &str,
    timeout_secs: u64,
    args: &[&str],
) -> Result<(ExitStatus, String)> {
    let out = Command::new(capture_bin()?)
        .args(["flush", "--data-dir"])
        .arg(dir)
        .args(["--kafka-bootstrap", bootstrap, "--timeout-secs"])
        .arg(timeout_secs.to_string())
        .args(args)
        .env("HOLDFAST_LOG", "info,librdkafka=error")
        .output()?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A tmpfs of a fixed size mounted on a directory, unmounted on drop: a disk
/// that really fills up. Mounting needs root.
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it, e.g. `4m`) on
    /// `dir`, creating the directory first.
    pub fn mount(dir: &Path, size: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!(
                "mount -t tmpfs on {} failed (needs root): {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// `strace` attached to every thread of a running process until
/// [`detach`](Self::detach) (or drop).
#[derive(Debug)]
pub struct Strace {
    child: Option<Child>,
}

impl Strace {
    /// Whether `strace` can be run here; the reason when it cannot.
    pub fn unavailable() -> Option<String> {
        match Command::new("strace").arg("-V").output() {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(format!("strace -V failed: {}", out.status)),
            Err(e) => Some(format!("strace not found: {e}")),
        }
    }

    /// Runs `strace -f <args> -p <pid>`; returns once every thread is attached.
    pub fn attach(pid: u32, args: &[&str]) -> Result<Self> {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new("strace")
            .arg("-f")
            .args(args)
            .arg("-p")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning strace")?;
        let stderr = child.stderr.take().context("strace stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut attached = false;
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                // "Process N attached with M threads" (or "attached" alone).
                if !attached && line.contains("attached") {
                    attached = true;
                    let _ = tx.send(Ok(()));
                } else if !attached && line.contains("strace:") {
                    let _ = tx.send(Err(line));
                    return;
                }
            }
        });
        let trace = Self { child: Some(child) };
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(trace),
            Ok(Err(line)) => bail!("strace could not attach to {pid}: {line}"),
            Err(_) => bail!("strace did not attach to {pid} within 10s"),
        }
    }

    /// Detaches (strace stops on SIGINT, writing its output) and waits for it.
    pub fn detach(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        kill(Pid::from_raw(child.id() as i32), Signal::SIGINT)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("strace did not detach within 10s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}

/// Disk I/O errors injected into a running process: `strace` attaches to
/// every thread and answers each `pwrite64`, `fdatasync` and `fsync` with
/// `EIO` without running it, until [`heal`](Self::heal) (or drop) detaches.
/// SQLite writes its database and WAL with exactly these calls, and nothing
/// else in `holdfast-capture` uses them, so sockets, logs and the runtime's
/// wake-ups keep working: only the disk fails, as a dying or read-only
/// remounted disk would. (A `mount -o remount,ro` cannot do it: the kernel
/// refuses with `EBUSY` while a file is open for writing.)
#[derive(Debug)]
pub struct DiskFaults {
    trace: Strace,
}

/// Syscalls failed by [`DiskFaults`].
const FAILED_SYSCALLS: &str = "pwrite64,pwritev,pwritev2,fdatasync,fsync";

impl DiskFaults {
    /// Whether `strace` can be run here; the reason when it cannot.
    pub fn unavailable() -> Option<String> {
        Strace::unavailable()
    }

    /// Starts failing `pid`'s disk writes; returns once every thread is attached.
    pub fn inject(pid: u32) -> Result<Self> {
        let trace = format!("trace={FAILED_SYSCALLS}");
        let inject = format!("inject={FAILED_SYSCALLS}:error=EIO");
        let trace = Strace::attach(pid, &["-o", "/dev/null", "-e", &trace, "-e", &inject])?;
        Ok(Self { trace })
    }

    /// Stops failing: strace detaches (on SIGINT) and the process runs untraced.
    pub fn heal(mut self) -> Result<()> {
        self.trace.detach()
    }
}
