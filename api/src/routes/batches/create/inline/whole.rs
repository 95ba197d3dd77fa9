//! An inline body small enough to be parsed whole: the model is resolved across all requests
//! at once, and the batch admitted before anything is stored.

use axum::http::StatusCode;
use bytes::Bytes;
use serde_json::{Map, Value};
use sluice_core::domain::task_model;
use sluice_core::routing::{RouteError, resolve_target};
use sluice_core::validate::clip;

use super::request_line::{check_endpoint, request_line};
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::routes::batches::admission::{Ask, admit_lines};
use crate::routes::batches::create::defaults::DEFAULT_WINDOW;
use crate::routes::batches::create::input_lines::store_lines;
use crate::routes::batches::params::{
    CreateBatch, parse_completion_window, parse_metadata, parse_output_expiry,
};
use crate::routes::batches::record::store_reserved;
use crate::routes::batches::reservation::{release_batch, reserve_batch};
use crate::routes::bounds::ECHO_BYTES;
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
    let endpoint = check_endpoint(body.get("endpoint"))?;
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

    let one_model = state.settings.one_model_per_batch(tenant.id());
    let mut jsonl = Vec::new();
    let mut model: Option<(&str, usize)> = None;
    for (i, request) in requests.iter().enumerate() {
        let line = request_line(i, request, endpoint)?;
        let this_model = match request["body"].get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.as_str(),
            _ => return Err(ApiError::missing(&format!("requests[{i}].body.model"))),
        };
        match model {
            None => model = Some((this_model, i)),
            // Task models are one router: a batch may mix them (not with other models).
            Some((first, first_index))
                if one_model
                    && first != this_model
                    && !(task_model(first).is_some() && task_model(this_model).is_some()) =>
            {
                return Err(ApiError::InvalidRequest {
                    message: format!(
                        "All requests in a batch must use the same model: requests[{first_index}] \
                         uses '{}', requests[{i}] uses '{}'.",
                        clip(first, ECHO_BYTES),
                        clip(this_model, ECHO_BYTES)
                    ),
                    param: Some(format!("requests[{i}].body.model")),
                    code: Some("model_mismatch"),
                });
            }
            Some(_) => {}
        }
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

    let mut params = CreateBatch {
        input_file_id: String::new(),
        endpoint: endpoint.to_owned(),
        completion_window: completion_window.to_owned(),
        window,
        metadata,
        output_expires_after_secs,
        priority: None,
    };
    let ask = Ask {
        lines: requests.len() as u64,
        model,
        endpoint,
        window_secs: window.as_secs(),
        completion_window,
        priority: params.priority(),
    };
    admit_lines(state, tenant, ask).await?;

    let batch_id = reserve_batch(state, tenant).await?;
    let chunks = futures::stream::iter([Ok::<_, ApiError>(Bytes::from(jsonl))]);
    let stored = match store_lines(
        state,
        tenant,
        chunks,
        Some(endpoint),
        "inline-requests.jsonl",
        true,
        state.settings.limits.max_inline_body_bytes,
    )
    .await
    {
        Ok(stored) => stored,
        Err(e) => {
            release_batch(state, tenant, &batch_id).await;
            return Err(e);
        }
    };
    params.input_file_id = stored.file_id;
    params.endpoint = stored.endpoint;
    store_reserved(state, tenant, &batch_id, params).await
}

/// A routing failure known while answering: 503 / 501 / 400 with its code.
fn route_error(e: RouteError, param: &str) -> ApiError {
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
