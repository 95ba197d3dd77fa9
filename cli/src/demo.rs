//! `sluice all --demo`: a mock upstream serving every model, a demo tenant, and, on a machine
//! without a running Redis or RabbitMQ, private ones when the servers are installed.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_core::Settings;
use sluice_core::config::{ProviderSettings, TenantSettings, hash_api_key};
use tokio_util::sync::CancellationToken;

use crate::mock_upstream::{MockConfig, MockUpstream};
use crate::services::{RabbitNode, RedisProcess, installed};

/// When `all --demo` starts its own Redis and RabbitMQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DemoServices {
    /// Private ones for a dependency whose URL is the default and does not answer, when its server
    /// is installed; a configured URL that does not answer ends the demo with one line.
    #[default]
    Auto,
    /// Always private ones (own ports, data under `<storage>/demo-services`), whatever answers.
    Private,
    /// Never: the configured (or default) URLs only.
    External,
}

/// The private servers a demo started; they stop when this is dropped.
#[derive(Default)]
pub struct PrivateServices {
    _redis: Option<RedisProcess>,
    _rabbit: Option<RabbitNode>,
}

/// Starts private Redis and RabbitMQ servers as `mode` asks, points `settings` at them and says
/// so in one line each.
pub async fn private_services(
    settings: &mut Settings,
    config: Option<&Path>,
    mode: DemoServices,
) -> anyhow::Result<PrivateServices> {
    let base = demo_dir(settings);
    let wants = |url: &str, key: &str, default_port: u16| match mode {
        DemoServices::External => false,
        DemoServices::Private => true,
        DemoServices::Auto => !Settings::sets(config, key) && !answers(url, default_port),
    };
    let mut started = PrivateServices::default();
    if wants(&settings.redis_url, "redis_url", 6379) {
        if installed("redis-server") {
            let dir = fresh_dir(&base.join("redis"))?;
            let port = free_port(false)?;
            let redis = tokio::task::spawn_blocking(move || {
                RedisProcess::start(port, &dir, &["--appendonly", "no"])
            })
            .await??;
            eprintln!(
                "Sluice demo: started a private Redis on {} (data in {}); it stops when Sluice does.",
                redis.url(),
                redis.dir().display()
            );
            settings.redis_url = redis.url();
            settings.redis_cluster = false;
            started._redis = Some(redis);
        } else if mode == DemoServices::Private {
            anyhow::bail!(
                "--services private needs redis-server on PATH (apt-get install redis-server)"
            );
        }
    }
    if wants(&settings.amqp_url, "amqp_url", 5672) {
        if installed("rabbitmq-server") {
            let dir = fresh_dir(&base.join("rabbitmq"))?;
            let port = free_port(true)?;
            eprintln!(
                "Sluice demo: starting a private RabbitMQ on 127.0.0.1:{port} (takes a few seconds)..."
            );
            let rabbit =
                tokio::task::spawn_blocking(move || RabbitNode::start(port, &dir, "sluice-demo"))
                    .await??;
            eprintln!(
                "Sluice demo: private RabbitMQ ready on 127.0.0.1:{port} (data in {}); it stops when Sluice does.",
                rabbit.dir().display()
            );
            settings.amqp_url = rabbit.url();
            started._rabbit = Some(rabbit);
        } else if mode == DemoServices::Private {
            anyhow::bail!(
                "--services private needs rabbitmq-server on PATH (apt-get install rabbitmq-server)"
            );
        }
    }
    Ok(started)
}

/// Where private servers keep their data: beside the demo's files when storage is local.
fn demo_dir(settings: &Settings) -> PathBuf {
    match &settings.storage {
        sluice_core::config::StorageSettings::Local { path } => path.join("demo-services"),
        _ => PathBuf::from("./data/demo-services"),
    }
}

/// An empty `dir`: a demo's Redis starts empty, so the broker's messages of an earlier run would
/// point at batches that no longer exist.
fn fresh_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    Ok(dir.to_owned())
}

