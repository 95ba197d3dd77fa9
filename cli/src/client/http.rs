//! The HTTP side of the client: one base URL and key, OpenAI error envelopes turned into one line.

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;

/// A failed request, printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status.
    #[error("{message} (HTTP {status}{detail})")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The error's `message` (or the body when it has none).
        message: String,
        /// The error's `code` and `param`, when given, for the end of the line.
        detail: String,
    },
    /// No answer at all.
    #[error("cannot reach {url}: {reason}")]
    Unreachable {
        /// What was asked for.
        url: String,
        /// Why no answer came.
        reason: String,
    },
    /// An answer that is not what the Batch API sends.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// A local problem (a file that cannot be read or written).
    #[error("{0}")]
    Local(String),
}

/// A Batch API at `base` (ending in `/v1`), authenticated with `key`.
#[derive(Clone)]
pub struct Api {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Api {
    /// A client of the Batch API at `base`, authenticated with `key`.
    pub fn new(base: &str, key: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            key: key.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// A request to `path` (relative to `/v1`).
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    /// Sends `request`; an error status becomes [`ClientError::Api`] with the envelope's message.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response, ClientError> {
        let response = request.send().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            reason: root_cause(&e),
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = read_capped(response, MAX_ERROR_BODY).await;
        Err(api_error(status, &String::from_utf8_lossy(&body)))
    }

    /// Sends `request` and reads a JSON answer.
    pub async fn json(&self, request: RequestBuilder) -> Result<Value, ClientError> {
        self.send(request)
            .await?
            .json()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// `GET path` (relative to the base), as JSON.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.json(self.request(Method::GET, path)).await
    }
}

/// Most bytes of an error answer read: an envelope is small, and a proxy's HTML page or a hostile
/// server must not make the client hold whatever it sends.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The first `cap` bytes of `response`'s body (what arrived before a transport error included).
async fn read_capped(response: Response, cap: usize) -> Vec<u8> {
    use futures::StreamExt;
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        let room = cap - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() == cap {
            break;
        }
    }
    body
}

/// The one line an error answer becomes: the envelope's message, its code and param.
pub(super) fn api_error(status: StatusCode, body: &str) -> ClientError {
    let envelope: Option<Value> = serde_json::from_str(body).ok();
    let error = envelope.as_ref().and_then(|v| v.get("error"));
    let text = |field: &str| {
        error
            .and_then(|e| e.get(field))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let message = text("message").unwrap_or_else(|| {
        let snippet: String = body.chars().take(200).collect();
        if snippet.trim().is_empty() {
            status.canonical_reason().unwrap_or("error").to_owned()
        } else {
            snippet
        }
    });
    let mut detail = String::new();
    if let Some(code) = text("code") {
        detail.push_str(&format!(", code {code}"));
    }
    if let Some(param) = text("param") {
        detail.push_str(&format!(", param {param}"));
    }
    ClientError::Api {
        status: status.as_u16(),
        message,
        detail,
    }
}

fn root_cause(e: &reqwest::Error) -> String {
    let mut source: &dyn std::error::Error = e;
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_becomes_one_line_with_its_code_and_param() {
        let body = r#"{"error":{"message":"No such batch: batch_x","type":"invalid_request_error","param":"batch_id","code":"not_found"}}"#;
        let line = api_error(StatusCode::NOT_FOUND, body).to_string();
        assert_eq!(
            line,
            "No such batch: batch_x (HTTP 404, code not_found, param batch_id)"
        );
        let line = api_error(StatusCode::BAD_GATEWAY, "").to_string();
        assert_eq!(line, "Bad Gateway (HTTP 502)");
        assert!(!line.contains('\n'));
    }

    #[tokio::test]
    async fn an_error_body_is_read_only_up_to_its_cap() {
        let huge = vec![b'x'; 1024 * 1024];
        let answer = axum::http::Response::builder()
            .status(502)
            .body(reqwest::Body::from(huge))
            .unwrap();
        let body = read_capped(Response::from(answer), MAX_ERROR_BODY).await;
        assert_eq!(body.len(), MAX_ERROR_BODY);
        let small = axum::http::Response::new(reqwest::Body::from("short"));
        assert_eq!(
            read_capped(Response::from(small), MAX_ERROR_BODY).await,
            b"short"
        );
    }
}
