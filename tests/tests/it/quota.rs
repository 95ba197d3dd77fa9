//! Per-tenant storage quota: uploads past it are refused with 403 `storage_quota_exceeded`,
//! `GET /v1/files` shows the usage, deletes give the room back, concurrent uploads never pass the
//! quota between them, and another tenant is not affected.

use reqwest::Method;
use serde_json::Value;
use sluice_tests::*;

/// A JSONL upload of exactly `size` bytes (one line padded with spaces).
fn file_of(size: usize) -> Vec<u8> {
    // Uploads are not validated line by line; the batch that reads them is.
    let mut line = br#"{"custom_id":"q"}"#.to_vec();
    assert!(line.len() < size);
    line.resize(size - 1, b' ');
    line.push(b'\n');
    line
}

/// (used bytes, limit bytes, used files, limit files) from `GET /v1/files` as `key`.
async fn usage(app: &TestApp, key: &str) -> (u64, u64, u64, u64) {
    let resp = app.req(Method::GET, "/files", key).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let h = |name: &str| -> u64 { resp.headers()[name].to_str().unwrap().parse().unwrap() };
    (
        h("sluice-storage-used-bytes"),
        h("sluice-storage-limit-bytes"),
        h("sluice-storage-used-files"),
        h("sluice-storage-limit-files"),
    )
}

/// Asserts a refusal is the quota's envelope.
async fn assert_quota_refusal(resp: reqwest::Response, mentions: &str) {
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["x-should-retry"], "false");
    let body: Value = resp.json().await.unwrap();
    let error = &body["error"];
    assert_eq!(error["code"], "storage_quota_exceeded", "{body}");
    assert_eq!(error["type"], "invalid_request_error", "{body}");
    assert_eq!(error["param"], "file", "{body}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(mentions), "{message}");
}

