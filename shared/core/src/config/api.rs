//! `[api]` (the HTTP server: addresses, timeouts, connection and page limits) and `[limits]` (what
//! one request or batch may hold), with their defaults.

use std::net::SocketAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `[api]`: the HTTP server's addresses, timeouts, connection limits and result pages.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// Address (`host:port`) of the public HTTP API.
    pub listen: SocketAddr,
    /// Address (`host:port`) of `/metrics`, `/livez` and `/readyz` for every role.
    pub metrics_listen: SocketAddr,
    /// How long a client may take to send a request's headers, and how long an idle keep-alive
    /// connection is kept waiting for its next request (ms); the connection is closed after it.
    pub header_read_timeout_ms: u64,
    /// Longest pause while a request body is being received (ms): an upload that sends nothing
    /// for this long is dropped with 408 `request_body_timeout` and its partial object removed.
    pub body_idle_timeout_ms: u64,
    /// Deadline of every request that is not a streaming upload, up to its response headers
    /// (ms); 503 `request_timeout` past it. Downloads stream their body past it.
    pub request_timeout_ms: u64,
    /// Connections one API process serves at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Streaming uploads (`POST /v1/files`, large or chunked `POST /v1/batches`) one tenant may
    /// have in flight at once on one API process; one more gets 429 `too_many_uploads`.
    pub max_uploads_per_tenant: usize,
    /// Serve the web console at `/console` (static assets; every data call still needs a key).
    pub console: bool,
    /// Rows `GET /v1/batches/{id}/results` returns when the request gives no `limit`.
    pub results_default_limit: u64,
    /// Largest `limit` `GET /v1/batches/{id}/results` accepts (400 past it).
    pub results_max_limit: u64,
    #[schemars(extend("x-advanced" = "bounds the API's memory per results page"))]
    /// A `/results` page ends early once it holds this many bytes (the next cursor says where to
    /// go on), so a page of large rows stays bounded in memory.
    pub results_page_bytes: u64,
    /// Host names (`Host` header, port ignored, e.g. `"localhost"`, `"127.0.0.1"`, `"[::1]"`)
    /// the API answers; any other gets 403 `host_not_allowed`. Empty (the default) answers any
    /// host. `sluice all --demo` sets the loopback names while its fixed key is active, so a web
    /// page cannot reach the demo by DNS rebinding.
    pub allowed_hosts: Vec<String>,
}

/// `[limits]`: what one request, upload or batch may hold, and the admission rules of a create.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted upload, in bytes (413 above it).
    pub max_upload_bytes: u64,
    /// Most request lines in one batch.
    pub max_lines: u64,
    /// Longest accepted input line, in bytes (at most `max_upload_bytes`).
    pub max_line_bytes: u64,
    /// Shortest accepted `completion_window`, e.g. `"60s"`.
    pub min_completion_window: String,
    /// Longest accepted `completion_window`, e.g. `"7d"`.
    pub max_completion_window: String,
    /// Largest upstream response body kept for one line, in bytes.
    pub max_response_bytes: u64,
    /// Batches one tenant may have not yet terminal; one more is refused with 429.
    pub max_open_batches: u64,
    /// Retries (`POST /v1/batches/{id}/retry`) one batch may have: its `retries` list holds at
    /// most this many children; one more is refused with 409.
    pub max_retries_per_batch: u64,
    /// `"off"`, or `"strict"`: a create whose batch cannot finish within its completion window
    /// on its rate-limited provider, given the work due no later, is refused with 429
    /// `insufficient_capacity`.
    pub admission: String,
    /// Most line errors listed in a failed batch's `errors.data` (and a create's `error.errors`);
    /// one more entry (`too_many_errors`) says how many lines were bad in all.
    pub max_reported_errors: u64,
    /// Longest message of one line error, in bytes (echoed client text is cut to fit).
    pub max_error_message_bytes: u64,
    /// Most bytes of messages listed in `errors.data` altogether: listing stops at whichever of
    /// this and `max_reported_errors` comes first (the rest are counted).
    pub max_reported_error_bytes: u64,
    /// Largest `POST /v1/batches` JSON body of the `input_file_id` form (413 above it).
    pub max_json_body_bytes: u64,
    /// Largest `POST /v1/batches` body of the inline `requests` form, streamed (413 above it).
    pub max_inline_body_bytes: u64,
    /// Largest `POST /v1/batches` JSONL body, streamed (413 above it).
    pub max_jsonl_body_bytes: u64,
    /// Longest `custom_id`, in characters.
    pub max_custom_id_chars: u64,
    /// Longest object id a client may send (`input_file_id`, ids in paths, `after`), in characters.
    pub max_id_chars: u64,
    /// Longest upload filename, in characters.
    pub max_filename_chars: u64,
    #[schemars(extend("x-advanced" = "hardening of the form parser; the default fits every client"))]
    /// Most parts in one `POST /v1/files` form.
    pub max_multipart_parts: u64,
    #[schemars(extend("x-advanced" = "hardening of the form parser; the default fits every client"))]
    /// Largest header block of one part of a `POST /v1/files` form, in bytes.
    pub max_part_header_bytes: u64,
    /// Whether every line of a batch must name the same model (OpenAI's rule). `false` lets the
    /// lines of one batch name different models, each routed and paced by its own provider;
    /// `tenants[].one_model_per_batch` overrides it per tenant.
    pub one_model_per_batch: bool,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            listen: ([0, 0, 0, 0], 8080).into(),
            metrics_listen: ([0, 0, 0, 0], 9090).into(),
            // Above the 60 s idle timeout of common load balancers and ingresses, which must
            // close a pooled connection before the API does.
            header_read_timeout_ms: 65_000,
            body_idle_timeout_ms: 30_000,
            request_timeout_ms: 30_000,
            max_connections: 1_024,
            max_uploads_per_tenant: 4,
            console: true,
            results_default_limit: 100,
            results_max_limit: 1_000,
            results_page_bytes: 16 * 1024 * 1024,
            allowed_hosts: Vec::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_upload_bytes: 200 * 1024 * 1024,
            max_lines: 50_000,
            max_line_bytes: 4 * 1024 * 1024,
            min_completion_window: "60s".into(),
            max_completion_window: "7d".into(),
            max_response_bytes: 16 * 1024 * 1024,
            max_open_batches: 10,
            max_retries_per_batch: 20,
            admission: "off".into(),
            max_reported_errors: 1_000,
            max_error_message_bytes: 1_024,
            max_reported_error_bytes: 256 * 1024,
            max_json_body_bytes: 1024 * 1024,
            max_inline_body_bytes: 200 * 1024 * 1024,
            max_jsonl_body_bytes: 200 * 1024 * 1024,
            max_custom_id_chars: 512,
            max_id_chars: 128,
            max_filename_chars: 255,
            max_multipart_parts: 16,
            max_part_header_bytes: 16 * 1024,
            one_model_per_batch: true,
        }
    }
}
