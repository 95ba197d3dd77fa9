use super::answers::base64_encode;
use super::*;

struct Harness {
    mock: MockUpstream,
    base: String,
    client: reqwest::Client,
    shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(config: MockConfig) -> Harness {
    let mock = MockUpstream::new(config);
    let shutdown = CancellationToken::new();
    let base = mock.clone().spawn(shutdown.clone()).await.unwrap();
    let client = reqwest::Client::builder()
        // The mock's redirects must be observable, not followed.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    Harness {
        mock,
        base,
        client,
        shutdown,
    }
}

impl Harness {
    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap()
    }
}

fn chat_body(key: &str, mock: Value) -> Value {
    let mut mock = mock;
    mock["key"] = json!(key);
    json!({
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there world"},
        ],
        "mock": mock,
    })
}

#[tokio::test]
async fn chat_completion_has_openai_shape() {
    let h = start(MockConfig::default()).await;
    let res = h
        .post("/chat/completions", &chat_body("a", json!({})))
        .await;
    assert_eq!(res.status(), 200);
    let rid = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(rid.starts_with("req_") && rid.len() == 36, "{rid}");
    let v: Value = res.json().await.unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "gpt-test");
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "echo: hello there world");
    // 2 system words + 3 user words; answer is 4 words.
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
    );
}

#[tokio::test]
async fn echo_is_truncated_to_200_chars() {
    let h = start(MockConfig::default()).await;
    let long = "é".repeat(500);
    let body = json!({"model": "m", "messages": [{"role": "user", "content": long}]});
    let v: Value = h
        .post("/chat/completions", &body)
        .await
        .json()
        .await
        .unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.chars().count(), "echo: ".len() + 200);
}

