//! `sluice-bench-pacing`: the upstream pacing figures of docs/benchmarks.md, measured from the
//! upstream's side against real RabbitMQ and Redis.
//!
//! Each scenario starts `sluice api`, `sluice aggregator` and N `sluice worker` release processes on
//! a fresh namespace, with an in-process mock upstream that records every call's arrival time and
//! every answer's token usage:
//!
//! 1. `rpm`: a fleet limit of `--rpm` (default 600, then 6000) requests per minute; the achieved
//!    rate over a full steady minute and the busiest 10-second window;
//! 2. `tpm`: a token limit; achieved tokens per minute over a steady minute;
//! 3. `retry-after`: the upstream answers 429 with `Retry-After: 5` once; the gap in calls;
//! 4. `fairness`: tenant B's 10-line batch submitted while tenant A's 50,000-line batch runs;
//! 5. `weights`: tenants of weights 3 and 1 compete for a `--sched-rpm` provider (default 1,200);
//!    calls of each over a minute of contention;
//! 6. `tenants`: equal weights, tenant A with one batch and tenant B with five;
//! 7. `deadline`: a `1h` batch created after a `24h` one of the same tenant; who finishes when;
//! 8. `background`: a `background` batch running when another tenant's batch arrives; its calls
//!    during that batch's run.
//!
//! `cargo build --release --bins && cargo run --release -p sluice-bench --bin sluice-bench-pacing`
//! (`-- --only rpm` runs one scenario; `--workers 4` is the default; `--big N` sizes tenant A's
//! batch, `--fairness-rpm N` rate-limits the provider in the fairness scenario).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use sluice_bench::{KillOnDrop, redis_commandstats, sluice_bin, wait_ready};
use sluice_cli::mock_upstream::{MockConfig, MockUpstream};
use sluice_core::Settings;
use sluice_core::config::{PacingSettings, StorageSettings};
use sluice_store::Store;
use sluice_tests::{KEY_A, KEY_B, MODEL, test_settings};
use tokio_util::sync::CancellationToken;

const PORT: u16 = 18_090;

struct Env {
    settings: Settings,
    dir: PathBuf,
    procs: Vec<KillOnDrop>,
    http: reqwest::Client,
    base: String,
    store: Store,
    mock: MockUpstream,
    stop: CancellationToken,
}

async fn start(
    mock: MockConfig,
    workers: usize,
    tweak: impl FnOnce(&mut Settings),
) -> anyhow::Result<Env> {
    let stop = CancellationToken::new();
    let mock = MockUpstream::new(mock);
    let upstream = mock.clone().spawn(stop.clone()).await?;
    let mut settings = test_settings(&upstream);
    settings.namespace = format!("bench-pacing-{}", uuid::Uuid::new_v4().simple());
    let dir = std::env::temp_dir().join(&settings.namespace);
    settings.storage = StorageSettings::Local {
        path: dir.join("store"),
    };
    settings.api.listen = ([127, 0, 0, 1], PORT).into();
    settings.worker.concurrency = 64;
    settings.worker.request_timeout_ms = 60_000;
    settings.worker.backoff_base_ms = 500;
    settings.worker.backoff_max_ms = 30_000;
    settings.limits.max_lines = 50_000;
    settings.limits.max_upload_bytes = 1 << 30;
    settings.aggregator.sweep_interval_ms = 2_000;
    settings.aggregator.redispatch_after_ms = 60_000;
    settings.log.filter = "warn".into();
    tweak(&mut settings);
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("sluice.toml");
    std::fs::write(&config, toml::to_string(&settings)?)?;
    let spawn = |role: &str| -> anyhow::Result<KillOnDrop> {
        Command::new(sluice_bin())
            .arg(role)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map(KillOnDrop::new)
            .with_context(|| format!("starting {}", sluice_bin().display()))
    };
    let mut procs = vec![spawn("api")?, spawn("aggregator")?];
    for _ in 0..workers {
        procs.push(spawn("worker")?);
    }
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{PORT}/v1");
    wait_ready(&http, &base).await?;
    let store = Store::open(&settings).await?;
    Ok(Env {
        settings,
        dir,
        procs,
        http,
        base,
        store,
        mock,
        stop,
    })
}

