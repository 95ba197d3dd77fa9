//! Private `redis-server` and RabbitMQ processes: their own ports and data directories, never a
//! shared instance. `sluice all --demo` starts them when no Redis or RabbitMQ answers on a machine
//! that has the servers installed; the tests start them to crash, stall or restart a dependency.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a private server may take to answer after it is launched (RabbitMQ boots an Erlang VM).
const REDIS_START: Duration = Duration::from_secs(30);
const RABBIT_START: Duration = Duration::from_secs(90);

/// Whether `program` is an executable on `PATH`.
pub fn installed(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            std::fs::metadata(dir.join(program)).is_ok_and(|m| m.is_file() && is_executable(&m))
        })
    })
}

#[cfg(unix)]
fn is_executable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_executable(_: &std::fs::Metadata) -> bool {
    true
}

/// Sends `signal` (e.g. "KILL", "STOP", "CONT") to process `pid` with `kill(1)`.
pub fn send_signal(pid: u32, signal: &str) -> std::io::Result<bool> {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
}

/// One `redis-server` on a given port with its own data directory; killed on drop (the directory
/// is left to its owner).
pub struct RedisProcess {
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisProcess {
    /// Starts a server on 127.0.0.1:`port` with data under `dir` and extra `args` (e.g.
    /// `--appendonly yes`), and waits until it answers.
    pub fn start(port: u16, dir: &Path, args: &[&str]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating Redis data directory {}", dir.display()))?;
        let mut server = Self {
            port,
            dir: dir.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
        };
        server.restart()?;
        Ok(server)
    }

    /// Starts the server again on the same port and directory (an AOF file is replayed).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("redis-server on port {} is still running", self.port);
        }
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", ""])
            .args(&self.args)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        self.child = Some(child);
        let start = Instant::now();
        while !self.cli(&["ping"]).contains("PONG") {
            if start.elapsed() > REDIS_START {
                self.kill();
                bail!("redis-server on port {} did not answer", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// `kill -9`, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// The running server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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

    /// Runs `redis-cli` against it; stdout and stderr together (empty if redis-cli cannot run).
    pub fn cli(&self, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .map(|out| {
                String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr)
            })
            .unwrap_or_default()
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One RabbitMQ node on a given port (its Erlang distribution port is `port + 10000`) with its own
/// node name, configuration, data and logs under a directory; killed on drop.
pub struct RabbitNode {
    port: u16,
    node: String,
    dir: PathBuf,
    launcher: Option<Child>,
}

impl RabbitNode {
    /// Starts a node on 127.0.0.1:`port` with everything under `dir`, and waits until it accepts
    /// connections.
    pub fn start(port: u16, dir: &Path, node_prefix: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating RabbitMQ directory {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"),
        )?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        // Started as root, Debian's server script drops to the `rabbitmq` user, which must own
        // the files.
        Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .stderr(Stdio::null())
            .status()
            .ok();
        let mut node = Self {
            port,
            node: format!("{node_prefix}-{port}@localhost"),
            dir,
            launcher: None,
        };
        node.restart()?;
        Ok(node)
    }

    /// Starts the node again on the same port and data (durable queues and their messages survive).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let launcher = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env(
                "RABBITMQ_DIST_PORT",
                (u32::from(self.port) + 10_000).to_string(),
            )
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting rabbitmq-server")?;
        self.launcher = Some(launcher);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if start.elapsed() > RABBIT_START {
                self.kill();
                bail!(
                    "RabbitMQ on port {} did not start; see {}",
                    self.port,
                    self.dir.join("log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// `kill -9` of the node's Erlang VM, as a crash; returns once the port is closed.
    pub fn kill(&mut self) {
        for pid in self.vm_pids() {
            send_signal(pid, "KILL").ok();
        }
        if let Some(mut launcher) = self.launcher.take() {
            launcher.kill().ok();
            launcher.wait().ok();
        }
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && start.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its URL for `amqp_url`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The directory holding its configuration, data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The Erlang VMs (`beam.smp`) running this node, found by the node name in their
    /// environment (their command line does not carry it).
    pub fn vm_pids(&self) -> Vec<u32> {
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

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.kill();
    }
}
