//! Checking every line of an input file before anything is enqueued.
//!
//! One error per bad line (the first problem found), with OpenAI's codes where OpenAI has one.
//! What a file can make us hold is bounded by configuration, not by the file: at most
//! `limits.max_reported_errors` errors are kept (then one `too_many_errors` entry counts the rest),
//! each message is cut to `limits.max_error_message_bytes`, and reading stops after
//! `limits.max_lines + 1` lines, when the file is known to be too long. Duplicate `custom_id`s are
//! found from a 128-bit keyed fingerprint of each id, not the id itself: about 30 bytes per line,
//! whatever the ids' length.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use crate::Settings;
use crate::config::Limits;
use crate::domain::BatchError;
use crate::domain::task_model;
use crate::routing::{RouteError, Target, resolve_target};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;
use serde_json::value::RawValue;

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
    /// Error code of the line.
    pub code: &'static str,
    /// Error message of the line.
    pub message: String,
}

/// The model check of a batch on `endpoint` under `settings`' routing (task models included):
/// the body fields the model's provider refuses (`providers[].refused_body_fields`), or why the
/// model cannot run.
pub fn check_model<'s>(
    settings: &'s Settings,
    model: &str,
    endpoint: &str,
) -> Result<&'s [String], ModelProblem> {
    match resolve_target(&settings.providers, &settings.tasks, model, endpoint) {
        Ok(Target::Model(route) | Target::Task { backing: route, .. }) => Ok(settings
            .providers
            .get(route.provider)
            .map_or(&[], |p| p.refused_body_fields.as_slice())),
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

/// A model check: `Ok` with the body fields its provider refuses when some provider runs the
/// model for the batch.
pub type ModelCheck<'a> = dyn Fn(&str) -> Result<&'a [String], ModelProblem> + Sync + 'a;

/// Longest model name a line may carry: it is stored on the batch and echoed in messages.
const MAX_MODEL_CHARS: usize = 256;
/// Longest `param` of a line error (task checks name nested fields).
const MAX_PARAM_BYTES: usize = 256;

/// `s` cut to at most `max` bytes at a character boundary, with `…` when something was cut, so
/// client text echoed in a message cannot make the message large.
pub fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let ellipsis = '…';
    let mut end = max.saturating_sub(ellipsis.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ellipsis}", &s[..end]).into()
}

/// Validation state across the lines of one file.
pub struct Validator<'a> {
    endpoint: &'a str,
    max_lines: u64,
    max_errors: usize,
    max_message: usize,
    /// Budget of listed message bytes, and what is used of it.
    max_listed_bytes: usize,
    listed_bytes: usize,
    max_custom_id: usize,
    serves: &'a ModelCheck<'a>,
    /// First line of each `custom_id`, by [`IdFingerprint`].
    seen: HashMap<u128, u64>,
    fingerprint: IdFingerprint,
    /// Whether a line naming another model than the first is an error (`model_mismatch`).
    one_model: bool,
    model: Option<(String, u64)>,
    /// Whether good lines name different models (only when `one_model` is off).
    mixed: bool,
    lines: u64,
    /// Bad lines among the first `max_lines`, listed or not.
    invalid: u64,
    errors: Vec<BatchError>,
}

/// What validation found once the file (or its first `max_lines + 1` lines) was read.
#[derive(Debug)]
pub struct Verdict {
    /// The errors to report: at most `max_reported_errors` line errors, then `too_many_errors`
    /// when more lines were bad, then the file-level ones (`empty_file`, `too_many_tasks`).
    pub errors: Vec<BatchError>,
    /// Request lines read (at most `max_lines + 1`).
    pub lines: u64,
    /// Bad lines among those read, listed or not.
    pub invalid: u64,
    /// The batch's model: the one its good lines name (the first one's for a mix of task
    /// models); `None` when they name different models, which only a batch allowed several
    /// models can do.
    pub model: Option<String>,
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
    /// A validator for a batch on `endpoint` under `limits`; `serves` tells whether some provider
    /// runs a model.
    pub fn new(endpoint: &'a str, limits: &Limits, serves: &'a ModelCheck<'a>) -> Self {
        let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        Self {
            endpoint,
            max_lines: limits.max_lines,
            max_errors: size(limits.max_reported_errors),
            max_message: size(limits.max_error_message_bytes),
            max_listed_bytes: size(limits.max_reported_error_bytes),
            listed_bytes: 0,
            max_custom_id: size(limits.max_custom_id_chars),
            serves,
            seen: HashMap::new(),
            fingerprint: IdFingerprint::default(),
            one_model: limits.one_model_per_batch,
            model: None,
            mixed: false,
            lines: 0,
            invalid: 0,
            errors: Vec::new(),
        }
    }

