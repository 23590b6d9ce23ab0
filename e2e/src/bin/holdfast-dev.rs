//! `holdfast-dev`: developer tools around a real local Kafka, for `make demo`
//! and the benchmarks.
//!
//! - `kafka` runs a broker until SIGINT/SIGTERM and prints
//!   `KAFKA_BOOTSTRAP=127.0.0.1:<port>` on stdout once it answers.
//! - `consume` prints records as JSON lines and exits 0 once it has the
//!   expected count (non-zero on timeout).
//! - `create-topic` creates a topic and waits for its partition leaders.
//!
//! Everything but those lines goes to stderr, so stdout can be parsed.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use holdfast_e2e::kafka::{self, ConsumeOptions, Isolation, KafkaBroker, KafkaOptions, Record};
use serde_json::{Map, Value};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(
    name = "holdfast-dev",
    version,
    about = "Local Kafka for Holdfast's demo and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a single-node Kafka broker until SIGINT or SIGTERM.
    Kafka {
        /// PLAINTEXT listener port on 127.0.0.1 (default: a free port).
        #[arg(long, env = "HOLDFAST_KAFKA_PORT")]
        port: Option<u16>,
        /// Keep the log segments here across runs (default: a temporary directory).
        #[arg(long, env = "HOLDFAST_KAFKA_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Disable auto.create.topics.enable.
        #[arg(long)]
        no_auto_create_topics: bool,
        /// JVM heap for the broker.
        #[arg(long, default_value = "512m", env = "HOLDFAST_KAFKA_HEAP")]
        heap: String,
    },
    /// Print records of a topic as JSON lines, from the beginning.
    Consume {
        /// bootstrap.servers of the cluster.
        #[arg(long, env = "KAFKA_BOOTSTRAP")]
        bootstrap: String,
        /// Topic to read.
        #[arg(long)]
        topic: String,
        /// Exit 0 once this many records were printed.
        #[arg(long)]
        count: usize,
        /// Give up (exit 1) after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
        /// Also show records of open and aborted transactions.
        #[arg(long)]
        read_uncommitted: bool,
    },
    /// Create a topic (replication factor 1).
    CreateTopic {
        /// bootstrap.servers of the cluster.
        #[arg(long, env = "KAFKA_BOOTSTRAP")]
        bootstrap: String,
        /// Topic to create.
        #[arg(long)]
        topic: String,
        /// Number of partitions.
        #[arg(long, default_value_t = 1)]
        partitions: i32,
        /// Topic config, repeatable: --config retention.ms=-1.
        #[arg(long = "config", value_parser = parse_key_value)]
        configs: Vec<(String, String)>,
        /// Succeed if the topic already exists.
        #[arg(long)]
        if_not_exists: bool,
    },
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected key=value, got {text:?}")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("holdfast-dev: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Kafka {
            port,
            data_dir,
            no_auto_create_topics,
            heap,
        } => run_kafka(KafkaOptions {
            port,
            data_dir,
            auto_create_topics: !no_auto_create_topics,
            heap,
            ..KafkaOptions::default()
        })
        .await
        .map(|()| ExitCode::SUCCESS),
        Cmd::Consume {
            bootstrap,
            topic,
            count,
            timeout_secs,
            read_uncommitted,
        } => {
            let mut options = ConsumeOptions::new(count, Duration::from_secs(timeout_secs));
            if read_uncommitted {
                options = options.isolation(Isolation::ReadUncommitted);
            }
            let received = tokio::task::spawn_blocking(move || {
                let mut stdout = std::io::stdout().lock();
                kafka::consume_each(&bootstrap, &topic, &options, |record| {
                    // A closed pipe (`| head`) ends the output, not the count.
                    let _ = writeln!(stdout, "{}", record_json(&record));
                    let _ = stdout.flush();
                })
            })
            .await??;
            if received < count {
                eprintln!(
                    "holdfast-dev: timed out after {timeout_secs}s with {received} of {count} records"
                );
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::CreateTopic {
            bootstrap,
            topic,
            partitions,
            configs,
            if_not_exists,
        } => {
            let configs: Vec<(&str, &str)> = configs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            match kafka::create_topic(&bootstrap, &topic, partitions, &configs).await {
                Ok(()) => eprintln!("holdfast-dev: created topic {topic}"),
                Err(error) if if_not_exists && kafka::is_topic_exists(&error) => {
                    eprintln!("holdfast-dev: topic {topic} already exists");
                }
                Err(error) => return Err(error),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn run_kafka(options: KafkaOptions) -> Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut broker = KafkaBroker::start_with(options).await?;
    eprintln!(
        "holdfast-dev: kafka ready (data {}, log {})",
        broker.data_dir().display(),
        broker.log_path().display()
    );
    println!("KAFKA_BOOTSTRAP={}", broker.bootstrap());
    std::io::stdout().flush()?;

    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = check.tick() => {
                if !broker.is_running() {
                    bail!("kafka exited on its own; log {}", broker.log_path().display());
                }
            }
        }
    }
    eprintln!("holdfast-dev: stopping kafka");
    broker.stop().await
}

/// `{"topic","partition","offset","timestamp","key","headers":{..},"payload"}`:
/// the payload as JSON when it parses, otherwise as a string.
fn record_json(record: &Record) -> Value {
    let text = |bytes: &[u8]| Value::String(String::from_utf8_lossy(bytes).into_owned());
    let headers: Map<String, Value> = record
        .headers
        .iter()
        .map(|(key, value)| (key.clone(), text(value)))
        .collect();
    let payload = match &record.payload {
        None => Value::Null,
        Some(bytes) => serde_json::from_slice(bytes).unwrap_or_else(|_| text(bytes)),
    };
    serde_json::json!({
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp_ms,
        "key": record.key.as_deref().map(text),
        "headers": headers,
        "payload": payload,
    })
}
