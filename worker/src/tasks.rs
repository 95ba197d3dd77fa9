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

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use sluice_shared::config::TaskSettings;
use sluice_shared::domain::{Row, Usage};
use sluice_shared::routing::{Route, TASK_ENDPOINT, task_model};

use crate::upstream::{Attempt, Upstream, classify as classify_answer};

/// Start of the marker the system message of every task prompt carries: `[sluice-task:<task>]`.
/// The mock upstream recognises task prompts by it.
pub const MARKER_PREFIX: &str = "[sluice-task:";

/// Default prompt of `extract`.
pub const DEFAULT_EXTRACT_PROMPT: &str = "Extract every entity of the following types from the \
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
pub const DEFAULT_SUMMARIZE_PROMPT: &str = "Summarize the text.
<instructions>
{instructions}
</instructions>
Answer with a JSON object only: {\"summary\": \"<the summary>\"}.
<text>
{text}
</text>";

/// Default prompt of `classify`.
pub const DEFAULT_CLASSIFY_PROMPT: &str = "Decide for each label whether it applies to the text \
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

const DOCUMENT_REFUSED: &str = "Documents (document / document_mime_type) are not supported in \
batch requests. Pass pre-extracted text in the 'text' field.";

/// A problem with a task line's body: message and the parameter it is about.
pub type FieldError = (String, String);

fn field_error(param: &str, message: impl Into<String>) -> FieldError {
    (message.into(), format!("body.{param}"))
}

/// Checks the fields of a task line's body (the dispatcher and the API both call it).
pub fn check_body(task: &str, body: &Map<String, Value>) -> Result<(), FieldError> {
    for field in ["document", "document_mime_type"] {
        if body.contains_key(field) {
            return Err(field_error(field, DOCUMENT_REFUSED));
        }
    }
    match body.get("text") {
        Some(Value::String(t)) if !t.trim().is_empty() => {}
        Some(Value::String(_)) => return Err(field_error("text", "'text' must not be empty.")),
        Some(_) => return Err(field_error("text", "'text' must be a string.")),
        None => {
            return Err(field_error(
                "text",
                format!("Missing required parameter: 'text' (the input text of '{task}')."),
            ));
        }
    }
    match body.get("instructions") {
        None | Some(Value::Null | Value::String(_)) => {}
        Some(_) => {
            return Err(field_error(
                "instructions",
                "'instructions' must be a string.",
            ));
        }
    }
    match task {
        "extract" => match body.get("entities") {
            Some(Value::Object(map)) if !map.is_empty() => {
                if let Some((label, _)) = map.iter().find(|(k, v)| k.is_empty() || !v.is_string()) {
                    return Err(field_error(
                        "entities",
                        format!(
                            "'entities' maps entity labels to plain-English descriptions (strings); \
                             the label '{label}' does not."
                        ),
                    ));
                }
            }
            Some(Value::Object(_)) => {
                return Err(field_error("entities", "'entities' must not be empty."));
            }
            Some(_) => {
                return Err(field_error(
                    "entities",
                    "'entities' must be an object mapping entity labels to descriptions.",
                ));
            }
            None => {
                return Err(field_error(
                    "entities",
                    "Missing required parameter: 'entities'.",
                ));
            }
        },
        "summarize" => match body.get("max_tokens") {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n > 0) => {}
            Some(_) => {
                return Err(field_error(
                    "max_tokens",
                    "'max_tokens' must be a positive integer.",
                ));
            }
        },
        "classify" => {
            let Some(Value::Array(labels)) = body.get("labels") else {
                return Err(field_error(
                    "labels",
                    "'labels' must be an array of {\"name\", \"rubric\"} objects.",
                ));
            };
            if labels.is_empty() {
                return Err(field_error("labels", "'labels' must not be empty."));
            }
            let mut names = std::collections::HashSet::new();
            for (i, label) in labels.iter().enumerate() {
                let name = label
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let rubric = label.get("rubric").and_then(Value::as_str);
                if name.is_empty() || rubric.is_none() {
                    return Err(field_error(
                        &format!("labels[{i}]"),
                        "Each label must have a non-empty string 'name' and a string 'rubric'.",
                    ));
                }
                if !names.insert(name) {
                    return Err(field_error(
                        &format!("labels[{i}].name"),
                        format!("The label name '{name}' is used twice."),
                    ));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

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

/// The JSON in a model's answer, code fences removed.
fn answer_json(content: &str) -> Result<Value, String> {
    let mut s = content.trim();
    if let Some(inner) = s.strip_prefix("```") {
        let inner = inner.trim_start_matches(|c: char| c.is_ascii_alphanumeric());
        s = inner.strip_suffix("```").unwrap_or(inner).trim();
    }
    serde_json::from_str(s).map_err(|e| format!("The model's answer is not valid JSON ({e})."))
}

/// Parses and checks the model's answer to `task` on `input`; the domain result.
pub fn parse_answer(
    task: &str,
    input: &Map<String, Value>,
    content: &str,
) -> Result<Value, String> {
    let answer = answer_json(content)?;
    match task {
        "extract" => extract_result(input, answer),
        "summarize" => match answer {
            Value::Object(map) => match map.get("summary") {
                Some(Value::String(s)) if !s.trim().is_empty() => Ok(json!({"summary": s.trim()})),
                _ => Err("The model's answer has no non-empty 'summary' string.".into()),
            },
            _ => Err("The model's answer is not a JSON object with a 'summary'.".into()),
        },
        _ => classify_result(input, answer),
    }
}

fn extract_result(input: &Map<String, Value>, answer: Value) -> Result<Value, String> {
    let text = input
        .get("text")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let labels = input.get("entities").and_then(Value::as_object);
    let items = match answer {
        Value::Array(items) => items,
        Value::Object(mut map) => match map.remove("entities") {
            Some(Value::Array(items)) => items,
            _ => return Err("The model's answer is not a JSON array of entities.".into()),
        },
        _ => return Err("The model's answer is not a JSON array of entities.".into()),
    };
    // Byte offset where the previous entity ended: repeated mentions map to successive spans.
    let mut cursor = 0usize;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let kind = item.get("type").and_then(Value::as_str).unwrap_or_default();
        let found = item.get("text").and_then(Value::as_str).unwrap_or_default();
        if kind.is_empty() || found.is_empty() {
            return Err("Every entity needs a non-empty 'type' and 'text'.".into());
        }
        if labels.is_some_and(|l| !l.contains_key(kind)) {
            return Err(format!(
                "The model returned the entity type '{kind}', which was not asked for."
            ));
        }
        let given = match (
            item.get("start").and_then(Value::as_u64),
            item.get("end").and_then(Value::as_u64),
        ) {
            (Some(s), Some(e)) => char_span_bytes(text, s as usize, e as usize)
                .filter(|(bs, be)| &text[*bs..*be] == found),
            _ => None,
        };
        let (bs, be) = match given.or_else(|| locate(text, found, cursor)) {
            Some(span) => span,
            None => {
                return Err(format!(
                    "The entity '{found}' returned by the model does not occur in the text."
                ));
            }
        };
        cursor = be;
        let start = text[..bs].chars().count();
        let end = start + text[bs..be].chars().count();
        out.push(json!({"type": kind, "text": &text[bs..be], "start": start, "end": end}));
    }
    Ok(Value::Array(out))
}

/// Byte range of the character range `start..end`, if it lies inside `text`.
fn char_span_bytes(text: &str, start: usize, end: usize) -> Option<(usize, usize)> {
    if start >= end {
        return None;
    }
    let mut indices = text.char_indices().map(|(i, _)| i).chain([text.len()]);
    let bs = indices.nth(start)?;
    let be = indices.nth(end - start - 1)?;
    Some((bs, be))
}

/// Byte range of `needle` in `text`: first at or after `from`, else anywhere, else ignoring ASCII case.
fn locate(text: &str, needle: &str, from: usize) -> Option<(usize, usize)> {
    let exact = text
        .get(from..)
        .and_then(|t| t.find(needle).map(|i| i + from))
        .or_else(|| text.find(needle));
    let start = exact.or_else(|| {
        let hay = text.to_ascii_lowercase();
        let needle = needle.to_ascii_lowercase();
        hay.get(from..)
            .and_then(|t| t.find(&needle).map(|i| i + from))
            .or_else(|| hay.find(&needle))
    })?;
    let end = start + needle.len();
    text.get(start..end).map(|_| (start, end))
}

fn classify_result(input: &Map<String, Value>, answer: Value) -> Result<Value, String> {
    let labels: Vec<&str> = input
        .get("labels")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(|l| l.get("name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    let mut verdicts: Map<String, Value> = Map::new();
    let entries: Vec<(String, Value)> = match answer {
        Value::Array(items) => items
            .into_iter()
            .map(|i| {
                let name = i
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                (name, i.get("verdict").cloned().unwrap_or(Value::Null))
            })
            .collect(),
        Value::Object(mut map) => {
            match ["labels", "results", "classifications"]
                .iter()
                .find_map(|k| map.remove(*k))
            {
                Some(inner) => return classify_result(input, inner),
                None => map.into_iter().collect(),
            }
        }
        _ => return Err("The model's answer is not a JSON array of verdicts.".into()),
    };
    for (name, verdict) in entries {
        if !labels.contains(&name.as_str()) {
            return Err(format!(
                "The model returned a verdict for '{name}', which is not a label."
            ));
        }
        let verdict = match verdict {
            Value::Bool(b) => b,
            Value::String(s) => {
                match s.trim().trim_end_matches('.').to_ascii_lowercase().as_str() {
                    "yes" | "true" => true,
                    "no" | "false" => false,
                    _ => return Err(format!("The verdict for '{name}' is '{s}', not yes or no.")),
                }
            }
            other => {
                return Err(format!(
                    "The verdict for '{name}' is {other}, not yes or no."
                ));
            }
        };
        verdicts
            .entry(name)
            .or_insert(json!(if verdict { "yes" } else { "no" }));
    }
    let mut out = Vec::with_capacity(labels.len());
    for name in labels {
        let Some(verdict) = verdicts.remove(name) else {
            return Err(format!("The model gave no verdict for the label '{name}'."));
        };
        out.push(json!({"name": name, "verdict": verdict}));
    }
    Ok(Value::Array(out))
}

/// The ChatCompletion-shaped body of a task result.
pub fn wrap(task: &str, backing: &Value, result: &Value) -> Value {
    let created = backing
        .get("created")
        .and_then(Value::as_u64)
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default()
        });
    json!({
        "id": backing.get("id").and_then(Value::as_str).map_or_else(
            || format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
            str::to_owned,
        ),
        "object": "chat.completion",
        "created": created,
        "model": task,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": result.to_string(), "refusal": null},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": backing.get("usage").cloned().unwrap_or(Value::Null),
    })
}

/// Runs one task line: one backing call, then the answer's check. Retries follow the same policy
/// as any line (the caller loops on [`Attempt::Retry`]).
pub async fn attempt(
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
    fn bodies_need_their_task_fields_and_no_documents() {
        let ok =
            obj(json!({"model": "extract", "text": "Ada", "entities": {"person": "a person"}}));
        assert!(check_body("extract", &ok).is_ok());
        let cases = [
            ("extract", json!({"entities": {"p": "x"}}), "body.text"),
            ("extract", json!({"text": "a"}), "body.entities"),
            (
                "extract",
                json!({"text": "a", "entities": {}}),
                "body.entities",
            ),
            (
                "extract",
                json!({"text": "a", "entities": {"p": 1}}),
                "body.entities",
            ),
            ("summarize", json!({"text": 3}), "body.text"),
            (
                "summarize",
                json!({"text": "a", "max_tokens": 0}),
                "body.max_tokens",
            ),
            (
                "summarize",
                json!({"text": "a", "document": "JVBER"}),
                "body.document",
            ),
            (
                "classify",
                json!({"text": "a", "labels": []}),
                "body.labels",
            ),
            (
                "classify",
                json!({"text": "a", "labels": [{"name": "x"}]}),
                "body.labels[0]",
            ),
            (
                "classify",
                json!({"text": "a", "labels": [{"name": "x", "rubric": "?"}, {"name": "x", "rubric": "?"}]}),
                "body.labels[1].name",
            ),
        ];
        for (task, body, param) in cases {
            let err = check_body(task, &obj(body.clone())).unwrap_err();
            assert_eq!(err.1, param, "{task} {body}: {err:?}");
        }
        let err = check_body(
            "summarize",
            &obj(json!({"text": "a", "document_mime_type": "application/pdf"})),
        )
        .unwrap_err();
        assert!(err.0.contains("pre-extracted text"), "{err:?}");
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

    #[test]
    fn extraction_spans_are_computed_and_checked() {
        let input = obj(json!({"text": "Zoë met Ada. Ada met Bob.", "entities": {"person": "p"}}));
        let got = parse_answer(
            "extract",
            &input,
            "```json\n[{\"type\":\"person\",\"text\":\"Ada\"},{\"type\":\"person\",\"text\":\"Ada\"},{\"type\":\"person\",\"text\":\"Zoë\",\"start\":0,\"end\":3}]\n```",
        )
        .unwrap();
        assert_eq!(
            got,
            json!([
                {"type": "person", "text": "Ada", "start": 8, "end": 11},
                {"type": "person", "text": "Ada", "start": 13, "end": 16},
                {"type": "person", "text": "Zoë", "start": 0, "end": 3},
            ])
        );
        // Wrong spans are recomputed; case differences keep the text's own casing.
        let got = parse_answer(
            "extract",
            &input,
            r#"{"entities":[{"type":"person","text":"bob","start":1,"end":2}]}"#,
        )
        .unwrap();
        assert_eq!(
            got,
            json!([{"type": "person", "text": "Bob", "start": 21, "end": 24}])
        );
        for bad in [
            r#"[{"type":"person","text":"Eve"}]"#,
            r#"[{"type":"place","text":"Ada"}]"#,
            r#"[{"text":"Ada"}]"#,
            "Ada is a person.",
            r#"{"summary":"x"}"#,
        ] {
            assert!(parse_answer("extract", &input, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn summaries_and_verdicts_are_checked() {
        let input = obj(
            json!({"text": "t", "labels": [{"name": "a", "rubric": "?"}, {"name": "b", "rubric": "?"}]}),
        );
        assert_eq!(
            parse_answer("summarize", &input, r#"{"summary":" short "}"#).unwrap(),
            json!({"summary": "short"})
        );
        assert!(parse_answer("summarize", &input, "short").is_err());
        assert!(parse_answer("summarize", &input, r#"{"summary":""}"#).is_err());
        assert_eq!(
            parse_answer(
                "classify",
                &input,
                r#"[{"name":"b","verdict":"No."},{"name":"a","verdict":true}]"#
            )
            .unwrap(),
            json!([{"name": "a", "verdict": "yes"}, {"name": "b", "verdict": "no"}])
        );
        assert_eq!(
            parse_answer("classify", &input, r#"{"a":"yes","b":"no"}"#).unwrap(),
            json!([{"name": "a", "verdict": "yes"}, {"name": "b", "verdict": "no"}])
        );
        for bad in [
            r#"[{"name":"a","verdict":"yes"}]"#,
            r#"[{"name":"a","verdict":"maybe"},{"name":"b","verdict":"no"}]"#,
            r#"[{"name":"a","verdict":"yes"},{"name":"b","verdict":"no"},{"name":"c","verdict":"no"}]"#,
        ] {
            assert!(parse_answer("classify", &input, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn results_are_wrapped_as_chat_completions() {
        let backing = json!({"id": "chatcmpl-1", "created": 5, "model": "gpt", "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}});
        let body = wrap("summarize", &backing, &json!({"summary": "s"}));
        assert_eq!(body["model"], "summarize");
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["usage"]["total_tokens"], 5);
        let content: Value =
            serde_json::from_str(body["choices"][0]["message"]["content"].as_str().unwrap())
                .unwrap();
        assert_eq!(content, json!({"summary": "s"}));
    }
}
