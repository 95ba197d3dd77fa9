//! The happy path and the shape of what it produces.

use std::time::Duration;

use serde_json::Value;
use sluice_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_lines_complete_with_every_custom_id_exactly_once() {
    let app = spawn_app().await;
    let lines = chat_lines(1_000);
    let batch_id = app.submit(KEY_A, &lines).await;

    let batch = app
        .wait_terminal(KEY_A, &batch_id, Duration::from_secs(60))
        .await;

    assert_eq!(batch["status"], "completed", "{batch:#}");
    assert_eq!(batch["request_counts"]["total"], 1_000);
    assert_eq!(batch["request_counts"]["completed"], 1_000);
    assert_eq!(batch["request_counts"]["failed"], 0);
    assert_eq!(batch["model"], MODEL);
    assert!(batch["error_file_id"].is_null());
    for field in [
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "created_at",
        "expires_at",
    ] {
        assert!(batch[field].is_i64(), "{field} missing: {batch:#}");
    }
    assert!(batch["usage"]["total_tokens"].as_i64().unwrap() > 0);
    assert_eq!(
        batch["usage"]["total_tokens"].as_i64().unwrap(),
        batch["usage"]["input_tokens"].as_i64().unwrap()
            + batch["usage"]["output_tokens"].as_i64().unwrap()
    );
    let (output, errors) = app.results(KEY_A, &batch).await;
    let expected: Vec<String> = (0..1_000).map(|i| format!("req-{i}")).collect();
    assert_exactly_once(&output, &errors, &expected);
    // Results come in input order, with OpenAI's line shape.
    let ids: Vec<&str> = output
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, expected.iter().map(String::as_str).collect::<Vec<_>>());
    let first = &output[0];
    assert!(first["id"].as_str().unwrap().starts_with("batch_req_"));
    assert_eq!(first["response"]["status_code"], 200);
    assert!(first["response"]["request_id"].is_string());
    assert_eq!(first["response"]["body"]["object"], "chat.completion");
    assert_eq!(first["error"], Value::Null);
    assert_eq!(app.upstream_stats().calls, 1_000);

    let output_file = app
        .req(
            reqwest::Method::GET,
            &format!("/files/{}", batch["output_file_id"].as_str().unwrap()),
            KEY_A,
        )
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(output_file["purpose"], "batch_output");
    assert_eq!(output_file["status"], "processed");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_batch_finishes_quickly_without_waiting_for_a_sweep() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.aggregator.sweep_interval_ms = 60_000
    })
    .await;
    let batch_id = app.submit(KEY_A, &chat_lines(10)).await;
    let batch = app
        .wait_terminal(KEY_A, &batch_id, Duration::from_secs(10))
        .await;
    assert_eq!(batch["status"], "completed");
    assert_eq!(batch["request_counts"]["completed"], 10);
    app.cleanup().await;
}
