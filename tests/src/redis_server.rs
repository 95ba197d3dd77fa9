//! Private `redis-server` processes for tests that kill, stop or cluster Redis: never the shared
//! instance on 6379, which other tests (and CI right after) keep using.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One `redis-server` on a spare port, with its own data directory; killed and cleaned up on drop.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server in a fresh directory with `args` (e.g. `--appendonly yes`) and waits until it
    /// answers.
    pub fn start(args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("sluice-redis-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("redis directory");
        let mut server = Self {
            port: crate::spare_port(),
            dir,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
        };
        server.restart();
        server
    }

    /// Starts the server again on the same port and directory (an AOF file is replayed).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is still running");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", ""])
            .args(&self.args)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let start = Instant::now();
        while !self.cli(&["ping"]).contains("PONG") {
            assert!(start.elapsed() < Duration::from_secs(30), "redis-server up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9`, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`…) to the running server.
    pub fn signal(&self, signal: &str) {
        crate::send_signal(self.child.as_ref().expect("server running").id(), signal);
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its URL for `redis_url`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `redis-cli` against it; stdout and stderr together.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}
