//! The mock's answers: deterministic functions of the request, shaped like OpenAI's.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use super::{DEFAULT_EMBEDDING_DIMS, ECHO_MAX_CHARS, MAX_EMBEDDING_DIMS, MOCK_MODEL};

pub(super) fn chat_answer(body: &Map<String, Value>) -> Value {
    let messages: &[Value] = body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let prompt_tokens = messages
        .iter()
        .map(|m| words(&content_text(m.get("content"))))
        .sum::<u64>()
        .max(1);
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .or(messages.last());
    let answer = crate::mock_tasks::task_answer(messages, |m| content_text(m.get("content")))
        .unwrap_or_else(|| echo(&content_text(last_user.and_then(|m| m.get("content")))));
    let completion_tokens = words(&answer);
    json!({
        "id": format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "chat.completion",
        "created": unix_secs(),
        "model": model_of(body),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer, "refusal": null},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": usage(prompt_tokens, completion_tokens),
        "system_fingerprint": "fp_mock",
    })
}

pub(super) fn completion_answer(body: &Map<String, Value>) -> Value {
    let mut prompts = input_texts(body.get("prompt"));
    if prompts.is_empty() {
        prompts.push(String::new());
    }
    let prompt_tokens = prompts.iter().map(|p| words(p)).sum::<u64>().max(1);
    let mut completion_tokens = 0;
    let choices: Vec<Value> = prompts
        .iter()
        .enumerate()
        .map(|(index, p)| {
            let text = echo(p);
            completion_tokens += words(&text);
            json!({"text": text, "index": index, "logprobs": null, "finish_reason": "stop"})
        })
        .collect();
    json!({
        "id": format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "text_completion",
        "created": unix_secs(),
        "model": model_of(body),
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    })
}

pub(super) fn embedding_answer(body: &Map<String, Value>) -> Value {
    let inputs = input_texts(body.get("input"));
    let dims = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .and_then(|d| usize::try_from(d).ok())
        .filter(|d| *d > 0)
        .map_or(DEFAULT_EMBEDDING_DIMS, |d| d.min(MAX_EMBEDDING_DIMS));
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let v = embed(text, dims);
            let embedding = if base64 {
                // Same wire format as OpenAI: little-endian f32s, base64.
                let raw: Vec<u8> = v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect();
                Value::String(base64_encode(&raw))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens = inputs.iter().map(|t| words(t)).sum::<u64>().max(1);
    json!({
        "object": "list",
        "data": data,
        "model": model_of(body),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
}

pub(super) fn responses_answer(body: &Map<String, Value>) -> Value {
    let instructions = body.get("instructions").and_then(Value::as_str);
    let (input_words, last_user) = match body.get("input") {
        Some(Value::String(s)) => (words(s), s.clone()),
        Some(Value::Array(items)) => {
            let total = items
                .iter()
                .map(|i| words(&content_text(i.get("content"))))
                .sum::<u64>();
            let last = items
                .iter()
                .rev()
                .find(|i| i.get("role").and_then(Value::as_str) == Some("user"))
                .or(items.last())
                .map(|i| content_text(i.get("content")))
                .unwrap_or_default();
            (total, last)
        }
        _ => (0, String::new()),
    };
    let input_tokens = (input_words + instructions.map_or(0, words)).max(1);
    let answer = echo(&last_user);
    let output_tokens = words(&answer);
    json!({
        "id": format!("resp_{}", uuid::Uuid::new_v4().simple()),
        "object": "response",
        "created_at": unix_secs(),
        "status": "completed",
        "error": null,
        "incomplete_details": null,
        "instructions": instructions,
        "model": model_of(body),
        "output": [{
            "type": "message",
            "id": format!("msg_{}", uuid::Uuid::new_v4().simple()),
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": answer, "annotations": []}],
        }],
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        },
    })
}

pub(super) fn moderation_answer(body: &Map<String, Value>) -> Value {
    const CATEGORIES: [&str; 13] = [
        "harassment",
        "harassment/threatening",
        "hate",
        "hate/threatening",
        "illicit",
        "illicit/violent",
        "self-harm",
        "self-harm/intent",
        "self-harm/instructions",
        "sexual",
        "sexual/minors",
        "violence",
        "violence/graphic",
    ];
    let categories: Map<String, Value> = CATEGORIES
        .iter()
        .map(|c| ((*c).to_owned(), json!(false)))
        .collect();
    let scores: Map<String, Value> = CATEGORIES
        .iter()
        .map(|c| ((*c).to_owned(), json!(0.0)))
        .collect();
    let count = input_texts(body.get("input")).len().max(1);
    let result = json!({"flagged": false, "categories": categories, "category_scores": scores});
    json!({
        "id": format!("modr-{}", uuid::Uuid::new_v4().simple()),
        "model": body.get("model").and_then(Value::as_str).unwrap_or("omni-moderation-latest"),
        "results": vec![result; count],
    })
}

pub(super) fn model_of(body: &Map<String, Value>) -> &str {
    body.get("model")
        .and_then(Value::as_str)
        .unwrap_or(MOCK_MODEL)
}

pub(super) fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

pub(super) fn echo(text: &str) -> String {
    let truncated: String = text.chars().take(ECHO_MAX_CHARS).collect();
    format!("echo: {truncated}")
}

/// Rough token count: whitespace-separated words.
pub(super) fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Text of a message `content`: a string, or the `text` of its parts
/// (chat `{"type":"text"}`, responses `{"type":"input_text"}`).
pub(super) fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The inputs of `prompt` / `input`: a string, an array of strings, a token
/// array (one input), an array of token arrays, or an array of multimodal
/// parts (one input).
pub(super) fn input_texts(value: Option<&Value>) -> Vec<String> {
    fn tokens(items: &[Value]) -> String {
        items
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    }
    match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.is_empty() => Vec::new(),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => vec![tokens(items)],
        Some(Value::Array(items)) if items.iter().all(Value::is_object) => {
            vec![content_text(value)]
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => s.clone(),
                Value::Array(toks) => tokens(toks),
                other => other.to_string(),
            })
            .collect(),
        Some(other) => vec![other.to_string()],
    }
}

/// A deterministic unit vector derived from `text` (FNV-1a seed expanded
/// with splitmix64). Stable across Rust versions, unlike `DefaultHasher`.
pub(super) fn embed(text: &str, dims: usize) -> Vec<f64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut v: Vec<f64> = (0..dims as u64)
        .map(|i| {
            let mut z = h.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // Top 53 bits → [0, 1) → [-1, 1).
            (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// Standard padded base64; small enough not to warrant a dependency.
pub(super) fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub(super) fn unix_ms() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}
