//! `sluice-bench`: end-to-end figures for docs/benchmarks.md, measured against real RabbitMQ and Redis.
//!
//! It starts `sluice api`, `sluice worker` (×N) and `sluice aggregator` as separate release
//! processes (so their memory can be read from /proc) and an in-process mock upstream, then:
//! 1. uploads a large JSONL file (upload MB/s, API peak RSS growth),
//! 2. runs it as one batch (validate-and-enqueue lines/s, end-to-end lines/s),
//! 3. runs small batches back to back (created → completed latency p50/p99),
//!
//! and prints a Markdown table. Run with:
//!
//! `cargo build --release --bins && cargo run --release -p sluice-bench --bin sluice-bench -- --lines 50000`

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use sluice_bench::{
    CpuMeter, KillOnDrop, listener_pid, memory_kib, redis_commandstats, sluice_bin, wait_ready,
};
use sluice_cli::mock_upstream::{MockConfig, MockUpstream};
use sluice_core::config::{StorageSettings, hash_api_key};
use sluice_store::Store;
use sluice_tests::{KEY_A, MODEL, test_settings};
use tokio_util::sync::CancellationToken;

struct Args {
    lines: usize,
    line_bytes: usize,
    workers: usize,
    concurrency: u16,
    small_batches: usize,
    latency_ms: u64,
    /// Lines of one batch in the work queue at once (`worker.batch_window`); default: the
    /// configured default, so end-to-end figures include the fairness window.
    batch_window: Option<u64>,
}

fn parse_args() -> Args {
    let mut a = Args {
        lines: 50_000,
        line_bytes: 200,
        workers: 1,
        concurrency: 256,
        small_batches: 20,
        latency_ms: 0,
        batch_window: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--lines" => a.lines = v.parse().expect("--lines N"),
            "--line-bytes" => a.line_bytes = v.parse().expect("--line-bytes N"),
            "--workers" => a.workers = v.parse().expect("--workers N"),
            "--concurrency" => a.concurrency = v.parse().expect("--concurrency N"),
            "--small-batches" => a.small_batches = v.parse().expect("--small-batches N"),
            "--latency-ms" => a.latency_ms = v.parse().expect("--latency-ms N"),
            "--batch-window" => a.batch_window = Some(v.parse().expect("--batch-window N")),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

fn write_input(path: &Path, lines: usize, line_bytes: usize) -> anyhow::Result<u64> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut total = 0u64;
    for i in 0..lines {
        let base = json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": ""}]}})
        .to_string();
        let pad = line_bytes.saturating_sub(base.len()).max(1);
        let line = json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(pad)}]}});
        let s = line.to_string();
        f.write_all(s.as_bytes())?;
        f.write_all(b"\n")?;
        total += s.len() as u64 + 1;
    }
    f.flush()?;
    Ok(total)
}

