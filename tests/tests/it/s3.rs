//! The end-to-end suite's core cases with `storage.kind = "s3"` against a real S3-compatible
//! server (moto's, started by the tests: [`sluice_tests::s3_server`]): upload, run, download;
//! inline create; cancel; a result file large enough for a multipart upload; file deletion; a
//! worker killed mid-batch.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use sluice_core::config::StorageSettings;
use sluice_tests::s3_server::S3Server;
use sluice_tests::*;

/// An app whose files live in a fresh bucket under `prefix`.
async fn s3_app(prefix: Option<&str>) -> TestApp {
    let options = AppOptions {
        storage: StorageKind::S3,
        ..AppOptions::default()
    };
    spawn_app_with(options, |s| {
        if let StorageSettings::S3 { prefix: p, .. } = &mut s.storage {
            *p = prefix.map(str::to_owned);
        }
    })
    .await
}

fn bucket(app: &TestApp) -> String {
    match &app.settings.storage {
        StorageSettings::S3 { bucket, .. } => bucket.clone(),
        StorageSettings::Local { .. } => panic!("an S3 app"),
    }
}

/// Every object key in the app's bucket, as the server lists them.
fn objects(app: &TestApp) -> BTreeSet<String> {
    S3Server::shared()
        .list_keys(&bucket(app), "")
        .into_iter()
        .collect()
}

/// The storage path a file record points at.
async fn stored_path(app: &TestApp, file_id: &str) -> String {
    app.store
        .get_file(file_id)
        .await
        .expect("redis")
        .unwrap_or_else(|| panic!("file {file_id} has a record"))
        .path()
        .to_owned()
}