impl Env {
    async fn submit(&self, key: &str, lines: &[Value]) -> anyhow::Result<String> {
        self.submit_with(key, lines, json!({"completion_window": "24h"}))
            .await
    }

    /// Uploads `lines` and creates a batch with `fields` (at least `completion_window`).
    async fn submit_with(
        &self,
        key: &str,
        lines: &[Value],
        fields: Value,
    ) -> anyhow::Result<String> {
        let mut body = Vec::new();
        for l in lines {
            body.extend_from_slice(l.to_string().as_bytes());
            body.push(b'\n');
        }
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part(
                "file",
                reqwest::multipart::Part::bytes(body).file_name("in.jsonl"),
            );
        let file: Value = self
            .http
            .post(format!("{}/files", self.base))
            .bearer_auth(key)
            .multipart(form)
            .send()
            .await?
            .json()
            .await?;
        let file = file["id"].as_str().context("upload")?.to_owned();
        let mut create = fields;
        create["input_file_id"] = json!(file);
        create["endpoint"] = json!("/v1/chat/completions");
        let batch: Value = self
            .http
            .post(format!("{}/batches", self.base))
            .bearer_auth(key)
            .json(&create)
            .send()
            .await?
            .json()
            .await?;
        Ok(batch["id"].as_str().context("create")?.to_owned())
    }

