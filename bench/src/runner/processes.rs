//! Child processes of a bench run: the Kafka broker (`holdfast-dev kafka`),
//! capture pods (`holdfast-capture serve`), the trivial handler, and their
//! memory (`/proc/<pid>/status`). Every child is stopped when its handle is
//! dropped, so a failed run leaves nothing behind.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A free loopback port (bound, then released).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Fails, saying how to build it, unless `path` is a file.
pub fn ensure_file(path: &Path) -> Result<()> {
    ensure!(
        path.is_file(),
        "{} not found: build it (`cargo build --bins`; `make bench` builds --release) or pass --bin-dir / --dev-bin",
        path.display()
    );
    Ok(())
}

/// Last lines of a log file, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn signal(child: &Child, sig: Signal) {
    let _ = kill(Pid::from_raw(child.id() as i32), sig);
}

/// SIGTERM, then SIGKILL if it has not exited within `grace`.
fn stop(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    signal(child, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

/// A single-node Kafka broker on loopback.
#[derive(Debug)]
pub struct Kafka {
    child: Child,
    /// `bootstrap.servers`.
    pub bootstrap: String,
    dev: PathBuf,
}

impl Kafka {
    /// Starts `holdfast-dev kafka` (`dev`) and waits until it prints its bootstrap address.
    pub async fn start(dev: &Path, work: &Path) -> Result<Self> {
        ensure_file(dev)?;
        let dev = dev.to_owned();
        let (out, log) = (work.join("kafka.out"), work.join("kafka.log"));
        let child = Command::new(&dev)
            .arg("kafka")
            .stdin(Stdio::null())
            .stdout(File::create(&out)?)
            .stderr(File::create(&log)?)
            .spawn()
            .context("starting holdfast-dev kafka")?;
        let mut kafka = Self {
            child,
            bootstrap: String::new(),
            dev,
        };
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if let Some(b) = text
                .lines()
                .find_map(|l| l.strip_prefix("KAFKA_BOOTSTRAP="))
            {
                kafka.bootstrap = b.trim().to_owned();
                return Ok(kafka);
            }
            if let Some(status) = kafka.child.try_wait()? {
                bail!("kafka exited with {status}: {}", tail(&log));
            }
            ensure!(
                Instant::now() < deadline,
                "kafka did not start in 180 s: {}",
                tail(&log)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates `topic` with `partitions` partitions (if it does not exist).
    pub async fn create_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        let out = tokio::process::Command::new(&self.dev)
            .args([
                "create-topic",
                "--bootstrap",
                &self.bootstrap,
                "--topic",
                topic,
            ])
            .args(["--partitions", &partitions.to_string(), "--if-not-exists"])
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "creating topic {topic}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        stop(&mut self.child, Duration::from_secs(30));
    }
}

/// Peak memory of a process: the larger of `VmHWM` at the end and the
/// `VmRSS` samples taken while it ran (kB).
#[derive(Debug, Default)]
pub struct Memory {
    sampled_kb: AtomicU64,
}

/// A field of `/proc/<pid>/status`, in kB.
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// A running HTTP server under test: a capture pod or the trivial handler.
#[derive(Debug)]
pub struct Server {
    child: Child,
    /// Listen address.
    pub addr: SocketAddr,
    log: PathBuf,
    memory: Arc<Memory>,
    sampler: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Spawns `program args`, logging to `log`, and waits until `GET /readyz` is 200.
    pub async fn start(
        program: &Path,
        args: &[String],
        addr: SocketAddr,
        log: &Path,
    ) -> Result<Self> {
        let file = File::create(log)?;
        let child = Command::new(program)
            .args(args)
            .env("HOLDFAST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let memory = Arc::new(Memory::default());
        let pid = child.id();
        let sampler = tokio::spawn({
            let memory = memory.clone();
            async move {
                while let Some(kb) = status_kb(pid, "VmRSS") {
                    memory.sampled_kb.fetch_max(kb, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let mut server = Self {
            child,
            addr,
            log: log.to_owned(),
            memory,
            sampler,
        };
        server.wait_ready(Duration::from_secs(60)).await?;
        Ok(server)
    }

    async fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{status}: {}", tail(&self.log));
            }
            if get_status(self.addr, "/readyz").await.ok() == Some(200) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "not ready after {within:?}: {}",
                tail(&self.log)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Peak resident memory so far, MiB.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        let hwm = status_kb(self.child.id(), "VmHWM").unwrap_or(0);
        let kb = hwm.max(self.memory.sampled_kb.load(Ordering::Relaxed));
        (kb > 0).then(|| kb as f64 / 1024.0)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Log tail, for error messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }

    /// Kills it (SIGKILL): what it acknowledged is on disk (or in the page
    /// cache with `--durability os`, which survives a killed process).
    pub fn kill(mut self) {
        self.sampler.abort();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops it (SIGTERM, SIGKILL after 30 s).
    pub fn stop(mut self) {
        self.sampler.abort();
        stop(&mut self.child, Duration::from_secs(30));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.sampler.abort();
        stop(&mut self.child, Duration::from_secs(30));
    }
}

/// The status code of a plain `GET`.
pub async fn get_status(addr: SocketAddr, path: &str) -> Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    let text = std::str::from_utf8(&head)?;
    text.get(9..12)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {text:?}"))
}

/// Arguments of `holdfast-capture serve` for a bench scenario.
pub fn capture_args(
    addr: SocketAddr,
    data_dir: &Path,
    bootstrap: &str,
    extra: &[String],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        &addr.to_string(),
        "--data-dir",
        &data_dir.display().to_string(),
        "--kafka-bootstrap",
        bootstrap,
        // Room for every scenario; the quota is not what is measured.
        "--buffer-quota-bytes",
        "8000000000",
        // A backlog left at the end is not the bench's business: exit soon.
        "--drain-timeout-secs",
        "1",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(extra.iter().cloned());
    args
}

/// Runs `program args` to completion, returning its status and the time it took.
pub async fn run_timed(
    program: &Path,
    args: &[String],
    log: &Path,
) -> Result<(ExitStatus, Duration, Option<f64>)> {
    let file = File::create(log)?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("HOLDFAST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let pid = child.id().context("child has no pid")?;
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                let hwm = status_kb(pid, "VmHWM");
                let rss = status_kb(pid, "VmRSS");
                match hwm.max(rss) {
                    Some(kb) => peak.fetch_max(kb, Ordering::Relaxed),
                    None => break,
                };
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let status = child.wait().await?;
    let took = started.elapsed();
    sampler.abort();
    let kb = peak.load(Ordering::Relaxed);
    Ok((status, took, (kb > 0).then(|| kb as f64 / 1024.0)))
}

/// `/proc/loadavg`'s first three fields.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
