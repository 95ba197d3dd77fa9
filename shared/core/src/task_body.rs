//! Checking the body of a task-model line (`extract`, `summarize`, `classify`): the dispatcher
//! and the API both refuse a bad one before anything runs.

use serde_json::{Map, Value};

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
