//! Hostile and careless tenants: while tenant B runs an ordinary batch, tenant A sends
//! input meant to hurt the fleet. Every test checks that A gets the documented answer, that B's
//! batch completes with every row, that no Sluice process died, and that each process's peak RSS
//! (`VmHWM` from `/proc`) stays under a stated bound.
//!
//! The roles run as separate `sluice` processes (api, worker, aggregator) so each one's memory
//! is its own; the mock upstream runs in the test process.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_core::Settings;
use sluice_tests::*;

/// Peak RSS any role may reach in these tests (MiB). The processes idle at 15–50 MB; the bounds
/// leave room for a debug build but sit far below what the unbounded paths reached (GBs).
const API_MAX_MIB: u64 = 200;
const WORKER_MAX_MIB: u64 = 200;
const AGGREGATOR_MAX_MIB: u64 = 200;

/// A Sluice whose roles are child processes, with B's ordinary batch running.
struct Rig {
    app: TestApp,
    /// Peak RSS bound of the aggregator (MiB), tighter where a test is about its memory.
    aggregator_max_mib: u64,
    /// The role processes, children of `app`, which kills them when the rig is dropped.
    roles: Vec<(&'static str, u32)>,
    b_batch: String,
    b_ids: Vec<String>,
}

impl Rig {
    async fn start(tweak: impl FnOnce(&mut Settings)) -> Self {
        Self::start_with(AppOptions::default(), tweak).await
    }

    async fn start_with(options: AppOptions, tweak: impl FnOnce(&mut Settings)) -> Self {
        let options = AppOptions {
            worker: false,
            aggregator: false,
            ..options
        };
        let mut app = spawn_app_with(options, tweak).await;
        // The API first, so the other roles get the same config with its port in it.
        let mut roles = vec![("api", app.spawn_ready_api_process().await)];
        for role in ["worker", "aggregator"] {
            roles.push((role, app.spawn_process(role)));
        }
        // B's ordinary batch: slow enough to be running while A does its worst.
        let b_ids: Vec<String> = (0..200).map(|i| format!("b-{i}")).collect();
        let lines: Vec<Value> = b_ids
            .iter()
            .map(|id| chat_line_with_mock(id, json!({"delay_ms": 20})))
            .collect();
        let b_batch = app.submit(KEY_B, &lines).await;
        Self {
            app,
            aggregator_max_mib: AGGREGATOR_MAX_MIB,
            roles,
            b_batch,
            b_ids,
        }
    }

    /// Every role is still the process it started as, and under its memory bound.
    fn assert_processes_healthy(&self) {
        for (role, pid) in &self.roles {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_else(|_| panic!("the {role} process ({pid}) is gone"));
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            assert!(
                !field("State:").starts_with('Z'),
                "the {role} process ({pid}) exited"
            );
            let peak_kib: u64 = field("VmHWM:")
                .trim_end_matches("kB")
                .trim()
                .parse()
                .expect("VmHWM in kB");
            let bound = match *role {
                "api" => API_MAX_MIB,
                "worker" => WORKER_MAX_MIB,
                _ => self.aggregator_max_mib,
            };
            eprintln!("{role} peak RSS: {} MiB", peak_kib / 1024);
            assert!(
                peak_kib / 1024 <= bound,
                "the {role} process peaked at {} MiB (bound {bound} MiB)",
                peak_kib / 1024
            );
        }
    }

    /// B's batch completed with every row, and every process is healthy.
    async fn finish(self) {
        let batch = self
            .app
            .wait_terminal(KEY_B, &self.b_batch, Duration::from_secs(120))
            .await;
        assert_eq!(batch["status"], "completed", "{batch:#}");
        let (output, errors) = self.app.results(KEY_B, &batch).await;
        assert_exactly_once(&output, &errors, &self.b_ids);
        assert!(
            errors.is_empty(),
            "B's lines all succeed: {:?}",
            errors.first()
        );
        self.assert_processes_healthy();
    }
}

/// A's lines ask for a completion budget of 10¹² tokens on a token-paced provider. They are
/// charged at most the per-call cap and teach the shared actual/estimate ratio nothing, so B's
/// later lines are charged as before (the ratio is not dragged to its floor) and B is not stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn absurd_token_budgets_neither_stall_nor_skew_other_tenants() {
    let rig = Rig::start(|s| {
        s.providers[0].pacing.tpm = Some(600_000);
        // B's estimates stay near what its calls use, so the ratio B teaches sits well above the
        // ratio's floor (0.02) and a drag to that floor can be seen.
        s.worker.default_max_tokens = 4;
        // A's capped lines are charged the cap scaled by that ratio: small enough that A's 40
        // lines fit the minute's tokens.
        s.providers[0].pacing.max_call_tokens = Some(2_000);
    })
    .await;
    let app = &rig.app;
    // B's batch teaches the ratio first.
    app.wait_terminal(KEY_B, &rig.b_batch, Duration::from_secs(60))
        .await;
    let aimd = app.keys().pacing("mock", "aimd");
    let ratio = async || {
        let v: Option<String> = redis::cmd("HGET")
            .arg(&aimd)
            .arg("tk_ratio")
            .query_async(&mut app.store.conn())
            .await
            .unwrap();
        v.and_then(|v| v.parse::<f64>().ok()).unwrap_or(1.0)
    };
    // Successes are reported in sums a few hundred ms after their rows are written, so the
    // ratio can still move after B's batch completes: read it once it has held for a second.
    let settled_ratio = async || {
        let mut last = ratio().await;
        let mut held_since = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(20);
        while held_since.elapsed() < Duration::from_secs(1) {
            assert!(Instant::now() < deadline, "the ratio never settled");
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = ratio().await;
            if now != last {
                (last, held_since) = (now, Instant::now());
            }
        }
        last
    };
    let learnt = settled_ratio().await;
    assert!(
        learnt >= 0.05,
        "B's calls teach a ratio well above the floor, not {learnt}"
    );
    let lines: Vec<Value> = (0..40)
        .map(|i| {
            let mut line = chat_line(&format!("a-{i}"), "hi");
            line["body"]["max_tokens"] = json!(1_000_000_000_000u64);
            line
        })
        .collect();
    let a = app.submit(KEY_A, &lines).await;
    let a_batch = app.wait_terminal(KEY_A, &a, Duration::from_secs(60)).await;
    assert_eq!(a_batch["status"], "completed", "{a_batch:#}");
    assert_eq!(a_batch["request_counts"]["completed"], 40);
    let after = settled_ratio().await;
    assert!(
        after >= learnt * 0.9,
        "A's absurd budgets moved the learnt ratio from {learnt} to {after}"
    );
    // A new batch of B's still runs at once on the same provider.
    let more: Vec<Value> = (0..20)
        .map(|i| chat_line(&format!("b2-{i}"), "x"))
        .collect();
    let b2 = app.submit(KEY_B, &more).await;
    let b2 = app.wait_terminal(KEY_B, &b2, Duration::from_secs(30)).await;
    assert_eq!(b2["status"], "completed", "{b2:#}");
    rig.finish().await;
}

