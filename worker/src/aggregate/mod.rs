//! The end of the pipeline: rows into result files and terminal statuses, and the sweeps that keep
//! Redis and storage bounded.
//!
//! - `aggregator`: the finalize-event consumer and the sweep that expires batches, recovers lost
//!   events and dead dispatchers, and writes the output and error files.
//! - [`compaction`]: a running batch's finished rows moved out of Redis into segment objects.
//! - `lifecycle`: expired files and batch records past their retention, deleted. It sits here,
//!   not with the other background tasks, because the aggregator's sweep runs it and it deletes a
//!   batch's segments through [`compaction`].

pub(crate) mod aggregator;
pub mod compaction;
pub(crate) mod lifecycle;
