//! A real, local Apache Kafka broker for tests, the demo and benchmarks.
//!
//! [`KafkaBroker`] runs the broker from Maven Central (fetched once by
//! `e2e/kafka/fetch.sh` into `${HOLDFAST_CACHE:-~/.cache/holdfast}`) as a child
//! `java` process: one KRaft node that is both broker and controller, on free
//! loopback ports, with every internal topic at replication factor 1 so that
//! consumer groups, idempotent and transactional producers work. There is no
//! mock anywhere: what passes here passes against Kafka.
//!
//! Invariants:
//! - A broker is ready only when a metadata request over its PLAINTEXT
//!   listener lists it (it is unfenced); [`KafkaBroker::start_with`] and
//!   [`KafkaBroker::restart`] return only then, or fail with the log's tail.
//! - The java process never outlives its owner: dropping a [`KafkaBroker`]
//!   kills it (also while a test unwinds from a panic), and where
//!   `setpriv` exists the process also gets `SIGKILL` if the owning process
//!   dies without unwinding.
//! - [`KafkaBroker::restart`] keeps the ports and the data directory, so
//!   clients configured with [`KafkaBroker::bootstrap`] reconnect by
//!   themselves and nothing written before is lost.
//!
//! Consumers here use `assign` on every partition from the beginning and
//! never join or commit to a group, so reading back what a test wrote does
//! not depend on the group coordinator.
//!
//! Start-up takes a few seconds, most of it the JVM loading classes: the
//! first start in a cache trains a class-data-sharing archive (once, about
//! fifteen seconds) that later JVMs map instead of loading classes one by
//! one. Set `HOLDFAST_KAFKA_CDS=0` to go without.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::metadata::Metadata;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tempfile::TempDir;

/// Environment variable naming a ready classpath folder, which skips `fetch.sh`.
pub const LIBS_ENV: &str = "HOLDFAST_KAFKA_LIBS";

/// Environment variable that turns the class-data-sharing archive off (`0`).
pub const CDS_ENV: &str = "HOLDFAST_KAFKA_CDS";

/// How long to wait for a broker to answer after launch.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a stopping broker gets between `SIGTERM` and `SIGKILL`.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

const FETCH_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/kafka/fetch.sh");
const POLL_INTERVAL: Duration = Duration::from_millis(100);
const NODE_ID: u32 = 1;

/// How a [`KafkaBroker`] is started. `Default` gives a throw-away broker on
/// free ports with its data in a temporary directory.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// PLAINTEXT listener port on 127.0.0.1; a free one when `None`.
    pub port: Option<u16>,
    /// Controller listener port on 127.0.0.1; a free one when `None`.
    pub controller_port: Option<u16>,
    /// Where the log segments live. `None` uses a directory inside the
    /// broker's temporary directory, deleted on drop. An existing formatted
    /// directory is reused as it is.
    pub data_dir: Option<PathBuf>,
    /// `auto.create.topics.enable`: producing to or fetching metadata of an
    /// unknown topic creates it.
    pub auto_create_topics: bool,
    /// Partitions of an automatically created topic (`num.partitions`).
    pub default_partitions: u32,
    /// JVM heap (`-Xms`/`-Xmx`), e.g. `512m`.
    pub heap: String,
    /// Extra JVM options, appended after the defaults.
    pub jvm_options: Vec<String>,
    /// Extra `server.properties` entries; they override the defaults.
    pub properties: Vec<(String, String)>,
    /// How long [`KafkaBroker::start_with`] and [`KafkaBroker::restart`]
    /// wait for the broker to answer.
    pub ready_timeout: Duration,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        Self {
            port: None,
            controller_port: None,
            data_dir: None,
            auto_create_topics: true,
            default_partitions: 1,
            heap: "512m".to_owned(),
            jvm_options: Vec::new(),
            properties: Vec::new(),
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }
}

