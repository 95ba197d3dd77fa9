//! `POST /v1/batches/{id}/retry`: a finished batch's failed, expired or cancelled rows become a new
//! batch over their original request lines, linked both ways, tenant-scoped and counted like any
//! batch.

use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::*;

const WAIT: Duration = Duration::from_secs(30);

async fn retry(app: &TestApp, key: &str, id: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = app.req(reqwest::Method::POST, &format!("/batches/{id}/retry"), key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("retry");
    let status = response.status().as_u16();
    (status, response.json().await.expect("retry answer is JSON"))
}

/// A retry that must succeed: the child batch.
async fn retried(app: &TestApp, id: &str, body: Option<Value>) -> Value {
    let (status, child) = retry(app, KEY_A, id, body).await;
    assert_eq!(status, 200, "{child:#}");
    assert_eq!(child["status"], "validating", "{child:#}");
    assert_eq!(child["retry_of"], id, "{child:#}");
    child
}

/// The child's input file, as a tenant sees it: a `batch` file whose content is exactly `lines`
/// (the original JSONL lines, byte for byte, in input order).
async fn assert_input_is(app: &TestApp, child: &Value, lines: &[&Value]) {
    let file_id = child["input_file_id"].as_str().expect("input_file_id");
    let (status, file) = get(app, &format!("/files/{file_id}")).await;
    assert_eq!(status, 200, "{file:#}");
    assert_eq!(file["purpose"], "batch", "{file:#}");
    let expected = jsonl(&lines.iter().map(|l| (*l).clone()).collect::<Vec<_>>());
    assert_eq!(file["bytes"], expected.len(), "{file:#}");
    let content = app.file_content(KEY_A, file_id).await;
    assert_eq!(content.as_bytes(), expected.as_slice());
    let (_, listed) = get(app, "/files?purpose=batch").await;
    assert!(
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["id"] == file_id),
        "{listed:#}"
    );
}