    /// Whether every line must name the same model; the default is `limits.one_model_per_batch`,
    /// which a tenant's own setting overrides ([`Settings::one_model_per_batch`]).
    pub fn one_model_per_batch(mut self, one_model: bool) -> Self {
        self.one_model = one_model;
        self
    }

    /// Checks one line, recording its error if it has one. A line past `max_lines` is only
    /// counted: the file is too long whatever it holds.
    pub fn check(&mut self, line: &RequestLine) {
        self.lines += 1;
        if self.lines > self.max_lines {
            return;
        }
        if let Err(mut e) = self.check_line(line) {
            self.invalid += 1;
            if self.errors.len() < self.max_errors && self.listed_bytes < self.max_listed_bytes {
                if e.message.len() > self.max_message {
                    e.message = clip(&e.message, self.max_message).into_owned();
                }
                if let Some(param) = e.param.as_mut().filter(|p| p.len() > MAX_PARAM_BYTES) {
                    *param = clip(param, MAX_PARAM_BYTES).into_owned();
                }
                self.listed_bytes += e.message.len() + e.param.as_ref().map_or(0, String::len);
                self.errors.push(e);
            }
        }
    }

    /// Whether reading on can change nothing: the file has more lines than a batch may hold.
    pub fn done(&self) -> bool {
        self.lines > self.max_lines
    }

    /// One line, checked in order; the first problem found is the line's error. Each step below
    /// is one item of the checklist, so the order of the calls is the order of the checks.
    fn check_line(&mut self, line: &RequestLine) -> Result<(), BatchError> {
        let n = Some(line.number);
        let envelope = envelope(line)?;
        let custom_id = self.custom_id(envelope.custom_id, n)?;
        check_method(envelope.method, n)?;
        self.check_url(envelope.url, n)?;
        let body = body_probe(envelope.body, n)?;
        self.check_not_streaming(&body, n)?;
        // The model first: for a model that cannot run, its other fields do not matter.
        let (model, refused) = self.model_of(&body, n)?;
        check_no_document(&body, n)?;
        check_refused_fields(envelope.body, refused, n)?;
        self.check_required_fields(&model, envelope.body, &body, n)?;
        self.note_model(model, line.number)?;
        self.note_custom_id(custom_id, line.number)
    }

    /// `custom_id`: a string, not too long.
    fn custom_id(&self, raw: &RawValue, n: Option<u64>) -> Result<String, BatchError> {
        let custom_id: String = serde_json::from_str(raw.get()).map_err(|_| {
            err(
                "invalid_request",
                "custom_id must be a string.".into(),
                Some("custom_id"),
                n,
            )
        })?;
        if custom_id.chars().count() > self.max_custom_id {
            return Err(err(
                "invalid_request",
                format!(
                    "custom_id is too long: at most {} characters are allowed.",
                    self.max_custom_id
                ),
                Some("custom_id"),
                n,
            ));
        }
        Ok(custom_id)
    }

    /// `url`: the batch's endpoint.
    fn check_url(&self, url: &RawValue, n: Option<u64>) -> Result<(), BatchError> {
        if serde_json::from_str::<String>(url.get()).ok().as_deref() != Some(self.endpoint) {
            return Err(err(
                "invalid_url",
                "The URL provided for this request does not match the batch endpoint.".into(),
                Some("url"),
                n,
            ));
        }
        Ok(())
    }

