//! End-to-end harness for Holdfast: real Kafka, real Kubernetes.
//!
//! Nothing here is a mock: [`kafka::KafkaBroker`] runs an Apache Kafka
//! broker from Maven Central as a child process.

pub mod agent;
pub mod capture;
pub mod kafka;
pub mod kube;
pub mod lazyfs;
