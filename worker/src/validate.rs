//! Checking every line of an input file before anything is enqueued.
//!
//! One error per bad line (the first problem found), every bad line reported, with OpenAI's codes
//! where OpenAI has one.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use sluice_shared::Settings;
use sluice_shared::domain::BatchError;
use sluice_shared::routing::{RouteError, resolve_target, task_model};

use crate::lines::{LineProbe, RequestLine};

/// The fields of a request body that validation looks at; the rest is skipped unparsed.
#[derive(Debug, Deserialize)]
struct BodyProbe<'a> {
    model: Option<Value>,
    stream: Option<Value>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    document: Option<&'a RawValue>,
    #[serde(borrow)]
    document_mime_type: Option<&'a RawValue>,
}

/// Why a line's model cannot run: the code and message of the line's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelProblem {
    pub code: &'static str,
    pub message: String,
}

/// The model check of a batch on `endpoint` under `settings`' routing (task models included).
pub fn check_model(settings: &Settings, model: &str, endpoint: &str) -> Result<(), ModelProblem> {
    match resolve_target(&settings.providers, &settings.tasks, model, endpoint) {
        Ok(_) => Ok(()),
        Err(RouteError::ModelNotFound { .. }) => Err(ModelProblem {
            code: "model_not_found",
            message: format!("The provided model '{model}' is not supported by the Batch API."),
        }),
        Err(e) => Err(ModelProblem {
            code: e.code(),
            message: e.to_string(),
        }),
    }
}

/// A model check: `Ok` when some provider runs the model for the batch.
pub type ModelCheck<'a> = dyn Fn(&str) -> Result<(), ModelProblem> + Sync + 'a;

/// Validation state across the lines of one file.
pub struct Validator<'a> {
    endpoint: &'a str,
    max_lines: u64,
    serves: &'a ModelCheck<'a>,
    seen: HashMap<String, u64>,
    model: Option<(String, u64)>,
    lines: u64,
    errors: Vec<BatchError>,
}

impl std::fmt::Debug for Validator<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator")
            .field("lines", &self.lines)
            .field("errors", &self.errors.len())
            .finish()
    }
}

fn err(code: &str, message: String, param: Option<&str>, line: Option<u64>) -> BatchError {
    BatchError {
        code: code.into(),
        message,
        param: param.map(Into::into),
        line,
    }
}

impl<'a> Validator<'a> {
    /// A validator for a batch on `endpoint`; `serves` tells whether some provider runs a model.
    pub fn new(endpoint: &'a str, max_lines: u64, serves: &'a ModelCheck<'a>) -> Self {
        Self {
            endpoint,
            max_lines,
            serves,
            seen: HashMap::new(),
            model: None,
            lines: 0,
            errors: Vec::new(),
        }
    }

    /// Checks one line, recording its error if it has one.
    pub fn check(&mut self, line: &RequestLine) {
        self.lines += 1;
        if let Err(e) = self.check_line(line) {
            self.errors.push(e);
        }
    }

