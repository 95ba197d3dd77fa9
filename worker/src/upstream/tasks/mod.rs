//! Task models of the batch router: `extract`, `summarize` and `classify`.
//!
//! A task line's body names the task as its `model` and carries the task's fields instead of
//! `messages`. The worker renders the task's prompt template (overridable in `[tasks]`), calls the
//! backing model's chat completions through the ordinary routing, then parses and checks the
//! answer and returns a ChatCompletion-shaped body whose `choices[0].message.content` is the
//! JSON-serialized domain result:
//!
//! - `extract`: `[{"type", "text", "start", "end"}]`, spans in characters (Unicode scalar values,
//!   `end` exclusive) that really hold `text` in the input; computed from the entity text when the
//!   model gives none or wrong ones;
//! - `summarize`: `{"summary"}`;
//! - `classify`: `[{"name", "verdict": "yes" | "no"}]`, one per label, in the labels' order.
//!
//! An answer that does not parse or check out becomes an `invalid_task_output` error row for that
//! item only. A backing call the upstream refuses for good becomes a 502 row ("the upstream batch
//! router request failed"), since the client never named that model.
//!
//! This module builds the prompt and runs the call; `answer` parses and checks what comes back.

use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use sluice_core::config::TaskSettings;
use sluice_core::domain::task_model;
use sluice_core::domain::{Row, Usage};
use sluice_core::routing::{Route, TASK_ENDPOINT};

use super::client::{Attempt, Upstream, classify as classify_answer};

mod answer;
use answer::{parse_answer, wrap};

/// Start of the marker the system message of every task prompt carries: `[sluice-task:<task>]`.
/// The mock upstream recognises task prompts by it.
pub const MARKER_PREFIX: &str = "[sluice-task:";

