//! Typed, layered configuration: built-in defaults → an optional TOML file → `SLUICE_…` environment
//! variables (`__` separates nested keys, e.g. `SLUICE_LIMITS__MAX_LINES=1000`).
//!
//! This is the only module that reads the process environment (provider keys are resolved here too).
//!
//! The sections live in submodules by area and are re-exported here, so every type keeps its
//! `config::X` path: `api` (HTTP server and request limits), `dependencies` (object storage and
//! the timeouts towards RabbitMQ, Redis and storage), `tenancy` (providers, tenants, task
//! models), `roles` (worker, aggregator, lifecycle), `budget` (tenant budgets), `webhooks`
//! (event delivery), `window` (completion windows) and `idempotency` (`Idempotency-Key` on
//! creates).
//!
//! Around them: `load` (layering), `validate` (relations and ranges, one step per section),
//! `error` (what a refusal says), `schema` (the JSON Schema derived from these types, and the
//! walks along it that find unknown keys and secrets), `check` (`sluice config check`) and
//! `reference` (`sluice config reference`). A setting's doc comment is its documentation: the
//! reference prints it. A field marked `#[schemars(extend("x-advanced" = "why"))]` is an expert
//! tuning knob, listed apart with that reason; one marked `x-secret` is never printed.

#![warn(missing_docs)]

mod api;
mod budget;
mod check;
mod dependencies;
mod error;
mod idempotency;
mod load;
mod reference;
mod roles;
mod schema;
mod tenancy;
mod validate;
mod webhooks;
mod window;

#[cfg(test)]
mod tests;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use api::{ApiSettings, Limits};
pub use budget::{BudgetSettings, OnExhausted};
pub use dependencies::{DependencySettings, Secret, StorageSettings};
pub use error::{ConfigError, Problem};
pub use idempotency::IdempotencySettings;
pub use reference::{DefaultDoc, KeyDoc, SectionDoc, reference};
pub use roles::{AggregatorSettings, LifecycleSettings, WorkerSettings};
pub use schema::{REDACTED, settings_schema};
pub use tenancy::{
    PacingSettings, ProviderSettings, StorageQuota, TaskSettings, TenantSettings, hash_api_key,
};
pub use webhooks::{WebhookEndpoint, WebhookSettings};
pub use window::parse_window;

/// Everything an operator can set. Every role reads the same settings and uses what it needs.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Prefix of every queue name and Redis key, so several deployments (or tests) share one broker.
    pub namespace: String,
    /// AMQP URL of RabbitMQ; may carry the broker's user and password.
    #[schemars(extend("x-secret" = true))]
    pub amqp_url: String,
    /// Redis URL; with `redis_cluster`, the comma-separated URLs of some of the cluster's nodes.
    /// May carry a password.
    #[schemars(extend("x-secret" = true))]
    pub redis_url: String,
    /// Whether `redis_url` names a Redis Cluster rather than one server.
    pub redis_cluster: bool,
    /// Start even when Redis evicts keys (`maxmemory-policy` other than `noeviction`). Sluice keeps
    /// batches, rows and file records in Redis: an evicting policy loses them under memory pressure.
    pub redis_allow_eviction: bool,
    /// The HTTP server: addresses, timeouts, connection and page limits.
    pub api: ApiSettings,
    /// Where uploaded files, result files and compacted segments live.
    pub storage: StorageSettings,
    /// What one request, upload or batch may hold.
    pub limits: Limits,
    /// Upstream calls, retries, the circuit breaker, and how lines are queued and paced.
    pub worker: WorkerSettings,
    /// Compaction, result files, terminal statuses and the safety-net sweep.
    pub aggregator: AggregatorSettings,
    /// Retention of files and batch records, and the per-tenant storage quota.
    pub lifecycle: LifecycleSettings,
    /// Upstream model providers.
    pub providers: Vec<ProviderSettings>,
    /// Tenants and the SHA-256 digests of their API keys.
    pub tenants: Vec<TenantSettings>,
    /// Task models (`extract`, `summarize`, `classify`) and the model that runs them.
    pub tasks: TaskSettings,
    /// Delivery of signed batch events to the endpoints of `tenants[].webhooks`.
    pub webhooks: WebhookSettings,
    /// Log format and filter.
    pub log: LogSettings,
    /// Timeouts towards RabbitMQ, Redis and object storage, and what a role does at start while
    /// one of them cannot be reached.
    pub dependencies: DependencySettings,
    /// `Idempotency-Key` on creates: retention, key length, and waits for a duplicate.
    pub idempotency: IdempotencySettings,
}

/// `[log]`: how every role writes its log lines.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `json` (default, for production) or `pretty`.
    pub format: String,
    /// `RUST_LOG`-style filter used when `RUST_LOG` is unset.
    pub filter: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: "sluice".into(),
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            redis_url: "redis://127.0.0.1:6379/".into(),
            redis_cluster: false,
            redis_allow_eviction: false,
            api: ApiSettings::default(),
            storage: StorageSettings::Local {
                path: "./data".into(),
            },
            limits: Limits::default(),
            worker: WorkerSettings::default(),
            aggregator: AggregatorSettings::default(),
            lifecycle: LifecycleSettings::default(),
            providers: Vec::new(),
            tenants: Vec::new(),
            tasks: TaskSettings::default(),
            webhooks: WebhookSettings::default(),
            log: LogSettings::default(),
            dependencies: DependencySettings::default(),
            idempotency: IdempotencySettings::default(),
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: "json".into(),
            filter: "info".into(),
        }
    }
}
