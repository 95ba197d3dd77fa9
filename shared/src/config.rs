//! Typed, layered configuration: built-in defaults → an optional TOML file → `SLUICE_…` environment
//! variables (`__` separates nested keys, e.g. `SLUICE_LIMITS__MAX_LINES=1000`).
//!
//! This is the only module that reads the process environment (provider keys are resolved here too).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Everything an operator can set. Every role reads the same settings and uses what it needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Prefix of every queue name and Redis key, so several deployments (or tests) share one broker.
    pub namespace: String,
    /// AMQP URL of RabbitMQ.
    pub amqp_url: String,
    /// Redis URL; with `redis_cluster`, the comma-separated URLs of some of the cluster's nodes.
    pub redis_url: String,
    /// Whether `redis_url` names a Redis Cluster rather than one server.
    pub redis_cluster: bool,
    pub api: ApiSettings,
    pub storage: StorageSettings,
    pub limits: Limits,
    pub worker: WorkerSettings,
    pub aggregator: AggregatorSettings,
    /// Upstream model providers.
    pub providers: Vec<ProviderSettings>,
    /// Tenants and the SHA-256 digests of their API keys.
    pub tenants: Vec<TenantSettings>,
    /// Task models (`extract`, `summarize`, `classify`) and the model that runs them.
    pub tasks: TaskSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// Address of the public HTTP API.
    pub listen: SocketAddr,
    /// Address of `/metrics`, `/livez` and `/readyz` for every role.
    pub metrics_listen: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