#[tokio::test]
async fn status_times_then_success_with_retry_headers_and_stats() {
    let h = start(MockConfig::default()).await;
    let body = chat_body(
        "line-1",
        json!({"status": 503, "times": 2, "retry_after": 3, "retry_after_ms": 1500}),
    );
    let mut statuses = Vec::new();
    for attempt in 1..=3u64 {
        let res = h.post("/chat/completions", &body).await;
        statuses.push(res.status().as_u16());
        assert_eq!(
            res.headers()["x-mock-attempt"],
            attempt.to_string().as_str()
        );
        assert!(res.headers().contains_key("x-request-id"));
        if res.status() == 503 {
            assert_eq!(res.headers()[header::RETRY_AFTER], "3");
            assert_eq!(res.headers()["retry-after-ms"], "1500");
            let v: Value = res.json().await.unwrap();
            assert_eq!(v["error"]["type"], "server_error");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("overloaded")
            );
            assert_eq!(v["error"]["param"], Value::Null);
        } else {
            assert!(!res.headers().contains_key(header::RETRY_AFTER));
        }
    }
    assert_eq!(statuses, [503, 503, 200]);

    // Another line and a key-less call are independent of line-1.
    let other = h
        .post("/chat/completions", &chat_body("line-2", json!({})))
        .await;
    assert_eq!(other.status(), 200);
    let keyless = h.post("/embeddings", &json!({"input": "x"})).await;
    assert_eq!(keyless.status(), 200);

    let stats = h.mock.stats();
    assert_eq!(stats.calls, 5);
    assert_eq!(stats.per_key.len(), 2);
    let times = &stats.per_key["line-1"];
    assert_eq!(times.len(), 3);
    assert!(times.windows(2).all(|w| w[0] <= w[1]));
    assert!(times[0] > 1_600_000_000_000);
    assert_eq!(stats.per_key["line-2"].len(), 1);

    // Same snapshot over HTTP, then reset clears it and the attempt counters.
    let remote: MockStats = h
        .client
        .get(h.base.replace("/v1", "/mock/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(remote.calls, 5);
    assert_eq!(remote.per_key["line-1"], stats.per_key["line-1"]);
    let res = h
        .client
        .post(h.base.replace("/v1", "/mock/reset"))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
    assert_eq!(h.mock.stats().calls, 0);
    assert!(h.mock.stats().per_key.is_empty());
    let again = h.post("/chat/completions", &body).await;
    assert_eq!(again.status(), 503, "reset restarts the attempt count");
}

#[tokio::test]
async fn status_without_times_always_fails_and_429_has_rate_limit_code() {
    let h = start(MockConfig::default()).await;
    let body = chat_body("k", json!({"status": 429}));
    for _ in 0..3 {
        let res = h.post("/chat/completions", &body).await;
        assert_eq!(res.status(), 429);
        assert!(!res.headers().contains_key(header::RETRY_AFTER));
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    }
    let res = h
        .post(
            "/chat/completions",
            &chat_body("k400", json!({"status": 400})),
        )
        .await;
    assert_eq!(res.status(), 400);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn embeddings_accept_array_input_and_are_deterministic() {
    let h = start(MockConfig::default()).await;
    let body = json!({"model": "emb", "input": ["alpha beta", "gamma", "alpha beta"]});
    let v: Value = h.post("/embeddings", &body).await.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "emb");
    assert_eq!(v["usage"], json!({"prompt_tokens": 5, "total_tokens": 5}));
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        let e = d["embedding"].as_array().unwrap();
        assert_eq!(e.len(), 8);
        let norm: f64 = e.iter().map(|x| x.as_f64().unwrap().powi(2)).sum();
        assert!((norm - 1.0).abs() < 1e-9);
    }
    assert_eq!(data[0]["embedding"], data[2]["embedding"]);
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);

    let single: Value = h
        .post("/embeddings", &json!({"input": "gamma"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(single["data"].as_array().unwrap().len(), 1);
    assert_eq!(single["data"][0]["embedding"], data[1]["embedding"]);
    assert_eq!(single["model"], MOCK_MODEL);

    let b64: Value = h
        .post(
            "/embeddings",
            &json!({"input": "gamma", "encoding_format": "base64", "dimensions": 4}),
        )
        .await
        .json()
        .await
        .unwrap();
    // 4 f32 = 16 bytes = 24 base64 chars.
    assert_eq!(b64["data"][0]["embedding"].as_str().unwrap().len(), 24);
}

#[tokio::test]
async fn other_endpoints_have_their_shapes() {
    let h = start(MockConfig::default()).await;

    let v: Value = h
        .post("/completions", &json!({"model": "m", "prompt": "say hi"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "echo: say hi");
    assert_eq!(v["usage"]["total_tokens"], 5);

    let v: Value = h
        .post("/responses", &json!({"model": "m", "input": "one two"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["output"][0]["content"][0]["text"], "echo: one two");
    assert_eq!(
        v["usage"],
        json!({"input_tokens": 2, "output_tokens": 3, "total_tokens": 5})
    );

    let v: Value = h
        .post("/moderations", &json!({"input": ["a", "b"]}))
        .await
        .json()
        .await
        .unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["flagged"], false);

    let v: Value = h
        .client
        .get(format!("{}/models", h.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["id"], MOCK_MODEL);

    let res = h.post("/nope", &json!({})).await;
    assert_eq!(res.status(), 404);
    assert!(res.headers().contains_key("x-request-id"));
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn non_json_body_is_a_400_envelope_and_still_counted() {
    let h = start(MockConfig::default()).await;
    let res = h
        .client
        .post(format!("{}/chat/completions", h.base))
        .body("not json {")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert!(res.headers().contains_key("x-request-id"));
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["param"], Value::Null);
    assert_eq!(v["error"]["code"], Value::Null);
    assert!(v["error"]["message"].is_string());
    assert_eq!(h.mock.stats().calls, 1);
}

#[tokio::test]
async fn garbage_and_redirect() {
    let h = start(MockConfig::default()).await;
    let res = h
        .post(
            "/chat/completions",
            &chat_body("g", json!({"garbage": true, "times": 1})),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "text/html");
    assert_eq!(res.text().await.unwrap(), "<html>oops</html>");
    // `times` bounds garbage too.
    let res = h
        .post(
            "/chat/completions",
            &chat_body("g", json!({"garbage": true, "times": 1})),
        )
        .await;
    assert!(res.json::<Value>().await.is_ok());

    let res = h
        .post(
            "/chat/completions",
            &chat_body("r", json!({"redirect": true})),
        )
        .await;
    assert_eq!(res.status(), 302);
    assert_eq!(res.headers()[header::LOCATION], REDIRECT_TARGET);
}

#[tokio::test]
async fn delay_and_hang() {
    let h = start(MockConfig::default()).await;
    let started = std::time::Instant::now();
    let res = h
        .post(
            "/chat/completions",
            &chat_body("d", json!({"delay_ms": 150})),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(150));

    let err = h
        .client
        .post(format!("{}/chat/completions", h.base))
        .json(&chat_body("h", json!({"hang": true})))
        .timeout(Duration::from_millis(200))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    // Arrival was recorded even though no answer ever came.
    assert_eq!(h.mock.stats().per_key["h"].len(), 1);
}

#[tokio::test]
async fn shutdown_interrupts_a_hanging_request() {
    let mock = MockUpstream::new(MockConfig::default());
    let shutdown = CancellationToken::new();
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let url = format!(
        "http://{}/v1/chat/completions",
        listener.local_addr().unwrap()
    );
    let server = tokio::spawn(mock.clone().serve(listener, shutdown.clone()));
    let request = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&json!({"mock": {"hang": true}}))
            .send()
            .await
    });
    // Wait until the request has arrived before cancelling.
    while mock.stats().calls == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shutdown.cancel();
    let served = tokio::time::timeout(Duration::from_secs(5), server).await;
    served.expect("serve returns promptly").unwrap().unwrap();
    let res = request.await.unwrap().unwrap();
    assert_eq!(res.status(), 503);
}

#[tokio::test]
async fn global_failures_are_seeded_and_carry_retry_after() {
    let config = MockConfig {
        fail_rate: 1.0,
        fail_status: 429,
        retry_after_secs: Some(7),
        ..MockConfig::default()
    };
    let h = start(config).await;
    let res = h
        .post("/chat/completions", &chat_body("x", json!({})))
        .await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()[header::RETRY_AFTER], "7");

    // Default fail_status is 500; a half rate with a fixed seed gives the
    // same sequence on every run and after a reset.
    let config = MockConfig {
        fail_rate: 0.5,
        seed: 42,
        latency_ms: 1,
        jitter_ms: 3,
        ..MockConfig::default()
    };
    let h = start(config).await;
    let mut run = Vec::new();
    for _ in 0..20 {
        run.push(
            h.post("/embeddings", &json!({"input": "x"}))
                .await
                .status()
                .as_u16(),
        );
    }
    assert!(run.iter().all(|s| *s == 200 || *s == 500));
    assert!(run.contains(&200) && run.contains(&500), "{run:?}");
    h.mock.reset();
    let mut again = Vec::new();
    for _ in 0..20 {
        again.push(
            h.post("/embeddings", &json!({"input": "x"}))
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(run, again);
}

#[test]
fn config_deserializes_with_defaults() {
    let c: MockConfig = serde_json::from_value(json!({"latency_ms": 5})).unwrap();
    assert_eq!(c.latency_ms, 5);
    assert_eq!(c.fail_status, 0);
    assert_eq!(c.retry_after_secs, None);
}

#[test]
fn base64_matches_reference_vectors() {
    assert_eq!(base64_encode(b""), "");
    assert_eq!(base64_encode(b"f"), "Zg==");
    assert_eq!(base64_encode(b"fo"), "Zm8=");
    assert_eq!(base64_encode(b"foo"), "Zm9v");
    assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
}
