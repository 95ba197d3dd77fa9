//! Dependencies that hang instead of failing: a "broker" or "Redis" that accepts TCP
//! connections and never answers, a RabbitMQ node SIGSTOPped mid-batch, and a dependency that is
//! simply not there when `sluice all --demo` starts.
//!
//! Every role must say so in one `warn` line naming the dependency and its URL (without
//! credentials), keep `/livez` up and answer `/readyz` with 503 and the reason, and recover with
//! nothing lost or doubled once the dependency answers again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_core::Settings;
use sluice_tests::rabbitmq_server::RabbitServer;
use sluice_tests::*;
use tokio::net::TcpListener;

/// Start-up and probe timeouts of these tests, short so the suite stays fast.
const CONNECT_TIMEOUT_MS: u64 = 1_000;

/// Accepts connections and never writes a byte; keeps them open until dropped.
struct SilentListener {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl SilentListener {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        Self { port, task }
    }
}

impl Drop for SilentListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `sluice <role>` child (killed when dropped) whose stderr goes to a file.
struct Role {
    child: KillOnDrop,
    log: PathBuf,
    ops: u16,
    started: Instant,
}

impl Role {
    fn spawn(role: &str, settings: &Settings, dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("dir");
        let config = dir.join(format!("{role}.toml"));
        std::fs::write(&config, toml::to_string(settings).expect("toml")).expect("config");
        let log = dir.join(format!("{role}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let started = Instant::now();
        let child = Command::new(sluice_binary())
            .arg(role)
            .arg("--config")
            .arg(&config)
            // The dependency check's `info` line says when a role is ready.
            .env("RUST_LOG", "warn,sluice_runtime::ops=info")
            .env("RUST_BACKTRACE", "1")
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .map(KillOnDrop::new)
            .expect("sluice binary starts (run `cargo build --bins` first)");
        Self {
            child,
            log,
            ops: settings.api.metrics_listen.port(),
            started,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a log line containing `needle`; returns it and when it was first seen.
    async fn wait_line(&self, needle: &str, timeout: Duration) -> (String, Duration) {
        loop {
            if let Some(line) = self.logs().lines().find(|l| l.contains(needle)) {
                return (line.to_owned(), self.started.elapsed());
            }
            assert!(
                self.started.elapsed() < timeout,
                "no line with {needle:?} within {timeout:?}: {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let resp = reqwest::get(format!("http://127.0.0.1:{}{path}", self.ops))
            .await
            .ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.text().await.unwrap_or_default()))
    }

    /// Waits until `/readyz` answers 503 with a body containing `needle`; returns the body and
    /// when it was first seen.
    async fn wait_unready(&self, needle: &str, timeout: Duration) -> (String, Duration) {
        loop {
            if let Some((503, body)) = self.get("/readyz").await
                && body.contains(needle)
            {
                return (body, self.started.elapsed());
            }
            assert!(
                self.started.elapsed() < timeout,
                "/readyz never said {needle:?} within {timeout:?}: {:?}",
                self.get("/readyz").await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn stall_settings(dir: &Path) -> Settings {
    let mut s = test_settings("http://127.0.0.1:9/v1");
    s.storage = sluice_core::config::StorageSettings::Local {
        path: dir.join("data"),
    };
    s.api.metrics_listen = ([127, 0, 0, 1], spare_port()).into();
    s.api.listen = ([127, 0, 0, 1], 0).into();
    s.dependencies.connect_timeout_ms = CONNECT_TIMEOUT_MS;
    s.dependencies.probe_timeout_ms = 500;
    s.dependencies.retry_max_backoff_ms = 1_000;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_role_started_against_a_silent_broker_or_redis_says_so_and_is_unready() {
    let broker = SilentListener::start().await;
    let redis = SilentListener::start().await;
    let root = std::env::temp_dir()
        .join("sluice-tests")
        .join(format!("stalls-{}", uuid::Uuid::new_v4().simple()));
    // (dependency, URL as configured, URL as logged, what the line says stalled)
    let cases = [
        (
            "RabbitMQ",
            format!("amqp://guest:s3cret-pw@127.0.0.1:{}/%2f", broker.port),
            format!("amqp://127.0.0.1:{}/%2f", broker.port),
            "did not answer the AMQP handshake within 1s",
        ),
        (
            "Redis",
            format!("redis://:s3cret-pw@127.0.0.1:{}/", redis.port),
            format!("redis://127.0.0.1:{}/", redis.port),
            "did not answer the Redis handshake within 1s",
        ),
    ];
    let mut running = Vec::new();
    for (dependency, url, shown, _) in &cases {
        for role in ["api", "worker", "aggregator"] {
            let dir = root.join(format!("{dependency}-{role}"));
            let mut s = stall_settings(&dir);
            if *dependency == "RabbitMQ" {
                s.amqp_url = url.clone();
            } else {
                s.redis_url = url.clone();
            }
            running.push((dependency, shown, role, Role::spawn(role, &s, &dir)));
        }
    }
    // The start-up attempt stalls for the connect timeout, then the line is logged; allow the
    // process start-up and a loaded CI machine on top.
    let within = Duration::from_millis(CONNECT_TIMEOUT_MS) + Duration::from_secs(10);
    // Every process is watched at once, so each time measured is its own.
    let cases = &cases;
    let checks = running
        .iter()
        .map(|(dependency, shown, role, proc)| async move {
            let stalled = cases
                .iter()
                .find(|c| c.0 == **dependency)
                .map(|c| c.3)
                .expect("case");
            let expected = format!("{dependency} at {shown} {stalled}");
            let (line, logged_after) = proc.wait_line(&expected, within).await;
            assert!(line.contains("WARN"), "{role}: {line}");
            let (body, unready_after) = proc.wait_unready(&expected, within).await;
            assert_eq!(
                proc.get("/livez").await.map(|r| r.0),
                Some(200),
                "{role}: /livez must stay up while a dependency is away"
            );
            let logs = proc.logs();
            assert!(
                !logs.contains("s3cret-pw"),
                "{role} logged a password: {logs}"
            );
            assert!(!logs.contains("panicked"), "{role} panicked: {logs}");
            // Retries go on: a second attempt is logged too.
            let deadline = Instant::now() + Duration::from_secs(10);
            while proc
                .logs()
                .lines()
                .filter(|l| l.contains(&expected))
                .count()
                < 2
            {
                assert!(
                    Instant::now() < deadline,
                    "{role}: no second attempt: {}",
                    proc.logs()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            eprintln!(
                "{role} vs silent {dependency}: warn line after {logged_after:?}, unready /readyz \
             ({body:?}) after {unready_after:?} (from process start)"
            );
        });
    futures::future::join_all(checks).await;
    drop(running);
    std::fs::remove_dir_all(&root).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_start_up_deadline_ends_a_role_with_one_line_and_a_non_zero_exit() {
    let redis = SilentListener::start().await;
    let dir = std::env::temp_dir()
        .join("sluice-tests")
        .join(format!("deadline-{}", uuid::Uuid::new_v4().simple()));
    let mut s = stall_settings(&dir);
    s.redis_url = format!("redis://127.0.0.1:{}/", redis.port);
    s.dependencies.startup_deadline_secs = Some(2);
    let mut proc = Role::spawn("worker", &s, &dir);
    let status = wait_exit(&mut proc.child, Duration::from_secs(30)).await;
    assert!(!status.success(), "{status:?}");
    let logs = proc.logs();
    let errors: Vec<&str> = logs.lines().filter(|l| l.starts_with("Error:")).collect();
    assert_eq!(errors.len(), 1, "{logs}");
    assert!(
        errors[0].contains(&format!(
            "Redis at redis://127.0.0.1:{}/ did not answer the Redis handshake",
            redis.port
        )) && errors[0].contains("startup_deadline_secs"),
        "{logs}"
    );
    assert!(
        !logs.contains("panicked") && !logs.contains("backtrace"),
        "{logs}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

async fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(start.elapsed() < timeout, "the process did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `sluice all --demo` with RabbitMQ down prints one clear line naming the URL (without
/// credentials) and how to start it, and no panic or backtrace, even with RUST_BACKTRACE set.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_without_rabbitmq_prints_one_clear_line_and_no_panic() {
    let port = spare_port();
    let mut child = Command::new(sluice_binary())
        .args(["all", "--demo"])
        .env(
            "SLUICE_AMQP_URL",
            format!("amqp://demo-user:s3cret-pw@127.0.0.1:{port}/%2f"),
        )
        .env("SLUICE_API__LISTEN", "127.0.0.1:0")
        .env("SLUICE_API__METRICS_LISTEN", "127.0.0.1:0")
        .env(
            "SLUICE_NAMESPACE",
            format!("t-{}", uuid::Uuid::new_v4().simple()),
        )
        .env("RUST_BACKTRACE", "1")
        .env_remove("SLUICE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sluice binary starts");
    let status = wait_exit(&mut child, Duration::from_secs(30)).await;
    let output = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!status.success(), "{text}");
    let url = format!("amqp://127.0.0.1:{port}/%2f");
    let naming: Vec<&str> = text.lines().filter(|l| l.contains(&url)).collect();
    assert_eq!(naming.len(), 1, "one line names the broker: {text}");
    assert!(
        naming[0].contains("RabbitMQ at") && naming[0].contains("refused the connection"),
        "{text}"
    );
    assert!(naming[0].contains("Start RabbitMQ"), "{text}");
    for bad in ["panicked", "backtrace", "s3cret-pw", "demo-user"] {
        assert!(!text.contains(bad), "{bad:?} in the output: {text}");
    }
}

const LINES: usize = 1_200;

async fn readyz(app: &TestApp) -> u16 {
    let url = format!("{}/readyz", app.base.trim_end_matches("/v1"));
    match app.http.get(url).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_stalled_mid_batch_delays_lines_refuses_creates_with_503_and_loses_nothing() {
    let rabbit = tokio::task::spawn_blocking(RabbitServer::start)
        .await
        .expect("private RabbitMQ node");
    let url = rabbit.url();
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.amqp_url = url;
        s.dependencies.connect_timeout_ms = CONNECT_TIMEOUT_MS;
        s.dependencies.amqp_heartbeat_secs = 1;
        s.dependencies.publish_confirm_timeout_ms = 1_500;
        s.dependencies.probe_timeout_ms = 500;
    })
    .await;
    let ids: Vec<String> = req_ids(LINES);
    let lines: Vec<Value> = ids
        .iter()
        .map(|id| chat_line_with_mock(id, json!({"delay_ms": 5})))
        .collect();
    let id = app.submit(KEY_A, &lines).await;
    // Uploads need no broker: the file for the creates tried during the stall.
    let spare_file = app.upload(KEY_A, jsonl(&chat_lines(2))).await;
    app.wait_done(&id, 200).await;
    assert_eq!(readyz(&app).await, 200);

    rabbit.signal("STOP");
    let stalled_at = Instant::now();
    // Longer than every timeout: the heartbeat (2 × 1 s), the confirm (1.5 s), the connect (1 s).
    let stall = Duration::from_secs(4);
    let mut unready_after = None;
    let mut creates = Vec::new();
    while stalled_at.elapsed() < stall {
        if unready_after.is_none() && readyz(&app).await == 503 {
            unready_after = Some(stalled_at.elapsed());
        }
        if unready_after.is_some() && creates.len() < 2 {
            let sent = Instant::now();
            let (status, body) = app
                .create_batch_raw(
                    KEY_A,
                    json!({"input_file_id": spare_file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
                )
                .await;
            creates.push((status, body, sent.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rabbit.signal("CONT");
    let resumed_at = Instant::now();

    let unready_after = unready_after.expect("/readyz must turn unready during the stall");
    assert!(!creates.is_empty(), "no create was tried during the stall");
    for (status, body, took) in &creates {
        assert_eq!(*status, 503, "{body}");
        assert_eq!(body["error"]["type"], "server_error", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("no batch was created")),
            "{body}"
        );
        // The create's broker check is bounded by the probe timeout (0.5 s); generous margin.
        assert!(*took < Duration::from_secs(5), "a create took {took:?}");
    }

    // Ready again once the broker answers.
    let mut ready_after = None;
    while resumed_at.elapsed() < Duration::from_secs(30) {
        if readyz(&app).await == 200 {
            ready_after = Some(resumed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready_after = ready_after.expect("/readyz must recover after the stall");

    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(90)).await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert_exactly_once(&output, &errors, &ids);
    assert!(
        errors.is_empty(),
        "no line may fail because the broker stalled: {:?}",
        &errors[..errors.len().min(3)]
    );
    // Creates work again.
    let (status, body) = app
        .create_batch_raw(
            KEY_A,
            json!({"input_file_id": spare_file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    eprintln!(
        "broker SIGSTOP: /readyz unready after {unready_after:?}; creates answered {:?}; ready \
         again {ready_after:?} after SIGCONT",
        creates.iter().map(|c| (c.0, c.2)).collect::<Vec<_>>()
    );
    let id2 = body["id"].as_str().expect("id").to_owned();
    let second = app
        .wait_terminal(KEY_A, &id2, Duration::from_secs(60))
        .await;
    assert_eq!(second["status"], "completed", "{second:#}");
    drop(app);
    drop(rabbit);
}

/// Polls until the role logs a line naming `dependency` after its first `skip` lines; returns
/// how long after `since` it was seen.
async fn wait_new_line(proc: &Role, skip: usize, needle: &str, since: Instant) -> Duration {
    loop {
        if proc.logs().lines().skip(skip).any(|l| l.contains(needle)) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "no {needle:?} line: {}",
            proc.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `/readyz` until its status is `status` (and, for 503, its body names `needle`).
async fn wait_readyz(proc: &Role, status: u16, needle: &str, since: Instant) -> Duration {
    loop {
        if let Some((s, body)) = proc.get("/readyz").await
            && s == status
            && (status == 200 || body.contains(needle))
        {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "/readyz never answered {status} naming {needle:?}: {:?}",
            proc.get("/readyz").await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dependency_stalled_at_run_time_is_logged_and_unready_until_it_answers() {
    let redis = sluice_tests::redis_server::RedisServer::start(&["--appendonly", "no"]);
    let rabbit = tokio::task::spawn_blocking(RabbitServer::start)
        .await
        .expect("private RabbitMQ node");
    let dir = std::env::temp_dir()
        .join("sluice-tests")
        .join(format!("runtime-stall-{}", uuid::Uuid::new_v4().simple()));
    let mut s = stall_settings(&dir);
    s.redis_url = redis.url();
    s.amqp_url = rabbit.url();
    s.dependencies.health_check_interval_ms = 500;
    s.dependencies.probe_timeout_ms = 1_000;
    s.dependencies.amqp_heartbeat_secs = 1;
    s.dependencies.redis_response_timeout_ms = 1_000;
    let proc = Role::spawn("all", &s, &dir);
    wait_readyz(&proc, 200, "", Instant::now()).await;

    for dependency in ["Redis", "RabbitMQ"] {
        let signal = |sig: &str| match dependency {
            "Redis" => redis.signal(sig),
            _ => rabbit.signal(sig),
        };
        // The role's own check must have seen both dependencies answer last (a loaded machine
        // can make a check time out now and then).
        let settled = Instant::now();
        let skip = loop {
            let logs = proc.logs();
            let last = logs.lines().rfind(|l| {
                l.contains("Dependencies answer: ready.")
                    || l.contains("A dependency stopped answering")
            });
            if last.is_some_and(|l| l.contains("ready.")) {
                break logs.lines().count();
            }
            assert!(
                settled.elapsed() < Duration::from_secs(30),
                "never ready: {logs}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        signal("STOP");
        let stalled_at = Instant::now();
        let needle = format!("{dependency} at ");
        let (logged_after, unready_after) = tokio::join!(
            wait_new_line(&proc, skip, "A dependency stopped answering", stalled_at),
            wait_readyz(&proc, 503, &needle, stalled_at),
        );
        // Longer than the timeouts, so connections really give up on the stalled peer.
        tokio::time::sleep(Duration::from_secs(3).saturating_sub(stalled_at.elapsed())).await;
        assert_eq!(proc.get("/livez").await.map(|r| r.0), Some(200));
        signal("CONT");
        let resumed_at = Instant::now();
        let ready_after = wait_readyz(&proc, 200, "", resumed_at).await;
        let line = proc
            .logs()
            .lines()
            .skip(skip)
            .find(|l| l.contains("A dependency stopped answering"))
            .map(str::to_owned)
            .unwrap_or_default();
        assert!(line.contains(&needle) && line.contains("WARN"), "{line}");
        eprintln!(
            "{dependency} SIGSTOP at run time: warn line after {logged_after:?}, unready /readyz \
             after {unready_after:?}; ready {ready_after:?} after SIGCONT"
        );
    }
    let logs = proc.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    drop(proc);
    std::fs::remove_dir_all(&dir).ok();
    drop(rabbit);
}