pub enum StorageSettings {
    /// A local directory (created if missing).
    Local { path: PathBuf },
    /// Any S3-compatible object store. Credentials come from the usual `AWS_*` environment variables.
    S3 {
        bucket: String,
        #[serde(default)]
        region: Option<String>,
        #[serde(default)]
        endpoint: Option<String>,
        #[serde(default)]
        allow_http: bool,
        #[serde(default)]
        prefix: Option<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted upload, in bytes (413 above it).
    pub max_upload_bytes: u64,
    /// Most request lines in one batch.
    pub max_lines: u64,
    /// Longest accepted input line, in bytes.
    pub max_line_bytes: u64,
    /// Shortest accepted `completion_window`, e.g. `"60s"`.
    pub min_completion_window: String,
    /// Longest accepted `completion_window`, e.g. `"7d"`.
    pub max_completion_window: String,
    /// Largest upstream response body kept for one line, in bytes.
    pub max_response_bytes: u64,
    /// Batches one tenant may have not yet terminal; one more is refused with 429.
    pub max_open_batches: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Lines called upstream at once by one worker process. The AMQP prefetch is twice the
    /// messages that carry this many lines, so slots stay busy while a message waits for its
    /// slowest line.
    pub concurrency: u16,
    /// Upstream attempts per line before it becomes an error row.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to `backoff_max_ms`, with jitter.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// Longest `Retry-After` honoured before falling back to the cap (seconds).
    pub max_retry_after_secs: u64,
    pub connect_timeout_ms: u64,
    /// Deadline of one upstream call, body included.
    pub request_timeout_ms: u64,
    /// Deliveries of one line message before RabbitMQ dead-letters it.
    pub delivery_limit: u32,
    /// Lines published by the dispatcher with unconfirmed publisher confirms at once.
    pub publish_window: usize,
    /// Consecutive lines of a batch carried by one work-queue message (fewer deliveries, acks and
    /// store round trips per line). A message also closes once its lines pass 64 KiB. A message
    /// is acked when its last line has its row, and one that comes back (its worker died) is
    /// split into single-line messages, so a line that kills workers is dead-lettered alone.
    pub lines_per_message: usize,
    /// Batches of at most this many lines go through the express work queue, which every line
    /// worker consumes beside the main one: a small batch does not wait behind the window of a
    /// big batch (0 turns the express queue off).
    pub express_lines: u64,
    /// How long a worker lets in-flight lines finish after SIGTERM.
    pub shutdown_grace_ms: u64,
    /// Whether this worker calls the upstream for lines; `false` makes a dispatch-only worker
    /// (validation and enqueueing of new batches, and dead letters), e.g. for ingest-heavy pods.
    pub lines: bool,
    /// Longest time a line's retries may span, from its first attempt (seconds); past it, the line
    /// ends with its last error. The batch's `expires_at` bounds it too.
    pub max_retry_elapsed_secs: u64,
    /// Longest provider pause or open breaker a line waits for in its consumer slot; a longer
    /// pause sends it to a delay queue.
    pub max_hold_ms: u64,
    /// Longest time ahead a call reserves its start under a rate limit (at most `max_hold_ms`).
    /// Short keeps the token-limit feedback tight: usage corrections apply to fewer reservations
    /// already handed out.
    pub reserve_ahead_ms: u64,
    /// Lines of one batch in the work queue at once (fairness: a big batch never has more than
    /// its window ahead of another batch's); the dispatcher tops the window up as rows land.
    pub batch_window: u64,
    /// The window grows to this many seconds of the batch's observed throughput when that is more
    /// than `batch_window` lines, so a fast batch never waits for its own top-ups.
    pub batch_window_secs: u64,
    /// Consecutive failures (5xx, timeouts, connection errors; not 429) that open a provider's
    /// circuit breaker, fleet-wide.
    pub breaker_failures: u32,
    /// How long an open breaker stays open before letting probes through (ms).
    pub breaker_cooldown_ms: u64,
    /// Calls let through at once while the breaker is half-open.
    pub breaker_probes: u32,
    /// Completion tokens assumed for a request that sets no `max_tokens` (token-limit estimate).
    pub default_max_tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorSettings {
    /// Period of the safety-net sweep (expiry, stuck batches, missed events).
    pub sweep_interval_ms: u64,
    /// Lifetime of a finalize or dispatch lease; renewed while work goes on.
    pub lease_ms: u64,
    /// A batch still `validating` this long after creation gets its dispatch message published again.
    pub redispatch_after_ms: u64,
    /// How long finished row data stays in Redis after the result files are written.
    pub rows_ttl_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    /// Name used in logs and metrics.
    pub name: String,
    /// OpenAI-style base URL including the version segment, e.g. `http://vllm:8000/v1`.
    pub base_url: String,
    /// Name of the environment variable holding the upstream API key (never the key itself).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Models this provider serves; `"*"` serves any model.
    pub models: Vec<String>,
    /// Endpoints this provider supports (e.g. `"/v1/embeddings"`); empty = every supported endpoint.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Whether this provider accepts batch work; a model routed to one that does not gets 501.
    #[serde(default = "yes")]
    pub batch: bool,
    /// Model flavors this provider serves (`["batch"]`: `glm-4.7:batch` routes here as `glm-4.7`).
    #[serde(default)]
    pub flavors: Vec<String>,
    /// Fleet-wide pacing of calls to this provider (every worker replica together).
    #[serde(default)]
    pub pacing: PacingSettings,
}

/// Fleet-wide limits of one provider, enforced in Redis across every worker. Unset = unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PacingSettings {
    /// Requests per minute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens per minute (prompt estimate plus `max_tokens`, corrected from `usage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Most calls in flight at once; the adaptive limit starts here, halves on a 429 and grows
    /// back by one per window of successes (AIMD).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Burst tolerance of the rate limits, as time at the limit rate (ms); default 1000.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst_ms: Option<u64>,
}

impl PacingSettings {
    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.rpm.is_some() || self.tpm.is_some() || self.max_concurrency.is_some()
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// Tenant id: owns every object created with one of its keys.
    pub id: String,
    /// Hex SHA-256 digests of the tenant's API keys (`sluice hash-key <key>` prints one).
    pub api_key_sha256: Vec<String>,
    /// Status word this tenant's batch objects use for a completed batch (`"succeeded"` for
    /// clients written against APIs that say so); `request_counts` then also carries that word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_as: Option<String>,
    /// Whether this tenant's output file also carries the failed lines, each with `error` set
    /// (`{code, message}`), in input order among the successes, for clients that read only the
    /// output file. The error file is written as usual.
    #[serde(default)]
    pub errors_in_output: bool,
}

/// The task models of the batch router and the model that runs them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskSettings {
    /// Backing model (routed like any model, e.g. `"openai/gpt-4o-mini"`); unset = no task models
    /// (a batch naming one gets 503).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Prompt template of `extract`; placeholders `{text}`, `{entities}`, `{instructions}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extract_prompt: Option<String>,
    /// Prompt template of `summarize`; placeholders `{text}`, `{instructions}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summarize_prompt: Option<String>,
    /// Prompt template of `classify`; placeholders `{text}`, `{labels}`, `{instructions}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classify_prompt: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
            api: ApiSettings::default(),
            storage: StorageSettings::Local {
                path: "./data".into(),
            },
            limits: Limits::default(),
            worker: WorkerSettings::default(),
            aggregator: AggregatorSettings::default(),
            providers: Vec::new(),
            tenants: Vec::new(),
            tasks: TaskSettings::default(),
            log: LogSettings::default(),
        }
    }
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            listen: ([0, 0, 0, 0], 8080).into(),
            metrics_listen: ([0, 0, 0, 0], 9090).into(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_upload_bytes: 200 * 1024 * 1024,
            max_lines: 50_000,
            max_line_bytes: 4 * 1024 * 1024,
            min_completion_window: "60s".into(),
            max_completion_window: "7d".into(),
            max_response_bytes: 16 * 1024 * 1024,
            max_open_batches: 10,
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: 64,
            max_attempts: 5,
            backoff_base_ms: 500,
            backoff_max_ms: 30_000,
            max_retry_after_secs: 120,
            connect_timeout_ms: 10_000,
            request_timeout_ms: 600_000,
            delivery_limit: 5,
            publish_window: 1_000,
            lines_per_message: 16,
            express_lines: 1_000,
            shutdown_grace_ms: 30_000,
            lines: true,
            max_retry_elapsed_secs: 3_600,
            max_hold_ms: 10_000,
            reserve_ahead_ms: 2_000,
            batch_window: 1_000,
            batch_window_secs: 2,
            breaker_failures: 10,
            breaker_cooldown_ms: 10_000,
            breaker_probes: 2,
            default_max_tokens: 256,
        }
    }
}

