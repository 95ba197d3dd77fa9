//! `Idempotency-Key` on creates: one object per key whatever the concurrency, every create form
//! and uploads; the first answer replayed; a different request refused; keys per tenant; and the
//! openai SDK retrying a create whose answer was lost, with and without a key. Batch retries
//! (`POST /v1/batches/{id}/retry`) take the key too.

use std::time::Duration;

use reqwest::Method;
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sluice_tests::lossy_proxy::LossyProxy;
use sluice_tests::python::run_openai_script;
use sluice_tests::*;

use crate::api_errors::{error_body, expect_ok};

const KEY: &str = "Idempotency-Key";

/// A create body in one of the forms `POST /v1/batches` takes.
#[derive(Clone)]
enum Create {
    Json(Value),
    Jsonl(Vec<u8>),
}

/// An answer: status, whether it was replayed, body.
struct Answer {
    status: u16,
    replayed: bool,
    body: Value,
}

async fn answer(resp: reqwest::Response) -> Answer {
    let status = resp.status().as_u16();
    let replayed = resp
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let text = resp.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    Answer {
        status,
        replayed,
        body,
    }
}

fn create(app: &TestApp, tenant: &str, key: &str, body: &Create) -> reqwest::RequestBuilder {
    let req = app.req(Method::POST, "/batches", tenant).header(KEY, key);
    match body {
        Create::Json(v) => req.json(v),
        Create::Jsonl(bytes) => req
            .header(CONTENT_TYPE, "application/jsonl")
            .body(bytes.clone()),
    }
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    answer(req.send().await.expect("request is answered")).await
}

fn upload(app: &TestApp, tenant: &str, key: &str, content: &[u8]) -> reqwest::RequestBuilder {
    // reqwest draws a new boundary for every form, as the SDKs do for every attempt.
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(content.to_vec()).file_name("input.jsonl"),
        );
    app.req(Method::POST, "/files", tenant)
        .header(KEY, key)
        .multipart(form)
}

/// The error answer to `request`, checked to be an envelope with `status`.
async fn refused(request: reqwest::RequestBuilder, status: u16) -> Value {
    error_body(request.send().await.expect("request is answered"), status).await
}

async fn batch_ids(app: &TestApp, tenant: &str) -> Vec<String> {
    list_ids(&expect_ok(app.req(Method::GET, "/batches?limit=100", tenant)).await)
}

async fn file_ids(app: &TestApp, tenant: &str) -> Vec<String> {
    list_ids(&expect_ok(app.req(Method::GET, "/files", tenant)).await)
}

fn unique_key(label: &str) -> String {
    format!("{label}-{}", uuid::Uuid::new_v4().simple())
}

