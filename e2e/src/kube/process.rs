//! Child processes of the harness that cannot outlive the test process.
//!
//! Invariant: every process the harness starts (etcd, the control plane, the
//! pods the node agent runs) dies with the test process, even when a test
//! panics or the test binary exits without running destructors (libtest ends
//! with `process::exit`, so statics are never dropped).
//!
//! How, without `unsafe` (`pre_exec` would be needed to call `prctl` in the
//! child): every command is started through util-linux
//! `setpriv --pdeathsig KILL`, which sets `PR_SET_PDEATHSIG` and then execs the
//! real program, so the pid we hold is the program's own pid. The kernel sends
//! the signal when the *thread* that forked the child exits, so all children
//! are forked by one long-lived spawner thread that lives as long as the
//! process. The same thread enters the harness runtime ([`runtime`]), so the
//! children are `tokio::process::Child`ren that the runtime reaps.
//!
//! On top of that, [`Process`] kills its child on drop (SIGKILL) and
//! [`Process::stop_blocking`] stops it in order (SIGTERM, a grace period,
//! SIGKILL), so that a shutdown leaves nothing behind either.

use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Errors starting a child process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The program could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program's path or name.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The spawner thread is gone (it never exits, so this is a bug).
    #[error("the spawner thread is gone")]
    SpawnerGone,
    /// A log file could not be opened.
    #[error("cannot open log file {path}: {source}")]
    Log {
        /// The log file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The tokio runtime the harness runs on: the node agent, the provisioner and
/// the reaping of child processes. It is never shut down, so objects tied to
/// it (kube clients, child handles) stay valid across `#[tokio::test]`s, each
/// of which has its own runtime.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("holdfast-harness")
            .enable_all()
            .build()
            .expect("cannot build the harness runtime")
    });
    &RUNTIME
}

type SpawnRequest = (std::process::Command, mpsc::Sender<std::io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: LazyLock<Mutex<mpsc::Sender<SpawnRequest>>> = LazyLock::new(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("holdfast-spawner".into())
            .spawn(move || {
                let _guard = runtime().enter();
                while let Ok((command, reply)) = rx.recv() {
                    let mut command = Command::from(command);
                    command.kill_on_drop(true);
                    // The requester may have given up; nothing to do then.
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("cannot start the spawner thread");
        Mutex::new(tx)
    });
    &SPAWNER
}

/// A child process that is killed when dropped.
#[derive(Debug)]
pub struct Process {
    name: String,
    pid: u32,
    child: Child,
}

impl Process {
    /// Starts `program` with `args`, its stdout and stderr appended to `log`,
    /// and `PR_SET_PDEATHSIG` set to SIGKILL (see the module docs).
    pub fn spawn(
        name: impl Into<String>,
        program: &Path,
        configure: impl FnOnce(&mut std::process::Command),
        log: &Path,
    ) -> Result<Self> {
        let name = name.into();
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|source| Error::Log {
                    path: log.display().to_string(),
                    source,
                })
        };
        let mut command = std::process::Command::new("setpriv");
        command
            .arg("--pdeathsig")
            .arg("KILL")
            .arg("--")
            .arg(program)
            .stdin(Stdio::null())
            .stdout(open()?)
            .stderr(open()?);
        configure(&mut command);
        let (tx, rx) = mpsc::channel();
        spawner()
            .lock()
            .map_err(|_| Error::SpawnerGone)?
            .send((command, tx))
            .map_err(|_| Error::SpawnerGone)?;
        let child = rx
            .recv()
            .map_err(|_| Error::SpawnerGone)?
            .map_err(|source| Error::Spawn {
                program: program.display().to_string(),
                source,
            })?;
        let pid = child.id().unwrap_or_default();
        Ok(Self { name, pid, child })
    }

    /// The process id (setpriv execs the program, so it is the program's).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exit status if the process has ended (reaps it).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to end.
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait().await
    }

    /// Sends `signal` to the process (ignored once it has been reaped).
    pub fn signal(&mut self, signal: Signal) {
        if self.try_wait().is_none() {
            let _ = kill(Pid::from_raw(self.pid as i32), signal);
        }
    }

    /// SIGTERM, up to `grace` for the process to exit, then SIGKILL; returns
    /// once the process has been reaped. Blocking, so usable from `Drop`.
    pub fn stop_blocking(&mut self, grace: Duration) {
        if self.try_wait().is_some() {
            return;
        }
        self.signal(Signal::SIGTERM);
        if !self.poll_exit(grace) {
            tracing::warn!(process = %self.name, pid = self.pid, "did not stop on SIGTERM, killing");
            self.signal(Signal::SIGKILL);
            self.poll_exit(Duration::from_secs(10));
        }
    }

    fn poll_exit(&mut self, deadline: Duration) -> bool {
        let deadline = Instant::now() + deadline;
        loop {
            if self.try_wait().is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    /// A process dropped without [`Process::stop_blocking`] is killed at once
    /// (SIGKILL) and reaped.
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            self.signal(Signal::SIGKILL);
            self.poll_exit(Duration::from_secs(2));
        }
    }
}

/// Whether a process with this pid exists (a zombie counts as existing).
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
