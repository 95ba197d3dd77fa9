//! Hostile and careless input is bounded by configuration: validation
//! errors are capped and counted, create bodies are capped per form (the inline form streams), and
//! every client string has a length cap answered with a 400 naming its parameter.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use sluice_tests::*;

const CHAT: &str = "/v1/chat/completions";

/// An answer read over a raw socket: (status, body).
type Answer = (u16, String);

/// Sends one request over a raw socket (see [`TestApp::raw_request`]); (status, body).
async fn raw(app: &TestApp, method: &str, path: &str, content_type: &str, body: Vec<u8>) -> Answer {
    let answer = app
        .raw_request(method, path, content_type, body, Duration::from_secs(60))
        .await;
    (answer.status, answer.body)
}

/// The `error` object of an answer that must have `status`.
fn error_of((status, body): &Answer, want: u16) -> Value {
    assert_eq!(*status, want, "{}", &body[..body.len().min(2_000)]);
    let v: Value = serde_json::from_str(body).expect("an error envelope");
    let e = v["error"].clone();
    for key in ["message", "type", "param", "code"] {
        assert!(e.get(key).is_some(), "{key} missing in {v}");
    }
    e
}

/// The error envelope of a `POST /v1/batches` refused with `status`.
async fn refused_create(app: &TestApp, content_type: &str, body: Vec<u8>, status: u16) -> Value {
    error_of(
        &raw(app, "POST", "/batches", content_type, body).await,
        status,
    )
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.expect("answered");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("text"))
}

