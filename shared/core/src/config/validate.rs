//! Validation at load: the relations between values that serde cannot express, and the range of
//! every number an operator sets. One step per section; each step reports every problem it finds,
//! naming its key, so `sluice config check` can list them all.

use std::collections::HashMap;
use std::ops::RangeInclusive;

use super::tenancy::{EMPTY_KEY_SHA256, check_provider, check_tasks};
use super::webhooks::check_webhooks;
use super::{ConfigError, Problem, Settings, StorageSettings, parse_window};

/// Room a stored row takes beyond its upstream body (ids, status, an error's message).
const ROW_ENVELOPE_BYTES: u64 = 64 * 1024;
const HOUR_MS: u64 = 3_600_000;
const DAY_SECS: u64 = 86_400;

impl Settings {
    /// Checks the relations between values that serde cannot express and the range of every
    /// number; the error lists every problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Every problem [`Settings::validate`] refuses, section by section.
    pub fn problems(&self) -> Vec<Problem> {
        let mut found = Problems::default();
        check_namespace(self, &mut found);
        check_limits(self, &mut found);
        check_worker(self, &mut found);
        check_tenants(self, &mut found);
        check_api(self, &mut found);
        check_providers(self, &mut found);
        check_storage(self, &mut found);
        if let Err(problem) = check_tasks(&self.tasks) {
            found.0.push(problem);
        }
        check_webhooks(self, &mut found);
        check_dependencies(self, &mut found);
        check_aggregator(self, &mut found);
        check_idempotency(self, &mut found);
        check_lifecycle(self, &mut found);
        found.0
    }
}

/// The problems found so far, with the wordings the checks share.
#[derive(Default)]
pub(super) struct Problems(Vec<Problem>);

impl Problems {
    /// Records that `key` is wrong for `reason`.
    pub(super) fn push(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Problem::new(key, reason));
    }

    /// `key` must lie within `range`: a value outside the range the code is written for would
    /// panic (a zero period, a clamp whose bounds cross, a capacity too large to allocate) or
    /// overflow a sum.
    pub(super) fn within(
        &mut self,
        key: impl Into<String>,
        value: u64,
        range: RangeInclusive<u64>,
    ) {
        self.within_because(key, value, range, "");
    }

    /// [`Problems::within`], with a note saying where a bound comes from.
    fn within_because(
        &mut self,
        key: impl Into<String>,
        value: u64,
        range: RangeInclusive<u64>,
        note: &str,
    ) {
        if !range.contains(&value) {
            let (min, max) = range.into_inner();
            self.push(
                key,
                format!("is {value}; it must be between {min} and {max}{note}"),
            );
        }
    }

    /// `key` must be at least `least`.
    fn at_least(&mut self, key: impl Into<String>, value: u64, least: u64) {
        if value < least {
            self.push(key, format!("must be at least {least} (it is {value})"));
        }
    }
}

fn check_namespace(s: &Settings, found: &mut Problems) {
    let ns = &s.namespace;
    if ns.is_empty()
        || !ns
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        found.push(
            "namespace",
            format!("is {ns:?}: it must be non-empty ASCII letters, digits, '-' or '_'"),
        );
    }
}

fn check_limits(s: &Settings, found: &mut Problems) {
    let l = &s.limits;
    let min = parse_window(&l.min_completion_window);
    let max = parse_window(&l.max_completion_window);
    if min.is_none() {
        found.push("limits.min_completion_window", "is not a duration like 60s");
    }
    if max.is_none() {
        found.push("limits.max_completion_window", "is not a duration like 7d");
    }
    if let (Some(min), Some(max)) = (min, max)
        && min > max
    {
        found.push(
            "limits.min_completion_window",
            "exceeds limits.max_completion_window",
        );
    }
    if !["off", "strict"].contains(&l.admission.as_str()) {
        found.push(
            "limits.admission",
            format!("is {:?}: it must be \"off\" or \"strict\"", l.admission),
        );
    }
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
        found.at_least(key, value, least);
    }
    found.within("limits.max_upload_bytes", l.max_upload_bytes, 1..=1 << 40);
    found.within("limits.max_lines", l.max_lines, 1..=100_000_000);
    found.within(
        "limits.max_line_bytes",
        l.max_line_bytes,
        1..=l.max_upload_bytes.max(1),
    );
    found.within(
        "limits.max_response_bytes",
        l.max_response_bytes,
        1..=1 << 30,
    );
    found.within("limits.max_open_batches", l.max_open_batches, 1..=1_000_000);
    found.within(
        "limits.max_retries_per_batch",
        l.max_retries_per_batch,
        1..=1_000,
    );
}

