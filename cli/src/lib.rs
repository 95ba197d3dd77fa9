#![warn(missing_docs, unreachable_pub)]
//! The `sluice` binary's library: role start-up, the client subcommands, and the mock upstream that the demo, the tests and
//! the benchmarks use. The production roles live in `sluice-api` and `sluice-worker`, which depend
//! only on the crates under `shared/`; this crate is the one place that composes them.

pub mod client;
pub mod demo;
pub mod mock_tasks;
pub mod mock_upstream;
pub mod roles;
pub mod services;
