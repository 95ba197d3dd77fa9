//! Cancel, expiry and the terminal states a batch can reach besides the happy path: cancelling
//! while lines run, twice, or once completed; a window running out; a batch whose every line
//! fails or whose results are mixed; several aggregators finishing one batch.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use sluice_runtime::metrics::Metrics;
use sluice_tests::*;
use sluice_worker::WorkerContext;

/// How long after a cancel (or expiry) an upstream call may still arrive.
const STOP_MARGIN_MS: u64 = 1_000;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// `n` chat lines `req-0…`, each carrying the same mock directives (keyed by its custom id).
fn mock_lines(n: usize, mock: &Value) -> (Vec<Value>, Vec<String>) {
    let ids: Vec<String> = req_ids(n);
    let lines = ids
        .iter()
        .map(|id| chat_line_with_mock(id, mock.clone()))
        .collect();
    (lines, ids)
}

/// The custom ids of result lines.
fn ids_of(lines: &[Value]) -> BTreeSet<String> {
    lines
        .iter()
        .map(|l| l["custom_id"].as_str().expect("custom_id").to_owned())
        .collect()
}

/// `POST /batches/{id}/cancel`: (status, headers, body).
async fn cancel(app: &TestApp, id: &str) -> (u16, HeaderMap, Value) {
    let resp = app
        .req(Method::POST, &format!("/batches/{id}/cancel"), KEY_A)
        .send()
        .await
        .expect("cancel");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (
        status,
        headers,
        resp.json().await.expect("cancel answer is JSON"),
    )
}

fn count(batch: &Value, field: &str) -> usize {
    batch["request_counts"][field]
        .as_u64()
        .expect("request count") as usize
}

