//! The OpenAPI document: what it describes, and a schemathesis run against a live Sluice that
//! must find no server error and no response that disagrees with the document.

use std::time::Duration;

use serde_json::Value;
use sluice_tests::python::python_with;
use sluice_tests::*;

/// Longest the schemathesis run may take (installing it the first time is not counted).
const SCHEMATHESIS_TIMEOUT: Duration = Duration::from_secs(300);

async fn openapi(app: &TestApp) -> Value {
    let root = app.base.trim_end_matches("/v1");
    let response = app
        .http
        .get(format!("{root}/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openapi_document_describes_every_operation_without_a_key() {
    let app = spawn_app().await;
    let doc = openapi(&app).await;

    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{doc}");
    let mut operations: Vec<String> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |method| format!("{} {path}", method.to_uppercase()))
        })
        .collect();
    operations.sort();
    assert_eq!(
        operations,
        [
            "DELETE /v1/files/{file_id}",
            "GET /livez",
            "GET /readyz",
            "GET /v1/batches",
            "GET /v1/batches/{batch_id}",
            "GET /v1/batches/{batch_id}/output",
            "GET /v1/batches/{batch_id}/results",
            "GET /v1/files",
            "GET /v1/files/{file_id}",
            "GET /v1/files/{file_id}/content",
            "GET /v1/usage",
            "POST /v1/batches",
            "POST /v1/batches/{batch_id}/cancel",
            "POST /v1/batches/{batch_id}/retry",
            "POST /v1/files",
        ]
    );
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["api_key"]["name"], "x-api-key");
    // Every field of the OpenAI Batch object is documented.
    let batch = &doc["components"]["schemas"]["Batch"]["properties"];
    for field in BATCH_FIELDS {
        assert!(batch.get(field).is_some(), "Batch.{field} undocumented");
    }
    // The retry's link fields, and its optional body.
    assert!(batch.get("retry_of").is_some() && batch.get("retries").is_some());
    let retry = &doc["paths"]["/v1/batches/{batch_id}/retry"]["post"];
    assert_ne!(retry["requestBody"]["required"], true, "{retry}");
    let body = &doc["components"]["schemas"]["RetryBatchRequest"]["properties"];
    for field in ["statuses", "codes", "completion_window", "metadata"] {
        assert!(
            body.get(field).is_some(),
            "RetryBatchRequest.{field} undocumented"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schemathesis_finds_no_server_error_and_no_undocumented_response() {
    let python = tokio::task::spawn_blocking(|| {
        python_with("schemathesis", "schemathesis==4.32.5", "st-venv")
    })
    .await
    .expect("python lookup");
    let app = spawn_app().await;
    // Real ids, so the operations on one object get past 404 and answer their full shape.
    let file_id = app.upload(KEY_A, jsonl(&chat_lines(3))).await;
    let batch_id = app.create_batch(KEY_A, &file_id).await;
    app.wait_terminal(KEY_A, &batch_id, Duration::from_secs(30))
        .await;
    let spare_file = app.upload(KEY_A, jsonl(&chat_lines(1))).await;

    let dir = std::env::temp_dir().join(format!("sluice-st-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            "[parameters]\n\"path.batch_id\" = \"{batch_id}\"\n\"path.file_id\" = \"{spare_file}\"\n"
        ),
    )
    .unwrap();
    let root = app.base.trim_end_matches("/v1").to_owned();
    let run = tokio::process::Command::new(&python)
        .args(["-m", "schemathesis.cli", "--config-file"])
        .arg(&config)
        .arg("run")
        .arg(format!("{root}/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {KEY_A}")])
        .args([
            "--checks",
            "all",
            // Schema-valid is not always acceptable: a `completion_window` out of the
            // configured bounds or a file not named `.jsonl` is refused with a 400 on purpose.
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            "40",
            "--workers",
            "2",
            "--seed",
            "1",
            "--report-dir",
        ])
        .arg(dir.join("report"))
        .current_dir(&dir)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(SCHEMATHESIS_TIMEOUT, run)
        .await
        .expect("schemathesis finishes in time")
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("passed"), "{stdout}");
    std::fs::remove_dir_all(&dir).ok();
}
