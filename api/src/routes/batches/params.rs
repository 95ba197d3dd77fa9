//! The parameters of `POST /v1/batches`, checked as OpenAI checks them: endpoint, completion
//! window, metadata and output expiry, with OpenAI's error messages.

use std::time::Duration;

use serde_json::{Map, Value};
use sluice_core::domain::SUPPORTED_ENDPOINTS;
use sluice_core::schedule::Priority;
use sluice_core::validate::clip;

use crate::error::{ApiError, json_type_name};
use crate::routes::bounds::{ECHO_BYTES, EXPIRES_AFTER_SECS};

const MAX_METADATA_PAIRS: usize = 16;
const MAX_METADATA_KEY_CHARS: usize = 64;
const MAX_METADATA_VALUE_CHARS: usize = 512;

/// The validated parameters of `POST /v1/batches`.
#[derive(Debug, PartialEq)]
pub(crate) struct CreateBatch {
    pub(crate) input_file_id: String,
    pub(crate) endpoint: String,
    /// As the client wrote it; the batch object echoes it back.
    pub(crate) completion_window: String,
    pub(crate) window: Duration,
    /// Compact JSON of the metadata object, when one was given.
    pub(crate) metadata: Option<String>,
    pub(crate) output_expires_after_secs: Option<i64>,
    /// The `priority` create field (Sluice's own); unset, the `priority` metadata key decides.
    pub(crate) priority: Option<Priority>,
}

impl CreateBatch {
    /// Checks every parameter; unknown fields are ignored as OpenAI does.
    pub(crate) fn parse(body: &Value, (min, max): (Duration, Duration)) -> Result<Self, ApiError> {
        let Some(body) = body.as_object() else {
            return Err(ApiError::bad_request(format!(
                "Invalid type for the request body: expected an object, but got {} instead.",
                json_type_name(body)
            )));
        };
        let input_file_id = required_string(body, "input_file_id")?;
        let endpoint = required_string(body, "endpoint")?;
        if !SUPPORTED_ENDPOINTS.contains(&endpoint) {
            return Err(ApiError::invalid_value(
                "endpoint",
                format!(
                    "Invalid value: '{}'. Supported values are: {}.",
                    clip(endpoint, ECHO_BYTES),
                    quoted_list(SUPPORTED_ENDPOINTS)
                ),
            ));
        }
        let completion_window = required_string(body, "completion_window")?;
        let window = parse_completion_window(completion_window, (min, max))?;
        Ok(Self {
            input_file_id: input_file_id.to_owned(),
            endpoint: endpoint.to_owned(),
            completion_window: completion_window.to_owned(),
            window,
            metadata: parse_metadata(body.get("metadata"))?,
            output_expires_after_secs: parse_output_expiry(body.get("output_expires_after"))?,
            priority: match body.get("priority") {
                None | Some(Value::Null) => None,
                Some(value) => Some(parse_priority("priority", value)?),
            },
        })
    }

    /// The batch's tier: the `priority` field, else the `priority` metadata key, else `normal`.
    pub(crate) fn priority(&self) -> Priority {
        self.priority
            .or_else(|| {
                let metadata: Value = serde_json::from_str(self.metadata.as_deref()?).ok()?;
                Priority::parse(metadata.get(PRIORITY_KEY)?.as_str()?)
            })
            .unwrap_or(Priority::Normal)
    }
}

/// The metadata key that sets a batch's priority tier, for clients that cannot send extra fields.
const PRIORITY_KEY: &str = "priority";

fn parse_priority(param: &str, value: &Value) -> Result<Priority, ApiError> {
    let Some(text) = value.as_str() else {
        return Err(ApiError::invalid_type(param, "a string", value));
    };
    Priority::parse(text).ok_or_else(|| {
        ApiError::invalid_value(
            param,
            format!(
                "Invalid value: '{}'. Supported values are: {}.",
                clip(text, ECHO_BYTES),
                quoted_list(&Priority::ALL)
            ),
        )
    })
}

/// A `completion_window` within the configured bounds.
pub(crate) fn parse_completion_window(
    completion_window: &str,
    (min, max): (Duration, Duration),
) -> Result<Duration, ApiError> {
    sluice_core::config::parse_window(completion_window)
        .filter(|w| (min..=max).contains(w))
        .ok_or_else(|| {
            ApiError::invalid_value(
                "completion_window",
                format!(
                    "Invalid value: '{}'. Supported values are durations from {} to {}, such as \
                     '24h'.",
                    clip(completion_window, ECHO_BYTES),
                    human(min),
                    human(max)
                ),
            )
        })
}

fn required_string<'a>(body: &'a Map<String, Value>, name: &str) -> Result<&'a str, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Err(ApiError::missing(name)),
        Some(Value::String(s)) if s.is_empty() => Err(ApiError::InvalidRequest {
            message: format!(
                "Invalid '{name}': empty string. Expected a string with minimum length 1, but \
                 got an empty string instead."
            ),
            param: Some(name.to_owned()),
            code: Some("empty_string"),
        }),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(ApiError::invalid_type(name, "a string", other)),
    }
}

