//! One Kubernetes control plane on loopback: etcd, kube-apiserver (RBAC on,
//! client-certificate admin in `system:masters`), kube-controller-manager and
//! kube-scheduler, built from the pinned Go modules by `e2e/bins.sh`.
//!
//! Invariants: every port is picked free at start and bound to 127.0.0.1;
//! every file (PKI, etcd data, logs, kubeconfig) lives in the control plane's
//! own directory; every process is stopped when the [`ControlPlane`] is
//! dropped or stopped, and dies with the test process in any case (see
//! [`super::process`]).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::Client;

use super::pki::{self, Pki};
use super::process::{self, Process};

/// The wrapper module that pins the control plane (one source of truth for
/// the version, shared with `e2e/bins.sh`).
const KUBERNETES_GO_MOD: &str = include_str!("../../go/kubernetes/go.mod");

/// The Kubernetes version pinned in `e2e/go/kubernetes/go.mod`, e.g. `1.35.4`.
pub fn kubernetes_version() -> &'static str {
    KUBERNETES_GO_MOD
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("k8s.io/kubernetes")).then(|| words.next())?
        })
        .find_map(|version| version.strip_prefix('v'))
        .expect("e2e/go/kubernetes/go.mod requires k8s.io/kubernetes")
}

/// The service CIDR; its first address is the `kubernetes` Service's IP.
const SERVICE_CIDR: &str = "10.96.0.0/16";
const SERVICE_IP: &str = "10.96.0.1";

/// How long the control plane may take to answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// When this variable is set (to anything), kube-apiserver writes an audit
/// log of the requests of every ServiceAccount (metadata level, JSON lines)
/// to [`ControlPlane::audit_log`]: benchmarks count one component's
/// requests from it (`make bench-operator`). Off by default.
pub const AUDIT_ENV: &str = "HOLDFAST_E2E_AUDIT";

/// The audit policy of [`AUDIT_ENV`]: ServiceAccounts' requests only.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [\"RequestReceived\"]\nrules:\n- level: Metadata\n  userGroups: [\"system:serviceaccounts\"]\n- level: None\n";

/// Errors starting or talking to the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binaries are not built.
    #[error(
        "{binary} not found in {dir}: build the control plane first with `make e2e-bins` \
         (bash e2e/bins.sh), or point HOLDFAST_K8S_BIN at a directory holding \
         kube-apiserver, kube-controller-manager, kube-scheduler, etcd and helm"
    )]
    MissingBinary {
        /// The binary.
        binary: String,
        /// Where it was looked for.
        dir: String,
    },
    /// Certificates could not be made.
    #[error("pki: {0}")]
    Pki(#[from] pki::Error),
    /// A process could not be started.
    #[error("process: {0}")]
    Process(#[from] process::Error),
    /// A file or directory could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A component exited during start.
    #[error("{component} exited during start ({status}); last lines of {log}:\n{tail}")]
    Exited {
        /// The component.
        component: String,
        /// Its exit status.
        status: String,
        /// Its log file.
        log: String,
        /// The end of its log.
        tail: String,
    },
    /// The API server did not become ready in time.
    #[error("the API server was not ready within {timeout:?}: {last}")]
    NotReady {
        /// The deadline.
        timeout: Duration,
        /// The last answer or error.
        last: String,
    },
    /// The kube client could not be built.
    #[error("kube client: {0}")]
    Client(#[from] kube::Error),
    /// A request failed.
    #[error("{what}: {source}")]
    Api {
        /// What was attempted.
        what: String,
        /// Why it failed.
        source: kube::Error,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Where the control-plane binaries are: `HOLDFAST_K8S_BIN`, else
/// `${HOLDFAST_CACHE:-$HOME/.cache/holdfast}/k8s-<version>/bin` (what
/// `e2e/bins.sh` fills). Fails with a message naming `make e2e-bins` when a
/// binary is missing.
pub fn bin_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("HOLDFAST_K8S_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let cache = std::env::var_os("HOLDFAST_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                        .join(".cache/holdfast")
                });
            cache.join(format!("k8s-{}/bin", kubernetes_version()))
        }
    };
    for binary in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ] {
        if !dir.join(binary).is_file() {
            return Err(Error::MissingBinary {
                binary: binary.to_string(),
                dir: dir.display().to_string(),
            });
        }
    }
    Ok(dir)
}

/// A free TCP port on 127.0.0.1 (free when asked; see [`free_ports`] for
/// several distinct ones).
pub fn free_port() -> u16 {
    let [port] = free_ports::<1>();
    port
}

/// `N` distinct free TCP ports on 127.0.0.1: all bound at once, so they
/// differ, then released for the components to bind (free when asked; a
/// component that loses the race fails to start and the start is retried).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("cannot bind a loopback port"))
        .collect();
    std::array::from_fn(|i| {
        listeners[i]
            .local_addr()
            .expect("bound listener has an address")
            .port()
    })
}