/// One Kafka broker (KRaft, combined broker and controller) running as a
/// child process. Dropping it kills the process.
pub struct KafkaBroker {
    options: KafkaOptions,
    libs: PathBuf,
    port: u16,
    controller_port: u16,
    data_dir: PathBuf,
    workdir: TempDir,
    /// Class-data-sharing archive the JVMs start from, when there is one.
    class_archive: Option<PathBuf>,
    /// Set only for the training run that writes the archive at exit.
    dump_class_archive: Option<PathBuf>,
    child: Option<Child>,
}

impl std::fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBroker")
            .field("bootstrap", &self.bootstrap())
            .field("controller_port", &self.controller_port)
            .field("data_dir", &self.data_dir)
            .field("workdir", &self.workdir.path())
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish()
    }
}

impl KafkaBroker {
    /// Starts a throw-away broker with [`KafkaOptions::default`] and waits
    /// until it answers.
    pub async fn start() -> Result<Self> {
        Self::start_with(KafkaOptions::default()).await
    }

    /// Starts a broker and waits until it answers. Fetches Kafka first if it
    /// is not cached yet (that takes a while once).
    pub async fn start_with(options: KafkaOptions) -> Result<Self> {
        let libs = libs_dir().await?;
        let class_archive = class_archive(&libs).await;
        Self::start_inner(options, libs, class_archive, None).await
    }

    /// Free ports are picked, released, then bound by Kafka, and a test
    /// running beside this one can take one in between: a start that fails
    /// on a port in use is tried again on other free ports.
    async fn start_inner(
        options: KafkaOptions,
        libs: PathBuf,
        class_archive: Option<PathBuf>,
        dump_class_archive: Option<PathBuf>,
    ) -> Result<Self> {
        let mut attempt = 1;
        loop {
            let started = Self::start_once(
                options.clone(),
                libs.clone(),
                class_archive.clone(),
                dump_class_archive.clone(),
            )
            .await;
            match started {
                Err(e) if attempt < START_ATTEMPTS && port_was_taken(&e) => attempt += 1,
                other => return other,
            }
        }
    }

    async fn start_once(
        options: KafkaOptions,
        libs: PathBuf,
        class_archive: Option<PathBuf>,
        dump_class_archive: Option<PathBuf>,
    ) -> Result<Self> {
        let (port, controller_port) = pick_ports(options.port, options.controller_port)?;
        let workdir = tempfile::Builder::new()
            .prefix("holdfast-kafka-")
            .tempdir()
            .context("creating the broker's temporary directory")?;
        let data_dir = match &options.data_dir {
            Some(dir) => dir.clone(),
            None => workdir.path().join("data"),
        };
        fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating data directory {}", data_dir.display()))?;
        let data_dir = data_dir
            .canonicalize()
            .with_context(|| format!("resolving data directory {}", data_dir.display()))?;

        let mut broker = Self {
            options,
            libs,
            port,
            controller_port,
            data_dir,
            workdir,
            class_archive,
            dump_class_archive,
            child: None,
        };
        broker.write_config()?;
        broker.format_storage().await?;
        broker.launch().await?;
        Ok(broker)
    }

    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The PLAINTEXT listener port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the log segments.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The broker's own log (stdout and stderr of the java process).
    pub fn log_path(&self) -> PathBuf {
        self.workdir.path().join("kafka.log")
    }

    /// The operating-system process id, while the broker runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the java process is still alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops the broker cleanly: `SIGTERM`, then `SIGKILL` if it has not
    /// exited within [`STOP_GRACE`]. A stopped broker can be
    /// [restarted](Self::restart). Does nothing if it is not running.
    pub async fn stop(&mut self) -> Result<()> {
        self.stop_within(STOP_GRACE).await
    }

    async fn stop_within(&mut self, grace: Duration) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        match kill(pid, Signal::SIGTERM) {
            // Exited between try_wait and kill: reaped below.
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(error) => return Err(error).context("sending SIGTERM to the broker"),
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        child.kill().context("killing the broker after SIGTERM")?;
        child.wait().context("reaping the broker")?;
        Ok(())
    }