    async fn wait_done(&self, id: &str, timeout: Duration) -> anyhow::Result<String> {
        let started = Instant::now();
        loop {
            if let Some(meta) = self.store.get_batch(id).await?
                && let Some(s) = meta.status.map(|s| s.as_str())
                && matches!(s, "completed" | "failed" | "expired" | "cancelled")
            {
                return Ok(s.to_owned());
            }
            anyhow::ensure!(started.elapsed() < timeout, "batch {id} did not finish");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn done(&self, id: &str) -> anyhow::Result<u64> {
        Ok(self.store.get_batch(id).await?.map_or(0, |m| m.done()))
    }

    async fn finish(mut self) {
        for c in &mut self.procs {
            c.kill_and_reap();
        }
        self.stop.cancel();
        if let Ok(conn) = sluice_broker::connect(&self.settings.amqp_url, "bench-cleanup").await
            && let Ok(ch) = conn.create_channel().await
        {
            sluice_broker::delete_topology(&ch, &sluice_core::Keys::new(&self.settings.namespace))
                .await
                .ok();
        }
        self.store.purge_namespace().await.ok();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

fn line(id: &str, mock: Value, max_tokens: Option<u64>) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": format!("question {id}")}], "mock": mock});
    if let Some(m) = max_tokens {
        body["max_tokens"] = json!(m);
    }
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body})
}

/// Events in `[from, to)` and their summed weights.
fn weight_between(events: &[(u64, u64)], from: u64, to: u64) -> u64 {
    events
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .map(|(_, w)| w)
        .sum()
}

/// The largest summed weight in any window of `window_ms`.
fn max_window(events: &[(u64, u64)], window_ms: u64) -> u64 {
    let mut e = events.to_vec();
    e.sort_unstable();
    let (mut best, mut sum, mut lo) = (0, 0, 0);
    for hi in 0..e.len() {
        sum += e[hi].1;
        while e[hi].0 - e[lo].0 >= window_ms {
            sum -= e[lo].1;
            lo += 1;
        }
        best = best.max(sum);
    }
    best
}

/// Script calls (`EVAL`, `EVALSHA`) Redis has run so far, from `INFO commandstats`.
async fn script_calls(store: &Store) -> anyhow::Result<u64> {
    let stats = redis_commandstats(store).await?;
    Ok(stats
        .iter()
        .filter(|(name, _)| name.starts_with("eval"))
        .map(|(_, n)| n)
        .sum())
}

async fn rpm(rpm: u64, workers: usize) -> anyhow::Result<()> {
    let burst_ms = 1_000;
    let env = start(
        MockConfig {
            latency_ms: 20,
            ..Default::default()
        },
        workers,
        |s| {
            s.providers[0].pacing = PacingSettings {
                rpm: Some(rpm),
                burst_ms: Some(burst_ms),
                ..Default::default()
            }
        },
    )
    .await?;
    // 85 s of demand: a 10 s ramp, a steady minute, and a tail.
    let n = (rpm * 85 / 60) as usize;
    let lines: Vec<Value> = (0..n)
        .map(|i| line(&format!("r-{i}"), json!({}), None))
        .collect();
    let scripts_before = script_calls(&env.store).await?;
    let id = env.submit(KEY_A, &lines).await?;
    let status = env.wait_done(&id, Duration::from_secs(300)).await?;
    let scripts = script_calls(&env.store).await? - scripts_before;
    let times: Vec<(u64, u64)> = env.mock.stats().times.iter().map(|t| (*t, 1)).collect();
    let first = times.iter().map(|e| e.0).min().unwrap_or(0);
    let first_minute = weight_between(&times, first, first + 60_000);
    let steady = weight_between(&times, first + 10_000, first + 70_000);
    let burst = rpm * burst_ms / 60_000;
    let peak10 = max_window(&times, 10_000);
    println!(
        "| {rpm} RPM, {workers} workers, {n} lines ({status}) | steady minute (10–70 s): {steady} calls ({:+.2} %); first minute: {first_minute} ({:+.2} %); busiest 10 s: {peak10} calls (limit {} + burst {burst}); Redis script calls per line (whole server): {:.2} |",
        (steady as f64 / rpm as f64 - 1.0) * 100.0,
        (first_minute as f64 / rpm as f64 - 1.0) * 100.0,
        rpm / 6,
        scripts as f64 / n as f64,
    );
    env.finish().await;
    Ok(())
}

async fn tpm(workers: usize, warm: bool, hold_ms: u64) -> anyhow::Result<()> {
    let tpm: u64 = 300_000;
    let env = start(
        MockConfig {
            latency_ms: 20,
            ..Default::default()
        },
        workers,
        |s| {
            s.worker.reserve_ahead_ms = hold_ms;
            s.providers[0].pacing = PacingSettings {
                tpm: Some(tpm),
                burst_ms: Some(1_000),
                ..Default::default()
            }
        },
    )
    .await?;
    // Calls use 300–1,700 tokens (1,000 on average) and ask for a 2,000-token budget, so the
    // estimate is always wrong and only the correction from `usage` keeps the rate right.
    let lines_of = |n: usize, prefix: &str| -> Vec<Value> {
        (0..n)
            .map(|i| {
                let used = 300 + (i as u64 * 7_919) % 1_401;
                line(
                    &format!("{prefix}-{i}"),
                    json!({"usage_tokens": used}),
                    Some(2_000),
                )
            })
            .collect()
    };
    if warm {
        // A running fleet has learnt the provider's actual/estimate ratio (kept in Redis for an
        // hour); a short batch teaches it here, then the counts start afresh.
        let id = env.submit(KEY_A, &lines_of(40, "warm")).await?;
        env.wait_done(&id, Duration::from_secs(120)).await?;
        env.mock.reset();
    }
    let n = 85 * tpm as usize / 60 / 1_000;
    let lines = lines_of(n, "t");
    let id = env.submit(KEY_A, &lines).await?;
    let status = env.wait_done(&id, Duration::from_secs(300)).await?;
    let tokens = env.mock.stats().tokens;
    let first = tokens.iter().map(|e| e.0).min().unwrap_or(0);
    let last = tokens.iter().map(|e| e.0).max().unwrap_or(0);
    let steady = weight_between(&tokens, first + 10_000, first + 70_000);
    let total: u64 = tokens.iter().map(|e| e.1).sum();
    let buckets: Vec<String> = (0..=(last - first) / 10_000)
        .map(|b| weight_between(&tokens, first + b * 10_000, first + (b + 1) * 10_000).to_string())
        .collect();
    eprintln!("tokens per 10 s: {}", buckets.join(" "));
    let whole = total as f64 * 60_000.0 / (last - first).max(1) as f64;
    println!(
        "| {tpm} TPM, {workers} workers, {n} lines of 300–1,700 tokens, 2,000 asked, {}, reserve_ahead {hold_ms} ms ({status}) | steady minute (10–70 s): {steady} tokens ({:+.2} %); whole run: {whole:.0} tokens/min ({:+.2} %) |",
        if warm {
            "limiter warmed up"
        } else {
            "cold limiter"
        },
        (steady as f64 / tpm as f64 - 1.0) * 100.0,
        (whole / tpm as f64 - 1.0) * 100.0
    );
    env.finish().await;
    Ok(())
}

async fn retry_after(workers: usize) -> anyhow::Result<()> {
    let env = start(
        MockConfig {
            latency_ms: 20,
            ..Default::default()
        },
        workers,
        |s| {
            s.providers[0].pacing = PacingSettings {
                rpm: Some(1_200),
                ..Default::default()
            }
        },
    )
    .await?;
    let mut lines = vec![line(
        "limited",
        json!({"key": "limited", "status": 429, "retry_after": 5, "times": 1}),
        None,
    )];
    lines.extend((0..400).map(|i| line(&format!("ok-{i}"), json!({}), None)));
    let id = env.submit(KEY_A, &lines).await?;
    let status = env.wait_done(&id, Duration::from_secs(120)).await?;
    let stats = env.mock.stats();
    let t429 = stats.per_key["limited"][0];
    let mut times = stats.times.clone();
    times.sort_unstable();
    let before = times.iter().filter(|t| **t <= t429).count();
    let next = times.iter().copied().find(|t| *t > t429).unwrap_or(t429);
    // Calls already sent when the 429 came back (arrival within 50 ms of it) are not a new call.
    let next_new = times
        .iter()
        .copied()
        .find(|t| *t > t429 + 50)
        .unwrap_or(t429);
    println!(
        "| 429 with Retry-After: 5 once, {workers} workers, 1,200 RPM ({status}) | {before} calls before it; first call after it {} ms later (next after the in-flight 50 ms: {} ms); retried line called again after {} ms |",
        next - t429,
        next_new - t429,
        stats.per_key["limited"].get(1).map_or(0, |t| t - t429)
    );
    env.finish().await;
    Ok(())
}

async fn fairness(workers: usize, big: usize, rpm: Option<u64>) -> anyhow::Result<()> {
    let env = start(
        MockConfig {
            latency_ms: 20,
            ..Default::default()
        },
        workers,
        |s| {
            s.providers[0].pacing = PacingSettings {
                rpm,
                ..Default::default()
            }
        },
    )
    .await?;
    let a_lines: Vec<Value> = (0..big)
        .map(|i| line(&format!("a-{i}"), json!({}), None))
        .collect();
    let a_started = Instant::now();
    let a = env.submit(KEY_A, &a_lines).await?;
    while env.done(&a).await? < (big / 10) as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b_lines: Vec<Value> = (0..10)
        .map(|i| line(&format!("b-{i}"), json!({}), None))
        .collect();
    let b_started = Instant::now();
    let b = env.submit(KEY_B, &b_lines).await?;
    let b_status = env.wait_done(&b, Duration::from_secs(600)).await?;
    let b_took = b_started.elapsed().as_secs_f64();
    let a_status = env.wait_done(&a, Duration::from_secs(1_800)).await?;
    let a_took = a_started.elapsed().as_secs_f64();
    println!(
        "| fairness: tenant B's 10 lines submitted at 10 % of tenant A's {big} lines, {workers} workers, {}, window {} lines / {} s | B {b_status} in {b_took:.2} s; A {a_status} in {a_took:.1} s; B / A = {:.2} % |",
        rpm.map_or("no rate limit".to_owned(), |r| format!("{r} RPM")),
        env.settings.worker.batch_window,
        env.settings.worker.batch_window_secs,
        100.0 * b_took / a_took
    );
    env.finish().await;
    Ok(())
}

/// `n` lines with custom ids (and mock keys, so calls are told apart) `{prefix}-0…`.
fn lines_of(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i}");
            line(&id, json!({"key": id}), None)
        })
        .collect()
}

