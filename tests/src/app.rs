//! A running Sluice in its own namespace: how it starts, the processes it owns, and how it is
//! taken down.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_cli::mock_upstream::{MockConfig, MockStats, MockUpstream};
use sluice_core::config::{ProviderSettings, StorageSettings, TenantSettings, hash_api_key};
use sluice_core::{Keys, Settings};
use sluice_runtime::metrics::Metrics;
use sluice_store::Store;
use sluice_worker::WorkerContext;
use tokio_util::sync::CancellationToken;

use crate::process::{KillOnDrop, send_signal, sluice_binary, spare_port};
use crate::{KEY_A, KEY_B, MODEL, s3_server};

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
    children: Vec<KillOnDrop>,
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
        refused_body_fields: Vec::new(),
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
    // The test's own directory (config files for child processes), removed on drop: never a
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

impl TestApp {
    /// Keys of this app's namespace.
    pub fn keys(&self) -> Keys {
        Keys::new(&self.settings.namespace)
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
        self.children.push(KillOnDrop::new(child));
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
}

/// How long the namespace's queues and keys may take to go; a dependency a test broke is not
/// waited for longer than this.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

impl Drop for TestApp {
    /// Stops every role and deletes the namespace's queues, keys and files, also when the test
    /// panicked. `Drop` cannot await, so the deletion runs on a thread of its own with its own
    /// runtime, which works whatever runtime (if any) the test is dropping the app on.
    fn drop(&mut self) {
        for child in &mut self.children {
            child.kill_and_reap();
        }
        self.stop.cancel();
        let amqp_url = self.settings.amqp_url.clone();
        let keys = self.keys();
        let store = self.store.clone();
        let deletion = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                // The in-process roles stop on the token; give them a moment so none declares a
                // queue again after its deletion.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let delete = async {
                    if let Ok(conn) = sluice_broker::connect(&amqp_url, "sluice-test-cleanup").await
                        && let Ok(ch) = conn.create_channel().await
                    {
                        sluice_broker::delete_topology(&ch, &keys).await.ok();
                    }
                    store.purge_namespace().await.ok();
                };
                tokio::time::timeout(CLEANUP_TIMEOUT, delete).await.ok();
            });
        });
        deletion.join().ok();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}
