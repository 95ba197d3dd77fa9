//! Calling an upstream for one line.
//!
//! - `client`: the HTTP client for the configured providers, and the classifying of an answer
//!   into a row or a retry.
//! - `retry`: the one retry policy, and the delays upstreams ask for.
//! - [`tasks`]: the task models (`extract`, `summarize`, `classify`), run through a backing model.
//! - `call`: one attempt at one line, through a provider's model or a task model.

pub(crate) mod call;
pub(crate) mod client;
mod retry;
pub mod tasks;

pub(crate) use client::{Attempt, Upstream, estimate_tokens};
pub use retry::{NextStep, RetryPolicy, ratelimit_pause, retry_after};
