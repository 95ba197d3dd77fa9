//! Per-tenant budgets (`tenants[].budget`): a spent budget refuses creates with 429
//! `budget_exceeded` and the reset time, holds a running batch's lines until the reset (test
//! clock `window_secs`) and then runs each once, or fails them under `on_exhausted = "fail"`;
//! `GET /v1/usage` shows the mock's usage; tenants never see or spend each other's budget.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use sluice_core::config::{BudgetSettings, OnExhausted};
use sluice_runtime::metrics::Metrics;
use sluice_store::budget::{Admit, BilledLine, Counted};
use sluice_tests::*;
use sluice_worker::WorkerContext;

const WAIT: Duration = Duration::from_secs(60);

/// `GET /v1/usage` as `key`.
async fn usage(app: &TestApp, key: &str) -> Value {
    let resp = app.req(Method::GET, "/usage", key).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// `n` chat lines whose upstream calls the mock records by custom id, each answered with
/// `usage_tokens` tokens when set.
fn keyed_lines(n: usize, usage_tokens: Option<u64>) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let mock = usage_tokens.map_or(json!({}), |t| json!({"usage_tokens": t}));
            chat_line_with_mock(&format!("req-{i}"), mock)
        })
        .collect()
}

/// Asserts the mock was called exactly once for each of `ids` and for nothing else.
fn assert_called_once_each(app: &TestApp, ids: &[String]) {
    let stats = app.upstream_stats();
    for id in ids {
        let calls = stats.per_key.get(id).map_or(0, Vec::len);
        assert_eq!(calls, 1, "{id} was called {calls} times");
    }
    assert_eq!(stats.calls, ids.len() as u64, "{:?}", stats.per_key);
}

fn budget(set: impl FnOnce(&mut BudgetSettings)) -> Option<BudgetSettings> {
    let mut b = BudgetSettings::default();
    set(&mut b);
    Some(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spent_budget_refuses_creates_with_the_reset_and_spares_other_tenants() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.tenants[0].budget = budget(|b| b.requests_per_day = Some(2));
    })
    .await;
    let fresh = usage(&app, KEY_A).await;
    assert_eq!(fresh["object"], "usage");
    assert_eq!(fresh["exhausted"], Value::Null);
    assert_eq!(
        fresh["data"][0]["requests"],
        json!({"used": 0, "limit": 2, "remaining": 2})
    );

    let batch = app.submit(KEY_A, &chat_lines(2)).await;
    let done = app.wait_terminal(KEY_A, &batch, WAIT).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request_counts"]["completed"], 2);

    let spent = usage(&app, KEY_A).await;
    let day = &spent["data"][0];
    assert_eq!(day["window"], "day");
    assert_eq!(
        day["requests"],
        json!({"used": 2, "limit": 2, "remaining": 0})
    );
    let reset = day["end_time"].as_i64().unwrap();
    assert_eq!(reset - day["start_time"].as_i64().unwrap(), 86_400);
    assert_eq!(reset % 86_400, 0, "a UTC day ends at midnight");
    assert_eq!(
        spent["exhausted"],
        json!({"window": "day", "limit_type": "requests", "resets_at": reset})
    );

    // Every form of create is refused before anything is stored.
    let file = app.upload(KEY_A, jsonl(&chat_lines(1))).await;
    let resp = app
        .req(Method::POST, "/batches", KEY_A)
        .json(&json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(
        resp.headers()["sluice-budget-reset"],
        reset.to_string().as_str()
    );
    let retry_after: i64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=86_400).contains(&retry_after), "{retry_after}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("daily request budget") && message.contains(&reset.to_string()),
        "{message}"
    );
    let (status, body) = app
        .create_batch_raw(
            KEY_A,
            json!({"endpoint": "/v1/chat/completions", "completion_window": "24h",
                   "requests": [{"custom_id": "x", "body": {"model": MODEL, "messages": []}}]}),
        )
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (429, &json!("budget_exceeded"))
    );
    let listed = app.get_json(KEY_A, "/batches").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");

    // Tenant B has no budget: it creates and runs, and counts its own usage only.
    let other = app.submit(KEY_B, &chat_lines(3)).await;
    let done = app.wait_terminal(KEY_B, &other, WAIT).await;
    assert_eq!(done["status"], "completed", "{done}");
    let b = usage(&app, KEY_B).await;
    assert_eq!(
        b["data"][0]["requests"],
        json!({"used": 3, "limit": null, "remaining": null})
    );
    assert_eq!(b["exhausted"], Value::Null);
    assert_eq!(usage(&app, KEY_A).await["data"][0]["requests"]["used"], 2);
}

