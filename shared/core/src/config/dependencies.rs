//! `[storage]` (where files and segments live) and `[dependencies]` (how long Sluice waits on
//! RabbitMQ, Redis and object storage, and what it does at start while one is unreachable).

use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `[storage]`: where uploaded files, result files and compacted segments live, chosen by `kind`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
pub enum StorageSettings {
    /// A local directory (created if missing).
    Local {
        /// The directory holding every file; every role must see the same one.
        path: PathBuf,
    },
    /// Any S3-compatible object store. Credentials come from the usual `AWS_*` environment variables
    /// (or the instance's cloud identity) unless `access_key_id` and `secret_access_key` are set.
    S3 {
        /// Bucket holding every file.
        bucket: String,
        /// Region of the bucket; unset: from `AWS_REGION` or the store's default.
        #[serde(default)]
        region: Option<String>,
        /// An S3-compatible server (MinIO, moto…); requests then use path-style URLs.
        #[serde(default)]
        endpoint: Option<String>,
        /// Whether `endpoint` may be a plain `http://` URL (an in-cluster store without TLS).
        #[serde(default)]
        allow_http: bool,
        /// Key prefix of every object Sluice writes, to share a bucket; unset: the bucket's root.
        #[serde(default)]
        prefix: Option<String>,
        /// A static access key, for stores with no `AWS_*` variables in the environment.
        #[serde(default)]
        #[schemars(extend("x-secret" = true))]
        access_key_id: Option<String>,
        /// The secret of `access_key_id`; the two go together.
        #[serde(default)]
        secret_access_key: Option<Secret>,
    },
}

/// A credential: kept out of `Debug` output so that printing settings never leaks it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(extend("x-secret" = true))]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"[redacted]\"")
    }
}

/// How long Sluice waits on a dependency before calling it stalled (every value in ms unless
/// named otherwise). A peer that accepts a connection and then never answers must cost a bounded
/// wait, a `warn` line naming it and an unready `/readyz`, never a silent hang.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DependencySettings {
    /// TCP connect plus protocol handshake of one RabbitMQ or Redis connection, and opening a
    /// channel with its topology declarations (ms).
    pub connect_timeout_ms: u64,
    #[schemars(extend("x-advanced" = "connection liveness detail; the default suits brokers behind load balancers"))]
    /// AMQP heartbeat asked of the broker (seconds); a connection that hears nothing for twice
    /// this long is closed and reopened. 0 keeps the broker's proposal.
    pub amqp_heartbeat_secs: u16,
    /// Longest wait for a publisher confirm; past it the publish fails and the connection is
    /// reopened (ms; the dispatcher resumes from its checkpoint, the API answers 503).
    pub publish_confirm_timeout_ms: u64,
    /// Longest wait for the reply to one Redis command or script (ms).
    pub redis_response_timeout_ms: u64,
    /// Longest wait of a `/readyz` check and of the broker check before a create (ms).
    pub probe_timeout_ms: u64,
    #[schemars(extend("x-advanced" = "health-check period"))]
    /// Period of each role's own dependency check, which logs a `warn` line when Redis or the
    /// broker stops answering and an `info` line when it answers again (ms).
    pub health_check_interval_ms: u64,
    /// Object storage (S3): connect timeout is `connect_timeout_ms`; this bounds one request
    /// (ms; files are read in ranged requests, so a long download is not one request).
    pub storage_request_timeout_ms: u64,
    #[schemars(extend("x-advanced" = "start-up retry backoff cap"))]
    /// Cap of the wait between two start attempts against an unreachable dependency (ms).
    pub retry_max_backoff_ms: u64,
    /// Unset: a role keeps retrying unreachable dependencies at start (one `warn` line per
    /// attempt, `/livez` up, `/readyz` saying why). Set: it exits non-zero once this many seconds
    /// have passed without reaching them (0 = after the first failed attempt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_deadline_secs: Option<u64>,
}

impl DependencySettings {
    /// `connect_timeout_ms` as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    /// `publish_confirm_timeout_ms` as a duration.
    pub fn publish_confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_confirm_timeout_ms)
    }
    /// `redis_response_timeout_ms` as a duration.
    pub fn redis_response_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_response_timeout_ms)
    }
    /// `probe_timeout_ms` as a duration.
    pub fn probe_timeout(&self) -> Duration {
        Duration::from_millis(self.probe_timeout_ms)
    }
}

impl Default for DependencySettings {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 5_000,
            amqp_heartbeat_secs: 10,
            publish_confirm_timeout_ms: 10_000,
            redis_response_timeout_ms: 10_000,
            probe_timeout_ms: 2_000,
            health_check_interval_ms: 5_000,
            storage_request_timeout_ms: 60_000,
            retry_max_backoff_ms: 30_000,
            startup_deadline_secs: None,
        }
    }
}
