//! Authentication: the API key of a request → the [`Tenant`] that owns everything it creates.
//!
//! Keys come from `Authorization: Bearer <key>` (what the OpenAI SDKs send) or `x-api-key: <key>`,
//! never from the query string, where they would end up in access logs. Only SHA-256 digests are
//! configured, and the key itself is neither stored nor logged.

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

/// The authenticated caller. Extracting it rejects the request with 401 when the key is missing
/// or unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub String);

impl Tenant {
    /// The tenant id.
    pub fn id(&self) -> &str {
        &self.0
    }
}

const MISSING_KEY: &str = "You didn't provide an API key. You need to provide your API key in an \
     Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).";
const INCORRECT_KEY: &str = "Incorrect API key provided.";

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = presented_key(&parts.headers).ok_or(ApiError::Unauthenticated {
            message: MISSING_KEY,
        })?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        state
            .api_keys
            .get(&digest)
            .map(|tenant| Tenant(tenant.clone()))
            .ok_or(ApiError::Unauthenticated {
                message: INCORRECT_KEY,
            })
    }
}

/// The key a request presents, if any. A malformed `Authorization` header counts as an (invalid)
/// key rather than a missing one, so the caller learns the header was seen.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
        let value = value.to_str().unwrap_or_default().trim();
        let key = match value.split_once(' ') {
            Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim(),
            _ => value,
        };
        return Some(key);
    }
    headers
        .get("x-api-key")
        .map(|value| value.to_str().unwrap_or_default().trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn bearer_and_x_api_key_are_both_read() {
        assert_eq!(
            presented_key(&headers(&[("authorization", "Bearer sk-1")])),
            Some("sk-1")
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "bearer  sk-1 ")])),
            Some("sk-1")
        );
        assert_eq!(
            presented_key(&headers(&[("x-api-key", "sk-2")])),
            Some("sk-2")
        );
        assert_eq!(presented_key(&headers(&[])), None);
    }

    #[test]
    fn a_malformed_authorization_header_is_an_invalid_key_not_a_missing_one() {
        assert_eq!(
            presented_key(&headers(&[("authorization", "Basic abc")])),
            Some("Basic abc")
        );
    }
}
