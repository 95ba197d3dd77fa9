//! `POST /v1/batches` bodies: the form detection (JSONL content type, request lines, inline
//! `requests`, the create over a file) and each form's parsing. Whatever the body, nothing
//! panics, a refusal is a 4xx in the OpenAI envelope, and request lines get the dispatcher's
//! verdict.
//!
//! Input: `[content-type selector, body..]`; selectors past the list take the content type from
//! the body's first line.
#![no_main]

use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};
use sluice_api::fuzzing::{
    is_jsonl, looks_like_lines, parse_completion_window, parse_file_create, parse_json,
    parse_metadata, parse_output_expiry,
};
use sluice_fuzz::{ENDPOINTS, check_lines, check_refusal, check_verdict, physical_lines};

const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "application/jsonl",
    "Application/X-NDJSON; charset=utf-8",
    "text/plain",
];
const BOUNDS: (Duration, Duration) = (Duration::from_secs(60), Duration::from_secs(7 * 86_400));
const MAX_LINE: usize = 64 * 1024;
const MAX_LINES: u64 = 50;

fuzz_target!(|data: &[u8]| {
    let [selector, body @ ..] = data else {
        return;
    };
    let mut headers = HeaderMap::new();
    let body = match CONTENT_TYPES.get(usize::from(*selector)) {
        Some(kind) => {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
            body
        }
        None => {
            let (kind, body) = body
                .iter()
                .position(|b| *b == b'\n')
                .map_or((body, &[][..]), |at| (&body[..at], &body[at + 1..]));
            if let Ok(kind) = HeaderValue::from_bytes(kind) {
                headers.insert(CONTENT_TYPE, kind);
            }
            body
        }
    };

    if is_jsonl(&headers) {
        lines(body);
        return;
    }
    if looks_like_lines(body) {
        lines(body);
        return;
    }
    let value = match parse_json(body) {
        Ok(value) => value,
        Err(e) => return check_refusal(e),
    };
    match value.as_object() {
        Some(map) if map.contains_key("requests") && !map.contains_key("input_file_id") => {
            inline(map)
        }
        _ => {
            if let Err(e) = parse_file_create(&value, BOUNDS) {
                check_refusal(e);
            }
        }
    }
});

/// A JSONL body: the dispatcher's verdict.
fn lines(body: &[u8]) {
    let verdict = check_lines(
        vec![Bytes::copy_from_slice(body)],
        None,
        MAX_LINE,
        MAX_LINES,
    );
    check_verdict(&verdict, physical_lines(body));
}

/// The inline form's parameters, then its requests as the lines the API stores and checks.
fn inline(body: &Map<String, Value>) {
    let window = match body.get("completion_window") {
        Some(Value::String(w)) => w.as_str(),
        _ => "24h",
    };
    for result in [
        parse_completion_window(window, BOUNDS).map(drop),
        parse_metadata(body.get("metadata")).map(drop),
        parse_output_expiry(body.get("output_expires_after")).map(drop),
    ] {
        if let Err(e) = result {
            check_refusal(e);
        }
    }
    let endpoint = match body.get("endpoint") {
        Some(Value::String(e)) if ENDPOINTS.contains(&e.as_str()) => e.as_str(),
        _ => ENDPOINTS[0],
    };
    let Some(Value::Array(requests)) = body.get("requests") else {
        return;
    };
    let mut jsonl = Vec::new();
    for request in requests {
        let (Some(custom_id), Some(Value::Object(request_body))) = (
            request.get("custom_id").and_then(Value::as_str),
            request.get("body"),
        ) else {
            continue;
        };
        let line = json!({"custom_id": custom_id, "method": "POST", "url": endpoint, "body": request_body});
        jsonl.extend_from_slice(line.to_string().as_bytes());
        jsonl.push(b'\n');
    }
    let verdict = check_lines(
        vec![Bytes::from(jsonl)],
        Some(endpoint),
        MAX_LINE,
        MAX_LINES,
    );
    check_verdict(&verdict, verdict.numbered.last().map_or(0, |l| l.1));
}
