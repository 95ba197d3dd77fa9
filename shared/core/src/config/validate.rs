//! Validation at load: the relations between values that serde cannot express, and the range of
//! every number an operator sets (`check_ranges`), each refusal naming its key.

use super::tenancy::{EMPTY_KEY_SHA256, check_provider, check_tasks};
use super::{ConfigError, Settings, StorageSettings, parse_window};

/// Room a stored row takes beyond its upstream body (ids, status, an error's message).
const ROW_ENVELOPE_BYTES: u64 = 64 * 1024;

impl Settings {
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
            || self.worker.paced_lines_per_message == 0
            || self.worker.breaker_failures == 0
            || self.worker.breaker_probes == 0
        {
            return bad("worker.concurrency, max_attempts, delivery_limit, batch_window, lines_per_message, paced_lines_per_message, breaker_failures and breaker_probes must be at least 1".into());
        }
        for tenant in &self.tenants {
            if !(tenant.weight.is_finite() && tenant.weight > 0.0) {
                return bad(format!(
                    "tenants[{}].weight is {}: it must be a positive number",
                    tenant.id, tenant.weight
                ));
            }
            for digest in &tenant.api_key_sha256 {
                if digest.len() != 64 || hex::decode(digest).is_err() {
                    return bad(format!(
                        "tenants[{}].api_key_sha256 holds {:?}, not a hex SHA-256 digest",
                        tenant.id, digest
                    ));
                }
                // The empty key would let any request whose key header is blank in.
                if digest.eq_ignore_ascii_case(EMPTY_KEY_SHA256) {
                    return bad(format!(
                        "tenants[{}].api_key_sha256 holds the digest of the empty key; use a real key",
                        tenant.id
                    ));
                }
            }
        }
        let api = &self.api;
        for (key, value) in [
            ("api.header_read_timeout_ms", api.header_read_timeout_ms),
            ("api.body_idle_timeout_ms", api.body_idle_timeout_ms),
            ("api.request_timeout_ms", api.request_timeout_ms),
            ("api.max_connections", api.max_connections as u64),
            (
                "api.max_uploads_per_tenant",
                api.max_uploads_per_tenant as u64,
            ),
            ("api.results_default_limit", api.results_default_limit),
            ("api.results_max_limit", api.results_max_limit),
            ("api.results_page_bytes", api.results_page_bytes),
        ] {
            if value == 0 {
                return bad(format!("{key} must be at least 1"));
            }
        }
        if api.results_default_limit > api.results_max_limit {
            return bad("api.results_default_limit must not exceed api.results_max_limit".into());
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
            check_provider(provider).map_err(ConfigError::Invalid)?;
            let p = &provider.pacing;
            if p.rpm == Some(0) || p.tpm == Some(0) || p.max_concurrency == Some(0) {
                return bad(format!(
                    "providers[{}].pacing limits must be at least 1 (leave one out for no limit)",
                    provider.name
                ));
            }
        }
        if let StorageSettings::S3 {
            bucket,
            access_key_id,
            secret_access_key,
            ..
        } = &self.storage
        {
            if bucket.is_empty() {
                return bad("storage.bucket must not be empty".into());
            }
            if access_key_id.is_some() != secret_access_key.is_some() {
                return bad(
                    "storage.access_key_id and storage.secret_access_key go together".into(),
                );
            }
        }
        if !["off", "strict"].contains(&self.limits.admission.as_str()) {
            return bad(format!(
                "limits.admission is {:?}: it must be \"off\" or \"strict\"",
                self.limits.admission
            ));
        }
        if !(0.0..=1.0).contains(&self.worker.min_batch_share) {
            return bad("worker.min_batch_share must be between 0 and 1".into());
        }
        if self.limits.max_open_batches == 0 {
            return bad("limits.max_open_batches must be at least 1".into());
        }
        let l = &self.limits;
        for (key, value, least) in [
            ("limits.max_reported_errors", l.max_reported_errors, 1),
            // Room for a message that names its line and a clipped value.
            (
                "limits.max_error_message_bytes",
                l.max_error_message_bytes,
                64,
            ),
            ("limits.max_json_body_bytes", l.max_json_body_bytes, 1024),
            (
                "limits.max_inline_body_bytes",
                l.max_inline_body_bytes,
                1024,
            ),
            ("limits.max_jsonl_body_bytes", l.max_jsonl_body_bytes, 1024),
            ("limits.max_custom_id_chars", l.max_custom_id_chars, 1),
            // Sluice's own ids are 37–38 characters.
            ("limits.max_id_chars", l.max_id_chars, 64),
            ("limits.max_filename_chars", l.max_filename_chars, 8),
            // `purpose` and `file`, at least.
            ("limits.max_multipart_parts", l.max_multipart_parts, 2),
            ("limits.max_part_header_bytes", l.max_part_header_bytes, 256),
        ] {
            if value < least {
                return bad(format!("{key} must be at least {least} (it is {value})"));
            }
        }
        check_tasks(&self.tasks).map_err(ConfigError::Invalid)?;
        super::webhooks::check_webhooks(self).map_err(ConfigError::Invalid)?;
        let d = &self.dependencies;
        for (key, value) in [
            ("connect_timeout_ms", d.connect_timeout_ms),
            ("publish_confirm_timeout_ms", d.publish_confirm_timeout_ms),
            ("redis_response_timeout_ms", d.redis_response_timeout_ms),
            ("probe_timeout_ms", d.probe_timeout_ms),
            ("health_check_interval_ms", d.health_check_interval_ms),
            ("storage_request_timeout_ms", d.storage_request_timeout_ms),
            ("retry_max_backoff_ms", d.retry_max_backoff_ms),
        ] {
            // 0 would turn every wait into an instant failure; a day is past any sane wait and
            // keeps `Duration` arithmetic far from overflow.
            if value == 0 || value > 86_400_000 {
                return bad(format!(
                    "dependencies.{key} must be between 1 and 86400000 (ms), not {value}"
                ));
            }
        }
        self.check_ranges()
    }

    /// Every number an operator sets, within the range the code is written for: a value outside
    /// it would panic (a zero period, a clamp whose bounds cross, a capacity too large to
    /// allocate) or overflow a sum, so it is refused at start with its key named instead.
    fn check_ranges(&self) -> Result<(), ConfigError> {
        const HOUR_MS: u64 = 3_600_000;
        const DAY_SECS: u64 = 86_400;
        let (w, a, l) = (&self.worker, &self.aggregator, &self.limits);
        let mut checks: Vec<(String, u64, u64, u64)> = vec![
            ("worker.max_attempts".into(), w.max_attempts.into(), 1, 100),
            (
                "worker.backoff_base_ms".into(),
                w.backoff_base_ms,
                1,
                w.backoff_max_ms.max(1),
            ),
            (
                "worker.backoff_max_ms".into(),
                w.backoff_max_ms,
                1,
                24 * HOUR_MS,
            ),
            (
                "worker.max_retry_after_secs".into(),
                w.max_retry_after_secs,
                0,
                DAY_SECS,
            ),
            (
                "worker.connect_timeout_ms".into(),
                w.connect_timeout_ms,
                1,
                10 * 60_000,
            ),
            (
                "worker.request_timeout_ms".into(),
                w.request_timeout_ms,
                1,
                24 * HOUR_MS,
            ),
            (
                "worker.delivery_limit".into(),
                w.delivery_limit.into(),
                1,
                1_000,
            ),
            (
                "worker.publish_window".into(),
                w.publish_window as u64,
                1,
                100_000,
            ),
            (
                "worker.lines_per_message".into(),
                w.lines_per_message as u64,
                1,
                10_000,
            ),
            (
                "worker.paced_lines_per_message".into(),
                w.paced_lines_per_message as u64,
                1,
                10_000,
            ),
            (
                "worker.express_lines".into(),
                w.express_lines,
                0,
                1_000_000_000,
            ),
            (
                "worker.shutdown_grace_ms".into(),
                w.shutdown_grace_ms,
                0,
                HOUR_MS,
            ),
            (
                "worker.max_retry_elapsed_secs".into(),
                w.max_retry_elapsed_secs,
                0,
                30 * DAY_SECS,
            ),
            // The pacing wait is clamped to [100 ms, max_hold_ms].
            ("worker.max_hold_ms".into(), w.max_hold_ms, 100, HOUR_MS),
            (
                "worker.reserve_ahead_ms".into(),
                w.reserve_ahead_ms,
                1,
                HOUR_MS,
            ),
            ("worker.batch_window".into(), w.batch_window, 1, 100_000_000),
            // The bound a fleet pause reaches every replica within; past a second it is no bound.
            ("worker.fleet_view_ms".into(), w.fleet_view_ms, 1, 1_000),
            (
                "worker.pacing_report_ms".into(),
                w.pacing_report_ms,
                1,
                10_000,
            ),
            (
                "worker.pacing_coalesce_ms".into(),
                w.pacing_coalesce_ms,
                0,
                10_000,
            ),
            (
                "worker.batch_window_secs".into(),
                w.batch_window_secs,
                0,
                DAY_SECS,
            ),
            (
                "worker.breaker_failures".into(),
                w.breaker_failures.into(),
                1,
                1_000_000,
            ),
            (
                "worker.breaker_cooldown_ms".into(),
                w.breaker_cooldown_ms,
                1,
                HOUR_MS,
            ),
            (
                "worker.breaker_probes".into(),
                w.breaker_probes.into(),
                1,
                10_000,
            ),
            (
                "worker.default_max_tokens".into(),
                w.default_max_tokens,
                1,
                100_000_000,
            ),
            // tokio's interval and sleeps need a non-zero period.
            (
                "aggregator.sweep_interval_ms".into(),
                a.sweep_interval_ms,
                10,
                HOUR_MS,
            ),
            ("aggregator.lease_ms".into(), a.lease_ms, 100, HOUR_MS),
            (
                "aggregator.redispatch_after_ms".into(),
                a.redispatch_after_ms,
                0,
                30 * DAY_SECS * 1000,
            ),
            (
                "aggregator.rows_ttl_secs".into(),
                a.rows_ttl_secs,
                1,
                365 * DAY_SECS,
            ),
            (
                "aggregator.finalize_read_bytes (at least limits.max_response_bytes + 64 KiB)"
                    .into(),
                a.finalize_read_bytes,
                l.max_response_bytes.saturating_add(ROW_ENVELOPE_BYTES),
                1 << 32,
            ),
            (
                "aggregator.compact_rows".into(),
                a.compact_rows,
                1,
                100_000_000,
            ),
            (
                "aggregator.compact_bytes".into(),
                a.compact_bytes,
                1,
                1 << 34,
            ),
            (
                "aggregator.segment_bytes (at least limits.max_response_bytes + 64 KiB)".into(),
                a.segment_bytes,
                l.max_response_bytes.saturating_add(ROW_ENVELOPE_BYTES),
                1 << 34,
            ),
            ("aggregator.merge_fan_in".into(), a.merge_fan_in, 2, 4_096),
            (
                "aggregator.compact_ask_ms".into(),
                a.compact_ask_ms,
                10,
                HOUR_MS,
            ),
            (
                "limits.max_upload_bytes".into(),
                l.max_upload_bytes,
                1,
                1 << 40,
            ),
            ("limits.max_lines".into(), l.max_lines, 1, 100_000_000),
            (
                "limits.max_line_bytes".into(),
                l.max_line_bytes,
                1,
                l.max_upload_bytes.max(1),
            ),
            (
                "limits.max_response_bytes".into(),
                l.max_response_bytes,
                1,
                1 << 30,
            ),
            (
                "limits.max_open_batches".into(),
                l.max_open_batches,
                1,
                1_000_000,
            ),
            (
                "limits.max_retries_per_batch".into(),
                l.max_retries_per_batch,
                1,
                1_000,
            ),
        ];
        let idem = &self.idempotency;
        checks.extend([
            (
                "idempotency.retention_secs".into(),
                idem.retention_secs,
                1,
                30 * DAY_SECS,
            ),
            // An HTTP header holds a few KiB at most.
            (
                "idempotency.max_key_chars".into(),
                idem.max_key_chars,
                1,
                4_096,
            ),
            ("idempotency.wait_ms".into(), idem.wait_ms, 0, HOUR_MS),
            // Renewed every third of it, so a Redis round trip must fit well inside.
            ("idempotency.lease_ms".into(), idem.lease_ms, 1_000, HOUR_MS),
        ]);
        let lc = &self.lifecycle;
        // Short lifetimes are allowed (tests shorten them); a week-long file bound is OpenAI's
        // upper one times more than ten, room enough for operators who keep files longer.
        for (key, value) in [
            (
                "lifecycle.batch_file_expires_after_secs",
                lc.batch_file_expires_after_secs,
            ),
            (
                "lifecycle.batch_output_expires_after_secs",
                lc.batch_output_expires_after_secs,
            ),
            ("lifecycle.batch_retention_secs", lc.batch_retention_secs),
        ] {
            checks.push((key.into(), value, 1, 10 * 365 * DAY_SECS));
        }
        checks.push(("lifecycle.sweep_limit".into(), lc.sweep_limit, 1, 1_000_000));
        checks.push((
            "lifecycle.storage_quota_bytes".into(),
            lc.storage_quota_bytes,
            0,
            1 << 53,
        ));
        checks.push((
            "lifecycle.storage_quota_files".into(),
            lc.storage_quota_files,
            0,
            1 << 40,
        ));
        for tenant in &self.tenants {
            if let Some(v) = tenant.storage_quota_bytes {
                checks.push((
                    format!("tenants[{}].storage_quota_bytes", tenant.id),
                    v,
                    0,
                    1 << 53,
                ));
            }
            if let Some(v) = tenant.storage_quota_files {
                checks.push((
                    format!("tenants[{}].storage_quota_files", tenant.id),
                    v,
                    0,
                    1 << 40,
                ));
            }
            if let Some(budget) = &tenant.budget {
                checks.extend(super::budget::budget_ranges(&tenant.id, budget));
            }
        }
        for provider in &self.providers {
            let p = &provider.pacing;
            let key = |k: &str| format!("providers[{}].pacing.{k}", provider.name);
            let limits = [
                ("rpm", p.rpm, 1_000_000_000),
                ("tpm", p.tpm, 1_000_000_000_000),
                (
                    "max_concurrency",
                    p.max_concurrency.map(u64::from),
                    1_000_000,
                ),
                ("burst_ms", p.burst_ms, HOUR_MS),
                ("max_call_tokens", p.max_call_tokens, 1_000_000_000_000),
            ];
            for (k, v, max) in limits {
                if let Some(v) = v {
                    checks.push((key(k), v, 1, max));
                }
            }
        }
        for (key, value, min, max) in checks {
            if !(min..=max).contains(&value) {
                return Err(ConfigError::Invalid(format!(
                    "{key} is {value}; it must be between {min} and {max}"
                )));
            }
        }
        Ok(())
    }
}
