//! Requests written to a raw socket, for answers an HTTP client would drop: the API may answer
//! (413, or a 400 once the verdict is certain) and close before the body is all sent, which
//! reqwest (hyper) reports as a broken pipe, losing the answer. The OpenAI SDK's client reads the
//! answer while still writing, and so do these.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{KEY_A, TestApp};

/// An answer read off a raw socket.
pub struct RawAnswer {
    /// The status code.
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    /// The body, as text.
    pub body: String,
}

impl RawAnswer {
    /// The value of header `name` (any case), if the answer has it.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

impl TestApp {
    /// Sends `method /v1{path}` as tenant A with `body` over a raw socket and reads the whole
    /// answer while still writing; each read may wait up to `read_timeout`.
    pub async fn raw_request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        read_timeout: Duration,
    ) -> RawAnswer {
        let addr = self
            .base
            .trim_start_matches("http://")
            .trim_end_matches("/v1")
            .to_owned();
        let head = format!(
            "{method} /v1{path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY_A}\r\n\
             Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let (mut rd, mut wr) = stream.into_split();
        let writer = tokio::spawn(async move {
            // A write error only means the server stopped reading; its answer is what matters.
            if wr.write_all(head.as_bytes()).await.is_ok() {
                wr.write_all(&body).await.ok();
            }
            wr
        });
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let text = loop {
            let n = tokio::time::timeout(read_timeout, rd.read(&mut buf))
                .await
                .expect("the server answers")
                .unwrap_or(0);
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_owned())
                    })
                    .and_then(|v| v.parse::<usize>().ok());
                if n == 0 || length.is_some_and(|len| body.len() >= len) {
                    break text;
                }
            }
            assert!(n > 0, "connection closed before a whole answer: {text:?}");
        };
        writer.abort();
        let (head, body) = text.split_once("\r\n\r\n").expect("a whole answer");
        let status = head
            .lines()
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status line");
        RawAnswer {
            status,
            head: head.to_owned(),
            body: body.to_owned(),
        }
    }
}
