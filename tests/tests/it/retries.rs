//! The one retry policy, observed from the upstream's side: what is retried, how often, how far
//! apart, and the row a line ends with, down to a line that kills its worker every time.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_core::Settings;
use sluice_tests::*;

/// Runs one batch of `lines` on an app tweaked by `tweak`; returns the app and the finished batch.
async fn run_batch(lines: &[Value], tweak: impl FnOnce(&mut Settings)) -> (TestApp, Value) {
    let app = spawn_app_with(AppOptions::default(), tweak).await;
    let id = app.submit(KEY_A, lines).await;
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(20)).await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    (app, batch)
}

/// The single result line of `custom_id`, and whether it is in the output file.
async fn result_of(app: &TestApp, batch: &Value, custom_id: &str) -> (Value, bool) {
    let (output, errors) = app.results(KEY_A, batch).await;
    let ids: Vec<String> = output
        .iter()
        .chain(&errors)
        .map(|l| l["custom_id"].as_str().expect("custom_id").to_owned())
        .collect();
    assert_exactly_once(&output, &errors, &ids);
    let find = |lines: &[Value]| lines.iter().find(|l| l["custom_id"] == custom_id).cloned();
    match (find(&output), find(&errors)) {
        (Some(line), None) => (line, true),
        (None, Some(line)) => (line, false),
        other => panic!("{custom_id} must be in exactly one file: {other:?}"),
    }
}

/// Upstream arrival times (unix ms) of `key`.
fn arrivals(app: &TestApp, key: &str) -> Vec<u64> {
    app.upstream_stats()
        .per_key
        .get(key)
        .cloned()
        .unwrap_or_default()
}

/// A batch of the faulty line plus a few healthy ones, so the fault stays local to its line.
fn with_neighbours(faulty: Value) -> Vec<Value> {
    let mut lines = vec![faulty];
    lines.extend((0..3).map(|i| chat_line_with_mock(&format!("ok-{i}"), json!({}))));
    lines
}