/// Arrival times of the calls of lines whose custom id starts with `prefix`, sorted.
fn call_times(env: &Env, prefix: &str) -> Vec<u64> {
    let mut times: Vec<u64> = env
        .mock
        .stats()
        .per_key
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .flat_map(|(_, t)| t.iter().copied())
        .collect();
    times.sort_unstable();
    times
}

fn count_between(times: &[u64], from: u64, to: u64) -> usize {
    times.iter().filter(|t| **t >= from && **t < to).count()
}

/// A scheduling scenario's provider: `rpm`, small batches only in the express queue.
async fn sched_env(
    workers: usize,
    rpm: u64,
    tweak: impl FnOnce(&mut Settings),
) -> anyhow::Result<Env> {
    start(
        MockConfig {
            latency_ms: 20,
            ..Default::default()
        },
        workers,
        |s| {
            s.providers[0].pacing = PacingSettings {
                rpm: Some(rpm),
                ..Default::default()
            };
            s.worker.express_lines = 10;
            tweak(s);
        },
    )
    .await
}

/// Calls of tenant A (prefix `a`) and tenant B (`b`) over the minute from 10 s after the first.
fn contention_minute(env: &Env) -> (usize, usize) {
    let (a, b) = (call_times(env, "a"), call_times(env, "b"));
    let first = a
        .first()
        .copied()
        .unwrap_or(0)
        .max(b.first().copied().unwrap_or(0));
    let (from, to) = (first + 10_000, first + 70_000);
    (count_between(&a, from, to), count_between(&b, from, to))
}

