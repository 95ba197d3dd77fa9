//! Several models in one batch: refused by default as OpenAI does, accepted with
//! `limits.one_model_per_batch = false` (or a tenant's own setting), each line then routed to and
//! paced by its own model's provider.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use sluice_cli::mock_upstream::MockUpstream;
use sluice_core::Settings;
use sluice_core::config::PacingSettings;
use sluice_tests::python::run_openai_script;
use sluice_tests::*;
use tokio_util::sync::CancellationToken;

use crate::hosted_api_flows::{assert_error, create, create_jsonl, provider, second_mock};
use crate::pacing::max_in_window;

/// A chat line for `model` whose calls the mock records under the line's `custom_id`.
fn line(id: &str, model: &str, mock: Value) -> Value {
    let mut mock = mock;
    mock["key"] = json!(id);
    let mut line = model_chat_line(id, model, id);
    line["body"]["mock"] = mock;
    line
}

/// Lines `{prefix}-0…` for `model`.
fn lines(prefix: &str, model: &str, n: usize, mock: &Value) -> Vec<Value> {
    (0..n)
        .map(|i| line(&format!("{prefix}-{i}"), model, mock.clone()))
        .collect()
}

/// The `custom_id`s a mock upstream was called for.
fn served(mock: &MockUpstream) -> BTreeSet<String> {
    mock.stats().per_key.into_keys().collect()
}

/// The lines' custom ids, as a set to compare with [`served`].
fn id_set(lines: &[Value]) -> BTreeSet<String> {
    custom_ids(lines).into_iter().collect()
}

/// The same lines as an inline create's `requests`.
fn inline(lines: &[Value]) -> Value {
    let requests: Vec<Value> = lines
        .iter()
        .map(|l| json!({"custom_id": l["custom_id"], "body": l["body"]}))
        .collect();
    json!({"endpoint": "/v1/chat/completions", "requests": requests})
}

