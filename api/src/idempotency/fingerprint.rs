//! What makes two requests "the same" for an `Idempotency-Key`, hashed as the body streams.
//!
//! The fingerprint is a SHA-256 over the method, the path, the media type (without parameters)
//! and the body. A multipart form is hashed by its parts (name, filename, bytes), not its raw
//! bytes: clients draw a new boundary for every attempt (the openai SDK through httpx does), so the
//! raw bytes of a retried upload differ while the upload is the same. Any other body is hashed as
//! sent: a retry repeats the same bytes.
//!
//! A body is never held: the first request's body reaches its handler through [`tee`] one chunk at
//! a time while the same chunks are hashed, and a duplicate's body is hashed and dropped.

use std::io;

use axum::body::Body;
use axum::http::header;
use axum::http::request::Parts;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// A request's fingerprint.
pub(crate) type Fingerprint = [u8; 32];

/// Why a body has no fingerprint.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FingerprintError {
    #[error("The request body could not be read: {0}")]
    Body(String),
    /// Larger than any create accepts, so it cannot be the request a key is bound to.
    #[error("The request body is larger than any create accepts.")]
    TooLarge,
    /// Not a readable multipart form, so it cannot be the (accepted) request a key is bound to.
    #[error("The multipart form could not be read.")]
    Malformed,
}

/// The parts of a request's head that are fingerprinted.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    method: String,
    path: String,
    media_type: String,
    /// The boundary of a `multipart/form-data` body.
    boundary: Option<String>,
}

impl Head {
    pub(crate) fn of(parts: &Parts) -> Self {
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let media_type = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        let boundary = (media_type == "multipart/form-data")
            .then(|| multer::parse_boundary(content_type).ok())
            .flatten();
        Self {
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            media_type,
            boundary,
        }
    }
}

/// Hashes `value` so that no two sequences of values hash alike (length first).
fn put(hash: &mut Sha256, value: &[u8]) {
    hash.update((value.len() as u64).to_le_bytes());
    hash.update(value);
}

/// Reads `body` to its end (at most `cap` bytes) and answers its request's fingerprint.
pub(crate) async fn fingerprint<S, E>(
    head: &Head,
    body: S,
    cap: u64,
) -> Result<Fingerprint, FingerprintError>
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: std::fmt::Display,
{
    let mut seen: u64 = 0;
    // Fused: the form parser may read the body to its end before the drain below polls it again.
    let body = body.fuse().map(move |chunk| match chunk {
        Ok(bytes) => {
            seen = seen.saturating_add(bytes.len() as u64);
            if seen > cap {
                Err(FingerprintError::TooLarge)
            } else {
                Ok(bytes)
            }
        }
        Err(e) => Err(FingerprintError::Body(e.to_string())),
    });
    let mut body = std::pin::pin!(body);
    let mut hash = Sha256::new();
    put(&mut hash, head.method.as_bytes());
    put(&mut hash, head.path.as_bytes());
    put(&mut hash, head.media_type.as_bytes());
    match &head.boundary {
        None => {
            while let Some(chunk) = body.next().await {
                hash.update(chunk?);
            }
        }
        Some(boundary) => {
            let parsed = hash_form(&mut hash, &mut body, boundary).await;
            // Read on even when the form is not readable: through `tee`, the handler still gets
            // every byte and answers the request its own way.
            while let Some(chunk) = body.next().await {
                chunk?;
            }
            parsed?;
        }
    }
    Ok(hash.finalize().into())
}

/// Hashes every part of a form: its name, its filename and a digest of its bytes.
async fn hash_form<S>(
    hash: &mut Sha256,
    body: &mut S,
    boundary: &str,
) -> Result<(), FingerprintError>
where
    S: Stream<Item = Result<Bytes, FingerprintError>> + Send + Unpin,
{
    let mut form = multer::Multipart::new(body, boundary);
    let ours = |e: multer::Error| match e {
        multer::Error::StreamReadFailed(source) => match source.downcast::<FingerprintError>() {
            Ok(e) => *e,
            Err(_) => FingerprintError::Malformed,
        },
        _ => FingerprintError::Malformed,
    };
    while let Some(mut part) = form.next_field().await.map_err(ours)? {
        put(hash, part.name().unwrap_or_default().as_bytes());
        match part.file_name() {
            Some(name) => {
                hash.update([1]);
                put(hash, name.as_bytes());
            }
            None => hash.update([0]),
        }
        let mut bytes = Sha256::new();
        while let Some(chunk) = part.chunk().await.map_err(ours)? {
            bytes.update(&chunk);
        }
        hash.update(bytes.finalize());
    }
    Ok(())
}