/// Sends `n` copies of a request at once; every copy must be answered 200 with one id.
async fn at_once(n: usize, request: impl Fn() -> reqwest::RequestBuilder) -> (String, usize) {
    let answers = futures::future::join_all((0..n).map(|_| send(request()))).await;
    let first = answers[0].body["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["id"], first.as_str(), "{}", a.body);
    }
    let replayed = answers.iter().filter(|a| a.replayed).count();
    (first, replayed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicate_creates_make_one_object_in_every_form() {
    const COPIES: usize = 8;
    // Every copy of an upload must reach the key, not stop at the per-tenant upload cap.
    let app = spawn_app_with(AppOptions::api_only(), |s| {
        s.api.max_uploads_per_tenant = COPIES
    })
    .await;
    let content = jsonl(&chat_lines(3));

    let key = unique_key("upload");
    let (file, replayed) = at_once(COPIES, || upload(&app, KEY_A, &key, &content)).await;
    assert_eq!(
        replayed,
        COPIES - 1,
        "one upload ran, the others were replayed"
    );
    assert_eq!(file_ids(&app, KEY_A).await, [file.as_str()]);

    let forms = [
        Create::Json(
            json!({"input_file_id": file, "endpoint": "/v1/chat/completions",
                            "completion_window": "24h"}),
        ),
        Create::Json(json!({"endpoint": "/v1/chat/completions", "requests": [
            {"custom_id": "a", "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}}
        ]})),
        Create::Jsonl(content.clone()),
    ];
    let mut created = Vec::new();
    for form in &forms {
        let key = unique_key("create");
        let (batch, replayed) = at_once(COPIES, || create(&app, KEY_A, &key, form)).await;
        assert_eq!(replayed, COPIES - 1);
        created.push(batch);
    }
    let mut listed = batch_ids(&app, KEY_A).await;
    listed.sort();
    created.sort();
    assert_eq!(listed, created, "one batch per key");
    // The inline and JSONL creates stored one input file each, not one per copy.
    assert_eq!(file_ids(&app, KEY_A).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_answers_its_first_request_and_refuses_any_other() {
    let app = spawn_app_with(AppOptions::api_only(), |_| {}).await;
    let file = app.upload(KEY_A, jsonl(&chat_lines(2))).await;
    let body = json!({"input_file_id": file, "endpoint": "/v1/chat/completions",
                      "completion_window": "24h", "metadata": {"run": "1"}});
    let key = unique_key("reuse");
    let first = send(create(&app, KEY_A, &key, &Create::Json(body.clone()))).await;
    assert_eq!(
        (first.status, first.replayed),
        (200, false),
        "{}",
        first.body
    );
    let again = send(create(&app, KEY_A, &key, &Create::Json(body.clone()))).await;
    assert_eq!((again.status, again.replayed), (200, true));
    assert_eq!(again.body, first.body, "the first answer, as it was");

    // Another body, another form, another endpoint: each refused, and nothing created.
    let mut other = body.clone();
    other["metadata"]["run"] = json!("2");
    let jsonl_body = jsonl(&chat_lines(2));
    let refusals = [
        create(&app, KEY_A, &key, &Create::Json(other)),
        create(&app, KEY_A, &key, &Create::Jsonl(jsonl_body.clone())),
        upload(&app, KEY_A, &key, &jsonl_body),
    ];
    for request in refusals {
        let error = refused(request, 409).await;
        assert_eq!(error["error"]["code"], "idempotency_key_reused", "{error}");
        assert_eq!(error["error"]["param"], KEY);
    }
    assert_eq!(
        batch_ids(&app, KEY_A).await,
        [first.body["id"].as_str().unwrap()]
    );
    assert_eq!(file_ids(&app, KEY_A).await, [file.as_str()]);

    // An upload key refuses another file's bytes too.
    let upload_key = unique_key("upload");
    let stored = send(upload(&app, KEY_A, &upload_key, b"{\"a\":1}\n")).await;
    assert_eq!(stored.status, 200, "{}", stored.body);
    refused(upload(&app, KEY_A, &upload_key, b"{\"a\":2}\n"), 409).await;

    // Keys are bounded and must be text.
    let long = "k".repeat(256);
    let error = refused(create(&app, KEY_A, &long, &Create::Json(body.clone())), 400).await;
    assert_eq!(error["error"]["code"], "string_above_max_length");
    assert_eq!(error["error"]["param"], KEY);
    refused(create(&app, KEY_A, " ", &Create::Json(body.clone())), 400).await;
    let accepted = send(create(&app, KEY_A, &"k".repeat(255), &Create::Json(body))).await;
    assert_eq!(accepted.status, 200, "{}", accepted.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_first_request_leaves_the_key_free() {
    let app = spawn_app_with(AppOptions::api_only(), |_| {}).await;
    let file = app.upload(KEY_A, jsonl(&chat_lines(2))).await;
    let bad = json!({"input_file_id": file, "endpoint": "/v1/chat/completions",
                     "completion_window": "nope"});
    let good = json!({"input_file_id": file, "endpoint": "/v1/chat/completions",
                      "completion_window": "24h"});
    let key = unique_key("fix");
    refused(create(&app, KEY_A, &key, &Create::Json(bad.clone())), 400).await;
    // Nothing was created, so the corrected request may take the key.
    let fixed = send(create(&app, KEY_A, &key, &Create::Json(good.clone()))).await;
    assert_eq!(
        (fixed.status, fixed.replayed),
        (200, false),
        "{}",
        fixed.body
    );
    let again = send(create(&app, KEY_A, &key, &Create::Json(good))).await;
    assert_eq!((again.status, again.replayed), (200, true));
    assert_eq!(again.body["id"], fixed.body["id"]);
    // From now on the key is bound to the request that succeeded.
    refused(create(&app, KEY_A, &key, &Create::Json(bad)), 409).await;
    assert_eq!(batch_ids(&app, KEY_A).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_are_scoped_per_tenant() {
    let app = spawn_app_with(AppOptions::api_only(), |_| {}).await;
    let body = Create::Jsonl(jsonl(&chat_lines(2)));
    let key = unique_key("shared");
    let a = send(create(&app, KEY_A, &key, &body)).await;
    let b = send(create(&app, KEY_B, &key, &body)).await;
    assert_eq!((a.status, b.status), (200, 200));
    assert!(!b.replayed, "tenant B's first use of the key runs");
    assert_ne!(a.body["id"], b.body["id"]);
    // Another body under the same key is B's own first request, not a reuse of A's key.
    let c_key = unique_key("other");
    let a2 = send(create(&app, KEY_A, &c_key, &body)).await;
    let b2 = send(create(
        &app,
        KEY_B,
        &c_key,
        &Create::Jsonl(jsonl(&chat_lines(1))),
    ))
    .await;
    assert_eq!((a2.status, b2.status, b2.replayed), (200, 200, false));
    // Each tenant's replay is its own object, and each sees only its own batches.
    let b_again = send(create(&app, KEY_B, &key, &body)).await;
    assert_eq!(b_again.body["id"], b.body["id"]);
    let a_ids = batch_ids(&app, KEY_A).await;
    let b_ids = batch_ids(&app, KEY_B).await;
    assert_eq!(a_ids.len(), 2);
    assert_eq!(b_ids.len(), 2);
    assert!(a_ids.iter().all(|id| !b_ids.contains(id)));
}

/// Starts a JSONL create whose body stays open until the returned sender sends the rest and is
/// dropped, and waits until it holds `key` in Redis.
async fn hold_first(
    app: &TestApp,
    key: &str,
    body: &[u8],
) -> (Rest, tokio::task::JoinHandle<Answer>) {
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Vec<u8>, std::io::Error>>();
    tx.unbounded_send(Ok(body[..10].to_vec())).unwrap();
    let request = app
        .req(Method::POST, "/batches", KEY_A)
        .header(KEY, key)
        .header(CONTENT_TYPE, "application/jsonl")
        .body(reqwest::Body::wrap_stream(rx));
    let first = tokio::spawn(send(request));
    let redis_key = app
        .keys()
        .idempotency("tenant-a", &hex::encode(Sha256::digest(key.as_bytes())));
    let mut conn = app.store.conn();
    for _ in 0..600 {
        let held: bool = redis::cmd("EXISTS")
            .arg(&redis_key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if held {
            return (tx, first);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the first request never claimed its key");
}

type Rest = futures::channel::mpsc::UnboundedSender<Result<Vec<u8>, std::io::Error>>;

/// [`hold_first`], and a duplicate of it (the same key and whole body) sent meanwhile, which must
/// still be waiting once it had time to reach the API.
async fn with_waiting_duplicate(
    app: &TestApp,
    key: &str,
    body: &[u8],
) -> (
    Rest,
    tokio::task::JoinHandle<Answer>,
    tokio::task::JoinHandle<Answer>,
) {
    let (rest, first) = hold_first(app, key, body).await;
    let duplicate = tokio::spawn(send(create(app, KEY_A, key, &Create::Jsonl(body.to_vec()))));
    // Time for the duplicate to reach the API (not a bound on anything: had it not arrived yet,
    // it would find the key taken all the same).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !duplicate.is_finished(),
        "the duplicate answered while the first request was still receiving its body"
    );
    (rest, first, duplicate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_waits_for_the_first_request_and_gets_its_answer() {
    let app = spawn_app_with(AppOptions::api_only(), |s| s.idempotency.wait_ms = 120_000).await;
    let body = jsonl(&chat_lines(3));
    let key = unique_key("held");
    let (rest, first, duplicate) = with_waiting_duplicate(&app, &key, &body).await;
    rest.unbounded_send(Ok(body[10..].to_vec())).unwrap();
    drop(rest);
    let first = first.await.unwrap();
    let duplicate = duplicate.await.unwrap();
    assert_eq!(
        (first.status, first.replayed),
        (200, false),
        "{}",
        first.body
    );
    assert_eq!((duplicate.status, duplicate.replayed), (200, true));
    assert_eq!(duplicate.body, first.body);
    assert_eq!(batch_ids(&app, KEY_A).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_that_cannot_wait_gets_a_retryable_409_then_the_first_answer() {
    let app = spawn_app_with(AppOptions::api_only(), |s| s.idempotency.wait_ms = 0).await;
    let body = jsonl(&chat_lines(3));
    let key = unique_key("busy");
    let (rest, first) = hold_first(&app, &key, &body).await;
    let resp = create(&app, KEY_A, &key, &Create::Jsonl(body.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    assert!(
        resp.headers().get("x-should-retry").is_none(),
        "the SDKs must retry a key in progress"
    );
    let error: Value = resp.json().await.unwrap();
    assert_eq!(
        error["error"]["code"], "idempotency_key_in_progress",
        "{error}"
    );
    rest.unbounded_send(Ok(body[10..].to_vec())).unwrap();
    drop(rest);
    let first = first.await.unwrap();
    assert_eq!(first.status, 200, "{}", first.body);
    let retry = send(create(&app, KEY_A, &key, &Create::Jsonl(body))).await;
    assert_eq!((retry.status, retry.replayed), (200, true));
    assert_eq!(retry.body["id"], first.body["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_runs_itself_when_the_first_request_fails() {
    let app = spawn_app_with(AppOptions::api_only(), |s| s.idempotency.wait_ms = 120_000).await;
    let body = jsonl(&chat_lines(3));
    let key = unique_key("fails");
    let (rest, first, duplicate) = with_waiting_duplicate(&app, &key, &body).await;
    // The first request's body ends in a line that is not JSON: it is refused, and frees the key.
    rest.unbounded_send(Ok(b"not a request line\n".to_vec()))
        .unwrap();
    drop(rest);
    let first = first.await.unwrap();
    assert_eq!(first.status, 400, "{}", first.body);
    let duplicate = duplicate.await.unwrap();
    assert_eq!(
        (duplicate.status, duplicate.replayed),
        (200, false),
        "the waiting request ran with its own, unread body: {}",
        duplicate.body
    );
    assert_eq!(
        batch_ids(&app, KEY_A).await,
        [duplicate.body["id"].as_str().unwrap()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_cut_off_by_its_deadline_still_answers_its_retry() {
    // Every request with a small body gets 503 `request_timeout` after 1 ms: the first create's
    // client is answered long before its batch is stored, as a client that gave up would be.
    let app = spawn_app_with(AppOptions::api_only(), |s| s.api.request_timeout_ms = 1).await;
    let file = app.upload(KEY_A, jsonl(&chat_lines(2))).await;
    let body = serde_json::to_vec(&json!({"input_file_id": file,
        "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
    .unwrap();
    let key = unique_key("deadline");
    let cut = app
        .req(Method::POST, "/batches", KEY_A)
        .header(KEY, &key)
        .header(CONTENT_TYPE, "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(cut.status(), 503, "{}", cut.text().await.unwrap());
    // The same bytes, chunked: a body of unknown length is a streaming upload, which has no
    // deadline, so this retry waits for the first request and gets its answer.
    let chunked = futures::stream::iter([Ok::<_, std::io::Error>(body)]);
    let retry = send(
        app.req(Method::POST, "/batches", KEY_A)
            .header(KEY, &key)
            .header(CONTENT_TYPE, "application/json")
            .body(reqwest::Body::wrap_stream(chunked)),
    )
    .await;
    assert_eq!(
        (retry.status, retry.replayed),
        (200, true),
        "{}",
        retry.body
    );
    // Listing has a deadline too: count the tenant's batches in Redis.
    let batches: Vec<String> = redis::cmd("ZRANGE")
        .arg(app.keys().tenant_batches("tenant-a"))
        .arg(0)
        .arg(-1)
        .query_async(&mut app.store.conn())
        .await
        .unwrap();
    assert_eq!(batches, [retry.body["id"].as_str().unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_of_a_batch_with_one_key_make_one_child() {
    // A retry streams like an upload and takes an upload slot: room for every copy.
    let app = spawn_app_with(AppOptions::default(), |s| s.api.max_uploads_per_tenant = 8).await;
    let lines = vec![
        chat_line("ok", "hello"),
        chat_line_with_mock("bad", json!({"status": 400})),
    ];
    let parent = app.submit(KEY_A, &lines).await;
    app.wait_terminal(KEY_A, &parent, Duration::from_secs(30))
        .await;
    let key = unique_key("retry");
    let path = format!("/batches/{parent}/retry");
    let (child, replayed) = at_once(4, || {
        app.req(Method::POST, &path, KEY_A)
            .header(KEY, &key)
            .json(&json!({"statuses": ["failed"]}))
    })
    .await;
    assert_eq!(replayed, 3);
    let parent = app.get_batch(KEY_A, &parent).await;
    assert_eq!(parent["retries"], json!([child]), "{parent:#}");
    // Another retry request under the key is refused.
    refused(
        app.req(Method::POST, &path, KEY_A)
            .header(KEY, &key)
            .json(&json!({"statuses": ["failed", "expired"]})),
        409,
    )
    .await;
}

/// Longest the SDK script may run (installing the SDK the first time is not counted).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openai_sdk_retrying_a_lost_create_with_a_key_makes_no_duplicate() {
    let app = spawn_app_with(AppOptions::api_only(), |_| {}).await;
    let proxy = LossyProxy::start(&app.base, app.stop.clone()).await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let env = [
        ("SLUICE_MODEL", MODEL),
        ("SLUICE_TIMEOUT", "8"),
        ("SLUICE_RUN", run.as_str()),
    ];
    let stdout =
        run_openai_script("idempotency.py", &proxy.base, KEY_A, &env, SCRIPT_TIMEOUT).await;
    let got: Value = serde_json::from_str(stdout.trim()).expect("the script prints JSON");

    // Each group: the first attempt reached the API and its answer was lost, then the SDK
    // retried on its own (the same request, with the same key where one was given).
    let attempts = |tag: &str| {
        let exchanges = proxy.tagged(tag);
        assert_eq!(exchanges.len(), 2, "{tag}: {exchanges:#?}");
        assert!(exchanges[0].lost && !exchanges[1].lost, "{exchanges:#?}");
        for e in &exchanges {
            assert_eq!(e.status, 200, "{tag}: {e:#?}");
        }
        let id = |e: &sluice_tests::lossy_proxy::Exchange| {
            serde_json::from_str::<Value>(&e.body).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        (id(&exchanges[0]), id(&exchanges[1]), exchanges)
    };

    // Without a key, the SDK's retry made a second batch: what the key is for.
    let (lost, retried, _) = attempts("unkeyed");
    assert_ne!(lost, retried);
    assert_eq!(got["unkeyed"], retried.as_str());

    // With a key, the retry got the first attempt's batch and file back.
    for (tag, field) in [("keyed", "keyed"), ("upload", "file")] {
        let (lost, retried, exchanges) = attempts(tag);
        assert_eq!(lost, retried, "{tag}: {exchanges:#?}");
        assert!(exchanges[1].replayed, "{exchanges:#?}");
        assert!(exchanges[0].idempotency_key.is_some());
        assert_eq!(exchanges[0].idempotency_key, exchanges[1].idempotency_key);
        assert_eq!(got[field], lost.as_str());
    }
    let uploads = proxy.tagged("upload");
    assert_ne!(
        uploads[0].content_type, uploads[1].content_type,
        "each attempt of the upload had a boundary of its own"
    );
    let mut batches = batch_ids(&app, KEY_A).await;
    batches.sort();
    let mut expected = vec![lost, retried, got["keyed"].as_str().unwrap().to_owned()];
    expected.sort();
    assert_eq!(batches, expected, "the unkeyed pair and one keyed batch");
    assert_eq!(file_ids(&app, KEY_A).await, [got["file"].as_str().unwrap()]);
}
