//! The HTTP calls tests make to a [`TestApp`]'s API, and the waits built on them.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{TestApp, jsonl};

impl TestApp {
    /// A request builder with `key` as bearer token.
    pub fn req(&self, method: reqwest::Method, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key)
    }

    /// Uploads `content` as `filename` with purpose batch; returns the response.
    pub async fn upload_raw(
        &self,
        key: &str,
        filename: &str,
        content: Vec<u8>,
    ) -> reqwest::Response {
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part(
                "file",
                reqwest::multipart::Part::bytes(content).file_name(filename.to_owned()),
            );
        self.req(reqwest::Method::POST, "/files", key)
            .multipart(form)
            .send()
            .await
            .expect("upload request")
    }

    /// Uploads a JSONL file and returns its id.
    pub async fn upload(&self, key: &str, content: Vec<u8>) -> String {
        let resp = self.upload_raw(key, "input.jsonl", content).await;
        let status = resp.status();
        let body: Value = resp.json().await.expect("upload answer is JSON");
        assert_eq!(status, 200, "upload failed: {body}");
        body["id"].as_str().expect("file id").to_owned()
    }

    /// Creates a batch; returns (status, body).
    pub async fn create_batch_raw(&self, key: &str, body: Value) -> (u16, Value) {
        let resp = self
            .req(reqwest::Method::POST, "/batches", key)
            .json(&body)
            .send()
            .await
            .expect("create");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("create answer is JSON"))
    }

    /// Creates a chat-completions batch over `file_id` with a 24h window; returns the batch id.
    pub async fn create_batch(&self, key: &str, file_id: &str) -> String {
        self.create_batch_window(key, file_id, "24h").await
    }

    /// Creates a chat-completions batch with the given completion window.
    pub async fn create_batch_window(&self, key: &str, file_id: &str, window: &str) -> String {
        let (status, body) = self
            .create_batch_raw(
                key,
                json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": window}),
            )
            .await;
        assert_eq!(status, 200, "create failed: {body}");
        assert_eq!(body["status"], "validating");
        body["id"].as_str().expect("batch id").to_owned()
    }

    /// Uploads `lines` and creates a batch over them.
    pub async fn submit(&self, key: &str, lines: &[Value]) -> String {
        let file = self.upload(key, jsonl(lines)).await;
        self.create_batch(key, &file).await
    }

    /// The batch object as `key` sees it; (status, body).
    pub async fn get_batch_raw(&self, key: &str, id: &str) -> (u16, Value) {
        let resp = self
            .req(reqwest::Method::GET, &format!("/batches/{id}"), key)
            .send()
            .await
            .expect("get");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("JSON"))
    }

    /// `GET {path}` (under `/v1`) as `key`, answered with JSON.
    pub async fn get_json(&self, key: &str, path: &str) -> Value {
        self.req(reqwest::Method::GET, path, key)
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("a JSON answer")
    }

    /// The batch object as `key` sees it; panics unless it is found.
    pub async fn get_batch(&self, key: &str, id: &str) -> Value {
        let (status, body) = self.get_batch_raw(key, id).await;
        assert_eq!(status, 200, "get batch: {body}");
        body
    }

    /// Polls until the batch reaches a terminal status (or `timeout`), returning it.
    pub async fn wait_terminal(&self, key: &str, id: &str, timeout: Duration) -> Value {
        self.wait_for(key, id, timeout, |b| {
            matches!(
                b["status"].as_str(),
                Some("completed" | "failed" | "expired" | "cancelled")
            )
        })
        .await
    }

    /// Waits (up to a minute) until batch `id` has at least `n` finished lines, reading Redis
    /// directly rather than through the API, which a dependency outage may be failing.
    pub async fn wait_done(&self, id: &str, n: u64) {
        let start = Instant::now();
        loop {
            let meta = self
                .store
                .get_batch(id)
                .await
                .expect("redis")
                .expect("batch");
            if meta.done() >= n {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "{meta:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until `done(batch)` holds; panics with the last state after `timeout`.
    pub async fn wait_for(
        &self,
        key: &str,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            let b = self.get_batch(key, id).await;
            if done(&b) {
                return b;
            }
            assert!(
                start.elapsed() < timeout,
                "batch {id} did not get there in {timeout:?}: {b:#}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The content of a file as `key` sees it.
    pub async fn file_content(&self, key: &str, file_id: &str) -> String {
        let resp = self
            .req(
                reqwest::Method::GET,
                &format!("/files/{file_id}/content"),
                key,
            )
            .send()
            .await
            .expect("content");
        assert_eq!(resp.status(), 200);
        resp.text().await.expect("text")
    }

    /// The lines of a batch's output and error files, parsed (empty when a file is null).
    pub async fn results(&self, key: &str, batch: &Value) -> (Vec<Value>, Vec<Value>) {
        let mut files = Vec::new();
        for field in ["output_file_id", "error_file_id"] {
            let lines = match batch[field].as_str() {
                Some(id) => self
                    .file_content(key, id)
                    .await
                    .lines()
                    .map(|l| serde_json::from_str(l).expect("result line is JSON"))
                    .collect(),
                None => Vec::new(),
            };
            files.push(lines);
        }
        let errors = files.pop().unwrap_or_default();
        let output = files.pop().unwrap_or_default();
        (output, errors)
    }
}
