//! `GET /v1/batches/{id}/results`: finished rows while a batch runs and after it ends, paged and
//! filtered, tenant-scoped.

use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::*;

use crate::compaction::lines_with_straggler;

struct Page {
    rows: Vec<Value>,
    next_after: Option<String>,
    has_more: bool,
}

async fn page(app: &TestApp, key: &str, batch: &str, query: &str) -> Page {
    let resp = app
        .req(
            reqwest::Method::GET,
            &format!("/batches/{batch}/results?{query}"),
            key,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{query}");
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/jsonl"
    );
    let next_after = resp
        .headers()
        .get("sluice-next-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let has_more = resp.headers()["sluice-has-more"] == "true";
    let text = resp.text().await.unwrap();
    Page {
        rows: text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
        next_after,
        has_more,
    }
}

fn range(r: impl Iterator<Item = usize>) -> Vec<String> {
    r.map(|i| format!("req-{i}")).collect()
}

/// Every row after `after`, page by page of `limit`.
async fn all_pages(app: &TestApp, batch: &str, limit: usize, extra: &str) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut after = String::new();
    loop {
        let p = page(
            app,
            KEY_A,
            batch,
            &format!("limit={limit}&after={after}{extra}"),
        )
        .await;
        assert!(p.rows.len() <= limit);
        rows.extend(p.rows);
        if !p.has_more {
            return rows;
        }
        after = p.next_after.expect("a next cursor when more rows remain");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_page_and_filter_while_the_batch_runs_and_after() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        // Some rows in segments, some still in Redis.
        s.aggregator.compact_rows = 40;
        s.worker.request_timeout_ms = 30_000;
    })
    .await;
    let mut lines = lines_with_straggler(300, 8_000);
    for i in (0..299).step_by(10) {
        lines[i] = chat_line_with_mock(&format!("req-{i}"), json!({"status": 400}));
    }
    let batch_id = app.submit(KEY_A, &lines).await;
    app.wait_for(KEY_A, &batch_id, Duration::from_secs(60), |b| {
        let c = &b["request_counts"];
        c["completed"].as_u64().unwrap_or(0) + c["failed"].as_u64().unwrap_or(0) >= 299
    })
    .await;
    assert_eq!(
        app.get_batch(KEY_A, &batch_id).await["status"],
        "in_progress"
    );

    // The first page, in input order, with the cursor of the next.
    let first = page(&app, KEY_A, &batch_id, "limit=100").await;
    assert_eq!(custom_ids(&first.rows), range(0..100));
    assert_eq!(first.next_after.as_deref(), Some("99"));
    assert!(first.has_more);
    let second = page(&app, KEY_A, &batch_id, "limit=100&after=99").await;
    assert_eq!(custom_ids(&second.rows), range(100..200));
    // Paging through: every finished row once, in order; the straggler is not there yet.
    let rows = all_pages(&app, &batch_id, 70, "").await;
    assert_eq!(custom_ids(&rows), range(0..299));
    assert_eq!(rows[1]["response"]["status_code"], 200);
    // The line-number cursor and the custom_id cursor agree.
    let by_id = page(&app, KEY_A, &batch_id, "limit=2&after=req-149").await;
    assert_eq!(custom_ids(&by_id.rows), range(150..152));
    // Status filters.
    let failed = all_pages(&app, &batch_id, 7, "&status=failed").await;
    assert_eq!(custom_ids(&failed), range((0..299).step_by(10)));
    assert!(failed.iter().all(|r| r["response"]["status_code"] == 400));
    let succeeded = all_pages(&app, &batch_id, 1_000, "&status=succeeded").await;
    assert_eq!(succeeded.len(), 299 - 30);
    assert!(
        succeeded
            .iter()
            .all(|r| r["response"]["status_code"] == 200)
    );
    // One line by custom_id; an unfinished or unknown one gives nothing.
    let one = page(&app, KEY_A, &batch_id, "custom_id=req-123").await;
    assert_eq!(custom_ids(&one.rows), vec!["req-123".to_owned()]);
    assert!(
        page(&app, KEY_A, &batch_id, "custom_id=req-299")
            .await
            .rows
            .is_empty()
    );

    // Another tenant sees nothing; bad parameters are refused.
    let other = app
        .req(
            reqwest::Method::GET,
            &format!("/batches/{batch_id}/results"),
            KEY_B,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    let body: Value = other.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("limit=100000", "limit"),
        ("status=done", "status"),
    ] {
        let resp = app
            .req(
                reqwest::Method::GET,
                &format!("/batches/{batch_id}/results?{query}"),
                KEY_A,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{query}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["param"], param, "{query}: {body}");
        assert!(body["error"]["message"].is_string());
    }

    // After the end: every row, the same as the output and error files.
    let batch = app
        .wait_terminal(KEY_A, &batch_id, Duration::from_secs(60))
        .await;
    assert_eq!(batch["status"], "completed");
    let rows = all_pages(&app, &batch_id, 1_000, "").await;
    assert_eq!(custom_ids(&rows), range(0..300));
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert_exactly_once(&output, &errors, &range(0..300));
    let mut from_files: Vec<Value> = output.into_iter().chain(errors).collect();
    from_files.sort_by_key(|r| {
        r["custom_id"].as_str().unwrap()[4..]
            .parse::<u64>()
            .unwrap()
    });
    assert_eq!(rows, from_files);
}

/// `api.results_page_bytes` ends a page early, whatever `limit` asks: a page of large rows stays
/// bounded, and the cursor still walks every row once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_page_ends_at_its_byte_budget_and_the_cursor_walks_every_row() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.api.results_page_bytes = 2_000;
    })
    .await;
    let lines: Vec<Value> = (0..30)
        .map(|i| chat_line(&format!("req-{i}"), "hi"))
        .collect();
    let batch_id = app.submit(KEY_A, &lines).await;
    app.wait_terminal(KEY_A, &batch_id, Duration::from_secs(60))
        .await;
    let first = page(&app, KEY_A, &batch_id, "limit=100").await;
    assert!(
        !first.rows.is_empty() && first.rows.len() < 30,
        "{} rows in a 2,000-byte page",
        first.rows.len()
    );
    assert!(first.has_more);
    let bytes: usize = first.rows.iter().map(|r| r.to_string().len() + 1).sum();
    let last_row = first.rows.last().unwrap().to_string().len() + 1;
    assert!(
        bytes - last_row < 2_000,
        "the page went on past its budget: {bytes} bytes"
    );
    let every = all_pages(&app, &batch_id, 100, "").await;
    assert_eq!(custom_ids(&every), range(0..30));
}