fn request(custom_id: &str, text: &str) -> Value {
    json!({"custom_id": custom_id, "body": {"model": MODEL, "messages": [{"role": "user", "content": text}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_million_bad_lines_fail_the_batch_with_bounded_errors_and_a_total() {
    let app = spawn_app().await;
    let limits = app.settings.limits.clone();
    // 4 MB: two million lines of `x`, the smallest upload that once filled memory with errors.
    let file = app.upload(KEY_A, b"x\n".repeat(2_000_000)).await;
    let batch_id = app.create_batch(KEY_A, &file).await;
    let batch = app
        .wait_terminal(KEY_A, &batch_id, Duration::from_secs(120))
        .await;
    assert_eq!(batch["status"], "failed", "{batch}");
    let data = batch["errors"]["data"].as_array().expect("errors.data");
    let max = limits.max_reported_errors as usize;
    let codes = |code: &str| data.iter().filter(|e| e["code"] == code).count();
    assert_eq!(codes("invalid_json_line"), max);
    assert_eq!(codes("too_many_errors"), 1);
    assert_eq!(codes("too_many_tasks"), 1);
    assert_eq!(data.len(), max + 2);
    let summary = data
        .iter()
        .find(|e| e["code"] == "too_many_errors")
        .unwrap();
    let message = summary["message"].as_str().unwrap();
    let total = limits.max_lines;
    assert!(
        message.starts_with(&format!(
            "{total} lines are invalid in all among the first {total}"
        )),
        "{message}"
    );
    assert!(
        message.contains(&format!("{} more", total - max as u64)),
        "{message}"
    );
    for e in data {
        assert!(e["message"].as_str().unwrap().len() <= limits.max_error_message_bytes as usize);
    }
    // The batch object, as answered by GET and by the list, stays small.
    let (status, raw_batch) =
        send(app.req(Method::GET, &format!("/batches/{batch_id}"), KEY_A)).await;
    assert_eq!(status, 200);
    assert!(raw_batch.len() < 300 * 1024, "{} bytes", raw_batch.len());
    let (status, list) = send(app.req(Method::GET, "/batches", KEY_A)).await;
    assert_eq!(status, 200);
    assert!(list.len() < 300 * 1024, "{} bytes", list.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_lines_of_a_jsonl_body_get_a_bounded_400() {
    let app = spawn_app_with(AppOptions::api_only(), |s| {
        s.limits.max_lines = 1_000;
        s.limits.max_reported_errors = 50;
    })
    .await;
    // Fewer lines than max_lines: every line is read and counted.
    let answer = raw(
        &app,
        "POST",
        "/batches",
        "application/jsonl",
        b"x\n".repeat(600),
    )
    .await;
    let e = error_of(&answer, 400);
    assert_eq!(e["code"], "invalid_json_line", "{e}");
    let listed = e["errors"].as_array().expect("error.errors");
    assert_eq!(listed.len(), 51, "{e}");
    assert_eq!(listed[50]["code"], "too_many_errors");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("600 requests are invalid"),
        "{e}"
    );

    // Far more lines than a batch may hold: the answer comes once line 1,001 is read, whatever
    // follows (200,000 more lines here).
    let answer = raw(
        &app,
        "POST",
        "/batches",
        "application/jsonl",
        b"x\n".repeat(200_000),
    )
    .await;
    assert!(answer.1.len() < 64 * 1024, "{} bytes", answer.1.len());
    let e = error_of(&answer, 400);
    let listed = e["errors"].as_array().expect("error.errors");
    assert_eq!(listed.len(), 52, "{e}");
    assert_eq!(listed[51]["code"], "too_many_tasks");
    assert!(
        listed[50]["message"]
            .as_str()
            .unwrap()
            .starts_with("1000 lines are invalid in all among the first 1000"),
        "{e}"
    );
    // Nothing was kept, and the API still answers.
    let (status, files) = send(app.req(Method::GET, "/files", KEY_A)).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&files).unwrap()["data"],
        json!([])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_long_strings_get_400_naming_their_parameter() {
    let app = spawn_app_with(AppOptions::api_only(), |_| {}).await;
    let file = app.upload(KEY_A, jsonl(&chat_lines(1))).await;
    let create = |field: &str, value: Value| {
        let mut body = json!({"input_file_id": file, "endpoint": CHAT, "completion_window": "24h"});
        body[field] = value;
        app.req(Method::POST, "/batches", KEY_A).json(&body)
    };
    let long = |n: usize| "0".repeat(n);
    for (field, value, param) in [
        (
            "completion_window",
            format!("{}24h", long(100_000)),
            "completion_window",
        ),
        ("completion_window", "024h".to_owned(), "completion_window"),
        (
            "completion_window",
            "1000000h".to_owned(),
            "completion_window",
        ),
        ("completion_window", "+24h".to_owned(), "completion_window"),
        (
            "input_file_id",
            format!("file-{}", long(10_000)),
            "input_file_id",
        ),
        ("endpoint", format!("/v1/{}", long(100_000)), "endpoint"),
    ] {
        let answer = send(create(field, json!(value))).await;
        // Echoed text is clipped: the answer stays small whatever was sent.
        assert!(
            answer.1.len() < 4 * 1024,
            "{field}: {} bytes",
            answer.1.len()
        );
        let e = error_of(&answer, 400);
        assert_eq!(e["param"], param, "{field}: {e}");
    }
    let id = "b".repeat(300);
    for (path, param) in [
        (format!("/batches/{id}"), "batch_id"),
        (format!("/batches/{id}/cancel"), "batch_id"),
        (format!("/files/{id}"), "file_id"),
        (format!("/batches?after={id}"), "after"),
        (format!("/files?after={id}"), "after"),
    ] {
        let method = if path.ends_with("/cancel") {
            Method::POST
        } else {
            Method::GET
        };
        let e = error_of(&send(app.req(method, &path, KEY_A)).await, 400);
        assert_eq!(e["param"], param, "{path}: {e}");
    }

    // The upload form: filename, purpose, number of parts.
    let e = error_of(
        &send(
            app.req(Method::POST, "/files", KEY_A).multipart(
                reqwest::multipart::Form::new()
                    .text("purpose", "batch")
                    .part(
                        "file",
                        reqwest::multipart::Part::bytes(jsonl(&chat_lines(1)))
                            .file_name(format!("{}.jsonl", "n".repeat(1_000))),
                    ),
            ),
        )
        .await,
        400,
    );
    assert_eq!(e["param"], "file", "{e}");
    let answer = send(
        app.req(Method::POST, "/files", KEY_A).multipart(
            reqwest::multipart::Form::new()
                .text("purpose", "p".repeat(4_000))
                .part(
                    "file",
                    reqwest::multipart::Part::bytes(jsonl(&chat_lines(1))).file_name("a.jsonl"),
                ),
        ),
    )
    .await;
    assert!(answer.1.len() < 2 * 1024, "{}", answer.1);
    assert_eq!(error_of(&answer, 400)["param"], "purpose");
    let mut form = reqwest::multipart::Form::new().text("purpose", "batch");
    for i in 0..40 {
        form = form.text(format!("extra{i}"), "x");
    }
    let e = error_of(
        &send(app.req(Method::POST, "/files", KEY_A).multipart(form)).await,
        400,
    );
    assert_eq!(e["code"], "too_many_parts", "{e}");

    // custom_id: inline (answered at once) and in a file (the batch fails).
    let long_id = "c".repeat(app.settings.limits.max_custom_id_chars as usize + 1);
    let (status, body) = app
        .create_batch_raw(KEY_A, json!({"requests": [request(&long_id, "hi")]}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "custom_id", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("requests[0]"),
        "{body}"
    );
    // Nothing validates here (API only); the same check runs in the dispatcher (unit-tested).
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_custom_id_in_a_file_fails_its_batch_naming_custom_id() {
    let app = spawn_app().await;
    let long_id = "c".repeat(app.settings.limits.max_custom_id_chars as usize + 1);
    let batch_id = app
        .submit(KEY_A, &[chat_line("ok", "hi"), chat_line(&long_id, "hi")])
        .await;
    let batch = app
        .wait_terminal(KEY_A, &batch_id, Duration::from_secs(30))
        .await;
    assert_eq!(batch["status"], "failed", "{batch}");
    let data = batch["errors"]["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{batch}");
    assert_eq!(data[0]["param"], "custom_id");
    assert_eq!(data[0]["line"], 2);
    assert_eq!(app.upstream_stats().calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_bodies_over_their_form_cap_get_413_and_deep_json_gets_400() {
    let app = spawn_app_with(AppOptions::api_only(), |s| {
        s.limits.max_inline_body_bytes = 4 * 1024 * 1024;
    })
    .await;
    let json_cap = app.settings.limits.max_json_body_bytes as usize;

    // A 30 MB JSON array of zeros: not a form that streams, over the JSON cap.
    let mut zeros = b"[0".to_vec();
    zeros.extend(b",0".repeat(15 * 1024 * 1024));
    zeros.push(b']');
    let e = error_of(
        &raw(&app, "POST", "/batches", "application/json", zeros).await,
        413,
    );
    assert_eq!(e["code"], "request_too_large", "{e}");

    // The plain create with a 5,000,000-character window: over the JSON cap.
    let body = json!({"input_file_id": "file-x", "endpoint": CHAT,
        "completion_window": format!("{}24h", "0".repeat(5_000_000))});
    let e = refused_create(&app, "application/json", body.to_string().into_bytes(), 413).await;
    assert_eq!(e["code"], "request_too_large", "{e}");

    // An inline body over its own cap.
    let text = "t".repeat(1_000);
    let requests: Vec<Value> = (0..6_000)
        .map(|i| request(&format!("r{i}"), &text))
        .collect();
    let big = json!({"requests": requests}).to_string().into_bytes();
    assert!(big.len() > 4 * 1024 * 1024);
    let e = error_of(
        &raw(&app, "POST", "/batches", "application/json", big).await,
        413,
    );
    assert_eq!(e["code"], "request_too_large", "{e}");

    // One request over the line size, in a streamed inline body.
    let huge =
        json!({"requests": [request("a", "hi"), request("b", &"h".repeat(5 * 1024 * 1024))]});
    let e = refused_create(&app, "application/json", huge.to_string().into_bytes(), 413).await;
    assert_eq!(e["code"], "request_too_large", "{e}");

    // Deep nesting: a 400, never a crash, small body or streamed.
    let deep = format!("{{\"requests\":{}", "[".repeat(100_000));
    let e = refused_create(&app, "application/json", deep.into_bytes(), 400).await;
    assert!(e["message"].as_str().unwrap().contains("parse"), "{e}");
    // Each field stays under its own budget; together they pass the JSON cap, so this streams.
    let pad = "p".repeat(json_cap / 2 + 1);
    let deep_element = format!(
        "{{\"pad\":\"{pad}\",\"pad2\":\"{pad}\",\"requests\":[{}{}]}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let e = refused_create(&app, "application/json", deep_element.into_bytes(), 400).await;
    assert_eq!(e["param"], "requests[0]", "{e}");
    let deep_line = format!(
        "{{\"custom_id\":\"a\",\"method\":\"POST\",\"url\":\"{CHAT}\",\"body\":{{\"model\":{}1{}}}}}\n",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let e = refused_create(&app, "application/jsonl", deep_line.into_bytes(), 400).await;
    assert_eq!(e["code"], "invalid_request", "{e}");

    // In a large inline body, the endpoint must come before the requests; a bad request is named.
    let requests: Vec<Value> = (0..2_000)
        .map(|i| request(&format!("r{i}"), &text))
        .collect();
    let late = format!(
        "{{\"requests\":{},\"endpoint\":\"/v1/embeddings\"}}",
        Value::from(requests.clone())
    );
    let e = refused_create(&app, "application/json", late.into_bytes(), 400).await;
    assert_eq!(e["param"], "endpoint", "{e}");
    let mut bad = requests.clone();
    bad[1_500] = json!({"body": {"model": MODEL, "messages": []}});
    let e = refused_create(
        &app,
        "application/json",
        json!({"requests": bad}).to_string().into_bytes(),
        400,
    )
    .await;
    assert_eq!(e["param"], "requests[1500].custom_id", "{e}");
    let (status, files) = send(app.req(Method::GET, "/files", KEY_A)).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&files).unwrap()["data"],
        json!([])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_inline_create_streams_and_runs_every_request() {
    let app = spawn_app().await;
    let n = 3_000;
    let text = "t".repeat(500);
    let requests: Vec<Value> = (0..n).map(|i| request(&format!("r{i}"), &text)).collect();
    let body = json!({
        "completion_window": "24h",
        "endpoint": CHAT,
        "requests": requests,
        "metadata": {"run": "stream"},
    });
    let bytes = body.to_string().into_bytes();
    assert!(bytes.len() > app.settings.limits.max_json_body_bytes as usize);
    let (status, text) = send(
        app.req(Method::POST, "/batches", KEY_A)
            .header("content-type", "application/json")
            .body(bytes),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let created: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(created["metadata"]["run"], "stream", "{created}");
    let batch_id = created["id"].as_str().unwrap();
    let batch = app
        .wait_terminal(KEY_A, batch_id, Duration::from_secs(120))
        .await;
    assert_eq!(batch["status"], "completed", "{batch}");
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert!(errors.is_empty());
    let expected: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
    assert_exactly_once(&output, &errors, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_echoed_errors_keep_the_batch_object_small() {
    let app = spawn_app().await;
    // Every line after the first repeats a custom_id of the longest accepted length: each error
    // echoes it, so without a byte budget 1,000 listed errors would pass 600 KB.
    let id = "c".repeat(app.settings.limits.max_custom_id_chars as usize);
    let lines: Vec<Value> = (0..3_000).map(|_| chat_line(&id, "hi")).collect();
    let batch_id = app.submit(KEY_A, &lines).await;
    let batch = app
        .wait_terminal(KEY_A, &batch_id, Duration::from_secs(60))
        .await;
    assert_eq!(batch["status"], "failed", "{batch}");
    let data = batch["errors"]["data"].as_array().unwrap();
    let summary = data.last().unwrap();
    assert_eq!(summary["code"], "too_many_errors", "{summary}");
    assert!(
        summary["message"]
            .as_str()
            .unwrap()
            .starts_with("2999 lines are invalid in all;"),
        "{summary}"
    );
    let (status, raw_batch) =
        send(app.req(Method::GET, &format!("/batches/{batch_id}"), KEY_A)).await;
    assert_eq!(status, 200);
    assert!(raw_batch.len() < 300 * 1024, "{} bytes", raw_batch.len());
}
