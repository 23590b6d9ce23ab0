//! Command line and environment (`HOLDFAST_*`) configuration, validated once
//! into typed values. Every tunable has a flag, an env fallback and a default;
//! a bad value is rejected at start-up with a message that names the flag.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod kafka;

pub use kafka::{
    DEFAULT_TRANSACTION_EVENTS, Delivery, FLUSH_IN_FLIGHT_EVENTS, KafkaArgs, KafkaConfig,
    LIBRDKAFKA_MESSAGE_MAX_BYTES, RECORD_OVERHEAD_BYTES, SERVE_IN_FLIGHT_EVENTS,
};

/// Result of validating configuration.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A configuration value that parsed but makes no sense.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--stream` value is not `NAME=TOPIC[:durable|direct]`.
    #[error("--stream {value:?}: {reason}")]
    Stream { value: String, reason: String },
    /// A `--kafka-property` value is not `key=value`.
    #[error("--kafka-property {value:?}: expected key=value")]
    KafkaProperty { value: String },
    /// `--default-stream` names a stream that is not configured.
    #[error("--default-stream {name:?} is not one of the configured streams ({known})")]
    DefaultStream { name: String, known: String },
    /// `--partition-key-pointer` is not a JSON pointer.
    #[error("--partition-key-pointer {value:?} must be empty or start with '/'")]
    KeyPointer { value: String },
    /// The auth token file could not be read or holds no token.
    #[error("--auth-tokens-file {path}: {reason}")]
    AuthTokens { path: String, reason: String },
    /// Two limits contradict each other.
    #[error(
        "{flag} ({value}) must be at most {other} ({limit}) minus {margin} bytes of record overhead: {why}"
    )]
    Conflict {
        flag: &'static str,
        value: u64,
        other: &'static str,
        limit: u64,
        margin: u64,
        why: &'static str,
    },
    /// A `--kafka-property` would weaken the delivery guarantee.
    #[error("--kafka-property {key}={value}: {why}")]
    UnsafeProperty {
        key: String,
        value: String,
        why: &'static str,
    },
    /// `--max-inflight-bytes` is below what one valid request may hold.
    #[error(
        "--max-inflight-bytes {value} is below the {needed} bytes one request may hold with --max-body-bytes, --max-decompressed-bytes and --max-events-per-request ({copies} copies of its events); raise it or lower those"
    )]
    InflightBudget {
        value: u64,
        needed: u64,
        copies: usize,
    },
    /// A numeric limit is out of range.
    #[error("{flag} must be {expected}, got {value}")]
    Range {
        flag: &'static str,
        expected: &'static str,
        value: u64,
    },
}

/// `holdfast-capture`: accepts events over HTTP, keeps them on disk, forwards them to Kafka.
#[derive(Debug, Parser)]
#[command(name = "holdfast-capture", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, env = "HOLDFAST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API, buffer events on disk and forward them to Kafka.
    Serve(Box<ServeArgs>),
    /// Drain one buffer directory into Kafka and exit (0 only when it is empty).
    Flush(FlushArgs),
    /// Print buffer figures (events, bytes, oldest age, dead letters, volume id).
    Inspect(InspectArgs),
    /// List, export or replay the dead letters kept in a buffer.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// Print the OpenAPI document of the HTTP API (what `GET /openapi.json`
    /// serves and `docs/openapi.json` holds).
    Openapi,
}

/// `holdfast-capture dead-letters ...`. `export --delete` and `replay` write
/// to the buffer, so they take the drainer lock: run them where no capture
/// pod or flush Job holds the volume (a pod scaled to zero, a debug Job).
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// Print the dead letters (seq, uuid, topic, reason, failed_at), oldest first.
    List {
        #[command(flatten)]
        select: DeadLetterSelect,
        /// Print JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the dead letters as NDJSON (metadata plus the event as sent).
    Export {
        #[command(flatten)]
        select: DeadLetterSelect,
        /// Output file (synced before anything is deleted); `-` for stdout.
        #[arg(long, default_value = "-")]
        out: PathBuf,
        /// Delete the exported dead letters from the buffer once the file is synced.
        #[arg(long)]
        delete: bool,
    },
    /// Move dead letters back into the queue, to be delivered again (same
    /// uuids, new sequence numbers), e.g. after a topic was created.
    Replay {
        #[command(flatten)]
        select: DeadLetterSelect,
    },
}