    /// Kills the broker with `SIGKILL`, as a crash would. A killed broker
    /// can be [restarted](Self::restart) (it recovers its logs).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Fails only if it already exited, which is what we want anyway.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the broker if it runs, then starts it again on the same ports
    /// with the same data, and waits until it answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.launch().await
    }

    /// Creates a topic with replication factor 1 and waits until every
    /// partition has a leader. Fails if the topic exists.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        config: &[(&str, &str)],
    ) -> Result<()> {
        create_topic(&self.bootstrap(), name, partitions, config).await
    }

    /// Reads `topic` from the beginning, read-committed, until `expected`
    /// records arrived or `timeout` passed; returns what arrived.
    pub async fn consume(
        &self,
        topic: &str,
        expected: usize,
        timeout: Duration,
    ) -> Result<Vec<Record>> {
        consume(
            &self.bootstrap(),
            topic,
            &ConsumeOptions::new(expected, timeout),
        )
        .await
    }

    /// [`consume`](Self::consume) with every option.
    pub async fn consume_with(&self, topic: &str, options: &ConsumeOptions) -> Result<Vec<Record>> {
        consume(&self.bootstrap(), topic, options).await
    }

    fn server_properties(&self) -> PathBuf {
        self.workdir.path().join("server.properties")
    }

    fn log4j_properties(&self) -> PathBuf {
        self.workdir.path().join("log4j2.properties")
    }

    fn write_config(&self) -> Result<()> {
        let o = &self.options;
        let (port, cport) = (self.port, self.controller_port);
        let mut props: Vec<(String, String)> = [
            ("process.roles", "broker,controller".to_owned()),
            ("node.id", NODE_ID.to_string()),
            (
                "controller.quorum.voters",
                format!("{NODE_ID}@127.0.0.1:{cport}"),
            ),
            (
                "listeners",
                format!("PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}"),
            ),
            (
                "advertised.listeners",
                format!("PLAINTEXT://127.0.0.1:{port}"),
            ),
            (
                "listener.security.protocol.map",
                "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT".to_owned(),
            ),
            ("controller.listener.names", "CONTROLLER".to_owned()),
            ("inter.broker.listener.name", "PLAINTEXT".to_owned()),
            ("log.dirs", self.data_dir.display().to_string()),
            (
                "auto.create.topics.enable",
                o.auto_create_topics.to_string(),
            ),
            ("num.partitions", o.default_partitions.to_string()),
            ("default.replication.factor", "1".to_owned()),
            ("min.insync.replicas", "1".to_owned()),
            // One node: every internal topic at RF 1 / min ISR 1, or groups
            // and InitProducerId (idempotence, transactions) never work.
            // Few partitions, because each is created on first use.
            ("offsets.topic.replication.factor", "1".to_owned()),
            ("offsets.topic.num.partitions", "4".to_owned()),
            ("transaction.state.log.replication.factor", "1".to_owned()),
            ("transaction.state.log.min.isr", "1".to_owned()),
            ("transaction.state.log.num.partitions", "4".to_owned()),
            (
                "share.coordinator.state.topic.replication.factor",
                "1".to_owned(),
            ),
            ("share.coordinator.state.topic.min.isr", "1".to_owned()),
            (
                "share.coordinator.state.topic.num.partitions",
                "1".to_owned(),
            ),
            ("group.initial.rebalance.delay.ms", "0".to_owned()),
            // The broker is unfenced on a heartbeat: beat often to be ready sooner.
            ("broker.heartbeat.interval.ms", "250".to_owned()),
            // Nothing else is there to balance or clean up in a test's lifetime.
            ("auto.leader.rebalance.enable", "false".to_owned()),
            ("log.initial.task.delay.ms", "1000".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (key, value) in &o.properties {
            props.retain(|(k, _)| k != key);
            props.push((key.clone(), value.clone()));
        }
        let mut text = String::from("# Written by holdfast-e2e's KafkaBroker.\n");
        for (key, value) in &props {
            writeln!(text, "{key}={value}").expect("writing to a String");
        }
        write_file(&self.server_properties(), &text)?;
        write_file(&self.log4j_properties(), LOG4J_PROPERTIES)
    }

    /// `java` with the classpath and common options; the caller appends
    /// its own JVM options, then the main class and its arguments.
    fn java(&self, log_level: &str) -> Command {
        let mut cmd = tied_command(java_binary());
        cmd.arg(format!("-Xms{}", self.options.heap))
            .arg(format!("-Xmx{}", self.options.heap))
            .args(JVM_OPTIONS)
            .args(
                self.class_archive
                    .iter()
                    .map(|a| format!("-XX:SharedArchiveFile={}", a.display())),
            )
            .args(&self.options.jvm_options)
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.log4j_properties().display()
            ))
            .arg(format!("-Dholdfast.log.level={log_level}"))
            .arg("-cp")
            .arg(self.libs.join("*"))
            .current_dir(self.workdir.path())
            .stdin(Stdio::null());
        cmd
    }

    /// Formats the data directory unless it already holds a formatted node.
    async fn format_storage(&self) -> Result<()> {
        if self.data_dir.join("meta.properties").exists() {
            return Ok(());
        }
        let log_path = self.workdir.path().join("format.log");
        let log = File::create(&log_path).context("creating format.log")?;
        let mut cmd = self.java("warn");
        // A short-lived tool: the quick compiler alone starts faster.
        cmd.arg("-XX:TieredStopAtLevel=1")
            .arg("kafka.tools.StorageTool")
            .arg("format")
            .arg("--cluster-id")
            .arg(cluster_id())
            .arg("--config")
            .arg(self.server_properties())
            .arg("--ignore-formatted")
            .stdout(log.try_clone()?)
            .stderr(log);
        let status = tokio::task::spawn_blocking(move || cmd.status())
            .await?
            .context("running kafka.tools.StorageTool")?;
        if !status.success() {
            bail!(
                "formatting {} failed ({status}):\n{}",
                self.data_dir.display(),
                log_tail(&log_path, 40)
            );
        }
        Ok(())
    }

    /// Launches the java process and waits until the broker answers.
    async fn launch(&mut self) -> Result<()> {
        let log_path = self.log_path();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = self.java("info");
        if let Some(archive) = &self.dump_class_archive {
            cmd.arg(format!("-XX:ArchiveClassesAtExit={}", archive.display()));
        }
        cmd.arg("kafka.Kafka")
            .arg(self.server_properties())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = spawn_tied(cmd).context("starting java (is a JDK 17+ installed?)")?;
        self.child = Some(child);

        let started = Instant::now();
        let bootstrap = self.bootstrap();
        let probe = Arc::new(metadata_client(&bootstrap)?);
        loop {
            let client = Arc::clone(&probe);
            let answer = tokio::task::spawn_blocking(move || {
                client.fetch_metadata(None, Duration::from_millis(500))
            })
            .await?;
            match answer {
                Ok(metadata) if !metadata.brokers().is_empty() => return Ok(()),
                _ => {}
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                // The bind failure can sit before a long config dump: the
                // whole log is searched, not its tail.
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                let why = if log.contains("Address already in use") {
                    PORT_TAKEN
                } else {
                    "kafka exited during start-up"
                };
                bail!(
                    "{why} ({status}); log {}:\n{}",
                    log_path.display(),
                    log_tail(&log_path, 60)
                );
            }
            if started.elapsed() > self.options.ready_timeout {
                self.kill();
                bail!(
                    "kafka did not answer on {bootstrap} within {:?}; log {}:\n{}",
                    self.options.ready_timeout,
                    log_path.display(),
                    log_tail(&log_path, 60)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.kill();
        // The log goes with the temporary directory: show a failing test
        // what the broker last said.
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of the Kafka log ({}) ---\n{}",
                self.bootstrap(),
                log_tail(&self.log_path(), 30)
            );
        }
    }
}