/// An app whose batches may mix models, with a second upstream (returned) serving `alpha-model`
/// beside the default mock; `tweak` adjusts the settings further.
async fn mixing_app(
    stop: &CancellationToken,
    tweak: impl FnOnce(&mut Settings),
) -> (MockUpstream, TestApp) {
    let (alpha, alpha_base) = second_mock(stop).await;
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.limits.one_model_per_batch = false;
        s.providers
            .push(provider("alpha", &alpha_base, &["alpha-model"]));
        tweak(s);
    })
    .await;
    (alpha, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mixed_batch_runs_each_line_on_its_own_models_provider() {
    let stop = CancellationToken::new();
    let (beta, beta_base) = second_mock(&stop).await;
    let (alpha, app) = mixing_app(&stop, |s| {
        s.providers.push(provider("beta", &beta_base, &["gpt-x"]));
        // Tenant B keeps OpenAI's rule whatever the default.
        s.tenants[1].one_model_per_batch = Some(true);
    })
    .await;
    let (a, b, m) = (
        lines("a", "alpha-model", 4, &json!({})),
        // The prefix form: the upstream is asked for `gpt-x`.
        lines("b", "beta/gpt-x", 4, &json!({})),
        lines("m", MODEL, 4, &json!({})),
    );
    // Interleaved, so every message of lines holds several models.
    let all: Vec<Value> = (0..4)
        .flat_map(|i| [a[i].clone(), b[i].clone(), m[i].clone()])
        .collect();
    let id = app.submit(KEY_A, &all).await;
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(30)).await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    assert_eq!(batch["request_counts"]["completed"], 12, "{batch:#}");
    assert_eq!(batch["model"], Value::Null, "no single model: {batch:#}");
    assert_eq!(served(&alpha), id_set(&a));
    assert_eq!(served(&beta), id_set(&b));
    assert_eq!(served(&app.mock), id_set(&m));
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert!(errors.is_empty(), "{errors:#?}");
    assert_exactly_once(
        &output,
        &errors,
        &id_set(&all).into_iter().collect::<Vec<_>>(),
    );
    for row in &output {
        let expected = match &row["custom_id"].as_str().unwrap()[..1] {
            "a" => "alpha-model",
            "b" => "gpt-x",
            _ => MODEL,
        };
        assert_eq!(row["response"]["body"]["model"], expected, "{row}");
    }

    // The inline and JSONL-body forms take the same batch.
    let (status, _, created) = create(&app, KEY_A, &inline(&all)).await;
    assert_eq!(status, 200, "{created}");
    let jsonl: Vec<String> = all.iter().map(Value::to_string).collect();
    let (status, _, from_body) = create_jsonl(&app, Some(KEY_A), &jsonl).await;
    assert_eq!(status, 200, "{from_body}");
    for created in [created, from_body] {
        let id = created["id"].as_str().unwrap();
        let batch = app.wait_terminal(KEY_A, id, Duration::from_secs(30)).await;
        assert_eq!(batch["status"], "completed", "{batch:#}");
        assert_eq!(batch["model"], Value::Null);
    }
    // Each line went to its provider once per batch: three batches, three calls per line.
    for (mock, mine) in [(&alpha, &a), (&beta, &b), (&app.mock, &m)] {
        let stats = mock.stats();
        for id in id_set(mine) {
            assert_eq!(stats.per_key[&id].len(), 3, "{id}");
        }
    }

    // A batch whose lines all name one model still has it.
    let id = app.submit(KEY_A, &a).await;
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(30)).await;
    assert_eq!(batch["model"], "alpha-model", "{batch:#}");

    // A model nothing serves is still a line's validation error, and nothing is called.
    let calls = || app.upstream_stats().calls + alpha.stats().calls + beta.stats().calls;
    let before = calls();
    let mut bad = all[..2].to_vec();
    bad.push(line("u-0", "gamma/none", json!({})));
    let id = app.submit(KEY_A, &bad).await;
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(30)).await;
    assert_eq!(batch["status"], "failed", "{batch:#}");
    let data = batch["errors"]["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{batch:#}");
    assert_eq!(
        (&data[0]["code"], &data[0]["param"], &data[0]["line"]),
        (&json!("model_not_found"), &json!("body.model"), &json!(3))
    );
    assert_eq!(calls(), before);

    // Tenant B's own setting refuses the mix.
    let id = app.submit(KEY_B, &all).await;
    let batch = app.wait_terminal(KEY_B, &id, Duration::from_secs(30)).await;
    assert_eq!(batch["status"], "failed", "{batch:#}");
    assert_eq!(batch["errors"]["data"][0]["code"], "model_mismatch");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mixed_batch_is_refused_by_default_unless_the_tenant_allows_it() {
    let stop = CancellationToken::new();
    let (alpha, alpha_base) = second_mock(&stop).await;
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.providers
            .push(provider("alpha", &alpha_base, &["alpha-model"]));
        s.tenants[0].one_model_per_batch = Some(false);
    })
    .await;
    let all = [
        line("m-0", MODEL, json!({})),
        line("a-0", "alpha-model", json!({})),
        line("m-1", MODEL, json!({})),
    ];

    // Tenant B has the default: OpenAI's `model_mismatch`, in every create form.
    let id = app.submit(KEY_B, &all).await;
    let batch = app.wait_terminal(KEY_B, &id, Duration::from_secs(30)).await;
    assert_eq!(batch["status"], "failed", "{batch:#}");
    let data = batch["errors"]["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{batch:#}");
    assert_eq!(data[0]["code"], "model_mismatch");
    assert_eq!(data[0]["param"], "body.model");
    assert_eq!(data[0]["line"], 2);
    let message = data[0]["message"].as_str().unwrap();
    assert!(
        message.contains("alpha-model") && message.contains(MODEL),
        "{message}"
    );

    let got = create(&app, KEY_B, &inline(&all)).await;
    let error = assert_error(&got, 400, "model_mismatch");
    assert_eq!(error["param"], "requests[1].body.model");
    let jsonl: Vec<String> = all.iter().map(Value::to_string).collect();
    let got = create_jsonl(&app, Some(KEY_B), &jsonl).await;
    let error = assert_error(&got, 400, "model_mismatch");
    assert_eq!(error["errors"][0]["line"], 2, "{error}");
    assert_eq!(app.upstream_stats().calls + alpha.stats().calls, 0);

    // Tenant A's own setting allows it.
    let id = app.submit(KEY_A, &all).await;
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(30)).await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    assert_eq!(served(&alpha), id_set(&all[1..2]));
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_line_is_paced_by_its_own_providers_limits() {
    let stop = CancellationToken::new();
    let (capped, capped_base) = second_mock(&stop).await;
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.limits.one_model_per_batch = false;
        let mut one_at_a_time = provider("capped", &capped_base, &["capped-model"]);
        one_at_a_time.pacing = PacingSettings {
            max_concurrency: Some(1),
            ..PacingSettings::default()
        };
        s.providers.push(one_at_a_time);
    })
    .await;
    // The unlimited provider's model comes first: a batch paced by its first model would let
    // the capped lines through all at once.
    let slow = json!({"delay_ms": 300});
    let free = lines("free", MODEL, 6, &slow);
    let held = lines("held", "capped-model", 6, &slow);
    let all: Vec<Value> = free.iter().chain(&held).cloned().collect();
    let id = app.submit(KEY_A, &all).await;
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(60)).await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    assert_eq!(batch["request_counts"]["completed"], 12);
    assert_eq!(served(&capped), id_set(&held));
    assert_eq!(served(&app.mock), id_set(&free));
    // One capped call at a time: each is answered after 300 ms and only then frees the slot, so
    // no two start within 300 ms of each other, however slow the machine.
    let times = capped.stats().times;
    assert_eq!(times.len(), 6);
    let peak = max_in_window(&times, 300);
    assert_eq!(peak, 1, "capped calls overlapped: {times:?}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readmes_python_sdk_example_runs_a_mixed_batch() {
    let stop = CancellationToken::new();
    let (alpha, app) = mixing_app(&stop, |_| {}).await;
    let models = format!("{MODEL},alpha-model");
    let env = [("SLUICE_MODELS", models.as_str())];
    let stdout = run_openai_script(
        "mixed_models.py",
        &app.base,
        KEY_A,
        &env,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            &format!("q0 {MODEL}") as &str,
            "q1 alpha-model",
            "mixed: ok"
        ]
    );
    assert_eq!((app.upstream_stats().calls, alpha.stats().calls), (1, 1));
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_model_and_a_plain_model_mix_each_on_its_own_provider() {
    let stop = CancellationToken::new();
    // The task model runs on the other provider than the plain line.
    let (alpha, app) = mixing_app(&stop, |s| s.tasks.model = Some("alpha-model".into())).await;
    let summarize = json!({"custom_id": "sum-1", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "summarize", "text": "The quarter closed with record revenue."}});
    let plain = line("m-0", MODEL, json!({}));
    let id = app.submit(KEY_A, &[summarize, plain]).await;
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(30)).await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    assert_eq!(batch["request_counts"]["completed"], 2, "{batch:#}");
    assert_eq!(batch["model"], Value::Null);
    let (output, _) = app.results(KEY_A, &batch).await;
    let models: Vec<(&str, &str)> = output
        .iter()
        .map(|r| {
            (
                r["custom_id"].as_str().unwrap(),
                r["response"]["body"]["model"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(models, [("sum-1", "summarize"), ("m-0", MODEL)]);
    assert_eq!((alpha.stats().calls, app.upstream_stats().calls), (1, 1));
    stop.cancel();
}
