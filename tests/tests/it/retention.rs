//! Lifecycle promises: files deleted at their `expires_at` (bytes and record), result files at
//! their batch's output expiry, batch records after their retention; an input file read by a
//! running batch kept until that batch ends. Clocks are shortened through configuration.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use sluice_core::config::StorageSettings;
use sluice_tests::*;

/// Where the local storage of `app` keeps `relative`.
fn stored(app: &TestApp, relative: &str) -> PathBuf {
    match &app.settings.storage {
        StorageSettings::Local { path } => path.join(relative),
        StorageSettings::S3 { .. } => panic!("these tests use local storage"),
    }
}

/// (status, body) of a request with tenant A's key.
async fn call(app: &TestApp, method: Method, path: &str) -> (u16, String) {
    let resp = app.req(method, path, KEY_A).send().await.expect("request");
    (resp.status().as_u16(), resp.text().await.expect("body"))
}

/// The ids `GET /v1/files` lists for tenant A, and its storage-usage headers.
async fn listing(app: &TestApp) -> (Vec<String>, u64, u64) {
    let resp = app
        .req(Method::GET, "/files", KEY_A)
        .send()
        .await
        .expect("list");
    assert_eq!(resp.status(), 200);
    let header = |name: &str| -> u64 {
        resp.headers()
            .get(name)
            .unwrap_or_else(|| panic!("{name} header"))
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (bytes, files) = (
        header("sluice-storage-used-bytes"),
        header("sluice-storage-used-files"),
    );
    let body: Value = resp.json().await.expect("JSON");
    let ids = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_owned())
        .collect();
    (ids, bytes, files)
}

