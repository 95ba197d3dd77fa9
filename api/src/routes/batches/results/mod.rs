//! Reading a batch's results: the finished rows so far, a page at a time ([`rows`]), and, once
//! the batch is finished, one line per input item ([`output`]).

pub(crate) mod output;
pub(crate) mod rows;