/// Which buffer and which of its dead letters.
#[derive(Debug, Clone, Args)]
pub struct DeadLetterSelect {
    /// Directory holding the buffer.
    #[arg(long, env = "HOLDFAST_DATA_DIR", default_value = "/var/lib/holdfast")]
    pub data_dir: PathBuf,
    /// Only these sequence numbers (repeatable).
    #[arg(long = "seq")]
    pub seqs: Vec<i64>,
    /// Only dead letters meant for this topic.
    #[arg(long)]
    pub topic: Option<String>,
    /// Only dead letters whose reason starts with this (e.g. `unknown_topic`).
    #[arg(long)]
    pub reason: Option<String>,
}

/// When a commit is acknowledged.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Default)]
pub enum Durability {
    /// 200 after the transaction is fsynced (WAL, `synchronous=FULL`).
    #[default]
    Fsync,
    /// 200 after the transaction is written to the OS (no fsync): survives a
    /// killed process, not a power loss or kernel crash.
    Os,
}

/// What a durable stream does when the disk fails.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Default)]
pub enum OnDiskFailure {
    /// Answer 503 with Retry-After and turn unready.
    #[default]
    Reject,
    /// Deliver straight to Kafka and answer after its ack.
    Direct,
}

/// Delivery mode of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamMode {
    /// Through the disk buffer: 200 means on disk.
    Durable,
    /// Straight to Kafka: 200 means Kafka acknowledged (acks=all).
    Direct,
}

/// A named stream: where its events go and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    /// Kafka topic.
    pub topic: String,
    /// Delivery mode.
    pub mode: StreamMode,
}

/// Buffer location and behaviour shared by `serve` and `flush`.
#[derive(Debug, Clone, Args)]
pub struct BufferArgs {
    /// Directory holding the buffer (the PersistentVolume's mount).
    #[arg(long, env = "HOLDFAST_DATA_DIR", default_value = "/var/lib/holdfast")]
    pub data_dir: PathBuf,
    /// fsync: 200 after fsync (default). os: 200 after write, no fsync (loses
    /// acknowledged events on power loss or kernel crash, not on a killed process).
    #[arg(long, env = "HOLDFAST_DURABILITY", value_enum, default_value_t = Durability::Fsync)]
    pub durability: Durability,
    /// Disk space set aside at start and released when the disk fills up, so
    /// delivered events can still be deleted (bytes; 0 disables).
    #[arg(long, env = "HOLDFAST_DISK_RESERVE_BYTES", default_value_t = 8 << 20)]
    pub disk_reserve_bytes: u64,
}

