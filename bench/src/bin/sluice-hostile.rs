//! `sluice-hostile`: what each hostile input a tenant can send costs a running Sluice, for
//! docs/benchmarks.md. It starts `sluice api`, `sluice worker` and `sluice aggregator` from
//! `--sluice PATH` (default: the binary beside this one) as separate processes, with a minimal
//! configuration that any build reads, and an in-process mock upstream; then, one scenario at a
//! time, it sends the input and prints the answer's status, the batch object's size and each
//! process's peak RSS (`VmHWM`) and open file descriptors. A process that died is reported.
//!
//! `cargo build --release --bins && cargo run --release -p sluice-bench --bin sluice-hostile`
//! (pass `--sluice OLD/target/release/sluice` to measure another build the same way).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde_json::{Value, json};
use sluice_bench::{KillOnDrop, sluice_bin, wait_ready};
use sluice_cli::mock_upstream::{MockConfig, MockUpstream};
use sluice_tests::{KEY_A, KEY_B, MODEL, spare_port};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// The `sluice` binary to measure.
    #[arg(long)]
    sluice: Option<PathBuf>,
    /// Run only the scenarios whose name contains this.
    #[arg(long)]
    only: Option<String>,
}

/// The role processes, killed when dropped.
struct Roles {
    children: Vec<(&'static str, KillOnDrop)>,
}

impl Roles {
    /// `role: peak RSS MiB, fds` for each process, or `role: EXITED`.
    fn report(&mut self) -> String {
        let mut parts = Vec::new();
        for (role, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                parts.push(format!("{role}: EXITED ({status})"));
                continue;
            }
            let pid = child.id();
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let hwm = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0);
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
            parts.push(format!("{role}: {} MiB, {fds} fds", hwm / 1024));
        }
        parts.join("; ")
    }
}

struct Env {
    http: reqwest::Client,
    base: String,
    api_addr: String,
}

impl Env {
    async fn upload(&self, bytes: Vec<u8>) -> anyhow::Result<String> {
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part(
                "file",
                reqwest::multipart::Part::bytes(bytes).file_name("input.jsonl"),
            );
        let r: Value = self
            .http
            .post(format!("{}/files", self.base))
            .bearer_auth(KEY_A)
            .multipart(form)
            .send()
            .await?
            .json()
            .await?;
        r["id"].as_str().map(str::to_owned).context("upload failed")
    }

    async fn create(&self, key: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .post(format!("{}/batches", self.base))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await?;
        Ok((r.status().as_u16(), r.json().await.unwrap_or(Value::Null)))
    }