/// JVM flags the broker and the storage tool run with (besides the heap),
/// after Kafka's own `kafka-run-class.sh` defaults.
const JVM_OPTIONS: &[&str] = &[
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
];

/// log4j2 configuration: everything to stdout (redirected to the log file).
const LOG4J_PROPERTIES: &str = "\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = ${sys:holdfast.log.level:-info}
rootLogger.appenderRef.out.ref = out
";

/// One record read back from Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Topic it was read from.
    pub topic: String,
    /// Partition it was read from.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
    /// Create or log-append time, milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
    /// Key, `None` for a null key.
    pub key: Option<Vec<u8>>,
    /// Value, `None` for a null value (a tombstone).
    pub payload: Option<Vec<u8>>,
    /// Headers in order; a null header value reads as empty.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    /// The value of the first header named `key`.
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }

    /// The key as UTF-8, if it is.
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The payload as UTF-8, if it is.
    pub fn payload_str(&self) -> Option<&str> {
        self.payload
            .as_deref()
            .and_then(|p| std::str::from_utf8(p).ok())
    }

    fn from_message(message: &impl Message<Headers = rdkafka::message::BorrowedHeaders>) -> Self {
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
        }
    }
}

/// Which records a consumer sees (`isolation.level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// Only committed transactional records, and non-transactional ones.
    #[default]
    ReadCommitted,
    /// Everything written, including open and aborted transactions.
    ReadUncommitted,
}