/// `serve` arguments.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "HOLDFAST_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub buffer: BufferArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// A stream: `NAME=TOPIC[:durable|direct]` (repeatable). Env: comma separated.
    #[arg(
        long = "stream",
        env = "HOLDFAST_STREAMS",
        value_delimiter = ',',
        default_value = "default=events:durable"
    )]
    pub streams: Vec<String>,
    /// Stream used by `POST /v1/events`.
    #[arg(long, env = "HOLDFAST_DEFAULT_STREAM", default_value = "default")]
    pub default_stream: String,
    /// JSON pointer (e.g. `/user/id`) giving the partition key when an event has no `key` field.
    #[arg(long, env = "HOLDFAST_PARTITION_KEY_POINTER", default_value = "")]
    pub partition_key_pointer: String,
    /// Buffer quota in bytes of event data; at the quota new events get 503.
    #[arg(long, env = "HOLDFAST_BUFFER_QUOTA_BYTES", default_value_t = 1 << 30)]
    pub buffer_quota_bytes: u64,
    /// Largest request body accepted, as sent (bytes).
    #[arg(long, env = "HOLDFAST_MAX_BODY_BYTES", default_value_t = 5 << 20)]
    pub max_body_bytes: u64,
    /// Largest request body after gzip decompression (bytes).
    #[arg(long, env = "HOLDFAST_MAX_DECOMPRESSED_BYTES", default_value_t = 20 << 20)]
    pub max_decompressed_bytes: u64,
    /// Largest single event: bytes of its JSON plus its partition key. Must
    /// leave room for the record overhead under the producer's
    /// `message.max.bytes` (librdkafka's default 1,000,000), so that every
    /// accepted event can be delivered.
    #[arg(long, env = "HOLDFAST_MAX_EVENT_BYTES", default_value_t = LIBRDKAFKA_MESSAGE_MAX_BYTES - RECORD_OVERHEAD_BYTES)]
    pub max_event_bytes: u64,
    /// File of accepted bearer tokens, one per line (a mounted Secret). Unset: no auth.
    #[arg(long, env = "HOLDFAST_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,
    /// How often the token file is re-read, so a rotated Secret applies without a restart (seconds).
    #[arg(long, env = "HOLDFAST_AUTH_RELOAD_SECS", default_value_t = 5)]
    pub auth_reload_secs: u64,
    /// Most events in one request; more is a 413.
    #[arg(
        long,
        env = "HOLDFAST_MAX_EVENTS_PER_REQUEST",
        default_value_t = 10_000
    )]
    pub max_events_per_request: u64,
    /// Memory all requests in flight may hold together (bodies, inflated
    /// bodies, parsed events); past it new requests get 503 (bytes). Default:
    /// 64 MiB, or what one request may hold within the other limits if more.
    #[arg(long, env = "HOLDFAST_MAX_INFLIGHT_BYTES")]
    pub max_inflight_bytes: Option<u64>,
    /// Largest request head (request line and headers); more is a 431 (bytes).
    #[arg(long, env = "HOLDFAST_MAX_HEADER_BYTES", default_value_t = 16 << 10)]
    pub max_header_bytes: u64,
    /// A connection that has not sent a whole request head within this long
    /// (also: an idle keep-alive connection) is closed (seconds).
    #[arg(long, env = "HOLDFAST_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub header_read_timeout_secs: u64,
    /// A request whose body has not fully arrived within this long gets 408
    /// and its connection is closed (seconds).
    #[arg(long, env = "HOLDFAST_BODY_READ_TIMEOUT_SECS", default_value_t = 30)]
    pub body_read_timeout_secs: u64,
    /// Most open client connections; past it a new connection gets 503 and is closed.
    #[arg(long, env = "HOLDFAST_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: u64,
    /// What a durable stream does when the disk fails.
    #[arg(long, env = "HOLDFAST_ON_DISK_FAILURE", value_enum, default_value_t = OnDiskFailure::Reject)]
    pub on_disk_failure: OnDiskFailure,
    /// On SIGTERM, how long to keep draining the buffer into Kafka before exiting (seconds).
    #[arg(long, env = "HOLDFAST_DRAIN_TIMEOUT_SECS", default_value_t = 25)]
    pub drain_timeout_secs: u64,
    /// A request waits at most this long for its buffer commit; past it the
    /// disk counts as hung: 503 and unready until a commit finishes.
    #[arg(long, env = "HOLDFAST_COMMIT_TIMEOUT_SECS", default_value_t = 10)]
    pub commit_timeout_secs: u64,
    /// An event whose uuid was delivered within this many seconds (or is still
    /// buffered) is acknowledged again without being stored twice; 0 turns
    /// deduplication off. Remembered uuids count against the buffer quota
    /// (and give way to events when it is full).
    #[arg(long, env = "HOLDFAST_DEDUP_WINDOW_SECS", default_value_t = 600)]
    pub dedup_window_secs: u64,
    /// Retry-After value sent with 503 answers (seconds).
    #[arg(long, env = "HOLDFAST_RETRY_AFTER_SECS", default_value_t = 1)]
    pub retry_after_secs: u64,
    /// PersistentVolumeClaim holding the buffer: its PV is kept `Retain` while
    /// events may be on it and flipped to `Delete` after a clean drain. Unset: no Kubernetes.
    #[arg(long, env = "HOLDFAST_VOLUME_CLAIM")]
    pub volume_claim: Option<String>,
    /// Namespace of `--volume-claim` (in a pod: from the downward API).
    #[arg(long, env = "HOLDFAST_NAMESPACE", default_value = "default")]
    pub namespace: String,
}

/// `flush` arguments.
#[derive(Debug, Clone, Args)]
pub struct FlushArgs {
    #[command(flatten)]
    pub buffer: BufferArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Give up (exit non-zero) when the buffer is not empty after this long (seconds).
    #[arg(long, env = "HOLDFAST_FLUSH_TIMEOUT_SECS", default_value_t = 600)]
    pub timeout_secs: u64,
}

