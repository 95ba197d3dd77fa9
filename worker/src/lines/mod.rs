//! The line worker: calls the upstream for each line of a work-queue message and records its row.
//!
//! Invariants:
//! - a message is acked only after every one of its lines has its row written (or needs no row
//!   from us: a duplicate, a line handed to a delay queue with a confirmed publish, or a batch
//!   that is stopping, whose missing rows the aggregator fills);
//! - a crash before the ack means redelivery; the row script makes a second write a no-op, and a
//!   redelivered message of several lines is split into single-line messages, so a line that
//!   kills its worker reaches the delivery limit alone and its neighbours are not held with it;
//! - no upstream call starts unless `begin_call` just saw the batch running (cancel and expiry are
//!   honoured before every attempt, retries included; a line that waited long for a call slot
//!   asks again).
//!
//! A message's lines run concurrently, each holding one of the worker's `concurrency` call slots;
//! rows that finish together are written with one script call.
//!
//! The modules, in the order a line meets them:
//! - [`consumer`] takes and acks the messages ([`delivery`]: acking and splitting them) and looks
//!   each batch up once ([`batch_info`]);
//! - [`line`](mod@line) runs one line through its steps: the call gate again after a wait
//!   ([`gate`], asked together by batch in [`gate_checks`]), the tenant's budget ([`budget`]), the
//!   fleet limiter ([`fleet`]), the call and its retry; a line that must wait goes to a delay
//!   queue ([`requeue`]);
//! - [`rows`] writes the rows of lines that finished together;
//! - [`dead_letters`] gives a line that reached the delivery limit its error row.
//!
//! The budget and the fleet limiter decide (go, wait this long, refuse) and return their decision;
//! [`line`](mod@line) acts on it, so neither calls back into the step that called it.

mod batch_info;
mod budget;
pub(crate) mod consumer;
pub(crate) mod dead_letters;
mod delivery;
mod fleet;
mod gate;
pub(crate) mod gate_checks;
mod line;
mod requeue;
pub(crate) mod rows;