impl Isolation {
    fn as_config(self) -> &'static str {
        match self {
            Self::ReadCommitted => "read_committed",
            Self::ReadUncommitted => "read_uncommitted",
        }
    }
}

/// What to read and for how long.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// Stop once this many records arrived.
    pub expected: usize,
    /// Stop once this much time passed, with whatever arrived.
    pub timeout: Duration,
    /// `isolation.level`.
    pub isolation: Isolation,
}

impl ConsumeOptions {
    /// Read-committed, `expected` records or `timeout`, whichever is first.
    pub fn new(expected: usize, timeout: Duration) -> Self {
        Self {
            expected,
            timeout,
            isolation: Isolation::ReadCommitted,
        }
    }

    /// The same, with another isolation level.
    pub fn isolation(mut self, isolation: Isolation) -> Self {
        self.isolation = isolation;
        self
    }
}

/// Reads `topic` on the cluster at `bootstrap` from the beginning of every
/// partition until `options.expected` records arrived or `options.timeout`
/// passed; returns what arrived, in arrival order.
pub async fn consume(
    bootstrap: &str,
    topic: &str,
    options: &ConsumeOptions,
) -> Result<Vec<Record>> {
    let (bootstrap, topic, options) = (bootstrap.to_owned(), topic.to_owned(), options.clone());
    tokio::task::spawn_blocking(move || {
        let mut records = Vec::with_capacity(options.expected.min(1 << 16));
        consume_each(&bootstrap, &topic, &options, |record| records.push(record))?;
        Ok(records)
    })
    .await?
}

/// Like [`consume`], but blocking, and handing each record to `on_record`
/// as it arrives instead of collecting them. Returns how many arrived.
pub fn consume_each(
    bootstrap: &str,
    topic: &str,
    options: &ConsumeOptions,
    mut on_record: impl FnMut(Record),
) -> Result<usize> {
    let deadline = Instant::now() + options.timeout;
    if options.expected == 0 {
        return Ok(0);
    }
    // assign() needs a group.id, but nothing here joins or commits to it.
    let group = format!("holdfast-e2e-{}", uuid::Uuid::new_v4());
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", options.isolation.as_config())
        .set("allow.auto.create.topics", "false")
        .set("reconnect.backoff.max.ms", "500")
        .set("topic.metadata.refresh.interval.ms", "1000")
        .create()
        .context("creating a consumer")?;

    // The topic may not exist yet (a test may start reading before anything
    // is produced): wait for it within the same deadline.
    let partitions = loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(0);
        }
        let wait = (deadline - now).min(Duration::from_secs(1));
        if let Ok(metadata) = consumer.fetch_metadata(Some(topic), wait) {
            let partitions = partitions_with_leader(&metadata, topic);
            if let Some(partitions) = partitions.filter(|p| !p.is_empty()) {
                break partitions;
            }
        }
        std::thread::sleep(POLL_INTERVAL.min(deadline.saturating_duration_since(Instant::now())));
    };

    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer
        .assign(&assignment)
        .context("assigning partitions")?;

    let mut received = 0;
    while received < options.expected {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        // Errors are transient here (broker restarting, leader moving):
        // librdkafka retries by itself, and the deadline bounds the wait.
        if let Some(Ok(message)) = consumer.poll((deadline - now).min(Duration::from_millis(200))) {
            on_record(Record::from_message(&message));
            received += 1;
        }
    }
    Ok(received)
}