async fn get(app: &TestApp, path: &str) -> (u16, Value) {
    let response = app
        .req(reqwest::Method::GET, path, KEY_A)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn assert_error(status: u16, body: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{body:#}");
    assert_eq!(body["error"]["code"], code, "{body:#}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body:#}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.len() > 20),
        "{body:#}"
    );
}

/// Cancels batch `id` and waits for it to end.
async fn cancel(app: &TestApp, id: &str) -> Value {
    let response = app
        .req(
            reqwest::Method::POST,
            &format!("/batches/{id}/cancel"),
            KEY_A,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    app.wait_terminal(KEY_A, id, WAIT).await
}

/// A retry of `id` with `body` that finds nothing to take; the message says what was looked for.
async fn assert_nothing_to_retry(app: &TestApp, id: &str, body: Value, looked_for: &str) {
    let (status, answer) = retry(app, KEY_A, id, Some(body)).await;
    assert_error(status, &answer, 400, "nothing_to_retry");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains(looked_for), "{answer:#}");
}

/// The input lines whose rows in `errors` carry `code`, in input order.
fn lines_with_code<'a>(lines: &'a [Value], errors: &[Value], code: &str) -> Vec<&'a Value> {
    let ids: Vec<&str> = errors
        .iter()
        .filter(|r| r["error"]["code"] == code)
        .map(|r| r["custom_id"].as_str().unwrap())
        .collect();
    lines
        .iter()
        .filter(|l| ids.contains(&l["custom_id"].as_str().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_rows_are_retried_as_a_linked_batch_that_completes() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.limits.max_retries_per_batch = 2;
    })
    .await;
    // Three lines fail their first attempt upstream (404 and 400 are not retried by workers);
    // a later attempt, the retry's, succeeds.
    let once = |status: u16| json!({"status": status, "times": 1});
    let lines: Vec<Value> = (0..12)
        .map(|i| {
            let id = format!("req-{i}");
            match i {
                2 | 9 => chat_line_with_mock(&id, once(404)),
                5 => chat_line_with_mock(&id, once(400)),
                _ => chat_line(&id, &format!("question {i}")),
            }
        })
        .collect();
    let parent_id = app.submit(KEY_A, &lines).await;
    let parent = app.wait_terminal(KEY_A, &parent_id, WAIT).await;
    assert_eq!(parent["status"], "completed", "{parent:#}");
    assert_eq!(parent["request_counts"]["failed"], 3, "{parent:#}");
    assert!(parent.get("retries").is_none(), "{parent:#}");

    // Another tenant's batch does not exist for it.
    let (status, body) = retry(&app, KEY_B, &parent_id, None).await;
    assert_eq!(status, 404, "{body:#}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    // Nothing of that kind to retry.
    assert_nothing_to_retry(
        &app,
        &parent_id,
        json!({"statuses": ["expired"]}),
        "has no expired requests",
    )
    .await;
    let (status, body) = retry(&app, KEY_A, &parent_id, Some(json!({"statuses": ["done"]}))).await;
    assert_error(status, &body, 400, "invalid_value");
    assert_eq!(body["error"]["param"], "statuses");

    // A code filter: the upstream's `model_not_found` (the 404s), not the 400.
    let by_code = retried(
        &app,
        &parent_id,
        Some(json!({"codes": ["model_not_found"], "metadata": {"round": "2"}})),
    )
    .await;
    assert_input_is(&app, &by_code, &[&lines[2], &lines[9]]).await;
    assert_eq!(by_code["metadata"], json!({"round": "2"}));
    assert_eq!(by_code["completion_window"], parent["completion_window"]);
    // No body: every failed row, in input order.
    let child = retried(&app, &parent_id, None).await;
    assert_input_is(&app, &child, &[&lines[2], &lines[5], &lines[9]]).await;
    let parent = app.get_batch(KEY_A, &parent_id).await;
    assert_eq!(
        parent["retries"],
        json!([by_code["id"], child["id"]]),
        "{parent:#}"
    );
    assert_eq!(parent["status"], "completed");
    // The list is bounded.
    let (status, body) = retry(&app, KEY_A, &parent_id, None).await;
    assert_error(status, &body, 409, "too_many_retries");

    let child_id = child["id"].as_str().unwrap();
    let done = app.wait_terminal(KEY_A, child_id, WAIT).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    assert_eq!(done["retry_of"], parent_id.as_str());
    assert_eq!(
        done["request_counts"],
        json!({"total": 3, "completed": 3, "failed": 0})
    );
    let (output, errors) = app.results(KEY_A, &done).await;
    assert!(errors.is_empty(), "{errors:?}");
    let ids: Vec<&str> = output
        .iter()
        .map(|r| r["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["req-2", "req-5", "req-9"]);
    assert!(output.iter().all(|r| r["response"]["status_code"] == 200));
    // Every line of the child succeeded: nothing left to retry.
    assert_nothing_to_retry(
        &app,
        child_id,
        json!({}),
        "has no failed, expired or cancelled requests",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_rows_are_retried_and_the_child_counts_as_an_open_batch() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.worker.concurrency = 4;
        s.limits.max_open_batches = 1;
    })
    .await;
    // 4 at a time, 300 ms each: far fewer than 60 lines run in a 2 s window. Line 0 always fails.
    let lines: Vec<Value> = (0..60)
        .map(|i| {
            let mock = if i == 0 {
                json!({"status": 404})
            } else {
                json!({"delay_ms": 300})
            };
            chat_line_with_mock(&format!("req-{i}"), mock)
        })
        .collect();
    let file = app.upload(KEY_A, jsonl(&lines)).await;
    let parent_id = app.create_batch_window(KEY_A, &file, "2s").await;
    let parent = app.wait_terminal(KEY_A, &parent_id, WAIT).await;
    assert_eq!(parent["status"], "expired", "{parent:#}");
    let (_, errors) = app.results(KEY_A, &parent).await;
    let expired = lines_with_code(&lines, &errors, "batch_expired");
    assert!(
        expired.len() > 10 && !expired.contains(&&lines[0]),
        "{parent:#}"
    );

    let child = retried(
        &app,
        &parent_id,
        Some(json!({"statuses": ["expired"], "completion_window": "1h"})),
    )
    .await;
    assert_input_is(&app, &child, &expired).await;
    assert_eq!(child["completion_window"], "1h");
    // The child is the tenant's one open batch: another retry is over the limit.
    let (status, body) = retry(
        &app,
        KEY_A,
        &parent_id,
        Some(json!({"statuses": ["failed"]})),
    )
    .await;
    assert_eq!(status, 429, "{body:#}");
    assert_eq!(body["error"]["code"], "batch_limit_exceeded");
    let (status, body) = retry(&app, KEY_A, child["id"].as_str().unwrap(), None).await;
    assert_error(status, &body, 409, "batch_not_finished");
    let parent = app.get_batch(KEY_A, &parent_id).await;
    assert_eq!(parent["retries"], json!([child["id"]]), "{parent:#}");

    cancel(&app, child["id"].as_str().unwrap()).await;
    // Room again: the failed row alone.
    let failed = retried(&app, &parent_id, Some(json!({"statuses": ["failed"]}))).await;
    assert_input_is(&app, &failed, &[&lines[0]]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_rows_are_retried_and_a_running_batch_is_refused() {
    let app = spawn_app_with(AppOptions::default(), |s| s.worker.concurrency = 4).await;
    let lines: Vec<Value> = (0..60)
        .map(|i| chat_line_with_mock(&format!("req-{i}"), json!({"delay_ms": 200})))
        .collect();
    let parent_id = app.submit(KEY_A, &lines).await;
    app.wait_for(KEY_A, &parent_id, WAIT, |b| {
        b["request_counts"]["completed"].as_u64() >= Some(4)
    })
    .await;
    let (status, body) = retry(&app, KEY_A, &parent_id, None).await;
    assert_error(status, &body, 409, "batch_not_finished");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in_progress"),
        "{body:#}"
    );

    let parent = cancel(&app, &parent_id).await;
    assert_eq!(parent["status"], "cancelled", "{parent:#}");
    let (_, errors) = app.results(KEY_A, &parent).await;
    let cancelled = lines_with_code(&lines, &errors, "batch_cancelled");
    assert!(!cancelled.is_empty(), "{parent:#}");
    assert_nothing_to_retry(
        &app,
        &parent_id,
        json!({"statuses": ["failed"]}),
        "has no failed requests",
    )
    .await;

    let child = retried(&app, &parent_id, Some(json!({"statuses": ["cancelled"]}))).await;
    assert_input_is(&app, &child, &cancelled).await;
    let (status, body) = retry(&app, KEY_B, &parent_id, None).await;
    assert_eq!(status, 404, "{body:#}");
}

/// The user guide's SDK example: the official Python SDK has no retry method, and its generic `post`
/// answers the new batch as a `Batch`, `retry_of` kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_sdk_retries_through_its_generic_post() {
    let python = tokio::task::spawn_blocking(|| {
        sluice_tests::python::python_with("openai", "openai", "py-venv")
    })
    .await
    .expect("python lookup");
    let app = spawn_app().await;
    let lines = vec![
        chat_line("ok", "hello"),
        chat_line_with_mock("bad", json!({"status": 400})),
    ];
    let parent_id = app.submit(KEY_A, &lines).await;
    app.wait_terminal(KEY_A, &parent_id, WAIT).await;
    let script = r#"
import json, os
from openai import OpenAI
from openai.types import Batch
client = OpenAI()
parent = os.environ["PARENT"]
child = client.post(f"/batches/{parent}/retry", cast_to=Batch, body={"statuses": ["failed"]})
print(json.dumps({"type": type(child).__name__, "id": child.id, "status": child.status,
                  "retry_of": child.retry_of, "retries": client.batches.retrieve(parent).retries}))
"#;
    let out = tokio::process::Command::new(&python)
        .args(["-c", script])
        .env("OPENAI_BASE_URL", &app.base)
        .env("OPENAI_API_KEY", KEY_A)
        .env("PARENT", &parent_id)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .kill_on_drop(true)
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).expect("the script prints JSON");
    assert_eq!(seen["type"], "Batch", "{seen}");
    assert_eq!(seen["status"], "validating", "{seen}");
    assert_eq!(seen["retry_of"], parent_id.as_str(), "{seen}");
    assert_eq!(seen["retries"], json!([seen["id"]]), "{seen}");
    let child = app.get_batch(KEY_A, seen["id"].as_str().unwrap()).await;
    assert_input_is(&app, &child, &[&lines[1]]).await;
}