/// The root under which every harness run keeps its files:
/// `$HOLDFAST_E2E_DIR`, else `/tmp/holdfast-e2e`. Directories of runs whose
/// test process is gone are removed when a new run starts.
pub fn state_root() -> PathBuf {
    std::env::var_os("HOLDFAST_E2E_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/holdfast-e2e"))
}

/// A new directory `<root>/run-<pid>-<n>` for one harness instance, after
/// removing the directories of dead test processes.
pub fn new_run_dir() -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let root = state_root();
    std::fs::create_dir_all(&root).map_err(io_err(&root))?;
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("run-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            if let Some(pid) = pid
                && pid != std::process::id()
                && !process::pid_alive(pid)
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = root.join(format!(
        "run-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    Ok(dir)
}

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    pki: Pki,
    api_port: u16,
    kubeconfig: PathBuf,
    /// etcd, kube-apiserver, kube-controller-manager, kube-scheduler: stopped
    /// in reverse order.
    processes: Vec<(Process, PathBuf)>,
}

impl ControlPlane {
    /// Starts etcd, the API server, the controller-manager and the scheduler
    /// in `dir`, and waits until the API server is ready. Must run inside a
    /// tokio runtime.
    /// A start that fails because a component exited or never got ready (a
    /// port taken between picking and binding it, a machine too loaded) is
    /// retried twice from scratch.
    pub async fn start(dir: &Path) -> Result<Self> {
        let mut attempt = 1;
        loop {
            let attempt_dir = dir.join(format!("attempt-{attempt}"));
            match Self::start_once(dir, &attempt_dir).await {
                Err(e @ (Error::Exited { .. } | Error::NotReady { .. })) if attempt < 3 => {
                    tracing::warn!(attempt, error = %e, "control plane failed to start, retrying");
                    eprintln!(
                        "holdfast-e2e: control plane failed to start (attempt {attempt}): {e}"
                    );
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(dir: &Path, data: &Path) -> Result<Self> {
        let bin = bin_dir()?;
        let started = Instant::now();
        let pki = Pki::create(&dir.join("pki"), SERVICE_IP)?;
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(io_err(&logs))?;
        let [api_port, etcd_port, peer_port] = free_ports::<3>();
        let mut cp = Self {
            dir: dir.to_path_buf(),
            pki,
            api_port,
            kubeconfig: dir.join("kubeconfig"),
            processes: Vec::new(),
        };

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_data = data.join("etcd");
        cp.spawn(&bin, "etcd", |c| {
            c.arg("--name=default")
                .arg(format!("--data-dir={}", etcd_data.display()))
                .arg(format!("--listen-client-urls={etcd_url}"))
                .arg(format!("--advertise-client-urls={etcd_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=default={peer_url}"))
                // Test data: fsync buys nothing and costs seconds.
                .arg("--unsafe-no-fsync")
                .arg("--log-level=warn");
        })?;

        let pki = cp.pki.clone();
        let api_port = cp.api_port;
        let audit = std::env::var_os(AUDIT_ENV).is_some();
        let audit_policy = dir.join("audit-policy.yaml");
        if audit {
            std::fs::write(&audit_policy, AUDIT_POLICY).map_err(io_err(&audit_policy))?;
        }
        let audit_log = cp.audit_log();
        cp.spawn(&bin, "kube-apiserver", |c| {
            if audit {
                c.arg(format!("--audit-policy-file={}", audit_policy.display()))
                    .arg(format!("--audit-log-path={}", audit_log.display()))
                    .arg("--audit-log-format=json");
            }
            c.arg(format!("--etcd-servers={etcd_url}"))
                .arg(format!("--cert-dir={}", pki.dir.display()))
                .arg(format!("--tls-cert-file={}", pki.serving_cert.display()))
                .arg(format!(
                    "--tls-private-key-file={}",
                    pki.serving_key.display()
                ))
                .arg(format!("--client-ca-file={}", pki.ca_cert.display()))
                .arg(format!("--secure-port={api_port}"))
                .arg("--bind-address=127.0.0.1")
                .arg("--advertise-address=127.0.0.1")
                .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
                .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
                .arg(format!(
                    "--service-account-key-file={}",
                    pki.sa_pub.display()
                ))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    pki.sa_key.display()
                ))
                .arg("--authorization-mode=RBAC")
                .arg("--allow-privileged=true")
                .arg("--profiling=false")
                .arg("--v=1");
        })?;
        let kubeconfig = cp.kubeconfig.clone();
        cp.write_kubeconfig()?;
        cp.wait_ready().await?;

        cp.spawn(&bin, "kube-controller-manager", |c| {
            c.arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg("--leader-elect=false")
                .arg("--secure-port=0")
                .arg("--controllers=*")
                .arg(format!(
                    "--service-account-private-key-file={}",
                    pki.sa_key.display()
                ))
                .arg(format!("--root-ca-file={}", pki.ca_cert.display()))
                .arg(format!(
                    "--cluster-signing-cert-file={}",
                    pki.ca_cert.display()
                ))
                .arg(format!(
                    "--cluster-signing-key-file={}",
                    pki.ca_key.display()
                ))
                // Nodes whose agent stops heartbeating turn NotReady within
                // seconds rather than the production 50 s.
                .arg("--node-monitor-period=1s")
                .arg("--node-monitor-grace-period=8s")
                .arg("--profiling=false")
                .arg("--v=1");
        })?;
        cp.spawn(&bin, "kube-scheduler", |c| {
            c.arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg("--leader-elect=false")
                .arg("--secure-port=0")
                .arg("--profiling=false")
                .arg("--v=1");
        })?;
        tracing::info!(
            kubeconfig = %cp.kubeconfig.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "control plane ready"
        );
        eprintln!(
            "holdfast-e2e: control plane ready in {:.1}s; kubectl --kubeconfig {}",
            started.elapsed().as_secs_f64(),
            cp.kubeconfig.display()
        );
        Ok(cp)
    }

    fn spawn(
        &mut self,
        bin: &Path,
        name: &str,
        configure: impl FnOnce(&mut std::process::Command),
    ) -> Result<()> {
        let log = self.dir.join("logs").join(format!("{name}.log"));
        let process = Process::spawn(name, &bin.join(name), configure, &log)?;
        self.processes.push((process, log));
        Ok(())
    }

    /// Where kube-apiserver writes its audit log when [`AUDIT_ENV`] is set.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("logs").join("audit.log")
    }

    fn write_kubeconfig(&self) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: holdfast-e2e\n  cluster:\n    \
             server: {server}\n    certificate-authority: {ca}\nusers:\n- name: holdfast-admin\n  \
             user:\n    client-certificate: {cert}\n    client-key: {key}\ncontexts:\n- name: \
             holdfast-e2e\n  context:\n    cluster: holdfast-e2e\n    user: holdfast-admin\n\
             current-context: holdfast-e2e\n",
            server = self.url(),
            ca = self.pki.ca_cert.display(),
            cert = self.pki.admin_cert.display(),
            key = self.pki.admin_key.display(),
        );
        std::fs::write(&self.kubeconfig, text).map_err(io_err(&self.kubeconfig))
    }

    /// Fails fast with the component's log when one has exited.
    fn check_alive(&mut self) -> Result<()> {
        for (process, log) in &mut self.processes {
            if let Some(status) = process.try_wait() {
                let text = std::fs::read_to_string(&*log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                return Err(Error::Exited {
                    component: process.name().to_string(),
                    status: status.to_string(),
                    log: log.display().to_string(),
                    tail,
                });
            }
        }
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let client = self.client()?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last;
        loop {
            self.check_alive()?;
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("static request");
            match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => last = body,
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    timeout: READY_TIMEOUT,
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The API server's URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// The API server's port on 127.0.0.1.
    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    /// The kubeconfig of the admin (for `kubectl` when debugging).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The PKI (CA certificate for in-cluster clients, client certificates).
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The directory of this control plane.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pids of the running components (etcd, apiserver, ...).
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(|(p, _)| p.pid()).collect()
    }

    fn base_config(&self) -> kube::Config {
        let mut config = kube::Config::new(self.url().parse().expect("valid url"));
        config.root_cert_file = Some(self.pki.ca_cert.clone());
        config.read_timeout = Some(Duration::from_secs(60));
        config
    }

    /// A client config for the admin (`system:masters`).
    pub fn admin_config(&self) -> kube::Config {
        let mut config = self.base_config();
        config.auth_info.client_certificate = Some(self.pki.admin_cert.display().to_string());
        config.auth_info.client_key = Some(self.pki.admin_key.display().to_string());
        config
    }

    /// A new admin client bound to the current tokio runtime.
    pub fn client(&self) -> Result<Client> {
        Ok(Client::try_from(self.admin_config())?)
    }

    /// A client that authenticates as user `name` in `groups` with a client
    /// certificate signed by the cluster CA.
    pub fn user_client(&self, name: &str, groups: &[&str]) -> Result<Client> {
        let cert = self.pki.client_cert(name, groups)?;
        let mut config = self.base_config();
        config.auth_info.client_certificate = Some(cert.cert.display().to_string());
        config.auth_info.client_key = Some(cert.key.display().to_string());
        Ok(Client::try_from(config)?)
    }

    /// A client that authenticates with a bearer token (e.g. a
    /// ServiceAccount token from the TokenRequest API).
    pub fn token_client(&self, token: &str) -> Result<Client> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = self
            .dir
            .join(format!("token-{}", N.fetch_add(1, Ordering::SeqCst)));
        std::fs::write(&path, token).map_err(io_err(&path))?;
        let mut config = self.base_config();
        config.auth_info.token_file = Some(path.display().to_string());
        Ok(Client::try_from(config)?)
    }

    /// Stops every component (scheduler, controller-manager, API server,
    /// etcd), each with SIGTERM and a short grace, then SIGKILL. Blocking.
    pub fn stop(&mut self) {
        while let Some((mut process, _)) = self.processes.pop() {
            process.stop_blocking(Duration::from_secs(5));
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}
