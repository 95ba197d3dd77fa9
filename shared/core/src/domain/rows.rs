//! Result rows (one output or error line each) and the token usage an upstream answer reports.

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::new_request_id;

/// Token usage reported by one upstream response, in the batch object's terms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input (prompt) tokens.
    pub input: i64,
    /// Input tokens served from the cache.
    pub cached: i64,
    /// Output tokens.
    pub output: i64,
    /// Output tokens spent reasoning.
    pub reasoning: i64,
    /// All tokens.
    pub total: i64,
}

impl Usage {
    /// Reads `usage` from a chat/completions/embeddings (`prompt_tokens`…) or responses
    /// (`input_tokens`…) body; absent or odd values count as zero.
    pub fn from_body(body: &Value) -> Self {
        let Some(u) = body.get("usage") else {
            return Self::default();
        };
        let num = |v: Option<&Value>| v.and_then(Value::as_i64).filter(|n| *n >= 0).unwrap_or(0);
        let input = num(u.get("prompt_tokens").or_else(|| u.get("input_tokens")));
        let output = num(u
            .get("completion_tokens")
            .or_else(|| u.get("output_tokens")));
        let cached = num(u
            .get("prompt_tokens_details")
            .or_else(|| u.get("input_tokens_details"))
            .and_then(|d| d.get("cached_tokens")));
        let reasoning = num(u
            .get("completion_tokens_details")
            .or_else(|| u.get("output_tokens_details"))
            .and_then(|d| d.get("reasoning_tokens")));
        let total = match u.get("total_tokens").and_then(Value::as_i64) {
            Some(t) if t >= 0 => t,
            _ => input + output,
        };
        Self {
            input,
            cached,
            output,
            reasoning,
            total,
        }
    }
}

/// A finished line, ready for the output or the error file.
#[derive(Debug, Clone)]
pub struct Row {
    /// Whether the line belongs in the output file (an upstream 2xx).
    pub ok: bool,
    /// The JSONL line (no newline).
    pub line: String,
    /// The upstream HTTP status, when the upstream answered.
    pub status_code: Option<u16>,
}

impl Row {
    /// A line that got an HTTP answer from the upstream (`body` must be a JSON value).
    pub fn response(custom_id: &str, status_code: u16, request_id: &str, body: &RawValue) -> Self {
        #[derive(Serialize)]
        struct Response<'a> {
            status_code: u16,
            request_id: &'a str,
            body: &'a RawValue,
        }
        #[derive(Serialize)]
        struct Line<'a> {
            id: String,
            custom_id: &'a str,
            response: Response<'a>,
            error: Option<()>,
        }
        let line = serde_json::to_string(&Line {
            id: new_request_id(),
            custom_id,
            response: Response {
                status_code,
                request_id,
                body,
            },
            error: None,
        })
        .expect("serializing a row cannot fail");
        Self {
            ok: (200..300).contains(&status_code),
            line,
            status_code: Some(status_code),
        }
    }

    /// A line that failed without an HTTP answer (timeout, cancel, expiry, poison message…).
    pub fn error(custom_id: &str, code: &str, message: &str) -> Self {
        let line = json!({
            "id": new_request_id(),
            "custom_id": custom_id,
            "response": Value::Null,
            "error": {"code": code, "message": message},
        })
        .to_string();
        Self {
            ok: false,
            line,
            status_code: None,
        }
    }

    /// The stored form: the ok flag as one byte, then the line.
    pub fn encode(&self) -> String {
        let mut s = String::with_capacity(self.line.len() + 1);
        s.push(if self.ok { '1' } else { '0' });
        s.push_str(&self.line);
        s
    }

    /// Splits a stored row into (ok, line).
    pub fn decode(stored: &[u8]) -> Option<(bool, &[u8])> {
        let (flag, line) = stored.split_first()?;
        Some((*flag == b'1', line))
    }
}

/// The `{code, message}` (plus `status_code` when the upstream answered) describing why a failed
/// result line failed: its own `error` if it has one, else what the upstream's error body says,
/// else its HTTP status. Clients of APIs that put failures in the output file read this.
pub fn failure_of(line: &Value) -> Value {
    if let Some(e) = line.get("error").filter(|e| !e.is_null()) {
        return json!({
            "code": e.get("code").cloned().unwrap_or(Value::Null),
            "message": e.get("message").cloned().unwrap_or(Value::Null),
        });
    }
    let Some(response) = line.get("response").filter(|r| !r.is_null()) else {
        return json!({"code": "unknown_error", "message": "This request has no recorded result."});
    };
    let status = response.get("status_code").and_then(Value::as_u64);
    let upstream = response.pointer("/body/error");
    let text = |field: &str| {
        upstream
            .and_then(|e| e.get(field))
            .filter(|v| v.is_string())
            .cloned()
    };
    let code = text("code")
        .or_else(|| text("type"))
        .unwrap_or_else(|| json!("upstream_error"));
    let message = text("message").unwrap_or_else(|| {
        json!(format!(
            "The upstream answered HTTP {}.",
            status.unwrap_or_default()
        ))
    });
    json!({"code": code, "message": message, "status_code": status})
}

/// A work-queue message: consecutive lines of one batch (a few per message, so the broker and the
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_reads_both_shapes() {
        let chat = json!({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 1}}});
        assert_eq!(
            Usage::from_body(&chat),
            Usage {
                input: 3,
                cached: 1,
                output: 4,
                reasoning: 0,
                total: 7
            }
        );
        let responses = json!({"usage": {"input_tokens": 2, "output_tokens": 5,
            "output_tokens_details": {"reasoning_tokens": 2}}});
        assert_eq!(
            Usage::from_body(&responses),
            Usage {
                input: 2,
                cached: 0,
                output: 5,
                reasoning: 2,
                total: 7
            }
        );
        assert_eq!(
            Usage::from_body(&json!({"usage": {"prompt_tokens": -4}})),
            Usage::default()
        );
    }

    #[test]
    fn rows_round_trip_their_flag() {
        let body = RawValue::from_string("{\"x\":1}".into()).unwrap();
        let row = Row::response("a", 200, "req_1", &body);
        let stored = row.encode();
        let (ok, line) = Row::decode(stored.as_bytes()).unwrap();
        assert!(ok);
        let v: Value = serde_json::from_slice(line).unwrap();
        assert_eq!(v["response"]["body"]["x"], 1);
        assert!(v["error"].is_null());
        assert!(!Row::response("a", 429, "r", &body).ok);
    }
}
