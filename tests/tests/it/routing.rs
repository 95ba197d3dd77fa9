//! Provider routing: prefixes, flavor suffixes, unknown models, providers without batch support or
//! without an endpoint, and no provider at all, for inline, JSONL-body and uploaded-file batches.

use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::*;
use tokio_util::sync::CancellationToken;

use crate::hosted_api_flows::{assert_error, create, create_jsonl, provider, second_mock};

/// Uploads `lines` and creates a batch on `endpoint`; returns its id.
async fn file_batch(app: &TestApp, lines: &[Value], endpoint: &str) -> String {
    let file = app.upload(KEY_A, jsonl(lines)).await;
    let (status, _, batch) = create(
        app,
        KEY_A,
        &json!({"input_file_id": file, "endpoint": endpoint, "completion_window": "24h"}),
    )
    .await;
    assert_eq!(status, 200, "{batch}");
    batch["id"].as_str().unwrap().to_owned()
}

fn inline(model: &str, endpoint: &str) -> Value {
    let body = if endpoint == "/v1/embeddings" {
        json!({"model": model, "input": "hi"})
    } else {
        json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    };
    json!({"endpoint": endpoint, "requests": [{"custom_id": "a", "body": body}]})
}

/// The failed batch's single `errors.data` code.
async fn failed_with(app: &TestApp, id: &str) -> (String, String) {
    let batch = app.wait_terminal(KEY_A, id, Duration::from_secs(20)).await;
    assert_eq!(batch["status"], "failed", "{batch:#}");
    let error = &batch["errors"]["data"][0];
    assert_eq!(error["param"], "body.model", "{batch:#}");
    (
        error["code"].as_str().unwrap().to_owned(),
        error["message"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefix_picks_the_named_provider_and_a_flavor_the_provider_declaring_it() {
    let stop = CancellationToken::new();
    let (openai, openai_base) = second_mock(&stop).await;
    let (cheap, cheap_base) = second_mock(&stop).await;
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.providers[0].models.push("glm-4.7".into());
        s.providers.push(provider("openai", &openai_base, &["*"]));
        let mut batch = provider("cheap", &cheap_base, &["glm-4.7"]);
        batch.flavors = vec!["batch".into()];
        s.providers.push(batch);
    })
    .await;

    let id = file_batch(
        &app,
        &[
            model_chat_line("p1", "openai/gpt-4o-mini", "hi"),
            model_chat_line("p2", "openai/gpt-4o-mini", "hi"),
        ],
        "/v1/chat/completions",
    )
    .await;
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(20)).await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    assert_eq!(batch["model"], "openai/gpt-4o-mini");
    let (output, _) = app.results(KEY_A, &batch).await;
    assert!(
        output
            .iter()
            .all(|l| l["response"]["body"]["model"] == "gpt-4o-mini"),
        "{output:#?}"
    );
    assert_eq!(openai.stats().calls, 2);

    // Flavor: `:batch` goes to the provider declaring it, as the base model; the plain name to
    // the first provider serving it.
    let (status, _, flavored) = create(
        &app,
        KEY_A,
        &inline("glm-4.7:batch", "/v1/chat/completions"),
    )
    .await;
    assert_eq!(status, 200, "{flavored}");
    let (status, _, plain) = create(&app, KEY_A, &inline("glm-4.7", "/v1/chat/completions")).await;
    assert_eq!(status, 200, "{plain}");
    for (batch, expected_model) in [(&flavored, "glm-4.7"), (&plain, "glm-4.7")] {
        let done = app
            .wait_terminal(
                KEY_A,
                batch["id"].as_str().unwrap(),
                Duration::from_secs(20),
            )
            .await;
        assert_eq!(done["status"], "completed", "{done:#}");
        let (output, _) = app.results(KEY_A, &done).await;
        assert_eq!(output[0]["response"]["body"]["model"], expected_model);
    }
    assert_eq!(
        cheap.stats().calls,
        1,
        "only the flavored batch went to the batch provider"
    );
    assert_eq!(
        app.upstream_stats().calls,
        1,
        "the plain name went to the first provider"
    );
    // A prefix naming a provider that does not serve the rest is an unknown model.
    let got = create(
        &app,
        KEY_A,
        &inline("cheap/llama-3", "/v1/chat/completions"),
    )
    .await;
    assert_error(&got, 400, "model_not_found");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_model_is_a_validation_error_everywhere() {
    let app = spawn_app().await;
    let got = create(&app, KEY_A, &inline("gpt-nope", "/v1/chat/completions")).await;
    let error = assert_error(&got, 400, "model_not_found");
    assert_eq!(error["param"], "requests[0].body.model");
    assert!(
        error["message"].as_str().unwrap().contains("gpt-nope"),
        "{error}"
    );

    let got = create_jsonl(
        &app,
        Some(KEY_A),
        &[model_chat_line("a", "gpt-nope", "hi").to_string()],
    )
    .await;
    assert_error(&got, 400, "model_not_found");

    let id = file_batch(
        &app,
        &[model_chat_line("a", "gpt-nope", "hi")],
        "/v1/chat/completions",
    )
    .await;
    let (code, message) = failed_with(&app, &id).await;
    assert_eq!(code, "model_not_found");
    assert!(message.contains("gpt-nope"), "{message}");
    assert_eq!(app.upstream_stats().calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_without_batch_support_answers_501_not_implemented() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        let base = s.providers[0].base_url.clone();
        let mut realtime = provider("realtime", &base, &["rt-model"]);
        realtime.batch = false;
        s.providers.push(realtime);
    })
    .await;
    let got = create(&app, KEY_A, &inline("rt-model", "/v1/chat/completions")).await;
    let error = assert_error(&got, 501, "not_implemented");
    assert_eq!(error["type"], "server_error");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("does not support batch"),
        "{error}"
    );
    let got = create(
        &app,
        KEY_A,
        &inline("realtime/rt-model", "/v1/chat/completions"),
    )
    .await;
    assert_error(&got, 501, "not_implemented");
    let got = create_jsonl(
        &app,
        Some(KEY_A),
        &[model_chat_line("a", "rt-model", "hi").to_string()],
    )
    .await;
    assert_error(&got, 501, "not_implemented");

    // Known only asynchronously for an uploaded file: the batch fails with that code.
    let id = file_batch(
        &app,
        &[model_chat_line("a", "rt-model", "hi")],
        "/v1/chat/completions",
    )
    .await;
    let (code, _) = failed_with(&app, &id).await;
    assert_eq!(code, "not_implemented");
    assert_eq!(app.upstream_stats().calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endpoint_the_provider_does_not_support_is_refused() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        let base = s.providers[0].base_url.clone();
        let mut chat_only = provider("chat-only", &base, &["chat-model"]);
        chat_only.endpoints = vec!["/v1/chat/completions".into()];
        s.providers.push(chat_only);
    })
    .await;
    let got = create(&app, KEY_A, &inline("chat-model", "/v1/embeddings")).await;
    let error = assert_error(&got, 400, "unsupported_endpoint");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("/v1/embeddings"),
        "{error}"
    );

    let lines = [
        json!({"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"model": "chat-model", "input": "x"}}),
    ];
    let id = file_batch(&app, &lines, "/v1/embeddings").await;
    let (code, _) = failed_with(&app, &id).await;
    assert_eq!(code, "unsupported_endpoint");

    // The same model on its endpoint, and another provider's model on embeddings, both run.
    let (status, _, chat) =
        create(&app, KEY_A, &inline("chat-model", "/v1/chat/completions")).await;
    assert_eq!(status, 200, "{chat}");
    let (status, _, embed) = create(&app, KEY_A, &inline("mock-embed", "/v1/embeddings")).await;
    assert_eq!(status, 200, "{embed}");
    for batch in [chat, embed] {
        let done = app
            .wait_terminal(
                KEY_A,
                batch["id"].as_str().unwrap(),
                Duration::from_secs(20),
            )
            .await;
        assert_eq!(done["status"], "completed", "{done:#}");
        assert_eq!(done["request_counts"]["completed"], 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_provider_at_all_is_503() {
    let app = spawn_app_with(AppOptions::api_only(), |s| {
        s.providers.clear();
    })
    .await;
    let got = create(&app, KEY_A, &inline(MODEL, "/v1/chat/completions")).await;
    assert_error(&got, 503, "no_provider_configured");
    let got = create_jsonl(
        &app,
        Some(KEY_A),
        &[model_chat_line("a", MODEL, "hi").to_string()],
    )
    .await;
    assert_error(&got, 503, "no_provider_configured");
}