async fn delete_file(app: &TestApp, file_id: &str) {
    let resp = app
        .req(Method::DELETE, &format!("/files/{file_id}"), KEY_A)
        .send()
        .await
        .expect("delete");
    let status = resp.status();
    let body: Value = resp.json().await.expect("JSON");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], true, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_uploaded_batch_runs_on_s3_and_deleting_its_files_removes_their_objects() {
    let app = s3_app(Some("tenant-files")).await;
    let expected: Vec<String> = req_ids(300);
    let failing: BTreeSet<String> = expected.iter().step_by(7).cloned().collect();
    let lines: Vec<Value> = expected
        .iter()
        .map(|id| {
            let mock = if failing.contains(id) {
                json!({"status": 404})
            } else {
                json!({})
            };
            chat_line_with_mock(id, mock)
        })
        .collect();
    let input = app.upload(KEY_A, jsonl(&lines)).await;
    // What was stored is what was sent, byte for byte, read back from the bucket.
    assert_eq!(
        app.file_content(KEY_A, &input).await.into_bytes(),
        jsonl(&lines)
    );
    let id = app.create_batch(KEY_A, &input).await;

    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(60)).await;

    assert_eq!(batch["status"], "completed", "{batch:#}");
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert_exactly_once(&output, &errors, &expected);
    let in_order = |lines: &[Value]| {
        let ids: Vec<u64> = lines
            .iter()
            .map(|l| l["custom_id"].as_str().unwrap()[4..].parse().unwrap())
            .collect();
        ids.windows(2).all(|w| w[0] < w[1])
    };
    assert!(in_order(&output) && in_order(&errors), "input order");
    let failed: BTreeSet<String> = errors
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(failed, failing);
    assert_eq!(batch["request_counts"]["failed"], failing.len());
    // Tenant B sees none of it.
    let (status, _) = app.get_batch_raw(KEY_B, &id).await;
    assert_eq!(status, 404);
    let foreign = app
        .req(
            Method::GET,
            &format!(
                "/files/{}/content",
                batch["output_file_id"].as_str().unwrap()
            ),
            KEY_B,
        )
        .send()
        .await
        .expect("content");
    assert_eq!(foreign.status(), 404);

    // Every file is an object under the configured prefix, and no multipart upload is left open.
    let file_ids = [
        input.clone(),
        batch["output_file_id"].as_str().unwrap().to_owned(),
        batch["error_file_id"].as_str().unwrap().to_owned(),
    ];
    let mut paths = Vec::new();
    for file in &file_ids {
        paths.push(format!("tenant-files/{}", stored_path(&app, file).await));
    }
    let before = objects(&app);
    for path in &paths {
        assert!(before.contains(path), "{path} is not in {before:?}");
    }
    assert!(
        before.iter().all(|k| k.starts_with("tenant-files/")),
        "{before:?}"
    );
    assert_eq!(S3Server::shared().open_multipart_uploads(&bucket(&app)), 0);

    for file in &file_ids {
        delete_file(&app, file).await;
    }
    let after = objects(&app);
    for path in &paths {
        assert!(!after.contains(path), "{path} survived its file's deletion");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_inline_batch_runs_on_s3() {
    let app = s3_app(None).await;
    let requests: Vec<Value> = (0..25)
        .map(|i| {
            json!({"custom_id": format!("inline-{i}"), "body": {
                "model": MODEL, "messages": [{"role": "user", "content": format!("q {i}")}]
            }})
        })
        .collect();
    let (status, created) = app
        .create_batch_raw(
            KEY_A,
            json!({"requests": requests, "completion_window": "24h"}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().unwrap();
    let input = created["input_file_id"].as_str().unwrap();
    assert!(
        objects(&app).contains(&stored_path(&app, input).await),
        "the inline requests are stored as an input file in the bucket"
    );

    let batch = app.wait_terminal(KEY_A, id, Duration::from_secs(30)).await;

    assert_eq!(batch["status"], "completed", "{batch:#}");
    let (output, errors) = app.results(KEY_A, &batch).await;
    let expected: Vec<String> = (0..25).map(|i| format!("inline-{i}")).collect();
    assert_exactly_once(&output, &errors, &expected);
    assert!(errors.is_empty());
    assert_eq!(output[3]["response"]["status_code"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_mid_run_on_s3_accounts_for_every_line() {
    crate::lifecycle::cancel_mid_run(StorageKind::S3, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_are_compacted_into_s3_segments_while_the_batch_runs() {
    crate::compaction::compaction_during_run(StorageKind::S3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_batch_on_s3_loses_and_duplicates_nothing() {
    crate::chaos::worker_killed_mid_batch(StorageKind::S3).await;
}

/// Embedding width of the large-output test: ~80 KB per result line.
const DIMS: usize = 4_096;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn input_and_output_files_past_one_part_are_uploaded_in_parts_and_read_back_whole() {
    let app = s3_app(None).await;
    // ~60 KB of input text per line: a 12 MB upload, streamed to the bucket in 5 MiB parts.
    let lines: Vec<Value> = (0..200)
        .map(|i| {
            json!({
                "custom_id": format!("emb-{i}"),
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {
                    "model": "mock-embed",
                    "input": format!("text {i} {}", "w".repeat(60_000)),
                    "dimensions": DIMS,
                },
            })
        })
        .collect();
    let upload = jsonl(&lines);
    assert!(upload.len() > 11 * 1024 * 1024);
    let input = app.upload(KEY_A, upload.clone()).await;
    assert!(
        app.file_content(KEY_A, &input).await.into_bytes() == upload,
        "the input read back differs from the upload"
    );
    let server = S3Server::shared();
    let input_parts = server.parts(&bucket(&app), &stored_path(&app, &input).await);
    assert!(
        input_parts >= Some(2),
        "input stored in {input_parts:?} parts"
    );
    let (status, created) = app
        .create_batch_raw(
            KEY_A,
            json!({"input_file_id": input, "endpoint": "/v1/embeddings", "completion_window": "24h"}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().unwrap();

    let batch = app.wait_terminal(KEY_A, id, Duration::from_secs(120)).await;

    assert_eq!(batch["status"], "completed", "{batch:#}");
    let output_id = batch["output_file_id"].as_str().unwrap();
    let content = app.file_content(KEY_A, output_id).await;
    // Past the aggregator's 8 MiB part: more than one part was uploaded and completed in order.
    assert!(
        content.len() > 9 * 1024 * 1024,
        "the output is {} bytes, too small to need several parts",
        content.len()
    );
    let meta = app.store.get_file(output_id).await.unwrap().unwrap();
    assert_eq!(meta.get("bytes"), Some(content.len().to_string().as_str()));
    let output: Vec<Value> = content
        .lines()
        .map(|l| serde_json::from_str(l).expect("whole JSON lines"))
        .collect();
    let expected: Vec<String> = (0..200).map(|i| format!("emb-{i}")).collect();
    let ids: Vec<&str> = output
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, expected.iter().map(String::as_str).collect::<Vec<_>>());
    for line in &output {
        let vector = &line["response"]["body"]["data"][0]["embedding"];
        assert_eq!(
            vector.as_array().map(Vec::len),
            Some(DIMS),
            "{}",
            line["custom_id"]
        );
    }
    let output_parts = server.parts(&bucket(&app), &stored_path(&app, output_id).await);
    assert!(
        output_parts >= Some(2),
        "output stored in {output_parts:?} parts"
    );
    assert_eq!(server.open_multipart_uploads(&bucket(&app)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_download_outlasting_the_storage_request_timeout_still_gets_every_byte() {
    let options = AppOptions {
        storage: StorageKind::S3,
        ..AppOptions::api_only()
    };
    let app = spawn_app_with(options, |s| {
        s.dependencies.storage_request_timeout_ms = 1_000;
    })
    .await;
    // 32 MB: more than the socket buffers between the bucket, the API and this client hold, so
    // the API reads from the bucket all along the download.
    let lines: Vec<Value> = (0..320)
        .map(|i| chat_line(&format!("big-{i}"), &"x".repeat(100_000)))
        .collect();
    let upload = jsonl(&lines);
    let file = app.upload(KEY_A, upload.clone()).await;

    // A client that pauses longer than the timeout, many times: each pause stalls the API's read
    // from the bucket. The timeout bounds a stalled store, not a slow client (and more pauses than
    // `object_store` retries a broken read, resuming it where it stopped).
    let mut resp = app
        .req(Method::GET, &format!("/files/{file}/content"), KEY_A)
        .send()
        .await
        .expect("content");
    assert_eq!(resp.status(), 200);
    let mut body = Vec::with_capacity(upload.len());
    let mut next_pause = 0;
    let mut pauses = 0;
    while let Some(chunk) = resp.chunk().await.expect("the download goes on to its end") {
        body.extend_from_slice(&chunk);
        if body.len() >= next_pause && pauses < 24 {
            tokio::time::sleep(Duration::from_millis(1_100)).await;
            pauses += 1;
            next_pause += 1024 * 1024;
        }
    }
    assert_eq!(pauses, 24);
    assert!(
        body == upload,
        "{} bytes of {} came back",
        body.len(),
        upload.len()
    );
}