/// Creates `name` with `partitions` partitions, replication factor 1 and
/// the given topic configs on the cluster at `bootstrap`, then waits until
/// every partition has a leader. Fails if the topic exists
/// ([`is_topic_exists`] tells that failure apart).
pub async fn create_topic(
    bootstrap: &str,
    name: &str,
    partitions: i32,
    config: &[(&str, &str)],
) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("creating an admin client")?;
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (key, value) in config {
        topic = topic.set(key, value);
    }
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics([&topic], &options)
        .await
        .with_context(|| format!("creating topic {name}"))?;
    for result in results {
        if let Err((topic, code)) = result {
            return Err(anyhow::Error::new(KafkaError::AdminOp(code)))
                .with_context(|| format!("creating topic {topic}"));
        }
    }

    let expected = usize::try_from(partitions).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = Arc::new(metadata_client(bootstrap)?);
    loop {
        let (client, topic) = (Arc::clone(&client), name.to_owned());
        let led = tokio::task::spawn_blocking(move || {
            let metadata = client
                .fetch_metadata(Some(&topic), Duration::from_secs(1))
                .ok()?;
            partitions_with_leader(&metadata, &topic)
        })
        .await?;
        if led.is_some_and(|p| p.len() == expected) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("topic {name} was created but its partitions have no leader after 30s");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Records currently in `topic` (sum over partitions of high minus low
/// watermark): duplicates included, so more than the distinct events.
pub async fn record_count(bootstrap: &str, topic: &str) -> Result<usize> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || -> Result<usize> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()?;
        let md = c.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let mut total = 0;
        for p in md.topics()[0].partitions() {
            let (lo, hi) = c.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
            total += (hi - lo) as usize;
        }
        Ok(total)
    })
    .await?
}

/// Whether `error` (from [`create_topic`]) says the topic already exists.
pub fn is_topic_exists(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<KafkaError>(),
        Some(KafkaError::AdminOp(RDKafkaErrorCode::TopicAlreadyExists))
    )
}

/// The classpath folder of the pinned Kafka: `$HOLDFAST_KAFKA_LIBS` if set,
/// otherwise what `e2e/kafka/fetch.sh` prints (fetching it the first time).
pub async fn libs_dir() -> Result<PathBuf> {
    static LIBS: tokio::sync::OnceCell<PathBuf> = tokio::sync::OnceCell::const_new();
    LIBS.get_or_try_init(|| async {
        if let Some(dir) = std::env::var_os(LIBS_ENV) {
            return Ok(PathBuf::from(dir));
        }
        let output = tokio::task::spawn_blocking(|| {
            Command::new("bash")
                .arg(FETCH_SCRIPT)
                .stdin(Stdio::null())
                .stderr(Stdio::inherit())
                .output()
        })
        .await?
        .with_context(|| format!("running {FETCH_SCRIPT} (or set {LIBS_ENV})"))?;
        if !output.status.success() {
            bail!("{FETCH_SCRIPT} failed ({})", output.status);
        }
        let stdout = String::from_utf8(output.stdout).context("fetch.sh printed non-UTF-8")?;
        let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
        if !dir.is_dir() {
            bail!(
                "{FETCH_SCRIPT} printed {}, which is no directory",
                dir.display()
            );
        }
        Ok(dir)
    })
    .await
    .cloned()
}