/// The healthy neighbours were called once each and succeeded.
async fn assert_neighbours_fine(app: &TestApp, batch: &Value) {
    for i in 0..3 {
        let key = format!("ok-{i}");
        assert_eq!(arrivals(app, &key).len(), 1, "{key}");
        let (line, ok) = result_of(app, batch, &key).await;
        assert!(ok, "{line}");
    }
    assert_eq!(batch["request_counts"]["total"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_with_retry_after_is_retried_no_sooner_than_asked_and_then_succeeds() {
    let line = chat_line_with_mock(
        "limited",
        json!({"status": 429, "retry_after": 1, "times": 2}),
    );

    let (app, batch) = run_batch(&with_neighbours(line), |_| {}).await;

    let times = arrivals(&app, "limited");
    assert_eq!(times.len(), 3, "two 429s then a success: {times:?}");
    for gap in times.windows(2).map(|w| w[1] - w[0]) {
        assert!(
            gap >= 950,
            "retried {gap} ms after a Retry-After of 1 s: {times:?}"
        );
        assert!(
            gap < 5_000,
            "waited {gap} ms for a Retry-After of 1 s: {times:?}"
        );
    }
    let (result, ok) = result_of(&app, &batch, "limited").await;
    assert!(ok, "{result}");
    assert_eq!(result["response"]["status_code"], 200);
    assert_eq!(batch["request_counts"]["completed"], 4);
    assert_neighbours_fine(&app, &batch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flaky_503_is_retried_until_it_succeeds() {
    let line = chat_line_with_mock("flaky", json!({"status": 503, "times": 2}));

    let (app, batch) = run_batch(&with_neighbours(line), |_| {}).await;

    assert_eq!(arrivals(&app, "flaky").len(), 3);
    let (result, ok) = result_of(&app, &batch, "flaky").await;
    assert!(ok, "{result}");
    assert_eq!(result["response"]["status_code"], 200);
    assert_eq!(result["response"]["body"]["object"], "chat.completion");
    assert_eq!(batch["request_counts"]["failed"], 0);
    assert_neighbours_fine(&app, &batch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_503_that_outlasts_max_attempts_ends_as_an_error_row_with_the_last_status() {
    let line = chat_line_with_mock("down", json!({"status": 503, "times": 10}));

    let (app, batch) = run_batch(&with_neighbours(line), |s| s.worker.max_attempts = 3).await;

    assert_eq!(
        arrivals(&app, "down").len(),
        3,
        "exactly max_attempts calls"
    );
    let (result, ok) = result_of(&app, &batch, "down").await;
    assert!(!ok, "{result}");
    assert_eq!(result["response"]["status_code"], 503);
    assert_eq!(result["response"]["body"]["error"]["type"], "server_error");
    assert_eq!(result["error"], Value::Null);
    assert_eq!(batch["request_counts"]["failed"], 1);
    assert_neighbours_fine(&app, &batch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_400_is_never_retried() {
    let line = chat_line_with_mock("bad", json!({"status": 400}));

    let (app, batch) = run_batch(&with_neighbours(line), |_| {}).await;

    assert_eq!(arrivals(&app, "bad").len(), 1);
    let (result, ok) = result_of(&app, &batch, "bad").await;
    assert!(!ok, "{result}");
    assert_eq!(result["response"]["status_code"], 400);
    assert_eq!(
        result["response"]["body"]["error"]["type"],
        "invalid_request_error"
    );
    assert_eq!(result["error"], Value::Null);
    assert_neighbours_fine(&app, &batch).await;
}

// `x-should-retry`: the mock upstream has no directive that sends this header, so the header's
// precedence is covered only by the unit tests of `upstream::classify`.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redirect_is_not_followed_and_ends_as_an_error_row() {
    let line = chat_line_with_mock("moved", json!({"redirect": true}));

    let (app, batch) = run_batch(&with_neighbours(line), |_| {}).await;

    // Following it would hit a closed port and be retried as unreachable.
    assert_eq!(arrivals(&app, "moved").len(), 1);
    let (result, ok) = result_of(&app, &batch, "moved").await;
    assert!(!ok, "{result}");
    assert_eq!(result["response"]["status_code"], 302, "{result}");
    let message = result["response"]["body"]["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("redirect"), "{result}");
    assert_eq!(result["error"], Value::Null);
    assert_neighbours_fine(&app, &batch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_non_json_200_body_ends_as_an_invalid_upstream_response_error_row() {
    let line = chat_line_with_mock("garbled", json!({"garbage": true}));

    let (app, batch) = run_batch(&with_neighbours(line), |_| {}).await;

    assert_eq!(arrivals(&app, "garbled").len(), 1);
    let (result, ok) = result_of(&app, &batch, "garbled").await;
    assert!(!ok, "{result}");
    assert_eq!(result["response"], Value::Null, "{result}");
    assert_eq!(
        result["error"]["code"], "invalid_upstream_response",
        "{result}"
    );
    assert!(result["error"]["message"].is_string());
    assert_neighbours_fine(&app, &batch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_upstream_times_out_and_ends_as_a_request_timeout_row_after_max_attempts() {
    let line = chat_line_with_mock("stuck", json!({"hang": true}));

    let (app, batch) = run_batch(&with_neighbours(line), |s| {
        s.worker.request_timeout_ms = 500;
        s.worker.max_attempts = 2;
    })
    .await;

    let times = arrivals(&app, "stuck");
    assert_eq!(times.len(), 2, "{times:?}");
    assert!(
        times[1] - times[0] >= 450,
        "the second attempt waited for the timeout: {times:?}"
    );
    let (result, ok) = result_of(&app, &batch, "stuck").await;
    assert!(!ok, "{result}");
    assert_eq!(result["response"], Value::Null, "{result}");
    assert_eq!(result["error"]["code"], "request_timeout", "{result}");
    assert_neighbours_fine(&app, &batch).await;
}

/// A line whose processing kills its worker every time (here: the worker is SIGKILLed while
/// it holds the line) is redelivered until the queue's delivery limit dead-letters it; it then
/// becomes a `processing_failed` error row and the batch still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_line_that_keeps_killing_its_worker_is_dead_lettered_as_processing_failed_while_the_rest_completes()
 {
    let options = AppOptions {
        worker: false,
        ..AppOptions::default()
    };
    let mut app = spawn_app_with(options, |s| {
        s.worker.delivery_limit = 2;
        s.worker.request_timeout_ms = 60_000;
    })
    .await;
    let mut lines = vec![chat_line_with_mock("poison", json!({"hang": true}))];
    lines.extend((0..20).map(|i| chat_line_with_mock(&format!("ok-{i}"), json!({}))));
    let expected: Vec<String> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_owned())
        .collect();
    let id = app.submit(KEY_A, &lines).await;

    // Each worker takes the poison line, calls upstream (which hangs) and is killed holding it.
    let mut kills = 0usize;
    let mut pid = app.spawn_worker_process();
    let started = Instant::now();
    let batch = loop {
        let batch = app.get_batch(KEY_A, &id).await;
        if batch["status"] == "completed" {
            break batch;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not dead-lettered: {batch:#}"
        );
        let held = arrivals(&app, "poison").len() > kills;
        let others_done = batch["request_counts"]["completed"] == 20;
        if held && others_done {
            assert!(kills <= 10, "the delivery limit never stopped redelivery");
            app.signal_process(pid, "KILL");
            kills += 1;
            pid = app.spawn_worker_process();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };

    let limit = app.settings.worker.delivery_limit as usize;
    // Every delivery made one call and was killed; the one past the limit was dead-lettered. The
    // first delivery carried the line with its neighbours; its redelivery split the line off into
    // a message of its own, which then had the whole delivery limit.
    assert_eq!(arrivals(&app, "poison").len(), kills);
    assert!(
        (limit + 1..=limit + 2).contains(&kills),
        "{kills} deliveries for a limit of {limit}"
    );
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert_exactly_once(&output, &errors, &expected);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["custom_id"], "poison");
    assert_eq!(errors[0]["response"], Value::Null);
    assert_eq!(
        errors[0]["error"]["code"], "processing_failed",
        "{}",
        errors[0]
    );
    assert_eq!(batch["request_counts"]["completed"], 20);
    assert_eq!(batch["request_counts"]["failed"], 1);
    for i in 0..20 {
        assert_eq!(arrivals(&app, &format!("ok-{i}")).len(), 1);
    }
}