/// OpenAI's limits: at most 16 pairs, keys up to 64 characters, string values up to 512.
pub(crate) fn parse_metadata(value: Option<&Value>) -> Result<Option<String>, ApiError> {
    let map = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(map)) => map,
        Some(other) => return Err(ApiError::invalid_type("metadata", "an object", other)),
    };
    if map.len() > MAX_METADATA_PAIRS {
        return Err(ApiError::invalid_value(
            "metadata",
            format!(
                "Invalid 'metadata': too many properties. Expected an object with at most \
                 {MAX_METADATA_PAIRS} properties, but got an object with {} properties instead.",
                map.len()
            ),
        ));
    }
    for (key, value) in map {
        let param = format!("metadata.{key}");
        let key_chars = key.chars().count();
        if key_chars > MAX_METADATA_KEY_CHARS {
            return Err(ApiError::invalid_value(
                "metadata",
                format!(
                    "Invalid 'metadata': key too long. Expected keys with maximum length \
                     {MAX_METADATA_KEY_CHARS}, but got a key with length {key_chars} instead."
                ),
            ));
        }
        let Value::String(value) = value else {
            return Err(ApiError::invalid_type(&param, "a string", value));
        };
        let value_chars = value.chars().count();
        if value_chars > MAX_METADATA_VALUE_CHARS {
            return Err(ApiError::invalid_value(
                param.as_str(),
                format!(
                    "Invalid '{param}': string too long. Expected a string with maximum length \
                     {MAX_METADATA_VALUE_CHARS}, but got a string with length {value_chars} \
                     instead."
                ),
            ));
        }
        if key == PRIORITY_KEY {
            parse_priority(&param, &Value::String(value.clone()))?;
        }
    }
    Ok(Some(Value::Object(map.clone()).to_string()))
}

/// `output_expires_after`: `{anchor: "created_at", seconds}`; returns the seconds.
pub(crate) fn parse_output_expiry(value: Option<&Value>) -> Result<Option<i64>, ApiError> {
    const ANCHOR: &str = "output_expires_after.anchor";
    const SECONDS: &str = "output_expires_after.seconds";
    let map = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(ApiError::invalid_type(
                "output_expires_after",
                "an object",
                other,
            ));
        }
    };
    match map.get("anchor") {
        None | Some(Value::Null) => return Err(ApiError::missing(ANCHOR)),
        Some(Value::String(anchor)) if anchor == "created_at" => {}
        Some(Value::String(anchor)) => {
            return Err(ApiError::invalid_value(
                ANCHOR,
                format!("Invalid value: '{anchor}'. Supported values are: 'created_at'."),
            ));
        }
        Some(other) => return Err(ApiError::invalid_type(ANCHOR, "a string", other)),
    }
    let seconds = match map.get("seconds") {
        None | Some(Value::Null) => return Err(ApiError::missing(SECONDS)),
        // A u64 beyond i64 is simply out of range.
        Some(Value::Number(n)) if !n.is_f64() => n.as_i64().unwrap_or(i64::MAX),
        Some(other) => return Err(ApiError::invalid_type(SECONDS, "an integer", other)),
    };
    if !EXPIRES_AFTER_SECS.contains(&seconds) {
        return Err(ApiError::invalid_value(
            SECONDS,
            format!(
                "Invalid '{SECONDS}': integer out of range. Expected a value between {} and {}, \
                 but got {seconds} instead.",
                EXPIRES_AFTER_SECS.start(),
                EXPIRES_AFTER_SECS.end()
            ),
        ));
    }
    Ok(Some(seconds))
}

/// `'a', 'b', and 'c'`.
pub(crate) fn quoted_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("'{i}'")).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{}, and {last}", rest.join(", ")),
    }
}