/// `inspect` arguments.
#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    /// Directory holding the buffer.
    #[arg(long, env = "HOLDFAST_DATA_DIR", default_value = "/var/lib/holdfast")]
    pub data_dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Validated `serve` configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Buffer directory.
    pub data_dir: PathBuf,
    /// Durability mode.
    pub durability: Durability,
    /// Disk reserve, bytes.
    pub disk_reserve_bytes: u64,
    /// Kafka settings.
    pub kafka: KafkaConfig,
    /// Streams by name.
    pub streams: BTreeMap<String, Stream>,
    /// Stream for `POST /v1/events`.
    pub default_stream: String,
    /// JSON pointer for the partition key, if any.
    pub key_pointer: Option<String>,
    /// Buffer quota, bytes.
    pub quota_bytes: u64,
    /// Body limit, bytes as sent.
    pub max_body_bytes: usize,
    /// Body limit after decompression.
    pub max_decompressed_bytes: usize,
    /// Event limit.
    pub max_event_bytes: usize,
    /// Accepted bearer tokens (reloaded from their file); none means no auth.
    pub auth: crate::http::auth::AuthTokens,
    /// How often the token file is re-read.
    pub auth_reload: Duration,
    /// Most events per request.
    pub max_events_per_request: usize,
    /// The shared budget of bytes held by requests in flight.
    pub inflight: crate::http::limits::InflightBudget,
    /// Largest request head, bytes.
    pub max_header_bytes: usize,
    /// Deadline for a request head (and keep-alive idle time).
    pub header_read_timeout: Duration,
    /// Deadline for a request body.
    pub body_read_timeout: Duration,
    /// Most open client connections.
    pub max_connections: usize,
    /// Disk failure policy.
    pub on_disk_failure: OnDiskFailure,
    /// Drain deadline on SIGTERM.
    pub drain_timeout: Duration,
    /// Longest wait for a buffer commit before answering 503.
    pub commit_timeout: Duration,
    /// Deduplication window (zero: off).
    pub dedup_window: Duration,
    /// Retry-After for 503s.
    pub retry_after_secs: u64,
    /// Claim of the buffer's volume and its namespace, when on Kubernetes.
    pub volume_claim: Option<(String, String)>,
}