impl Default for AggregatorSettings {
    fn default() -> Self {
        Self {
            sweep_interval_ms: 2_000,
            lease_ms: 30_000,
            redispatch_after_ms: 60_000,
            rows_ttl_secs: 86_400,
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

/// Top-level keys of [`Settings`], the only ones read from `SLUICE_…` variables.
const SETTINGS_KEYS: &[&str] = &[
    "namespace",
    "amqp_url",
    "redis_url",
    "redis_cluster",
    "api",
    "storage",
    "limits",
    "worker",
    "aggregator",
    "providers",
    "tenants",
    "tasks",
    "log",
];

/// A configuration error, naming the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Settings {
    /// Loads defaults, then `file` if given, then `SLUICE_…` environment variables, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        // No serialized-defaults layer: `#[serde(default)]` fills gaps, and a defaults layer would
        // leak fields of the default variant into another (`storage.path` into `kind = "s3"`).
        let mut figment = Figment::new();
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        let settings: Settings = figment
            .merge(
                // Only variables naming a setting: Kubernetes injects `SLUICE_API_PORT`-style
                // service variables, and `SLUICE_CONFIG` names the file itself.
                Env::prefixed("SLUICE_")
                    .filter(|key| {
                        let top = key.as_str().split("__").next().unwrap_or_default();
                        SETTINGS_KEYS.iter().any(|k| top.eq_ignore_ascii_case(k))
                    })
                    .split("__"),
            )
            .extract()
            .map_err(Box::new)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the relations between values that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.namespace.is_empty()
            || !self
                .namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!(
                "namespace {:?} must be non-empty ASCII letters, digits, '-' or '_'",
                self.namespace
            ));
        }
        let min = parse_window(&self.limits.min_completion_window).ok_or_else(|| {
            ConfigError::Invalid("limits.min_completion_window is not a duration like 60s".into())
        })?;
        let max = parse_window(&self.limits.max_completion_window).ok_or_else(|| {
            ConfigError::Invalid("limits.max_completion_window is not a duration like 7d".into())
        })?;
        if min > max {
            return bad("limits.min_completion_window exceeds limits.max_completion_window".into());
        }
        if self.worker.concurrency == 0
            || self.worker.max_attempts == 0
            || self.worker.delivery_limit == 0
            || self.worker.batch_window == 0
            || self.worker.lines_per_message == 0
            || self.worker.breaker_failures == 0
            || self.worker.breaker_probes == 0
        {
            return bad("worker.concurrency, max_attempts, delivery_limit, batch_window, lines_per_message, breaker_failures and breaker_probes must be at least 1".into());
        }
        for tenant in &self.tenants {
            for digest in &tenant.api_key_sha256 {
                if digest.len() != 64 || hex::decode(digest).is_err() {
                    return bad(format!(
                        "tenants[{}].api_key_sha256 holds {:?}, not a hex SHA-256 digest",
                        tenant.id, digest
                    ));
                }
            }
        }
        for provider in &self.providers {
            if !(provider.base_url.starts_with("http://")
                || provider.base_url.starts_with("https://"))
            {
                return bad(format!(
                    "providers[{}].base_url must be an http(s) URL",
                    provider.name
                ));
            }
            if let Some(var) = &provider.api_key_env
                && std::env::var_os(var).is_none()
            {
                return bad(format!(
                    "providers[{}].api_key_env names {var}, which is not set",
                    provider.name
                ));
            }
            crate::routing::check_provider(provider).map_err(ConfigError::Invalid)?;
            let p = &provider.pacing;
            if p.rpm == Some(0) || p.tpm == Some(0) || p.max_concurrency == Some(0) {
                return bad(format!(
                    "providers[{}].pacing limits must be at least 1 (leave one out for no limit)",
                    provider.name
                ));
            }
        }
        if self.limits.max_open_batches == 0 {
            return bad("limits.max_open_batches must be at least 1".into());
        }
        crate::routing::check_tasks(&self.tasks).map_err(ConfigError::Invalid)?;
        Ok(())
    }

    /// The tenant lookup table: SHA-256 digest of an API key → tenant id.
    pub fn key_digests(&self) -> HashMap<[u8; 32], String> {
        let mut map = HashMap::new();
        for tenant in &self.tenants {
            for digest in &tenant.api_key_sha256 {
                if let Ok(bytes) = hex::decode(digest)
                    && let Ok(arr) = <[u8; 32]>::try_from(bytes.as_slice())
                {
                    map.insert(arr, tenant.id.clone());
                }
            }
        }
        map
    }

    /// Bounds of `completion_window` as durations.
    pub fn window_bounds(&self) -> (Duration, Duration) {
        (
            parse_window(&self.limits.min_completion_window).unwrap_or(Duration::from_secs(60)),
            parse_window(&self.limits.max_completion_window)
                .unwrap_or(Duration::from_secs(7 * 86_400)),
        )
    }
}