    /// `body.stream`: not `true` (a batch has nobody to stream to).
    fn check_not_streaming(&self, body: &BodyProbe<'_>, n: Option<u64>) -> Result<(), BatchError> {
        if body.stream.as_ref().and_then(Value::as_bool) == Some(true) {
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
        Ok(())
    }

    /// `body.model`: a non-empty string, not too long, that some provider serves; with the body
    /// fields that provider refuses.
    fn model_of(
        &self,
        body: &BodyProbe<'_>,
        n: Option<u64>,
    ) -> Result<(String, &'a [String]), BatchError> {
        let model = match &body.model {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            _ => {
                return Err(err(
                    "invalid_request",
                    "Model parameter is required.".into(),
                    Some("body.model"),
                    n,
                ));
            }
        };
        if model.chars().count() > MAX_MODEL_CHARS {
            return Err(err(
                "invalid_request",
                format!(
                    "The model name is too long: at most {MAX_MODEL_CHARS} characters are allowed."
                ),
                Some("body.model"),
                n,
            ));
        }
        match (self.serves)(&model) {
            Ok(refused) => Ok((model, refused)),
            Err(problem) => Err(err(problem.code, problem.message, Some("body.model"), n)),
        }
    }

    /// The fields the request cannot do without: a task model's own fields, else the endpoint's
    /// required field (`messages`, `input` or `prompt`).
    fn check_required_fields(
        &self,
        model: &str,
        raw_body: &RawValue,
        body: &BodyProbe<'_>,
        n: Option<u64>,
    ) -> Result<(), BatchError> {
        if let Some(task) = task_model(model) {
            let fields: serde_json::Map<String, Value> = serde_json::from_str(raw_body.get())
                .map_err(|_| {
                    err(
                        "invalid_request",
                        "body must be a JSON object.".into(),
                        Some("body"),
                        n,
                    )
                })?;
            crate::task_body::check_body(task, &fields)
                .map_err(|(message, param)| err("invalid_request", message, Some(&param), n))?;
        } else if let Some(field) = required_body_field(self.endpoint) {
            let present = match field {
                "messages" => body.messages.is_some(),
                "input" => body.input.is_some(),
                _ => body.prompt.is_some(),
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
        Ok(())
    }

    /// The batch's model so far: one model per batch (task models count as one), unless mixed
    /// models are allowed, in which case the batch is only marked mixed.
    fn note_model(&mut self, model: String, line: u64) -> Result<(), BatchError> {
        match &self.model {
            None => self.model = Some((model, line)),
            // Task models are one router: a batch may mix them (not with other models).
            Some((first, _))
                if *first != model
                    && !(task_model(first).is_some() && task_model(&model).is_some())
                    && !self.one_model =>
            {
                self.mixed = true;
            }
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
                    Some(line),
                ));
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// `custom_id`: unique within the batch (by fingerprint).
    fn note_custom_id(&mut self, custom_id: String, line: u64) -> Result<(), BatchError> {
        let id = self.fingerprint.of(&custom_id);
        if let Some(first) = self.seen.get(&id) {
            return Err(err(
                "duplicate_custom_id",
                format!(
                    "The custom_id '{custom_id}' is already used on line {first}; each custom_id must be unique within a batch."
                ),
                Some("custom_id"),
                Some(line),
            ));
        }
        self.seen.insert(id, line);
        Ok(())
    }

    /// The errors found (bounded), plus the file-level ones (empty file, too many lines), and
    /// the model.
    pub fn finish(mut self) -> Verdict {
        let listed = self.errors.len() as u64;
        if self.invalid > listed {
            let scope = if self.done() {
                format!(" among the first {}", self.max_lines)
            } else {
                String::new()
            };
            self.errors.push(err(
                "too_many_errors",
                format!(
                    "{} lines are invalid in all{scope}; only the first {listed} are listed. {} \
                     more lines are invalid.",
                    self.invalid,
                    self.invalid - listed
                ),
                None,
                None,
            ));
        }
        if self.lines == 0 {
            self.errors.push(err(
                "empty_file",
                "The input file contains no requests.".into(),
                None,
                None,
            ));
        }
        if self.done() {
            self.errors.push(err(
                "too_many_tasks",
                format!(
                    "The input file has more than {max} requests; a batch may have at most {max}.",
                    max = self.max_lines
                ),
                None,
                None,
            ));
        }
        Verdict {
            errors: self.errors,
            lines: self.lines,
            invalid: self.invalid,
            model: self.model.filter(|_| !self.mixed).map(|(m, _)| m),
        }
    }
}

/// The four fields of a request line, present but not yet checked.
struct Envelope<'a> {
    custom_id: &'a RawValue,
    method: &'a RawValue,
    url: &'a RawValue,
    body: &'a RawValue,
}

/// The line fits the size limit, is a JSON object, and has `custom_id`, `method`, `url` and
/// `body`.
fn envelope(line: &RequestLine) -> Result<Envelope<'_>, BatchError> {
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
    Ok(Envelope {
        custom_id: probe.custom_id.ok_or_else(|| missing("custom_id"))?,
        method: probe.method.ok_or_else(|| missing("method"))?,
        url: probe.url.ok_or_else(|| missing("url"))?,
        body: probe.body.ok_or_else(|| missing("body"))?,
    })
}

/// `method`: `POST`, the only one batches run.
fn check_method(method: &RawValue, n: Option<u64>) -> Result<(), BatchError> {
    if serde_json::from_str::<String>(method.get()).ok().as_deref() != Some("POST") {
        return Err(err(
            "invalid_request",
            "Only 'POST' is supported for method.".into(),
            Some("method"),
            n,
        ));
    }
    Ok(())
}

/// `body`: a JSON object, probed for the fields the checks read.
fn body_probe(body: &RawValue, n: Option<u64>) -> Result<BodyProbe<'_>, BatchError> {
    let not_an_object = || {
        err(
            "invalid_request",
            "body must be a JSON object.".into(),
            Some("body"),
            n,
        )
    };
    if !body.get().trim_start().starts_with('{') {
        return Err(not_an_object());
    }
    serde_json::from_str(body.get()).map_err(|_| not_an_object())
}

