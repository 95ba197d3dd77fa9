//! A private RabbitMQ node for tests that crash the broker: its own node name, port, data and log
//! directories, never the shared node on 5672.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One RabbitMQ node on a spare port; killed and cleaned up on drop.
pub struct RabbitServer {
    port: u16,
    node: String,
    dir: PathBuf,
    launcher: Option<Child>,
}

impl RabbitServer {
    /// Starts a node in a fresh directory and waits until it accepts AMQP connections.
    pub fn start() -> Self {
        let port = crate::spare_port();
        let dir = std::env::temp_dir().join(format!("sluice-rabbitmq-{port}"));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).expect("rabbitmq directory");
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .expect("rabbitmq.conf");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("enabled_plugins");
        std::fs::write(dir.join("rabbitmq-env.conf"), "").expect("rabbitmq-env.conf");
        // Started as root, the server script drops to the `rabbitmq` user, which must own the files.
        Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()
            .ok();
        let mut server = Self {
            port,
            node: format!("sluice-test-{port}@localhost"),
            dir,
            launcher: None,
        };
        server.restart();
        server
    }

    /// Starts the node again on the same port and data (durable queues and their messages survive).
    pub fn restart(&mut self) {
        let launcher = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", (self.port + 10_000).to_string())
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rabbitmq-server starts");
        self.launcher = Some(launcher);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "private RabbitMQ node did not start; see {}",
                self.dir.join("log").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `kill -9` of the node's Erlang VM, as a crash.
    pub fn kill(&mut self) {
        for pid in self.vm_pids() {
            crate::send_signal(pid, "KILL");
        }
        if let Some(mut launcher) = self.launcher.take() {
            launcher.wait().ok();
        }
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(start.elapsed() < Duration::from_secs(10), "node still up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its URL for `amqp_url`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The Erlang VMs (`beam.smp`) running this node, found by the node name in their
    /// environment (their command line does not carry it).
    fn vm_pids(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let marker = format!("RABBITMQ_NODENAME={}", self.node);
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let is_vm = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains("beam"));
                is_vm
                    && std::fs::read(format!("/proc/{pid}/environ"))
                        .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == marker.as_bytes()))
            })
            .collect()
    }
}

impl Drop for RabbitServer {
    fn drop(&mut self) {
        for pid in self.vm_pids() {
            crate::send_signal(pid, "KILL");
        }
        if let Some(mut launcher) = self.launcher.take() {
            launcher.kill().ok();
            launcher.wait().ok();
        }
        std::fs::remove_dir_all(&self.dir).ok();
    }
}
