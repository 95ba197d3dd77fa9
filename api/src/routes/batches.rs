//! The Batches API: create, list, retrieve and cancel.
//!
//! Only parameters are checked here. Whether the input file exists and its lines are valid is
//! decided asynchronously by the dispatcher (the batch then becomes `failed`), as OpenAI does, so
//! creating a batch costs two Redis writes and one publish whatever the file size.

use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use serde_json::{Map, Value};
use sluice_shared::domain::{BatchMeta, BatchStatus, SUPPORTED_ENDPOINTS, new_batch_id, now_secs};
use sluice_shared::store::Transition;

use super::dialect::present;
use super::{EXPIRES_AFTER_SECS, PageRequest, announce, list_object, read_page, visible};
use crate::auth::Tenant;
use crate::error::{ApiError, json_type_name};
use crate::extract::{ApiPath, ApiQuery, JsonBody, int_param};
use crate::state::AppState;

const MAX_METADATA_PAIRS: usize = 16;
/// A reservation whose batch is still not stored after this long was left by a crash.
const RESERVATION_GRACE_MS: i64 = 60_000;
const MAX_METADATA_KEY_CHARS: usize = 64;
const MAX_METADATA_VALUE_CHARS: usize = 512;

/// The validated parameters of `POST /v1/batches`.
#[derive(Debug, PartialEq)]
pub(crate) struct CreateBatch {
    pub(crate) input_file_id: String,
    pub(crate) endpoint: String,
    /// As the client wrote it; the batch object echoes it back.
    pub(crate) completion_window: String,
    pub(crate) window: Duration,
    /// Compact JSON of the metadata object, when one was given.
    pub(crate) metadata: Option<String>,
    pub(crate) output_expires_after_secs: Option<i64>,
}

impl CreateBatch {
    /// Checks every parameter; unknown fields are ignored as OpenAI does.
    fn parse(body: &Value, (min, max): (Duration, Duration)) -> Result<Self, ApiError> {
        let Some(body) = body.as_object() else {
            return Err(ApiError::bad_request(format!(
                "Invalid type for the request body: expected an object, but got {} instead.",
                json_type_name(body)
            )));
        };
        let input_file_id = required_string(body, "input_file_id")?;
        let endpoint = required_string(body, "endpoint")?;
        if !SUPPORTED_ENDPOINTS.contains(&endpoint) {
            return Err(ApiError::invalid_value(
                "endpoint",
                format!(
                    "Invalid value: '{endpoint}'. Supported values are: {}.",
                    quoted_list(SUPPORTED_ENDPOINTS)
                ),
            ));
        }
        let completion_window = required_string(body, "completion_window")?;
        let window = parse_completion_window(completion_window, (min, max))?;
        Ok(Self {
            input_file_id: input_file_id.to_owned(),
            endpoint: endpoint.to_owned(),
            completion_window: completion_window.to_owned(),
            window,
            metadata: parse_metadata(body.get("metadata"))?,
            output_expires_after_secs: parse_output_expiry(body.get("output_expires_after"))?,
        })
    }
}

/// A `completion_window` within the configured bounds.
pub(crate) fn parse_completion_window(
    completion_window: &str,
    (min, max): (Duration, Duration),
) -> Result<Duration, ApiError> {
    sluice_shared::config::parse_window(completion_window)
        .filter(|w| (min..=max).contains(w))
        .ok_or_else(|| {
            ApiError::invalid_value(
                "completion_window",
                format!(
                    "Invalid value: '{completion_window}'. Supported values are durations from {} \
                     to {}, such as '24h'.",
                    human(min),
                    human(max)
                ),
            )
        })
}

fn required_string<'a>(body: &'a Map<String, Value>, name: &str) -> Result<&'a str, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Err(ApiError::missing(name)),
        Some(Value::String(s)) if s.is_empty() => Err(ApiError::InvalidRequest {
            message: format!(
                "Invalid '{name}': empty string. Expected a string with minimum length 1, but \
                 got an empty string instead."
            ),
            param: Some(name.to_owned()),
            code: Some("empty_string"),
        }),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(ApiError::invalid_type(name, "a string", other)),
    }
}

