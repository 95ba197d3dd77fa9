//! The dispatcher: on a batch's control message, validates every line of its input file, then
//! publishes its lines (`worker.lines_per_message` consecutive lines per message) with pipelined
//! publisher confirms and moves the batch to `in_progress`.
//!
//! Fairness: a batch has at most a window of lines in the work queue (dispatched, not finished)
//! at a time: `worker.batch_window` lines, or `worker.batch_window_secs` of the batch's own recent
//! throughput when that is more; on a rate-limited provider, the window the fleet-wide schedule
//! gives it (weights, deadlines, priority tiers: [`crate::pacing::schedule`]). The dispatcher
//! publishes one window, records it in `dispatched`, acks the control message and then tops the
//! window up every 200 ms as rows land, stamping `dispatch_alive_ms`; if it dies, the aggregator's
//! sweep sees the stamp go stale and publishes the dispatch again (it resumes from `dispatched`).
//! Another batch's lines thus queue behind at most one window of each running batch, never behind
//! 50,000 lines.
//!
//! Crash safety: the control message is acked only when every line is confirmed by the broker. A
//! dispatcher killed halfway leaves the message unacked, so another one picks it up and resumes
//! from the checkpoint `dispatched` (the lowest line not yet confirmed). Lines between the
//! checkpoint and the crash are published twice; the idempotent row write makes that harmless.
//!
//! The stage in three steps, each a module: [`control`] consumes the batch's control message and
//! runs dispatch rounds under the batch's lease, [`validate`] is pass one (every line checked, or
//! the batch fails), [`enqueue`] is pass two (one window of lines published with confirms).

pub(crate) mod control;
mod enqueue;
mod validate;