async fn upload(http: &reqwest::Client, base: &str, path: &Path) -> anyhow::Result<String> {
    let file = tokio::fs::File::open(path).await?;
    let len = file.metadata().await?.len();
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
    let part = reqwest::multipart::Part::stream_with_length(body, len).file_name("bench.jsonl");
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part("file", part);
    let resp: Value = http
        .post(format!("{base}/files"))
        .bearer_auth(KEY_A)
        .multipart(form)
        .send()
        .await?
        .json()
        .await?;
    resp["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("upload failed: {resp}"))
}

async fn create(http: &reqwest::Client, base: &str, file: &str) -> anyhow::Result<String> {
    let resp: Value = http
        .post(format!("{base}/batches"))
        .bearer_auth(KEY_A)
        .json(&json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        .send()
        .await?
        .json()
        .await?;
    resp["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("create failed: {resp}"))
}

/// Polls Redis directly (cheaper than the API) until the batch leaves `from`; returns its status.
async fn wait_status(
    store: &Store,
    id: &str,
    done: &[&str],
    poll: Duration,
) -> anyhow::Result<String> {
    loop {
        if let Some(meta) = store.get_batch(id).await?
            && let Some(s) = meta.status.map(|s| s.as_str())
            && done.contains(&s)
        {
            return Ok(s.to_owned());
        }
        tokio::time::sleep(poll).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args();
    let stop = CancellationToken::new();
    let mock = MockUpstream::new(MockConfig {
        latency_ms: args.latency_ms,
        ..Default::default()
    });
    let upstream = mock.clone().spawn(stop.clone()).await?;
    let mut settings = test_settings(&upstream);
    settings.namespace = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let dir = std::env::temp_dir().join(&settings.namespace);
    settings.storage = StorageSettings::Local {
        path: dir.join("store"),
    };
    settings.api.listen = ([127, 0, 0, 1], 18_080).into();
    settings.worker.concurrency = args.concurrency;
    settings.worker.request_timeout_ms = 600_000;
    settings.limits.max_lines = args.lines.max(50_000) as u64;
    if let Some(window) = args.batch_window {
        settings.worker.batch_window = window;
    }
    settings.limits.max_upload_bytes = 1 << 30;
    settings.aggregator.sweep_interval_ms = 2_000;
    settings.log.filter = "warn".into();
    settings.tenants[0].api_key_sha256 = vec![hash_api_key(KEY_A)];
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("sluice.toml");
    std::fs::write(&config, toml::to_string(&settings)?)?;

    let spawn = |role: &str| -> anyhow::Result<KillOnDrop> {
        let (role, lines) = match role {
            "dispatcher" => ("worker", "false"),
            other => (other, "true"),
        };
        // Ingest alone is measured with no consumer running, so the dispatch-only worker's fairness
        // window (which holds lines back until earlier ones finish) covers the whole batch.
        let window = match lines {
            "false" => (args.lines as u64).to_string(),
            _ => settings.worker.batch_window.to_string(),
        };
        Command::new(sluice_bin())
            .arg(role)
            .env("SLUICE_WORKER__LINES", lines)
            .env("SLUICE_WORKER__BATCH_WINDOW", window)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map(KillOnDrop::new)
            .with_context(|| format!("starting {}", sluice_bin().display()))
    };
    let mut procs = vec![spawn("api")?];
    let api_pid = procs[0].id();
    procs.push(spawn("aggregator")?);
    let agg_pid = procs[1].id();
    // Ingest is measured first with a dispatch-only worker, so nothing consumes while it enqueues.
    // Held in its guard so a run that fails before the drain still kills it.
    let dispatcher = spawn("dispatcher")?;
    let http = reqwest::Client::new();
    let base = "http://127.0.0.1:18080/v1".to_owned();
    wait_ready(&http, &base).await?;
    let store = Store::open(&settings).await?;

    // 1. Upload.
    let input = dir.join("input.jsonl");
    let bytes = write_input(&input, args.lines, args.line_bytes)?;
    let (_, api_rss_before) = memory_kib(api_pid);
    let t = Instant::now();
    let file = upload(&http, &base, &input).await?;
    let upload_secs = t.elapsed().as_secs_f64();
    let (api_hwm, _) = memory_kib(api_pid);

    // 2. Ingest alone: validate and enqueue with no line consumer running.
    let t = Instant::now();
    let ingest_batch = create(&http, &base, &file).await?;
    loop {
        let meta = store
            .get_batch(&ingest_batch)
            .await?
            .context("batch vanished")?;
        anyhow::ensure!(
            meta.status.map(|s| s.as_str()) != Some("failed"),
            "ingest batch failed validation"
        );
        if meta.total().is_some() && meta.dispatched == meta.total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ingest = t.elapsed().as_secs_f64();
    let mut worker_pids = Vec::new();
    for _ in 0..args.workers {
        let c = spawn("worker")?;
        worker_pids.push(c.id());
        procs.push(c);
    }
    let t = Instant::now();
    wait_status(
        &store,
        &ingest_batch,
        &["completed"],
        Duration::from_millis(5),
    )
    .await?;
    let drain = t.elapsed().as_secs_f64();
    drop(dispatcher);

    // 3. One big batch, end to end, with the line workers doing the dispatch too. Its CPU cost is
    // read from /proc for every process; Redis and RabbitMQ are shared with whatever else runs on
    // the machine, so their figures include that load.
    let mut meter_procs = vec![
        ("api".to_owned(), vec![api_pid]),
        ("aggregator".to_owned(), vec![agg_pid]),
        (format!("{} worker(s)", args.workers), worker_pids.clone()),
        (
            "bench process (mock upstream + status polling)".to_owned(),
            vec![std::process::id()],
        ),
    ];
    for (label, url) in [
        ("redis-server", &settings.redis_url),
        ("RabbitMQ", &settings.amqp_url),
    ] {
        let port = url_port(url);
        match listener_pid(port) {
            Some(pid) => meter_procs.push((label.to_owned(), vec![pid])),
            None => eprintln!("no pid found listening on {port}; {label} CPU not measured"),
        }
    }
    let commands_before = redis_commandstats(&store).await?;
    let meter = CpuMeter::start(meter_procs);
    let t = Instant::now();
    let batch = create(&http, &base, &file).await?;
    wait_status(
        &store,
        &batch,
        &["in_progress", "failed", "completed"],
        Duration::from_millis(5),
    )
    .await?;
    let validated = t.elapsed().as_secs_f64();
    let mut enqueued_at = None;
    let mut rows_done_at = None;
    // Worker and aggregator RSS (MB) as the batch passes 25, 50, 75 and 100 % of its rows.
    let mut rss_by_quarter: Vec<(u64, f64, f64)> = Vec::new();
    let rss_mb = |pid: u32| memory_kib(pid).1 as f64 / 1024.0;
    let status = loop {
        let meta = store.get_batch(&batch).await?.context("batch vanished")?;
        if enqueued_at.is_none() && meta.dispatched == meta.total {
            enqueued_at = Some(t.elapsed().as_secs_f64());
        }
        let total = meta.total().unwrap_or(u64::MAX).max(1);
        let quarter = meta.done() * 4 / total;
        if quarter > rss_by_quarter.len() as u64 {
            let worker = worker_pids.iter().map(|p| rss_mb(*p)).fold(0.0, f64::max);
            rss_by_quarter.push((quarter * 25, worker, rss_mb(agg_pid)));
        }
        if rows_done_at.is_none() && meta.done() >= total {
            rows_done_at = Some(Instant::now());
        }
        if let Some(s) = meta.status.map(|s| s.as_str())
            && matches!(s, "completed" | "failed" | "expired" | "cancelled")
        {
            break s.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let e2e = t.elapsed().as_secs_f64();
    let cpu = meter.used();
    let commands_after = redis_commandstats(&store).await?;
    let finalize = rows_done_at.map_or(0.0, |at| at.elapsed().as_secs_f64());
    let enqueued = enqueued_at.unwrap_or(e2e);

    // 4. Small batches, one at a time.
    let small = dir.join("small.jsonl");
    write_input(&small, 10, 200)?;
    let mut latencies = Vec::new();
    for _ in 0..args.small_batches {
        let file = upload(&http, &base, &small).await?;
        let t = Instant::now();
        let id = create(&http, &base, &file).await?;
        wait_status(
            &store,
            &id,
            &["completed", "failed"],
            Duration::from_millis(2),
        )
        .await?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).expect("finite"));

    let worker_hwm = worker_pids
        .iter()
        .map(|p| memory_kib(*p).0)
        .max()
        .unwrap_or(0);
    let (agg_hwm, _) = memory_kib(agg_pid);
    let mb = bytes as f64 / 1e6;
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| setup | {} lines, {:.1} MB, {} worker process(es), concurrency {}, upstream latency {} ms, batch window {} lines (or {} s of throughput) |",
        args.lines,
        mb,
        args.workers,
        args.concurrency,
        args.latency_ms,
        settings.worker.batch_window,
        settings.worker.batch_window_secs
    );
    println!("| batch status | {status} |");
    println!(
        "| upload | {upload_secs:.2} s, {:.1} MB/s |",
        mb / upload_secs
    );
    println!(
        "| API RSS | {:.1} MB before upload, peak {:.1} MB (growth {:.1} MB) |",
        api_rss_before as f64 / 1024.0,
        api_hwm as f64 / 1024.0,
        api_hwm.saturating_sub(api_rss_before) as f64 / 1024.0
    );
    println!(
        "| validate (create → in_progress) | {validated:.2} s, {:.0} lines/s |",
        args.lines as f64 / validated
    );
    println!(
        "| validate + enqueue while lines run (create → all confirmed) | {enqueued:.2} s, {:.0} lines/s |",
        args.lines as f64 / enqueued
    );
    println!(
        "| ingest alone: validate + enqueue with confirms, no consumer running | {ingest:.2} s, {:.0} lines/s |",
        args.lines as f64 / ingest
    );
    println!(
        "| drain of that backlog by the line workers | {drain:.2} s, {:.0} lines/s |",
        args.lines as f64 / drain
    );
    println!(
        "| end to end (create → completed) | {e2e:.2} s, {:.0} lines/s |",
        args.lines as f64 / e2e
    );
    println!(
        "| 10-line batch, created → completed ({} runs) | p50 {:.0} ms, p99 {:.0} ms |",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    println!(
        "| finalize (last row written → completed, {} rows) | {:.3} s |",
        args.lines, finalize
    );
    let quarters: Vec<String> = rss_by_quarter
        .iter()
        .map(|(pct, w, a)| format!("{pct} %: {w:.1} / {a:.1}"))
        .collect();
    println!(
        "| worker / aggregator RSS (MB) during the batch | {} |",
        quarters.join("; ")
    );
    println!("| worker peak RSS | {:.1} MB |", worker_hwm as f64 / 1024.0);
    println!(
        "| aggregator peak RSS | {:.1} MB |",
        agg_hwm as f64 / 1024.0
    );
    println!("| upstream calls | {} |", mock.stats().calls);
    let per_k = 1_000.0 / args.lines as f64;
    for (label, secs) in &cpu {
        println!(
            "| CPU, end-to-end batch: {label} | {secs:.2} s, {:.3} s per 1,000 lines |",
            secs * per_k
        );
    }
    let sluice: f64 = cpu[..3].iter().map(|(_, s)| s).sum();
    let with_deps: f64 = sluice + cpu[4..].iter().map(|(_, s)| s).sum::<f64>();
    println!(
        "| CPU per line: Sluice roles / + Redis and RabbitMQ | {:.0} µs / {:.0} µs |",
        sluice * 1e6 / args.lines as f64,
        with_deps * 1e6 / args.lines as f64
    );
    let mut commands: Vec<(String, u64)> = commands_after
        .iter()
        .map(|(name, n)| {
            (
                name.clone(),
                n - commands_before.get(name).copied().unwrap_or(0),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    commands.sort_by_key(|c| std::cmp::Reverse(c.1));
    let total: u64 = commands.iter().map(|(_, n)| n).sum();
    let scripts: u64 = commands
        .iter()
        .filter(|(name, _)| name.starts_with("eval"))
        .map(|(_, n)| n)
        .sum();
    let top: Vec<String> = commands
        .iter()
        .take(8)
        .map(|(name, n)| format!("{name} {:.3}", *n as f64 / args.lines as f64))
        .collect();
    println!(
        "| Redis commands per line, end-to-end batch (whole server, other clients included; commands run inside scripts counted too) | {:.2} in all, {:.3} script calls; {} |",
        total as f64 / args.lines as f64,
        scripts as f64 / args.lines as f64,
        top.join(", ")
    );

    drop(procs);
    let base = baselines(&settings, args.lines, args.line_bytes).await?;
    let broker_rate =
        args.lines as f64 / (args.lines as f64 / base.publish + args.lines as f64 / base.consume);
    println!(
        "| baseline: RabbitMQ confirm-publish, quorum, {} B messages, 1000 in flight | {:.0} msg/s |",
        args.line_bytes, base.publish
    );
    println!(
        "| baseline: RabbitMQ consume, prefetch 500, acks pipelined | {:.0} msg/s |",
        base.consume
    );
    println!(
        "| baseline: publish then consume (N / (t_publish + t_consume)) | {broker_rate:.0} msg/s |"
    );
    println!(
        "| baseline: Redis EVALSHA (HSETNX + HINCRBY), 64 in flight | {:.0} calls/s |",
        base.redis
    );
    println!(
        "| end to end as a fraction of publish-and-consume | {:.0} % |",
        100.0 * args.lines as f64 / e2e / broker_rate
    );
    println!(
        "| ingest alone as a fraction of confirm-publish | {:.0} % |",
        100.0 * args.lines as f64 / ingest / base.publish
    );
    stop.cancel();
    if let Ok(conn) = sluice_broker::connect(&settings.amqp_url, "bench-cleanup").await
        && let Ok(ch) = conn.create_channel().await
    {
        sluice_broker::delete_topology(&ch, &sluice_core::Keys::new(&settings.namespace))
            .await
            .ok();
    }
    store.purge_namespace().await.ok();
    std::fs::remove_dir_all(&dir).ok();
    anyhow::ensure!(status == "completed", "the benchmark batch ended {status}");
    Ok(())
}

/// The port of a `redis://` or `amqp://` URL on this machine (the scheme's default if none).
fn url_port(url: &str) -> u16 {
    let default = if url.starts_with("amqp") { 5672 } else { 6379 };
    url.split_once("://")
        .map(|(_, rest)| rest.rsplit_once('@').map_or(rest, |(_, host)| host))
        .and_then(|host| host.split(['/', '?']).next())
        .and_then(|host| host.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(default)
}

/// Raw rates of the broker and Redis on this machine, for reading the figures above as fractions.
struct Baselines {
    publish: f64,
    consume: f64,
    redis: f64,
}

async fn baselines(
    settings: &sluice_core::Settings,
    n: usize,
    size: usize,
) -> anyhow::Result<Baselines> {
    use futures::StreamExt;
    use futures::stream::FuturesUnordered;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};

    let conn = sluice_broker::connect(&settings.amqp_url, "bench-baseline").await?;
    let ch = conn.create_channel().await?;
    let queue = format!("{}.baseline", settings.namespace);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    ch.confirm_select(Default::default()).await?;
    let payload = vec![b'x'; size];
    let props = lapin::BasicProperties::default().with_delivery_mode(2);
    let t = Instant::now();
    let mut pending = FuturesUnordered::new();
    for _ in 0..n {
        if pending.len() >= 1_000 {
            let confirm: lapin::Result<lapin::Confirmation> =
                pending.next().await.expect("pending confirm");
            anyhow::ensure!(confirm?.is_ack(), "broker nacked a baseline message");
        }
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                Default::default(),
                &payload,
                props.clone(),
            )
            .await?;
        pending.push(confirm);
    }
    while let Some(confirm) = pending.next().await {
        anyhow::ensure!(confirm?.is_ack(), "broker nacked a baseline message");
    }
    let publish = n as f64 / t.elapsed().as_secs_f64();

    let consume_ch = conn.create_channel().await?;
    consume_ch
        .basic_qos(500, BasicQosOptions::default())
        .await?;
    let mut consumer = consume_ch
        .basic_consume(
            queue.as_str().into(),
            "baseline".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let t = Instant::now();
    let mut acks = FuturesUnordered::new();
    let mut got = 0;
    while got < n {
        tokio::select! {
            Some(done) = acks.next(), if !acks.is_empty() => { let r: lapin::Result<bool> = done; r?; }
            d = consumer.next() => {
                let d = d.context("consumer ended")??;
                got += 1;
                acks.push(async move { d.ack(BasicAckOptions::default()).await });
            }
        }
    }
    while let Some(done) = acks.next().await {
        done?;
    }
    let consume = n as f64 / t.elapsed().as_secs_f64();
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;

    let store = Store::open(settings).await?;
    let script = redis::Script::new(
        "if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then redis.call('HINCRBY', KEYS[2], 'n', 1) end return 1",
    );
    let rows = format!("{}:baseline:rows", settings.namespace);
    let counter = format!("{}:baseline:meta", settings.namespace);
    let row = "x".repeat(size);
    let t = Instant::now();
    let mut calls = FuturesUnordered::new();
    for i in 0..n {
        if calls.len() >= 64 {
            let r: redis::RedisResult<i64> = calls.next().await.expect("pending call");
            r?;
        }
        let mut conn = store.conn();
        let (script, rows, counter, row) =
            (script.clone(), rows.clone(), counter.clone(), row.clone());
        calls.push(async move {
            script
                .key(&rows)
                .key(&counter)
                .arg(i)
                .arg(&row)
                .invoke_async::<i64>(&mut conn)
                .await
        });
    }
    while let Some(r) = calls.next().await {
        r?;
    }
    let redis_rate = n as f64 / t.elapsed().as_secs_f64();
    Ok(Baselines {
        publish,
        consume,
        redis: redis_rate,
    })
}