fn check_worker(s: &Settings, found: &mut Problems) {
    let w = &s.worker;
    found.at_least("worker.concurrency", w.concurrency.into(), 1);
    if !(0.0..=1.0).contains(&w.min_batch_share) {
        found.push("worker.min_batch_share", "must be between 0 and 1");
    }
    found.within("worker.max_attempts", w.max_attempts.into(), 1..=100);
    found.within(
        "worker.backoff_base_ms",
        w.backoff_base_ms,
        1..=w.backoff_max_ms.max(1),
    );
    found.within("worker.backoff_max_ms", w.backoff_max_ms, 1..=24 * HOUR_MS);
    found.within(
        "worker.max_retry_after_secs",
        w.max_retry_after_secs,
        0..=DAY_SECS,
    );
    found.within(
        "worker.connect_timeout_ms",
        w.connect_timeout_ms,
        1..=10 * 60_000,
    );
    found.within(
        "worker.request_timeout_ms",
        w.request_timeout_ms,
        1..=24 * HOUR_MS,
    );
    found.within("worker.delivery_limit", w.delivery_limit.into(), 1..=1_000);
    found.within(
        "worker.publish_window",
        w.publish_window as u64,
        1..=100_000,
    );
    found.within(
        "worker.lines_per_message",
        w.lines_per_message as u64,
        1..=10_000,
    );
    found.within(
        "worker.paced_lines_per_message",
        w.paced_lines_per_message as u64,
        1..=10_000,
    );
    found.within("worker.express_lines", w.express_lines, 0..=1_000_000_000);
    found.within("worker.shutdown_grace_ms", w.shutdown_grace_ms, 0..=HOUR_MS);
    found.within(
        "worker.max_retry_elapsed_secs",
        w.max_retry_elapsed_secs,
        0..=30 * DAY_SECS,
    );
    // The pacing wait is clamped to [100 ms, max_hold_ms].
    found.within("worker.max_hold_ms", w.max_hold_ms, 100..=HOUR_MS);
    found.within("worker.reserve_ahead_ms", w.reserve_ahead_ms, 1..=HOUR_MS);
    found.within("worker.batch_window", w.batch_window, 1..=100_000_000);
    // The bound a fleet pause reaches every replica within; past a second it is no bound.
    found.within("worker.fleet_view_ms", w.fleet_view_ms, 1..=1_000);
    found.within("worker.pacing_report_ms", w.pacing_report_ms, 1..=10_000);
    found.within(
        "worker.pacing_coalesce_ms",
        w.pacing_coalesce_ms,
        0..=10_000,
    );
    found.within(
        "worker.batch_window_secs",
        w.batch_window_secs,
        0..=DAY_SECS,
    );
    found.within(
        "worker.breaker_failures",
        w.breaker_failures.into(),
        1..=1_000_000,
    );
    found.within(
        "worker.breaker_cooldown_ms",
        w.breaker_cooldown_ms,
        1..=HOUR_MS,
    );
    found.within("worker.breaker_probes", w.breaker_probes.into(), 1..=10_000);
    found.within(
        "worker.default_max_tokens",
        w.default_max_tokens,
        1..=100_000_000,
    );
}

