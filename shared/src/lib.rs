//! Shared pieces of every Sluice role.
//!
//! # Layout
//! - [`config`]: typed, layered settings (defaults → TOML → `SLUICE_…` env).
//! - [`keys`]: every Redis key and queue name, under a namespace.
//! - [`domain`]: batch and file objects, statuses and their transition table, rows and queue messages.
//! - [`store`]: Redis access and the Lua scripts that make row writes idempotent.
//! - [`redis_conn`]: one connection type for a single Redis server and a Redis Cluster.
//! - [`queue`]: RabbitMQ topology (work, delay and dead-letter queues) and confirmed publishing.
//! - [`pacing`]: fleet-wide rate limits, pauses, adaptive concurrency and the circuit breaker.
//! - [`routing`]: which provider runs a model (prefixes, flavors, task models).
//! - [`storage`]: object storage for input and result files.
//! - [`metrics`]: every Prometheus series, registered once.
//! - [`telemetry`], [`shutdown`]: logging and signal handling.

pub mod config;
pub mod domain;
pub mod keys;
pub mod metrics;
pub mod open_batches;
pub mod pacing;
pub mod queue;
pub mod redis_conn;
pub mod routing;
pub mod shutdown;
pub mod storage;
pub mod store;
pub mod telemetry;

pub use config::Settings;
pub use keys::Keys;
pub use store::Store;
