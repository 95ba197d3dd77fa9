//! Signed webhooks: batch events reach the tenant's endpoint, verified by the
//! `standardwebhooks` package from PyPI (not by Sluice's own code), at least once and with one
//! `webhook-id` across retries; an event survives an aggregator that dies right after writing the
//! terminal status; endpoints on internal addresses are refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use serde_json::Value;
use sluice_core::config::{Secret, WebhookEndpoint};
use sluice_core::webhooks::WebhookJob;
use sluice_tests::python::python_with;
use sluice_tests::*;

/// The Standard Webhooks reference secret.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A `tests/webhooks/receiver.py` process (killed when dropped) and the log of what it received.
struct Receiver {
    _child: KillOnDrop,
    log: PathBuf,
}

impl Receiver {
    /// Starts a receiver on `port` that answers 503 to its first `fail_first` verified requests,
    /// logging to `log`; returns once it listens.
    async fn start(port: u16, fail_first: u32, log: &Path) -> Self {
        let python = tokio::task::spawn_blocking(|| {
            python_with("standardwebhooks", "standardwebhooks", "wh-venv")
        })
        .await
        .expect("python");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("webhooks/receiver.py");
        let child = Command::new(python)
            .arg(script)
            .arg(port.to_string())
            .arg(SECRET)
            .arg(fail_first.to_string())
            .arg(log)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map(KillOnDrop::new)
            .expect("receiver starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the receiver never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            _child: child,
            log: log.to_owned(),
        }
    }

    /// Every request received so far.
    fn requests(&self) -> Vec<Value> {
        read_log(&self.log)
    }

    /// Waits (up to a minute) until a request was answered 200; every request so far.
    async fn wait_delivered(&self) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let requests = self.requests();
            if requests.iter().any(|r| r["answered"] == 200) {
                return requests;
            }
            assert!(
                Instant::now() < deadline,
                "no webhook delivered: {requests:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn read_log(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("log line is JSON"))
        .collect()
}

fn log_path(app: &TestApp, name: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join("sluice-tests")
        .join(&app.settings.namespace);
    std::fs::create_dir_all(&dir).expect("test dir");
    dir.join(name)
}

fn endpoint(url: String) -> WebhookEndpoint {
    WebhookEndpoint {
        url,
        secret: Secret(SECRET.into()),
    }
}

/// Tenant A's events go to `urls`; retries are quick.
fn with_webhooks(s: &mut sluice_core::Settings, urls: Vec<String>, allow_private: bool) {
    s.webhooks.allow_private = allow_private;
    s.webhooks.backoff_base_ms = 200;
    s.webhooks.backoff_max_ms = 1_000;
    s.webhooks.timeout_ms = 2_000;
    s.tenants[0].webhooks = urls.into_iter().map(endpoint).collect();
}

/// Checks that every request verified and carried `batch_id`'s one `event_type` event under a
/// single `webhook-id`, and that exactly one was answered 200.
fn assert_one_event(requests: &[Value], batch_id: &str, event_type: &str) {
    assert!(!requests.is_empty());
    let id = requests[0]["webhook_id"].as_str().expect("webhook-id");
    for r in requests {
        assert_eq!(r["verified"], true, "standardwebhooks refused it: {r:#}");
        assert_eq!(
            r["webhook_id"], id,
            "the id changed across retries: {requests:#?}"
        );
        assert_eq!(r["event"]["id"], id, "{r:#}");
        assert_eq!(r["event"]["type"], event_type, "{r:#}");
        assert_eq!(r["event"]["data"]["id"], batch_id, "{r:#}");
        assert!(r["event"]["created_at"].is_i64(), "{r:#}");
    }
    let delivered = requests.iter().filter(|r| r["answered"] == 200).count();
    assert_eq!(delivered, 1, "{requests:#?}");
}

/// The receiver is down when the batch completes, then answers 503 once, then 200: the event is
/// retried through the delay queues and delivered once, under the same id every time. A cancelled
/// batch announces `batch.cancelled` and one failing validation `batch.failed`; tenant B, with no
/// endpoint, sends nothing there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_reaches_a_receiver_that_was_down_once_under_one_id() {
    let port = spare_port();
    let url = format!("http://127.0.0.1:{port}/hooks/sluice");
    let app = spawn_app_with(AppOptions::default(), |s| {
        with_webhooks(s, vec![url], true);
    })
    .await;
    let batch_id = app.submit(KEY_A, &chat_lines(3)).await;
    let other = app.submit(KEY_B, &chat_lines(2)).await;
    let batch = app
        .wait_terminal(KEY_A, &batch_id, Duration::from_secs(30))
        .await;
    assert_eq!(batch["status"], "completed");
    app.wait_terminal(KEY_B, &other, Duration::from_secs(30))
        .await;
    // Down for a while: the first attempts find nothing listening.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let receiver = Receiver::start(port, 1, &log_path(&app, "down.jsonl")).await;
    let requests = receiver.wait_delivered().await;
    assert!(requests.len() >= 2, "the 503 was retried: {requests:#?}");
    // Longer than the largest backoff: a second delivery would have come by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_one_event(&receiver.requests(), &batch_id, "batch.completed");

