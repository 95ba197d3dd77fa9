//! One inline request as an input line, and the batch endpoint the lines name.

use serde_json::{Value, json};
use sluice_core::domain::SUPPORTED_ENDPOINTS;
use sluice_core::validate::clip;

use crate::error::ApiError;
use crate::routes::batches::create::defaults::DEFAULT_ENDPOINT;
use crate::routes::batches::params::quoted_list;
use crate::routes::bounds::ECHO_BYTES;

/// The batch endpoint: absent means the default, else one we support (echoed clipped).
pub(super) fn check_endpoint(value: Option<&Value>) -> Result<&str, ApiError> {
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
pub(super) fn request_line(i: usize, request: &Value, endpoint: &str) -> Result<Value, ApiError> {
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
