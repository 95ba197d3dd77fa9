//! Redis and the broker failing under a running batch, on
//! private servers of the test: Redis crashed and restarted from its append-only file, Redis
//! stalled, the RabbitMQ node crashed and restarted. Rows written before the Redis crash come back
//! from its append-only file unchanged. Lines in flight must wait rather than burn
//! their delivery budget, so the batch still completes with every line exactly once and no line
//! failed because of the outage.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use sluice_core::domain::Row;

use serde_json::{Value, json};
use sluice_tests::rabbitmq_server::RabbitServer;
use sluice_tests::redis_server::RedisServer;
use sluice_tests::*;

const LINES: usize = 1_500;

fn slow_lines() -> (Vec<Value>, Vec<String>) {
    let ids: Vec<String> = req_ids(LINES);
    let lines = ids
        .iter()
        .map(|id| chat_line_with_mock(id, json!({"delay_ms": 5})))
        .collect();
    (lines, ids)
}

/// Polls like a client would: a 5xx while the API reconnects to Redis is retried.
async fn wait_terminal_through_errors(app: &TestApp, id: &str) -> Value {
    let start = Instant::now();
    loop {
        let (status, batch) = app.get_batch_raw(KEY_A, id).await;
        if status == 200
            && ["completed", "failed", "expired", "cancelled"]
                .contains(&batch["status"].as_str().unwrap_or(""))
        {
            return batch;
        }
        assert!(status == 200 || status >= 500, "{status}: {batch}");
        assert!(start.elapsed() < Duration::from_secs(90), "{batch:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn assert_completed_exactly_once(app: &TestApp, id: &str, expected: &[String]) {
    let batch = wait_terminal_through_errors(app, id).await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert_exactly_once(&output, &errors, expected);
    assert!(
        errors.is_empty(),
        "no line may fail because Redis was away: {:?}",
        &errors[..errors.len().min(3)]
    );
    let calls = app.upstream_stats().calls;
    let in_flight = app.settings.worker.concurrency as u64;
    assert!(
        calls <= LINES as u64 + in_flight,
        "{calls} upstream calls for {LINES} lines"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_from_its_aof_mid_batch_loses_and_duplicates_nothing() {
    let mut redis = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let url = redis.url();
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.redis_url = url;
        // Small segments, so rows have left Redis for storage before the crash.
        s.aggregator.compact_rows = 100;
    })
    .await;
    let (lines, expected) = slow_lines();
    let id = app.submit(KEY_A, &lines).await;
    app.wait_done(&id, 300).await;
    let start = Instant::now();
    loop {
        let segments: usize = app
            .store
            .conn()
            .hlen(app.keys().batch_segments(&id))
            .await
            .expect("segments");
        if segments > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no rows compacted before the crash"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Rows already written (each acknowledged only after its write was fsynced to the AOF).
    let before: HashMap<String, Vec<u8>> = app
        .store
        .conn()
        .hgetall(app.keys().batch_rows(&id))
        .await
        .expect("rows");

    redis.kill();
    // Longer than a line's redelivery budget would last if every failed Redis call sent the line
    // back to the queue at once.
    tokio::time::sleep(Duration::from_secs(4)).await;
    redis.restart();

    assert_completed_exactly_once(&app, &id, &expected).await;
    // Every row written before the crash came back from the AOF as it was: the result files
    // carry those exact lines, not a second run's.
    let batch = app.get_batch(KEY_A, &id).await;
    let (output, errors) = app.results(KEY_A, &batch).await;
    let by_id: HashMap<&str, &Value> = output
        .iter()
        .chain(&errors)
        .map(|l| (l["custom_id"].as_str().expect("custom_id"), l))
        .collect();
    for stored in before.values() {
        let (_, line) = Row::decode(stored).expect("stored row");
        let line: Value = serde_json::from_slice(line).expect("row is JSON");
        let custom_id = line["custom_id"].as_str().expect("custom_id");
        assert_eq!(
            by_id.get(custom_id),
            Some(&&line),
            "row of {custom_id} changed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_stall_mid_batch_delays_lines_without_failing_them() {
    let redis = RedisServer::start(&["--appendonly", "no"]);
    let url = redis.url();
    let app = spawn_app_with(AppOptions::default(), |s| s.redis_url = url).await;
    let (lines, expected) = slow_lines();
    let id = app.submit(KEY_A, &lines).await;
    app.wait_done(&id, 300).await;

    redis.signal("STOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.signal("CONT");

    assert_completed_exactly_once(&app, &id, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_broker_crashed_and_restarted_mid_batch_loses_and_duplicates_nothing() {
    let mut rabbit = tokio::task::spawn_blocking(RabbitServer::start)
        .await
        .expect("private RabbitMQ node");
    let url = rabbit.url();
    let app = spawn_app_with(AppOptions::default(), |s| s.amqp_url = url).await;
    let (lines, expected) = slow_lines();
    let id = app.submit(KEY_A, &lines).await;
    app.wait_done(&id, 300).await;

    let rabbit = tokio::task::spawn_blocking(move || {
        rabbit.kill();
        std::thread::sleep(Duration::from_secs(2));
        rabbit.restart();
        rabbit
    })
    .await
    .expect("broker restart");

    assert_completed_exactly_once(&app, &id, &expected).await;
    drop(app);
    drop(rabbit);
}