/// Parses one `NAME=TOPIC[:durable|direct]`.
pub fn parse_stream(value: &str) -> Result<(String, Stream)> {
    let err = |reason: &str| Error::Stream {
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let (name, rest) = value
        .split_once('=')
        .ok_or_else(|| err("expected NAME=TOPIC[:durable|direct]"))?;
    let (topic, mode) = match rest.rsplit_once(':') {
        Some((topic, "durable")) => (topic, StreamMode::Durable),
        Some((topic, "direct")) => (topic, StreamMode::Direct),
        Some((_, other)) => {
            return Err(err(&format!(
                "unknown mode {other:?}, expected durable or direct"
            )));
        }
        None => (rest, StreamMode::Durable),
    };
    let valid_name = |s: &str| {
        !s.is_empty()
            && s.len() <= 249
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    };
    if !valid_name(name) {
        return Err(err("stream name must be non-empty [A-Za-z0-9._-]"));
    }
    if !valid_name(topic) {
        return Err(err("topic must be a valid Kafka topic name [A-Za-z0-9._-]"));
    }
    Ok((
        name.to_owned(),
        Stream {
            topic: topic.to_owned(),
            mode,
        },
    ))
}

impl ServeArgs {
    /// Validates into [`ServeConfig`].
    pub fn validate(&self) -> Result<ServeConfig> {
        let mut streams = BTreeMap::new();
        for value in self.streams.iter().filter(|v| !v.trim().is_empty()) {
            let (name, stream) = parse_stream(value.trim())?;
            streams.insert(name, stream);
        }
        if !streams.contains_key(&self.default_stream) {
            return Err(Error::DefaultStream {
                name: self.default_stream.clone(),
                known: streams.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        }
        let key_pointer = match self.partition_key_pointer.as_str() {
            "" => None,
            p if p.starts_with('/') => Some(p.to_owned()),
            p => {
                return Err(Error::KeyPointer {
                    value: p.to_owned(),
                });
            }
        };
        let auth = match &self.auth_tokens_file {
            None => crate::http::auth::AuthTokens::disabled(),
            Some(path) => crate::http::auth::AuthTokens::from_file(path).map_err(|reason| {
                Error::AuthTokens {
                    path: path.display().to_string(),
                    reason,
                }
            })?,
        };
        for (flag, value) in [
            ("--max-body-bytes", self.max_body_bytes),
            ("--max-decompressed-bytes", self.max_decompressed_bytes),
            ("--max-event-bytes", self.max_event_bytes),
            ("--buffer-quota-bytes", self.buffer_quota_bytes),
            ("--commit-timeout-secs", self.commit_timeout_secs),
            ("--auth-reload-secs", self.auth_reload_secs),
            ("--max-events-per-request", self.max_events_per_request),
            ("--header-read-timeout-secs", self.header_read_timeout_secs),
            ("--body-read-timeout-secs", self.body_read_timeout_secs),
            ("--max-connections", self.max_connections),
        ] {
            if value == 0 {
                return Err(Error::Range {
                    flag,
                    expected: "greater than 0",
                    value,
                });
            }
        }
        let kafka = self.kafka.validate()?;
        let message_max = kafka.message_max_bytes();
        if self.max_event_bytes.saturating_add(RECORD_OVERHEAD_BYTES) > message_max {
            return Err(Error::Conflict {
                flag: "--max-event-bytes",
                value: self.max_event_bytes,
                other: "--kafka-property message.max.bytes",
                limit: message_max,
                margin: RECORD_OVERHEAD_BYTES,
                why: "a larger event would be acknowledged and then always dead-lettered",
            });
        }
        if self.max_event_bytes > self.max_decompressed_bytes {
            return Err(Error::Conflict {
                flag: "--max-event-bytes",
                value: self.max_event_bytes,
                other: "--max-decompressed-bytes",
                limit: self.max_decompressed_bytes,
                margin: 0,
                why: "no body could carry an event of the allowed size",
            });
        }
        if self.max_header_bytes < 1024 {
            return Err(Error::Range {
                flag: "--max-header-bytes",
                expected: "at least 1024",
                value: self.max_header_bytes,
            });
        }
        let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        let copies = if self.on_disk_failure == OnDiskFailure::Direct
            || streams.values().any(|s| s.mode == StreamMode::Direct)
        {
            2
        } else {
            1
        };
        let needed = crate::http::limits::required_bytes(
            size(self.max_body_bytes),
            size(self.max_decompressed_bytes),
            size(self.max_events_per_request),
            copies,
        );
        let inflight = match self.max_inflight_bytes {
            None => needed.max(64 << 20),
            Some(v) if size(v) < needed => {
                return Err(Error::InflightBudget {
                    value: v,
                    needed: needed as u64,
                    copies,
                });
            }
            Some(v) => size(v),
        };
        Ok(ServeConfig {
            listen: self.listen,
            data_dir: self.buffer.data_dir.clone(),
            durability: self.buffer.durability,
            disk_reserve_bytes: self.buffer.disk_reserve_bytes,
            kafka,
            streams,
            default_stream: self.default_stream.clone(),
            key_pointer,
            quota_bytes: self.buffer_quota_bytes,
            max_body_bytes: usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX),
            max_decompressed_bytes: usize::try_from(self.max_decompressed_bytes)
                .unwrap_or(usize::MAX),
            max_event_bytes: usize::try_from(self.max_event_bytes).unwrap_or(usize::MAX),
            auth,
            auth_reload: Duration::from_secs(self.auth_reload_secs),
            max_events_per_request: size(self.max_events_per_request),
            inflight: crate::http::limits::InflightBudget::new(inflight),
            max_header_bytes: size(self.max_header_bytes),
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
            body_read_timeout: Duration::from_secs(self.body_read_timeout_secs),
            max_connections: size(self.max_connections),
            on_disk_failure: self.on_disk_failure,
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            commit_timeout: Duration::from_secs(self.commit_timeout_secs),
            dedup_window: Duration::from_secs(self.dedup_window_secs),
            retry_after_secs: self.retry_after_secs,
            volume_claim: self
                .volume_claim
                .clone()
                .filter(|c| !c.is_empty())
                .map(|c| (self.namespace.clone(), c)),
        })
    }
}

#[cfg(test)]
mod tests;