/// The request counts agree with the files and add up to the total.
fn assert_counts_match_files(batch: &Value, output: &[Value], errors: &[Value], total: usize) {
    assert_eq!(count(batch, "total"), total, "{batch:#}");
    assert_eq!(
        count(batch, "completed"),
        output.len(),
        "completed vs output file: {batch:#}"
    );
    assert_eq!(
        count(batch, "failed"),
        errors.len(),
        "failed vs error file: {batch:#}"
    );
    assert_eq!(output.len() + errors.len(), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_mid_run_stops_new_upstream_calls_and_accounts_for_every_line() {
    cancel_mid_run(StorageKind::Local, false).await;
}

/// On a rate-paced provider lines hold starts reserved up to `reserve_ahead_ms` (2 s) ahead and
/// ask the gate again together before them: none calls after the cancel all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_mid_run_stops_lines_holding_reserved_starts() {
    cancel_mid_run(StorageKind::Local, true).await;
}

/// A batch cancelled mid-run on `storage`: finished lines keep their results, the rest get
/// `batch_cancelled`, and nothing is called upstream after the cancel. `paced`: the provider is
/// paced at 600 RPM (the lines then wait for their reserved starts, not for the upstream).
pub(crate) async fn cancel_mid_run(storage: StorageKind, paced: bool) {
    let options = AppOptions {
        storage,
        ..AppOptions::default()
    };
    let app = spawn_app_with(options, |s| {
        s.worker.concurrency = 8;
        if paced {
            s.worker.concurrency = 32;
            s.providers[0].pacing = sluice_core::config::PacingSettings {
                rpm: Some(600),
                burst_ms: Some(1_000),
                ..Default::default()
            };
        }
    })
    .await;
    let delay_ms = if paced { 10 } else { 200 };
    let (lines, expected) = mock_lines(300, &json!({ "delay_ms": delay_ms }));
    let id = app.submit(KEY_A, &lines).await;
    app.wait_for(KEY_A, &id, Duration::from_secs(20), |b| {
        b["request_counts"]["completed"].as_u64() >= Some(16)
    })
    .await;

    let (status, _, answer) = cancel(&app, &id).await;
    let cancel_returned_ms = unix_ms();
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(15)).await;

    assert_eq!(status, 200, "{answer:#}");
    assert!(
        matches!(answer["status"].as_str(), Some("cancelling" | "cancelled")),
        "{answer:#}"
    );
    assert!(answer["cancelling_at"].is_i64(), "{answer:#}");
    assert_eq!(batch["status"], "cancelled", "{batch:#}");
    assert!(batch["cancelled_at"].is_i64(), "{batch:#}");
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert_exactly_once(&output, &errors, &expected);
    assert_counts_match_files(&batch, &output, &errors, 300);
    assert!(
        !output.is_empty() && !errors.is_empty(),
        "cancel came mid-run: {batch:#}"
    );
    for line in &output {
        assert_eq!(line["response"]["status_code"], 200, "{line}");
    }
    for line in &errors {
        assert_eq!(line["response"], Value::Null, "{line}");
        assert_eq!(line["error"]["code"], "batch_cancelled", "{line}");
        assert_eq!(
            line["error"]["message"],
            "This request could not be executed because the batch was cancelled."
        );
    }
    let stats = app.upstream_stats();
    assert!(
        stats.calls < 300,
        "{} upstream calls for a batch cancelled mid-run",
        stats.calls
    );
    // In-flight calls finished and kept their results; nothing else was called.
    let called: BTreeSet<String> = stats.per_key.keys().cloned().collect();
    assert_eq!(
        called,
        ids_of(&output),
        "lines called upstream must be exactly the output lines"
    );
    let late: Vec<(&String, u64)> = stats
        .per_key
        .iter()
        .flat_map(|(k, times)| times.iter().map(move |t| (k, *t)))
        .filter(|(_, t)| *t > cancel_returned_ms + STOP_MARGIN_MS)
        .collect();
    assert!(
        late.is_empty(),
        "upstream calls started after the cancel: {late:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_completed_batch_is_a_409_that_tells_clients_not_to_retry() {
    let app = spawn_app().await;
    let id = app.submit(KEY_A, &chat_lines(3)).await;
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(15)).await;
    assert_eq!(batch["status"], "completed", "{batch:#}");

    let (status, headers, body) = cancel(&app, &id).await;

    assert_eq!(status, 409, "{body:#}");
    assert_eq!(
        headers.get("x-should-retry").and_then(|v| v.to_str().ok()),
        Some("false")
    );
    assert_eq!(
        body,
        json!({"error": {
            "message": "Cannot cancel a batch with status 'completed'.",
            "type": "invalid_request_error",
            "param": null,
            "code": null,
        }})
    );
    let after = app.get_batch(KEY_A, &id).await;
    assert_eq!(after["status"], "completed");
    assert_eq!(after["cancelling_at"], Value::Null);
    assert_eq!(after["output_file_id"], batch["output_file_id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_twice_answers_200_both_times_and_again_once_cancelled() {
    let app = spawn_app_with(AppOptions::default(), |s| s.worker.concurrency = 2).await;
    let (lines, expected) = mock_lines(20, &json!({"delay_ms": 300}));
    let id = app.submit(KEY_A, &lines).await;
    app.wait_for(KEY_A, &id, Duration::from_secs(10), |b| {
        b["status"] == "in_progress"
    })
    .await;

    let (first, _, first_body) = cancel(&app, &id).await;
    let (second, _, second_body) = cancel(&app, &id).await;
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(15)).await;
    let (third, _, third_body) = cancel(&app, &id).await;

    assert_eq!(first, 200, "{first_body:#}");
    assert_eq!(second, 200, "{second_body:#}");
    for body in [&first_body, &second_body] {
        assert_eq!(body["id"], id.as_str());
        assert!(
            matches!(body["status"].as_str(), Some("cancelling" | "cancelled")),
            "{body:#}"
        );
    }
    // The second cancel does not restart anything: same cancel time.
    assert_eq!(second_body["cancelling_at"], first_body["cancelling_at"]);
    assert_eq!(batch["status"], "cancelled", "{batch:#}");
    assert_eq!(
        third, 200,
        "cancelling a cancelled batch is allowed: {third_body:#}"
    );
    assert_eq!(third_body["status"], "cancelled");
    assert_eq!(third_body["cancelled_at"], batch["cancelled_at"]);
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert_exactly_once(&output, &errors, &expected);
    assert_counts_match_files(&batch, &output, &errors, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_past_its_completion_window_expires_keeping_finished_rows_and_marking_the_rest_batch_expired()
 {
    let app = spawn_app_with(AppOptions::default(), |s| s.worker.concurrency = 4).await;
    // 4 at a time, 300 ms each: about 13 lines a second, far fewer than 80 in a 2 s window.
    let (lines, expected) = mock_lines(80, &json!({"delay_ms": 300}));
    let file = app.upload(KEY_A, jsonl(&lines)).await;
    let id = app.create_batch_window(KEY_A, &file, "2s").await;

    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(20)).await;

    assert_eq!(batch["status"], "expired", "{batch:#}");
    assert!(batch["expired_at"].is_i64(), "{batch:#}");
    assert_eq!(
        batch["expires_at"].as_i64(),
        batch["created_at"].as_i64().map(|c| c + 2),
        "{batch:#}"
    );
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert_exactly_once(&output, &errors, &expected);
    assert_counts_match_files(&batch, &output, &errors, 80);
    assert!(
        !output.is_empty(),
        "lines finished before expiry go to the output file: {batch:#}"
    );
    assert!(!errors.is_empty(), "{batch:#}");
    for line in &output {
        assert_eq!(line["response"]["status_code"], 200, "{line}");
    }
    for line in &errors {
        assert_eq!(line["response"], Value::Null, "{line}");
        assert_eq!(
            line["error"],
            json!({
                "code": "batch_expired",
                "message": "This request could not be executed before the completion window expired.",
            })
        );
    }
    let stats = app.upstream_stats();
    let called: BTreeSet<String> = stats.per_key.keys().cloned().collect();
    assert_eq!(
        called,
        ids_of(&output),
        "lines called upstream must be exactly the output lines"
    );
    let expiry_ms = batch["expires_at"].as_u64().expect("expires_at") * 1_000;
    let last_call = stats
        .per_key
        .values()
        .flatten()
        .copied()
        .max()
        .expect("some calls");
    assert!(
        last_call <= expiry_ms + 1_500,
        "an upstream call arrived {} ms after the window expired",
        last_call - expiry_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_whose_every_line_fails_upstream_with_400_completes_with_only_an_error_file() {
    let app = spawn_app().await;
    let (lines, expected) = mock_lines(20, &json!({"status": 400}));
    let id = app.submit(KEY_A, &lines).await;

    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(15)).await;

    assert_eq!(batch["status"], "completed", "{batch:#}");
    assert_eq!(batch["output_file_id"], Value::Null, "{batch:#}");
    assert!(batch["error_file_id"].is_string(), "{batch:#}");
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert_exactly_once(&output, &errors, &expected);
    assert_counts_match_files(&batch, &output, &errors, 20);
    assert_eq!(count(&batch, "failed"), 20);
    for line in &errors {
        assert_eq!(line["response"]["status_code"], 400, "{line}");
        assert_eq!(
            line["response"]["body"]["error"]["type"], "invalid_request_error",
            "{line}"
        );
        assert!(line["response"]["request_id"].is_string(), "{line}");
        assert_eq!(line["error"], Value::Null, "{line}");
    }
    assert_eq!(app.upstream_stats().calls, 20, "a 400 is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_with_mixed_results_counts_exactly_what_its_files_hold() {
    let app = spawn_app().await;
    let expected: Vec<String> = req_ids(30);
    let missing: BTreeSet<String> = expected.iter().step_by(3).cloned().collect();
    let lines: Vec<Value> = expected
        .iter()
        .map(|id| {
            let mock = if missing.contains(id) {
                json!({"status": 404})
            } else {
                json!({})
            };
            chat_line_with_mock(id, mock)
        })
        .collect();
    let id = app.submit(KEY_A, &lines).await;

    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(15)).await;

    assert_eq!(batch["status"], "completed", "{batch:#}");
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert_exactly_once(&output, &errors, &expected);
    assert_counts_match_files(&batch, &output, &errors, 30);
    assert_eq!(
        (count(&batch, "completed"), count(&batch, "failed")),
        (20, 10)
    );
    assert_eq!(ids_of(&errors), missing);
    for line in &output {
        assert_eq!(line["response"]["status_code"], 200, "{line}");
    }
    for line in &errors {
        assert_eq!(line["response"]["status_code"], 404, "{line}");
        assert_eq!(
            line["response"]["body"]["error"]["code"], "model_not_found",
            "{line}"
        );
        assert_eq!(line["error"], Value::Null, "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_aggregators_finish_a_batch_once_with_one_set_of_result_files() {
    let options = AppOptions {
        aggregator: false,
        ..AppOptions::default()
    };
    let app = spawn_app_with(options, |s| s.aggregator.sweep_interval_ms = 50).await;
    let metrics = Metrics::new();
    for _ in 0..3 {
        let ctx = WorkerContext::build(app.settings.clone(), metrics.clone())
            .await
            .expect("back end connects");
        tokio::spawn(sluice_worker::run_aggregator(ctx, app.stop.child_token()));
    }
    let expected: Vec<String> = req_ids(500);
    let lines: Vec<Value> = expected
        .iter()
        .enumerate()
        .map(|(i, id)| {
            chat_line_with_mock(
                id,
                if i % 50 == 0 {
                    json!({"status": 400})
                } else {
                    json!({})
                },
            )
        })
        .collect();
    let id = app.submit(KEY_A, &lines).await;

    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(30)).await;
    // Give every replica several more sweeps in which a double finalize would show.
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(batch["status"], "completed", "{batch:#}");
    let finished = metrics
        .batches_finished
        .with_label_values(&["completed"])
        .get();
    assert_eq!(finished, 1, "the batch was finished {finished} times");
    let after = app.get_batch(KEY_A, &id).await;
    assert_eq!(after, batch, "the batch changed after it completed");
    let listed: Value = app
        .req(Method::GET, "/files?purpose=batch_output", KEY_A)
        .send()
        .await
        .expect("list files")
        .json()
        .await
        .expect("JSON");
    let listed_ids: Vec<&str> = listed["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|f| f["id"].as_str().expect("id"))
        .collect();
    let mut want = vec![
        batch["output_file_id"].as_str().expect("output"),
        batch["error_file_id"].as_str().expect("errors"),
    ];
    let mut got = listed_ids.clone();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want, "result files listed: {listed:#}");
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert_exactly_once(&output, &errors, &expected);
    assert_counts_match_files(&batch, &output, &errors, 500);
    assert_eq!(errors.len(), 10);
}