/// What the handler's body stream receives.
enum Piece {
    Chunk(Result<Bytes, io::Error>),
    End,
}

/// Splits `body` into the body a handler reads and a stream of the same chunks to fingerprint.
///
/// The fingerprint side drives the reading: each chunk goes to the handler first, through a
/// channel of one, so the handler's pace still sets the client's and memory stays at a chunk or
/// two. Once the handler drops its body (it answered), the rest is still read for the fingerprint.
/// A handler whose body stops before the real end (the fingerprint side gave up) gets an error,
/// never a clean end: a JSONL body cut at a line boundary must not pass for a whole one.
pub(crate) fn tee(body: Body) -> (Body, impl Stream<Item = Result<Bytes, axum::Error>> + Send) {
    let (tx, rx) = mpsc::channel::<Piece>(1);
    let source = body.into_data_stream();
    let tap = futures::stream::unfold((source, Some(tx)), |(mut source, mut tx)| async move {
        let Some(chunk) = source.next().await else {
            if let Some(tx) = tx {
                tx.send(Piece::End).await.ok();
            }
            return None;
        };
        if let Some(sender) = &tx {
            let copy = match &chunk {
                Ok(bytes) => Ok(bytes.clone()),
                Err(e) => Err(io::Error::other(e.to_string())),
            };
            if sender.send(Piece::Chunk(copy)).await.is_err() {
                tx = None;
            }
        }
        Some((chunk, (source, tx)))
    });
    let handler_side = futures::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Some(Piece::Chunk(chunk)) => Some((chunk, Some(rx))),
            Some(Piece::End) => None,
            None => Some((
                Err(io::Error::other("the request body was cut short")),
                None,
            )),
        }
    });
    (Body::from_stream(handler_side), tap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn head(method: &str, path: &str, content_type: &str) -> Head {
        let (parts, ()) = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, content_type)
            .body(())
            .unwrap()
            .into_parts();
        Head::of(&parts)
    }

    fn chunks(pieces: &[&[u8]]) -> impl Stream<Item = Result<Bytes, io::Error>> + Send + use<> {
        let owned: Vec<Result<Bytes, io::Error>> = pieces
            .iter()
            .map(|p| Ok(Bytes::copy_from_slice(p)))
            .collect();
        futures::stream::iter(owned)
    }

    fn form(boundary: &str, parts: &[(&str, Option<&str>, &str)]) -> Vec<u8> {
        let mut out = String::new();
        for (name, filename, data) in parts {
            out.push_str(&format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\""
            ));
            if let Some(f) = filename {
                out.push_str(&format!("; filename=\"{f}\""));
            }
            out.push_str(&format!("\r\n\r\n{data}\r\n"));
        }
        out.push_str(&format!("--{boundary}--\r\n"));
        out.into_bytes()
    }

    async fn of(head: &Head, pieces: &[&[u8]]) -> Fingerprint {
        fingerprint(head, chunks(pieces), 1 << 20).await.unwrap()
    }

    #[tokio::test]
    async fn raw_bodies_are_the_same_however_chunked_and_differ_by_byte_path_or_type() {
        let json = head("POST", "/v1/batches", "application/json; charset=utf-8");
        let body: &[u8] = b"{\"a\":1}";
        let whole = of(&json, &[body]).await;
        assert_eq!(whole, of(&json, &[&body[..4], &body[4..]]).await);
        assert_ne!(whole, of(&json, &[b"{\"a\":2}"]).await);
        let same_type = head("POST", "/v1/batches", "Application/JSON");
        assert_eq!(whole, of(&same_type, &[body]).await);
        for (path, content_type) in [
            ("/v1/files", "application/json"),
            ("/v1/batches", "application/jsonl"),
        ] {
            assert_ne!(whole, of(&head("POST", path, content_type), &[body]).await);
        }
    }

    #[tokio::test]
    async fn forms_are_compared_by_their_parts_not_their_boundary() {
        let parts = [
            ("purpose", None, "batch"),
            ("file", Some("in.jsonl"), "{}\n"),
        ];
        let a = form("aaaa1111", &parts);
        let b = form("bbbb2222", &parts);
        let fa = of(
            &head(
                "POST",
                "/v1/files",
                "multipart/form-data; boundary=aaaa1111",
            ),
            &[&a],
        )
        .await;
        let fb = of(
            &head(
                "POST",
                "/v1/files",
                "multipart/form-data; boundary=bbbb2222",
            ),
            &[&b[..10], &b[10..]],
        )
        .await;
        assert_eq!(fa, fb);
        let other_file = form(
            "aaaa1111",
            &[
                ("purpose", None, "batch"),
                ("file", Some("in.jsonl"), "[]\n"),
            ],
        );
        let renamed = form(
            "aaaa1111",
            &[
                ("purpose", None, "batch"),
                ("file", Some("x.jsonl"), "{}\n"),
            ],
        );
        let h = head(
            "POST",
            "/v1/files",
            "multipart/form-data; boundary=aaaa1111",
        );
        assert_ne!(fa, of(&h, &[&other_file]).await);
        assert_ne!(fa, of(&h, &[&renamed]).await);
    }

    #[tokio::test]
    async fn a_body_over_the_cap_or_broken_has_no_fingerprint() {
        let h = head("POST", "/v1/batches", "application/jsonl");
        assert!(matches!(
            fingerprint(&h, chunks(&[b"12345", b"678"]), 7).await,
            Err(FingerprintError::TooLarge)
        ));
        let broken = futures::stream::iter([
            Ok(Bytes::from_static(b"ab")),
            Err(io::Error::other("reset")),
        ]);
        assert!(matches!(
            fingerprint(&h, broken, 100).await,
            Err(FingerprintError::Body(_))
        ));
        let f = head("POST", "/v1/files", "multipart/form-data; boundary=zz");
        assert!(matches!(
            fingerprint(&f, chunks(&[b"not a form"]), 100).await,
            Err(FingerprintError::Malformed)
        ));
    }

    #[tokio::test]
    async fn the_handler_gets_every_byte_and_the_same_fingerprint_results() {
        let h = head("POST", "/v1/batches", "application/jsonl");
        let source = Body::from_stream(chunks(&[b"line 1\n", b"line 2\n", b"line 3\n"]));
        let (handler_body, tap) = tee(source);
        let hashing = tokio::spawn({
            let h = h.clone();
            async move { fingerprint(&h, tap, 1 << 20).await.unwrap() }
        });
        let read = axum::body::to_bytes(handler_body, usize::MAX)
            .await
            .unwrap();
        assert_eq!(&read[..], b"line 1\nline 2\nline 3\n");
        assert_eq!(
            hashing.await.unwrap(),
            of(&h, &[b"line 1\nline 2\nline 3\n"]).await
        );
    }

    #[tokio::test]
    async fn a_handler_whose_tap_stops_early_sees_an_error_not_an_end() {
        let source = Body::from_stream(chunks(&[b"line 1\n", b"line 2\n"]));
        let (handler_body, tap) = tee(source);
        let h = head("POST", "/v1/batches", "application/jsonl");
        // A cap below the body: the fingerprint side stops after the first chunk.
        let hashing = tokio::spawn(async move { fingerprint(&h, tap, 8).await });
        let read = axum::body::to_bytes(handler_body, usize::MAX).await;
        assert!(read.is_err(), "{read:?}");
        assert!(matches!(
            hashing.await.unwrap(),
            Err(FingerprintError::TooLarge)
        ));
    }

    #[tokio::test]
    async fn the_rest_is_hashed_after_the_handler_dropped_its_body() {
        let h = head("POST", "/v1/batches", "application/json");
        let (handler_body, tap) = tee(Body::from_stream(chunks(&[b"{\"a\"", b":1}"])));
        let hashing = tokio::spawn({
            let h = h.clone();
            async move { fingerprint(&h, tap, 1 << 20).await.unwrap() }
        });
        let mut stream = handler_body.into_data_stream();
        assert_eq!(&stream.next().await.unwrap().unwrap()[..], b"{\"a\"");
        drop(stream);
        assert_eq!(hashing.await.unwrap(), of(&h, &[b"{\"a\":1}"]).await);
    }
}
