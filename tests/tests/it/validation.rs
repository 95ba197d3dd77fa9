//! Input validation end to end: a bad file fails its batch asynchronously, with one error per bad
//! line, and nothing reaches the upstream.

use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::*;

const MAX_LINE_BYTES: u64 = 600;

/// Creates a batch over `content` and waits until it is terminal.
async fn run_file(app: &TestApp, content: Vec<u8>) -> Value {
    let file_id = app.upload(KEY_A, content).await;
    let batch_id = app.create_batch(KEY_A, &file_id).await;
    app.wait_terminal(KEY_A, &batch_id, Duration::from_secs(20))
        .await
}

/// Asserts a failed batch: `failed_at` set, no files, no lines run; returns `errors.data`.
fn failed_errors(batch: &Value) -> Vec<Value> {
    assert_eq!(batch["status"], "failed", "{batch:#}");
    assert!(batch["failed_at"].is_i64(), "{batch:#}");
    assert!(batch["in_progress_at"].is_null(), "{batch:#}");
    assert!(batch["output_file_id"].is_null(), "{batch:#}");
    assert!(batch["error_file_id"].is_null(), "{batch:#}");
    assert_eq!(batch["request_counts"]["completed"], 0);
    assert_eq!(batch["request_counts"]["failed"], 0);
    assert_eq!(batch["errors"]["object"], "list", "{batch:#}");
    let data = batch["errors"]["data"]
        .as_array()
        .expect("errors.data")
        .clone();
    for e in &data {
        assert!(!e["message"].as_str().unwrap_or_default().is_empty(), "{e}");
        assert!(e["code"].is_string(), "{e}");
    }
    data
}

