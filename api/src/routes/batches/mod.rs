//! The Batches API: create (from an uploaded file, inline requests or a JSONL body), list,
//! retrieve, cancel, retry, and read the results.
//!
//! Creating a batch over an uploaded file checks only parameters: whether the input file exists
//! and its lines are valid is decided asynchronously by the dispatcher (the batch then becomes
//! `failed`), as OpenAI does, so that create costs two Redis writes and one publish whatever the
//! file size. Every create takes an open-batch [`reservation`] first and ends in [`record`].

pub(crate) mod admission;
mod announce;
pub(crate) mod cancel;
pub(crate) mod create;
mod dialect;
pub(crate) mod list;
pub(crate) mod lookup;
pub(crate) mod params;
pub(crate) mod record;
pub(crate) mod reservation;
pub(crate) mod results;
pub(crate) mod retrieve;
pub(crate) mod retry;