/// OpenAI's limits: at most 16 pairs, keys up to 64 characters, string values up to 512.
pub(crate) fn parse_metadata(value: Option<&Value>) -> Result<Option<String>, ApiError> {
    let map = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(map)) => map,
        Some(other) => return Err(ApiError::invalid_type("metadata", "an object", other)),
    };
    if map.len() > MAX_METADATA_PAIRS {
        return Err(ApiError::invalid_value(
            "metadata",
            format!(
                "Invalid 'metadata': too many properties. Expected an object with at most \
                 {MAX_METADATA_PAIRS} properties, but got an object with {} properties instead.",
                map.len()
            ),
        ));
    }
    for (key, value) in map {
        let param = format!("metadata.{key}");
        let key_chars = key.chars().count();
        if key_chars > MAX_METADATA_KEY_CHARS {
            return Err(ApiError::invalid_value(
                "metadata",
                format!(
                    "Invalid 'metadata': key too long. Expected keys with maximum length \
                     {MAX_METADATA_KEY_CHARS}, but got a key with length {key_chars} instead."
                ),
            ));
        }
        let Value::String(value) = value else {
            return Err(ApiError::invalid_type(&param, "a string", value));
        };
        let value_chars = value.chars().count();
        if value_chars > MAX_METADATA_VALUE_CHARS {
            return Err(ApiError::invalid_value(
                param.as_str(),
                format!(
                    "Invalid '{param}': string too long. Expected a string with maximum length \
                     {MAX_METADATA_VALUE_CHARS}, but got a string with length {value_chars} \
                     instead."
                ),
            ));
        }
    }
    Ok(Some(Value::Object(map.clone()).to_string()))
}

/// `output_expires_after`: `{anchor: "created_at", seconds}`; returns the seconds.
pub(crate) fn parse_output_expiry(value: Option<&Value>) -> Result<Option<i64>, ApiError> {
    const ANCHOR: &str = "output_expires_after.anchor";
    const SECONDS: &str = "output_expires_after.seconds";
    let map = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(ApiError::invalid_type(
                "output_expires_after",
                "an object",
                other,
            ));
        }
    };
    match map.get("anchor") {
        None | Some(Value::Null) => return Err(ApiError::missing(ANCHOR)),
        Some(Value::String(anchor)) if anchor == "created_at" => {}
        Some(Value::String(anchor)) => {
            return Err(ApiError::invalid_value(
                ANCHOR,
                format!("Invalid value: '{anchor}'. Supported values are: 'created_at'."),
            ));
        }
        Some(other) => return Err(ApiError::invalid_type(ANCHOR, "a string", other)),
    }
    let seconds = match map.get("seconds") {
        None | Some(Value::Null) => return Err(ApiError::missing(SECONDS)),
        // A u64 beyond i64 is simply out of range.
        Some(Value::Number(n)) if !n.is_f64() => n.as_i64().unwrap_or(i64::MAX),
        Some(other) => return Err(ApiError::invalid_type(SECONDS, "an integer", other)),
    };
    if !EXPIRES_AFTER_SECS.contains(&seconds) {
        return Err(ApiError::invalid_value(
            SECONDS,
            format!(
                "Invalid '{SECONDS}': integer out of range. Expected a value between {} and {}, \
                 but got {seconds} instead.",
                EXPIRES_AFTER_SECS.start(),
                EXPIRES_AFTER_SECS.end()
            ),
        ));
    }
    Ok(Some(seconds))
}

/// `'a', 'b', and 'c'`.
pub(crate) fn quoted_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("'{i}'")).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{}, and {last}", rest.join(", ")),
    }
}

/// A duration in its largest whole unit (`7d`, `60s`), as windows are written.
fn human(duration: Duration) -> String {
    let secs = duration.as_secs();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs >= size && secs.is_multiple_of(size) {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

/// `POST /v1/batches`.
pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    create_from_json(&state, &tenant, &body).await.map(Json)
}

/// The OpenAI create: a batch over an uploaded input file.
pub(crate) async fn create_from_json(
    state: &AppState,
    tenant: &Tenant,
    body: &Value,
) -> Result<Value, ApiError> {
    let params = CreateBatch::parse(body, state.settings.window_bounds())?;
    let batch_id = reserve_batch(state, tenant).await?;
    store_reserved(state, tenant, &batch_id, params).await
}

/// A new batch id, counted against the tenant's open batches (`limits.max_open_batches`):
/// 429 `batch_limit_exceeded` when the tenant is at the limit. Every way of creating a batch
/// takes one before doing any work, and ends in [`store_reserved`] (or [`release_batch`]).
pub(crate) async fn reserve_batch(state: &AppState, tenant: &Tenant) -> Result<String, ApiError> {
    let batch_id = new_batch_id();
    let limit = state.settings.limits.max_open_batches;
    let store = &state.store;
    let mut reserved = store
        .reserve_open_batch(tenant.id(), &batch_id, limit)
        .await
        .context("Failed to count the tenant's open batches")?;
    if !reserved {
        // At the limit: first drop what a crash may have left counted (a reservation whose batch
        // was never stored, a terminal batch never retired), then try once more.
        let stale_before = sluice_shared::domain::now_millis() - RESERVATION_GRACE_MS;
        let pruned = store
            .prune_open_batches(tenant.id(), stale_before)
            .await
            .context("Failed to prune the tenant's open batches")?;
        if pruned > 0 {
            reserved = store
                .reserve_open_batch(tenant.id(), &batch_id, limit)
                .await
                .context("Failed to count the tenant's open batches")?;
        }
    }
    if !reserved {
        return Err(ApiError::Coded {
            status: axum::http::StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "You already have {limit} batches that are not finished; wait for one to \
                 complete (or cancel one) before creating another."
            ),
            param: None,
            code: "batch_limit_exceeded",
            errors: None,
        });
    }
    Ok(batch_id)
}

