//! The streaming parser of a large inline body, run on a blocking thread: body chunks come in
//! over a channel, `requests` elements go out one input line each, and the small fields are
//! checked as they arrive, each value within its byte budget.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use serde_json::{Map, Value};

use super::request_line::{check_endpoint, request_line};
use crate::error::ApiError;
use crate::routes::batches::create::defaults::{DEFAULT_ENDPOINT, DEFAULT_WINDOW};
use crate::routes::batches::create::too_large::json_too_large;
use crate::routes::batches::params::{
    parse_completion_window, parse_metadata, parse_output_expiry,
};

/// Why the streaming parser stopped without a result.
pub(super) enum ParseStop {
    /// The line checker went away (it has its own verdict).
    LinesClosed,
    Failed(ApiError),
}

/// The batch fields of a streamed inline body, checked.
pub(super) struct InlineFields {
    pub(super) completion_window: String,
    pub(super) window: Duration,
    pub(super) metadata: Option<String>,
    pub(super) output_expires_after_secs: Option<i64>,
}

/// Settings of one streaming parse (moved onto the blocking thread).
pub(super) struct StreamParse {
    pub(super) limits: sluice_core::config::Limits,
    pub(super) bounds: (Duration, Duration),
}

/// Reads body chunks from the request task, counting the bytes of the value being parsed: a value
/// over its budget fails the read, so no single request (or other field) is held beyond it.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, ApiError>>,
    current: Bytes,
    shared: Rc<Shared>,
}

/// What the reader and the parser's visitors share on the parsing thread.
struct Shared {
    /// Bytes read since the current value began, and its budget.
    used: Cell<u64>,
    budget: Cell<u64>,
    /// The precise answer when a read failed (over budget, body error, too large).
    failure: RefCell<Option<ApiError>>,
    /// Request lines go here.
    lines: tokio::sync::mpsc::Sender<Result<Bytes, ApiError>>,
    lines_closed: Cell<bool>,
}

impl Shared {
    fn begin_value(&self, budget: u64) {
        self.used.set(0);
        self.budget.set(budget);
    }

    fn fail(&self, e: ApiError) -> std::io::Error {
        *self.failure.borrow_mut() = Some(e);
        std::io::Error::other("stopped")
    }

    /// Stops the parse with `e` as the answer (serde_json only sees an opaque error).
    fn stop<E: serde::de::Error>(&self, e: ApiError) -> E {
        *self.failure.borrow_mut() = Some(e);
        E::custom("stopped")
    }
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(self.shared.fail(e)),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        let used = self.shared.used.get() + n as u64;
        self.shared.used.set(used);
        if used > self.shared.budget.get() {
            let budget = self.shared.budget.get();
            return Err(self.shared.fail(ApiError::Coded {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: format!(
                    "A request (or another field) of the body is over its limit of {budget} bytes."
                ),
                param: Some("requests".into()),
                code: "request_too_large",
                errors: None,
            }));
        }
        Ok(n)
    }
}

impl StreamParse {
    pub(super) fn run(
        self,
        rx: tokio::sync::mpsc::Receiver<Result<Bytes, ApiError>>,
        lines: tokio::sync::mpsc::Sender<Result<Bytes, ApiError>>,
    ) -> Result<InlineFields, ParseStop> {
        let shared = Rc::new(Shared {
            used: Cell::new(0),
            budget: Cell::new(self.limits.max_json_body_bytes),
            failure: RefCell::new(None),
            lines,
            lines_closed: Cell::new(false),
        });
        let reader = ChannelReader {
            rx,
            current: Bytes::new(),
            shared: shared.clone(),
        };
        let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::new(reader));
        let visitor = TopVisitor {
            parse: &self,
            shared: &shared,
        };
        let result = serde::Deserializer::deserialize_map(&mut de, visitor).and_then(|fields| {
            de.end()?;
            Ok(fields)
        });
        let stop = match result {
            Ok(fields) => return Ok(fields),
            Err(e) => {
                if shared.lines_closed.get() {
                    ParseStop::LinesClosed
                } else if let Some(failure) = shared.failure.borrow_mut().take() {
                    ParseStop::Failed(failure)
                } else {
                    ParseStop::Failed(ApiError::bad_request(format!(
                        "We could not parse the JSON body of your request ({e}). The API \
                         expects a JSON object."
                    )))
                }
            }
        };
        // The checker must not take what it has as a whole body.
        let _sent = shared
            .lines
            .blocking_send(Err(ApiError::bad_request("The request body was refused.")));
        Err(stop)
    }
}

/// The top-level object: `requests` streamed, the small fields checked as they come.
struct TopVisitor<'p> {
    parse: &'p StreamParse,
    shared: &'p Rc<Shared>,
}

