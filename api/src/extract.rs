//! Extractors whose rejections are [`ApiError`]s, so a malformed request gets the OpenAI envelope
//! with a precise message instead of axum's plain-text rejection.

use std::collections::HashMap;

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use serde_json::Value;

use crate::error::ApiError;

/// A path parameter.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub(crate) struct ApiPath<T>(pub T);

/// The query string as a map; handlers validate each parameter themselves to name it in errors.
#[derive(Debug)]
pub(crate) struct ApiQuery(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for ApiQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(map) = Query::from_request_parts(parts, state).await?;
        Ok(Self(map))
    }
}

/// A request body parsed as JSON, with the API's messages for an empty or malformed body.
pub(crate) fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "The request body is empty; a JSON object was expected.",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request(format!(
            "We could not parse the JSON body of your request ({e}). The API expects a JSON \
             object."
        ))
    })
}

/// An optional integer query parameter within `range`, `default` when absent.
pub(crate) fn int_param(
    query: &HashMap<String, String>,
    name: &str,
    range: std::ops::RangeInclusive<usize>,
    default: usize,
) -> Result<usize, ApiError> {
    let Some(raw) = query.get(name) else {
        return Ok(default);
    };
    raw.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            ApiError::invalid_value(
                name,
                format!(
                    "Invalid value for '{name}': expected an integer between {} and {}, but got \
                     '{}' instead.",
                    range.start(),
                    range.end(),
                    sluice_core::validate::clip(raw, 64)
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_params_default_and_check_their_range() {
        let q: HashMap<String, String> = [("limit".to_owned(), "0".to_owned())].into();
        assert_eq!(int_param(&q, "missing", 1..=100, 20).unwrap(), 20);
        let err = int_param(&q, "limit", 1..=100, 20).unwrap_err();
        assert!(matches!(err, ApiError::InvalidRequest { param: Some(ref p), .. } if p == "limit"));
        let q: HashMap<String, String> = [("limit".to_owned(), "100".to_owned())].into();
        assert_eq!(int_param(&q, "limit", 1..=100, 20).unwrap(), 100);
    }
}
