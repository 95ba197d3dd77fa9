//! Tenant isolation: another tenant's objects are indistinguishable from missing ones, never listed,
//! never usable as batch input, and never changed.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use sluice_tests::*;

use crate::api_errors::{error_body, expect_ok};

/// `body` with every occurrence of `id` replaced by a placeholder, so that answers about two
/// different ids can be compared.
fn without_id(body: &Value, id: &str) -> Value {
    serde_json::from_str(&body.to_string().replace(id, "<ID>")).expect("still JSON")
}

/// The 404 that `key` gets for `method path` where the path holds `id`, with the id blanked out.
async fn not_found(
    app: &TestApp,
    key: &str,
    method: Method,
    path_template: &str,
    id: &str,
) -> Value {
    let path = path_template.replace("{id}", id);
    let resp = app
        .req(method, &path, key)
        .send()
        .await
        .expect("request is answered");
    without_id(&error_body(resp, 404).await, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_tenants_files_and_batches_are_indistinguishable_from_missing_ones() {
    let app = spawn_app().await;

    // Tenant A: a file, a completed batch over it, its output file.
    let lines = chat_lines(3);
    let file_a = app.upload(KEY_A, jsonl(&lines)).await;
    let batch_a = app.create_batch(KEY_A, &file_a).await;
    let done = app
        .wait_terminal(KEY_A, &batch_a, Duration::from_secs(20))
        .await;
    assert_eq!(done["status"], "completed", "{done:#}");
    let out_a = done["output_file_id"]
        .as_str()
        .expect("output file")
        .to_owned();
    let get = |path: String| app.req(Method::GET, &path, KEY_A);
    let file_a_obj = expect_ok(get(format!("/files/{file_a}"))).await;
    let out_a_obj = expect_ok(get(format!("/files/{out_a}"))).await;
    let file_a_content = app.file_content(KEY_A, &file_a).await;
    let out_a_content = app.file_content(KEY_A, &out_a).await;
    assert_eq!(file_a_content.as_bytes(), jsonl(&lines));
    let calls_before = app.upstream_stats().calls;
    assert_eq!(calls_before, 3);

    // Tenant B probes every per-object route with A's ids and with ids that exist nowhere: the
    // answers are the same, byte for byte once the id is blanked out.
    let missing_file = format!("file-{}", uuid::Uuid::new_v4().simple());
    let missing_batch = format!("batch_{}", uuid::Uuid::new_v4().simple());
    let file_routes = [
        (Method::GET, "/files/{id}"),
        (Method::GET, "/files/{id}/content"),
        (Method::DELETE, "/files/{id}"),
    ];
    for a_file in [&file_a, &out_a] {
        for (method, route) in &file_routes {
            let foreign = not_found(&app, KEY_B, method.clone(), route, a_file).await;
            let missing = not_found(&app, KEY_B, method.clone(), route, &missing_file).await;
            assert_eq!(
                foreign, missing,
                "{method} {route}: A's file differs from a missing one"
            );
            // And it is what A itself would get for a missing id.
            assert_eq!(
                not_found(&app, KEY_A, method.clone(), route, &missing_file).await,
                missing
            );
        }
    }
    for (method, route) in [
        (Method::GET, "/batches/{id}"),
        (Method::POST, "/batches/{id}/cancel"),
    ] {
        let foreign = not_found(&app, KEY_B, method.clone(), route, &batch_a).await;
        let missing = not_found(&app, KEY_B, method.clone(), route, &missing_batch).await;
        assert_eq!(
            foreign, missing,
            "{method} {route}: A's batch differs from a missing one"
        );
    }
    // A batch id where a file id goes (and the reverse) is just as missing.
    assert_eq!(
        not_found(&app, KEY_B, Method::GET, "/files/{id}", &batch_a).await,
        not_found(&app, KEY_B, Method::GET, "/files/{id}", &missing_file).await
    );

    // B's lists never show A's objects, even with A's ids as cursors.
    let b_file = app.upload(KEY_B, jsonl(&chat_lines(1))).await;
    for path in [
        "/files".to_owned(),
        "/files?order=asc".to_owned(),
        "/files?purpose=batch_output".to_owned(),
        format!("/files?after={file_a}"),
        format!("/files?after={out_a}&order=asc"),
    ] {
        let listed = expect_ok(app.req(Method::GET, &path, KEY_B)).await;
        let got = list_ids(&listed);
        assert!(
            !got.contains(&file_a) && !got.contains(&out_a),
            "{path}: {listed}"
        );
        if !path.contains("after") && !path.contains("purpose") {
            assert_eq!(got, vec![b_file.clone()], "{path}");
        }
    }
    for path in ["/batches".to_owned(), format!("/batches?after={batch_a}")] {
        let listed = expect_ok(app.req(Method::GET, &path, KEY_B)).await;
        assert!(list_ids(&listed).is_empty(), "{path}: {listed}");
    }

    // B's batch over A's input file is accepted, then fails the way a missing file does.
    let (status, created) = app
        .create_batch_raw(
            KEY_B,
            json!({"input_file_id": file_a, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let stolen = app
        .wait_terminal(
            KEY_B,
            created["id"].as_str().unwrap(),
            Duration::from_secs(20),
        )
        .await;
    let over_output = app.create_batch(KEY_B, &out_a).await;
    let over_output = app
        .wait_terminal(KEY_B, &over_output, Duration::from_secs(20))
        .await;
    let phantom_id = app.create_batch(KEY_B, &missing_file).await;
    let phantom = app
        .wait_terminal(KEY_B, &phantom_id, Duration::from_secs(20))
        .await;
    for batch in [&stolen, &over_output, &phantom] {
        assert_eq!(batch["status"], "failed", "{batch:#}");
        assert!(batch["failed_at"].is_i64(), "{batch:#}");
        assert!(
            batch["output_file_id"].is_null() && batch["error_file_id"].is_null(),
            "{batch:#}"
        );
        assert_eq!(batch["request_counts"]["completed"], 0);
        let errors = batch["errors"]["data"].as_array().expect("errors.data");
        assert_eq!(errors.len(), 1, "{batch:#}");
        assert_eq!(errors[0]["code"], "invalid_request");
        assert_eq!(errors[0]["param"], "file_id");
        assert_eq!(errors[0]["line"], Value::Null);
        assert!(!errors[0]["message"].as_str().unwrap_or_default().is_empty());
    }
    assert_eq!(
        without_id(&stolen["errors"], &file_a),
        without_id(&phantom["errors"], &missing_file),
        "A's file must fail like a missing one"
    );
    assert_eq!(
        without_id(&over_output["errors"], &out_a),
        without_id(&phantom["errors"], &missing_file),
        "A's output file must fail like a missing one"
    );
    assert_eq!(
        app.upstream_stats().calls,
        calls_before,
        "B's batch reached the upstream"
    );

    // A's objects are untouched and still A's; B's batches are not in A's list.
    assert_eq!(expect_ok(get(format!("/files/{file_a}"))).await, file_a_obj);
    assert_eq!(expect_ok(get(format!("/files/{out_a}"))).await, out_a_obj);
    assert_eq!(app.file_content(KEY_A, &file_a).await, file_a_content);
    assert_eq!(app.file_content(KEY_A, &out_a).await, out_a_content);
    assert_eq!(app.get_batch(KEY_A, &batch_a).await, done);
    let a_batches = expect_ok(get("/batches".to_owned())).await;
    assert_eq!(list_ids(&a_batches), vec![batch_a.clone()]);
    let a_files = expect_ok(get("/files".to_owned())).await;
    assert_eq!(list_ids(&a_files), vec![out_a.clone(), file_a.clone()]);
    // A's batch exists for A: cancelling it is a 409, not a 404.
    let resp = app
        .req(Method::POST, &format!("/batches/{batch_a}/cancel"), KEY_A)
        .send()
        .await
        .unwrap();
    let err = error_body(resp, 409).await;
    assert_eq!(
        err["error"]["message"],
        "Cannot cancel a batch with status 'completed'."
    );
}
