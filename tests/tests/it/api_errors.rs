//! The HTTP surface outside the happy path: authentication, size limits, parameter validation, the
//! error envelope, pagination, deletion and the exact shape of created objects.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Map, Value, json};
use sluice_tests::*;

/// An app with only the API running: nothing here needs a batch to move.
async fn api_only(tweak: impl FnOnce(&mut sluice_core::Settings)) -> TestApp {
    spawn_app_with(AppOptions::api_only(), tweak).await
}

/// Asserts that `body` is exactly OpenAI's error envelope: `{"error":{message,type,param,code}}`
/// with all four keys present, `message`/`type` strings, `param`/`code` string or null.
pub(crate) fn assert_envelope(body: &Value) {
    let outer = body
        .as_object()
        .unwrap_or_else(|| panic!("error body is not an object: {body}"));
    assert_eq!(outer.keys().collect::<Vec<_>>(), vec!["error"], "{body}");
    let inner = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("`error` is not an object: {body}"));
    for key in ["message", "type", "param", "code"] {
        assert!(inner.contains_key(key), "`error.{key}` missing: {body}");
    }
    assert!(
        !inner["message"].as_str().unwrap_or_default().is_empty(),
        "empty message: {body}"
    );
    assert!(inner["type"].is_string(), "{body}");
    assert!(
        inner["param"].is_string() || inner["param"].is_null(),
        "{body}"
    );
    assert!(
        inner["code"].is_string() || inner["code"].is_null(),
        "{body}"
    );
}

/// Reads an error response: asserts `status`, a JSON content type, the envelope, and (for every
/// 4xx but 429) `x-should-retry: false`. Returns the whole body.
pub(crate) async fn error_body(resp: reqwest::Response, status: u16) -> Value {
    let got = resp.status().as_u16();
    let url = resp.url().to_string();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("?").to_owned())
    };
    let (retry, ctype) = (header("x-should-retry"), header("content-type"));
    let text = resp.text().await.expect("error body");
    check_error(&url, got, retry, ctype, &text, status)
}

/// The checks of [`error_body`] on the parts of a response.
fn check_error(
    url: &str,
    got: u16,
    retry: Option<String>,
    ctype: Option<String>,
    text: &str,
    status: u16,
) -> Value {
    assert_eq!(got, status, "{url}: {text}");
    let body: Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("{url}: error body is not JSON ({e}): {text}"));
    assert_envelope(&body);
    assert!(
        ctype.as_deref().is_some_and(|c| c.contains("json")),
        "{url}: content type {ctype:?}"
    );
    if (400..500).contains(&status) && status != 429 {
        assert_eq!(
            retry.as_deref(),
            Some("false"),
            "{url}: a {status} must carry x-should-retry: false"
        );
    }
    body
}

/// Uploads `content` over a raw socket and reads the answer while still writing, as the OpenAI
/// SDK's HTTP client does (see [`TestApp::raw_request`]); (status, `x-should-retry`,
/// `content-type`, body).
async fn raw_upload(
    app: &TestApp,
    content: &[u8],
) -> (u16, Option<String>, Option<String>, String) {
    let boundary = format!("sluice-{}", uuid::Uuid::new_v4().simple());
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let answer = app
        .raw_request(
            "POST",
            "/files",
            &content_type,
            body,
            Duration::from_secs(20),
        )
        .await;
    (
        answer.status,
        answer.header("x-should-retry"),
        answer.header("content-type"),
        answer.body,
    )
}

/// Sends `req` and reads the error it must produce (see [`error_body`]).
pub(crate) async fn expect_error(req: reqwest::RequestBuilder, status: u16) -> Value {
    error_body(req.send().await.expect("request is answered"), status).await
}

/// Sends `req`, asserts 200 and returns the JSON body.
pub(crate) async fn expect_ok(req: reqwest::RequestBuilder) -> Value {
    let resp = req.send().await.expect("request is answered");
    let status = resp.status();
    let url = resp.url().clone();
    let text = resp.text().await.expect("body");
    assert_eq!(status, 200, "{url}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {text}"))
}

