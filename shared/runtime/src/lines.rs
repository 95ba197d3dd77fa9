//! Reading an input file line by line from object storage, without holding the file in memory.
//!
//! The dispatcher and the aggregator both number request lines through [`RequestLines`], so a
//! line index means the same line everywhere: blank lines are skipped and not counted, and errors
//! report the physical (1-based) line of the file.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::{ObjectStore, path::Path};
use sluice_core::lines::RequestLine;

/// Streams the request lines of a stored file.
pub struct RequestLines {
    chunks: BoxStream<'static, object_store::Result<Bytes>>,
    buf: BytesMut,
    /// Bytes of `buf` already known to hold no newline, so each byte is scanned once.
    scanned: usize,
    max_line: usize,
    discarding: bool,
    done: bool,
    number: u64,
    index: u64,
}

impl std::fmt::Debug for RequestLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestLines")
            .field("number", &self.number)
            .finish()
    }
}

impl RequestLines {
    /// Opens `path`; lines longer than `max_line` bytes are reported as `too_long`.
    pub async fn open(
        store: &Arc<dyn ObjectStore>,
        path: &Path,
        max_line: usize,
    ) -> object_store::Result<Self> {
        // Ranged reads: a dispatcher keeps its reader between rounds, longer than one request
        // to the store may stay open.
        let (_, chunks) = crate::storage::read_chunked(store, path).await?;
        Ok(Self::from_stream(chunks, max_line))
    }

    /// Reads lines from any stream of chunks.
    pub fn from_stream(
        chunks: BoxStream<'static, object_store::Result<Bytes>>,
        max_line: usize,
    ) -> Self {
        Self {
            chunks,
            buf: BytesMut::new(),
            scanned: 0,
            max_line,
            discarding: false,
            done: false,
            number: 0,
            index: 0,
        }
    }

    /// Index the next request line will have.
    pub fn next_index(&self) -> u64 {
        self.index
    }

    /// The next request line, `None` at the end of the file.
    pub async fn next_line(&mut self) -> object_store::Result<Option<RequestLine>> {
        loop {
            if let Some(found) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
                let pos = self.scanned + found;
                self.scanned = 0;
                let raw = self.buf.split_to(pos + 1).freeze();
                let too_long = std::mem::take(&mut self.discarding) || pos > self.max_line;
                if let Some(line) = self.emit(raw.slice(..pos), too_long) {
                    return Ok(Some(line));
                }
                continue;
            }
            if self.buf.len() > self.max_line {
                // Keep memory bounded: drop the bytes of an over-long line and remember it was one.
                self.discarding = true;
                self.buf.clear();
            }
            self.scanned = self.buf.len();
            if self.done {
                if self.buf.is_empty() && !self.discarding {
                    return Ok(None);
                }
                let raw = self.buf.split().freeze();
                self.scanned = 0;
                let too_long = std::mem::take(&mut self.discarding) || raw.len() > self.max_line;
                if let Some(line) = self.emit(raw, too_long) {
                    return Ok(Some(line));
                }
                return Ok(None);
            }
            match self.chunks.next().await {
                Some(chunk) => self.buf.extend_from_slice(&chunk?),
                None => self.done = true,
            }
        }
    }

    fn emit(&mut self, mut bytes: Bytes, too_long: bool) -> Option<RequestLine> {
        self.number += 1;
        if bytes.last() == Some(&b'\r') {
            bytes.truncate(bytes.len() - 1);
        }
        if !too_long && bytes.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        let index = self.index;
        self.index += 1;
        Some(RequestLine {
            index,
            number: self.number,
            bytes: if too_long { Bytes::new() } else { bytes },
            too_long,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(chunks: &[&'static str], max: usize) -> RequestLines {
        let items: Vec<object_store::Result<Bytes>> = chunks
            .iter()
            .map(|c| Ok(Bytes::from_static(c.as_bytes())))
            .collect();
        RequestLines::from_stream(futures::stream::iter(items).boxed(), max)
    }

    async fn collect(mut r: RequestLines) -> Vec<(u64, u64, String, bool)> {
        let mut out = Vec::new();
        while let Some(l) = r.next_line().await.unwrap() {
            out.push((
                l.index,
                l.number,
                String::from_utf8(l.bytes.to_vec()).unwrap(),
                l.too_long,
            ));
        }
        out
    }

    #[tokio::test]
    async fn lines_split_across_chunks_with_blank_lines_and_crlf() {
        let got = collect(reader(&["{\"a\":", "1}\r\n\n  \n{\"b\"", ":2}"], 100)).await;
        assert_eq!(
            got,
            vec![
                (0, 1, "{\"a\":1}".into(), false),
                (1, 4, "{\"b\":2}".into(), false)
            ]
        );
    }

    #[tokio::test]
    async fn over_long_lines_are_flagged_and_numbering_continues() {
        let got = collect(reader(
            &["0123456789", "0123456789\n{}\n", "xxxxxxxxxxxxxxxxxxxxxxxx"],
            12,
        ))
        .await;
        assert_eq!(
            got,
            vec![
                (0, 1, "".into(), true),
                (1, 2, "{}".into(), false),
                (2, 3, "".into(), true)
            ]
        );
    }

    #[tokio::test]
    async fn empty_input_has_no_lines() {
        assert!(collect(reader(&["", "\n\n"], 10)).await.is_empty());
    }
}