    /// Polls a batch until it is terminal; returns it and its size in bytes.
    async fn wait(&self, key: &str, id: &str, limit: Duration) -> anyhow::Result<(Value, usize)> {
        let start = Instant::now();
        loop {
            let text = self
                .http
                .get(format!("{}/batches/{id}", self.base))
                .bearer_auth(key)
                .send()
                .await?
                .text()
                .await?;
            let batch: Value = serde_json::from_str(&text)?;
            let status = batch["status"].as_str().unwrap_or_default();
            if ["completed", "failed", "expired", "cancelled"].contains(&status)
                || start.elapsed() > limit
            {
                return Ok((batch, text.len()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn chat(id: &str, extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": id}]});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body})
}

fn lines(values: &[Value]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| {
            let mut l = v.to_string().into_bytes();
            l.push(b'\n');
            l
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = args.sluice.clone().unwrap_or_else(sluice_bin);
    let stop = CancellationToken::new();
    let upstream = MockUpstream::new(MockConfig::default())
        .spawn(stop.clone())
        .await?;
    let scenarios = [
        "two-million-bad-lines",
        "long-completion-window",
        "json-array-30mb",
        "idle-sockets",
        "delete-running-input",
        "max-tokens-1e12",
    ];
    println!("| scenario | answer | processes (peak RSS, fds) |\n|---|---|---|");
    for name in scenarios {
        if args.only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let (env, mut roles, dir) = start(&bin, &upstream).await?;
        let answer = match tokio::time::timeout(Duration::from_secs(180), run(name, &env)).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => format!("error: {e:#}"),
            Err(_) => "no answer within 180 s".into(),
        };
        println!("| {name} | {answer} | {} |", roles.report());
        drop(roles);
        std::fs::remove_dir_all(dir).ok();
    }
    stop.cancel();
    Ok(())
}

async fn run(name: &str, env: &Env) -> anyhow::Result<String> {
    match name {
        "two-million-bad-lines" => bad_lines(env).await,
        "long-completion-window" => long_window(env).await,
        "json-array-30mb" => json_array(env).await,
        "idle-sockets" => idle_sockets(env).await,
        "delete-running-input" => delete_input(env).await,
        _ => absurd_tokens(env).await,
    }
}

/// A fresh namespace and the three roles, configured with keys every build knows.
async fn start(bin: &PathBuf, upstream: &str) -> anyhow::Result<(Env, Roles, PathBuf)> {
    let ns = format!("hostile-{}", uuid::Uuid::new_v4().simple());
    let dir = std::env::temp_dir().join(&ns);
    std::fs::create_dir_all(&dir)?;
    let port = spare_port();
    let config = format!(
        r#"namespace = "{ns}"
[api]
listen = "127.0.0.1:{port}"
metrics_listen = "127.0.0.1:0"
[storage]
kind = "local"
path = "{store}"
[aggregator]
sweep_interval_ms = 500
[log]
format = "pretty"
filter = "error"
[[providers]]
name = "mock"
base_url = "{upstream}"
models = ["{MODEL}"]
[providers.pacing]
tpm = 600000
[[tenants]]
id = "tenant-a"
api_key_sha256 = ["{a}"]
[[tenants]]
id = "tenant-b"
api_key_sha256 = ["{b}"]
"#,
        store = dir.join("store").display(),
        a = sluice_core::config::hash_api_key(KEY_A),
        b = sluice_core::config::hash_api_key(KEY_B),
    );
    let path = dir.join("sluice.toml");
    std::fs::write(&path, config)?;
    let mut children = Vec::new();
    for role in ["api", "worker", "aggregator"] {
        let child = Command::new(bin)
            .arg(role)
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(KillOnDrop::new)
            .with_context(|| format!("starting {}", bin.display()))?;
        children.push((role, child));
    }
    let env = Env {
        http: reqwest::Client::new(),
        base: format!("http://127.0.0.1:{port}/v1"),
        api_addr: format!("127.0.0.1:{port}"),
    };
    wait_ready(&env.http, &env.base).await?;
    Ok((env, Roles { children }, dir))
}

/// 4 MB of `x` lines: the batch fails; how big is its object, and what did validation cost?
async fn bad_lines(env: &Env) -> anyhow::Result<String> {
    let file = env.upload(b"x\n".repeat(2_000_000)).await?;
    let (status, batch) = env
        .create(
            KEY_A,
            json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        )
        .await?;
    let id = batch["id"].as_str().unwrap_or_default().to_owned();
    let (batch, bytes) = env.wait(KEY_A, &id, Duration::from_secs(150)).await?;
    Ok(format!(
        "create {status}; batch `{}`, {} errors listed, object {} KB",
        batch["status"].as_str().unwrap_or("?"),
        batch["errors"]["data"].as_array().map_or(0, Vec::len),
        bytes / 1000
    ))
}

/// A `completion_window` of 5,000,000 characters.
async fn long_window(env: &Env) -> anyhow::Result<String> {
    let file = env.upload(lines(&[chat("w", json!({}))])).await?;
    let window = format!("{}24h", "0".repeat(5_000_000));
    let (status, body) = env
        .create(
            KEY_A,
            json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": window}),
        )
        .await?;
    Ok(format!(
        "{status} {}",
        body["error"]["param"].as_str().unwrap_or("")
    ))
}

/// A 30 MB JSON array of zeros as the create body.
async fn json_array(env: &Env) -> anyhow::Result<String> {
    let mut body = b"[0".to_vec();
    body.extend(b",0".repeat(15_000_000));
    body.push(b']');
    let r = env
        .http
        .post(format!("{}/batches", env.base))
        .bearer_auth(KEY_A)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    Ok(match r {
        Ok(r) => r.status().as_u16().to_string(),
        Err(e) => format!("connection closed ({e})"),
    })
}

/// 2,000 sockets that send nothing, then 2,000 that send half a header; can B still be served?
async fn idle_sockets(env: &Env) -> anyhow::Result<String> {
    let mut held = Vec::new();
    for i in 0..4_000 {
        match tokio::net::TcpStream::connect(&env.api_addr).await {
            Ok(mut s) => {
                if i >= 2_000 {
                    s.write_all(b"POST /v1/files HTTP/1.1\r\nHost: x\r\n")
                        .await
                        .ok();
                }
                held.push(s);
            }
            Err(_) => break,
        }
    }
    let opened = held.len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = tokio::time::timeout(
        Duration::from_secs(10),
        env.http
            .get(format!("{}/batches", env.base))
            .bearer_auth(KEY_B)
            .send(),
    )
    .await;
    let served = match b {
        Ok(Ok(r)) => r.status().as_u16().to_string(),
        Ok(Err(e)) => format!("error {e}"),
        Err(_) => "timeout".into(),
    };
    Ok(format!("{opened} sockets held; B's list answered {served}"))
}

/// The input file of a running batch is deleted.
async fn delete_input(env: &Env) -> anyhow::Result<String> {
    let batch_lines: Vec<Value> = (0..3_000)
        .map(|i| chat(&format!("d-{i}"), json!({"mock": {"delay_ms": 5}})))
        .collect();
    let file = env.upload(lines(&batch_lines)).await?;
    let (_, batch) = env
        .create(
            KEY_A,
            json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "120s"}),
        )
        .await?;
    let id = batch["id"].as_str().unwrap_or_default().to_owned();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deleted = env
        .http
        .delete(format!("{}/files/{file}", env.base))
        .bearer_auth(KEY_A)
        .send()
        .await?
        .status()
        .as_u16();
    let (batch, _) = env.wait(KEY_A, &id, Duration::from_secs(150)).await?;
    Ok(format!(
        "delete {deleted}; batch `{}`, {} completed, {} failed",
        batch["status"].as_str().unwrap_or("?"),
        batch["request_counts"]["completed"],
        batch["request_counts"]["failed"]
    ))
}

/// 40 lines with `max_tokens: 10^12` on a provider paced at 600,000 TPM, then B's batch.
async fn absurd_tokens(env: &Env) -> anyhow::Result<String> {
    let a: Vec<Value> = (0..40)
        .map(|i| {
            chat(
                &format!("a-{i}"),
                json!({"max_tokens": 1_000_000_000_000u64}),
            )
        })
        .collect();
    let file = env.upload(lines(&a)).await?;
    let (_, batch) = env
        .create(
            KEY_A,
            json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        )
        .await?;
    let a_id = batch["id"].as_str().unwrap_or_default().to_owned();
    let b: Vec<Value> = (0..200)
        .map(|i| chat(&format!("b-{i}"), json!({})))
        .collect();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(lines(&b)).file_name("b.jsonl"),
        );
    let file: Value = env
        .http
        .post(format!("{}/files", env.base))
        .bearer_auth(KEY_B)
        .multipart(form)
        .send()
        .await?
        .json()
        .await?;
    let started = Instant::now();
    let (_, batch) = env
        .create(
            KEY_B,
            json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        )
        .await?;
    let b_id = batch["id"].as_str().unwrap_or_default().to_owned();
    let (b_batch, _) = env.wait(KEY_B, &b_id, Duration::from_secs(120)).await?;
    let b_secs = started.elapsed().as_secs_f64();
    let (a_batch, _) = env.wait(KEY_A, &a_id, Duration::from_secs(30)).await?;
    Ok(format!(
        "A `{}`; B's 200 lines `{}` in {b_secs:.1} s",
        a_batch["status"].as_str().unwrap_or("?"),
        b_batch["status"].as_str().unwrap_or("?"),
    ))
}
