//! Loading: built-in defaults, then an optional TOML file, then `SLUICE_…` environment variables.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Toml};

use super::{ConfigError, Settings};

/// Top-level keys of [`Settings`], the only ones read from `SLUICE_…` variables.
const SETTINGS_KEYS: &[&str] = &[
    "namespace",
    "amqp_url",
    "redis_url",
    "redis_cluster",
    "redis_allow_eviction",
    "api",
    "storage",
    "limits",
    "worker",
    "aggregator",
    "lifecycle",
    "providers",
    "tenants",
    "tasks",
    "webhooks",
    "log",
    "dependencies",
    "idempotency",
];

/// Whether `SLUICE_…` variables can set keys under the top-level key `top`.
pub(super) fn env_sets(top: &str) -> bool {
    SETTINGS_KEYS.iter().any(|k| top.eq_ignore_ascii_case(k))
}

impl Settings {
    /// Loads defaults, then `file` if given, then `SLUICE_…` environment variables, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let settings: Settings = Self::layers(file)?.extract().map_err(Box::new)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Whether `file` or the environment sets `key` (dotted, e.g. `api.listen`) explicitly, as
    /// opposed to leaving it at its default.
    pub fn sets(file: Option<&Path>, key: &str) -> bool {
        Self::layers(file).is_ok_and(|f| f.find_value(key).is_ok())
    }

    /// The file and environment layers, without defaults.
    pub(super) fn layers(file: Option<&Path>) -> Result<Figment, ConfigError> {
        // No serialized-defaults layer: `#[serde(default)]` fills gaps, and a defaults layer would
        // leak fields of the default variant into another (`storage.path` into `kind = "s3"`).
        let mut figment = Figment::new();
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::MissingFile(file.to_owned()));
            }
            figment = figment.merge(Toml::file(file));
        }
        Ok(figment.merge(
            // Only variables naming a setting: Kubernetes injects `SLUICE_API_PORT`-style
            // service variables, and `SLUICE_CONFIG` names the file itself.
            Env::prefixed("SLUICE_")
                .filter(|key| {
                    let top = key.as_str().split("__").next().unwrap_or_default();
                    env_sets(top)
                })
                .split("__"),
        ))
    }
}
