//! What one client can hold of the API: slow or idle sockets,
//! stalled uploads, too many uploads at once, slow dependencies, blank keys, and deleting the
//! input file of a running batch.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::Value;
use sluice_tests::redis_server::RedisServer;
use sluice_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::api_errors::{assert_envelope, error_body};

/// Generous bound for anything that should happen "soon".
const SOON: Duration = Duration::from_secs(30);

fn host(app: &TestApp) -> String {
    app.base
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_owned()
}

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(host(app)).await.expect("connect")
}

/// Reads until the server closes the connection (or `SOON` passes); returns what arrived.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(SOON, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server kept the connection open");
    got
}

/// Status and JSON body of a raw HTTP/1.1 answer.
fn parse_answer(raw: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    (status, json)
}

/// Regular files under `dir` (an object store's objects, staged parts included).
fn files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path.display().to_string());
        }
    }
    found
}

fn storage_dir(app: &TestApp) -> std::path::PathBuf {
    match &app.settings.storage {
        sluice_core::config::StorageSettings::Local { path } => path.clone(),
        other => panic!("tests store files locally, not in {other:?}"),
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// Sends the head and the first part of a multipart upload, announcing far more, then stops.
async fn start_stalled_upload(app: &TestApp, key: &str) -> TcpStream {
    let boundary = "sluice-stalled-upload";
    let lines = jsonl(&chat_lines(500));
    let mut partial = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    partial.extend_from_slice(&lines);
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\n\r\n",
        host(app),
        partial.len() + 10_000_000
    );
    let mut stream = connect(app).await;
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(&partial).await.expect("partial body");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blank_and_undecodable_api_keys_are_refused_with_401() {
    let app = spawn_app_with(AppOptions::api_only(), |_| {}).await;
    let cases: Vec<(&str, HeaderValue)> = vec![
        ("authorization", HeaderValue::from_static("")),
        ("authorization", HeaderValue::from_static("   ")),
        ("authorization", HeaderValue::from_static("Bearer")),
        ("authorization", HeaderValue::from_static("Bearer    ")),
        (
            "authorization",
            HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap(),
        ),
        ("x-api-key", HeaderValue::from_static("")),
        ("x-api-key", HeaderValue::from_static("  ")),
        ("x-api-key", HeaderValue::from_bytes(b"\xc3\x28").unwrap()),
    ];
    for (name, value) in cases {
        let mut headers = HeaderMap::new();
        headers.insert(name, value.clone());
        let resp = app
            .http
            .get(format!("{}/files", app.base))
            .headers(headers)
            .send()
            .await
            .expect("request");
        let body = error_body(resp, 401).await;
        assert_eq!(
            body["error"]["code"], "invalid_api_key",
            "{name}: {value:?}"
        );
    }
    // A real key still works.
    let resp = app.req(Method::GET, "/files", KEY_A).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_sends_headers_slowly_is_cut_after_the_header_timeout() {
    let app = spawn_app_with(AppOptions::api_only(), |s| {
        s.api.header_read_timeout_ms = 500;
    })
    .await;
    // Half a request head, then nothing.
    let mut slow = connect(&app).await;
    slow.write_all(b"GET /v1/files HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // A connection that never sends a byte.
    let mut silent = connect(&app).await;
    let started = Instant::now();
    read_until_closed(&mut slow).await;
    read_until_closed(&mut silent).await;
    // Not a speed assertion: the cut must come from the timeout, not from something immediate.
    assert!(started.elapsed() >= Duration::from_millis(400));
    // The server itself is fine.
    let resp = app.req(Method::GET, "/files", KEY_A).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sockets_beyond_the_connection_cap_hold_no_descriptors_and_do_not_starve_a_client() {
    const CAP: usize = 4;
    const IDLE: usize = 40;
    let app = spawn_app_with(AppOptions::api_only(), |s| {
        s.api.max_connections = CAP;
        s.api.header_read_timeout_ms = 1_000;
    })
    .await;
    let before = open_fds();
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(connect(&app).await);
    }
    // Give the server time to accept whatever it would accept.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = open_fds().saturating_sub(before);
    // Our own IDLE client sockets, at most CAP accepted by the server, and a little slack for
    // the runtime; without the cap the server would hold one descriptor per idle socket too.
    assert!(
        held <= IDLE + CAP + 8,
        "{held} descriptors for {IDLE} idle sockets with a cap of {CAP}"
    );
    // A normal client queued behind them is served once the idle ones time out.
    let resp = tokio::time::timeout(
        Duration::from_secs(60),
        app.req(Method::GET, "/files", KEY_A).send(),
    )
    .await
    .expect("served in time")
    .expect("request");
    assert_eq!(resp.status(), 200);
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_upload_is_dropped_with_408_and_leaves_no_partial_object() {
    let app = spawn_app_with(AppOptions::api_only(), |s| {
        s.api.body_idle_timeout_ms = 500;
    })
    .await;

    // A multipart file upload that stops mid-file.
    let mut upload = start_stalled_upload(&app, KEY_A).await;
    let (status, body) = parse_answer(&read_until_closed(&mut upload).await);
    assert_eq!(status, 408, "{body}");
    assert_envelope(&body);
    assert_eq!(body["error"]["code"], "request_body_timeout");

    // A JSONL-body create, chunked, that stops mid-line.
    let mut create = connect(&app).await;
    let head = format!(
        "POST /v1/batches HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {KEY_A}\r\n\
         Content-Type: application/jsonl\r\nTransfer-Encoding: chunked\r\n\r\n",
        host(&app)
    );
    let mut chunk = jsonl(&chat_lines(200));
    chunk.extend_from_slice(b"{\"custom_id\": \"half");
    create.write_all(head.as_bytes()).await.unwrap();
    create
        .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
        .await
        .unwrap();
    create.write_all(&chunk).await.unwrap();
    create.write_all(b"\r\n").await.unwrap();
    let (status, body) = parse_answer(&read_until_closed(&mut create).await);
    assert_eq!(status, 408, "{body}");
    assert_eq!(body["error"]["code"], "request_body_timeout");

    // Nothing stored, nothing listed, nothing counted against the tenant.
    let leftovers = files_under(&storage_dir(&app));
    assert!(leftovers.is_empty(), "partial objects left: {leftovers:?}");
    let list = app.get_json(KEY_A, "/files").await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(0), "{list}");
    assert_eq!(app.store.open_batches("tenant-a").await.unwrap(), 0);
    // And the server still takes a normal upload.
    app.upload(KEY_A, jsonl(&chat_lines(3))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_per_tenant_upload_cap_answers_429_and_other_tenants_still_upload() {
    let app = spawn_app_with(AppOptions::api_only(), |s| {
        s.api.max_uploads_per_tenant = 2;
    })
    .await;
    let stalled = vec![
        start_stalled_upload(&app, KEY_A).await,
        start_stalled_upload(&app, KEY_A).await,
    ];
    // Once the server has read both heads, A's third upload is refused.
    let started = Instant::now();
    let refused = loop {
        let resp = app
            .upload_raw(KEY_A, "input.jsonl", jsonl(&chat_lines(2)))
            .await;
        if resp.status() == 429 {
            break error_body(resp, 429).await;
        }
        assert_eq!(resp.status(), 200);
        assert!(started.elapsed() < SOON, "no 429 while two uploads stall");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused["error"]["code"], "too_many_uploads", "{refused}");
    // Another tenant is not affected.
    app.upload(KEY_B, jsonl(&chat_lines(2))).await;
    // Hanging up gives the slots back.
    drop(stalled);
    let started = Instant::now();
    loop {
        let resp = app
            .upload_raw(KEY_A, "input.jsonl", jsonl(&chat_lines(2)))
            .await;
        if resp.status() == 200 {
            break;
        }
        assert_eq!(resp.status(), 429);
        assert!(started.elapsed() < SOON, "the slots were never given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_dependency_answers_503_within_the_request_timeout_but_downloads_stream_on() {
    let redis = RedisServer::start(&["--appendonly", "no"]);
    let url = redis.url();
    let app = spawn_app_with(AppOptions::api_only(), |s| {
        s.redis_url = url;
        s.api.request_timeout_ms = 300;
    })
    .await;
    // A download slower than the request timeout is not cut.
    let content = jsonl(&chat_lines(20_000));
    let file = app.upload(KEY_A, content.clone()).await;
    let mut resp = app
        .req(Method::GET, &format!("/files/{file}/content"), KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut got = Vec::new();
    while let Some(chunk) = resp.chunk().await.expect("download keeps streaming") {
        got.extend_from_slice(&chunk);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got.len(), content.len());

    redis.signal("STOP");
    let resp = app
        .req(Method::GET, "/batches", KEY_A)
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("x-should-retry").is_none());
    let body = error_body(resp, 503).await;
    assert_eq!(body["error"]["code"], "request_timeout", "{body}");
    redis.signal("CONT");
    let resp = app
        .req(Method::GET, "/batches", KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_the_input_of_a_running_batch_is_refused_and_the_batch_completes_with_every_row() {
    let app = spawn_app_with(
        AppOptions {
            mock: sluice_cli::mock_upstream::MockConfig {
                latency_ms: 1_000,
                ..Default::default()
            },
            ..AppOptions::default()
        },
        |_| {},
    )
    .await;
    let lines = chat_lines(20);
    let file = app.upload(KEY_A, jsonl(&lines)).await;
    let id = app.create_batch(KEY_A, &file).await;

    let resp = app
        .req(Method::DELETE, &format!("/files/{file}"), KEY_A)
        .send()
        .await
        .unwrap();
    let body = error_body(resp, 409).await;
    assert_eq!(body["error"]["code"], "file_in_use", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains(&id),
        "{body}"
    );
    // Still there, still readable.
    assert!(!app.file_content(KEY_A, &file).await.is_empty());

    let batch = app
        .wait_terminal(KEY_A, &id, Duration::from_secs(120))
        .await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    assert_eq!(batch["request_counts"]["completed"], 20, "{batch:#}");
    let (output, errors) = app.results(KEY_A, &batch).await;
    let expected: Vec<String> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_owned())
        .collect();
    assert_exactly_once(&output, &errors, &expected);
    assert!(errors.is_empty(), "{errors:?}");

    // Once the batch has ended, the file can go.
    let resp = app
        .req(Method::DELETE, &format!("/files/{file}"), KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_whose_input_is_lost_while_it_runs_ends_failed_instead_of_spinning() {
    let app = spawn_app_with(
        AppOptions {
            mock: sluice_cli::mock_upstream::MockConfig {
                latency_ms: 200,
                ..Default::default()
            },
            ..AppOptions::default()
        },
        |s| {
            // A small window, so the dispatcher has to read the input again to top it up.
            s.worker.batch_window = 2;
            s.worker.lines_per_message = 1;
        },
    )
    .await;
    let file = app.upload(KEY_A, jsonl(&chat_lines(40))).await;
    let id = app.create_batch(KEY_A, &file).await;
    app.wait_for(KEY_A, &id, SOON, |b| b["status"] == "in_progress")
        .await;
    // Storage loses the file behind the API's back (the record and the bytes).
    app.store.delete_file(&file, "tenant-a").await.unwrap();
    for path in files_under(&storage_dir(&app)) {
        if path.contains(&file) {
            std::fs::remove_file(path).unwrap();
        }
    }

    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(60)).await;
    assert_eq!(batch["status"], "failed", "{batch:#}");
    assert_eq!(
        batch["errors"]["data"][0]["code"], "input_file_lost",
        "{batch:#}"
    );
    let counts = &batch["request_counts"];
    assert_eq!(counts["total"], 40, "{batch:#}");
    assert!(counts["failed"].as_u64().unwrap() > 0, "{batch:#}");
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert_eq!(output.len() + errors.len(), 40);
    assert!(
        errors
            .iter()
            .all(|e| e["error"]["code"] == "input_file_lost"),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_racing_a_delete_of_its_input_either_runs_whole_or_fails_cleanly() {
    let app = spawn_app().await;
    let lines = chat_lines(3);
    let mut outcomes = (0, 0);
    for _ in 0..20 {
        let file = app.upload(KEY_A, jsonl(&lines)).await;
        let body = serde_json::json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
        let delete = app
            .req(Method::DELETE, &format!("/files/{file}"), KEY_A)
            .send();
        let ((status, created), deleted) = tokio::join!(app.create_batch_raw(KEY_A, body), delete);
        assert_eq!(status, 200, "{created}");
        let deleted = deleted.unwrap().status().as_u16();
        let id = created["id"].as_str().unwrap();
        let batch = app.wait_terminal(KEY_A, id, SOON).await;
        match deleted {
            // The delete came first: the batch never ran and says why.
            200 => {
                outcomes.0 += 1;
                assert_eq!(batch["status"], "failed", "{batch:#}");
                assert_eq!(batch["errors"]["data"][0]["param"], "file_id", "{batch:#}");
            }
            // The create came first: the file stayed and every line ran.
            409 => {
                outcomes.1 += 1;
                assert_eq!(batch["status"], "completed", "{batch:#}");
                assert_eq!(batch["request_counts"]["completed"], 3, "{batch:#}");
            }
            other => panic!("delete answered {other}"),
        }
    }
    eprintln!(
        "deleted first {} times, created first {} times",
        outcomes.0, outcomes.1
    );
}