/// Files stored for `app`'s tenant A under `files/`.
fn stored_uploads(app: &TestApp) -> usize {
    let sluice_core::config::StorageSettings::Local { path } = &app.settings.storage else {
        panic!("local storage");
    };
    std::fs::read_dir(path.join("files")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_past_the_quota_are_refused_and_deletes_give_room_back() {
    let app = spawn_app_with(AppOptions::api_only(), |s| {
        s.tenants[0].storage_quota_bytes = Some(1_000);
        s.tenants[0].storage_quota_files = Some(3);
    })
    .await;
    assert_eq!(usage(&app, KEY_A).await, (0, 1_000, 0, 3));
    let first = app.upload(KEY_A, file_of(400)).await;
    app.upload(KEY_A, file_of(400)).await;
    assert_eq!(usage(&app, KEY_A).await, (800, 1_000, 2, 3));

    // 400 more bytes would make 1,200: refused, and nothing stays behind.
    let resp = app.upload_raw(KEY_A, "c.jsonl", file_of(400)).await;
    assert_quota_refusal(resp, "1000 bytes").await;
    assert_eq!(usage(&app, KEY_A).await, (800, 1_000, 2, 3));
    assert_eq!(
        stored_uploads(&app),
        2,
        "the refused upload's bytes are removed"
    );

    // Tenant B has the default quota and its own usage.
    let (used, limit, files, _) = usage(&app, KEY_B).await;
    assert_eq!((used, files), (0, 0));
    assert_eq!(limit, app.settings.lifecycle.storage_quota_bytes);
    app.upload(KEY_B, file_of(400)).await;

    // A delete gives the bytes back.
    let resp = app
        .req(Method::DELETE, &format!("/files/{first}"), KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(usage(&app, KEY_A).await, (400, 1_000, 1, 3));
    app.upload(KEY_A, file_of(400)).await;
    app.upload(KEY_A, file_of(100)).await;
    assert_eq!(usage(&app, KEY_A).await, (900, 1_000, 3, 3));

    // The file count is a limit of its own.
    let resp = app.upload_raw(KEY_A, "d.jsonl", file_of(50)).await;
    assert_quota_refusal(resp, "3 files").await;
    assert_eq!(usage(&app, KEY_A).await, (900, 1_000, 3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uploads_never_pass_the_quota() {
    const QUOTA: u64 = 10_000;
    const SIZE: usize = 1_000;
    const UPLOADS: usize = 24;
    let app = spawn_app_with(AppOptions::api_only(), |s| {
        s.tenants[0].storage_quota_bytes = Some(QUOTA);
        s.api.max_uploads_per_tenant = 64;
    })
    .await;
    let uploads = (0..UPLOADS).map(|i| {
        let app = &app;
        async move {
            let resp = app
                .upload_raw(KEY_A, &format!("u{i}.jsonl"), file_of(SIZE))
                .await;
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap();
            (status, body)
        }
    });
    let answers = futures::future::join_all(uploads).await;
    let accepted = answers.iter().filter(|(s, _)| *s == 200).count();
    for (status, body) in &answers {
        assert!(
            *status == 200 || (*status == 403 && body["error"]["code"] == "storage_quota_exceeded"),
            "{status}: {body}"
        );
    }
    assert_eq!(accepted, (QUOTA as usize) / SIZE, "{answers:?}");
    let (used, _, files, _) = usage(&app, KEY_A).await;
    assert_eq!((used, files), (QUOTA, accepted as u64));
    let listed = app.get_json(KEY_A, "/files").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), accepted);
    assert_eq!(
        stored_uploads(&app),
        accepted,
        "refused uploads leave no bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn result_files_count_toward_the_quota_and_are_never_refused() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.tenants[0].storage_quota_files = Some(2);
    })
    .await;
    let id = app.submit(KEY_A, &chat_lines(2)).await;
    let batch = app
        .wait_terminal(KEY_A, &id, std::time::Duration::from_secs(30))
        .await;
    assert_eq!(batch["status"], "completed");
    // Input and output: the tenant is at its file quota, and the next upload waits for room.
    let (used, _, files, _) = usage(&app, KEY_A).await;
    assert_eq!(files, 2);
    let output = batch["output_file_id"].as_str().unwrap();
    let output_bytes = app.file_content(KEY_A, output).await.len() as u64;
    assert!(used >= output_bytes, "{used}");
    let resp = app.upload_raw(KEY_A, "more.jsonl", file_of(200)).await;
    assert_quota_refusal(resp, "2 files").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_jsonl_body_batch_past_the_quota_is_refused_and_holds_no_open_batch() {
    let app = spawn_app_with(AppOptions::api_only(), |s| {
        s.tenants[0].storage_quota_bytes = Some(100);
        s.limits.max_open_batches = 1;
    })
    .await;
    let send = || {
        app.req(Method::POST, "/batches", KEY_A)
            .header("content-type", "application/jsonl")
            .body(jsonl(&chat_lines(3)))
            .send()
    };
    for _ in 0..2 {
        // Refused for the quota both times: the first refusal gave its open-batch slot back.
        assert_quota_refusal(send().await.unwrap(), "100 bytes").await;
    }
    assert_eq!(
        usage(&app, KEY_A).await,
        (0, 100, 0, app.settings.lifecycle.storage_quota_files)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_file_stored_before_accounting_gives_back_nothing() {
    let app = spawn_app_with(AppOptions::api_only(), |_| {}).await;
    let keys = app.keys();
    // A file as an earlier release stored it: recorded and listed, never counted.
    let id = "file-before-accounting";
    let mut conn = app.store.conn();
    let () = redis::cmd("HSET")
        .arg(keys.file(id))
        .arg(&[
            ("id", id),
            ("tenant", "tenant-a"),
            ("bytes", "5000"),
            ("created_at", "1"),
        ])
        .arg(&[
            ("filename", "old.jsonl"),
            ("purpose", "batch"),
            ("path", "files/old.jsonl"),
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    let () = redis::cmd("ZADD")
        .arg(keys.tenant_files("tenant-a"))
        .arg(1)
        .arg(id)
        .query_async(&mut conn)
        .await
        .unwrap();
    app.upload(KEY_A, file_of(300)).await;
    let resp = app
        .req(Method::DELETE, &format!("/files/{id}"), KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (used, _, files, _) = usage(&app, KEY_A).await;
    assert_eq!(
        (used, files),
        (300, 1),
        "the counted upload is still counted"
    );
    app.upload(KEY_A, file_of(200)).await;
    let (used, _, files, _) = usage(&app, KEY_A).await;
    assert_eq!((used, files), (500, 2));
}