/// The request counts of tenant A's day windows in Redis, oldest first.
async fn day_windows(app: &TestApp) -> Vec<u64> {
    let mut conn = app.store.conn();
    let pattern = format!("{}:t:{{tenant-a}}:budget:d*", app.settings.namespace);
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut conn)
        .await
        .unwrap();
    keys.sort_by_key(|k| k.rsplit(":d").next().unwrap().parse::<i64>().unwrap());
    let mut counts = Vec::new();
    for key in keys {
        let n: Option<u64> = redis::cmd("HGET")
            .arg(&key)
            .arg("requests")
            .query_async(&mut conn)
            .await
            .unwrap();
        counts.push(n.unwrap_or(0));
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lines_past_a_spent_budget_wait_for_the_reset_and_then_run_once() {
    const LINES: usize = 7;
    const PER_WINDOW: u64 = 3;
    let app = spawn_app_with(
        AppOptions {
            worker: false,
            ..AppOptions::default()
        },
        |s| {
            s.tenants[0].budget = budget(|b| {
                b.requests_per_day = Some(PER_WINDOW);
                b.window_secs = Some(3);
            });
        },
    )
    .await;
    // The worker's own metrics, to read the per-tenant series.
    let metrics = Metrics::new();
    let ctx = WorkerContext::build(app.settings.clone(), metrics.clone())
        .await
        .unwrap();
    tokio::spawn(sluice_worker::run_worker(ctx, app.stop.child_token()));

    let batch = app.submit(KEY_A, &keyed_lines(LINES, None)).await;
    let done = app.wait_terminal(KEY_A, &batch, WAIT).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request_counts"]["completed"], LINES as u64);
    let (output, errors) = app.results(KEY_A, &done).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_exactly_once(&output, &errors, &req_ids(LINES));
    assert_called_once_each(&app, &req_ids(LINES));

    // No window let more than its budget through, so the lines ran over three windows at least.
    let windows = day_windows(&app).await;
    assert!(
        windows.iter().all(|n| *n <= PER_WINDOW),
        "a window passed its budget: {windows:?}"
    );
    assert_eq!(windows.iter().sum::<u64>(), LINES as u64, "{windows:?}");
    assert!(windows.len() >= 3, "{windows:?}");

    let held = metrics
        .budget_lines
        .with_label_values(&["tenant-a", "held"])
        .get();
    assert!(held >= LINES as u64 - PER_WINDOW, "held {held}");
    let counted = metrics
        .tenant_usage
        .with_label_values(&["tenant-a", "requests"])
        .get();
    assert_eq!(counted, LINES as u64);
    assert!(
        metrics
            .render()
            .contains("sluice_budget_lines_total{action=\"held\",tenant=\"tenant-a\"}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fail_policy_fails_the_lines_past_the_budget_without_calling() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.tenants[0].budget = budget(|b| {
            b.requests_per_day = Some(2);
            b.on_exhausted = OnExhausted::Fail;
        });
    })
    .await;
    let batch = app.submit(KEY_A, &keyed_lines(5, None)).await;
    let done = app.wait_terminal(KEY_A, &batch, WAIT).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request_counts"]["completed"], 2, "{done}");
    assert_eq!(done["request_counts"]["failed"], 3, "{done}");
    let (output, errors) = app.results(KEY_A, &done).await;
    assert_exactly_once(&output, &errors, &req_ids(5));
    for row in &errors {
        assert_eq!(row["error"]["code"], "budget_exceeded", "{row}");
        assert_eq!(row["response"], Value::Null, "{row}");
        let message = row["error"]["message"].as_str().unwrap();
        assert!(message.contains("daily request budget"), "{message}");
    }
    let called: Vec<String> = output
        .iter()
        .map(|r| r["custom_id"].as_str().unwrap().to_owned())
        .collect();
    assert_called_once_each(&app, &called);
    let u = usage(&app, KEY_A).await;
    assert_eq!(u["on_exhausted"], "fail");
    assert_eq!(u["data"][0]["requests"]["used"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_matches_the_mock_and_a_spent_month_stops_the_lines() {
    const TOKENS: u64 = 20;
    let app = spawn_app_with(AppOptions::default(), |s| {
        // One call at a time: each line is admitted after the previous one's tokens counted.
        s.worker.concurrency = 1;
        s.worker.lines_per_message = 1;
        s.tenants[0].budget = budget(|b| {
            b.tokens_per_month = Some(50);
            b.on_exhausted = OnExhausted::Fail;
        });
    })
    .await;
    let batch = app.submit(KEY_A, &keyed_lines(5, Some(TOKENS))).await;
    let done = app.wait_terminal(KEY_A, &batch, WAIT).await;
    assert_eq!(done["status"], "completed", "{done}");
    // 0, 20 and 40 tokens are under 50; at 60 the month is spent.
    assert_eq!(done["request_counts"]["completed"], 3, "{done}");
    let (output, errors) = app.results(KEY_A, &done).await;
    assert_exactly_once(&output, &errors, &req_ids(5));
    for row in &errors {
        let message = row["error"]["message"].as_str().unwrap();
        assert!(message.contains("monthly token budget"), "{message}");
    }

    let mock_tokens: u64 = app.upstream_stats().tokens.iter().map(|(_, t)| t).sum();
    assert_eq!(mock_tokens, 3 * TOKENS);
    let u = usage(&app, KEY_A).await;
    let (day, month) = (&u["data"][0], &u["data"][1]);
    assert_eq!(month["window"], "month");
    assert_eq!(
        month["tokens"],
        json!({"used": mock_tokens, "limit": 50, "remaining": 0})
    );
    assert_eq!(month["requests"]["used"], 3);
    assert_eq!(
        day["tokens"],
        json!({"used": mock_tokens, "limit": null, "remaining": null})
    );
    assert_eq!(u["exhausted"]["window"], "month");
    assert_eq!(u["exhausted"]["limit_type"], "tokens");
    assert_eq!(u["exhausted"]["resets_at"], month["end_time"]);
    assert_eq!(done["usage"]["total_tokens"], mock_tokens);

    // Tenant B, without a budget, counts the mock's tokens of its own lines, whatever they are.
    let before: u64 = app.upstream_stats().tokens.iter().map(|(_, t)| t).sum();
    let lines: Vec<Value> = [7, 11, 13]
        .iter()
        .enumerate()
        .map(|(i, t)| chat_line_with_mock(&format!("b-{i}"), json!({"usage_tokens": t})))
        .chain([chat_line("b-plain", "four words of prompt")])
        .collect();
    let other = app.submit(KEY_B, &lines).await;
    let done = app.wait_terminal(KEY_B, &other, WAIT).await;
    assert_eq!(done["request_counts"]["completed"], 4, "{done}");
    let after: u64 = app.upstream_stats().tokens.iter().map(|(_, t)| t).sum();
    let b = usage(&app, KEY_B).await;
    assert_eq!(b["data"][0]["tokens"]["used"], after - before, "{b}");
    assert_eq!(b["data"][1]["tokens"]["used"], after - before, "{b}");
    assert_eq!(b["data"][0]["requests"]["used"], 4);
    assert_eq!(
        usage(&app, KEY_A).await["data"][1]["tokens"]["used"],
        mock_tokens
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_line_counts_once_however_often_it_is_admitted_and_charged() {
    let app = spawn_app_with(AppOptions::api_only(), |_| {}).await;
    let store = &app.store;
    let limits = BudgetSettings {
        requests_per_day: Some(2),
        ..BudgetSettings::default()
    };
    let line = |n: u64| BilledLine {
        tenant: "tenant-a",
        batch: "batch_x",
        line: n,
        batch_expires_at: Some(sluice_core::domain::now_secs() + 600),
    };
    let now = sluice_core::domain::now_millis();
    // A redelivered line is admitted again without counting again, and its tokens count once.
    for round in 0..3u64 {
        let admitted = store.budget_admit(&limits, line(0), now).await.unwrap();
        let counted = store.budget_charge(None, line(0), 10, now).await.unwrap();
        let first = u64::from(round == 0);
        assert_eq!(
            admitted,
            Admit::Go(Counted {
                requests: first,
                tokens: 0
            })
        );
        assert_eq!((counted.requests, counted.tokens), (0, 10 * first));
    }
    let admitted = store.budget_admit(&limits, line(1), now).await.unwrap();
    assert!(matches!(admitted, Admit::Go(c) if c.requests == 1));
    // The budget is spent: a new line is refused and not counted, an admitted one still goes.
    let Admit::Spent(spent) = store.budget_admit(&limits, line(2), now).await.unwrap() else {
        panic!("spent");
    };
    assert_eq!((spent.what, spent.limit), ("requests", 2));
    let again = store.budget_admit(&limits, line(1), now).await.unwrap();
    assert!(matches!(again, Admit::Go(c) if c.requests == 0));
    // A tenant without a budget counts at the charge, once.
    let counted = store.budget_charge(None, line(7), 5, now).await.unwrap();
    assert_eq!((counted.requests, counted.tokens), (1, 5));
    let again = store.budget_charge(None, line(7), 5, now).await.unwrap();
    assert_eq!((again.requests, again.tokens), (0, 0));

    let u = usage(&app, KEY_A).await;
    assert_eq!(
        u["data"][0]["requests"],
        json!({"used": 3, "limit": null, "remaining": null})
    );
    assert_eq!(u["data"][0]["tokens"]["used"], 15);
    assert_eq!(usage(&app, KEY_B).await["data"][0]["requests"]["used"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_line_redelivered_after_its_worker_died_counts_once() {
    const LINES: usize = 40;
    const TOKENS: u64 = 9;
    let mut app = spawn_app_with(
        AppOptions {
            worker: false,
            ..AppOptions::default()
        },
        |s| {
            s.tenants[0].budget = budget(|b| b.requests_per_day = Some(1_000_000));
        },
    )
    .await;
    let lines: Vec<Value> = (0..LINES)
        .map(|i| {
            chat_line_with_mock(
                &format!("req-{i}"),
                json!({"usage_tokens": TOKENS, "delay_ms": 1_500}),
            )
        })
        .collect();
    let batch = app.submit(KEY_A, &lines).await;
    let victim = app.spawn_worker_process();
    // Calls take 1.5 s: once some have reached the mock, they are in flight, admitted and
    // counted, without their rows.
    let start = std::time::Instant::now();
    while app.upstream_stats().calls < 8 {
        assert!(start.elapsed() < WAIT, "the worker never called");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.signal_process(victim, "KILL");
    app.spawn_worker_process();
    let done = app.wait_terminal(KEY_A, &batch, WAIT).await;
    assert_eq!(done["status"], "completed", "{done}");
    let (output, errors) = app.results(KEY_A, &done).await;
    assert_exactly_once(&output, &errors, &req_ids(LINES));
    assert!(errors.is_empty(), "{errors:?}");
    let twice = app
        .upstream_stats()
        .per_key
        .values()
        .filter(|calls| calls.len() > 1)
        .count();
    assert!(twice > 0, "no line was called again after the kill");

    let day = &usage(&app, KEY_A).await["data"][0];
    assert_eq!(day["requests"]["used"], LINES as u64, "{day}");
    assert_eq!(day["tokens"]["used"], LINES as u64 * TOKENS, "{day}");
}
