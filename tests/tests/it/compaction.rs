//! Rows leave Redis for segment objects while a batch runs, and a compaction that dies at any
//! step loses no row and doubles none.

use std::time::Duration;

use object_store::ObjectStoreExt;
use serde_json::{Value, json};
use sluice_runtime::metrics::Metrics;
use sluice_runtime::segments::segment_path;
use sluice_tests::*;
use sluice_worker::WorkerContext;
use sluice_worker::aggregate::compaction;

async fn hlen(app: &TestApp, key: &str) -> i64 {
    redis::cmd("HLEN")
        .arg(key)
        .query_async(&mut app.store.conn())
        .await
        .expect("HLEN")
}

async fn exists(app: &TestApp, key: &str) -> bool {
    let n: i64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut app.store.conn())
        .await
        .expect("EXISTS");
    n == 1
}

/// `n` chat lines; the last one answers only after `straggle_ms`, so the batch stays running
/// while every other line is done.
pub fn lines_with_straggler(n: usize, straggle_ms: u64) -> Vec<Value> {
    let mut lines = chat_lines(n - 1);
    lines.push(chat_line_with_mock(
        &format!("req-{}", n - 1),
        json!({"delay_ms": straggle_ms}),
    ));
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_are_compacted_into_segments_while_the_batch_runs() {
    compaction_during_run(StorageKind::Local).await;
}

/// Rows leave Redis for segment objects in `storage` while the batch runs; the S3
/// module runs it against a real S3-compatible server.
pub(crate) async fn compaction_during_run(storage: StorageKind) {
    let options = AppOptions {
        storage,
        ..AppOptions::default()
    };
    let app = spawn_app_with(options, |s| {
        s.aggregator.compact_rows = 50;
        s.worker.request_timeout_ms = 30_000;
    })
    .await;
    let lines = lines_with_straggler(600, 8_000);
    let batch_id = app.submit(KEY_A, &lines).await;
    let keys = app.keys();

    // Every line but the straggler is done: most rows must already have left Redis.
    app.wait_for(KEY_A, &batch_id, Duration::from_secs(60), |b| {
        b["request_counts"]["completed"].as_u64() >= Some(599)
    })
    .await;
    let start = std::time::Instant::now();
    loop {
        let pending = hlen(&app, &keys.batch_rows(&batch_id)).await;
        let segments = app.store.segments(&batch_id).await.unwrap();
        let batch = app.get_batch(KEY_A, &batch_id).await;
        if pending < 100 && !segments.is_empty() {
            assert_eq!(batch["status"], "in_progress", "compaction came too late");
            let in_segments: u64 = segments.iter().map(|s| s.rows).sum();
            assert_eq!(in_segments + pending as u64, 599, "{segments:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "rows stayed in Redis: {pending} pending, {} segments, batch {batch:#}",
            segments.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let batch = app
        .wait_terminal(KEY_A, &batch_id, Duration::from_secs(60))
        .await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert_exactly_once(&output, &errors, &custom_ids(&lines));
    assert_eq!(
        custom_ids(&output),
        custom_ids(&lines),
        "output in input order"
    );
    // A terminal batch keeps no row in Redis.
    assert!(!exists(&app, &keys.batch_rows(&batch_id)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compaction_dying_at_any_step_loses_and_doubles_no_row() {
    // No aggregator yet: the test plays the aggregator's steps itself, dying between them.
    let app = spawn_app_with(
        AppOptions {
            aggregator: false,
            ..AppOptions::default()
        },
        |s| {
            // Nothing asks for a compaction before the test's own steps.
            s.aggregator.compact_rows = 1_000_000;
        },
    )
    .await;
    let lines = chat_lines(300);
    let batch_id = app.submit(KEY_A, &lines).await;
    app.wait_for(KEY_A, &batch_id, Duration::from_secs(60), |b| {
        b["request_counts"]["completed"].as_u64() == Some(300)
    })
    .await;
    let ctx = WorkerContext::build(app.settings.clone(), Metrics::new())
        .await
        .unwrap();
    let rows_key = app.keys().batch_rows(&batch_id);
    assert_eq!(hlen(&app, &rows_key).await, 300);

    // 1. Dies after writing the object, before registering: an orphan nobody reads.
    let orphan = compaction::collect(&ctx, &batch_id).await.unwrap().unwrap();
    compaction::write(&ctx, &batch_id, &orphan).await.unwrap();
    let orphan_path = segment_path(&batch_id, &orphan.record.name);
    assert!(ctx.objects.head(&orphan_path).await.is_ok());
    assert_eq!(hlen(&app, &rows_key).await, 300, "no row left Redis");
    assert!(app.store.segments(&batch_id).await.unwrap().is_empty());

    // 2. Two replicas compact the same rows (a lease lapsed): only the first registration counts.
    let a = compaction::collect(&ctx, &batch_id).await.unwrap().unwrap();
    let b = compaction::collect(&ctx, &batch_id).await.unwrap().unwrap();
    compaction::write(&ctx, &batch_id, &a).await.unwrap();
    compaction::write(&ctx, &batch_id, &b).await.unwrap();
    assert!(compaction::register(&ctx, &batch_id, &a).await.unwrap());
    assert!(!compaction::register(&ctx, &batch_id, &b).await.unwrap());
    assert_eq!(
        hlen(&app, &rows_key).await,
        300 - a.rows.len() as i64,
        "exactly the registered rows left Redis"
    );

    // 3. Dies right after registering (the ask is never cleared, the lease never released).
    // Nothing pending any more, so a row from here is a fresh collect.
    let c = compaction::collect(&ctx, &batch_id).await.unwrap();
    if let Some(c) = c {
        compaction::write(&ctx, &batch_id, &c).await.unwrap();
        assert!(compaction::register(&ctx, &batch_id, &c).await.unwrap());
    }
    let segments = app.store.segments(&batch_id).await.unwrap();
    let in_segments: u64 = segments.iter().map(|s| s.rows).sum();
    assert_eq!(in_segments + hlen(&app, &rows_key).await as u64, 300);

    // A redelivered line whose row already sits in a segment is still a duplicate.
    let (written, _) = app
        .store
        .write_rows(
            &batch_id,
            &[(
                0,
                sluice_core::domain::Row::error("req-0", "x", "y"),
                Default::default(),
            )],
            (1_000_000, 1 << 40),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    assert_eq!(written, vec![sluice_store::RowWrite::Duplicate]);

    // Now an aggregator takes over and finishes the batch from the segments and what is left.
    tokio::spawn(sluice_worker::run_aggregator(ctx.clone(), app.stop.clone()));
    let batch = app
        .wait_terminal(KEY_A, &batch_id, Duration::from_secs(60))
        .await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    assert_eq!(batch["request_counts"]["completed"], 300);
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert_exactly_once(&output, &errors, &custom_ids(&lines));
    assert_eq!(
        custom_ids(&output),
        custom_ids(&lines),
        "output in input order"
    );
    // The orphans (never registered) are gone with the finalize; the registered ones stay.
    assert!(ctx.objects.head(&orphan_path).await.is_err());
    assert!(
        ctx.objects
            .head(&segment_path(&batch_id, &b.record.name))
            .await
            .is_err()
    );
    assert!(
        ctx.objects
            .head(&segment_path(&batch_id, &a.record.name))
            .await
            .is_ok()
    );
    assert!(!exists(&app, &rows_key).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finalize_merges_more_segments_than_its_fan_in_in_passes() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.aggregator.compact_rows = 20;
        s.aggregator.merge_fan_in = 3;
        s.worker.request_timeout_ms = 30_000;
    })
    .await;
    let mut lines = lines_with_straggler(400, 4_000);
    // Failures go through the same segments into the error file.
    for i in (0..399).step_by(7) {
        lines[i] = chat_line_with_mock(&format!("req-{i}"), json!({"status": 400}));
    }
    let batch_id = app.submit(KEY_A, &lines).await;
    let batch = app
        .wait_terminal(KEY_A, &batch_id, Duration::from_secs(60))
        .await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert_exactly_once(&output, &errors, &custom_ids(&lines));
    let failed: Vec<String> = (0..399).step_by(7).map(|i| format!("req-{i}")).collect();
    assert_eq!(custom_ids(&errors), failed);
    assert!(
        app.store.segments(&batch_id).await.unwrap().len() <= 3,
        "merge passes leave at most fan-in segments"
    );
}
