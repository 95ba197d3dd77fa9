//! Logs never carry an API key, an upstream key, a prompt, a completion or a webhook secret.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use sluice_tests::*;

const TENANT_KEY: &str = "sk-CANARY-tenant-7f3a9c1e5b2d4f60";
const UPSTREAM_KEY: &str = "sk-CANARY-upstream-1c9e7a3f5b2d4e68";
const PROMPT: &str = "CANARY-PROMPT-quixotic-zephyr";
const WEBHOOK_SECRET: &str = "whsec_CANARYCANARYCANARYCANARY";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_run_at_debug_level_logs_no_key_prompt_or_completion() {
    // Only the API key store and the mock upstream run in this process; every Sluice role runs as
    // a child whose whole stderr is captured.
    let mut app = spawn_app_with(
        AppOptions {
            worker: false,
            aggregator: false,
            ..Default::default()
        },
        |s| {
            s.tenants[0]
                .api_key_sha256
                .push(sluice_core::config::hash_api_key(TENANT_KEY));
            s.providers[0].api_key_env = Some("SLUICE_TEST_CANARY_UPSTREAM_KEY".into());
            // Nothing listens there: every delivery attempt fails and logs a line.
            s.webhooks.allow_private = true;
            s.webhooks.backoff_base_ms = 200;
            s.tenants[0].webhooks = vec![sluice_core::config::WebhookEndpoint {
                url: format!("http://127.0.0.1:{}/CANARY-path?token=CANARY", spare_port()),
                secret: sluice_core::config::Secret(WEBHOOK_SECRET.into()),
            }];
        },
    )
    .await;
    let port = spare_port();
    app.settings.api.listen = ([127, 0, 0, 1], port).into();
    let config = app.write_config();
    let log_path = config.with_file_name("all.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(sluice_binary())
        .args(["all", "--config"])
        .arg(&config)
        .env("SLUICE_TEST_CANARY_UPSTREAM_KEY", UPSTREAM_KEY)
        .env("RUST_LOG", "debug")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}/v1");
    let http = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..100 {
        if http
            .get(format!("{base}/batches"))
            .bearer_auth(TENANT_KEY)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "sluice all did not start");

    let lines: Vec<_> = (0..20)
        .map(|i| chat_line(&format!("c{i}"), &format!("{PROMPT} {i}")))
        .collect();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(jsonl(&lines)).file_name("in.jsonl"),
        );
    let file: serde_json::Value = http
        .post(format!("{base}/files"))
        .bearer_auth(TENANT_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let batch: serde_json::Value = http
        .post(format!("{base}/batches"))
        .header("x-api-key", TENANT_KEY)
        .json(&json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = batch["id"].as_str().unwrap().to_owned();
    let mut done = serde_json::Value::Null;
    for _ in 0..200 {
        done = http
            .get(format!("{base}/batches/{id}"))
            .bearer_auth(TENANT_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if done["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(done["status"], "completed", "{done:#}");
    let output = http
        .get(format!(
            "{base}/files/{}/content",
            done["output_file_id"].as_str().unwrap()
        ))
        .bearer_auth(TENANT_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The mock echoes the prompt: the completion text is a canary too.
    assert!(output.contains(&format!("echo: {PROMPT}")), "{output}");
    // A rejected key must not be logged either.
    let rejected = http
        .get(format!("{base}/batches"))
        .bearer_auth("sk-CANARY-wrong-key-0000")
        .send()
        .await
        .unwrap();
    assert_eq!(rejected.status(), 401);

    // The batch's webhook fails (a line per attempt) before the process stops.
    for _ in 0..300 {
        if std::fs::read_to_string(&log_path)
            .unwrap()
            .contains("Webhook delivery failed")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    child.wait().unwrap();
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logs.lines().count() > 20,
        "expected debug logs, got: {logs}"
    );
    // The capture really holds this run's logs: the batch is named (ids are not secrets).
    assert!(logs.contains(&id), "the logs do not mention batch {id}");
    assert!(
        logs.contains("Webhook delivery failed"),
        "no webhook failure was logged"
    );
    // Every canary (both keys, the rejected key, the prompt and its echoed completion, the webhook
    // secret and its URL's path and query) contains it.
    let hits: Vec<&str> = logs.lines().filter(|l| l.contains("CANARY")).collect();
    assert!(
        hits.is_empty(),
        "logs leak a key, prompt or completion: {hits:#?}"
    );
}