impl<'de> serde::de::Visitor<'de> for TopVisitor<'_> {
    type Value = InlineFields;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let limits = &self.parse.limits;
        let stop = |e: ApiError| Err(self.shared.stop(e));
        let mut endpoint: Option<String> = None;
        let mut requests = false;
        let mut window: Option<(String, Duration)> = None;
        let mut metadata = None;
        let mut expiry = None;
        loop {
            self.shared.begin_value(limits.max_json_body_bytes);
            let Some(key) = map.next_key::<String>()? else {
                break;
            };
            self.shared.begin_value(limits.max_json_body_bytes);
            match key.as_str() {
                "requests" if !requests => {
                    requests = true;
                    let endpoint = endpoint.get_or_insert_with(|| DEFAULT_ENDPOINT.to_owned());
                    let seed = RequestsSeed {
                        limits,
                        shared: self.shared,
                        endpoint,
                    };
                    map.next_value_seed(seed)?;
                }
                "endpoint" => {
                    let value: Value = map.next_value()?;
                    let e = match check_endpoint(Some(&value)) {
                        Ok(e) => e.to_owned(),
                        Err(e) => return stop(e),
                    };
                    if requests && endpoint.as_deref() != Some(e.as_str()) {
                        return stop(ApiError::invalid_value(
                            "endpoint",
                            "In a large inline body, 'endpoint' must come before 'requests'.",
                        ));
                    }
                    endpoint = Some(e);
                }
                "completion_window" => {
                    let value: Value = map.next_value()?;
                    let w = match value {
                        Value::Null => DEFAULT_WINDOW.to_owned(),
                        Value::String(w) => w,
                        other => {
                            return stop(ApiError::invalid_type(
                                "completion_window",
                                "a string",
                                &other,
                            ));
                        }
                    };
                    match parse_completion_window(&w, self.parse.bounds) {
                        Ok(d) => window = Some((w, d)),
                        Err(e) => return stop(e),
                    }
                }
                "metadata" => {
                    let value: Value = map.next_value()?;
                    match parse_metadata(Some(&value)) {
                        Ok(m) => metadata = m,
                        Err(e) => return stop(e),
                    }
                }
                "output_expires_after" => {
                    let value: Value = map.next_value()?;
                    match parse_output_expiry(Some(&value)) {
                        Ok(x) => expiry = x,
                        Err(e) => return stop(e),
                    }
                }
                "input_file_id" | "requests" => {
                    return stop(json_too_large(limits.max_json_body_bytes));
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        if !requests {
            return stop(json_too_large(limits.max_json_body_bytes));
        }
        let (completion_window, window) = match window {
            Some(w) => w,
            None => match parse_completion_window(DEFAULT_WINDOW, self.parse.bounds) {
                Ok(d) => (DEFAULT_WINDOW.to_owned(), d),
                Err(_) => (
                    format!("{}s", self.parse.bounds.1.as_secs()),
                    self.parse.bounds.1,
                ),
            },
        };
        Ok(InlineFields {
            completion_window,
            window,
            metadata,
            output_expires_after_secs: expiry,
        })
    }
}

/// The `requests` array, element by element.
struct RequestsSeed<'p> {
    limits: &'p sluice_core::config::Limits,
    shared: &'p Rc<Shared>,
    endpoint: &'p str,
}

impl<'de> serde::de::DeserializeSeed<'de> for RequestsSeed<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for RequestsSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of requests")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut i: u64 = 0;
        loop {
            // One element at most a line's size (the line adds a few bytes around the body).
            self.shared.begin_value(self.limits.max_line_bytes);
            let Some(raw) = seq.next_element::<Box<serde_json::value::RawValue>>()? else {
                break;
            };
            if i >= self.limits.max_lines {
                return Err(self.shared.stop(ApiError::invalid_value(
                    "requests",
                    format!(
                        "'requests' holds more than {max} requests; a batch may have at most \
                         {max}.",
                        max = self.limits.max_lines
                    ),
                )));
            }
            let item: Value = match serde_json::from_str(raw.get()) {
                Ok(v) => v,
                Err(e) => {
                    return Err(self.shared.stop(ApiError::invalid_value(
                        format!("requests[{i}]"),
                        format!("requests[{i}] could not be parsed: {e}"),
                    )));
                }
            };
            drop(raw);
            let line = match request_line(i as usize, &item, self.endpoint) {
                Ok(line) => line,
                Err(e) => return Err(self.shared.stop(e)),
            };
            let mut bytes = line.to_string().into_bytes();
            bytes.push(b'\n');
            if self
                .shared
                .lines
                .blocking_send(Ok(Bytes::from(bytes)))
                .is_err()
            {
                self.shared.lines_closed.set(true);
                return Err(serde::de::Error::custom("the line checker stopped"));
            }
            i += 1;
        }
        if i == 0 {
            return Err(self.shared.stop(ApiError::invalid_value(
                "requests",
                "'requests' must hold at least one request.",
            )));
        }
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(self.shared.stop(ApiError::invalid_type(
            "requests",
            "an array",
            &Value::Object(Map::new()),
        )))
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(self.shared.stop(ApiError::invalid_type(
            "requests",
            "an array",
            &Value::String(String::new()),
        )))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Err(self.shared.stop(ApiError::missing("requests")))
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Err(self.shared.stop(ApiError::invalid_type(
            "requests",
            "an array",
            &Value::Bool(v),
        )))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Err(self.shared.stop(ApiError::invalid_type(
            "requests",
            "an array",
            &Value::from(v),
        )))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Err(self.shared.stop(ApiError::invalid_type(
            "requests",
            "an array",
            &Value::from(v),
        )))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Err(self.shared.stop(ApiError::invalid_type(
            "requests",
            "an array",
            &Value::from(v),
        )))
    }
}
