//! The multipart guard: a form part's header block (which the parser holds whole) is measured
//! as the body streams, and cut off past its limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::extract::Request;
use axum::http::header;
use futures::StreamExt;

/// The request with its body checked as it streams: the header block of each form part (what the
/// multipart parser must hold whole) may be at most `max` bytes; past it the body fails and
/// `oversized` is set.
pub(super) fn guard_part_headers(
    request: Request,
    max: u64,
    oversized: Arc<AtomicBool>,
) -> Request {
    let boundary = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(';')
                .filter_map(|p| p.trim().split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
                .map(|(_, b)| b.trim().trim_matches('"').to_owned())
        });
    // Without a boundary the extractor refuses the request anyway.
    let Some(boundary) = boundary.filter(|b| !b.is_empty()) else {
        return request;
    };
    let mut guard = PartHeaderGuard::new(&boundary, usize::try_from(max).unwrap_or(usize::MAX));
    let (parts, body) = request.into_parts();
    let stream = body.into_data_stream().map(move |chunk| match chunk {
        Ok(chunk) if guard.feed(&chunk) => Ok(chunk),
        Ok(_) => {
            oversized.store(true, Ordering::Relaxed);
            Err(axum::BoxError::from("a part's headers are too long"))
        }
        // The inner error, so the body-limit layer's 413 is still recognised.
        Err(e) => Err(e.into_inner()),
    });
    Request::from_parts(parts, Body::from_stream(stream))
}

/// Follows the multipart framing of a body chunk by chunk and measures each part's header block
/// (from a delimiter to the blank line that ends the headers).
struct PartHeaderGuard {
    /// `\r\n--boundary`.
    delimiter: Vec<u8>,
    /// Bytes of a header block seen so far, when inside one.
    in_headers: Option<usize>,
    /// The end of the previous chunk, where a delimiter or a blank line may begin.
    tail: Vec<u8>,
    max: usize,
}

impl PartHeaderGuard {
    fn new(boundary: &str, max: usize) -> Self {
        Self {
            delimiter: format!("\r\n--{boundary}").into_bytes(),
            in_headers: None,
            // The first delimiter may open the body without a line break before it.
            tail: b"\r\n".to_vec(),
            max,
        }
    }

    /// Takes the next chunk; `false` once a header block is over the limit.
    fn feed(&mut self, chunk: &[u8]) -> bool {
        let mut buf = std::mem::take(&mut self.tail);
        buf.extend_from_slice(chunk);
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match self.in_headers {
                None => match find(rest, &self.delimiter) {
                    Some(p) => {
                        at += p + self.delimiter.len();
                        self.in_headers = Some(0);
                    }
                    None => {
                        let keep = rest.len().min(self.delimiter.len() - 1);
                        self.tail = rest[rest.len() - keep..].to_vec();
                        return true;
                    }
                },
                Some(seen) => match find(rest, b"\r\n\r\n") {
                    Some(p) => {
                        if seen + p > self.max {
                            return false;
                        }
                        at += p + 4;
                        self.in_headers = None;
                    }
                    None => {
                        let keep = rest.len().min(3);
                        let seen = seen + rest.len() - keep;
                        if seen > self.max {
                            return false;
                        }
                        self.in_headers = Some(seen);
                        self.tail = rest[rest.len() - keep..].to_vec();
                        return true;
                    }
                },
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Records a fully received upload and answers its file object.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_header_blocks_are_measured_across_chunks() {
        let body = "--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b\r\n\
                    Content-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n\
                    {\"x\":1}\r\n--b--\r\n";
        for size in [1, 2, 3, 7, body.len()] {
            let mut guard = PartHeaderGuard::new("b", 80);
            for chunk in body.as_bytes().chunks(size) {
                assert!(guard.feed(chunk), "chunks of {size}");
            }
        }
        let long = format!("--b\r\nX-Long: {}\r\n\r\ndata", "v".repeat(100));
        for size in [1, 5, long.len()] {
            let mut guard = PartHeaderGuard::new("b", 80);
            assert!(
                !long.as_bytes().chunks(size).all(|c| guard.feed(c)),
                "chunks of {size}"
            );
        }
        // File content is not headers, however long.
        let mut guard = PartHeaderGuard::new("b", 80);
        assert!(guard.feed(b"--b\r\nA: b\r\n\r\n"));
        for _ in 0..100 {
            assert!(guard.feed(&[b'z'; 1000]));
        }
    }
}
