//! Child processes of a test: the `sluice` binary, signals, free ports, and a guard that kills a
//! child when the test ends or fails.

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::{Child, Command};

/// A child process killed and reaped when dropped, so a failing test leaves nothing running.
pub struct KillOnDrop(Child);

impl KillOnDrop {
    /// Guards `child`.
    pub fn new(child: Child) -> Self {
        Self(child)
    }

    /// Kills the process unless it has exited, and reaps it. A child already reaped is not
    /// signalled again, so a reused pid is never hit.
    pub fn kill_and_reap(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

impl Deref for KillOnDrop {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// A port free now whose companion port + 10000 is free too (a Redis Cluster bus, an Erlang
/// distribution port).
///
/// Chosen below the kernel's ephemeral range (32768 and up), from which every `bind(…:0)` listener
/// and every outgoing connection of the parallel tests takes its port: a port picked there can be
/// taken by another test's server between this check and the child binding it, and the test then
/// talks to the wrong server.
pub fn spare_port() -> u16 {
    const FIRST: u16 = 16_000;
    const SPAN: u16 = 6_000;
    loop {
        let port = FIRST + (uuid::Uuid::new_v4().as_u128() % u128::from(SPAN)) as u16;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

/// Sends `signal` (e.g. "KILL", "TERM", "STOP") to process `pid`.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Path of the `sluice` binary built next to the test executable.
pub fn sluice_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let debug_dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let bin = debug_dir.join("sluice");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bins` first",
        bin.display()
    );
    bin
}
