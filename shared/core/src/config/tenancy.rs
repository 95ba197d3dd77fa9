//! `[[providers]]` (upstreams and their pacing), `[[tenants]]` (key digests, per-tenant options and
//! quotas) and `[tasks]` (task models), with the lookups and checks that go with them.

use std::collections::HashMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::validate::Problems;
use super::{Problem, Settings};

/// A tenant's storage quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageQuota {
    /// Most bytes of stored files.
    pub bytes: u64,
    /// Most stored files.
    pub files: u64,
}

impl Settings {
    /// Whether `tenant`'s batches must name one model: its own setting, else the default.
    pub fn one_model_per_batch(&self, tenant: &str) -> bool {
        self.tenants
            .iter()
            .find(|t| t.id == tenant)
            .and_then(|t| t.one_model_per_batch)
            .unwrap_or(self.limits.one_model_per_batch)
    }

    /// The scheduling weight of `tenant` (1 for a tenant the configuration does not list).
    pub fn tenant_weight(&self, tenant: &str) -> f64 {
        self.tenants
            .iter()
            .find(|t| t.id == tenant)
            .map_or(1.0, |t| t.weight)
    }

    /// The storage quota of `tenant`: its own setting, else the default.
    pub fn storage_quota(&self, tenant: &str) -> StorageQuota {
        let own = self.tenants.iter().find(|t| t.id == tenant);
        StorageQuota {
            bytes: own
                .and_then(|t| t.storage_quota_bytes)
                .unwrap_or(self.lifecycle.storage_quota_bytes),
            files: own
                .and_then(|t| t.storage_quota_files)
                .unwrap_or(self.lifecycle.storage_quota_files),
        }
    }
}

/// `[[providers]]`: one upstream model server, the models it serves and its fleet-wide pacing.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
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
    /// Top-level request body fields a line routed here may not carry (e.g. `["api_base",
    /// "api_key"]` for a gateway that would honour them): such a line is refused at validation
    /// with `refused_body_field`. Empty (the default) forwards bodies as they are.
    #[serde(default)]
    pub refused_body_fields: Vec<String>,
}

/// Fleet-wide limits of one provider, enforced in Redis across every worker. Unset = unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
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
    #[schemars(extend("x-advanced" = "rate-limiter burst tolerance"))]
    /// Burst tolerance of the rate limits, as time at the limit rate (ms); unset: 1000.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst_ms: Option<u64>,
    /// Largest token cost charged to the limiter for one call (the provider's context size is a
    /// good value); a line asking for more (`max_tokens: 1e12`) is charged this much, so one line
    /// can never reserve the shared token bucket far ahead of everyone else. Default: `tpm`, one
    /// minute of the allowance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_call_tokens: Option<u64>,
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

/// `[[tenants]]`: one tenant, its API key digests and its own limits.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// Tenant id: owns every object created with one of its keys.
    pub id: String,
    /// Hex SHA-256 digests of the tenant's API keys (`sluice hash-key` prints one, reading the key from stdin).
    #[schemars(extend("x-secret" = true))]
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
    /// This tenant's storage quota in bytes (uploads and result files); unset = `lifecycle.storage_quota_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_quota_bytes: Option<u64>,
    /// This tenant's most stored files; unset = `lifecycle.storage_quota_files`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_quota_files: Option<u64>,
    /// Whether this tenant's batches must name one model; unset = `limits.one_model_per_batch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_model_per_batch: Option<bool>,
    /// This tenant's token and request budget; unset = none (usage is still counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<super::BudgetSettings>,
    /// Endpoints this tenant's batch events (`batch.completed`, …) are signed and sent to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<super::WebhookEndpoint>,
    /// This tenant's share of a rate-limited provider when tenants compete for it, relative to the
    /// other tenants' weights (the number and size of its batches do not change it).
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// A tenant with no key, no own limits and the default weight; literals fill the rest from it.
impl Default for TenantSettings {
    fn default() -> Self {
        Self {
            id: String::new(),
            api_key_sha256: Vec::new(),
            completed_as: None,
            errors_in_output: false,
            storage_quota_bytes: None,
            storage_quota_files: None,
            one_model_per_batch: None,
            budget: None,
            webhooks: Vec::new(),
            weight: one(),
        }
    }
}

/// The task models of the batch router and the model that runs them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
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

impl Settings {
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

/// Hex SHA-256 of the empty string, refused as a tenant key digest.
pub(super) const EMPTY_KEY_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Hex SHA-256 of an API key, as stored in `tenants[].api_key_sha256`.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Configuration check of one provider's endpoints and flavors.
pub(super) fn check_provider(provider: &ProviderSettings, found: &mut Problems) {
    let at = |k: &str| format!("providers[{}].{k}", provider.name);
    for endpoint in &provider.endpoints {
        if !crate::domain::SUPPORTED_ENDPOINTS.contains(&endpoint.as_str()) {
            found.push(
                at("endpoints"),
                format!(
                    "holds {endpoint:?}, which is not one of {}",
                    crate::domain::SUPPORTED_ENDPOINTS.join(", ")
                ),
            );
        }
    }
    if let Some(flavor) = provider
        .flavors
        .iter()
        .find(|f| f.is_empty() || f.contains(':'))
    {
        found.push(
            at("flavors"),
            format!("holds {flavor:?}: a flavor is a non-empty word without ':'"),
        );
    }
}

/// Configuration check of `[tasks]`.
pub(super) fn check_tasks(tasks: &TaskSettings) -> Result<(), Problem> {
    if let Some(model) = &tasks.model
        && (model.is_empty() || crate::domain::task_model(model).is_some())
    {
        return Err(Problem::new(
            "tasks.model",
            format!("is {model:?}: it must name a provider's model, not a task model"),
        ));
    }
    Ok(())
}