    fn check_line(&mut self, line: &RequestLine) -> Result<(), BatchError> {
        let n = Some(line.number);
        if line.too_long {
            return Err(err(
                "line_too_long",
                "This line exceeds the maximum line size.".into(),
                None,
                n,
            ));
        }
        let probe = LineProbe::parse(&line.bytes).ok_or_else(|| {
            err(
                "invalid_json_line",
                "This line is not parseable as valid JSON.".into(),
                None,
                n,
            )
        })?;
        let missing = |p: &str| {
            err(
                "missing_required_parameter",
                format!("Missing required parameter: '{p}'."),
                Some(p),
                n,
            )
        };
        let custom_id_raw = probe.custom_id.ok_or_else(|| missing("custom_id"))?;
        let method = probe.method.ok_or_else(|| missing("method"))?;
        let url = probe.url.ok_or_else(|| missing("url"))?;
        let body = probe.body.ok_or_else(|| missing("body"))?;

        let custom_id: String = serde_json::from_str(custom_id_raw.get()).map_err(|_| {
            err(
                "invalid_request",
                "custom_id must be a string.".into(),
                Some("custom_id"),
                n,
            )
        })?;
        if serde_json::from_str::<String>(method.get()).ok().as_deref() != Some("POST") {
            return Err(err(
                "invalid_request",
                "Only 'POST' is supported for method.".into(),
                Some("method"),
                n,
            ));
        }
        if serde_json::from_str::<String>(url.get()).ok().as_deref() != Some(self.endpoint) {
            return Err(err(
                "invalid_url",
                "The URL provided for this request does not match the batch endpoint.".into(),
                Some("url"),
                n,
            ));
        }
        if !body.get().trim_start().starts_with('{') {
            return Err(err(
                "invalid_request",
                "body must be a JSON object.".into(),
                Some("body"),
                n,
            ));
        }
        let probe: BodyProbe<'_> = serde_json::from_str(body.get()).map_err(|_| {
            err(
                "invalid_request",
                "body must be a JSON object.".into(),
                Some("body"),
                n,
            )
        })?;
        if probe.stream.as_ref().and_then(Value::as_bool) == Some(true) {
            return Err(err(
                "streaming_unsupported",
                format!(
                    "{}: Streaming is not supported in the Batch API.",
                    endpoint_title(self.endpoint)
                ),
                Some("body.stream"),
                n,
            ));
        }
        let model = match probe.model {
            Some(Value::String(m)) if !m.is_empty() => m,
            _ => {
                return Err(err(
                    "invalid_request",
                    "Model parameter is required.".into(),
                    Some("body.model"),
                    n,
                ));
            }
        };
        // The model first: for a model that cannot run, its other fields do not matter.
        if let Err(problem) = (self.serves)(&model) {
            return Err(err(problem.code, problem.message, Some("body.model"), n));
        }
        if probe.document.is_some() || probe.document_mime_type.is_some() {
            let param = if probe.document.is_some() {
                "body.document"
            } else {
                "body.document_mime_type"
            };
            return Err(err(
                "unsupported_document",
                "Documents (document / document_mime_type) are not supported in batch requests. \
                 Pass pre-extracted text in the 'text' field."
                    .into(),
                Some(param),
                n,
            ));
        }
        if let Some(task) = task_model(&model) {
            let fields: serde_json::Map<String, Value> =
                serde_json::from_str(body.get()).map_err(|_| {
                    err(
                        "invalid_request",
                        "body must be a JSON object.".into(),
                        Some("body"),
                        n,
                    )
                })?;
            crate::tasks::check_body(task, &fields)
                .map_err(|(message, param)| err("invalid_request", message, Some(&param), n))?;
        } else if let Some(field) = required_body_field(self.endpoint) {
            let present = match field {
                "messages" => probe.messages.is_some(),
                "input" => probe.input.is_some(),
                _ => probe.prompt.is_some(),
            };
            if !present {
                let param = format!("body.{field}");
                return Err(err(
                    "invalid_request",
                    format!("Missing required parameter: '{field}'."),
                    Some(&param),
                    n,
                ));
            }
        }
        match &self.model {
            None => self.model = Some((model, line.number)),
            // Task models are one router: a batch may mix them (not with other models).
            Some((first, first_line))
                if *first != model
                    && !(task_model(first).is_some() && task_model(&model).is_some()) =>
            {
                return Err(err(
                    "model_mismatch",
                    format!(
                        "All requests in a batch must use the same model: this line uses '{model}', line {first_line} uses '{first}'."
                    ),
                    Some("body.model"),
                    n,
                ));
            }
            Some(_) => {}
        }
        if let Some(first) = self.seen.get(&custom_id) {
            return Err(err(
                "duplicate_custom_id",
                format!(
                    "The custom_id '{custom_id}' is already used on line {first}; each custom_id must be unique within a batch."
                ),
                Some("custom_id"),
                n,
            ));
        }
        self.seen.insert(custom_id, line.number);
        Ok(())
    }

    /// Every error found, plus the file-level ones (empty file, too many lines), and the model.
    pub fn finish(mut self) -> (Vec<BatchError>, u64, Option<String>) {
        if self.lines == 0 {
            self.errors.push(err(
                "empty_file",
                "The input file contains no requests.".into(),
                None,
                None,
            ));
        }
        if self.lines > self.max_lines {
            self.errors.push(err(
                "too_many_tasks",
                format!(
                    "The input file has {} requests; a batch may have at most {}.",
                    self.lines, self.max_lines
                ),
                None,
                None,
            ));
        }
        (self.errors, self.lines, self.model.map(|(m, _)| m))
    }
}