/// A's rows are large (about 0.3 MB each, 250 of them: ~80 MB in Redis). Finalize reads them
/// under `aggregator.finalize_read_bytes` (4 MiB here), so the aggregator's peak stays far below
/// the rows' total: 60 MiB measured, against 166 MiB for 300 such rows read at once, as the
/// row-count chunks of earlier builds did (`HOSTILE_READ_BYTES=1073741824` reproduces that).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_rows_finalize_within_the_read_budget() {
    let mut rig = Rig::start(|s| {
        s.limits.max_response_bytes = 1024 * 1024;
        s.aggregator.finalize_read_bytes = std::env::var("HOSTILE_READ_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4 * 1024 * 1024);
    })
    .await;
    rig.aggregator_max_mib = 100;
    let app = &rig.app;
    let ids: Vec<String> = (0..250).map(|i| format!("e-{i}")).collect();
    let lines: Vec<Value> = ids
        .iter()
        .map(|id| {
            json!({"custom_id": id, "method": "POST", "url": "/v1/embeddings",
                   "body": {"model": "mock-embed", "dimensions": 4096,
                            "input": [id, "two", "three", "four"]}})
        })
        .collect();
    let file = app.upload(KEY_A, jsonl(&lines)).await;
    let (status, body) = app
        .create_batch_raw(
            KEY_A,
            json!({"input_file_id": file, "endpoint": "/v1/embeddings", "completion_window": "24h"}),
        )
        .await;
    assert_eq!(status, 200, "{body:#}");
    let id = body["id"].as_str().unwrap().to_owned();
    let batch = app
        .wait_terminal(KEY_A, &id, Duration::from_secs(180))
        .await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    assert_eq!(batch["request_counts"]["completed"], 250);
    let content = app
        .file_content(KEY_A, batch["output_file_id"].as_str().unwrap())
        .await;
    assert!(
        content.len() > 60 * 1024 * 1024,
        "the output holds every large row ({} bytes)",
        content.len()
    );
    assert_eq!(content.lines().count(), 250);
    drop(content);
    rig.finish().await;
}

/// An upstream answers A's lines with bodies nested far past the JSON parser's depth limit, for a
/// tenant whose output file carries failed rows too. The rows stay readable and the batch ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deeply_nested_upstream_bodies_end_as_readable_rows() {
    let rig = Rig::start(|s| {
        for tenant in &mut s.tenants {
            tenant.errors_in_output = true;
        }
    })
    .await;
    let app = &rig.app;
    let lines = vec![
        chat_line_with_mock("deep-ok", json!({"deep": 5_000})),
        chat_line_with_mock("deep-400", json!({"deep": 5_000, "status": 400})),
        chat_line("fine", "hello"),
    ];
    let a = app.submit(KEY_A, &lines).await;
    let batch = app.wait_terminal(KEY_A, &a, Duration::from_secs(60)).await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    assert_eq!(batch["request_counts"]["completed"], 1);
    assert_eq!(batch["request_counts"]["failed"], 2);
    let output = app
        .file_content(KEY_A, batch["output_file_id"].as_str().unwrap())
        .await;
    let rows: Vec<Value> = output
        .lines()
        .map(|l| serde_json::from_str(l).expect("every output row parses"))
        .collect();
    assert_eq!(rows.len(), 3, "errors_in_output: all three rows");
    let by_id = |id: &str| rows.iter().find(|r| r["custom_id"] == id).unwrap().clone();
    assert_eq!(
        by_id("deep-ok")["error"]["code"],
        "invalid_upstream_response"
    );
    assert!(by_id("deep-400")["error"]["message"].is_string());
    assert!(by_id("fine")["error"].is_null());
    rig.finish().await;
}
