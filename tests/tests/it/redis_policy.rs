//! Redis as the system of record: a role refuses to start on an evicting `maxmemory-policy`
//! (unless `redis_allow_eviction = true`), and `/readyz` says so when Redis is out of memory.
//! Each test runs its own `redis-server`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_tests::redis_server::RedisServer;
use sluice_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn roles_refuse_an_evicting_redis_unless_allowed() {
    let redis = RedisServer::start(&["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]);
    let mut app = spawn_app_with(AppOptions::api_only(), |_| {}).await;
    app.settings.redis_url = redis.url();
    app.settings.dependencies.startup_deadline_secs = Some(20);
    let config = app.write_config();
    for role in ["api", "worker", "aggregator"] {
        let log = config.with_file_name(format!("{role}.log"));
        let mut child = Command::new(sluice_binary())
            .arg(role)
            .arg("--config")
            .arg(&config)
            .env("SLUICE_LOG__FORMAT", "pretty")
            .env("SLUICE_API__LISTEN", format!("127.0.0.1:{}", spare_port()))
            .env(
                "SLUICE_API__METRICS_LISTEN",
                format!("127.0.0.1:{}", spare_port()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .map(KillOnDrop::new)
            .expect("sluice runs");
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("child status") {
                break status;
            }
            if start.elapsed() > Duration::from_secs(30) {
                child.kill().ok();
                child.wait().ok();
                panic!(
                    "{role} kept running on an evicting Redis: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let stderr = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(!status.success(), "{role} exited 0: {stderr}");
        let line = stderr
            .lines()
            .find(|l| l.contains("maxmemory-policy allkeys-lru"))
            .unwrap_or_else(|| panic!("{role}: no line names the policy: {stderr}"));
        assert!(line.contains("noeviction"), "{line}");
        assert!(line.contains("redis_allow_eviction"), "{line}");
    }

    // Allowed: it starts and becomes ready.
    app.settings.redis_allow_eviction = true;
    app.spawn_ready_api_process().await;
    let resp = app
        .http
        .get(app.base.replace("/v1", "/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(app);
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_says_redis_is_out_of_memory_and_recovers() {
    let redis = RedisServer::start(&["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]);
    let url = redis.url();
    let app = spawn_app_with(AppOptions::api_only(), |s| s.redis_url = url).await;
    let readyz = app.base.replace("/v1", "/readyz");
    let probe = || async {
        let resp = app.http.get(&readyz).send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    };
    assert_eq!(probe().await.0, 200);

    // Fill Redis until it refuses writes, ending with values as small as the probe's: a big
    // value refused frees its query buffer, which can leave room for a small write.
    let mut conn = app.store.conn();
    let mut filled = 0;
    for size in [16 * 1024, 16] {
        let value = vec![b'x'; size];
        loop {
            let set: redis::RedisResult<()> = redis::cmd("SET")
                .arg(format!("{}:fill:{filled}", app.settings.namespace))
                .arg(&value)
                .query_async(&mut conn)
                .await;
            match set {
                Ok(()) => filled += 1,
                Err(e) => {
                    assert_eq!(e.code(), Some("OOM"), "{e}");
                    break;
                }
            }
            assert!(filled < 100_000, "Redis never filled up");
        }
    }
    // Buffers Redis frees on its own can drop it just under the limit again: pin the limit below
    // what it holds, so it stays out of memory for as long as the test looks.
    assert!(
        redis
            .cli(&["config", "set", "maxmemory", "1"])
            .contains("OK")
    );
    let (status, body) = probe().await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("out of memory"), "{body}");
    // Uploads fail rather than pretend.
    let resp = app
        .upload_raw(KEY_A, "a.jsonl", jsonl(&chat_lines(1)))
        .await;
    assert!(resp.status().is_server_error(), "{}", resp.status());

    // Room again: ready again.
    assert!(
        redis
            .cli(&["config", "set", "maxmemory", "4mb"])
            .contains("OK")
    );
    for i in 0..filled {
        let () = redis::cmd("DEL")
            .arg(format!("{}:fill:{i}", app.settings.namespace))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let start = Instant::now();
    loop {
        let (status, body) = probe().await;
        if status == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(app);
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_that_refuses_config_get_is_accepted() {
    // Managed services often refuse CONFIG: the role cannot check, says so, and starts.
    let redis = RedisServer::start(&[
        "--maxmemory-policy",
        "allkeys-lru",
        "--rename-command",
        "CONFIG",
        "hidden-config-command",
    ]);
    assert!(
        redis
            .cli(&["config", "get", "maxmemory-policy"])
            .contains("unknown command")
    );
    let url = redis.url();
    let app = spawn_app_with(AppOptions::default(), |s| s.redis_url = url).await;
    let id = app.submit(KEY_A, &chat_lines(2)).await;
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(30)).await;
    assert_eq!(batch["status"], "completed");
    drop(app);
    drop(redis);
}