/// How OpenAI names an endpoint in its messages.
fn endpoint_title(endpoint: &str) -> &'static str {
    match endpoint {
        "/v1/chat/completions" => "Chat Completions",
        "/v1/embeddings" => "Embeddings",
        "/v1/completions" => "Completions",
        "/v1/responses" => "Responses",
        "/v1/moderations" => "Moderations",
        _ => "This endpoint",
    }
}

/// The body field each endpoint cannot do without.
fn required_body_field(endpoint: &str) -> Option<&'static str> {
    match endpoint {
        "/v1/chat/completions" => Some("messages"),
        "/v1/embeddings" | "/v1/moderations" | "/v1/responses" => Some("input"),
        "/v1/completions" => Some("prompt"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn line(n: u64, s: &str) -> RequestLine {
        RequestLine {
            index: n - 1,
            number: n,
            bytes: Bytes::copy_from_slice(s.as_bytes()),
            too_long: false,
        }
    }

    fn run(lines: &[&str]) -> (Vec<BatchError>, u64, Option<String>) {
        let serves = |m: &str| {
            if m == "unknown" {
                Err(ModelProblem {
                    code: "model_not_found",
                    message: "no".into(),
                })
            } else {
                Ok(())
            }
        };
        let mut v = Validator::new("/v1/chat/completions", 3, &serves);
        for (i, l) in lines.iter().enumerate() {
            v.check(&line(i as u64 + 1, l));
        }
        v.finish()
    }

    const OK: &str = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}"#;

    #[test]
    fn a_good_line_passes_and_names_the_model() {
        let (errors, lines, model) = run(&[OK]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!((lines, model.as_deref()), (1, Some("m")));
    }

    #[test]
    fn every_bad_line_gets_its_code() {
        let cases = [
            ("not json", "invalid_json_line", None),
            (
                r#"{"method":"POST","url":"/v1/chat/completions","body":{}}"#,
                "missing_required_parameter",
                Some("custom_id"),
            ),
            (
                r#"{"custom_id":"x","url":"/v1/chat/completions","body":{}}"#,
                "missing_required_parameter",
                Some("method"),
            ),
            (
                r#"{"custom_id":"x","method":"POST","body":{}}"#,
                "missing_required_parameter",
                Some("url"),
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions"}"#,
                "missing_required_parameter",
                Some("body"),
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/embeddings","body":{"model":"m"}}"#,
                "invalid_url",
                Some("url"),
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[],"stream":true}}"#,
                "streaming_unsupported",
                Some("body.stream"),
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"messages":[]}}"#,
                "invalid_request",
                Some("body.model"),
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"model":"unknown","messages":[]}}"#,
                "model_not_found",
                Some("body.model"),
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}"#,
                "invalid_request",
                Some("body.messages"),
            ),
            (
                r#"{"custom_id":"x","method":"GET","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}"#,
                "invalid_request",
                Some("method"),
            ),
        ];
        for (text, code, param) in cases {
            let (errors, _, _) = run(&[text]);
            assert_eq!(errors.len(), 1, "{text}: {errors:?}");
            assert_eq!(errors[0].code, code, "{text}");
            assert_eq!(errors[0].param.as_deref(), param, "{text}");
            assert_eq!(errors[0].line, Some(1));
        }
    }

    #[test]
    fn duplicates_second_models_and_limits_are_reported_with_lines() {
        let other = OK.replace("\"m\"", "\"m2\"").replace("\"a\"", "\"b\"");
        let (errors, lines, _) = run(&[OK, OK, &other, OK]);
        let codes: Vec<_> = errors.iter().map(|e| (e.code.as_str(), e.line)).collect();
        assert_eq!(
            codes,
            vec![
                ("duplicate_custom_id", Some(2)),
                ("model_mismatch", Some(3)),
                ("duplicate_custom_id", Some(4)),
                ("too_many_tasks", None)
            ]
        );
        assert_eq!(lines, 4);
    }

    #[test]
    fn an_empty_file_fails() {
        let (errors, _, _) = run(&[]);
        assert_eq!(errors[0].code, "empty_file");
    }
}
