//! Inline batches (seed 000/001, MeshAPI): `POST /v1/batches` with `requests: [{custom_id, body}]`
//! and no upload step.
//!
//! The model is resolved from `body.model` across all requests at once: requests naming different
//! models are refused (400 `model_mismatch`), a model nothing serves is 400 `model_not_found`, a
//! provider without batch support 501 `not_implemented`, and no provider at all 503. The requests
//! then become a stored input file (`inline-requests.jsonl`, purpose `batch`, lines
//! `{custom_id, method: "POST", url: endpoint, body}`) and the batch is created exactly like a file
//! batch, so list, get, cancel and the result files behave the same.

use axum::http::StatusCode;
use bytes::Bytes;
use serde_json::{Map, Value, json};
use sluice_shared::domain::SUPPORTED_ENDPOINTS;
use sluice_shared::routing::{RouteError, resolve_target, task_model};

use super::batches::{
    CreateBatch, parse_completion_window, parse_metadata, parse_output_expiry, quoted_list,
    release_batch, reserve_batch, store_reserved,
};
use super::jsonl_body::{DEFAULT_ENDPOINT, DEFAULT_WINDOW, store_lines};
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::state::AppState;

/// `POST /v1/batches` with `requests`.
pub(crate) async fn create(
    state: &AppState,
    tenant: &Tenant,
    body: &Map<String, Value>,
) -> Result<Value, ApiError> {
    let requests = match body.get("requests") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid_value(
                "requests",
                "'requests' must hold at least one request.",
            ));
        }
        Some(other) => return Err(ApiError::invalid_type("requests", "an array", other)),
        None => return Err(ApiError::missing("requests")),
    };
    let max_lines = state.settings.limits.max_lines;
    if requests.len() as u64 > max_lines {
        return Err(ApiError::invalid_value(
            "requests",
            format!(
                "'requests' holds {} requests; a batch may have at most {max_lines}.",
                requests.len()
            ),
        ));
    }
    let endpoint = match body.get("endpoint") {
        None | Some(Value::Null) => DEFAULT_ENDPOINT,
        Some(Value::String(e)) if SUPPORTED_ENDPOINTS.contains(&e.as_str()) => e.as_str(),
        Some(Value::String(e)) => {
            return Err(ApiError::invalid_value(
                "endpoint",
                format!(
                    "Invalid value: '{e}'. Supported values are: {}.",
                    quoted_list(SUPPORTED_ENDPOINTS)
                ),
            ));
        }
        Some(other) => return Err(ApiError::invalid_type("endpoint", "a string", other)),
    };
    let completion_window = match body.get("completion_window") {
        None | Some(Value::Null) => DEFAULT_WINDOW,
        Some(Value::String(w)) => w.as_str(),
        Some(other) => {
            return Err(ApiError::invalid_type(
                "completion_window",
                "a string",
                other,
            ));
        }
    };
    let window = parse_completion_window(completion_window, state.settings.window_bounds())?;
    let metadata = parse_metadata(body.get("metadata"))?;
    let output_expires_after_secs = parse_output_expiry(body.get("output_expires_after"))?;

    let mut jsonl = Vec::new();
    let mut model: Option<(&str, usize)> = None;
    for (i, request) in requests.iter().enumerate() {
        let Some(request) = request.as_object() else {
            return Err(ApiError::invalid_type(
                &format!("requests[{i}]"),
                "an object",
                request,
            ));
        };
        let custom_id = match request.get("custom_id") {
            Some(Value::String(c)) if !c.is_empty() => c,
            Some(Value::String(_)) | None | Some(Value::Null) => {
                return Err(ApiError::missing(&format!("requests[{i}].custom_id")));
            }
            Some(other) => {
                return Err(ApiError::invalid_type(
                    &format!("requests[{i}].custom_id"),
                    "a string",
                    other,
                ));
            }
        };
        let request_body = match request.get("body") {
            Some(Value::Object(b)) => b,
            None | Some(Value::Null) => {
                return Err(ApiError::missing(&format!("requests[{i}].body")));
            }
            Some(other) => {
                return Err(ApiError::invalid_type(
                    &format!("requests[{i}].body"),
                    "an object",
                    other,
                ));
            }
        };
        let this_model = match request_body.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.as_str(),
            _ => return Err(ApiError::missing(&format!("requests[{i}].body.model"))),
        };
        match model {
            None => model = Some((this_model, i)),
            // Task models are one router: a batch may mix them (not with other models).
            Some((first, first_index))
                if first != this_model
                    && !(task_model(first).is_some() && task_model(this_model).is_some()) =>
            {
                return Err(ApiError::InvalidRequest {
                    message: format!(
                        "All requests in a batch must use the same model: requests[{first_index}] \
                         uses '{first}', requests[{i}] uses '{this_model}'."
                    ),
                    param: Some(format!("requests[{i}].body.model")),
                    code: Some("model_mismatch"),
                });
            }
            Some(_) => {}
        }
        // Optional, for clients that send full lines: they must agree with the batch.
        if let Some(url) = request.get("url")
            && url.as_str() != Some(endpoint)
        {
            return Err(ApiError::invalid_value(
                format!("requests[{i}].url"),
                format!("requests[{i}].url does not match the batch endpoint '{endpoint}'."),
            ));
        }
        if let Some(method) = request.get("method")
            && method.as_str() != Some("POST")
        {
            return Err(ApiError::invalid_value(
                format!("requests[{i}].method"),
                "Only 'POST' is supported for method.",
            ));
        }
        let line = json!({"custom_id": custom_id, "method": "POST", "url": endpoint, "body": request_body});
        jsonl.extend_from_slice(line.to_string().as_bytes());
        jsonl.push(b'\n');
    }
    let (model, _) = model.expect("at least one request");
    if let Err(e) = resolve_target(
        &state.settings.providers,
        &state.settings.tasks,
        model,
        endpoint,
    ) {
        return Err(route_error(e, "requests[0].body.model"));
    }

    let batch_id = reserve_batch(state, tenant).await?;
    let chunks = futures::stream::iter([Ok::<_, std::convert::Infallible>(Bytes::from(jsonl))]);
    let stored = match store_lines(
        state,
        tenant,
        chunks,
        Some(endpoint),
        "inline-requests.jsonl",
        true,
    )
    .await
    {
        Ok(stored) => stored,
        Err(e) => {
            release_batch(state, tenant, &batch_id).await;
            return Err(e);
        }
    };
    let params = CreateBatch {
        input_file_id: stored.file_id,
        endpoint: stored.endpoint,
        completion_window: completion_window.to_owned(),
        window,
        metadata,
        output_expires_after_secs,
    };
    store_reserved(state, tenant, &batch_id, params).await
}

/// A routing failure known while answering: 503 / 501 / 400 with its code.
pub(crate) fn route_error(e: RouteError, param: &str) -> ApiError {
    match e.http_status() {
        400 => ApiError::InvalidRequest {
            message: e.to_string(),
            param: Some(param.to_owned()),
            code: Some(e.code()),
        },
        status => ApiError::Coded {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            message: e.to_string(),
            param: Some(param.to_owned()),
            code: e.code(),
            errors: None,
        },
    }
}
