//! This process's side of pacing and scheduling: what it keeps locally so the fleet-wide limiter
//! and schedule in Redis ([`sluice_store::pacing`], [`sluice_store::schedule`]) cost few round
//! trips.
//!
//! - [`local_pace`]: spacing this process's single asks at the fleet rate.
//! - [`reservations`]: lines to a rate-paced provider asking for their starts together.
//! - [`pace_reports`]: successes of paced calls, reported summed.
//! - [`fleet_view`]: this process's copy of its unpaced providers' fleet pause and breaker.
//! - [`schedule`]: the window a dispatch round of a batch gets (the dispatcher's side).
//!
//! The line worker (`crate::lines`) consults the first four around each call; the dispatcher
//! (`crate::dispatch`) consults the schedule. Nothing here calls back into either stage.

pub(crate) mod fleet_view;
pub(crate) mod local_pace;
pub(crate) mod pace_reports;
pub(crate) mod reservations;
pub(crate) mod schedule;