/// Gives back a reservation whose batch will not be stored.
pub(crate) async fn release_batch(state: &AppState, tenant: &Tenant, batch_id: &str) {
    if let Err(e) = state.store.release_open_batch(tenant.id(), batch_id).await {
        tracing::warn!(%batch_id, error = %e, "Failed to release an open-batch reservation.");
    }
}

/// Stores a reserved batch (`validating`), announces it and answers its object.
pub(crate) async fn store_reserved(
    state: &AppState,
    tenant: &Tenant,
    batch_id: &str,
    params: CreateBatch,
) -> Result<Value, ApiError> {
    let batch_id = batch_id.to_owned();
    let created_at = now_secs();
    let expires_at = created_at.saturating_add(params.window.as_secs() as i64);
    let mut fields = vec![
        ("endpoint", params.endpoint),
        ("input_file_id", params.input_file_id),
        ("completion_window", params.completion_window),
        ("created_at", created_at.to_string()),
        ("expires_at", expires_at.to_string()),
    ];
    if let Some(metadata) = params.metadata {
        fields.push(("metadata", metadata));
    }
    if let Some(secs) = params.output_expires_after_secs {
        fields.push(("output_expires_after_secs", secs.to_string()));
    }
    if let Err(e) = state
        .store
        .create_batch(&batch_id, tenant.id(), expires_at, &fields)
        .await
    {
        release_batch(state, tenant, &batch_id).await;
        return Err(anyhow::Error::new(e)
            .context("Failed to store a new batch")
            .into());
    }
    // Read back before announcing: once the dispatcher has the event it may fail or start the
    // batch at once, and the create answer must show the batch as created (`validating`).
    let meta = reload(state, &batch_id).await?;
    announce(state, &state.keys().control_queue(), &batch_id).await;
    Ok(present(state, tenant, &meta))
}

/// `GET /v1/batches?after=&limit=`: newest first.
#[utoipa::path(get, path = "/batches", operation_id = "listBatches", tag = "batches",
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 100, description = "Page size (default 20)."),
        ("after" = Option<String>, Query, description = "A batch id: the page starts after it."),
    ),
    responses((status = 200, description = "A page of batches, newest first", body = crate::openapi::BatchList), (status = 400, description = "Invalid request", body = crate::openapi::ErrorResponse), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiQuery(query): ApiQuery,
) -> Result<Json<Value>, ApiError> {
    let limit = int_param(&query, "limit", 1..=100, 20)?;
    let keys = state.keys();
    let record_key = |id: &str| keys.batch_meta(id);
    let page = read_page(
        &state.store,
        &tenant,
        PageRequest {
            set: keys.tenant_batches(tenant.id()),
            record_key: &record_key,
            after: query
                .get("after")
                .map(String::as_str)
                .filter(|a| !a.is_empty()),
            desc: true,
            limit,
            keep: &|_| true,
        },
    )
    .await?;
    let data = page
        .records
        .into_iter()
        .map(|r| present(&state, &tenant, &BatchMeta(r)))
        .collect();
    Ok(Json(list_object(data, page.has_more)))
}