    // A cancelled batch announces its own event, with another id.
    let slow: Vec<Value> = (0..4)
        .map(|i| {
            chat_line_with_mock(
                &format!("slow-{i}"),
                serde_json::json!({"delay_ms": 20_000}),
            )
        })
        .collect();
    let cancelled = app.submit(KEY_A, &slow).await;
    app.wait_for(KEY_A, &cancelled, Duration::from_secs(30), |b| {
        b["status"] == "in_progress"
    })
    .await;
    let resp = app
        .req(
            reqwest::Method::POST,
            &format!("/batches/{cancelled}/cancel"),
            KEY_A,
        )
        .send()
        .await
        .expect("cancel");
    assert_eq!(resp.status(), 200);
    let of_cancelled = wait_event_of(&receiver, &cancelled).await;
    assert_one_event(&of_cancelled, &cancelled, "batch.cancelled");
    assert_ne!(of_cancelled[0]["webhook_id"], requests[0]["webhook_id"]);
    // A batch failing validation (the dispatcher writes that status) announces `batch.failed`.
    let bad = app.upload(KEY_A, b"not json\n".to_vec()).await;
    let failed = app.create_batch(KEY_A, &bad).await;
    let of_failed = wait_event_of(&receiver, &failed).await;
    assert_one_event(&of_failed, &failed, "batch.failed");
    assert_eq!(app.get_batch(KEY_A, &failed).await["status"], "failed");
    assert!(
        receiver
            .requests()
            .iter()
            .all(|r| r["event"]["data"]["id"] != other.as_str()),
        "tenant B has no endpoint: its batch must not be announced to tenant A's"
    );
    drop(receiver);
}

