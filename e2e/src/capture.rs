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
    let out = Command::new(capture_bin()?)
        .args(["flush", "--data-dir"])
        .arg(dir)
        .args(["--kafka-bootstrap", bootstrap, "--timeout-secs"])
        .arg(timeout_secs.to_string())
        .env("HOLDFAST_LOG", "info,librdkafka=error")
        .output()?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}