fn check_tenants(s: &Settings, found: &mut Problems) {
    for tenant in &s.tenants {
        let at = |k: &str| format!("tenants[{}].{k}", tenant.id);
        if !(tenant.weight.is_finite() && tenant.weight > 0.0) {
            found.push(
                at("weight"),
                format!("is {}: it must be a positive number", tenant.weight),
            );
        }
        for digest in &tenant.api_key_sha256 {
            if digest.len() != 64 || hex::decode(digest).is_err() {
                found.push(
                    at("api_key_sha256"),
                    format!("holds {digest:?}, not a hex SHA-256 digest"),
                );
            } else if digest.eq_ignore_ascii_case(EMPTY_KEY_SHA256) {
                // The empty key would let any request whose key header is blank in.
                found.push(
                    at("api_key_sha256"),
                    "holds the digest of the empty key; use a real key",
                );
            }
        }
        if let Some(v) = tenant.storage_quota_bytes {
            found.within(at("storage_quota_bytes"), v, 0..=1 << 53);
        }
        if let Some(v) = tenant.storage_quota_files {
            found.within(at("storage_quota_files"), v, 0..=1 << 40);
        }
        if let Some(budget) = &tenant.budget {
            super::budget::check_budget(&tenant.id, budget, found);
        }
    }
    check_tenants_unique(s, found);
}

/// A tenant id names one tenant and a key belongs to one tenant: a second `[[tenants]]` with the
/// same id, or a digest listed twice, would make which tenant a key opens depend on the order of
/// the file. Both positions are named by index, since the id itself is what repeats.
fn check_tenants_unique(s: &Settings, found: &mut Problems) {
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut digests: HashMap<String, (usize, usize)> = HashMap::new();
    for (t, tenant) in s.tenants.iter().enumerate() {
        if let Some(&first) = ids.get(tenant.id.as_str()) {
            found.push(
                format!("tenants[{t}].id"),
                format!(
                    "is {:?}, the id of tenants[{first}] too: tenant ids must be unique",
                    tenant.id
                ),
            );
        } else {
            ids.insert(&tenant.id, t);
        }
        for (k, digest) in tenant.api_key_sha256.iter().enumerate() {
            // Hex digits in either case decode to the same key.
            let digest = digest.to_ascii_lowercase();
            if let Some(&(ft, fk)) = digests.get(&digest) {
                found.push(
                    format!("tenants[{t}].api_key_sha256[{k}]"),
                    format!(
                        "is the same key digest as tenants[{ft}].api_key_sha256[{fk}] \
                         (tenant {:?}): a key must be listed once, under one tenant",
                        s.tenants[ft].id
                    ),
                );
            } else {
                digests.insert(digest, (t, k));
            }
        }
    }
}

fn check_api(s: &Settings, found: &mut Problems) {
    let api = &s.api;
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
            found.push(key, "must be at least 1");
        }
    }
    if api.results_default_limit > api.results_max_limit {
        found.push(
            "api.results_default_limit",
            "must not exceed api.results_max_limit",
        );
    }
}

fn check_providers(s: &Settings, found: &mut Problems) {
    for provider in &s.providers {
        let at = |k: &str| format!("providers[{}].{k}", provider.name);
        if !(provider.base_url.starts_with("http://") || provider.base_url.starts_with("https://"))
        {
            found.push(at("base_url"), "must be an http(s) URL");
        }
        if let Some(var) = &provider.api_key_env
            && std::env::var_os(var).is_none()
        {
            found.push(at("api_key_env"), format!("names {var}, which is not set"));
        }
        check_provider(provider, found);
        let p = &provider.pacing;
        for (k, v, max) in [
            ("rpm", p.rpm, 1_000_000_000),
            ("tpm", p.tpm, 1_000_000_000_000),
            (
                "max_concurrency",
                p.max_concurrency.map(u64::from),
                1_000_000,
            ),
            ("burst_ms", p.burst_ms, HOUR_MS),
            ("max_call_tokens", p.max_call_tokens, 1_000_000_000_000),
        ] {
            match v {
                Some(0) => found.push(
                    at(&format!("pacing.{k}")),
                    "must be at least 1 (leave it out for no limit)",
                ),
                Some(v) => found.within(at(&format!("pacing.{k}")), v, 1..=max),
                None => {}
            }
        }
    }
}

