//! Batch input lines and files, as tests write them.

use serde_json::{Value, json};

use crate::MODEL;

/// One chat-completions input line for the mock provider's model.
pub fn chat_line(custom_id: &str, text: &str) -> Value {
    model_chat_line(custom_id, MODEL, text)
}

/// One chat-completions input line for `model`.
pub fn model_chat_line(custom_id: &str, model: &str, text: &str) -> Value {
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}]},
    })
}

/// One chat line carrying mock-upstream fault instructions.
pub fn chat_line_with_mock(custom_id: &str, mock: Value) -> Value {
    let mut line = chat_line(custom_id, "hello");
    let mut mock = mock;
    mock["key"] = json!(custom_id);
    line["body"]["mock"] = mock;
    line
}

/// Joins lines into a JSONL document.
pub fn jsonl(lines: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

/// `n` chat lines with custom ids `req-0…`.
pub fn chat_lines(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| chat_line(&format!("req-{i}"), &format!("question {i}")))
        .collect()
}

/// The custom ids `req-0…` of [`chat_lines`]`(n)`.
pub fn req_ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("req-{i}")).collect()
}

/// The `custom_id` of each input line or result row, in order.
pub fn custom_ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["custom_id"].as_str().expect("custom_id").to_owned())
        .collect()
}
