//! A first run that works anywhere. `sluice all --demo --services private` starts its own
//! Redis and RabbitMQ (own ports, data beside the demo's files), runs a batch on them, and stops
//! them when it exits. (`--services auto`, the default, does the same only when the default URLs do
//! not answer; the shared services answer on this machine, so the test asks for private ones.)

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_tests::*;

/// The port in the line that starts with `prefix` and goes on with `127.0.0.1:<port>`.
fn port_after(log: &str, prefix: &str) -> Option<u16> {
    let line = log.lines().find(|l| l.contains(prefix))?;
    let rest = &line[line.find(prefix)? + prefix.len()..];
    let rest = rest.split("127.0.0.1:").nth(1)?;
    rest.chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_a_batch_on_private_services_and_stops_them_on_exit() {
    let (api_port, ops_port) = (spare_port(), spare_port());
    let namespace = format!("t-{}", uuid::Uuid::new_v4().simple());
    let dir = std::env::temp_dir().join("sluice-tests").join(&namespace);
    std::fs::create_dir_all(&dir).expect("test dir");
    let log_path = dir.join("demo.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(sluice_binary())
        .args(["all", "--demo", "--services", "private"])
        .env("SLUICE_API__LISTEN", format!("127.0.0.1:{api_port}"))
        .env(
            "SLUICE_API__METRICS_LISTEN",
            format!("127.0.0.1:{ops_port}"),
        )
        .env("SLUICE_NAMESPACE", &namespace)
        .env("SLUICE_STORAGE__KIND", "local")
        .env("SLUICE_STORAGE__PATH", dir.join("data"))
        .env("SLUICE_LOG__FILTER", "warn")
        .env_remove("SLUICE_CONFIG")
        .env_remove("SLUICE_AMQP_URL")
        .env_remove("SLUICE_REDIS_URL")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("sluice binary starts");
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{api_port}");
    // A RabbitMQ node boots an Erlang VM: slow on a loaded CI machine.
    let start = Instant::now();
    while !http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if let Some(status) = child.try_wait().expect("status") {
            panic!("the demo exited ({status}): {}", read_log());
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the demo never became ready: {}",
            read_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log_text = read_log();
    let redis_port = port_after(&log_text, "started a private Redis on redis://")
        .unwrap_or_else(|| panic!("no private Redis line: {log_text}"));
    let rabbit_port = port_after(&log_text, "private RabbitMQ ready on ")
        .unwrap_or_else(|| panic!("no private RabbitMQ line: {log_text}"));
    assert!(redis_port != 6379 && rabbit_port != 5672, "{log_text}");

    // While the fixed key is active, a DNS-rebound name is refused; the loopback names work.
    let rebound = http
        .get(format!("{base}/v1/batches"))
        .bearer_auth("sk-demo")
        .header("host", "evil.example")
        .send()
        .await
        .expect("list");
    assert_eq!(rebound.status(), 403);
    let body: Value = rebound.json().await.expect("error JSON");
    assert_eq!(body["error"]["code"], "host_not_allowed", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    for host in [
        format!("127.0.0.1:{api_port}"),
        format!("localhost:{api_port}"),
    ] {
        let listed = http
            .get(format!("{base}/v1/batches"))
            .bearer_auth("sk-demo")
            .header("host", &host)
            .send()
            .await
            .expect("list");
        assert_eq!(listed.status(), 200, "{host}");
    }

    let lines: Vec<Value> = (0..20)
        .map(|i| chat_line(&format!("demo-{i}"), "hello"))
        .collect();
    let created: Value = http
        .post(format!("{base}/v1/batches"))
        .bearer_auth("sk-demo")
        .header("content-type", "application/jsonl")
        .body(jsonl(&lines))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("batch JSON");
    let id = created["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{created}"));
    let start = Instant::now();
    let batch = loop {
        let batch: Value = http
            .get(format!("{base}/v1/batches/{id}"))
            .bearer_auth("sk-demo")
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("batch JSON");
        if batch["status"] == "completed" {
            break batch;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{batch:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(batch["request_counts"]["completed"], 20, "{batch:#}");

    // The batch lives in the private Redis, not in the shared one.
    let meta_key = format!("{namespace}:b:{{{id}}}:meta");
    let in_redis = |port: u16| {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "exists", &meta_key])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(in_redis(redis_port), "1");
    assert_eq!(in_redis(6379), "0");

    send_signal(child.id(), "TERM");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("status") {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the demo did not exit on SIGTERM: {}",
            read_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}: {}", read_log());
    for port in [redis_port, rabbit_port] {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "a private service still listens on {port} after the demo exited"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
