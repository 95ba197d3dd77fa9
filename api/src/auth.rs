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
pub(crate) struct Tenant(pub(crate) String);

impl Tenant {
    /// The tenant id.
    pub(crate) fn id(&self) -> &str {
        &self.0
    }
}

const MISSING_KEY: &str = "You didn't provide an API key. You need to provide your API key in an \
     Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).";
const INCORRECT_KEY: &str = "Incorrect API key provided.";
const BLANK_KEY: &str = "The API key header is empty or not valid text. You need to provide your API \
     key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).";

/// Why a request presents no usable key.
#[derive(Debug, PartialEq, Eq)]
enum NoKey {
    /// Neither header is there.
    Missing,
    /// A key header is there, but empty, blank or not UTF-8: never looked up, since the digest
    /// of `""` would match a tenant configured with it.
    Blank,
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = presented_key(&parts.headers).map_err(|reason| ApiError::Unauthenticated {
            message: match reason {
                NoKey::Missing => MISSING_KEY,
                NoKey::Blank => BLANK_KEY,
            },
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

/// The key a request presents. A malformed `Authorization` header counts as an (invalid) key
/// rather than a missing one, so the caller learns the header was seen.
fn presented_key(headers: &HeaderMap) -> Result<&str, NoKey> {
    let key = if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| NoKey::Blank)?.trim();
        match value.split_once(' ') {
            Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim(),
            _ if value.eq_ignore_ascii_case("bearer") => "",
            _ => value,
        }
    } else if let Some(value) = headers.get("x-api-key") {
        value.to_str().map_err(|_| NoKey::Blank)?.trim()
    } else {
        return Err(NoKey::Missing);
    };
    if key.is_empty() {
        return Err(NoKey::Blank);
    }
    Ok(key)
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
            Ok("sk-1")
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "bearer  sk-1 ")])),
            Ok("sk-1")
        );
        assert_eq!(
            presented_key(&headers(&[("x-api-key", "sk-2")])),
            Ok("sk-2")
        );
        assert_eq!(presented_key(&headers(&[])), Err(NoKey::Missing));
    }

    #[test]
    fn a_malformed_authorization_header_is_an_invalid_key_not_a_missing_one() {
        assert_eq!(
            presented_key(&headers(&[("authorization", "Basic abc")])),
            Ok("Basic abc")
        );
    }

    #[test]
    fn empty_blank_and_non_utf8_keys_are_never_a_key() {
        for (name, value) in [
            ("authorization", ""),
            ("authorization", "   "),
            ("authorization", "Bearer"),
            ("authorization", "Bearer "),
            ("authorization", "Bearer   "),
            ("x-api-key", ""),
            ("x-api-key", "  "),
        ] {
            assert_eq!(
                presented_key(&headers(&[(name, value)])),
                Err(NoKey::Blank),
                "{name}: {value:?}"
            );
        }
        for name in ["authorization", "x-api-key"] {
            let mut map = HeaderMap::new();
            map.insert(name, HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap());
            assert_eq!(presented_key(&map), Err(NoKey::Blank), "{name}");
        }
    }
}
