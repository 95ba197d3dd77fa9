//! Test harness: starts Sluice's real roles against the real RabbitMQ and Redis, each test in its
//! own namespace (queue prefix and key prefix) and storage directory, with a mock upstream.
//!
//! Roles run as tasks in the test process by default; [`TestApp::spawn_worker_process`] starts a
//! worker as a separate `sluice` process for tests that kill it. Dropping a [`TestApp`] stops
//! every role and deletes what its namespace left in RabbitMQ, Redis and on disk, also when the
//! test fails.

mod app;
mod assertions;
mod lines;
pub mod lossy_proxy;
pub mod node;
mod process;
pub mod python;
pub mod rabbitmq_server;
mod raw_http;
pub mod redis_server;
mod requests;
pub mod s3_server;

pub use app::{AppOptions, StorageKind, TestApp, spawn_app, spawn_app_with, test_settings};
pub use assertions::{assert_exactly_once, list_ids};
pub use lines::{
    chat_line, chat_line_with_mock, chat_lines, custom_ids, jsonl, model_chat_line, req_ids,
};
pub use process::{KillOnDrop, send_signal, sluice_binary, spare_port};
pub use raw_http::RawAnswer;

/// API key of tenant A in every test app.
pub const KEY_A: &str = "sk-test-tenant-a-0123456789abcdef";
/// API key of tenant B in every test app.
pub const KEY_B: &str = "sk-test-tenant-b-0123456789abcdef";
/// The model the mock provider serves.
pub const MODEL: &str = "mock-model";

/// Every field of the OpenAI Batch object, present as a key even when null.
pub const BATCH_FIELDS: [&str; 22] = [
    "id",
    "object",
    "endpoint",
    "model",
    "errors",
    "input_file_id",
    "completion_window",
    "status",
    "output_file_id",
    "error_file_id",
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "request_counts",
    "usage",
    "metadata",
];
