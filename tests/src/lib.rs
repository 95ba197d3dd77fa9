//! Test harness: starts Sluice's real roles against the real RabbitMQ and Redis, each test in its
//! own namespace (queue prefix and key prefix) and storage directory, with a mock upstream.
//!
//! Roles run as tasks in the test process by default; [`TestApp::spawn_worker_process`] starts a
//! worker as a separate `sluice` process for tests that kill it.

pub mod lossy_proxy;
pub mod node;
pub mod python;
pub mod rabbitmq_server;
pub mod redis_server;
pub mod s3_server;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_cli::mock_upstream::{MockConfig, MockStats, MockUpstream};
use sluice_core::config::{ProviderSettings, StorageSettings, TenantSettings, hash_api_key};
use sluice_core::{Keys, Settings};
use sluice_runtime::metrics::Metrics;
use sluice_store::Store;
use sluice_worker::WorkerContext;
use tokio_util::sync::CancellationToken;

/// API key of tenant A in every test app.
pub const KEY_A: &str = "sk-test-tenant-a-0123456789abcdef";
/// API key of tenant B in every test app.
pub const KEY_B: &str = "sk-test-tenant-b-0123456789abcdef";
/// The model the mock provider serves.
pub const MODEL: &str = "mock-model";

/// Every Batch field of contract §1.1, present as a key even when null.
pub const BATCH_FIELDS: [&str; 22] = [
    "id",
    "object",
    "endpoint",
    "model",
    "errors",
    "input_file_id",
    "completion_window",
    "status",
    "output_file_id",
    "error_file_id",
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "request_counts",
    "usage",
    "metadata",
];

/// How to start a test app.
#[derive(Debug, Clone)]
pub struct AppOptions {
    /// Run the worker role in the test process.
    pub worker: bool,
    /// Run the aggregator role in the test process.
    pub aggregator: bool,
    /// Behaviour of the mock upstream.
    pub mock: MockConfig,
    /// Where files are stored.
    pub storage: StorageKind,
}

/// The object store a test app uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StorageKind {
    /// A fresh local directory.
    #[default]
    Local,
    /// A fresh bucket on a real S3-compatible server ([`s3_server::S3Server::shared`]).
    S3,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            worker: true,
            aggregator: true,
            mock: MockConfig::default(),
            storage: StorageKind::Local,
        }
    }
}

impl AppOptions {
    /// The API alone: nothing validates, runs or finalizes batches.
    pub fn api_only() -> Self {
        Self {
            worker: false,
            aggregator: false,
            ..Self::default()
        }
    }
}

/// A running Sluice with its own namespace.
pub struct TestApp {
    /// The settings every role of this app uses.
    pub settings: Settings,
    /// Base URL of the API, ending in `/v1`.
    pub base: String,
    /// HTTP client for the API.
    pub http: reqwest::Client,
    /// The mock upstream (shared state: stats are live).
    pub mock: MockUpstream,
    /// Direct store access for assertions.
    pub store: Store,
    /// Stops every in-process role.
    pub stop: CancellationToken,
    worker_stop: CancellationToken,
    dir: PathBuf,
    children: Vec<Child>,
}

/// A fresh settings value for a test: unique namespace and directory, fast sweeps and retries.
pub fn test_settings(upstream_base: &str) -> Settings {
    let ns = format!("t-{}", uuid::Uuid::new_v4().simple());
    let dir = std::env::temp_dir().join("sluice-tests").join(&ns);
    let mut s = Settings {
        namespace: ns,
        ..Settings::default()
    };
    s.api.listen = ([127, 0, 0, 1], 0).into();
    s.api.metrics_listen = ([127, 0, 0, 1], 0).into();
    s.storage = StorageSettings::Local { path: dir };
    // A run may point at another broker (a private node while the shared one is sick).
    if let Ok(url) = std::env::var("SLUICE_AMQP_URL") {
        s.amqp_url = url;
    }
    s.aggregator.sweep_interval_ms = 300;
    s.aggregator.redispatch_after_ms = 3_000;
    s.aggregator.lease_ms = 5_000;
    s.worker.concurrency = 16;
    s.worker.backoff_base_ms = 50;
    s.worker.backoff_max_ms = 400;
    s.worker.request_timeout_ms = 5_000;
    s.worker.connect_timeout_ms = 1_000;
    s.worker.shutdown_grace_ms = 3_000;
    s.limits.min_completion_window = "1s".into();
    // Tests create many batches per tenant; the per-owner limit has its own tests.
    s.limits.max_open_batches = 1_000;
    s.log.format = "pretty".into();
    s.log.filter = "warn".into();
    s.providers = vec![ProviderSettings {
        name: "mock".into(),
        base_url: upstream_base.to_owned(),
        api_key_env: None,
        models: vec![MODEL.into(), "mock-embed".into()],
        endpoints: Vec::new(),
        batch: true,
        flavors: Vec::new(),
        pacing: Default::default(),
    }];
    s.tenants = vec![
        TenantSettings {
            id: "tenant-a".into(),
            api_key_sha256: vec![hash_api_key(KEY_A)],
            ..Default::default()
        },
        TenantSettings {
            id: "tenant-b".into(),
            api_key_sha256: vec![hash_api_key(KEY_B)],
            ..Default::default()
        },
    ];
    s
}