/// Waits until `gone()` holds, panicking after `timeout`.
async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut gone: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !gone().await {
        assert!(start.elapsed() < timeout, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks that file `id` is gone everywhere: record, bytes at `path`, every route, the listing.
async fn assert_file_gone(app: &TestApp, id: &str, path: &Path) {
    assert!(!path.exists(), "{} still exists", path.display());
    assert!(app.store.get_file(id).await.unwrap().is_none());
    for (method, route) in [
        (Method::GET, format!("/files/{id}")),
        (Method::GET, format!("/files/{id}/content")),
        (Method::DELETE, format!("/files/{id}")),
    ] {
        let (status, body) = call(app, method.clone(), &route).await;
        assert_eq!(status, 404, "{method} {route}: {body}");
        let body: Value = serde_json::from_str(&body).expect("envelope");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    let (ids, _, _) = listing(app).await;
    assert!(!ids.contains(&id.to_owned()), "{id} still listed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_uploaded_file_is_deleted_bytes_and_record_at_its_expiry() {
    let app = spawn_app_with(
        AppOptions {
            worker: false,
            ..AppOptions::default()
        },
        |s| s.lifecycle.batch_file_expires_after_secs = 2,
    )
    .await;
    let content = jsonl(&chat_lines(3));
    let size = content.len() as u64;
    let id = app.upload(KEY_A, content).await;
    let path = stored(&app, &format!("files/{id}.jsonl"));
    assert!(path.exists(), "the upload is stored at {}", path.display());
    let (status, body) = call(&app, Method::GET, &format!("/files/{id}")).await;
    assert_eq!(status, 200, "{body}");
    let file: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        file["expires_at"].as_i64().unwrap(),
        file["created_at"].as_i64().unwrap() + 2
    );
    assert_eq!(listing(&app).await, (vec![id.clone()], size, 1));

    // The sweep deletes the bytes first, then the record.
    wait_until(
        "the expired file's record is deleted",
        Duration::from_secs(30),
        || async { app.store.get_file(&id).await.unwrap().is_none() },
    )
    .await;
    assert_file_gone(&app, &id, &path).await;
    let (_, bytes, files) = listing(&app).await;
    assert_eq!((bytes, files), (0, 0), "expiry gives the storage back");
    let expiring: u64 = redis::cmd("ZCARD")
        .arg(format!("{}:expiring", app.settings.namespace))
        .query_async(&mut app.store.conn())
        .await
        .unwrap();
    assert_eq!(
        expiring, 0,
        "the expiry index is empty once the file is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_s_own_expires_after_sets_its_expiry() {
    let app = spawn_app_with(AppOptions::api_only(), |_| {}).await;
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .text("expires_after[anchor]", "created_at")
        .text("expires_after[seconds]", "3600")
        .part(
            "file",
            reqwest::multipart::Part::bytes(jsonl(&chat_lines(1))).file_name("a.jsonl"),
        );
    let resp = app
        .req(Method::POST, "/files", KEY_A)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let file: Value = resp.json().await.unwrap();
    assert_eq!(
        file["expires_at"].as_i64().unwrap() - file["created_at"].as_i64().unwrap(),
        3600
    );
    // Without one, the configured default (OpenAI's 30 days).
    let id = app.upload(KEY_A, jsonl(&chat_lines(1))).await;
    let (_, body) = call(&app, Method::GET, &format!("/files/{id}")).await;
    let file: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        file["expires_at"].as_i64().unwrap() - file["created_at"].as_i64().unwrap(),
        30 * 86_400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn result_files_are_deleted_at_their_output_expiry_and_the_batch_stays() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.lifecycle.batch_output_expires_after_secs = 3;
    })
    .await;
    let mut lines = chat_lines(3);
    lines.push(chat_line_with_mock("bad", json!({"status": 400})));
    let input_bytes = jsonl(&lines).len() as u64;
    let id = app.submit(KEY_A, &lines).await;
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(30)).await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    let output = batch["output_file_id"].as_str().unwrap().to_owned();
    let errors = batch["error_file_id"].as_str().unwrap().to_owned();
    let (output_lines, error_lines) = app.results(KEY_A, &batch).await;
    assert_eq!((output_lines.len(), error_lines.len()), (3, 1));
    // Result files count toward the tenant's storage.
    let (ids, bytes, files) = listing(&app).await;
    assert_eq!(files, 3, "{ids:?}");
    assert!(bytes > input_bytes, "{bytes} bytes stored");

    wait_until(
        "both result files are deleted",
        Duration::from_secs(30),
        || async {
            app.store.get_file(&output).await.unwrap().is_none()
                && app.store.get_file(&errors).await.unwrap().is_none()
        },
    )
    .await;
    assert_file_gone(
        &app,
        &output,
        &stored(&app, &format!("batches/{id}/output.jsonl")),
    )
    .await;
    assert_file_gone(
        &app,
        &errors,
        &stored(&app, &format!("batches/{id}/errors.jsonl")),
    )
    .await;
    let (_, bytes, files) = listing(&app).await;
    assert_eq!(
        (bytes, files),
        (input_bytes, 1),
        "only the input file is left"
    );
    // The batch record has its own retention (30 days by default).
    let after = app.get_batch(KEY_A, &id).await;
    assert_eq!(after["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_input_file_is_kept_until_the_batch_reading_it_ends() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        // Long enough for the create to take the file before it expires.
        s.lifecycle.batch_file_expires_after_secs = 2;
    })
    .await;
    // Each line takes longer than the file has to live.
    let lines: Vec<Value> = (0..4)
        .map(|i| chat_line_with_mock(&format!("slow-{i}"), json!({"delay_ms": 3_500})))
        .collect();
    let expected: Vec<String> = (0..4).map(|i| format!("slow-{i}")).collect();
    let id = app.submit(KEY_A, &lines).await;
    let input = app.get_batch(KEY_A, &id).await["input_file_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = stored(&app, &format!("files/{input}.jsonl"));
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(30)).await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert_exactly_once(&output, &errors, &expected);
    assert!(errors.is_empty(), "{errors:?}");
    // Past its expiry the file answers 404 already, but its bytes stayed for the batch...
    let (status, _) = call(&app, Method::GET, &format!("/files/{input}")).await;
    assert_eq!(status, 404);
    // ...and go once the batch has ended.
    wait_until(
        "the input file is deleted after its batch",
        Duration::from_secs(30),
        || async { app.store.get_file(&input).await.unwrap().is_none() },
    )
    .await;
    assert_file_gone(&app, &input, &path).await;

    // A batch created over an expired file fails like one over a missing file.
    let file = app.upload(KEY_A, jsonl(&chat_lines(1))).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (status, body) = app
        .create_batch_raw(
            KEY_A,
            json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        )
        .await;
    if status == 200 {
        let id = body["id"].as_str().unwrap();
        let batch = app.wait_terminal(KEY_A, id, Duration::from_secs(30)).await;
        assert_eq!(batch["status"], "failed", "{batch:#}");
    } else {
        assert_eq!(status, 404, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_record_is_removed_after_its_retention() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.lifecycle.batch_retention_secs = 2;
    })
    .await;
    let id = app.submit(KEY_A, &chat_lines(2)).await;
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(30)).await;
    assert_eq!(batch["status"], "completed");
    let keys = app.keys();
    let segments_dir = match &app.settings.storage {
        sluice_core::config::StorageSettings::Local { path } => {
            path.join(format!("batches/{id}/segments"))
        }
        _ => unreachable!("local storage in this test"),
    };
    assert!(
        segments_dir.exists(),
        "finalize leaves the batch's segments for /results"
    );
    wait_until(
        "the batch record is removed",
        Duration::from_secs(30),
        || async { app.get_batch_raw(KEY_A, &id).await.0 == 404 },
    )
    .await;
    let (_, body) = app.get_batch_raw(KEY_A, &id).await;
    assert!(body["error"]["message"].is_string(), "{body}");
    let (status, list) = {
        let resp = app
            .req(Method::GET, "/batches", KEY_A)
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 200);
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["id"] != id),
        "{list}"
    );
    let mut conn = app.store.conn();
    for key in [
        keys.batch_meta(&id),
        keys.batch_rows(&id),
        keys.batch_inflight(&id),
        keys.batch_done(&id),
        keys.batch_segments(&id),
    ] {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(exists, 0, "{key} left behind");
    }
    for set in [
        keys.tenant_batches("tenant-a"),
        keys.ended_batches(),
        keys.active(),
    ] {
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(&set)
            .arg(&id)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(score.is_none(), "{id} still in {set}");
    }
    let left = std::fs::read_dir(&segments_dir).map_or(0, |d| d.count());
    assert_eq!(
        left,
        0,
        "segment objects left in {}",
        segments_dir.display()
    );
    // Its result files have their own expiry and are still there.
    let output = batch["output_file_id"].as_str().unwrap();
    assert_eq!(
        call(&app, Method::GET, &format!("/files/{output}")).await.0,
        200
    );
}
