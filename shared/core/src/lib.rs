//! The pure domain of Sluice: what a batch, a line and a row are, and every decision that needs
//! no I/O. The other crates bring the data; this one says what it means.
//!
//! - [`config`]: typed, layered settings (defaults → TOML → `SLUICE_…` env) and their checks.
//! - [`keys`]: every Redis key and queue name, under a namespace.
//! - [`domain`]: batch and file objects, statuses and their transition table, rows and queue messages.
//! - [`lines`], [`validate`]: one input line, and checking every line before anything is enqueued
//!   (the API checks inline bodies with the same code).
//! - [`routing`]: which provider runs a model (prefixes, flavors, task models).
//! - [`task_body`]: the request body a task model sends to its backing model.
//! - [`webhooks`]: batch events for webhooks, their ids and Standard Webhooks signing.
//! - [`segments`]: the format of rows compacted out of Redis.
//! - [`connect`]: why a dependency could not be reached, and URLs made safe for logs.

#![warn(missing_docs, unreachable_pub)]

pub mod config;
pub mod connect;
pub mod domain;
pub mod keys;
pub mod lines;
pub mod pacing;
pub mod routing;
pub mod schedule;
pub mod segments;
pub mod task_body;
pub mod validate;
pub mod webhooks;

pub use config::Settings;
pub use keys::Keys;
