//! The check behind `sluice config check`: a configuration loaded exactly as a role loads it
//! (file, then `SLUICE_…` environment), without connecting to anything, and every problem found
//! reported with its key: unknown keys, values that do not parse, and what validation refuses.

use std::path::Path;

use serde_json::Value;

use super::schema::{redact_secrets, unknown_keys};
use super::{ConfigError, Problem, Settings};

impl Settings {
    /// Loads `file` and the environment as [`Settings::load`] does and returns the settings, or
    /// every problem found. Unknown keys are all reported (loading stops at the first one).
    pub fn check(file: &Path) -> Result<Settings, Vec<Problem>> {
        let figment = Self::layers(Some(file)).map_err(|e| match e {
            ConfigError::MissingFile(_) => {
                vec![Problem::new(file.display().to_string(), "does not exist")]
            }
            other => vec![Problem::new(file.display().to_string(), other.to_string())],
        })?;
        let as_written: Value = figment.extract().map_err(|e| load_problems(file, e))?;
        let unknown = unknown_keys(&as_written);
        if !unknown.is_empty() {
            return Err(unknown
                .into_iter()
                .map(|key| match key.nearest {
                    Some(nearest) => {
                        Problem::new(key.path, format!("unknown key (did you mean `{nearest}`?)"))
                    }
                    None => Problem::new(key.path, "unknown key"),
                })
                .collect());
        }
        let settings: Settings = figment.extract().map_err(|e| load_problems(file, e))?;
        let problems = settings.problems();
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(problems)
        }
    }

    /// These settings with every default filled in, unset options left out and every secret
    /// replaced by `"<redacted>"`: what `sluice config check --effective` prints.
    pub fn redacted(&self) -> Result<Value, serde_json::Error> {
        let mut value = serde_json::to_value(self)?;
        drop_unset(&mut value);
        redact_secrets(&mut value);
        Ok(value)
    }
}

/// The problems of a configuration that does not deserialize, each at its key (a syntax error
/// has none: it is reported at the file).
fn load_problems(file: &Path, error: figment::Error) -> Vec<Problem> {
    error
        .into_iter()
        .map(|e| {
            let mut key = e.path.join(".");
            let mut named = |field: &str| {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(field);
            };
            let reason = match &e.kind {
                figment::error::Kind::UnknownField(field, _) => {
                    named(field);
                    "unknown key".to_owned()
                }
                figment::error::Kind::MissingField(field) => {
                    named(field);
                    "is required".to_owned()
                }
                _ => e.to_string(),
            };
            if key.is_empty() {
                key = file.display().to_string();
            }
            Problem::new(key, reason)
        })
        .collect()
}

/// Removes unset options: TOML has no null, and unset is what leaving a key out means.
fn drop_unset(value: &mut Value) {
    match value {
        Value::Object(table) => {
            table.retain(|_, v| !v.is_null());
            table.values_mut().for_each(drop_unset);
        }
        Value::Array(entries) => entries.iter_mut().for_each(drop_unset),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::result_large_err)] // figment::Jail closures return figment::Error by design

    use super::*;

    fn check(toml: &str) -> Result<Settings, Vec<String>> {
        let mut out = Err(Vec::new());
        figment::Jail::expect_with(|jail| {
            jail.create_file("s.toml", toml)?;
            out = Settings::check(Path::new("s.toml"))
                .map_err(|problems| problems.iter().map(Problem::to_string).collect());
            Ok(())
        });
        out
    }

    #[test]
    fn every_unknown_key_is_reported_with_its_path() {
        let problems = check("[worker]\nconcurency = 7\nbatch_windw = 2\n[[tenants]]\nid = \"t\"\napi_key_sha256 = []\nwieght = 2\n").unwrap_err();
        assert_eq!(
            problems,
            [
                "tenants[t].wieght: unknown key (did you mean `weight`?)",
                "worker.batch_windw: unknown key (did you mean `batch_window`?)",
                "worker.concurency: unknown key (did you mean `concurrency`?)",
            ]
        );
    }

    #[test]
    fn every_refused_value_is_reported_with_its_path() {
        let problems = check("[worker]\nconcurrency = 0\nmax_hold_ms = 5\n").unwrap_err();
        assert_eq!(
            problems,
            [
                "worker.concurrency: must be at least 1 (it is 0)",
                "worker.max_hold_ms: is 5; it must be between 100 and 3600000",
            ]
        );
        let problems = check("[worker]\nconcurrency = \"many\"\n").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("worker.concurrency: invalid type"),
            "{problems:?}"
        );
    }

    #[test]
    fn the_environment_is_layered_over_the_file_as_a_role_does() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("s.toml", "[worker]\nconcurrency = 7\n")?;
            jail.set_env("SLUICE_WORKER__CONCURRENCY", "0");
            let problems = Settings::check(Path::new("s.toml")).unwrap_err();
            assert_eq!(problems[0].key, "worker.concurrency");
            jail.set_env("SLUICE_WORKER__CONCURENCY", "3");
            let problems = Settings::check(Path::new("s.toml")).unwrap_err();
            assert_eq!(
                problems[0].to_string(),
                "worker.concurency: unknown key (did you mean `concurrency`?)"
            );
            Ok(())
        });
    }

    #[test]
    fn a_missing_file_is_reported() {
        let problems = Settings::check(Path::new("/nonexistent/sluice.toml")).unwrap_err();
        assert_eq!(
            problems[0].to_string(),
            "/nonexistent/sluice.toml: does not exist"
        );
    }

    #[test]
    fn the_effective_settings_leave_unset_options_out_and_hide_secrets() {
        let settings = check("[storage]\nkind = \"s3\"\nbucket = \"b\"\n").unwrap();
        let value = settings.redacted().unwrap();
        assert_eq!(value["storage"]["bucket"], "b");
        assert!(value["storage"].get("region").is_none());
        assert_eq!(value["redis_url"], "<redacted>");
        assert_eq!(value["worker"]["concurrency"], 64);
    }
}
