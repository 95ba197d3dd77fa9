//! Scheduling of a rate-limited provider: deadline order within a tenant, weighted
//! fair share between tenants whatever their number of batches, background priority in spare
//! capacity only, and strict admission at create.
//!
//! Shares are measured by the mock upstream's calls per tenant over a stretch of contention
//! (counts between two moments, never durations), so a slow machine changes how long a test runs,
//! not what it sees.

use std::time::Duration;

use serde_json::{Value, json};
use sluice_core::Settings;
use sluice_core::config::PacingSettings;
use sluice_store::schedule_registry;
use sluice_tests::*;

/// Paces the mock provider at `rpm`; batches of more than 10 lines are scheduled (not express),
/// two lines per message so windows are fine-grained.
fn scheduled(s: &mut Settings, rpm: u64) {
    s.providers[0].pacing = PacingSettings {
        rpm: Some(rpm),
        burst_ms: Some(200),
        ..PacingSettings::default()
    };
    s.worker.express_lines = 10;
    s.worker.lines_per_message = 2;
}

/// `n` lines whose custom ids (and mock keys) are `{prefix}-0…`.
fn lines(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| chat_line_with_mock(&format!("{prefix}-{i}"), json!({})))
        .collect()
}

/// Upstream calls so far of lines whose custom id starts with `prefix`.
fn calls(app: &TestApp, prefix: &str) -> usize {
    app.upstream_stats()
        .per_key
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, t)| t.len())
        .sum()
}