async fn weights(workers: usize, rpm: u64) -> anyhow::Result<()> {
    let env = sched_env(workers, rpm, |s| s.tenants[0].weight = 3.0).await?;
    let per_sec = rpm as usize / 60;
    // Enough for 80 s of contention each: A takes 3/4 of the rate, B 1/4.
    let a = env.submit(KEY_A, &lines_of("a", per_sec * 60)).await?;
    let b = env.submit(KEY_B, &lines_of("b", per_sec * 20)).await?;
    let (a_status, b_status) = (
        env.wait_done(&a, Duration::from_secs(600)).await?,
        env.wait_done(&b, Duration::from_secs(600)).await?,
    );
    let (na, nb) = contention_minute(&env);
    println!(
        "| weights 3:1, {rpm} RPM, {workers} workers, one batch each ({a_status}/{b_status}) | over a minute of contention: A {na} calls, B {nb} calls, A/B = {:.3} ({:+.1} % from 3) |",
        na as f64 / nb as f64,
        (na as f64 / nb as f64 / 3.0 - 1.0) * 100.0
    );
    env.finish().await;
    Ok(())
}

async fn tenants(workers: usize, rpm: u64) -> anyhow::Result<()> {
    let env = sched_env(workers, rpm, |_| {}).await?;
    let per_sec = rpm as usize / 60;
    let a = env.submit(KEY_A, &lines_of("a", per_sec * 45)).await?;
    let mut bs = Vec::new();
    for i in 0..5 {
        bs.push(
            env.submit(KEY_B, &lines_of(&format!("b{i}"), per_sec * 9))
                .await?,
        );
    }
    for b in &bs {
        env.wait_done(b, Duration::from_secs(600)).await?;
    }
    env.wait_done(&a, Duration::from_secs(600)).await?;
    let (na, nb) = contention_minute(&env);
    println!(
        "| equal weights, {rpm} RPM, {workers} workers: A one batch, B five | over a minute of contention: A {na} calls, B {nb} calls, A/B = {:.3} ({:+.1} % from 1) |",
        na as f64 / nb as f64,
        (na as f64 / nb as f64 - 1.0) * 100.0
    );
    env.finish().await;
    Ok(())
}