/// `GET /v1/batches/{batch_id}`.
#[utoipa::path(get, path = "/batches/{batch_id}", operation_id = "retrieveBatch", tag = "batches", params(("batch_id" = String, Path, description = "A batch id.")),
    responses((status = 200, description = "The batch", body = crate::openapi::Batch), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub async fn retrieve(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(batch_id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let meta = load_batch(&state, &tenant, &batch_id).await?;
    Ok(Json(present(&state, &tenant, &meta)))
}

/// `POST /v1/batches/{batch_id}/cancel`. Idempotent while cancelling or cancelled; 409 once the
/// batch is finishing or finished, since there is nothing left to stop.
#[utoipa::path(post, path = "/batches/{batch_id}/cancel", operation_id = "cancelBatch", tag = "batches", params(("batch_id" = String, Path, description = "A batch id.")),
    responses((status = 200, description = "The batch, `cancelling` or `cancelled`", body = crate::openapi::Batch), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 409, description = "Conflicts with the batch's status", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub async fn cancel(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(batch_id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let meta = load_batch(&state, &tenant, &batch_id).await?;
    match meta.status() {
        Some(BatchStatus::Cancelling | BatchStatus::Cancelled) => {
            return Ok(Json(present(&state, &tenant, &meta)));
        }
        Some(
            status @ (BatchStatus::Completed
            | BatchStatus::Failed
            | BatchStatus::Expired
            | BatchStatus::Finalizing),
        ) => return Err(cannot_cancel(status)),
        Some(BatchStatus::Validating | BatchStatus::InProgress) | None => {}
    }
    // The status may have moved since the read; the transition script is the arbiter.
    let outcome = state
        .store
        .transition(
            &batch_id,
            BatchStatus::Cancelling,
            &[("stopping", "cancelled".to_owned())],
        )
        .await
        .context("Failed to mark a batch cancelling")?;
    match outcome {
        Transition::Applied(_) => {
            announce(&state, &state.keys().finalize_queue(), &batch_id).await;
        }
        // Already stopping: cancelled twice, or expiring (the expiry wins; it ends the same way).
        Transition::Refused(Some(
            BatchStatus::Cancelling
            | BatchStatus::Cancelled
            | BatchStatus::Validating
            | BatchStatus::InProgress,
        )) => {}
        Transition::Refused(Some(status)) => return Err(cannot_cancel(status)),
        Transition::Refused(None) => return Err(ApiError::batch_not_found(&batch_id)),
    }
    let meta = reload(&state, &batch_id).await?;
    Ok(Json(present(&state, &tenant, &meta)))
}

fn cannot_cancel(status: BatchStatus) -> ApiError {
    ApiError::Conflict {
        message: format!("Cannot cancel a batch with status '{}'.", status.as_str()),
    }
}

/// The caller's batch `batch_id`, or 404.
pub(crate) async fn load_batch(
    state: &AppState,
    tenant: &Tenant,
    batch_id: &str,
) -> Result<BatchMeta, ApiError> {
    let found = state
        .store
        .get_batch(batch_id)
        .await
        .context("Failed to read a batch")?;
    visible(found, tenant).ok_or_else(|| ApiError::batch_not_found(batch_id))
}

/// A batch just written by this request (batches are never deleted, so it must exist).
async fn reload(state: &AppState, batch_id: &str) -> Result<BatchMeta, ApiError> {
    Ok(state
        .store
        .get_batch(batch_id)
        .await
        .context("Failed to read a batch back")?
        .with_context(|| format!("Batch {batch_id} vanished after being written"))?)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const BOUNDS: (Duration, Duration) = (Duration::from_secs(60), Duration::from_secs(7 * 86_400));

    fn valid() -> Value {
        json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    }

    fn with(field: &str, value: Value) -> Value {
        let mut body = valid();
        body[field] = value;
        body
    }

    fn error_of(body: &Value) -> (String, Option<String>, Option<&'static str>) {
        match CreateBatch::parse(body, BOUNDS).unwrap_err() {
            ApiError::InvalidRequest {
                message,
                param,
                code,
            } => (message, param, code),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_minimal_request_parses() {
        let parsed = CreateBatch::parse(&with("unknown", json!(1)), BOUNDS).unwrap();
        assert_eq!(parsed.window, Duration::from_secs(86_400));
        assert_eq!(parsed.completion_window, "24h");
        assert_eq!(parsed.metadata, None);
        assert_eq!(parsed.output_expires_after_secs, None);
    }

    #[test]
    fn missing_and_mistyped_parameters_are_named() {
        let mut body = valid();
        body.as_object_mut().unwrap().remove("input_file_id");
        let (_, param, code) = error_of(&body);
        assert_eq!(param.as_deref(), Some("input_file_id"));
        assert_eq!(code, Some("missing_required_parameter"));

        let (message, param, code) = error_of(&with("endpoint", json!(3)));
        assert_eq!(param.as_deref(), Some("endpoint"));
        assert_eq!(code, Some("invalid_type"));
        assert_eq!(
            message,
            "Invalid type for 'endpoint': expected a string, but got an integer instead."
        );
    }

    #[test]
    fn unsupported_endpoints_list_the_supported_ones() {
        let (message, param, code) = error_of(&with("endpoint", json!("/v1/invalid/endpoint")));
        assert_eq!(param.as_deref(), Some("endpoint"));
        assert_eq!(code, Some("invalid_value"));
        assert!(message.starts_with(
            "Invalid value: '/v1/invalid/endpoint'. Supported values are: '/v1/chat/completions', "
        ));
        assert!(message.ends_with(", and '/v1/moderations'."), "{message}");
    }

    #[test]
    fn completion_windows_outside_the_bounds_are_refused() {
        for window in ["59s", "8d", "24", "soon"] {
            let (message, param, _) = error_of(&with("completion_window", json!(window)));
            assert_eq!(param.as_deref(), Some("completion_window"));
            assert!(message.contains("from 1m to 7d"), "{message}");
        }
        let parsed = CreateBatch::parse(&with("completion_window", json!("7d")), BOUNDS).unwrap();
        assert_eq!(parsed.window, Duration::from_secs(7 * 86_400));
    }

    #[test]
    fn metadata_values_must_be_strings() {
        let (message, param, code) = error_of(&with("metadata", json!({"tags": ["a"]})));
        assert_eq!(
            message,
            "Invalid type for 'metadata.tags': expected a string, but got an array instead."
        );
        assert_eq!(param.as_deref(), Some("metadata.tags"));
        assert_eq!(code, Some("invalid_type"));
    }

    #[test]
    fn metadata_limits_are_enforced() {
        let many: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert_eq!(
            error_of(&with("metadata", Value::Object(many)))
                .1
                .as_deref(),
            Some("metadata")
        );
        let long_key = json!({"k".repeat(65): "v"});
        assert_eq!(
            error_of(&with("metadata", long_key)).1.as_deref(),
            Some("metadata")
        );
        let long_value = json!({"k": "v".repeat(513)});
        assert_eq!(
            error_of(&with("metadata", long_value)).1.as_deref(),
            Some("metadata.k")
        );

        let ok: Map<String, Value> = (0..16)
            .map(|i| (format!("k{i}"), json!("é".repeat(512))))
            .collect();
        let parsed = CreateBatch::parse(&with("metadata", Value::Object(ok)), BOUNDS).unwrap();
        let stored: Value = serde_json::from_str(&parsed.metadata.unwrap()).unwrap();
        assert_eq!(stored.as_object().unwrap().len(), 16);

        let parsed = CreateBatch::parse(&with("metadata", Value::Null), BOUNDS).unwrap();
        assert_eq!(parsed.metadata, None);
    }

    #[test]
    fn output_expiry_needs_the_created_at_anchor_and_a_bounded_integer() {
        let ok = with(
            "output_expires_after",
            json!({"anchor": "created_at", "seconds": 3600}),
        );
        assert_eq!(
            CreateBatch::parse(&ok, BOUNDS)
                .unwrap()
                .output_expires_after_secs,
            Some(3600)
        );

        let cases = [
            (
                json!({"anchor": "created_at", "seconds": 3599}),
                "output_expires_after.seconds",
                "invalid_value",
            ),
            (
                json!({"anchor": "created_at", "seconds": u64::MAX}),
                "output_expires_after.seconds",
                "invalid_value",
            ),
            (
                json!({"anchor": "created_at", "seconds": 3600.5}),
                "output_expires_after.seconds",
                "invalid_type",
            ),
            (
                json!({"anchor": "created_at"}),
                "output_expires_after.seconds",
                "missing_required_parameter",
            ),
            (
                json!({"anchor": "now", "seconds": 3600}),
                "output_expires_after.anchor",
                "invalid_value",
            ),
            (json!("soon"), "output_expires_after", "invalid_type"),
        ];
        for (value, want_param, want_code) in cases {
            let (_, param, code) = error_of(&with("output_expires_after", value));
            assert_eq!(param.as_deref(), Some(want_param));
            assert_eq!(code, Some(want_code));
        }
    }

    #[test]
    fn windows_print_in_their_largest_unit() {
        assert_eq!(human(Duration::from_secs(60)), "1m");
        assert_eq!(human(Duration::from_secs(90)), "90s");
        assert_eq!(human(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(human(Duration::from_secs(36 * 3_600)), "36h");
    }
}