/// Creates a batch over `lines` with `extra` create fields.
async fn create(app: &TestApp, key: &str, lines: &[Value], window: &str, extra: Value) -> String {
    let file = app.upload(key, jsonl(lines)).await;
    let mut body = json!({
        "input_file_id": file,
        "endpoint": "/v1/chat/completions",
        "completion_window": window,
    });
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    let (status, body) = app.create_batch_raw(key, body).await;
    assert_eq!(status, 200, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

/// Waits until `cond` holds, polling the mock's call counts.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "waited for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each tenant's calls during `span` calls of contention, once both have made `warm` calls.
async fn shares(app: &TestApp, a: &str, b: &str, warm: usize, span: usize) -> (usize, usize) {
    until("both tenants running", || {
        calls(app, a) >= warm && calls(app, b) >= warm
    })
    .await;
    let (a0, b0) = (calls(app, a), calls(app, b));
    until("the measured stretch", || {
        calls(app, a) + calls(app, b) >= a0 + b0 + span
    })
    .await;
    (calls(app, a) - a0, calls(app, b) - b0)
}

async fn completed(app: &TestApp, key: &str, id: &str) -> Value {
    let batch = app.wait_terminal(key, id, Duration::from_secs(180)).await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    batch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_one_hour_batch_created_after_a_day_batch_finishes_first() {
    let app = spawn_app_with(AppOptions::default(), |s| scheduled(s, 1_200)).await;
    let day = create(&app, KEY_A, &lines("day", 200), "24h", json!({})).await;
    until("the day batch running", || calls(&app, "day-") >= 20).await;
    let hour = create(&app, KEY_A, &lines("hour", 200), "1h", json!({})).await;

    completed(&app, KEY_A, &hour).await;
    let day_now = app.get_batch(KEY_A, &day).await;
    assert_ne!(day_now["status"], "completed", "{day_now:#}");
    completed(&app, KEY_A, &day).await;
    let stats = app.upstream_stats();
    let times = |p: &str| -> Vec<u64> {
        stats
            .per_key
            .iter()
            .filter(|(k, _)| k.starts_with(p))
            .flat_map(|(_, t)| t.iter().copied())
            .collect()
    };
    let mut hour_times = times("hour-");
    hour_times.sort_unstable();
    // By the hour batch's 80th call the day batch's lines queued before it came (a window of 40)
    // are gone; from then on its floor (10 % of the tenant's share, split between the two
    // batches: 2 lines of 40) keeps it moving while the hour batch takes the rest, until the
    // hour batch has fewer lines left than its window and the day batch gets the spare.
    let (from, to) = (hour_times[80], hour_times[150]);
    let day_during = times("day-")
        .iter()
        .filter(|t| **t > from && **t <= to)
        .count();
    assert!(
        (1..=15).contains(&day_during),
        "the day batch made {day_during} calls during the hour batch's 80th to 150th"
    );
}

// Both fairness tests count 2,400 calls of contention (a minute at 2,400 RPM; 40 s here at
// 3,600 RPM) after a warm-up in which the windows and their corrections settle, and hold the
// shares to within 5 %. They run alone (`.config/nextest.toml`): beside the rest of the suite on two cores,
// 3:1 measured 3.17–3.30 (the heavier tenant over-served while the roles starve for CPU), and a
// bound loose enough for that would not show the share the scheduler keeps.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weights_three_to_one_give_three_to_one_throughput() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        scheduled(s, 3_600);
        s.tenants[0].weight = 3.0;
    })
    .await;
    let a = create(&app, KEY_A, &lines("a", 2_300), "24h", json!({})).await;
    let b = create(&app, KEY_B, &lines("b", 800), "24h", json!({})).await;
    let (na, nb) = shares(&app, "a-", "b-", 100, 2_400).await;
    let ratio = na as f64 / nb as f64;
    eprintln!("weights 3:1: A {na} calls, B {nb} calls, A/B {ratio:.3}");
    assert!(
        (2.85..=3.15).contains(&ratio),
        "A {na} calls, B {nb} calls: {ratio:.3}"
    );
    completed(&app, KEY_B, &b).await;
    completed(&app, KEY_A, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn equal_weights_share_one_to_one_whatever_the_number_of_batches() {
    let app = spawn_app_with(AppOptions::default(), |s| scheduled(s, 3_600)).await;
    let a = create(&app, KEY_A, &lines("a", 1_500), "24h", json!({})).await;
    let mut bs = Vec::new();
    for i in 0..5 {
        let prefix = format!("b{i}");
        bs.push(create(&app, KEY_B, &lines(&prefix, 300), "24h", json!({})).await);
    }
    // Past the start of B's five batches (created one after another).
    let (na, nb) = shares(&app, "a-", "b", 200, 2_400).await;
    let ratio = na as f64 / nb as f64;
    eprintln!("equal weights: A {na} calls, B {nb} calls, A/B {ratio:.3}");
    assert!(
        (0.95..=1.05).contains(&ratio),
        "A (one batch) {na} calls, B (five) {nb} calls: {ratio:.3}"
    );
    for b in &bs {
        completed(&app, KEY_B, b).await;
    }
    completed(&app, KEY_A, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn background_priority_only_uses_spare_capacity() {
    let app = spawn_app_with(AppOptions::default(), |s| scheduled(s, 1_200)).await;
    let bg = create(
        &app,
        KEY_A,
        &lines("bg", 400),
        "24h",
        json!({"priority": "background"}),
    )
    .await;
    until("the background batch running", || calls(&app, "bg-") >= 30).await;
    let fg = create(&app, KEY_B, &lines("fg", 240), "24h", json!({})).await;
    // By 80 foreground calls the background lines queued before it are gone; until 180 (60 left,
    // more than the provider's whole window of 40 lines) the foreground batch uses everything.
    until("80 foreground calls", || calls(&app, "fg-") >= 80).await;
    let bg_before = calls(&app, "bg-");
    until("180 foreground calls", || calls(&app, "fg-") >= 180).await;
    let bg_during = calls(&app, "bg-") - bg_before;
    assert!(
        bg_during <= 3,
        "{bg_during} background calls during 100 foreground calls"
    );
    completed(&app, KEY_B, &fg).await;
    // Spare capacity again: the background batch finishes.
    completed(&app, KEY_A, &bg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_admission_refuses_a_batch_that_cannot_finish_in_its_window() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        scheduled(s, 60);
        s.limits.admission = "strict".into();
        s.tenants[1].weight = 3.0;
    })
    .await;
    // 100 lines at one a second need 100 s.
    let file = app.upload(KEY_A, jsonl(&lines("x", 100))).await;
    let body = |window: &str| json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": window});
    let (status, refused) = app.create_batch_raw(KEY_A, body("60s")).await;
    assert_eq!(status, 429, "{refused}");
    assert_eq!(refused["error"]["code"], "insufficient_capacity");
    assert_eq!(refused["error"]["type"], "invalid_request_error");
    assert_eq!(refused["error"]["param"], "completion_window");
    let (status, ok) = app.create_batch_raw(KEY_A, body("150s")).await;
    assert_eq!(status, 200, "{ok}");
    // Once it runs, its lines are due before those of a batch that expires later: 100 more need
    // about 200 s.
    loop {
        let now = sluice_core::domain::now_millis();
        let entries = schedule_registry::read_registry(&app.store, "mock", now)
            .await
            .unwrap();
        if !entries.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, refused) = app.create_batch_raw(KEY_A, body("180s")).await;
    assert_eq!(status, 429, "{refused}");
    // Tenant B (weight 3) gets three quarters of the rate while A runs: its 100 lines need
    // about 133 s, whatever A's deadline.
    let file_b = app.upload(KEY_B, jsonl(&lines("y", 100))).await;
    let body_b = |window: &str| json!({"input_file_id": file_b, "endpoint": "/v1/chat/completions", "completion_window": window});
    let (status, refused) = app.create_batch_raw(KEY_B, body_b("100s")).await;
    assert_eq!(status, 429, "{refused}");
    // Inline requests are estimated the same way.
    let inline = |window: &str| json!({"endpoint": "/v1/chat/completions", "completion_window": window, "requests": lines("z", 100)});
    let (status, refused) = app.create_batch_raw(KEY_B, inline("100s")).await;
    assert_eq!(status, 429, "{refused}");
    assert_eq!(refused["error"]["code"], "insufficient_capacity");
    let (status, ok) = app.create_batch_raw(KEY_B, inline("170s")).await;
    assert_eq!(status, 200, "{ok}");
    let (status, ok) = app.create_batch_raw(KEY_A, body("1h")).await;
    assert_eq!(status, 200, "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_priority_is_refused_as_a_field_and_as_metadata() {
    let app = spawn_app_with(AppOptions::api_only(), |_| {}).await;
    let file = app.upload(KEY_A, jsonl(&lines("x", 2))).await;
    let base = json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let mut field = base.clone();
    field["priority"] = json!("urgent");
    let (status, body) = app.create_batch_raw(KEY_A, field).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "priority");
    assert_eq!(body["error"]["code"], "invalid_value");
    let mut meta = base.clone();
    meta["metadata"] = json!({"priority": "asap"});
    let (status, body) = app.create_batch_raw(KEY_A, meta).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "metadata.priority");
    let mut ok = base;
    ok["metadata"] = json!({"priority": "background"});
    let (status, body) = app.create_batch_raw(KEY_A, ok).await;
    assert_eq!(status, 200, "{body}");
    let stored = app
        .store
        .get_batch(body["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.priority.map(|p| p.as_str()), Some("background"));
}