/// A port free on 127.0.0.1 now; with `with_companion`, port + 10000 too (RabbitMQ's Erlang
/// distribution port).
fn free_port(with_companion: bool) -> anyhow::Result<u16> {
    for _ in 0..100 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        if !with_companion
            || (port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok())
        {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port pair found on 127.0.0.1")
}

/// Whether something accepts TCP connections at `url`'s host and port within a second.
fn answers(url: &str, default_port: u16) -> bool {
    let Ok(parsed) = url::Url::parse(url) else {
        return true; // not ours to judge: start-up reports a bad URL
    };
    let Some(host) = parsed.host_str() else {
        return true;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = parsed.port().unwrap_or(default_port);
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map(Iterator::collect)
        .unwrap_or_default();
    addrs
        .iter()
        .any(|a| TcpStream::connect_timeout(a, Duration::from_secs(1)).is_ok())
}

/// Starts a mock upstream serving every model and, when no tenant is configured, a demo tenant.
/// The API binds 127.0.0.1 unless `api.listen` is set explicitly (file or `SLUICE_API__LISTEN`):
/// a demo's fixed key must not be reachable from the network by accident.
pub async fn add_demo(
    settings: &mut Settings,
    config: Option<&std::path::Path>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    settings.api.listen = demo_listen(settings.api.listen, Settings::sets(config, "api.listen"));
    let base_url = MockUpstream::new(MockConfig {
        latency_ms: 20,
        ..Default::default()
    })
    .spawn(stop)
    .await?;
    settings.providers.push(ProviderSettings {
        name: "demo".into(),
        base_url,
        api_key_env: None,
        models: vec!["*".into()],
        endpoints: Vec::new(),
        batch: true,
        flavors: vec!["batch".into()],
        pacing: Default::default(),
        refused_body_fields: Vec::new(),
    });
    // Task models (extract, summarize, classify) run on the demo upstream too.
    settings
        .tasks
        .model
        .get_or_insert_with(|| "demo/demo-model".into());
    let demo_key = settings.tenants.is_empty();
    if demo_key {
        settings.tenants.push(TenantSettings {
            id: "demo".into(),
            api_key_sha256: vec![hash_api_key("sk-demo")],
            ..Default::default()
        });
    }
    // A web page could reach the fixed key on loopback by DNS rebinding; its `Host` gives it away.
    if demo_key && !Settings::sets(config, "api.allowed_hosts") {
        settings.api.allowed_hosts = LOOPBACK_HOSTS.map(String::from).to_vec();
    }
    let listen = settings.api.listen;
    let exposed = !listen.ip().is_loopback();
    if demo_key && exposed {
        tracing::warn!(%listen, "Demo mode: the fixed key sk-demo is active on a non-loopback address; anyone who can reach it can submit batches. It answers only loopback host names unless api.allowed_hosts lists others.");
    } else {
        tracing::info!(%listen, demo_key, "Demo mode: mock upstream serving every model.");
    }
    let key = if demo_key {
        "key sk-demo"
    } else {
        "the configured tenants' keys"
    };
    eprintln!(
        "Sluice demo: API on {listen} ({key}), mock upstream serving every model. See README.md to submit a batch."
    );
    Ok(())
}

/// The host names the demo answers while its fixed key is active.
const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// Where the demo's API listens: the configured address if it was set explicitly, else the
/// default port on 127.0.0.1.
fn demo_listen(configured: std::net::SocketAddr, explicit: bool) -> std::net::SocketAddr {
    if explicit {
        configured
    } else {
        (std::net::Ipv4Addr::LOCALHOST, configured.port()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_listens_on_loopback_unless_told_otherwise() {
        let default = Settings::default().api.listen;
        assert!(!default.ip().is_loopback());
        let demo = demo_listen(default, false);
        assert!(demo.ip().is_loopback());
        assert_eq!(demo.port(), default.port());
        let chosen: std::net::SocketAddr = "0.0.0.0:9000".parse().unwrap();
        assert_eq!(demo_listen(chosen, true), chosen);
    }
}