/// Starts an app with default options.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default(), |_| {}).await
}

/// Starts an app; `tweak` adjusts the settings before any role starts.
pub async fn spawn_app_with(options: AppOptions, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    if std::env::var_os("TEST_LOG").is_some() {
        sluice_runtime::telemetry::init(&sluice_core::config::LogSettings {
            format: "pretty".into(),
            filter: "info".into(),
        });
    }
    let stop = CancellationToken::new();
    let mock = MockUpstream::new(options.mock.clone());
    let upstream = mock
        .clone()
        .spawn(stop.clone())
        .await
        .expect("mock upstream starts");
    let mut settings = test_settings(&upstream);
    if options.storage == StorageKind::S3 {
        settings.storage = s3_server::S3Server::shared().new_bucket_settings();
    }
    tweak(&mut settings);
    // The test's own directory (config files for child processes), removed at cleanup: never a
    // shared one such as the temp directory itself.
    let dir = match &settings.storage {
        StorageSettings::Local { path } => path.clone(),
        StorageSettings::S3 { .. } => std::env::temp_dir()
            .join("sluice-tests")
            .join(&settings.namespace),
    };
    let metrics = Metrics::new();
    let api = sluice_api::Application::build(settings.clone(), metrics.clone())
        .await
        .expect("API starts");
    let base = format!("http://127.0.0.1:{}/v1", api.port());
    tokio::spawn(api.run_until_stopped(stop.clone()));
    let worker_stop = stop.child_token();
    if options.worker || options.aggregator {
        let ctx = WorkerContext::build(settings.clone(), metrics)
            .await
            .expect("back end connects");
        if options.worker {
            tokio::spawn(sluice_worker::run_worker(ctx.clone(), worker_stop.clone()));
        }
        if options.aggregator {
            tokio::spawn(sluice_worker::run_aggregator(ctx, stop.clone()));
        }
    }
    let store = Store::open(&settings).await.expect("redis");
    TestApp {
        settings,
        base,
        http: reqwest::Client::new(),
        mock,
        store,
        stop,
        worker_stop,
        dir,
        children: Vec::new(),
    }
}

/// One chat-completions input line.
pub fn chat_line(custom_id: &str, text: &str) -> Value {
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": text}]},
    })
}

/// One chat line carrying mock-upstream fault instructions.
pub fn chat_line_with_mock(custom_id: &str, mock: Value) -> Value {
    let mut line = chat_line(custom_id, "hello");
    let mut mock = mock;
    mock["key"] = json!(custom_id);
    line["body"]["mock"] = mock;
    line
}

/// Joins lines into a JSONL document.
pub fn jsonl(lines: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

/// `n` chat lines with custom ids `req-0…`.
pub fn chat_lines(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| chat_line(&format!("req-{i}"), &format!("question {i}")))
        .collect()
}

impl TestApp {
    /// Keys of this app's namespace.
    pub fn keys(&self) -> Keys {
        Keys::new(&self.settings.namespace)
    }

