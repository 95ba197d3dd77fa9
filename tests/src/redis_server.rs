//! Private `redis-server` processes for tests that kill, stop or cluster Redis: never the shared
//! instance on 6379, which other tests (and CI right after) keep using.

use std::path::{Path, PathBuf};

use sluice_cli::services::RedisProcess;

/// One `redis-server` on a spare port, with its own data directory; killed and cleaned up on drop.
pub struct RedisServer {
    inner: RedisProcess,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts a server in a fresh directory with `args` (e.g. `--appendonly yes`) and waits until it
    /// answers.
    pub fn start(args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("sluice-redis-{}", uuid::Uuid::new_v4()));
        let inner = RedisProcess::start(crate::spare_port(), &dir, args).expect("redis-server up");
        Self { inner, dir }
    }

    /// Starts the server again on the same port and directory (an AOF file is replayed).
    pub fn restart(&mut self) {
        self.inner.restart().expect("redis-server up again");
    }

    /// `kill -9`, as a crash.
    pub fn kill(&mut self) {
        self.inner.kill();
    }

    /// Sends `signal` (`STOP`, `CONT`…) to the running server.
    pub fn signal(&self, signal: &str) {
        crate::send_signal(self.inner.pid().expect("server running"), signal);
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.inner.port()
    }

    /// Its URL for `redis_url`.
    pub fn url(&self) -> String {
        self.inner.url()
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        self.inner.dir()
    }

    /// Runs `redis-cli` against it; stdout and stderr together.
    pub fn cli(&self, args: &[&str]) -> String {
        self.inner.cli(args)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.inner.kill();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}
