//! What the fuzz targets share: the dispatcher's line checking (line splitting, then the
//! validator) under a fixed routing, and the checks every API error must pass.

use std::sync::LazyLock;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use sluice_core::Settings;
use sluice_core::lines::LineProbe;
use sluice_runtime::lines::RequestLines;
use sluice_core::validate::{Validator, check_model};

/// The endpoints a batch can name.
pub const ENDPOINTS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/responses",
    "/v1/moderations",
];

/// Routing the targets validate against: a provider that serves `m` and `gpt-4o-mini`, one
/// without batch work (`nobatch`, 501), one for embeddings only (`emb`), and task models run by
/// `m`. Built through serde so that settings added later keep their defaults here.
pub static SETTINGS: LazyLock<Settings> = LazyLock::new(|| {
    serde_json::from_value(json!({
        "providers": [
            {"name": "p", "base_url": "http://127.0.0.1:9/v1", "models": ["m", "gpt-4o-mini"]},
            {"name": "nb", "base_url": "http://127.0.0.1:9/v1", "models": ["nobatch"], "batch": false},
            {"name": "e", "base_url": "http://127.0.0.1:9/v1", "models": ["emb"], "endpoints": ["/v1/embeddings"]},
        ],
        "tasks": {"model": "m"},
    }))
    .expect("the fuzz settings deserialize")
});

/// One line's error, comparable across runs.
pub type LineError = (String, Option<String>, Option<u64>, String);

/// What checking a body gives: every error, the request lines seen, the batch's model, and each
/// line's `(index, number, too_long)`.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    pub errors: Vec<LineError>,
    pub lines: u64,
    pub model: Option<String>,
    pub numbered: Vec<(u64, u64, bool)>,
}

/// Checks `chunks` as the dispatcher does (and the JSONL-body create: `endpoint` `None` takes
/// it from the first line's `url`), with lines over `max_line` bytes refused.
pub fn check_lines(
    chunks: Vec<Bytes>,
    endpoint: Option<&str>,
    max_line: usize,
    max_lines: u64,
) -> Verdict {
    let stream = futures::stream::iter(chunks.into_iter().map(Ok)).boxed();
    let mut lines = RequestLines::from_stream(stream, max_line);
    futures::executor::block_on(async {
        let first = lines
            .next_line()
            .await
            .expect("in-memory chunks never fail");
        let endpoint = match endpoint {
            Some(e) => e.to_owned(),
            None => first
                .as_ref()
                .and_then(|l| LineProbe::parse(&l.bytes))
                .and_then(|p| p.url)
                .and_then(|u| serde_json::from_str::<String>(u.get()).ok())
                .filter(|u| ENDPOINTS.contains(&u.as_str()))
                .unwrap_or_else(|| ENDPOINTS[0].to_owned()),
        };
        let serves = |model: &str| check_model(&SETTINGS, model, &endpoint);
        let limits = sluice_core::config::Limits {
            max_lines,
            ..sluice_core::config::Limits::default()
        };
        let mut validator = Validator::new(&endpoint, &limits, &serves);
        let mut numbered = Vec::new();
        let mut next = first;
        while let Some(line) = next {
            assert!(
                line.too_long || line.bytes.len() <= max_line,
                "a line over the limit was kept"
            );
            assert!(!line.bytes.contains(&b'\n'), "a line holds a newline");
            numbered.push((line.index, line.number, line.too_long));
            validator.check(&line);
            next = lines
                .next_line()
                .await
                .expect("in-memory chunks never fail");
        }
        let verdict = validator.finish();
        let (errors, total, model) = (verdict.errors, verdict.lines, verdict.model);
        Verdict {
            errors: errors
                .into_iter()
                .map(|e| (e.code, e.param, e.line, e.message))
                .collect(),
            lines: total,
            model,
            numbered,
        }
    })
}

/// The invariants of any verdict over `physical_lines` lines of input.
pub fn check_verdict(v: &Verdict, physical_lines: u64) {
    // Validation stops reading once the file is certainly too long.
    assert!(v.lines <= v.numbered.len() as u64);
    for (i, (index, number, _)) in v.numbered.iter().enumerate() {
        assert_eq!(*index, i as u64, "request lines are indexed densely");
        assert!(
            *number >= 1 && *number <= physical_lines,
            "line {number} of {physical_lines}"
        );
    }
    assert!(
        v.numbered.windows(2).all(|w| w[0].1 < w[1].1),
        "line numbers increase"
    );
    let mut last = 0;
    for (code, _, line, message) in &v.errors {
        assert!(!code.is_empty() && !message.is_empty());
        if let Some(line) = line {
            assert!(*line > last, "at most one error per line, in order");
            assert!(
                v.numbered.iter().any(|(_, n, _)| n == line),
                "error on no line"
            );
            last = *line;
        }
    }
    if v.errors.is_empty() {
        assert!(v.model.is_some(), "a good batch has a model");
    }
}

/// Splits `bytes` at the cut points `cuts` (positions modulo the length, in any order).
pub fn chunked(bytes: &[u8], cuts: &[u8]) -> Vec<Bytes> {
    let mut points: Vec<usize> = cuts
        .chunks(2)
        .map(|c| usize::from(c[0]) << 8 | usize::from(*c.get(1).unwrap_or(&0)))
        .map(|p| {
            if bytes.is_empty() {
                0
            } else {
                p % (bytes.len() + 1)
            }
        })
        .collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .map(|w| Bytes::copy_from_slice(&bytes[w[0]..w[1]]))
        .collect()
}

/// Physical lines of `bytes` as the line reader numbers them.
pub fn physical_lines(bytes: &[u8]) -> u64 {
    let newlines = bytes.iter().filter(|b| **b == b'\n').count() as u64;
    newlines + u64::from(!bytes.is_empty() && bytes.last() != Some(&b'\n'))
}

/// The OpenAI envelope every refused request gets: a 4xx (never a 5xx: a bad input is never
/// our fault) with `error.message` and `error.type`, and `param` / `code` present.
pub fn check_refusal(error: sluice_api::ApiError) {
    let (status, body) = sluice_api::fuzzing::error_response(error);
    assert!(status.is_client_error(), "a bad input answered {status}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(e["type"], Value::from("invalid_request_error"), "{body}");
    let fields = e.as_object().expect("error is an object");
    assert!(
        fields.contains_key("param") && fields.contains_key("code"),
        "{body}"
    );
}
