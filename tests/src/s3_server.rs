//! A real S3-compatible server for tests of `storage.kind = "s3"`: moto's server (`pip install
//! 'moto[server]'`) on a spare port, one bucket per test app.
//!
//! The server keeps objects in memory and enforces S3's rules that matter here (5 MiB minimum
//! multipart part, request signing parsed, 404 `NoSuchKey`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sluice_core::config::{Secret, StorageSettings};

/// Region, key id and secret the tests sign with; moto accepts any.
const REGION: &str = "us-east-1";
const ACCESS_KEY_ID: &str = "sluice-test";
const SECRET_ACCESS_KEY: &str = "sluice-test-secret";

/// Runs moto's threaded server until its parent (the test process) is gone, then removes its log:
/// a test binary that ends without running destructors (a `kill -9`, a static never dropped)
/// leaves neither a server nor a file behind.
const LAUNCHER: &str = r#"
import os, sys, time
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
parent = os.getppid()
while os.getppid() == parent:
    time.sleep(0.5)
try:
    os.remove(sys.argv[2])
except OSError:
    pass
os._exit(0)
"#;

/// One moto server on a spare port; killed on drop.
pub struct S3Server {
    port: u16,
    log: PathBuf,
    child: Child,
}

impl S3Server {
    /// The server of this test process, started on first use. Under nextest every test is its own
    /// process, so this is one server per test; under `cargo test` tests share it (a bucket each).
    pub fn shared() -> &'static S3Server {
        static SERVER: OnceLock<S3Server> = OnceLock::new();
        SERVER.get_or_init(S3Server::start)
    }

    /// Starts a server and waits until it answers HTTP.
    pub fn start() -> Self {
        let log = std::env::temp_dir().join(format!("sluice-moto-{}.log", uuid::Uuid::new_v4()));
        let port = crate::spare_port();
        let child = Command::new("python3")
            .args(["-c", LAUNCHER, &port.to_string()])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("moto log file"))
            .spawn()
            .expect("python3 starts (moto's server: pip install 'moto[server]')");
        let mut server = Self { port, log, child };
        let start = Instant::now();
        while server.request("GET", "/", "").is_none() {
            if let Some(status) = server.child.try_wait().expect("moto status") {
                panic!(
                    "moto's server exited ({status}); is `moto[server]` installed? Its log:\n{}",
                    std::fs::read_to_string(&server.log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "moto's server did not answer on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// The endpoint URL for `storage.endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a fresh bucket and returns storage settings pointing at it.
    pub fn new_bucket_settings(&self) -> StorageSettings {
        let bucket = format!("sluice-{}", uuid::Uuid::new_v4().simple());
        let status = self
            .request("PUT", &format!("/{bucket}"), "")
            .expect("moto answers a bucket creation");
        assert_eq!(status, 200, "bucket {bucket} created");
        StorageSettings::S3 {
            bucket,
            region: Some(REGION.into()),
            endpoint: Some(self.endpoint()),
            allow_http: true,
            prefix: None,
            access_key_id: Some(ACCESS_KEY_ID.into()),
            secret_access_key: Some(Secret(SECRET_ACCESS_KEY.into())),
        }
    }

    /// Keys of the objects under `prefix` in `bucket`, read back through the server's listing.
    pub fn list_keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let (status, body) = self
            .exchange("GET", &format!("/{bucket}?list-type=2&prefix={prefix}"), "")
            .expect("moto answers a listing");
        assert_eq!(status, 200, "listing {bucket}: {body}");
        body.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_owned)
            .collect()
    }

    /// Parts of an object stored by a completed multipart upload (its ETag ends in `-<parts>`), or
    /// None for an object stored by one `PUT`.
    pub fn parts(&self, bucket: &str, key: &str) -> Option<u32> {
        let (status, head) = self
            .exchange("HEAD", &format!("/{bucket}/{key}"), "")
            .expect("moto answers a HEAD");
        assert_eq!(status, 200, "HEAD {bucket}/{key}");
        let etag = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("ETag: ")
                    .or_else(|| l.strip_prefix("etag: "))
            })
            .unwrap_or_else(|| panic!("no ETag for {key}: {head}"));
        etag.trim()
            .trim_matches('"')
            .split_once('-')?
            .1
            .parse()
            .ok()
    }

    /// Multipart uploads started and neither completed nor aborted in `bucket`.
    pub fn open_multipart_uploads(&self, bucket: &str) -> usize {
        let (status, body) = self
            .exchange("GET", &format!("/{bucket}?uploads"), "")
            .expect("moto answers a listing of uploads");
        assert_eq!(status, 200, "uploads of {bucket}: {body}");
        body.matches("<UploadId>").count()
    }

    /// Status of an unsigned request (moto does not check signatures), or None if nothing answers.
    fn request(&self, method: &str, path: &str, body: &str) -> Option<u16> {
        self.exchange(method, path, body).map(|(status, _)| status)
    }

    /// One HTTP/1.0 exchange: a blocking helper usable from sync code and any runtime.
    fn exchange(&self, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .ok()?;
        write!(
            stream,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\n\r\n{body}",
            self.port,
            body.len()
        )
        .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        let status = answer.split_whitespace().nth(1)?.parse().ok()?;
        // A HEAD's answer is its headers.
        let body = match answer.split_once("\r\n\r\n") {
            Some((head, _)) if method == "HEAD" => head.to_owned(),
            Some((_, body)) => body.to_owned(),
            None => answer.clone(),
        };
        Some((status, body))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
        std::fs::remove_file(&self.log).ok();
    }
}