impl ProviderSettings {
    /// Whether this provider serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == model)
    }

    /// The upstream key, read from the environment variable the configuration names.
    pub fn api_key(&self) -> Option<String> {
        self.api_key_env
            .as_ref()
            .and_then(|v| std::env::var(v).ok())
    }
}

/// Hex SHA-256 of an API key, as stored in `tenants[].api_key_sha256`.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Parses a completion window such as `90s`, `30m`, `24h` or `7d`.
pub fn parse_window(s: &str) -> Option<Duration> {
    let s = s.trim();
    let unit = s.chars().last()?;
    let n: u64 = s[..s.len() - unit.len_utf8()].parse().ok()?;
    let secs = match unit {
        's' => n,
        'm' => n.checked_mul(60)?,
        'h' => n.checked_mul(3_600)?,
        'd' => n.checked_mul(86_400)?,
        _ => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail closures return figment::Error by design
mod tests {
    use super::*;

    #[test]
    fn windows_parse_in_every_unit() {
        assert_eq!(parse_window("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_window("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_window("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_window("7d"), Some(Duration::from_secs(604_800)));
        assert_eq!(parse_window("0h"), None);
        assert_eq!(parse_window("24"), None);
        assert_eq!(parse_window("h"), None);
        assert_eq!(parse_window("-1h"), None);
        assert_eq!(parse_window("1w"), None);
    }

    #[test]
    fn s3_storage_loads_from_a_file_and_stray_variables_are_ignored() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "s.toml",
                "[storage]\nkind = \"s3\"\nbucket = \"b\"\n[worker]\nconcurrency = 7\n",
            )?;
            jail.set_env("SLUICE_API_PORT", "tcp://10.0.0.1:80");
            jail.set_env("SLUICE_CONFIG", "s.toml");
            jail.set_env("SLUICE_LIMITS__MAX_LINES", "12");
            let s = Settings::load(Some(Path::new("s.toml"))).map_err(|e| e.to_string())?;
            assert!(matches!(s.storage, StorageSettings::S3 { ref bucket, .. } if bucket == "b"));
            assert_eq!(s.worker.concurrency, 7);
            assert_eq!(s.limits.max_lines, 12);
            assert_eq!(s.namespace, "sluice");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("s.toml", "[worker]\nconcurency = 7\n")?;
            let err = Settings::load(Some(Path::new("s.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("concurency"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn provider_pacing_loads_and_zero_limits_are_refused() {
        figment::Jail::expect_with(|jail| {
            let provider =
                "[[providers]]\nname = \"p\"\nbase_url = \"http://p/v1\"\nmodels = [\"*\"]\n";
            jail.create_file(
                "s.toml",
                &format!(
                    "{provider}[providers.pacing]\nrpm = 600\ntpm = 90000\nmax_concurrency = 8\n"
                ),
            )?;
            let s = Settings::load(Some(Path::new("s.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(s.providers[0].pacing.rpm, Some(600));
            assert_eq!(s.providers[0].pacing.tpm, Some(90_000));
            assert_eq!(s.providers[0].pacing.max_concurrency, Some(8));
            assert_eq!(s.providers[0].pacing.burst_ms, None);
            jail.create_file(
                "z.toml",
                &format!("{provider}[providers.pacing]\nrpm = 0\n"),
            )?;
            let err = Settings::load(Some(Path::new("z.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("pacing"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn zero_lines_per_message_is_refused_and_zero_express_lines_is_allowed() {
        let mut s = Settings::default();
        s.worker.express_lines = 0;
        s.validate().unwrap();
        s.worker.lines_per_message = 0;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("lines_per_message"), "{err}");
    }

    #[test]
    fn defaults_validate() {
        Settings::default().validate().unwrap();
    }
}