async fn deadline(workers: usize, rpm: u64) -> anyhow::Result<()> {
    let env = sched_env(workers, rpm, |_| {}).await?;
    let n = rpm as usize / 2;
    let started = Instant::now();
    let day = env.submit(KEY_A, &lines_of("day", n)).await?;
    while env.done(&day).await? < (n / 10) as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hour_created = started.elapsed().as_secs_f64();
    let hour = env
        .submit_with(
            KEY_A,
            &lines_of("hour", n),
            json!({"completion_window": "1h"}),
        )
        .await?;
    env.wait_done(&hour, Duration::from_secs(600)).await?;
    let hour_done = started.elapsed().as_secs_f64();
    env.wait_done(&day, Duration::from_secs(600)).await?;
    let day_done = started.elapsed().as_secs_f64();
    let (d, h) = (call_times(&env, "day"), call_times(&env, "hour"));
    let during = count_between(&d, h[0], *h.last().unwrap_or(&0));
    println!(
        "| deadline: {n}-line 24h batch, then at 10 % a {n}-line 1h batch (same tenant), {rpm} RPM, {workers} workers | 1h created at {hour_created:.1} s, done at {hour_done:.1} s; 24h done at {day_done:.1} s; 24h calls during the 1h batch's run: {during} of {} ({:.1} %) |",
        during + h.len(),
        100.0 * during as f64 / (during + h.len()) as f64
    );
    env.finish().await;
    Ok(())
}

async fn background(workers: usize, rpm: u64) -> anyhow::Result<()> {
    let env = sched_env(workers, rpm, |_| {}).await?;
    let per_sec = rpm as usize / 60;
    let bg = env
        .submit_with(
            KEY_A,
            &lines_of("bg", per_sec * 40),
            json!({"completion_window": "24h", "priority": "background"}),
        )
        .await?;
    while env.done(&bg).await? < (per_sec * 4) as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fg = env.submit(KEY_B, &lines_of("fg", per_sec * 20)).await?;
    env.wait_done(&fg, Duration::from_secs(600)).await?;
    env.wait_done(&bg, Duration::from_secs(600)).await?;
    let (b, f) = (call_times(&env, "bg"), call_times(&env, "fg"));
    let (from, to) = (f[0], *f.last().unwrap_or(&0));
    let during = count_between(&b, from, to);
    // Past the background lines queued before the other batch came, and before its tail.
    let middle = count_between(&b, f[f.len() / 4], f[3 * f.len() / 4]);
    println!(
        "| background: a background batch running, another tenant's {}-line batch arrives, {rpm} RPM, {workers} workers | its run took {:.1} s ({:.1} s at the full rate); background calls during it: {during}, in its middle half: {middle} |",
        f.len(),
        (to - from) as f64 / 1_000.0,
        f.len() as f64 / (rpm as f64 / 60.0)
    );
    env.finish().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        argv.iter()
            .position(|a| a == name)
            .and_then(|i| argv.get(i + 1).cloned())
    };
    let only = arg("--only");
    let workers: usize = arg("--workers").map_or(4, |w| w.parse().expect("--workers N"));
    let big: usize = arg("--big").map_or(50_000, |w| w.parse().expect("--big N"));
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    println!("| scenario | result |");
    println!("|---|---|");
    if run("rpm") {
        // `--rpm N` runs one rate instead of both.
        match arg("--rpm") {
            Some(r) => rpm(r.parse().expect("--rpm N"), workers).await?,
            None => {
                rpm(600, workers).await?;
                rpm(6_000, workers).await?;
            }
        }
    }
    if run("tpm") {
        let hold: u64 =
            arg("--reserve-ahead-ms").map_or(2_000, |h| h.parse().expect("--reserve-ahead-ms N"));
        tpm(workers, true, hold).await?;
        tpm(workers, false, hold).await?;
    }
    if run("retry-after") {
        retry_after(workers).await?;
    }
    if run("fairness") {
        let rpm = arg("--fairness-rpm").map(|r| r.parse().expect("--fairness-rpm N"));
        fairness(workers, big, rpm).await?;
    }
    let sched_rpm: u64 = arg("--sched-rpm").map_or(1_200, |r| r.parse().expect("--sched-rpm N"));
    if run("weights") {
        weights(workers, sched_rpm).await?;
    }
    if run("tenants") {
        tenants(workers, sched_rpm).await?;
    }
    if run("deadline") {
        deadline(workers, sched_rpm).await?;
    }
    if run("background") {
        background(workers, sched_rpm).await?;
    }
    Ok(())
}