fn line(
    custom_id: Option<&str>,
    method: Option<&str>,
    url: Option<&str>,
    body: Option<Value>,
) -> String {
    let mut obj = serde_json::Map::new();
    if let Some(c) = custom_id {
        obj.insert("custom_id".into(), json!(c));
    }
    if let Some(m) = method {
        obj.insert("method".into(), json!(m));
    }
    if let Some(u) = url {
        obj.insert("url".into(), json!(u));
    }
    if let Some(b) = body {
        obj.insert("body".into(), b);
    }
    Value::Object(obj).to_string()
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

const CHAT: &str = "/v1/chat/completions";

/// An expected line error: (code, param, a fragment of the message).
type Problem = (&'static str, Option<&'static str>, &'static str);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_bad_line_of_a_file_is_reported_with_its_line_code_and_param() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.limits.max_line_bytes = MAX_LINE_BYTES
    })
    .await;
    let ok = |id: &str| line(Some(id), Some("POST"), Some(CHAT), Some(chat_body(MODEL)));
    let mut streaming = chat_body(MODEL);
    streaming["stream"] = json!(true);
    let too_long = line(
        Some("long"),
        Some("POST"),
        Some(CHAT),
        Some(
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(MAX_LINE_BYTES as usize)}]}),
        ),
    );
    assert!(too_long.len() as u64 > MAX_LINE_BYTES);

    // (text, expected error: (code, param, message fragment)); `None` = a good line.
    type Expect = Option<Problem>;
    let rows: Vec<(String, Expect)> = vec![
        (ok("ok-1"), None),
        (
            r#"{"custom_id": "broken", "method": "POST""#.to_owned(),
            Some((
                "invalid_json_line",
                None,
                "This line is not parseable as valid JSON.",
            )),
        ),
        (
            line(None, Some("POST"), Some(CHAT), Some(chat_body(MODEL))),
            Some((
                "missing_required_parameter",
                Some("custom_id"),
                "Missing required parameter: 'custom_id'.",
            )),
        ),
        (String::new(), None), // a blank line: skipped, but still counted in line numbers
        (
            line(Some("no-method"), None, Some(CHAT), Some(chat_body(MODEL))),
            Some((
                "missing_required_parameter",
                Some("method"),
                "Missing required parameter: 'method'.",
            )),
        ),
        (
            line(Some("no-url"), Some("POST"), None, Some(chat_body(MODEL))),
            Some((
                "missing_required_parameter",
                Some("url"),
                "Missing required parameter: 'url'.",
            )),
        ),
        (
            line(Some("no-body"), Some("POST"), Some(CHAT), None),
            Some((
                "missing_required_parameter",
                Some("body"),
                "Missing required parameter: 'body'.",
            )),
        ),
        (ok("ok-2"), None),
        (
            line(
                Some("wrong-url"),
                Some("POST"),
                Some("/v1/embeddings"),
                Some(chat_body(MODEL)),
            ),
            Some((
                "invalid_url",
                Some("url"),
                "The URL provided for this request does not match the batch endpoint.",
            )),
        ),
        (
            line(Some("stream"), Some("POST"), Some(CHAT), Some(streaming)),
            Some((
                "streaming_unsupported",
                Some("body.stream"),
                "Streaming is not supported in the Batch API.",
            )),
        ),
        (
            line(
                Some("no-model"),
                Some("POST"),
                Some(CHAT),
                Some(json!({"messages": []})),
            ),
            Some((
                "invalid_request",
                Some("body.model"),
                "Model parameter is required.",
            )),
        ),
        (
            line(
                Some("unknown-model"),
                Some("POST"),
                Some(CHAT),
                Some(chat_body("gpt-nope")),
            ),
            Some((
                "model_not_found",
                Some("body.model"),
                "The provided model 'gpt-nope' is not supported by the Batch API.",
            )),
        ),
        (
            ok("ok-1"),
            Some(("duplicate_custom_id", Some("custom_id"), "ok-1")),
        ),
        (
            line(
                Some("second-model"),
                Some("POST"),
                Some(CHAT),
                Some(chat_body("mock-embed")),
            ),
            Some(("model_mismatch", Some("body.model"), "mock-embed")),
        ),
        (too_long, Some(("line_too_long", None, "maximum line size"))),
        (
            line(Some("get"), Some("GET"), Some(CHAT), Some(chat_body(MODEL))),
            Some(("invalid_request", Some("method"), "POST")),
        ),
        (
            line(
                Some("no-messages"),
                Some("POST"),
                Some(CHAT),
                Some(json!({"model": MODEL})),
            ),
            Some(("invalid_request", Some("body.messages"), "messages")),
        ),
        (ok("ok-3"), None),
    ];
    let mut content = String::new();
    for (text, _) in &rows {
        content.push_str(text);
        content.push('\n');
    }
    let batch = run_file(&app, content.into_bytes()).await;
    let errors = failed_errors(&batch);

    let expected: Vec<(u64, &Problem)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, (_, e))| e.as_ref().map(|e| (i as u64 + 1, e)))
        .collect();
    let summary: Vec<String> = errors
        .iter()
        .map(|e| format!("{} {} {}", e["line"], e["code"], e["param"]))
        .collect();
    assert_eq!(
        errors.len(),
        expected.len(),
        "one error per bad line, no more: {summary:#?}"
    );
    for (error, (line_no, (code, param, fragment))) in errors.iter().zip(&expected) {
        assert_eq!(error["line"], *line_no, "{error} (all: {summary:#?})");
        assert_eq!(error["code"], *code, "line {line_no}: {error}");
        assert_eq!(
            error["param"],
            param.map_or(Value::Null, |p| json!(p)),
            "line {line_no}: {error}"
        );
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains(fragment),
            "line {line_no}: {message:?} lacks {fragment:?}"
        );
    }
    assert_eq!(
        app.upstream_stats().calls,
        0,
        "a failed batch must not call the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn empty_oversized_and_missing_inputs_fail_their_batch() {
    let app = spawn_app_with(AppOptions::default(), |s| s.limits.max_lines = 5).await;

    // No request at all: an empty file, and one with only blank lines.
    for content in [Vec::new(), b"\n\n  \n".to_vec()] {
        let batch = run_file(&app, content.clone()).await;
        let errors = failed_errors(&batch);
        assert_eq!(errors.len(), 1, "{content:?}: {batch:#}");
        assert_eq!(errors[0]["code"], "empty_file");
        assert_eq!(errors[0]["line"], Value::Null);
    }

    // One line more than `max_lines`.
    let batch = run_file(&app, jsonl(&chat_lines(6))).await;
    let errors = failed_errors(&batch);
    assert_eq!(errors.len(), 1, "{batch:#}");
    assert_eq!(errors[0]["code"], "too_many_tasks");
    assert_eq!(errors[0]["line"], Value::Null);
    assert!(
        errors[0]["message"].as_str().unwrap().contains('5'),
        "{}",
        errors[0]
    );

    // An input file that does not exist. The dispatcher fails such a batch within milliseconds;
    // the create answer must still show it `validating` (`create_batch` asserts so), every time.
    let missing = format!("file-{}", uuid::Uuid::new_v4().simple());
    let batch_id = app.create_batch(KEY_A, &missing).await;
    for _ in 0..10 {
        app.create_batch(KEY_A, &format!("file-{}", uuid::Uuid::new_v4().simple()))
            .await;
    }
    let batch = app
        .wait_terminal(KEY_A, &batch_id, Duration::from_secs(20))
        .await;
    let errors = failed_errors(&batch);
    assert_eq!(errors.len(), 1, "{batch:#}");
    assert_eq!(errors[0]["code"], "invalid_request");
    assert_eq!(errors[0]["param"], "file_id");
    assert_eq!(errors[0]["line"], Value::Null);
    assert!(
        errors[0]["message"].as_str().unwrap().contains(&missing),
        "{}",
        errors[0]
    );

    // Exactly `max_lines` lines is fine, and only this batch reached the upstream.
    assert_eq!(
        app.upstream_stats().calls,
        0,
        "a failed batch called the upstream"
    );
    // CRLF line endings and no final newline are fine too.
    let crlf = String::from_utf8(jsonl(&chat_lines(5)))
        .unwrap()
        .trim_end()
        .replace('\n', "\r\n");
    let batch = run_file(&app, crlf.into_bytes()).await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    assert_eq!(batch["request_counts"]["completed"], 5);
    assert_eq!(app.upstream_stats().calls, 5);
    let (output, errors) = app.results(KEY_A, &batch).await;
    let expected: Vec<String> = req_ids(5);
    assert_exactly_once(&output, &errors, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_field_the_provider_refuses_fails_its_line_and_nothing_runs() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        for provider in &mut s.providers {
            provider.refused_body_fields = vec!["api_base".into(), "api_key".into()];
        }
    })
    .await;
    let mut refused = chat_body(MODEL);
    refused["api_key"] = json!("sk-elsewhere");
    // A nested field of that name is the request's own business.
    let mut nested = chat_body(MODEL);
    nested["metadata"] = json!({"api_key": "x"});
    let content = [
        line(Some("ok"), Some("POST"), Some(CHAT), Some(chat_body(MODEL))),
        line(Some("refused"), Some("POST"), Some(CHAT), Some(refused)),
        line(Some("nested"), Some("POST"), Some(CHAT), Some(nested)),
    ]
    .join("\n");
    let batch = run_file(&app, content.into_bytes()).await;
    let errors = failed_errors(&batch);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0]["code"], "refused_body_field", "{errors:#?}");
    assert_eq!(errors[0]["param"], "body.api_key", "{errors:#?}");
    assert_eq!(errors[0]["line"], 2, "{errors:#?}");
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("api_key"),
        "{errors:#?}"
    );
    assert_eq!(app.mock.stats().calls, 0, "no line reached the upstream");
}