/// A multipart upload form with the given parts (`None` purpose = no purpose field).
fn form(purpose: Option<&str>, file: Option<(&str, Vec<u8>)>) -> reqwest::multipart::Form {
    let mut form = reqwest::multipart::Form::new();
    if let Some(p) = purpose {
        form = form.text("purpose", p.to_owned());
    }
    if let Some((name, bytes)) = file {
        form = form.part(
            "file",
            reqwest::multipart::Part::bytes(bytes).file_name(name.to_owned()),
        );
    }
    form
}

fn create_body(file_id: &str, window: &str) -> Value {
    json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": window})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_without_a_valid_key_get_401_in_the_openai_envelope() {
    let app = api_only(|_| {}).await;
    let url = |path: &str| format!("{}{path}", app.base);

    // Every route refuses a request without a key, before looking at ids or bodies.
    let routes = [
        (Method::GET, "/files"),
        (Method::POST, "/files"),
        (Method::GET, "/files/file-x"),
        (Method::DELETE, "/files/file-x"),
        (Method::GET, "/files/file-x/content"),
        (Method::GET, "/batches"),
        (Method::POST, "/batches"),
        (Method::GET, "/batches/batch_x"),
        (Method::POST, "/batches/batch_x/cancel"),
    ];
    for (method, path) in routes {
        let body = expect_error(app.http.request(method.clone(), url(path)), 401).await;
        assert_eq!(
            body["error"]["code"], "invalid_api_key",
            "{method} {path}: {body}"
        );
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], Value::Null);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("API key"),
            "{body}"
        );
    }

    // A wrong key, as bearer or as x-api-key.
    let wrong = expect_error(
        app.http
            .get(url("/batches"))
            .bearer_auth("sk-not-a-real-key"),
        401,
    )
    .await;
    assert_eq!(wrong["error"]["code"], "invalid_api_key");
    assert!(
        !wrong.to_string().contains("sk-not-a-real-key"),
        "the key is echoed back: {wrong}"
    );
    expect_error(
        app.http
            .get(url("/batches"))
            .header("x-api-key", "sk-not-a-real-key"),
        401,
    )
    .await;
    // A valid key with the wrong scheme is not accepted either.
    expect_error(
        app.http
            .get(url("/batches"))
            .header("authorization", format!("Basic {KEY_A}")),
        401,
    )
    .await;

    // A valid key in the query string only is ignored (it would land in access logs).
    for param in ["api_key", "key", "token"] {
        let body = expect_error(
            app.http.get(format!("{}?{param}={KEY_A}", url("/batches"))),
            401,
        )
        .await;
        assert_eq!(body["error"]["code"], "invalid_api_key");
    }

    // x-api-key is an accepted alternative to bearer auth, and it authenticates the right tenant.
    let file_id = app.upload(KEY_A, jsonl(&chat_lines(1))).await;
    let listed = expect_ok(app.http.get(url("/files")).header("x-api-key", KEY_A)).await;
    assert_eq!(list_ids(&listed), vec![file_id.clone()]);
    let listed_b = expect_ok(app.http.get(url("/files")).header("x-api-key", KEY_B)).await;
    assert!(list_ids(&listed_b).is_empty(), "{listed_b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_over_the_size_limit_gets_413_and_the_api_stays_healthy() {
    const MIB: usize = 1024 * 1024;
    let app = api_only(|s| s.limits.max_upload_bytes = MIB as u64).await;
    let line = format!("{}\n", chat_line("x", &"a".repeat(1000)));
    let big = |size: usize| line.repeat(size / line.len() + 1).into_bytes();

    // Above the limit but inside the multipart allowance (the streaming count stops it), and far
    // above it (the body-limit layer stops it): both are the same 413.
    for size in [MIB + 1, 3 * MIB / 2, 2 * MIB, 4 * MIB, 16 * MIB] {
        let (got, retry, ctype, text) = raw_upload(&app, &big(size)[..size]).await;
        let body = check_error("POST /v1/files", got, retry, ctype, &text, 413);
        assert_eq!(body["error"]["code"], "file_too_large", "{size}: {body}");
        assert_eq!(body["error"]["param"], "file");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&MIB.to_string()),
            "{body}"
        );
    }
    // Exactly at the limit is accepted (over the same raw path).
    let (got, _, _, text) = raw_upload(&app, &big(MIB)[..MIB]).await;
    assert_eq!(got, 200, "{text}");
    let at_limit: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(at_limit["bytes"], MIB);
    expect_ok(app.req(
        Method::DELETE,
        &format!("/files/{}", at_limit["id"].as_str().unwrap()),
        KEY_A,
    ))
    .await;
    // Nothing of the refused uploads is visible.
    let listed = expect_ok(app.req(Method::GET, "/files", KEY_A)).await;
    assert!(list_ids(&listed).is_empty(), "{listed}");

    // The API still serves: a normal upload, just under the limit, goes through whole.
    let ok = line.repeat(MIB / line.len() - 1).into_bytes();
    assert!(ok.len() <= MIB);
    let file_id = app.upload(KEY_A, ok.clone()).await;
    let meta = expect_ok(app.req(Method::GET, &format!("/files/{file_id}"), KEY_A)).await;
    assert_eq!(meta["bytes"], ok.len());
    assert_eq!(app.file_content(KEY_A, &file_id).await.len(), ok.len());
    let listed = expect_ok(app.req(Method::GET, "/files", KEY_A)).await;
    assert_eq!(list_ids(&listed), vec![file_id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upload_form_errors_are_400s_that_name_the_problem() {
    let app = api_only(|_| {}).await;
    let content = jsonl(&chat_lines(2));
    let post = |form| app.req(Method::POST, "/files", KEY_A).multipart(form);

    for name in ["input.json", "input.txt", "input", "input.jsonl.gz"] {
        let body = expect_error(
            post(form(Some("batch"), Some((name, content.clone())))),
            400,
        )
        .await;
        assert_eq!(
            body["error"]["message"], "Invalid file format for Batch API. Must be .jsonl",
            "{name}"
        );
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }

    let body = expect_error(
        post(form(None, Some(("input.jsonl", content.clone())))),
        400,
    )
    .await;
    assert_eq!(body["error"]["param"], "purpose", "{body}");
    assert_eq!(body["error"]["code"], "missing_required_parameter");

    let body = expect_error(
        post(form(
            Some("fine-tune"),
            Some(("input.jsonl", content.clone())),
        )),
        400,
    )
    .await;
    assert_eq!(body["error"]["param"], "purpose", "{body}");
    assert_eq!(body["error"]["code"], "invalid_value");

    let body = expect_error(post(form(Some("batch"), None)), 400).await;
    assert_eq!(body["error"]["param"], "file", "{body}");

    // Not multipart at all.
    expect_error(
        app.req(Method::POST, "/files", KEY_A)
            .json(&json!({"purpose": "batch"})),
        400,
    )
    .await;

    // None of the refused uploads left a file behind; the same content under a good name works.
    let listed = expect_ok(app.req(Method::GET, "/files", KEY_A)).await;
    assert!(list_ids(&listed).is_empty(), "{listed}");
    let resp = app
        .upload_raw(KEY_A, "dir/input.JSONL", content.clone())
        .await;
    assert_eq!(resp.status(), 200);
    let file: Value = resp.json().await.unwrap();
    assert_eq!(file["filename"], "input.JSONL");
    assert_eq!(file["bytes"], content.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_parameters_are_checked_when_the_batch_is_created() {
    let app = api_only(|_| {}).await;
    let file_id = app.upload(KEY_A, jsonl(&chat_lines(1))).await;
    let create = |body: Value| app.req(Method::POST, "/batches", KEY_A).json(&body);

    // Endpoint.
    let mut body = create_body(&file_id, "24h");
    body["endpoint"] = json!("/v1/invalid/endpoint");
    let err = expect_error(create(body), 400).await;
    assert_eq!(err["error"]["param"], "endpoint");
    assert_eq!(err["error"]["code"], "invalid_value");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Invalid value: '/v1/invalid/endpoint'. Supported values are: "),
        "{message}"
    );
    assert!(message.contains("'/v1/chat/completions'"), "{message}");

    // Missing and mistyped required parameters.
    for field in ["input_file_id", "endpoint", "completion_window"] {
        let mut body = create_body(&file_id, "24h");
        body.as_object_mut().unwrap().remove(field);
        let err = expect_error(create(body), 400).await;
        assert_eq!(err["error"]["param"], field);
        assert_eq!(err["error"]["code"], "missing_required_parameter");
    }
    let mut body = create_body(&file_id, "24h");
    body["input_file_id"] = json!(42);
    let err = expect_error(create(body), 400).await;
    assert_eq!(err["error"]["param"], "input_file_id");
    assert_eq!(err["error"]["code"], "invalid_type");

    // Completion windows: unparsable, zero, above the configured maximum (7d).
    for window in ["1y", "0h", "30d", "8d", "24", "", "-1h"] {
        let err = expect_error(create(create_body(&file_id, window)), 400).await;
        assert_eq!(
            err["error"]["param"], "completion_window",
            "{window}: {err}"
        );
    }

    // Accepted windows set expires_at from created_at.
    let mut accepted = Vec::new();
    for (window, secs) in [("90s", 90), ("2h", 7_200), ("7d", 604_800), ("24h", 86_400)] {
        let batch = expect_ok(create(create_body(&file_id, window))).await;
        assert_eq!(batch["completion_window"], window);
        assert_eq!(batch["status"], "validating");
        let created = batch["created_at"].as_i64().unwrap();
        assert_eq!(
            batch["expires_at"].as_i64().unwrap() - created,
            secs,
            "{window}: {batch}"
        );
        accepted.push(batch["id"].as_str().unwrap().to_owned());
    }

    // Metadata limits: 16 pairs, keys up to 64 characters, string values up to 512.
    let many: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    let long_key = "k".repeat(65);
    let cases = [
        (Value::Object(many), "metadata".to_owned(), "invalid_value"),
        (
            json!({long_key.clone(): "v"}),
            "metadata".to_owned(),
            "invalid_value",
        ),
        (
            json!({"note": "v".repeat(513)}),
            "metadata.note".to_owned(),
            "invalid_value",
        ),
        (
            json!({"tags": ["a", "b"]}),
            "metadata.tags".to_owned(),
            "invalid_type",
        ),
        (json!({"n": 1}), "metadata.n".to_owned(), "invalid_type"),
        (
            json!({"ok": "fine", "nested": {"a": "b"}}),
            "metadata.nested".to_owned(),
            "invalid_type",
        ),
        (json!(["a"]), "metadata".to_owned(), "invalid_type"),
    ];
    for (metadata, param, code) in cases {
        let mut body = create_body(&file_id, "24h");
        body["metadata"] = metadata.clone();
        let err = expect_error(create(body), 400).await;
        // An over-long key is named either as the whole object or by the key itself.
        let got = err["error"]["param"].as_str().unwrap_or_default();
        if param == "metadata" && metadata.get(&long_key).is_some() {
            assert!(
                got == "metadata" || got == format!("metadata.{long_key}"),
                "{err}"
            );
        } else {
            assert_eq!(got, param, "{metadata}: {err}");
        }
        assert_eq!(err["error"]["code"], code, "{metadata}: {err}");
    }
    let mut body = create_body(&file_id, "24h");
    body["metadata"] = json!({"tags": ["a"]});
    let err = expect_error(create(body), 400).await;
    assert_eq!(
        err["error"]["message"],
        "Invalid type for 'metadata.tags': expected a string, but got an array instead."
    );

    // The largest allowed metadata is accepted and echoed back unchanged.
    let max: Map<String, Value> = (0..16)
        .map(|i| (format!("{i:0>64}"), json!("é".repeat(512))))
        .collect();
    let mut body = create_body(&file_id, "24h");
    body["metadata"] = Value::Object(max.clone());
    let batch = expect_ok(create(body)).await;
    assert_eq!(batch["metadata"], Value::Object(max));
    accepted.push(batch["id"].as_str().unwrap().to_owned());

    // Only the accepted requests created batches.
    let listed = expect_ok(app.req(Method::GET, "/batches", KEY_A)).await;
    let mut got = list_ids(&listed);
    got.reverse();
    assert_eq!(got, accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_requests_and_unknown_routes_get_the_envelope() {
    let app = api_only(|_| {}).await;
    let post_raw = |body: &'static str| {
        app.req(Method::POST, "/batches", KEY_A)
            .header("content-type", "application/json")
            .body(body)
    };
    for body in [
        r#"{"input_file_id": "#,
        "not json",
        "",
        "[]",
        "\"24h\"",
        "null",
    ] {
        let err = expect_error(post_raw(body), 400).await;
        assert_eq!(
            err["error"]["type"], "invalid_request_error",
            "{body:?}: {err}"
        );
    }

    // Unknown routes, inside and outside /v1, with and without a key.
    for path in [
        "/v1/nope",
        "/v1/batches/b/x",
        "/nope",
        "/v1/files/f/content/more",
    ] {
        let url = format!("{}{}", app.base.trim_end_matches("/v1"), path);
        let err = expect_error(app.http.get(&url).bearer_auth(KEY_A), 404).await;
        assert_eq!(err["error"]["type"], "invalid_request_error");
        expect_error(app.http.get(&url), 404).await;
    }
    // A known route with the wrong method.
    expect_error(app.req(Method::PUT, "/batches", KEY_A), 405).await;
    expect_error(app.req(Method::DELETE, "/batches/batch_x", KEY_A), 405).await;

    // Bad query parameters name themselves.
    for (path, param) in [
        ("/batches?limit=0", "limit"),
        ("/batches?limit=101", "limit"),
        ("/batches?limit=ten", "limit"),
        ("/files?limit=0", "limit"),
        ("/files?order=sideways", "order"),
    ] {
        let err = expect_error(app.req(Method::GET, path, KEY_A), 400).await;
        assert_eq!(err["error"]["param"], param, "{path}: {err}");
    }

    // Missing objects.
    let err = expect_error(app.req(Method::GET, "/batches/batch_missing", KEY_A), 404).await;
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("batch_missing"),
        "{err}"
    );
    let err = expect_error(
        app.req(Method::POST, "/batches/batch_missing/cancel", KEY_A),
        404,
    )
    .await;
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("batch_missing"),
        "{err}"
    );
    let err = expect_error(app.req(Method::GET, "/files/file-missing", KEY_A), 404).await;
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("file-missing"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_are_listed_newest_first_and_paged_with_after() {
    let app = api_only(|_| {}).await;
    let file_id = app.upload(KEY_A, jsonl(&chat_lines(1))).await;
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(app.create_batch(KEY_A, &file_id).await);
    }
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();

    let page = expect_ok(app.req(Method::GET, "/batches?limit=2", KEY_A)).await;
    assert_eq!(list_ids(&page), newest_first[..2]);
    assert_eq!(page["has_more"], true);
    assert_eq!(page["first_id"], newest_first[0].as_str());
    assert_eq!(page["last_id"], newest_first[1].as_str());

    // Follow the cursor to the end, as the SDK does.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &after {
            None => "/batches?limit=2".to_owned(),
            Some(a) => format!("/batches?limit=2&after={a}"),
        };
        let page = expect_ok(app.req(Method::GET, &path, KEY_A)).await;
        let page_ids = list_ids(&page);
        pages += 1;
        assert!(pages <= 3, "too many pages: {seen:?} then {page}");
        assert_eq!(
            page["first_id"],
            page_ids.first().map_or(Value::Null, |i| json!(i))
        );
        assert_eq!(
            page["last_id"],
            page_ids.last().map_or(Value::Null, |i| json!(i))
        );
        for b in &page["data"].as_array().unwrap()[..] {
            assert_eq!(b["object"], "batch");
        }
        seen.extend(page_ids.iter().cloned());
        if page["has_more"] == false {
            break;
        }
        after = page_ids.last().cloned();
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, newest_first, "every batch exactly once, newest first");

    // Boundaries: a page that ends exactly at the last batch has no more; the default limit is
    // enough for five; a cursor at the oldest batch gives an empty page.
    let page = expect_ok(app.req(Method::GET, "/batches?limit=5", KEY_A)).await;
    assert_eq!(list_ids(&page), newest_first);
    assert_eq!(page["has_more"], false);
    let page = expect_ok(app.req(Method::GET, "/batches", KEY_A)).await;
    assert_eq!(list_ids(&page), newest_first);
    assert_eq!(page["has_more"], false);
    let page = expect_ok(app.req(
        Method::GET,
        &format!("/batches?after={}", created[0]),
        KEY_A,
    ))
    .await;
    assert_eq!(
        page,
        json!({"object": "list", "data": [], "first_id": null, "last_id": null, "has_more": false})
    );
    let page = expect_ok(app.req(
        Method::GET,
        &format!("/batches?after={}&limit=3", created[2]),
        KEY_A,
    ))
    .await;
    assert_eq!(
        list_ids(&page),
        vec![created[1].clone(), created[0].clone()]
    );
    assert_eq!(page["has_more"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_are_listed_in_either_order_filtered_by_purpose_and_limited() {
    let app = spawn_app().await;
    let mut uploaded = Vec::new();
    for i in 0..3 {
        uploaded.push(app.upload(KEY_A, jsonl(&chat_lines(i + 1))).await);
    }
    let batch_id = app.create_batch(KEY_A, &uploaded[2]).await;
    let batch = app
        .wait_terminal(KEY_A, &batch_id, Duration::from_secs(20))
        .await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    let output = batch["output_file_id"]
        .as_str()
        .expect("output file")
        .to_owned();
    let [f1, f2, f3] = [&uploaded[0], &uploaded[1], &uploaded[2]].map(String::clone);

    let app_ref = &app;
    let list = |query: &str| {
        let path = format!("/files{query}");
        async move { expect_ok(app_ref.req(Method::GET, &path, KEY_A)).await }
    };
    let page = list("").await;
    assert_eq!(
        list_ids(&page),
        vec![output.clone(), f3.clone(), f2.clone(), f1.clone()]
    );
    assert_eq!(page["has_more"], false);
    assert_eq!(page["first_id"], output.as_str());
    assert_eq!(page["last_id"], f1.as_str());
    assert_eq!(list_ids(&list("?order=desc").await), list_ids(&page));
    assert_eq!(
        list_ids(&list("?order=asc").await),
        vec![f1.clone(), f2.clone(), f3.clone(), output.clone()]
    );

    let page = list("?purpose=batch").await;
    assert_eq!(list_ids(&page), vec![f3.clone(), f2.clone(), f1.clone()]);
    for f in page["data"].as_array().unwrap() {
        assert_eq!(f["purpose"], "batch");
    }
    let page = list("?purpose=batch_output").await;
    assert_eq!(list_ids(&page), vec![output.clone()]);
    assert_eq!(page["data"][0]["purpose"], "batch_output");
    assert_eq!(page["data"][0]["status"], "processed");
    assert!(list_ids(&list("?purpose=fine-tune").await).is_empty());

    let page = list("?limit=2").await;
    assert_eq!(list_ids(&page), vec![output.clone(), f3.clone()]);
    assert_eq!(page["has_more"], true);
    let page = list(&format!("?limit=2&after={f3}")).await;
    assert_eq!(list_ids(&page), vec![f2.clone(), f1.clone()]);
    assert_eq!(page["has_more"], false);
    // The purpose filter does not eat into the page size, and has_more accounts for it.
    let page = list("?order=asc&purpose=batch&limit=2").await;
    assert_eq!(list_ids(&page), vec![f1.clone(), f2.clone()]);
    assert_eq!(page["has_more"], true);
    let page = list(&format!("?order=asc&purpose=batch&limit=2&after={f2}")).await;
    assert_eq!(list_ids(&page), vec![f3.clone()]);
    assert_eq!(page["has_more"], false);

    // Cancelling a finished batch is a deterministic 409, not to be retried.
    let err = expect_error(
        app.req(Method::POST, &format!("/batches/{batch_id}/cancel"), KEY_A),
        409,
    )
    .await;
    assert_eq!(
        err["error"]["message"],
        "Cannot cancel a batch with status 'completed'."
    );
    assert_eq!(err["error"]["type"], "invalid_request_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_file_answers_the_deletion_object_and_then_404() {
    let app = api_only(|_| {}).await;
    let keep = app.upload(KEY_A, jsonl(&chat_lines(1))).await;
    let gone = app.upload(KEY_A, jsonl(&chat_lines(2))).await;

    let deleted = expect_ok(app.req(Method::DELETE, &format!("/files/{gone}"), KEY_A)).await;
    assert_eq!(
        deleted,
        json!({"id": gone, "object": "file", "deleted": true})
    );

    for (method, path) in [
        (Method::GET, format!("/files/{gone}")),
        (Method::GET, format!("/files/{gone}/content")),
        (Method::DELETE, format!("/files/{gone}")),
    ] {
        let err = expect_error(app.req(method, &path, KEY_A), 404).await;
        assert!(
            err["error"]["message"].as_str().unwrap().contains(&gone),
            "{err}"
        );
    }
    let listed = expect_ok(app.req(Method::GET, "/files", KEY_A)).await;
    assert_eq!(list_ids(&listed), vec![keep.clone()]);
    // The other file is untouched.
    assert_eq!(
        app.file_content(KEY_A, &keep).await.into_bytes(),
        jsonl(&chat_lines(1))
    );
}

/// Asserts the full key set of a batch object in `validating`, with its explicit nulls.
fn assert_new_batch_shape(batch: &Value, file_id: &str, metadata: &Value) {
    let obj = batch
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {batch}"));
    let keys: HashSet<&str> = obj.keys().map(String::as_str).collect();
    for field in BATCH_FIELDS {
        assert!(keys.contains(field), "`{field}` missing: {batch:#}");
    }
    assert!(
        batch["id"].as_str().unwrap().starts_with("batch_"),
        "{batch}"
    );
    assert_eq!(batch["object"], "batch");
    assert_eq!(batch["endpoint"], "/v1/chat/completions");
    assert_eq!(batch["input_file_id"], file_id);
    assert_eq!(batch["completion_window"], "24h");
    assert_eq!(batch["status"], "validating");
    assert_eq!(&batch["metadata"], metadata);
    for field in [
        "errors",
        "output_file_id",
        "error_file_id",
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    ] {
        assert_eq!(
            batch[field],
            Value::Null,
            "`{field}` should be null while validating: {batch:#}"
        );
    }
    assert!(
        batch["model"].is_null() || batch["model"].is_string(),
        "{batch}"
    );
    assert!(batch["created_at"].is_i64());
    assert_eq!(
        batch["expires_at"].as_i64().unwrap() - batch["created_at"].as_i64().unwrap(),
        86_400
    );
    assert_eq!(
        batch["request_counts"],
        json!({"total": 0, "completed": 0, "failed": 0})
    );
    assert_eq!(
        batch["usage"],
        json!({
            "input_tokens": 0,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 0,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 0,
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn created_files_and_batches_carry_every_openai_field() {
    let app = api_only(|_| {}).await;
    let content = jsonl(&chat_lines(3));
    let before = sluice_core::domain::now_secs();
    let resp = app
        .upload_raw(KEY_A, "requests.jsonl", content.clone())
        .await;
    assert_eq!(resp.status(), 200);
    let file: Value = resp.json().await.unwrap();
    let after = sluice_core::domain::now_secs();
    for field in [
        "id",
        "object",
        "bytes",
        "created_at",
        "filename",
        "purpose",
        "status",
    ] {
        assert!(file.get(field).is_some(), "`{field}` missing: {file:#}");
    }
    let file_id = file["id"].as_str().unwrap().to_owned();
    assert!(file_id.starts_with("file-"), "{file}");
    assert_eq!(file["object"], "file");
    assert_eq!(file["bytes"], content.len());
    let created = file["created_at"].as_i64().unwrap();
    assert!((before..=after).contains(&created), "{file}");
    assert_eq!(file["filename"], "requests.jsonl");
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["status"], "processed");
    // Retrieval and listing answer the same object.
    assert_eq!(
        expect_ok(app.req(Method::GET, &format!("/files/{file_id}"), KEY_A)).await,
        file
    );
    assert_eq!(
        expect_ok(app.req(Method::GET, "/files", KEY_A)).await["data"][0],
        file
    );

    let batch = expect_ok(
        app.req(Method::POST, "/batches", KEY_A)
            .json(&create_body(&file_id, "24h")),
    )
    .await;
    assert_new_batch_shape(&batch, &file_id, &Value::Null);
    let id = batch["id"].as_str().unwrap();
    assert_eq!(app.get_batch(KEY_A, id).await, batch);
    assert_eq!(
        expect_ok(app.req(Method::GET, "/batches", KEY_A)).await["data"][0],
        batch
    );

    let metadata = json!({"project": "sluice", "run": "7"});
    let mut body = create_body(&file_id, "24h");
    body["metadata"] = metadata.clone();
    let batch = expect_ok(app.req(Method::POST, "/batches", KEY_A).json(&body)).await;
    assert_new_batch_shape(&batch, &file_id, &metadata);
}
