//! Holdfast capture: accepts events over HTTP, acknowledges them once they are
//! committed to a local SQLite buffer (on the pod's PersistentVolume), and
//! forwards them to Kafka in the background.
//!
//! Dependencies point one way: `http` → `buffer` ← `forward`; `http` never
//! touches rdkafka directly and `buffer` knows nothing of HTTP or Kafka.

pub mod app;
pub mod buffer;
pub mod config;
pub mod dead_letters;
pub mod forward;
pub mod http;
pub mod lockwait;
pub mod metrics;
pub mod volume;
