//! `sluice-bench-memory`: Redis memory, finalize time, time to first result and aggregator RSS of
//! one large batch, for docs/benchmarks.md.
//!
//! It starts `sluice api`, `sluice worker` and `sluice aggregator` as release processes with an
//! in-process mock upstream, runs one batch (`--kind embeddings`: 1,536-dimension vectors, or
//! `--kind chat`), samples Redis `INFO memory` `used_memory` every 50 ms (peak minus the baseline
//! taken before the batch), polls `GET /v1/batches/{id}/results?limit=1` until it returns a row,
//! and reads the aggregator's peak RSS (VmHWM) from /proc. Run with:
//!
//! `cargo build --release --bins && cargo run --release -p sluice-bench --bin sluice-bench-memory -- --kind embeddings --lines 50000`

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use sluice_bench::{KillOnDrop, memory_kib, sluice_bin, wait_ready};
use sluice_cli::mock_upstream::{MockConfig, MockUpstream};
use sluice_core::config::{StorageSettings, hash_api_key};
use sluice_store::Store;
use sluice_tests::{KEY_A, MODEL, test_settings};
use tokio_util::sync::CancellationToken;

struct Args {
    kind: String,
    lines: usize,
    dims: usize,
    concurrency: u16,
}

fn parse_args() -> Args {
    let mut a = Args {
        kind: "embeddings".into(),
        lines: 50_000,
        dims: 1_536,
        concurrency: 256,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--kind" => a.kind = v,
            "--lines" => a.lines = v.parse().expect("--lines N"),
            "--dims" => a.dims = v.parse().expect("--dims N"),
            "--concurrency" => a.concurrency = v.parse().expect("--concurrency N"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

fn write_input(path: &Path, a: &Args) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for i in 0..a.lines {
        let line = if a.kind == "embeddings" {
            json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/embeddings",
                "body": {"model": "mock-embed", "input": format!("text number {i}"), "dimensions": a.dims}})
        } else {
            json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": format!("question {i} {}", "x".repeat(120))}]}})
        };
        serde_json::to_writer(&mut f, &line)?;
        f.write_all(b"\n")?;
    }
    f.flush()?;
    Ok(())
}

async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<i64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no used_memory in INFO")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args();
    let stop = CancellationToken::new();
    let upstream = MockUpstream::new(MockConfig::default())
        .spawn(stop.clone())
        .await?;
    let mut settings = test_settings(&upstream);
    settings.namespace = format!("benchmem-{}", uuid::Uuid::new_v4().simple());
    let dir = std::env::temp_dir().join(&settings.namespace);
    settings.storage = StorageSettings::Local {
        path: dir.join("store"),
    };
    settings.api.listen = ([127, 0, 0, 1], 18_090).into();
    settings.worker.concurrency = args.concurrency;
    settings.worker.request_timeout_ms = 600_000;
    settings.limits.max_lines = args.lines.max(50_000) as u64;
    settings.limits.max_upload_bytes = 1 << 30;
    settings.aggregator.sweep_interval_ms = 2_000;
    settings.log.filter = "warn".into();
    settings.tenants[0].api_key_sha256 = vec![hash_api_key(KEY_A)];
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
    let agg_pid = procs[1].id();
    procs.push(spawn("worker")?);
    let http = reqwest::Client::new();
    let base = "http://127.0.0.1:18090/v1".to_owned();
    wait_ready(&http, &base).await?;
    let store = Store::open(&settings).await?;

    let input = dir.join("input.jsonl");
    write_input(&input, &args)?;
    let file = tokio::fs::File::open(&input).await?;
    let len = file.metadata().await?.len();
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::stream_with_length(body, len).file_name("bench.jsonl"),
        );
    let resp: Value = http
        .post(format!("{base}/files"))
        .bearer_auth(KEY_A)
        .multipart(form)
        .send()
        .await?
        .json()
        .await?;
    let file_id = resp["id"].as_str().context("upload failed")?.to_owned();

    let client = redis::Client::open(settings.redis_url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let baseline = used_memory(&mut conn).await?;
    let peak = Arc::new(AtomicI64::new(baseline));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        let mut conn = conn.clone();
        tokio::spawn(async move {
            while sampling.load(Ordering::SeqCst) {
                if let Ok(m) = used_memory(&mut conn).await {
                    peak.fetch_max(m, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let endpoint = if args.kind == "embeddings" {
        "/v1/embeddings"
    } else {
        "/v1/chat/completions"
    };
    let t = Instant::now();
    let resp: Value = http
        .post(format!("{base}/batches"))
        .bearer_auth(KEY_A)
        .json(&json!({"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}))
        .send()
        .await?
        .json()
        .await?;
    let batch = resp["id"]
        .as_str()
        .with_context(|| format!("create failed: {resp}"))?
        .to_owned();
    let mut first_result: Option<f64> = None;
    let mut results_supported = true;
    let mut rows_done_at = None;
    let mut last_results_poll = Instant::now() - Duration::from_secs(1);
    let status = loop {
        if results_supported
            && first_result.is_none()
            && last_results_poll.elapsed() > Duration::from_millis(100)
        {
            last_results_poll = Instant::now();
            let r = http
                .get(format!("{base}/batches/{batch}/results?limit=1"))
                .bearer_auth(KEY_A)
                .send()
                .await?;
            if r.status() == reqwest::StatusCode::NOT_FOUND {
                results_supported = false;
            } else if r.status().is_success() && !r.bytes().await?.is_empty() {
                first_result = Some(t.elapsed().as_secs_f64());
            }
        }
        let meta = store.get_batch(&batch).await?.context("batch vanished")?;
        let total = meta.total().unwrap_or(u64::MAX).max(1);
        if rows_done_at.is_none() && meta.done() >= total {
            rows_done_at = Some(Instant::now());
        }
        if let Some(s) = meta.status.map(|s| s.as_str())
            && matches!(s, "completed" | "failed" | "expired" | "cancelled")
        {
            break s.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let e2e = t.elapsed().as_secs_f64();
    let finalize = rows_done_at.map_or(0.0, |at| at.elapsed().as_secs_f64());
    // A little longer, so the sampler sees what a terminal batch leaves in Redis.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_end = used_memory(&mut conn).await? - baseline;
    sampling.store(false, Ordering::SeqCst);
    sampler.await.ok();
    let peak_mb = (peak.load(Ordering::SeqCst) - baseline) as f64 / 1_048_576.0;
    let agg_mb = memory_kib(agg_pid).0 as f64 / 1024.0;

    println!(
        "\n## sluice-bench-memory: {} lines of {} ({})\n",
        args.lines, args.kind, status
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!("| input file | {:.1} MB |", len as f64 / 1_048_576.0);
    println!("| Redis used_memory peak − baseline | {peak_mb:.1} MB |");
    println!(
        "| Redis used_memory after the batch ended − baseline | {:.1} MB |",
        after_end as f64 / 1_048_576.0
    );
    println!("| end to end (create → terminal) | {e2e:.1} s |");
    println!("| finalize (last row → terminal) | {finalize:.2} s |");
    match first_result {
        Some(s) => println!("| time to first `/results` row | {s:.2} s |"),
        None => println!("| time to first `/results` row | n/a (no endpoint) |"),
    }
    println!("| aggregator peak RSS | {agg_mb:.0} MB |");

    store.purge_namespace().await.ok();
    drop(procs);
    std::fs::remove_dir_all(&dir).ok();
    stop.cancel();
    Ok(())
}
