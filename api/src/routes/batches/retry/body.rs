//! The body of a retry: which rows, and the child's window and metadata.

use std::time::Duration;

use serde_json::{Map, Value};
use sluice_core::validate::clip;

use super::choice::{Choice, STATUSES};
use crate::error::ApiError;
use crate::extract::parse_json;
use crate::routes::batches::params::{parse_completion_window, parse_metadata, quoted_list};
use crate::routes::bounds::ECHO_BYTES;

/// Most entries of `codes`, and the longest one.
const MAX_CODES: usize = 64;
const MAX_CODE_CHARS: usize = 128;

/// The checked body of a retry.
#[derive(Debug, PartialEq)]
pub(super) struct RetryParams {
    pub(super) choice: Choice,
    /// As written and parsed; the parent's when absent.
    pub(super) completion_window: Option<(String, Duration)>,
    /// `None`: the parent's; `Some(None)`: none (`"metadata": null`).
    pub(super) metadata: Option<Option<String>>,
}

impl RetryParams {
    /// An empty body takes every failed, expired and cancelled row, with the parent's window and
    /// metadata. Unknown fields are ignored, as OpenAI does.
    pub(super) fn parse(body: &[u8], bounds: (Duration, Duration)) -> Result<Self, ApiError> {
        let empty = Map::new();
        let value;
        let map = if body.iter().all(u8::is_ascii_whitespace) {
            &empty
        } else {
            value = parse_json(body)?;
            value.as_object().ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Invalid type for the request body: expected an object, but got {} instead.",
                    crate::error::json_type_name(&value)
                ))
            })?
        };
        let statuses = match string_list(map, "statuses", STATUSES.len())? {
            None => STATUSES.to_vec(),
            Some(names) => {
                let mut chosen = Vec::new();
                for name in &names {
                    let Some(known) = STATUSES.iter().find(|s| *s == name) else {
                        return Err(ApiError::invalid_value(
                            "statuses",
                            format!(
                                "Invalid value in 'statuses': '{}'. Supported values are: {}.",
                                clip(name, ECHO_BYTES),
                                quoted_list(&STATUSES)
                            ),
                        ));
                    };
                    if !chosen.contains(known) {
                        chosen.push(*known);
                    }
                }
                chosen
            }
        };
        let codes = string_list(map, "codes", MAX_CODES)?;
        if let Some(long) = codes
            .iter()
            .flatten()
            .find(|c| c.chars().count() > MAX_CODE_CHARS)
        {
            return Err(ApiError::invalid_value(
                "codes",
                format!(
                    "Invalid 'codes': '{}…' is longer than {MAX_CODE_CHARS} characters.",
                    clip(long, 32)
                ),
            ));
        }
        let completion_window = match map.get("completion_window") {
            None | Some(Value::Null) => None,
            Some(Value::String(w)) => Some((w.clone(), parse_completion_window(w, bounds)?)),
            Some(other) => {
                return Err(ApiError::invalid_type(
                    "completion_window",
                    "a string",
                    other,
                ));
            }
        };
        let metadata = match map.get("metadata") {
            None => None,
            given => Some(parse_metadata(given)?),
        };
        Ok(Self {
            choice: Choice {
                statuses,
                codes: codes.map(|c| c.into_iter().collect()),
            },
            completion_window,
            metadata,
        })
    }
}

/// An optional, non-empty array of at most `max` strings.
fn string_list(
    map: &Map<String, Value>,
    name: &str,
    max: usize,
) -> Result<Option<Vec<String>>, ApiError> {
    let items = match map.get(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(ApiError::invalid_type(name, "an array", other)),
    };
    if items.is_empty() || items.len() > max {
        return Err(ApiError::invalid_value(
            name,
            format!(
                "Invalid '{name}': expected an array of 1 to {max} strings, but got {} items \
                 instead.",
                items.len()
            ),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(s.clone()),
            other => Err(ApiError::invalid_type(
                &format!("{name}[{i}]"),
                "a string",
                other,
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BOUNDS: (Duration, Duration) = (Duration::from_secs(60), Duration::from_secs(604_800));

    fn parse(body: &str) -> Result<RetryParams, ApiError> {
        RetryParams::parse(body.as_bytes(), BOUNDS)
    }

    #[test]
    fn an_empty_body_takes_every_unfinished_row_with_the_parents_settings() {
        for body in ["", "  \n", "{}"] {
            let p = parse(body).unwrap();
            assert_eq!(p.choice.statuses, STATUSES);
            assert_eq!(p.choice.codes, None);
            assert_eq!(p.completion_window, None);
            assert_eq!(p.metadata, None);
        }
        let p = parse(r#"{"statuses":["expired","expired"],"codes":["429"],"completion_window":"2h","metadata":null}"#).unwrap();
        assert_eq!(p.choice.statuses, ["expired"]);
        assert_eq!(p.completion_window.unwrap().1, Duration::from_secs(7200));
        assert_eq!(p.metadata, Some(None));
    }

    #[test]
    fn bad_bodies_name_their_param() {
        for (body, param) in [
            (r#"{"statuses":["done"]}"#, "statuses"),
            (r#"{"statuses":[]}"#, "statuses"),
            (r#"{"statuses":"failed"}"#, "statuses"),
            (r#"{"codes":[1]}"#, "codes[0]"),
            (r#"{"completion_window":"1s"}"#, "completion_window"),
            (r#"{"metadata":{"k":1}}"#, "metadata.k"),
        ] {
            match parse(body) {
                Err(ApiError::InvalidRequest { param: Some(p), .. }) => {
                    assert_eq!(p, param, "{body}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
        assert!(matches!(parse("[1]"), Err(ApiError::InvalidRequest { .. })));
        assert!(matches!(parse("{"), Err(ApiError::InvalidRequest { .. })));
    }

    #[test]
    fn rows_are_chosen_by_status_and_code() {
        let expired =
            json!({"custom_id":"a","response":null,"error":{"code":"batch_expired","message":"m"}});
        let upstream = json!({"custom_id":"b","response":{"status_code":404,"body":{"error":{"code":"model_not_found","message":"m"}}},"error":null});
        let bytes = |v: &Value| v.to_string().into_bytes();
        let all = parse("").unwrap().choice;
        assert!(all.takes(&bytes(&expired)) && all.takes(&bytes(&upstream)));
        let failed = parse(r#"{"statuses":["failed"]}"#).unwrap().choice;
        assert!(!failed.takes(&bytes(&expired)) && failed.takes(&bytes(&upstream)));
        let by_code = parse(r#"{"codes":["model_not_found"]}"#).unwrap().choice;
        assert!(!by_code.takes(&bytes(&expired)) && by_code.takes(&bytes(&upstream)));
        let by_status = parse(r#"{"codes":["404"]}"#).unwrap().choice;
        assert!(by_status.takes(&bytes(&upstream)));
        assert_eq!(
            by_code.describe(),
            "failed, expired or cancelled requests with code 'model_not_found'"
        );
    }
}