fn check_storage(s: &Settings, found: &mut Problems) {
    if let StorageSettings::S3 {
        bucket,
        access_key_id,
        secret_access_key,
        ..
    } = &s.storage
    {
        if bucket.is_empty() {
            found.push("storage.bucket", "must not be empty");
        }
        if access_key_id.is_some() != secret_access_key.is_some() {
            let missing = if access_key_id.is_some() {
                "storage.secret_access_key"
            } else {
                "storage.access_key_id"
            };
            found.push(
                missing,
                "must be set too: storage.access_key_id and storage.secret_access_key go together",
            );
        }
    }
}

fn check_dependencies(s: &Settings, found: &mut Problems) {
    let d = &s.dependencies;
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
            found.push(
                format!("dependencies.{key}"),
                format!("must be between 1 and 86400000 (ms), not {value}"),
            );
        }
    }
}

fn check_aggregator(s: &Settings, found: &mut Problems) {
    let a = &s.aggregator;
    // A read or a segment holds at least one row, and a row may be as large as the largest
    // upstream body plus its envelope.
    let one_row = s
        .limits
        .max_response_bytes
        .saturating_add(ROW_ENVELOPE_BYTES);
    let one_row_note = " (at least limits.max_response_bytes + 64 KiB)";
    // tokio's interval and sleeps need a non-zero period.
    found.within(
        "aggregator.sweep_interval_ms",
        a.sweep_interval_ms,
        10..=HOUR_MS,
    );
    found.within("aggregator.lease_ms", a.lease_ms, 100..=HOUR_MS);
    found.within(
        "aggregator.redispatch_after_ms",
        a.redispatch_after_ms,
        0..=30 * DAY_SECS * 1000,
    );
    found.within(
        "aggregator.rows_ttl_secs",
        a.rows_ttl_secs,
        1..=365 * DAY_SECS,
    );
    found.within_because(
        "aggregator.finalize_read_bytes",
        a.finalize_read_bytes,
        one_row..=1 << 32,
        one_row_note,
    );
    found.within("aggregator.compact_rows", a.compact_rows, 1..=100_000_000);
    found.within("aggregator.compact_bytes", a.compact_bytes, 1..=1 << 34);
    found.within_because(
        "aggregator.segment_bytes",
        a.segment_bytes,
        one_row..=1 << 34,
        one_row_note,
    );
    found.within("aggregator.merge_fan_in", a.merge_fan_in, 2..=4_096);
    found.within("aggregator.compact_ask_ms", a.compact_ask_ms, 10..=HOUR_MS);
}

fn check_idempotency(s: &Settings, found: &mut Problems) {
    let idem = &s.idempotency;
    found.within(
        "idempotency.retention_secs",
        idem.retention_secs,
        1..=30 * DAY_SECS,
    );
    // An HTTP header holds a few KiB at most.
    found.within("idempotency.max_key_chars", idem.max_key_chars, 1..=4_096);
    found.within("idempotency.wait_ms", idem.wait_ms, 0..=HOUR_MS);
    // Renewed every third of it, so a Redis round trip must fit well inside.
    found.within("idempotency.lease_ms", idem.lease_ms, 1_000..=HOUR_MS);
}

fn check_lifecycle(s: &Settings, found: &mut Problems) {
    let lc = &s.lifecycle;
    // Short lifetimes are allowed (tests shorten them); a ten-year bound is far past OpenAI's
    // and leaves room for operators who keep files longer.
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
        found.within(key, value, 1..=10 * 365 * DAY_SECS);
    }
    found.within("lifecycle.sweep_limit", lc.sweep_limit, 1..=1_000_000);
    found.within(
        "lifecycle.storage_quota_bytes",
        lc.storage_quota_bytes,
        0..=1 << 53,
    );
    found.within(
        "lifecycle.storage_quota_files",
        lc.storage_quota_files,
        0..=1 << 40,
    );
}