/// The JVM class-data-sharing (AppCDS) archive for this Kafka and this JDK,
/// which cuts a broker's start-up by about a third. Best effort: `None`
/// whenever it is disabled, cannot be made, or is being made by another
/// caller (who will not be waited for).
///
/// The archive is made once per cache and JDK build by a training broker
/// that runs a little traffic and dumps the classes it loaded when stopped
/// (`-XX:ArchiveClassesAtExit`); a JVM that finds it does not match its
/// build or classpath ignores it and starts normally.
async fn class_archive(libs: &Path) -> Option<PathBuf> {
    enum State {
        Unknown,
        Training,
        Done(Option<PathBuf>),
    }
    static STATE: Mutex<State> = Mutex::new(State::Unknown);

    if std::env::var_os(CDS_ENV).is_some_and(|v| v == "0") {
        return None;
    }
    {
        let mut state = STATE.lock().ok()?;
        match &*state {
            State::Done(archive) => return archive.clone(),
            State::Training => return None,
            State::Unknown => *state = State::Training,
        }
    }
    let archive = make_class_archive(libs).await;
    if let Ok(mut state) = STATE.lock() {
        *state = State::Done(archive.clone());
    }
    archive
}

async fn make_class_archive(libs: &Path) -> Option<PathBuf> {
    let dir = libs.parent()?.join("cds");
    fs::create_dir_all(&dir).ok()?;
    let key = jdk_fingerprint().await?;
    let archive = dir.join(format!("kafka-{key:016x}.jsa"));
    if archive.exists() {
        return Some(archive);
    }
    // Across processes: whoever holds the lock trains, the others go without.
    let lock_file = File::create(dir.join(format!("kafka-{key:016x}.lock"))).ok()?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).ok()?;
    if archive.exists() {
        return Some(archive);
    }
    let partial = dir.join(format!("kafka-{key:016x}.jsa.partial"));
    let _ = fs::remove_file(&partial);
    eprintln!("holdfast-e2e: training a class-data-sharing archive for Kafka (once)");
    if let Err(error) = train(libs, &partial).await {
        eprintln!("holdfast-e2e: no class-data-sharing archive: {error:#}");
        let _ = fs::remove_file(&partial);
        return None;
    }
    fs::rename(&partial, &archive).ok()?;
    Some(archive)
}

/// Runs a broker through start-up, some idempotent and transactional
/// traffic, and a clean stop, dumping the classes it loaded to `archive`.
async fn train(libs: &Path, archive: &Path) -> Result<()> {
    let mut broker = KafkaBroker::start_inner(
        KafkaOptions::default(),
        libs.to_owned(),
        None,
        Some(archive.to_owned()),
    )
    .await?;
    let bootstrap = broker.bootstrap();
    broker.create_topic("training", 2, &[]).await?;
    let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("transactional.id", "holdfast-cds-training")
        .create()?;
    let timeout = Duration::from_secs(30);
    let producer = tokio::task::spawn_blocking(move || -> Result<_> {
        use rdkafka::producer::Producer as _;
        producer.init_transactions(timeout)?;
        producer.begin_transaction()?;
        Ok(producer)
    })
    .await??;
    for i in 0..10 {
        let payload = format!("record {i}");
        producer
            .send(
                rdkafka::producer::FutureRecord::to("training")
                    .key("k")
                    .payload(&payload),
                timeout,
            )
            .await
            .map_err(|(error, _)| error)?;
    }
    tokio::task::spawn_blocking(move || {
        use rdkafka::producer::Producer as _;
        producer.commit_transaction(timeout)
    })
    .await??;
    broker.consume("training", 10, timeout).await?;
    // Dumping takes a while, longer on a busy machine.
    broker.stop_within(Duration::from_secs(180)).await?;
    let size = fs::metadata(archive).map(|m| m.len()).unwrap_or_default();
    if size == 0 {
        bail!(
            "the training broker wrote no archive; log {}",
            broker.log_path().display()
        );
    }
    Ok(())
}

/// A fingerprint of the `java` that runs the broker (its version output),
/// since an archive only fits the JDK build that wrote it.
async fn jdk_fingerprint() -> Option<u64> {
    let java = java_binary();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(&java)
            .arg("-version")
            .stdin(Stdio::null())
            .output()
    })
    .await
    .ok()?
    .ok()?;
    if !output.status.success() {
        return None;
    }
    // FNV-1a: stable across Rust releases, unlike DefaultHasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in java_binary()
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .chain(&output.stderr)
    {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    Some(hash)
}

