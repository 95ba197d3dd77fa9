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
    let expected: Vec<String> = req_ids(1_000);
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
}

/// Messages in the express work queue once `expected` are there, or after 10 s.
async fn queued_messages_once_published(app: &TestApp, expected: u32) -> u32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while queued_messages(app).await < expected && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    queued_messages(app).await
}

/// Messages in the express work queue (of batches up to `worker.express_lines` lines).
async fn queued_messages(app: &TestApp) -> u32 {
    let conn = sluice_broker::connect(&app.settings.amqp_url, "sluice-test-count")
        .await
        .expect("broker");
    let channel = conn.create_channel().await.expect("channel");
    let queue = channel
        .queue_declare(
            app.keys().express_queue().as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("work queue exists");
    queue.message_count()
}

/// A batch on a provider with a rate limit is packed by `paced_lines_per_message`, not by the
/// larger `lines_per_message` of unpaced batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limited_batch_travels_in_the_smaller_paced_messages() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        // Dispatch only: the lines stay in the queue to be counted.
        s.worker.lines = false;
        s.worker.lines_per_message = 8;
        s.worker.paced_lines_per_message = 2;
        s.providers[0].pacing.rpm = Some(60_000);
    })
    .await;
    let id = app.submit(KEY_A, &chat_lines(10)).await;
    app.wait_for(KEY_A, &id, Duration::from_secs(15), |b| {
        b["status"] == "in_progress"
    })
    .await;
    // 10 lines by 2: 5 messages (by 8 it would be 2).
    assert_eq!(queued_messages_once_published(&app, 5).await, 5);
}

/// The dispatcher packs consecutive lines into messages of `lines_per_message`, closes a message
/// early once its lines pass 64 KiB, and publishes small batches to the express queue; the line
/// workers run such messages to exactly one row per line.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lines_travel_several_to_a_message_and_big_lines_close_a_message_early() {
    let mut app = spawn_app_with(AppOptions::default(), |s| {
        // Dispatch only: the lines stay in the queue to be counted.
        s.worker.lines = false;
        s.worker.lines_per_message = 4;
    })
    .await;
    let small = chat_lines(10);
    let big: Vec<Value> = (0..3)
        .map(|i| chat_line(&format!("big-{i}"), &"x".repeat(40 * 1024)))
        .collect();
    let small_id = app.submit(KEY_A, &small).await;
    let big_id = app.submit(KEY_A, &big).await;
    for id in [&small_id, &big_id] {
        app.wait_for(KEY_A, id, Duration::from_secs(15), |b| {
            b["status"] == "in_progress"
        })
        .await;
    }
    // 10 lines by 4: 3 messages. 3 lines of 40 KiB: two fill one message past 64 KiB, one more.
    assert_eq!(queued_messages_once_published(&app, 5).await, 5);

    app.settings.worker.lines = true;
    app.spawn_worker_process();
    for (id, lines) in [(&small_id, &small), (&big_id, &big)] {
        let batch = app.wait_terminal(KEY_A, id, Duration::from_secs(30)).await;
        assert_eq!(batch["status"], "completed", "{batch:#}");
        let (output, errors) = app.results(KEY_A, &batch).await;
        let expected: Vec<String> = lines
            .iter()
            .map(|l| l["custom_id"].as_str().unwrap().to_owned())
            .collect();
        assert_exactly_once(&output, &errors, &expected);
    }
    assert_eq!(app.upstream_stats().calls, 13);
}