/// Waits (up to a minute) for a request about `batch_id`; every request about it so far.
async fn wait_event_of(receiver: &Receiver, batch_id: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let of_batch: Vec<Value> = receiver
            .requests()
            .into_iter()
            .filter(|r| r["event"]["data"]["id"] == batch_id)
            .collect();
        if of_batch.iter().any(|r| r["answered"] == 200) {
            return of_batch;
        }
        assert!(Instant::now() < deadline, "no event about {batch_id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An endpoint that never answers 2xx is retried until `webhooks.max_elapsed_secs` from the
/// event, under one id, and then its job is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_never_accepted_is_dead_lettered_after_its_retry_budget() {
    let port = spare_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let app = spawn_app_with(AppOptions::default(), |s| {
        with_webhooks(s, vec![url.clone()], true);
        s.webhooks.max_elapsed_secs = 3;
    })
    .await;
    let receiver = Receiver::start(port, u32::MAX, &log_path(&app, "budget.jsonl")).await;
    let batch_id = app.submit(KEY_A, &chat_lines(2)).await;
    let jobs = dead_letters(&app, 1).await;
    assert_eq!(jobs[0].batch_id, batch_id);
    assert_eq!(jobs[0].url, url);
    let requests = receiver.requests();
    assert_eq!(requests.len() as u32, jobs[0].attempts, "{requests:#?}");
    assert!(
        requests.len() >= 2,
        "retried before giving up: {requests:#?}"
    );
    for r in &requests {
        assert_eq!(r["verified"], true, "{r:#}");
        assert_eq!(r["answered"], 503, "{r:#}");
        assert_eq!(r["webhook_id"], jobs[0].event_id, "{r:#}");
    }
    drop(receiver);
}

/// The aggregator process exits right after writing the terminal status (fault injection), before
/// it could do anything else: the event was published before the status, so a new aggregator
/// delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_survives_an_aggregator_dying_right_after_the_terminal_status() {
    let port = spare_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let options = AppOptions {
        aggregator: false,
        ..AppOptions::default()
    };
    let mut app = spawn_app_with(options, |s| with_webhooks(s, vec![url], true)).await;
    let receiver = Receiver::start(port, 0, &log_path(&app, "crash.jsonl")).await;
    app.settings.aggregator.exit_after_terminal_status = true;
    let doomed = app.spawn_process("aggregator");
    let batch_id = app.submit(KEY_A, &chat_lines(3)).await;
    let status = tokio::task::block_in_place(|| app.wait_process(doomed));
    assert_eq!(
        status.code(),
        Some(86),
        "the aggregator exited by the fault"
    );
    let meta = app
        .store
        .get_batch(&batch_id)
        .await
        .expect("redis")
        .expect("batch");
    assert_eq!(meta.status.map(|s| s.as_str()), Some("completed"));
    app.settings.aggregator.exit_after_terminal_status = false;
    app.spawn_process("aggregator");
    let requests = receiver.wait_delivered().await;
    assert_one_event(&requests, &batch_id, "batch.completed");
    drop(receiver);
}

/// With `webhooks.allow_private` off, an endpoint on a loopback address, named by address or by
/// a name that resolves to it, is never called: its jobs are dead-lettered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endpoint_on_an_internal_address_is_refused() {
    let port = spare_port();
    let urls = vec![
        format!("http://127.0.0.1:{port}/hook"),
        format!("http://localhost:{port}/hook"),
    ];
    let app = spawn_app_with(AppOptions::default(), |s| {
        with_webhooks(s, urls.clone(), false)
    })
    .await;
    let receiver = Receiver::start(port, 0, &log_path(&app, "ssrf.jsonl")).await;
    let batch_id = app.submit(KEY_A, &chat_lines(2)).await;
    app.wait_terminal(KEY_A, &batch_id, Duration::from_secs(30))
        .await;
    let jobs = dead_letters(&app, 2).await;
    let mut refused: Vec<&str> = jobs.iter().map(|j| j.url.as_str()).collect();
    refused.sort_unstable();
    let mut expected: Vec<&str> = urls.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(refused, expected);
    for job in &jobs {
        assert_eq!(job.batch_id, batch_id);
        assert_eq!(job.event_type, "batch.completed");
        assert_eq!(job.attempts, 0, "refused before any attempt");
    }
    assert!(receiver.requests().is_empty(), "{:#?}", receiver.requests());
    drop(receiver);
}

/// Takes `n` jobs from the webhooks dead-letter queue, waiting up to a minute for them.
async fn dead_letters(app: &TestApp, n: usize) -> Vec<WebhookJob> {
    let conn = sluice_broker::connect(&app.settings.amqp_url, "sluice-test-dlq")
        .await
        .expect("broker");
    let channel = conn.create_channel().await.expect("channel");
    let queue = app.keys().webhooks_dlq();
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("the dead-letter queue exists");
    let mut jobs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while jobs.len() < n {
        match channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .expect("get")
        {
            Some(message) => {
                jobs.push(serde_json::from_slice(&message.delivery.data).expect("a job"));
                message
                    .delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .expect("ack");
            }
            None => {
                assert!(
                    Instant::now() < deadline,
                    "only {} dead letters",
                    jobs.len()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    jobs
}