/// `body.document` / `body.document_mime_type`: absent (batches take pre-extracted text).
/// No top-level body field the model's provider refuses (`providers[].refused_body_fields`).
fn check_refused_fields(
    body: &RawValue,
    refused: &[String],
    n: Option<u64>,
) -> Result<(), BatchError> {
    if refused.is_empty() {
        return Ok(());
    }
    // Not an object: no top-level field to refuse (the other checks judge the body itself).
    let Ok(fields) = serde_json::from_str::<HashMap<String, IgnoredAny>>(body.get()) else {
        return Ok(());
    };
    match refused.iter().find(|f| fields.contains_key(f.as_str())) {
        Some(field) => {
            let param = format!("body.{field}");
            Err(err(
                "refused_body_field",
                format!(
                    "The request body sets '{}', which this server does not accept for this \
                     model's provider; remove it.",
                    clip(field, MAX_PARAM_BYTES)
                ),
                Some(&param),
                n,
            ))
        }
        None => Ok(()),
    }
}

fn check_no_document(body: &BodyProbe<'_>, n: Option<u64>) -> Result<(), BatchError> {
    if body.document.is_some() || body.document_mime_type.is_some() {
        let param = if body.document.is_some() {
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
    Ok(())
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

/// Two independently keyed SipHashes of a `custom_id`: 128 bits, so two different ids of one
/// file (at most `limits.max_lines`) share a fingerprint with a chance below 10⁻²⁶, and the keys
/// are random per file, so no file can be built to collide.
#[derive(Default)]
struct IdFingerprint(RandomState, RandomState);

impl IdFingerprint {
    fn of(&self, id: &str) -> u128 {
        (u128::from(self.0.hash_one(id)) << 64) | u128::from(self.1.hash_one(id))
    }
}

#[cfg(test)]
mod tests;
