//! Inline batches (seed 000/001, MeshAPI): `POST /v1/batches` with `requests: [{custom_id, body}]`
//! and no upload step.
//!
//! The model is resolved from `body.model` across all requests at once: requests naming different
//! models are refused (400 `model_mismatch`) unless the tenant may mix models
//! (`one_model_per_batch = false`: each model is then checked per request, as in a file), a model
//! nothing serves is 400 `model_not_found`, a
//! provider without batch support 501 `not_implemented`, and no provider at all 503. The requests
//! then become a stored input file (`inline-requests.jsonl`, purpose `batch`, lines
//! `{custom_id, method: "POST", url: endpoint, body}`) and the batch is created exactly like a file
//! batch, so list, get, cancel and the result files behave the same.

use axum::http::StatusCode;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Map, Value, json};
use sluice_core::domain::SUPPORTED_ENDPOINTS;
use sluice_core::domain::task_model;
use sluice_core::routing::{RouteError, resolve_target};
use sluice_core::validate::clip;

use super::ECHO_BYTES;
use super::batches::admission::{Ask, admit_lines};
use super::batches::{
    CreateBatch, parse_completion_window, parse_metadata, parse_output_expiry, quoted_list,
    release_batch, reserve_batch, store_reserved,
};
use super::jsonl_body::{DEFAULT_ENDPOINT, DEFAULT_WINDOW, store_lines};
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::state::AppState;

mod stream_parse;
use stream_parse::{ParseStop, StreamParse};

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

/// The batch endpoint: absent means the default, else one we support (echoed clipped).
fn check_endpoint(value: Option<&Value>) -> Result<&str, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(DEFAULT_ENDPOINT),
        Some(Value::String(e)) if SUPPORTED_ENDPOINTS.contains(&e.as_str()) => Ok(e.as_str()),
        Some(Value::String(e)) => Err(ApiError::invalid_value(
            "endpoint",
            format!(
                "Invalid value: '{}'. Supported values are: {}.",
                clip(e, ECHO_BYTES),
                quoted_list(SUPPORTED_ENDPOINTS)
            ),
        )),
        Some(other) => Err(ApiError::invalid_type("endpoint", "a string", other)),
    }
}

/// One element of `requests` as an input line `{custom_id, method, url, body}`: an object with a
/// non-empty string `custom_id` and an object `body`; `url` and `method`, when given, must agree
/// with the batch. The rest (model, `custom_id` length…) is the line checker's.
fn request_line(i: usize, request: &Value, endpoint: &str) -> Result<Value, ApiError> {
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
    let body = match request.get("body") {
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
    Ok(json!({"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body}))
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

/// Bytes of a request body queued between the connection and the parser.
const BODY_CHUNKS_QUEUED: usize = 4;
/// Request lines queued between the parser and the line checker.
const LINES_QUEUED: usize = 16;

/// `POST /v1/batches` with `requests`, for a body over `limits.max_json_body_bytes`: parsed as a
/// stream on a blocking thread, element by element, each request becoming one input line as it
/// arrives, so memory is about one request whatever the body size. `head` is what was read of the
/// body already. Fields other than `requests` are read as they come, except that an `endpoint`
/// must come before `requests` (the lines name it); a body with `input_file_id`, or of no known
/// form, is the plain create and gets 413 above its cap.
pub(crate) async fn create_streamed<S>(
    state: &AppState,
    tenant: &Tenant,
    head: Bytes,
    mut rest: S,
) -> Result<Value, ApiError>
where
    S: futures::Stream<Item = Result<Bytes, ApiError>> + Send + Unpin,
{
    let limits = &state.settings.limits;
    if head.trim_ascii_start().first() != Some(&b'{') {
        return Err(super::create::json_too_large(limits.max_json_body_bytes));
    }
    let body_limit = limits.max_inline_body_bytes;
    let batch_id = reserve_batch(state, tenant).await?;
    let (body_tx, body_rx) = tokio::sync::mpsc::channel(BODY_CHUNKS_QUEUED);
    let (line_tx, line_rx) = tokio::sync::mpsc::channel(LINES_QUEUED);
    let parse = StreamParse {
        limits: limits.clone(),
        bounds: state.settings.window_bounds(),
    };
    let parser = tokio::task::spawn_blocking(move || parse.run(body_rx, line_tx));

    let feed = async move {
        let mut bytes = head.len() as u64;
        let mut next = Some(Ok(head));
        while let Some(chunk) = next {
            if body_tx.send(chunk).await.is_err() {
                return;
            }
            next = match rest.next().await {
                Some(Ok(chunk)) => {
                    bytes += chunk.len() as u64;
                    Some(if bytes > body_limit {
                        Err(inline_too_large(body_limit))
                    } else {
                        Ok(chunk)
                    })
                }
                other => other,
            };
            if next.as_ref().is_some_and(Result::is_err) {
                // The error goes through; then nothing more.
                if let Some(e) = next.take() {
                    let _sent = body_tx.send(e).await;
                }
            }
        }
    };
    let lines = Box::pin(futures::stream::unfold(line_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let store = store_lines(
        state,
        tenant,
        lines,
        None,
        "inline-requests.jsonl",
        true,
        body_limit,
    );
    let ((), stored) = futures::join!(feed, store);
    let parsed = parser.await.unwrap_or_else(|e| {
        Err(ParseStop::Failed(
            anyhow::anyhow!("the request parser panicked: {e}").into(),
        ))
    });
    let outcome = match (parsed, stored) {
        // The checker stopped reading first (its verdict is the answer).
        (Err(ParseStop::LinesClosed), stored) => stored.and_then(|_| {
            Err(anyhow::anyhow!("the line checker stopped before the requests ended").into())
        }),
        (Err(ParseStop::Failed(e)), _) => Err(e),
        (Ok(_), Err(e)) => Err(e),
        (Ok(fields), Ok(stored)) => Ok((fields, stored)),
    };
    let (fields, stored) = match outcome {
        Ok(done) => done,
        Err(e) => {
            release_batch(state, tenant, &batch_id).await;
            return Err(e);
        }
    };
    let params = CreateBatch {
        input_file_id: stored.file_id,
        endpoint: stored.endpoint,
        completion_window: fields.completion_window,
        window: fields.window,
        metadata: fields.metadata,
        output_expires_after_secs: fields.output_expires_after_secs,
        priority: None,
    };
    store_reserved(state, tenant, &batch_id, params).await
}

fn inline_too_large(limit: u64) -> ApiError {
    ApiError::Coded {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!(
            "The request body is too large: an inline create body is limited to {limit} bytes."
        ),
        param: None,
        code: "request_too_large",
        errors: None,
    }
}
