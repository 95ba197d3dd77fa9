//! Shared pieces of every Sluice role.
//!
//! # Layout
//! - [`config`]: typed, layered settings (defaults → TOML → `SLUICE_…` env).
//! - [`keys`]: every Redis key and queue name, under a namespace.
//! - [`domain`]: batch and file objects, statuses and their transition table, rows and queue messages.
//! - [`store`]: Redis access and the Lua scripts that make row writes idempotent.
//! - [`file_users`]: which unfinished batches read an input file, so it cannot be deleted under them.
//! - [`idempotency`]: what an `Idempotency-Key` is bound to (the request in progress, then its answer).
//! - [`lifecycle_store`]: storage accounting per tenant, the expiry index of files and the
//!   retention index of ended batches.
//! - [`redis_policy`]: no evicting Redis at start, and `/readyz` failing on a full one.
//! - [`redis_conn`]: one connection type for a single Redis server and a Redis Cluster.
//! - [`queue`]: RabbitMQ topology (work, delay and dead-letter queues) and confirmed publishing.
//! - [`budget`]: per-tenant token and request budgets per UTC day and month, counted in Redis.
//! - [`pacing`]: fleet-wide rate limits, pauses, adaptive concurrency and the circuit breaker.
//! - [`schedule`]: which running batch of a rate-limited provider gets how much of it (weights,
//!   deadlines, priority tiers).
//! - [`routing`]: which provider runs a model (prefixes, flavors, task models).
//! - [`lines`], [`validate`]: reading an input file line by line, and checking every line before
//!   anything is enqueued (the API checks inline bodies with the same code).
//! - [`storage`]: object storage for input and result files.
//! - [`segments`]: rows compacted out of Redis into sorted segment objects, and their merge.
//! - [`metrics`]: every Prometheus series, registered once.
//! - [`webhooks`]: batch events for webhooks, their ids and Standard Webhooks signing.
//! - [`telemetry`], [`shutdown`]: logging and signal handling.

pub mod budget;
pub mod config;
pub mod deps;
pub mod domain;
pub mod file_users;
pub mod idempotency;
pub mod keys;
pub mod lifecycle_store;
pub mod lines;
pub mod metrics;
pub mod open_batches;
pub mod pacing;
pub mod queue;
pub mod redis_conn;
pub mod redis_policy;
pub mod routing;
pub mod schedule;
pub mod segments;
pub mod shutdown;
pub mod storage;
pub mod store;
pub mod task_body;
pub mod telemetry;
pub mod validate;
pub mod webhooks;

pub use config::Settings;
pub use keys::Keys;
pub use store::Store;
