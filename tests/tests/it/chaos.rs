//! Worker processes killed or stopped mid-batch (killed with `-9`, stopped with SIGTERM, and a
//! dispatcher killed during enqueue): every line still ends exactly once and the batch completes.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_tests::*;

/// `n` chat lines `req-0…` whose upstream answer takes `delay_ms`, keyed by custom id.
fn delayed_lines(n: usize, delay_ms: u64) -> (Vec<Value>, Vec<String>) {
    let ids: Vec<String> = req_ids(n);
    let lines = ids
        .iter()
        .map(|id| chat_line_with_mock(id, json!({"delay_ms": delay_ms})))
        .collect();
    (lines, ids)
}

fn completed(batch: &Value) -> u64 {
    batch["request_counts"]["completed"].as_u64().unwrap_or(0)
}

/// Checks the finished batch: completed, every line exactly once and successful, counts agree.
async fn assert_all_succeeded_once(app: &TestApp, batch: &Value, expected: &[String]) {
    assert_eq!(batch["status"], "completed", "{batch:#}");
    let (output, errors) = app.results(KEY_A, batch).await;
    assert_exactly_once(&output, &errors, expected);
    assert!(
        errors.is_empty(),
        "no line should fail: {:?}",
        &errors[..errors.len().min(3)]
    );
    assert_eq!(batch["request_counts"]["total"], expected.len());
    assert_eq!(batch["request_counts"]["completed"], expected.len());
    assert_eq!(batch["request_counts"]["failed"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_batch_loses_and_duplicates_nothing() {
    worker_killed_mid_batch(StorageKind::Local).await;
}

/// Two worker processes on `storage`, one killed with `-9` mid-batch: every line ends exactly once.
pub(crate) async fn worker_killed_mid_batch(storage: StorageKind) {
    let options = AppOptions {
        worker: false,
        storage,
        ..AppOptions::default()
    };
    let mut app = spawn_app_with(options, |_| {}).await;
    let (lines, expected) = delayed_lines(2_000, 10);
    let id = app.submit(KEY_A, &lines).await;
    let victim = app.spawn_worker_process();
    app.spawn_worker_process();
    app.wait_for(KEY_A, &id, Duration::from_secs(30), |b| completed(b) >= 300)
        .await;

    app.signal_process(victim, "KILL");
    let at_kill = app.get_batch(KEY_A, &id).await;
    app.spawn_worker_process();
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(30)).await;

    assert!(
        completed(&at_kill) < 2_000,
        "the kill came too late to matter: {at_kill:#}"
    );
    assert_all_succeeded_once(&app, &batch, &expected).await;
    // Only the lines the victim had in flight may have been called twice.
    let stats = app.upstream_stats();
    let concurrency = u64::from(app.settings.worker.concurrency);
    assert_eq!(stats.per_key.len(), 2_000);
    assert!(
        stats.calls <= 2_000 + concurrency,
        "{} upstream calls for 2000 lines and one kill of a worker with {concurrency} in flight",
        stats.calls
    );
    let twice: Vec<(&String, usize)> = stats
        .per_key
        .iter()
        .map(|(k, t)| (k, t.len()))
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(
        twice.iter().all(|(_, n)| *n == 2),
        "a line was called more than twice: {twice:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dispatcher_killed_mid_enqueue_is_resumed_and_every_line_ends_exactly_once() {
    let options = AppOptions {
        worker: false,
        ..AppOptions::default()
    };
    let mut app = spawn_app_with(options, |s| {
        s.worker.publish_window = 50;
        // A dead dispatcher's lease must run out before anyone resumes its batch; keep that short.
        s.aggregator.lease_ms = 1_500;
        s.aggregator.redispatch_after_ms = 1_000;
    })
    .await;
    let total: i64 = 5_000;
    let lines = chat_lines(total as usize);
    let expected: Vec<String> = req_ids(total as usize);
    let id = app.submit(KEY_A, &lines).await;
    let dispatcher = app.spawn_worker_process();
    // Kill it right after its first checkpoint (every 2,000 confirmed lines), mid-enqueue.
    let started = Instant::now();
    loop {
        let meta = app
            .store
            .get_batch(&id)
            .await
            .expect("redis")
            .expect("batch exists");
        if meta.dispatched.unwrap_or(0) > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no checkpoint: {meta:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    app.signal_process(dispatcher, "KILL");
    let at_kill = app
        .store
        .get_batch(&id)
        .await
        .expect("redis")
        .expect("batch exists");
    app.spawn_worker_process();
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(40)).await;

    assert_eq!(at_kill.status.map(|s| s.as_str()), Some("in_progress"));
    let dispatched = at_kill.dispatched.unwrap_or(0);
    assert!(
        dispatched < total,
        "the kill came after the enqueue finished: {at_kill:?}"
    );
    assert_all_succeeded_once(&app, &batch, &expected).await;
    assert!(app.upstream_stats().calls >= total as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_stopped_with_sigterm_finishes_its_lines_within_the_grace_and_the_batch_completes()
{
    let options = AppOptions {
        worker: false,
        ..AppOptions::default()
    };
    let mut app = spawn_app_with(options, |_| {}).await;
    let (lines, expected) = delayed_lines(2_000, 10);
    let id = app.submit(KEY_A, &lines).await;
    let worker = app.spawn_worker_process();
    app.wait_for(KEY_A, &id, Duration::from_secs(30), |b| completed(b) >= 300)
        .await;

    let signalled = Instant::now();
    app.signal_process(worker, "TERM");
    let exit_took = signalled.elapsed();
    let at_exit = app.get_batch(KEY_A, &id).await;
    let calls_at_exit = app.upstream_stats().calls;
    app.spawn_worker_process();
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(30)).await;

    let grace = Duration::from_millis(app.settings.worker.shutdown_grace_ms);
    assert!(
        exit_took < grace,
        "the worker took {exit_took:?} to exit (grace {grace:?})"
    );
    assert!(
        completed(&at_exit) < 2_000,
        "the stop came too late to matter: {at_exit:#}"
    );
    // Whatever the stopped worker called upstream it finished and recorded before exiting.
    assert_eq!(completed(&at_exit), calls_at_exit, "{at_exit:#}");
    assert_all_succeeded_once(&app, &batch, &expected).await;
    let stats = app.upstream_stats();
    assert_eq!(stats.calls, 2_000, "a graceful stop causes no second call");
    assert!(stats.per_key.values().all(|t| t.len() == 1));
}

/// An aggregator that died mid-finalize leaves a `finalizing` batch, its lease running out and
/// maybe a partial output object. The next aggregator must wait out the lease, then write the
/// whole file over the partial one and register it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aggregator_dead_mid_finalize_leaves_no_half_or_double_file() {
    use object_store::ObjectStoreExt;
    use sluice_core::domain::{BatchStatus, result_file_ids};
    use sluice_runtime::storage::result_path;

    let options = AppOptions {
        aggregator: false,
        ..AppOptions::default()
    };
    let app = spawn_app_with(options, |s| {
        s.aggregator.lease_ms = 2_000;
        s.aggregator.sweep_interval_ms = 200;
    })
    .await;
    let total = 300;
    let lines = chat_lines(total);
    let expected: Vec<String> = req_ids(total);
    let id = app.submit(KEY_A, &lines).await;
    app.wait_for(KEY_A, &id, Duration::from_secs(30), |b| {
        completed(b) == total as u64
    })
    .await;

    // What the dead aggregator left behind.
    let dead = app.store.keys().batch_lease(&id);
    let held = app
        .store
        .acquire_lease(&dead, Duration::from_millis(2_000))
        .await
        .expect("redis");
    assert!(held.is_some(), "nobody else holds the lease");
    app.store
        .transition(&id, BatchStatus::Finalizing, &[])
        .await
        .expect("redis");
    let ctx = sluice_worker::WorkerContext::build(
        app.settings.clone(),
        sluice_runtime::metrics::Metrics::new(),
    )
    .await
    .expect("back end connects");
    ctx.objects
        .put(
            &result_path(&id, "output"),
            b"{\"id\":\"batch_req_half\",\"custom_id\":\"req-0\",\"resp"
                .to_vec()
                .into(),
        )
        .await
        .expect("partial object");

    let stop = tokio_util::sync::CancellationToken::new();
    let aggregator = tokio::spawn(sluice_worker::run_aggregator(ctx.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let waiting = app.get_batch(KEY_A, &id).await;
    assert_eq!(waiting["status"], "finalizing", "the lease is still held");
    assert!(waiting["output_file_id"].is_null());

    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(20)).await;
    assert_all_succeeded_once(&app, &batch, &expected).await;
    let (output_id, _) = result_file_ids(&id);
    assert_eq!(batch["output_file_id"], output_id.as_str());
    let content = app.file_content(KEY_A, &output_id).await;
    assert!(
        content
            .lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "every line is whole"
    );
    let file = app
        .req(reqwest::Method::GET, &format!("/files/{output_id}"), KEY_A)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(file["bytes"], content.len());
    let listed = app
        .req(reqwest::Method::GET, "/files?purpose=batch_output", KEY_A)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed:#}");
    stop.cancel();
    aggregator.await.ok();
}