/// A duration in its largest whole unit (`7d`, `60s`), as windows are written.
fn human(duration: Duration) -> String {
    let secs = duration.as_secs();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs >= size && secs.is_multiple_of(size) {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const BOUNDS: (Duration, Duration) = (Duration::from_secs(60), Duration::from_secs(7 * 86_400));

    fn valid() -> Value {
        json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    }

    fn with(field: &str, value: Value) -> Value {
        let mut body = valid();
        body[field] = value;
        body
    }

    fn error_of(body: &Value) -> (String, Option<String>, Option<&'static str>) {
        match CreateBatch::parse(body, BOUNDS).unwrap_err() {
            ApiError::InvalidRequest {
                message,
                param,
                code,
            } => (message, param, code),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_minimal_request_parses() {
        let parsed = CreateBatch::parse(&with("unknown", json!(1)), BOUNDS).unwrap();
        assert_eq!(parsed.window, Duration::from_secs(86_400));
        assert_eq!(parsed.completion_window, "24h");
        assert_eq!(parsed.metadata, None);
        assert_eq!(parsed.output_expires_after_secs, None);
    }

    #[test]
    fn missing_and_mistyped_parameters_are_named() {
        let mut body = valid();
        body.as_object_mut().unwrap().remove("input_file_id");
        let (_, param, code) = error_of(&body);
        assert_eq!(param.as_deref(), Some("input_file_id"));
        assert_eq!(code, Some("missing_required_parameter"));

        let (message, param, code) = error_of(&with("endpoint", json!(3)));
        assert_eq!(param.as_deref(), Some("endpoint"));
        assert_eq!(code, Some("invalid_type"));
        assert_eq!(
            message,
            "Invalid type for 'endpoint': expected a string, but got an integer instead."
        );
    }

    #[test]
    fn unsupported_endpoints_list_the_supported_ones() {
        let (message, param, code) = error_of(&with("endpoint", json!("/v1/invalid/endpoint")));
        assert_eq!(param.as_deref(), Some("endpoint"));
        assert_eq!(code, Some("invalid_value"));
        assert!(message.starts_with(
            "Invalid value: '/v1/invalid/endpoint'. Supported values are: '/v1/chat/completions', "
        ));
        assert!(message.ends_with(", and '/v1/moderations'."), "{message}");
    }

    #[test]
    fn completion_windows_outside_the_bounds_are_refused() {
        for window in ["59s", "8d", "24", "soon"] {
            let (message, param, _) = error_of(&with("completion_window", json!(window)));
            assert_eq!(param.as_deref(), Some("completion_window"));
            assert!(message.contains("from 1m to 7d"), "{message}");
        }
        let parsed = CreateBatch::parse(&with("completion_window", json!("7d")), BOUNDS).unwrap();
        assert_eq!(parsed.window, Duration::from_secs(7 * 86_400));
    }

    #[test]
    fn metadata_values_must_be_strings() {
        let (message, param, code) = error_of(&with("metadata", json!({"tags": ["a"]})));
        assert_eq!(
            message,
            "Invalid type for 'metadata.tags': expected a string, but got an array instead."
        );
        assert_eq!(param.as_deref(), Some("metadata.tags"));
        assert_eq!(code, Some("invalid_type"));
    }

    #[test]
    fn metadata_limits_are_enforced() {
        let many: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert_eq!(
            error_of(&with("metadata", Value::Object(many)))
                .1
                .as_deref(),
            Some("metadata")
        );
        let long_key = json!({"k".repeat(65): "v"});
        assert_eq!(
            error_of(&with("metadata", long_key)).1.as_deref(),
            Some("metadata")
        );
        let long_value = json!({"k": "v".repeat(513)});
        assert_eq!(
            error_of(&with("metadata", long_value)).1.as_deref(),
            Some("metadata.k")
        );

        let ok: Map<String, Value> = (0..16)
            .map(|i| (format!("k{i}"), json!("é".repeat(512))))
            .collect();
        let parsed = CreateBatch::parse(&with("metadata", Value::Object(ok)), BOUNDS).unwrap();
        let stored: Value = serde_json::from_str(&parsed.metadata.unwrap()).unwrap();
        assert_eq!(stored.as_object().unwrap().len(), 16);

        let parsed = CreateBatch::parse(&with("metadata", Value::Null), BOUNDS).unwrap();
        assert_eq!(parsed.metadata, None);
    }

    #[test]
    fn output_expiry_needs_the_created_at_anchor_and_a_bounded_integer() {
        let ok = with(
            "output_expires_after",
            json!({"anchor": "created_at", "seconds": 3600}),
        );
        assert_eq!(
            CreateBatch::parse(&ok, BOUNDS)
                .unwrap()
                .output_expires_after_secs,
            Some(3600)
        );

        let cases = [
            (
                json!({"anchor": "created_at", "seconds": 3599}),
                "output_expires_after.seconds",
                "invalid_value",
            ),
            (
                json!({"anchor": "created_at", "seconds": u64::MAX}),
                "output_expires_after.seconds",
                "invalid_value",
            ),
            (
                json!({"anchor": "created_at", "seconds": 3600.5}),
                "output_expires_after.seconds",
                "invalid_type",
            ),
            (
                json!({"anchor": "created_at"}),
                "output_expires_after.seconds",
                "missing_required_parameter",
            ),
            (
                json!({"anchor": "now", "seconds": 3600}),
                "output_expires_after.anchor",
                "invalid_value",
            ),
            (json!("soon"), "output_expires_after", "invalid_type"),
        ];
        for (value, want_param, want_code) in cases {
            let (_, param, code) = error_of(&with("output_expires_after", value));
            assert_eq!(param.as_deref(), Some(want_param));
            assert_eq!(code, Some(want_code));
        }
    }

    #[test]
    fn windows_print_in_their_largest_unit() {
        assert_eq!(human(Duration::from_secs(60)), "1m");
        assert_eq!(human(Duration::from_secs(90)), "90s");
        assert_eq!(human(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(human(Duration::from_secs(36 * 3_600)), "36h");
    }
}