    /// A request builder with `key` as bearer token.
    pub fn req(&self, method: reqwest::Method, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key)
    }

    /// Uploads `content` as `filename` with purpose batch; returns the response.
    pub async fn upload_raw(
        &self,
        key: &str,
        filename: &str,
        content: Vec<u8>,
    ) -> reqwest::Response {
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part(
                "file",
                reqwest::multipart::Part::bytes(content).file_name(filename.to_owned()),
            );
        self.req(reqwest::Method::POST, "/files", key)
            .multipart(form)
            .send()
            .await
            .expect("upload request")
    }

    /// Uploads a JSONL file and returns its id.
    pub async fn upload(&self, key: &str, content: Vec<u8>) -> String {
        let resp = self.upload_raw(key, "input.jsonl", content).await;
        let status = resp.status();
        let body: Value = resp.json().await.expect("upload answer is JSON");
        assert_eq!(status, 200, "upload failed: {body}");
        body["id"].as_str().expect("file id").to_owned()
    }

    /// Creates a batch; returns (status, body).
    pub async fn create_batch_raw(&self, key: &str, body: Value) -> (u16, Value) {
        let resp = self
            .req(reqwest::Method::POST, "/batches", key)
            .json(&body)
            .send()
            .await
            .expect("create");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("create answer is JSON"))
    }

    /// Creates a chat-completions batch over `file_id` with a 24h window; returns the batch id.
    pub async fn create_batch(&self, key: &str, file_id: &str) -> String {
        self.create_batch_window(key, file_id, "24h").await
    }

    /// Creates a chat-completions batch with the given completion window.
    pub async fn create_batch_window(&self, key: &str, file_id: &str, window: &str) -> String {
        let (status, body) = self
            .create_batch_raw(
                key,
                json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": window}),
            )
            .await;
        assert_eq!(status, 200, "create failed: {body}");
        assert_eq!(body["status"], "validating");
        body["id"].as_str().expect("batch id").to_owned()
    }

    /// Uploads `lines` and creates a batch over them.
    pub async fn submit(&self, key: &str, lines: &[Value]) -> String {
        let file = self.upload(key, jsonl(lines)).await;
        self.create_batch(key, &file).await
    }

    /// The batch object as `key` sees it; (status, body).
    pub async fn get_batch_raw(&self, key: &str, id: &str) -> (u16, Value) {
        let resp = self
            .req(reqwest::Method::GET, &format!("/batches/{id}"), key)
            .send()
            .await
            .expect("get");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("JSON"))
    }

    /// The batch object (tenant A's view unless `key` says otherwise).
    /// `GET {path}` (under `/v1`) as `key`, answered with JSON.
    pub async fn get_json(&self, key: &str, path: &str) -> Value {
        self.req(reqwest::Method::GET, path, key)
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("a JSON answer")
    }

    pub async fn get_batch(&self, key: &str, id: &str) -> Value {
        let (status, body) = self.get_batch_raw(key, id).await;
        assert_eq!(status, 200, "get batch: {body}");
        body
    }

    /// Polls until the batch reaches a terminal status (or `timeout`), returning it.
    pub async fn wait_terminal(&self, key: &str, id: &str, timeout: Duration) -> Value {
        self.wait_for(key, id, timeout, |b| {
            matches!(
                b["status"].as_str(),
                Some("completed" | "failed" | "expired" | "cancelled")
            )
        })
        .await
    }

    /// Waits (up to a minute) until batch `id` has at least `n` finished lines, reading Redis
    /// directly rather than through the API, which a dependency outage may be failing.
    pub async fn wait_done(&self, id: &str, n: u64) {
        let start = Instant::now();
        loop {
            let meta = self
                .store
                .get_batch(id)
                .await
                .expect("redis")
                .expect("batch");
            if meta.done() >= n {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "{meta:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until `done(batch)` holds; panics with the last state after `timeout`.
    pub async fn wait_for(
        &self,
        key: &str,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            let b = self.get_batch(key, id).await;
            if done(&b) {
                return b;
            }
            assert!(
                start.elapsed() < timeout,
                "batch {id} did not get there in {timeout:?}: {b:#}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The content of a file as `key` sees it.
    pub async fn file_content(&self, key: &str, file_id: &str) -> String {
        let resp = self
            .req(
                reqwest::Method::GET,
                &format!("/files/{file_id}/content"),
                key,
            )
            .send()
            .await
            .expect("content");
        assert_eq!(resp.status(), 200);
        resp.text().await.expect("text")
    }

    /// The lines of a batch's output and error files, parsed (empty when a file is null).
    pub async fn results(&self, key: &str, batch: &Value) -> (Vec<Value>, Vec<Value>) {
        let mut files = Vec::new();
        for field in ["output_file_id", "error_file_id"] {
            let lines = match batch[field].as_str() {
                Some(id) => self
                    .file_content(key, id)
                    .await
                    .lines()
                    .map(|l| serde_json::from_str(l).expect("result line is JSON"))
                    .collect(),
                None => Vec::new(),
            };
            files.push(lines);
        }
        let errors = files.pop().unwrap_or_default();
        let output = files.pop().unwrap_or_default();
        (output, errors)
    }

    /// Snapshot of what the mock upstream received.
    pub fn upstream_stats(&self) -> MockStats {
        self.mock.stats()
    }

    /// Stops the in-process worker role only (its in-flight lines are requeued).
    pub fn stop_worker(&self) {
        self.worker_stop.cancel();
    }

    /// Writes this app's settings as a TOML file for a child process.
    pub fn write_config(&self) -> PathBuf {
        std::fs::create_dir_all(&self.dir).expect("test dir");
        let path = self.dir.join("sluice.toml");
        // Written aside and renamed into place: a role started just before may still be reading
        // the file, and a truncated read would start it on the defaults (another namespace, port
        // 9090) instead of failing.
        let staged = self
            .dir
            .join(format!("sluice.toml.{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(
            &staged,
            toml::to_string(&self.settings).expect("settings serialize"),
        )
        .expect("write config");
        std::fs::rename(&staged, &path).expect("config into place");
        path
    }

    /// Starts `sluice <role>` as a child process with this app's settings.
    pub fn spawn_process(&mut self, role: &str) -> u32 {
        let config = self.write_config();
        let child = Command::new(sluice_binary())
            .arg(role)
            .arg("--config")
            .arg(config)
            .env("SLUICE_LOG__FORMAT", "pretty")
            // SLUICE_TEST_CHILD_LOG=info shows what a child role did when a test fails.
            .env(
                "RUST_LOG",
                std::env::var("SLUICE_TEST_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sluice binary starts (run `cargo build --bins` first)");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Starts `sluice api` as a child process on a spare port and waits until its `/readyz`
    /// answers; points [`TestApp::base`] at it. Another test may take the spare port between
    /// choosing it and the child binding it: a child that exits before it is ready is started
    /// again on another port.
    pub async fn spawn_ready_api_process(&mut self) -> u32 {
        for _attempt in 0..5 {
            let port = spare_port();
            self.settings.api.listen = ([127, 0, 0, 1], port).into();
            let pid = self.spawn_process("api");
            let ready = format!("http://127.0.0.1:{port}/readyz");
            // Generous: on a loaded 2-core CI machine start-up waits for Redis and the broker.
            let deadline = std::time::Instant::now() + Duration::from_secs(90);
            loop {
                if self
                    .http
                    .get(&ready)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                {
                    self.base = format!("http://127.0.0.1:{port}/v1");
                    return pid;
                }
                let child = self
                    .children
                    .iter_mut()
                    .find(|c| c.id() == pid)
                    .expect("spawned child");
                if let Some(status) = child.try_wait().expect("child status") {
                    eprintln!(
                        "the API process on port {port} exited ({status}); trying another port"
                    );
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the API process on port {port} never became ready"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("the API process exited before becoming ready on five ports in a row");
    }

    /// Starts a worker process.
    pub fn spawn_worker_process(&mut self) -> u32 {
        self.spawn_process("worker")
    }

    /// Waits for a child process to exit on its own; its exit status.
    pub fn wait_process(&mut self, pid: u32) -> std::process::ExitStatus {
        let child = self
            .children
            .iter_mut()
            .find(|c| c.id() == pid)
            .expect("spawned child");
        child.wait().expect("child exits")
    }

    /// Sends `signal` (e.g. "KILL", "TERM") to a child process and waits for it to exit.
    pub fn signal_process(&mut self, pid: u32, signal: &str) {
        send_signal(pid, signal);
        if let Some(child) = self.children.iter_mut().find(|c| c.id() == pid) {
            child.wait().expect("child exits");
        }
    }

    /// Stops every role, deletes the namespace's queues, keys and files.
    pub async fn cleanup(mut self) {
        for child in &mut self.children {
            child.kill().ok();
            child.wait().ok();
        }
        self.stop.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(conn) =
            sluice_broker::connect(&self.settings.amqp_url, "sluice-test-cleanup").await
            && let Ok(ch) = conn.create_channel().await
        {
            sluice_broker::delete_topology(&ch, &self.keys()).await.ok();
        }
        self.store.purge_namespace().await.ok();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// A port free now whose companion port + 10000 is free too (a Redis Cluster bus, an Erlang
/// distribution port).
///
/// Chosen below the kernel's ephemeral range (32768 and up), from which every `bind(…:0)` listener
/// and every outgoing connection of the parallel tests takes its port: a port picked there can be
/// taken by another test's server between this check and the child binding it, and the test then
/// talks to the wrong server.
pub fn spare_port() -> u16 {
    const FIRST: u16 = 16_000;
    const SPAN: u16 = 6_000;
    loop {
        let port = FIRST + (uuid::Uuid::new_v4().as_u128() % u128::from(SPAN)) as u16;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

/// Sends `signal` (e.g. "KILL", "TERM", "STOP") to process `pid`.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Path of the `sluice` binary built next to the test executable.
pub fn sluice_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let debug_dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let bin = debug_dir.join("sluice");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bins` first",
        bin.display()
    );
    bin
}

/// Asserts that output ∪ errors hold each of `expected` custom ids exactly once.
pub fn assert_exactly_once(output: &[Value], errors: &[Value], expected: &[String]) {
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for line in output.iter().chain(errors) {
        *seen
            .entry(line["custom_id"].as_str().expect("custom_id").to_owned())
            .or_default() += 1;
    }
    let dup: Vec<_> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k.clone())
        .collect();
    assert!(dup.is_empty(), "duplicated lines: {dup:?}");
    let lost: Vec<_> = expected
        .iter()
        .filter(|id| !seen.contains_key(*id))
        .collect();
    assert!(lost.is_empty(), "lost lines: {lost:?}");
    assert_eq!(seen.len(), expected.len(), "unexpected lines present");
}
