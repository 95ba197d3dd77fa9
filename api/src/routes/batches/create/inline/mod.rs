//! Inline batches: `POST /v1/batches` with `requests: [{custom_id, body}]` and no upload step.
//!
//! The model is resolved from `body.model` across all requests at once: requests naming different
//! models are refused (400 `model_mismatch`) unless the tenant may mix models
//! (`one_model_per_batch = false`: each model is then checked per request, as in a file), a model
//! nothing serves is 400 `model_not_found`, a provider without batch support 501
//! `not_implemented`, and no provider at all 503. The requests
//! then become a stored input file (`inline-requests.jsonl`, purpose `batch`, lines
//! `{custom_id, method: "POST", url: endpoint, body}`) and the batch is created exactly like a file
//! batch, so list, get, cancel and the result files behave the same.
//!
//! A body within `limits.max_json_body_bytes` is parsed whole ([`whole`]); a larger one is parsed
//! as a stream, one request at a time ([`streamed`], [`stream_parse`]). Both turn each request
//! into an input line the same way ([`request_line`]).

mod request_line;
mod stream_parse;
pub(super) mod streamed;
pub(super) mod whole;
