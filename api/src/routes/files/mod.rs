//! The Files API: upload, list, retrieve, delete and download batch input and result files.
//!
//! Uploads stream part by part to object storage, so an API replica's memory does not grow with the
//! file size (at most a few multipart chunks are buffered per upload).

pub(crate) mod content;
pub(crate) mod delete;
pub(crate) mod list;
pub(crate) mod lookup;
mod part_headers;
pub(crate) mod retrieve;
mod sniff;
pub(crate) mod upload;
