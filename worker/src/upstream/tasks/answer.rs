//! Reading a task model's answer: parsing and checking it per task (spans, summaries, verdicts),
//! and wrapping the result as a ChatCompletion body.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

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
pub(crate) fn parse_answer(
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
pub(crate) fn wrap(task: &str, backing: &Value, result: &Value) -> Value {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
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
