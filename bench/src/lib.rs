//! Holdfast's benchmarks: [`load`] (the load generator behind `holdfast-load`),
//! [`runner`] (what `make bench` runs: Kafka, capture pods, scenarios, report
//! and plots) and [`trivial`] (the do-nothing server that measures the
//! machine's ceiling).

pub mod body;
pub mod load;
pub mod runner;
pub mod trivial;
