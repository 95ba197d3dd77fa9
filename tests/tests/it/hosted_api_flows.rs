//! Each hosted batch API Sluice stands in for, called the way its own users call it:
//! MeshAPI's inline batches (its quickstart and reference calls), Melious' upload flow with the
//! `:batch` flavor, and the JSONL-body batches with task models.

use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use sluice_cli::mock_upstream::{MockConfig, MockUpstream};
use sluice_core::config::ProviderSettings;
use sluice_tests::*;
use tokio_util::sync::CancellationToken;

/// Status, headers and JSON body (or the text as a string) of a request.
pub(crate) async fn send(req: reqwest::RequestBuilder) -> (u16, HeaderMap, Value) {
    let resp = req.send().await.expect("request is sent");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, body)
}

/// Asserts the OpenAI error envelope with `status` and `code`; returns the `error` object.
pub(crate) fn assert_error(got: &(u16, HeaderMap, Value), status: u16, code: &str) -> Value {
    let (s, headers, body) = got;
    assert_eq!(*s, status, "{body}");
    let error = body["error"].clone();
    for key in ["message", "type", "param", "code"] {
        assert!(error.get(key).is_some(), "{key} missing: {body}");
    }
    assert_eq!(error["code"], code, "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    let retry = headers.get("x-should-retry").and_then(|v| v.to_str().ok());
    if status == 429 {
        assert_eq!(retry, None, "a 429 may be retried");
    } else {
        assert_eq!(retry, Some("false"), "{status} is deterministic");
    }
    error
}

/// A provider entry.
pub(crate) fn provider(name: &str, base_url: &str, models: &[&str]) -> ProviderSettings {
    ProviderSettings {
        name: name.into(),
        base_url: base_url.into(),
        api_key_env: None,
        models: models.iter().map(|m| (*m).to_owned()).collect(),
        endpoints: Vec::new(),
        batch: true,
        flavors: Vec::new(),
        pacing: Default::default(),
        refused_body_fields: Vec::new(),
    }
}

/// A second mock upstream, stopped by `stop`; (mock, base URL).
pub(crate) async fn second_mock(stop: &CancellationToken) -> (MockUpstream, String) {
    let mock = MockUpstream::new(MockConfig::default());
    let base = mock.clone().spawn(stop.clone()).await.expect("mock starts");
    (mock, base)
}

/// `POST /v1/batches` with a JSON body.
pub(crate) async fn create(app: &TestApp, key: &str, body: &Value) -> (u16, HeaderMap, Value) {
    send(app.req(Method::POST, "/batches", key).json(body)).await
}

/// `POST /v1/batches` with a JSONL body, authenticated with `x-api-key` as those clients do.
pub(crate) async fn create_jsonl(
    app: &TestApp,
    key: Option<&str>,
    lines: &[String],
) -> (u16, HeaderMap, Value) {
    let mut req = app
        .http
        .post(format!("{}/batches", app.base))
        .header("content-type", "application/jsonl")
        .body(lines.join("\n"));
    if let Some(key) = key {
        req = req.header("x-api-key", key);
    }
    send(req).await
}

/// Polls the batch with `x-api-key` until `done(status)` holds.
pub(crate) async fn poll(app: &TestApp, key: &str, id: &str, done: &[&str]) -> Value {
    let start = Instant::now();
    loop {
        let (status, _, batch) = send(
            app.http
                .get(format!("{}/batches/{id}", app.base))
                .header("x-api-key", key),
        )
        .await;
        assert_eq!(status, 200, "{batch}");
        if done.contains(&batch["status"].as_str().unwrap_or_default()) {
            return batch;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "batch {id} stuck: {batch:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /v1/batches/{id}/output`, parsed.
pub(crate) async fn output(app: &TestApp, key: &str, id: &str) -> Vec<Value> {
    let resp = app
        .http
        .get(format!("{}/batches/{id}/output", app.base))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/jsonl");
    resp.text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("output line is JSON"))
        .collect()
}

fn by_custom_id(lines: &[Value], id: &str) -> Value {
    lines
        .iter()
        .find(|l| l["custom_id"] == id)
        .unwrap_or_else(|| panic!("{id} missing: {lines:#?}"))
        .clone()
}

/// The JSON result in a ChatCompletion-shaped body.
fn content_json(line: &Value) -> Value {
    let content = line["response"]["body"]["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    serde_json::from_str(content).expect("content is JSON")
}

// ---- MeshAPI inline batches ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn meshapi_inline_batches_create_list_get_and_cancel_with_metadata() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        // MeshAPI users name `openai/gpt-4o-mini` or plain `gpt-4o-mini`.
        let base = s.providers[0].base_url.clone();
        s.providers
            .push(provider("openai", &base, &["gpt-4o-mini"]));
    })
    .await;

    // MeshAPI's quickstart call: a prefixed model, the default window.
    let (status, _, batch) = create(
        &app,
        KEY_A,
        &json!({
            "requests": [{"custom_id": "doc-001", "body": {
                "model": "openai/gpt-4o-mini",
                "messages": [{"role": "user", "content": "Summarize this note."}]
            }}],
            "completion_window": "24h"
        }),
    )
    .await;
    assert_eq!(status, 200, "{batch}");
    let quick = batch["id"].as_str().unwrap().to_owned();

    // MeshAPI's reference call: several requests, metadata, no window given.
    let requests: Vec<Value> = (1..=3)
        .map(|i| {
            json!({"custom_id": format!("batch-item-00{i}"), "body": {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": format!("Summarize the latest quarterly earnings report {i}.")}],
                "temperature": 0.7,
                "max_tokens": 500
            }})
        })
        .collect();
    let metadata = json!({"project": "Q2 Earnings Analysis", "requested_by": "finance_team"});
    let (status, _, batch) = create(
        &app,
        KEY_A,
        &json!({"requests": requests, "metadata": metadata}),
    )
    .await;
    assert_eq!(status, 200, "{batch}");
    assert_eq!(batch["object"], "batch");
    assert_eq!(batch["status"], "validating");
    assert_eq!(batch["endpoint"], "/v1/chat/completions");
    assert_eq!(batch["completion_window"], "24h");
    assert_eq!(
        batch["expires_at"].as_i64().unwrap() - batch["created_at"].as_i64().unwrap(),
        86_400
    );
    assert_eq!(batch["metadata"], metadata);
    let id = batch["id"].as_str().unwrap().to_owned();

    // The requests became an input file like any other.
    let input = batch["input_file_id"].as_str().unwrap();
    let (status, _, file) = send(app.req(Method::GET, &format!("/files/{input}"), KEY_A)).await;
    assert_eq!(status, 200);
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["filename"], "inline-requests.jsonl");
    let stored: Vec<Value> = app
        .file_content(KEY_A, input)
        .await
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[0]["method"], "POST");
    assert_eq!(stored[0]["url"], "/v1/chat/completions");
    assert_eq!(stored[0]["body"]["max_tokens"], 500);

    // Poll, then download through the Files API (the quickstart's last two steps).
    let done = app.wait_terminal(KEY_A, &id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    assert_eq!(done["model"], "gpt-4o-mini");
    assert_eq!(
        done["request_counts"],
        json!({"total": 3, "completed": 3, "failed": 0})
    );
    assert_eq!(done["metadata"], metadata);
    let (output, errors) = app.results(KEY_A, &done).await;
    assert!(errors.is_empty());
    let ids: Vec<&str> = output
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["batch-item-001", "batch-item-002", "batch-item-003"]);
    assert_eq!(output[0]["response"]["status_code"], 200);

    // The prefixed model went to the `openai` provider as `gpt-4o-mini`.
    let quick = app
        .wait_terminal(KEY_A, &quick, Duration::from_secs(30))
        .await;
    let (output, _) = app.results(KEY_A, &quick).await;
    assert_eq!(output[0]["response"]["body"]["model"], "gpt-4o-mini");

    // List: newest first, with both.
    let (_, _, list) = send(app.req(Method::GET, "/batches", KEY_A)).await;
    let listed: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [id.as_str(), quick["id"].as_str().unwrap()]);
    assert_eq!(list["data"][0]["metadata"], metadata);

    // Cancel: a slow batch stops; a finished one cannot be cancelled.
    let slow: Vec<Value> = (0..4)
        .map(|i| {
            json!({"custom_id": format!("slow-{i}"), "body": {
                "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "wait"}],
                "mock": {"delay_ms": 3_000, "key": format!("slow-{i}")}
            }})
        })
        .collect();
    let (status, _, batch) = create(&app, KEY_A, &json!({"requests": slow})).await;
    assert_eq!(status, 200, "{batch}");
    let slow_id = batch["id"].as_str().unwrap().to_owned();
    app.wait_for(KEY_A, &slow_id, Duration::from_secs(10), |b| {
        b["status"] == "in_progress"
    })
    .await;
    let (status, _, cancelling) =
        send(app.req(Method::POST, &format!("/batches/{slow_id}/cancel"), KEY_A)).await;
    assert_eq!(status, 200);
    assert_eq!(cancelling["status"], "cancelling");
    let cancelled = app
        .wait_terminal(KEY_A, &slow_id, Duration::from_secs(30))
        .await;
    assert_eq!(cancelled["status"], "cancelled");
    let got = send(app.req(Method::POST, &format!("/batches/{id}/cancel"), KEY_A)).await;
    assert_eq!(got.0, 409);

    // Another tenant sees none of it.
    let (status, _, _) = send(app.req(Method::GET, &format!("/batches/{id}"), KEY_B)).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn meshapi_inline_requests_are_checked_at_once() {
    let app = spawn_app_with(AppOptions::api_only(), |_| {}).await;
    let chat =
        |id: &str, model: &str| json!({"custom_id": id, "body": {"model": model, "messages": []}});

    let got = create(
        &app,
        KEY_A,
        &json!({"requests": [chat("a", MODEL), chat("b", "mock-embed")]}),
    )
    .await;
    let error = assert_error(&got, 400, "model_mismatch");
    assert_eq!(error["param"], "requests[1].body.model");
    assert!(
        error["message"].as_str().unwrap().contains("same model"),
        "{error}"
    );

    let got = create(&app, KEY_A, &json!({"requests": [chat("a", "gpt-nope")]})).await;
    assert_error(&got, 400, "model_not_found");

    let got = create(&app, KEY_A, &json!({"requests": []})).await;
    assert_error(&got, 400, "invalid_value");
    let got = create(
        &app,
        KEY_A,
        &json!({"requests": [{"body": {"model": MODEL}}]}),
    )
    .await;
    let error = assert_error(&got, 400, "missing_required_parameter");
    assert_eq!(error["param"], "requests[0].custom_id");

    // What the dispatcher would refuse is refused now, every bad request listed.
    let got = create(
        &app,
        KEY_A,
        &json!({"requests": [chat("a", MODEL), {"custom_id": "b", "body": {"model": MODEL}}, chat("a", MODEL)]}),
    )
    .await;
    let error = assert_error(&got, 400, "invalid_request");
    let lines: Vec<u64> = error["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [2, 3], "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("requests[1]") && message.contains("requests[2]"),
        "{message}"
    );

    // Nothing was created by the refused calls.
    let (_, _, list) = send(app.req(Method::GET, "/batches", KEY_A)).await;
    assert_eq!(list["data"], json!([]));
    let (_, _, files) = send(app.req(Method::GET, "/files", KEY_A)).await;
    assert_eq!(files["data"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn meshapi_owner_limit_is_exact_under_concurrent_creates() {
    // No worker: batches stay open. The aggregator ends cancelled ones.
    let app = spawn_app_with(
        AppOptions {
            worker: false,
            ..AppOptions::default()
        },
        |s| {
            s.limits.max_open_batches = 10;
        },
    )
    .await;
    let body = json!({"requests": [{"custom_id": "a", "body": {"model": MODEL, "messages": []}}]});
    let attempts = (0..20).map(|_| create(&app, KEY_A, &body));
    let results = futures::future::join_all(attempts).await;
    let created: Vec<String> = results
        .iter()
        .filter(|r| r.0 == 200)
        .map(|r| r.2["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(created.len(), 10, "{results:#?}");
    for refused in results.iter().filter(|r| r.0 != 200) {
        let error = assert_error(refused, 429, "batch_limit_exceeded");
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["param"], Value::Null);
    }
    let (_, _, list) = send(app.req(Method::GET, "/batches?limit=100", KEY_A)).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 10);

    // Every way of creating counts: an uploaded file too.
    let file = app.upload(KEY_A, jsonl(&chat_lines(1))).await;
    let got = create(
        &app,
        KEY_A,
        &json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    )
    .await;
    assert_error(&got, 429, "batch_limit_exceeded");
    // Owners are counted apart.
    assert_eq!(create(&app, KEY_B, &body).await.0, 200);

    // A batch that ends frees its place.
    let (status, _, _) = send(app.req(
        Method::POST,
        &format!("/batches/{}/cancel", created[0]),
        KEY_A,
    ))
    .await;
    assert_eq!(status, 200);
    app.wait_terminal(KEY_A, &created[0], Duration::from_secs(10))
        .await;
    let start = Instant::now();
    loop {
        let got = create(&app, KEY_A, &body).await;
        if got.0 == 200 {
            break;
        }
        assert_error(&got, 429, "batch_limit_exceeded");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the cancelled batch still counts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_error(
        &create(&app, KEY_A, &body).await,
        429,
        "batch_limit_exceeded",
    );
}

// ---- Melious upload → create → poll → download ----

/// Polls as Melious' client script does: until the status is one of its terminal words.
async fn melious_poll(app: &TestApp, id: &str) -> Value {
    let start = Instant::now();
    loop {
        let (status, _, batch) = send(
            app.http
                .get(format!("{}/batches/{id}", app.base))
                .bearer_auth(KEY_A),
        )
        .await;
        assert_eq!(status, 200);
        let counts = batch["request_counts"].as_object().expect("request_counts");
        assert!(
            counts["succeeded"].is_u64(),
            "the script reads request_counts.succeeded: {batch}"
        );
        if ["succeeded", "failed", "expired", "cancelled"]
            .contains(&batch["status"].as_str().unwrap())
        {
            return batch;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "stuck: {batch:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Uploads with `purpose=batch` and creates the batch, over plain HTTP like Melious' client script.
async fn melious_submit(app: &TestApp, lines: &[Value], endpoint: &str) -> String {
    let body: Vec<String> = lines.iter().map(Value::to_string).collect();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(body.join("\n").into_bytes())
                .file_name("requests.jsonl")
                .mime_str("application/jsonl")
                .unwrap(),
        );
    let (status, _, upload) = send(
        app.http
            .post(format!("{}/files", app.base))
            .bearer_auth(KEY_A)
            .multipart(form),
    )
    .await;
    assert_eq!(status, 200, "{upload}");
    let (status, _, batch) = send(
        app.http
            .post(format!("{}/batches", app.base))
            .bearer_auth(KEY_A)
            .header("content-type", "application/json")
            .json(&json!({"input_file_id": upload["id"], "endpoint": endpoint, "completion_window": "24h"})),
    )
    .await;
    assert_eq!(status, 200, "{batch}");
    batch["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn melious_upload_poll_download_with_embeddings_and_partial_failures() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.tenants[0].completed_as = Some("succeeded".into());
    })
    .await;
    // An embedding corpus; two rows fail upstream (400), the rest succeed.
    let lines: Vec<Value> = (0..8)
        .map(|i| {
            let mut body = json!({"model": "mock-embed", "input": format!("Hanseatic city #{i}")});
            if i % 4 == 3 {
                body["mock"] = json!({"status": 400, "key": format!("e{i}")});
            }
            json!({"custom_id": format!("q{i}"), "method": "POST", "url": "/v1/embeddings", "body": body})
        })
        .collect();
    let id = melious_submit(&app, &lines, "/v1/embeddings").await;
    let status = melious_poll(&app, &id).await;
    assert_eq!(status["status"], "succeeded", "{status:#}");
    assert_eq!(status["request_counts"]["succeeded"], 6);
    assert_eq!(status["request_counts"]["failed"], 2);

    // Download the output JSONL and match by custom_id, as the script does.
    let output_file_id = status["output_file_id"].as_str().unwrap();
    let body = app.file_content(KEY_A, output_file_id).await;
    let mut results = std::collections::BTreeMap::new();
    for line in body.trim().lines() {
        let entry: Value = serde_json::from_str(line).unwrap();
        assert!(entry["error"].is_null());
        let embedding = entry["response"]["body"]["data"][0]["embedding"]
            .as_array()
            .unwrap();
        results.insert(
            entry["custom_id"].as_str().unwrap().to_owned(),
            embedding.len(),
        );
    }
    assert_eq!(results.len(), 6);
    assert!(results.values().all(|n| *n == 8));
    // The failed rows are in the error file, keyed by custom_id too.
    let errors = app
        .file_content(KEY_A, status["error_file_id"].as_str().unwrap())
        .await;
    let failed: Vec<String> = errors
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|e| {
            assert_eq!(e["response"]["status_code"], 400);
            e["custom_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(failed, ["q3", "q7"]);
    // Per-item view: every row, failures with `error` set.
    let items = output(&app, KEY_A, &id).await;
    assert_eq!(items.len(), 8);
    assert_eq!(by_custom_id(&items, "q3")["error"]["status_code"], 400);
    assert!(by_custom_id(&items, "q3")["response"].is_null());
    // Other tenants keep OpenAI's words.
    let (_, _, other) = send(app.req(Method::GET, "/batches", KEY_B)).await;
    assert_eq!(other["data"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn melious_output_file_carries_failed_rows_with_error_set_when_the_tenant_asks() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.tenants[0].completed_as = Some("succeeded".into());
        s.tenants[0].errors_in_output = true;
    })
    .await;
    let prompts: Vec<Value> = (0..6)
        .map(|i| {
            let mut line = chat_line(&format!("q{i}"), &format!("Hanseatic city #{i}"));
            if i == 2 {
                line["body"]["mock"] = json!({"status": 400, "key": "q2"});
            }
            line
        })
        .collect();
    let id = melious_submit(&app, &prompts, "/v1/chat/completions").await;
    let status = melious_poll(&app, &id).await;
    assert_eq!(status["status"], "succeeded", "{status:#}");

    // The client script's download loop, verbatim in spirit: error rows first, else the completion.
    let body = app
        .file_content(KEY_A, status["output_file_id"].as_str().unwrap())
        .await;
    let mut results = Vec::new();
    for line in body.trim().lines() {
        let entry: Value = serde_json::from_str(line).unwrap();
        let text = if !entry["error"].is_null() {
            format!("ERROR: {}", entry["error"]["message"].as_str().unwrap())
        } else {
            entry["response"]["body"]["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        results.push((entry["custom_id"].as_str().unwrap().to_owned(), text));
    }
    let ids: Vec<&str> = results.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(ids, ["q0", "q1", "q2", "q3", "q4", "q5"], "input order");
    assert!(results[2].1.starts_with("ERROR: "), "{results:?}");
    assert!(results[0].1.contains("Hanseatic"), "{results:?}");
    // The error file is still there, in OpenAI's layout.
    let errors = app
        .file_content(KEY_A, status["error_file_id"].as_str().unwrap())
        .await;
    let failed: Value = serde_json::from_str(errors.trim()).unwrap();
    assert_eq!(failed["custom_id"], "q2");
    assert_eq!(failed["response"]["status_code"], 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn melious_batch_flavor_routes_to_the_batch_provider_under_the_base_name() {
    let stop = CancellationToken::new();
    let (cheap, cheap_base) = second_mock(&stop).await;
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.tenants[0].completed_as = Some("succeeded".into());
        // The realtime provider serves glm-4.7; the cheap one serves its `:batch` flavor.
        s.providers[0].models.push("glm-4.7".into());
        let mut batch = provider("cheap-batch", &cheap_base, &["glm-4.7"]);
        batch.flavors = vec!["batch".into()];
        s.providers.push(batch);
    })
    .await;
    let prompts: Vec<Value> = (0..10)
        .map(|i| {
            json!({
                "custom_id": format!("q{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "glm-4.7:batch", "messages": [{"role": "user", "content": format!("In one sentence, why did Hanseatic city #{i} matter?")}]},
            })
        })
        .collect();
    let id = melious_submit(&app, &prompts, "/v1/chat/completions").await;
    let status = melious_poll(&app, &id).await;
    assert_eq!(status["status"], "succeeded", "{status:#}");
    assert_eq!(status["model"], "glm-4.7:batch");
    let body = app
        .file_content(KEY_A, status["output_file_id"].as_str().unwrap())
        .await;
    let mut answers = 0;
    for line in body.trim().lines() {
        let entry: Value = serde_json::from_str(line).unwrap();
        assert!(entry["error"].is_null());
        let choice = &entry["response"]["body"]["choices"][0];
        assert!(
            choice["message"]["content"]
                .as_str()
                .unwrap()
                .contains("Hanseatic")
        );
        // The provider was asked for the base model.
        assert_eq!(entry["response"]["body"]["model"], "glm-4.7");
        answers += 1;
    }
    assert_eq!(answers, 10);
    assert_eq!(cheap.stats().calls, 10, "the batch provider got every call");
    assert_eq!(
        app.upstream_stats().calls,
        0,
        "the realtime provider got none"
    );
    stop.cancel();
}

// ---- JSONL body, task models, /output ----

fn task_lines() -> Vec<String> {
    [
        json!({"custom_id": "ex-1", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": "extract",
            "text": "Ada Lovelace wrote to Charles Babbage from London.",
            "entities": {"person": "A human being", "place": "A city or country"},
            "instructions": "Only named entities."
        }}),
        json!({"custom_id": "sum-1", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": "summarize",
            "text": "The quarter closed with record revenue. Costs rose as well.",
            "instructions": "Focus on financial figures only.",
            "max_tokens": 60
        }}),
        json!({"custom_id": "cls-1", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": "classify",
            "text": "The invoice is overdue and the customer asks for a refund.",
            "labels": [
                {"name": "billing", "rubric": "Is this about an invoice"},
                {"name": "shipping", "rubric": "Is this about a parcel"}
            ]
        }}),
        json!({"custom_id": "sum-bad", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": "summarize", "text": "MOCK_INVALID_OUTPUT makes the model ramble."
        }}),
    ]
    .iter()
    .map(Value::to_string)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jsonl_body_batches_run_every_task_model_and_serve_output() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.tasks.model = Some(MODEL.into())
    })
    .await;
    let (status, _, batch) = create_jsonl(&app, Some(KEY_A), &task_lines()).await;
    assert_eq!(status, 200, "{batch}");
    assert_eq!(batch["endpoint"], "/v1/chat/completions");
    let id = batch["id"].as_str().unwrap().to_owned();
    let done = poll(&app, KEY_A, &id, &["completed", "failed"]).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 4, "completed": 3, "failed": 1})
    );
    assert!(done["usage"]["total_tokens"].as_i64().unwrap() > 0);

    let items = output(&app, KEY_A, &id).await;
    assert_eq!(items.len(), 4);
    for item in &items {
        assert!(
            item["response"].is_null() != item["error"].is_null(),
            "{item}"
        );
    }
    let extract = by_custom_id(&items, "ex-1");
    assert_eq!(extract["response"]["status_code"], 200);
    assert_eq!(extract["response"]["body"]["object"], "chat.completion");
    assert_eq!(extract["response"]["body"]["model"], "extract");
    assert!(
        extract["response"]["body"]["usage"]["total_tokens"]
            .as_i64()
            .unwrap()
            > 0
    );
    assert_eq!(
        content_json(&extract),
        json!([
            {"type": "person", "text": "Ada", "start": 0, "end": 3},
            {"type": "place", "text": "Lovelace", "start": 4, "end": 12},
        ])
    );
    assert_eq!(
        content_json(&by_custom_id(&items, "sum-1")),
        json!({"summary": "The quarter closed with record revenue."})
    );
    assert_eq!(
        content_json(&by_custom_id(&items, "cls-1")),
        json!([{"name": "billing", "verdict": "yes"}, {"name": "shipping", "verdict": "no"}])
    );
    let bad = by_custom_id(&items, "sum-bad");
    assert!(bad["response"].is_null());
    assert_eq!(bad["error"]["code"], "invalid_task_output");

    // The backing model ran every task: one call each.
    assert_eq!(app.upstream_stats().calls, 4);
    // The batch is an ordinary one: its input file and result files are there.
    let (_, _, file) = send(app.req(
        Method::GET,
        &format!("/files/{}", done["input_file_id"].as_str().unwrap()),
        KEY_A,
    ))
    .await;
    assert_eq!(file["purpose"], "batch");
    // Another tenant's output is a 404.
    let (status, _, _) = send(
        app.http
            .get(format!("{}/batches/{id}/output", app.base))
            .header("x-api-key", KEY_B),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jsonl_body_errors_have_the_documented_statuses() {
    // Nothing runs: every answer here is synchronous.
    let options = AppOptions::api_only();
    let app = spawn_app_with(options.clone(), |s| s.tasks.model = Some(MODEL.into())).await;
    let good = task_lines();

    // 400: every bad line listed (malformed JSON, unknown model, a document).
    let lines = vec![
        good[0].clone(),
        "{\"custom_id\": \"broken\", ".to_owned(),
        json!({"custom_id": "m", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "translate", "text": "x"}})
            .to_string(),
        json!({"custom_id": "d", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "summarize", "document": "JVBERi0x", "document_mime_type": "application/pdf"}})
            .to_string(),
    ];
    let got = create_jsonl(&app, Some(KEY_A), &lines).await;
    let error = assert_error(&got, 400, "invalid_request");
    let listed: Vec<(u64, &str)> = error["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["line"].as_u64().unwrap(), e["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        listed,
        [
            (2, "invalid_json_line"),
            (3, "model_not_found"),
            (4, "unsupported_document")
        ]
    );
    let message = error["message"].as_str().unwrap();
    for line in ["line 2", "line 3", "line 4"] {
        assert!(message.contains(line), "{message}");
    }

    // 400: a document alone says to send text.
    let got = create_jsonl(&app, Some(KEY_A), &[lines[3].clone()]).await;
    let error = assert_error(&got, 400, "unsupported_document");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("pre-extracted text"),
        "{error}"
    );
    // 400: a task line without its fields.
    let missing = json!({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "classify", "text": "x"}});
    let error = assert_error(
        &create_jsonl(&app, Some(KEY_A), &[missing.to_string()]).await,
        400,
        "invalid_request",
    );
    assert_eq!(error["param"], "body.labels");

    // 401: no key, or a wrong one.
    assert_error(
        &create_jsonl(&app, None, &good).await,
        401,
        "invalid_api_key",
    );
    assert_error(
        &create_jsonl(&app, Some("sk-wrong"), &good).await,
        401,
        "invalid_api_key",
    );

    // Nothing was created by any of them.
    let (_, _, list) = send(app.req(Method::GET, "/batches", KEY_A)).await;
    assert_eq!(list["data"], json!([]));
    let (_, _, files) = send(app.req(Method::GET, "/files", KEY_A)).await;
    assert_eq!(files["data"], json!([]));

    // application/json with one request per line is a JSONL body too; its output waits (409).
    let (status, _, batch) = send(
        app.http
            .post(format!("{}/batches", app.base))
            .header("x-api-key", KEY_A)
            .header("content-type", "application/json")
            .body(good.join("\n")),
    )
    .await;
    assert_eq!(status, 200, "{batch}");
    let id = batch["id"].as_str().unwrap();
    let (status, headers, body) = send(
        app.http
            .get(format!("{}/batches/{id}/output", app.base))
            .header("x-api-key", KEY_A),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(headers["x-should-retry"], "false");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not finished"),
        "{body}"
    );
    drop(app);

    // 503: task models with no backing model configured.
    let app = spawn_app_with(options, |_| {}).await;
    let got = create_jsonl(&app, Some(KEY_A), &good).await;
    let error = assert_error(&got, 503, "no_provider_configured");
    assert_eq!(error["type"], "server_error");
    assert!(
        error["message"].as_str().unwrap().contains("extract"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backing_model_the_upstream_refuses_is_a_502_item() {
    // The backing provider answers 404 to every call: the items fail with 502, not the batch.
    let app = spawn_app_with(AppOptions::default(), |s| {
        let broken = s.providers[0].base_url.replace("/v1", "/v2");
        s.providers.push(provider("broken", &broken, &["*"]));
        s.tasks.model = Some("broken/some-model".into());
    })
    .await;
    let (status, _, batch) = create_jsonl(&app, Some(KEY_A), &task_lines()[..2]).await;
    assert_eq!(status, 200, "{batch}");
    let id = batch["id"].as_str().unwrap().to_owned();
    let done = poll(&app, KEY_A, &id, &["completed", "failed"]).await;
    assert_eq!(done["request_counts"]["failed"], 2, "{done:#}");
    for item in output(&app, KEY_A, &id).await {
        assert!(item["response"].is_null());
        assert_eq!(item["error"]["status_code"], 502, "{item}");
        assert_eq!(item["error"]["code"], "upstream_error");
        let message = item["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("Upstream batch router request failed") && message.contains("404"),
            "{message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_owner_limit_forgets_what_a_crash_left_counted() {
    let app = spawn_app_with(AppOptions::api_only(), |s| {
        s.limits.max_open_batches = 2;
    })
    .await;
    // An API that died between reserving and storing left two entries: one long ago, one just now.
    let key = app.keys().tenant_open("tenant-a");
    let now_ms = sluice_core::domain::now_millis();
    let _: () = redis::cmd("ZADD")
        .arg(&key)
        .arg(0)
        .arg("batch_lost_long_ago")
        .arg(now_ms)
        .arg("batch_being_created")
        .query_async(&mut app.store.conn())
        .await
        .unwrap();
    let body = json!({"requests": [{"custom_id": "a", "body": {"model": MODEL, "messages": []}}]});
    let (status, _, batch) = create(&app, KEY_A, &body).await;
    assert_eq!(
        status, 200,
        "the stale reservation no longer counts: {batch}"
    );
    // The recent one may still become a batch: it counts.
    assert_error(
        &create(&app, KEY_A, &body).await,
        429,
        "batch_limit_exceeded",
    );
    assert_eq!(app.store.open_batches("tenant-a").await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_jsonl_body_over_the_upload_limit_is_413_and_leaves_nothing() {
    let app = spawn_app_with(AppOptions::api_only(), |s| {
        s.limits.max_upload_bytes = 4_096;
        // A JSONL body has its own cap.
        s.limits.max_jsonl_body_bytes = 4_096;
    })
    .await;
    let lines: Vec<String> = chat_lines(100).iter().map(Value::to_string).collect();
    assert!(lines.join("\n").len() > 4_096);
    let got = create_jsonl(&app, Some(KEY_A), &lines).await;
    assert_error(&got, 413, "request_too_large");
    // The same lines as one JSON request body are held to the same limit.
    let (status, _, _) = send(
        app.req(Method::POST, "/batches", KEY_A)
            .header("content-type", "application/json")
            .body(lines.join("\n")),
    )
    .await;
    assert_eq!(status, 413);
    let (_, _, files) = send(app.req(Method::GET, "/files", KEY_A)).await;
    assert_eq!(files["data"], json!([]));
    assert_eq!(
        app.store.open_batches("tenant-a").await.unwrap(),
        0,
        "the reservation was given back"
    );
    // Under the limit it goes through.
    let got = create_jsonl(&app, Some(KEY_A), &lines[..10]).await;
    assert_eq!(got.0, 200, "{}", got.2);
}