/// `$JAVA_HOME/bin/java` if it exists, otherwise `java` from `PATH`.
fn java_binary() -> PathBuf {
    std::env::var_os("JAVA_HOME")
        .map(|home| PathBuf::from(home).join("bin/java"))
        .filter(|java| java.exists())
        .unwrap_or_else(|| PathBuf::from("java"))
}

/// The partitions of `topic` that have a leader, `None` if the topic is
/// unknown or errored.
fn partitions_with_leader(metadata: &Metadata, topic: &str) -> Option<Vec<i32>> {
    let topic = metadata.topics().iter().find(|t| t.name() == topic)?;
    if topic.error().is_some() {
        return None;
    }
    Some(
        topic
            .partitions()
            .iter()
            .filter(|p| p.error().is_none() && p.leader() >= 0)
            .map(|p| p.id())
            .collect(),
    )
}

/// A client that only asks for metadata, reconnecting quickly.
fn metadata_client(bootstrap: &str) -> Result<BaseConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("reconnect.backoff.ms", "20")
        .set("reconnect.backoff.max.ms", "200")
        .set("allow.auto.create.topics", "false")
        .set("log_level", "3")
        .create()
        .context("creating a metadata client")
}

/// Starts tried when a picked port was taken before Kafka bound it.
const START_ATTEMPTS: u32 = 3;

/// The broker could not bind a listener: another process took the port
/// between [`pick_ports`] and Kafka's start.
pub fn port_was_taken(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains(PORT_TAKEN)
}

/// How a start that failed on a port in use is reported.
const PORT_TAKEN: &str = "kafka exited during start-up: a listener's port is in use";

/// Free loopback ports for whichever of the two are not given. Both
/// listeners are held until both are picked, so they differ.
fn pick_ports(port: Option<u16>, controller_port: Option<u16>) -> Result<(u16, u16)> {
    let bind = || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port");
    let first = bind()?;
    let second = bind()?;
    let port = port.unwrap_or(first.local_addr()?.port());
    let controller_port = controller_port.unwrap_or(second.local_addr()?.port());
    if port == controller_port {
        bail!("broker and controller ports are both {port}");
    }
    Ok((port, controller_port))
}

/// A random KRaft cluster id: 16 random bytes, base64url, unpadded, and not
/// starting with '-' (that would read as a flag).
fn cluster_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    loop {
        let bytes = uuid::Uuid::new_v4().into_bytes();
        let mut bits: u32 = 0;
        let mut nbits = 0;
        let mut id = String::with_capacity(22);
        for byte in bytes {
            bits = (bits << 8) | u32::from(byte);
            nbits += 8;
            while nbits >= 6 {
                nbits -= 6;
                id.push(char::from(ALPHABET[((bits >> nbits) & 63) as usize]));
            }
        }
        if nbits > 0 {
            id.push(char::from(ALPHABET[((bits << (6 - nbits)) & 63) as usize]));
        }
        if !id.starts_with('-') {
            return id;
        }
    }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The last `lines` lines of a log file, for error messages.
fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

/// Whether `setpriv --pdeathsig` works here (util-linux, on Linux).
fn has_setpriv() -> bool {
    static SETPRIV: OnceLock<bool> = OnceLock::new();
    *SETPRIV.get_or_init(|| {
        Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// A command running `program` that gets `SIGKILL` when the thread that
/// spawned it exits (through `setpriv --pdeathsig KILL` where available), so
/// the broker cannot outlive a test process killed without unwinding.
fn tied_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if has_setpriv() {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// Spawns `cmd` from one thread that lives as long as the process: the
/// parent-death signal of [`tied_command`] fires when the spawning *thread*
/// exits, and runtime worker or blocking-pool threads come and go.
fn spawn_tied(cmd: Command) -> std::io::Result<Child> {
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();

    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("kafka-spawner".to_owned())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the kafka-spawner thread");
        Mutex::new(tx)
    });
    let gone = || std::io::Error::other("kafka-spawner thread is gone");
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .map_err(|_| gone())?
        .send((cmd, reply_tx))
        .map_err(|_| gone())?;
    reply_rx.recv().map_err(|_| gone())?
}
