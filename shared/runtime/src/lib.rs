//! Process plumbing shared by every role: reaching Redis and RabbitMQ at start and reporting
//! health, metrics, logs, shutdown, and object storage for input, result and segment files.
//!
//! - [`startup`]: connecting with retries and a deadline, and what `/readyz` reports meanwhile.
//! - [`ops`]: the `/metrics`, `/livez` and `/readyz` endpoint every role serves.
//! - [`metrics`]: every Prometheus series, registered once.
//! - [`telemetry`], [`shutdown`]: logging and signal handling.
//! - [`storage`]: object storage (local disk or S3) for input and result files.
//! - [`lines`]: reading an input file line by line without holding it in memory.
//! - [`segments`]: rows compacted out of Redis into sorted segment objects, and their merge.

#![warn(missing_docs, unreachable_pub)]

pub mod lines;
pub mod metrics;
pub mod ops;
pub mod segments;
pub mod shutdown;
pub mod startup;
pub mod storage;
pub mod telemetry;