/// Default prompt of `extract`.
pub(crate) const DEFAULT_EXTRACT_PROMPT: &str =
    "Extract every entity of the following types from the \
text. Each line gives an entity type, then what it means.
<entities>
{entities}
</entities>
Answer with a JSON array only, one object per entity in order of appearance: \
{\"type\": \"<entity type>\", \"text\": \"<the entity exactly as written in the text>\"}. \
Answer [] when there is none.
<instructions>
{instructions}
</instructions>
<text>
{text}
</text>";

/// Default prompt of `summarize`.
pub(crate) const DEFAULT_SUMMARIZE_PROMPT: &str = "Summarize the text.
<instructions>
{instructions}
</instructions>
Answer with a JSON object only: {\"summary\": \"<the summary>\"}.
<text>
{text}
</text>";

/// Default prompt of `classify`.
pub(crate) const DEFAULT_CLASSIFY_PROMPT: &str =
    "Decide for each label whether it applies to the text \
by answering its yes/no question. Each line gives a label name, then its question.
<labels>
{labels}
</labels>
<instructions>
{instructions}
</instructions>
Answer with a JSON array only, one object per label in the order given: \
{\"name\": \"<label name>\", \"verdict\": \"yes\" or \"no\"}.
<text>
{text}
</text>";

/// Tokens added to a summary's `max_tokens` for the JSON around it.
const JSON_OVERHEAD_TOKENS: u64 = 16;

/// Replaces `{name}` placeholders in one pass (values are never scanned again).
fn render(template: &str, values: &[(&str, &str)]) -> String {
    let mut out =
        String::with_capacity(template.len() + values.iter().map(|v| v.1.len()).sum::<usize>());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let hit = values
            .iter()
            .find(|(name, _)| after.starts_with(name) && after[name.len()..].starts_with('}'));
        match hit {
            Some((name, value)) => {
                out.push_str(value);
                rest = &after[name.len() + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The chat-completions request that runs `task` on `input` with the backing model.
pub fn build_request(
    task: &str,
    input: &Map<String, Value>,
    settings: &TaskSettings,
    upstream_model: &str,
) -> Value {
    let text = input
        .get("text")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let instructions = input
        .get("instructions")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let entities = input
        .get("entities")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default();
    let labels = input
        .get("labels")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .map(|l| {
                    format!(
                        "{}: {}",
                        l.get("name").and_then(Value::as_str).unwrap_or_default(),
                        l.get("rubric").and_then(Value::as_str).unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default();
    let (template, role) = match task {
        "extract" => (
            settings
                .extract_prompt
                .as_deref()
                .unwrap_or(DEFAULT_EXTRACT_PROMPT),
            "You are a precise information extraction engine.",
        ),
        "summarize" => (
            settings
                .summarize_prompt
                .as_deref()
                .unwrap_or(DEFAULT_SUMMARIZE_PROMPT),
            "You are a faithful summarizer.",
        ),
        _ => (
            settings
                .classify_prompt
                .as_deref()
                .unwrap_or(DEFAULT_CLASSIFY_PROMPT),
            "You are a careful text classifier.",
        ),
    };
    let prompt = render(
        template,
        &[
            ("text", text),
            ("instructions", instructions),
            ("entities", &entities),
            ("labels", &labels),
        ],
    );
    let mut request = json!({
        "model": upstream_model,
        "messages": [
            {"role": "system", "content": format!("{MARKER_PREFIX}{task}] {role} Answer with JSON only, no prose.")},
            {"role": "user", "content": prompt},
        ],
        "temperature": 0,
    });
    if task == "summarize"
        && let Some(max) = input.get("max_tokens").and_then(Value::as_u64)
    {
        request["max_tokens"] = json!(max + JSON_OVERHEAD_TOKENS);
    }
    request
}

/// Runs one task line: one backing call, then the answer's check. Retries follow the same policy
/// as any line (the caller loops on [`Attempt::Retry`]).
pub(crate) async fn attempt(
    upstream: &Upstream,
    task: &'static str,
    backing: &Route,
    custom_id: &str,
    body: &RawValue,
) -> Attempt {
    let input: Map<String, Value> = match serde_json::from_str(body.get()) {
        Ok(map) => map,
        Err(_) => {
            return Attempt::Done(
                Row::error(custom_id, "invalid_request", "body must be a JSON object."),
                Usage::default(),
            );
        }
    };
    // A batch may mix task models: the line's own model names its task.
    let task = input
        .get("model")
        .and_then(Value::as_str)
        .and_then(task_model)
        .unwrap_or(task);
    let request = build_request(
        task,
        &input,
        upstream.task_settings(),
        &backing.upstream_model,
    );
    let (status, headers, bytes) = match upstream
        .exchange(backing.provider, TASK_ENDPOINT, request.to_string())
        .await
    {
        Ok(answer) => answer,
        Err(failure) => return upstream.failure(custom_id, failure),
    };
    if !(200..300).contains(&status) {
        let detail = upstream_detail(status, &bytes);
        let row = bad_gateway(custom_id, &detail);
        return match classify_answer(custom_id, status, &headers, &bytes) {
            Attempt::Retry {
                reason,
                retry_after,
                ..
            } => Attempt::Retry {
                last: row,
                reason,
                retry_after,
            },
            Attempt::Done(..) => Attempt::Done(row, Usage::default()),
        };
    }
    let backing_body: Value = match serde_json::from_slice(&bytes) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return Attempt::Done(
                bad_gateway(custom_id, "its answer is not a JSON object"),
                Usage::default(),
            );
        }
    };
    let usage = Usage::from_body(&backing_body);
    let content = backing_body
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match parse_answer(task, &input, content) {
        Ok(result) => {
            let wrapped = wrap(task, &backing_body, &result);
            match classify_answer(custom_id, status, &headers, wrapped.to_string().as_bytes()) {
                Attempt::Done(row, _) => Attempt::Done(row, usage),
                other => other,
            }
        }
        Err(message) => Attempt::Done(
            Row::error(
                custom_id,
                "invalid_task_output",
                &format!("The '{task}' task could not use the model's answer: {message}"),
            ),
            usage,
        ),
    }
}

/// `HTTP 404 (model_not_found: The model … does not exist)` from an upstream error answer.
fn upstream_detail(status: u16, bytes: &[u8]) -> String {
    let parsed: Option<Value> = serde_json::from_slice(bytes).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let message = error
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(bytes).chars().take(200).collect());
    match error.and_then(|e| e.get("code")).and_then(Value::as_str) {
        Some(code) => format!("it answered HTTP {status} ({code}: {message})"),
        None => format!("it answered HTTP {status} ({message})"),
    }
}

/// A 502 row: the backing model's upstream could not serve the item.
fn bad_gateway(custom_id: &str, detail: &str) -> Row {
    let body = json!({"error": {
        "message": format!(
            "Upstream batch router request failed: the backing model's provider could not serve \
             this item ({detail})."
        ),
        "type": "upstream_error",
        "param": null,
        "code": "upstream_error",
    }});
    let raw = RawValue::from_string(body.to_string()).expect("a serialized Value is valid JSON");
    Row::response(
        custom_id,
        502,
        &format!("req_{}", uuid::Uuid::new_v4().simple()),
        &raw,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn templates_render_in_one_pass() {
        assert_eq!(
            render(
                "a {text} b {labels} {x}",
                &[("text", "{labels}"), ("labels", "L")]
            ),
            "a {labels} b L {x}"
        );
        let input = obj(
            json!({"text": "Hello", "labels": [{"name": "greeting", "rubric": "Is it a greeting?"}], "instructions": "Be strict."}),
        );
        let req = build_request("classify", &input, &TaskSettings::default(), "gpt");
        assert_eq!(req["model"], "gpt");
        let system = req["messages"][0]["content"].as_str().unwrap();
        assert!(system.starts_with("[sluice-task:classify]"), "{system}");
        let user = req["messages"][1]["content"].as_str().unwrap();
        assert!(
            user.contains("<labels>\ngreeting: Is it a greeting?\n</labels>"),
            "{user}"
        );
        assert!(user.contains("<text>\nHello\n</text>"), "{user}");
        assert!(user.contains("Be strict."), "{user}");
        let custom = TaskSettings {
            summarize_prompt: Some("Sum up: {text} ({instructions})".into()),
            ..TaskSettings::default()
        };
        let req = build_request(
            "summarize",
            &obj(json!({"text": "x", "max_tokens": 50})),
            &custom,
            "m",
        );
        assert_eq!(req["messages"][1]["content"], "Sum up: x ()");
        assert_eq!(req["max_tokens"], 66);
    }
}
