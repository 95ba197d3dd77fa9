//! `sluice`: one binary, one subcommand per role, and client subcommands for people.

mod config_cmd;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use config_cmd::ConfigCommand;
use sluice_cli::client::{self, BatchesCommand, Connection, SubmitArgs};
use sluice_cli::demo::{DemoServices, add_demo, private_services};
use sluice_cli::mock_upstream::{MockConfig, MockUpstream};
use sluice_cli::roles::{run_api, run_backend};
use sluice_core::Settings;
use sluice_core::config::hash_api_key;
use sluice_runtime::startup::{Health, Startup};
use sluice_runtime::{metrics::Metrics, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Self-hosted OpenAI-compatible Batch API"
)]
struct Cli {
    /// TOML configuration file (values from SLUICE_… environment variables override it).
    #[arg(long, short, global = true, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// The HTTP API.
    Api,
    /// Dispatcher, line worker and dead-letter consumer.
    Worker,
    /// Result files, terminal statuses, expiry and recovery.
    Aggregator,
    /// Every role in one process; with --demo, also a mock upstream and a demo tenant (key `sk-demo`).
    All {
        #[arg(long)]
        demo: bool,
        /// With --demo: when to start private Redis and RabbitMQ servers (own ports, data beside
        /// the demo's files, stopped on exit).
        #[arg(long, value_enum, default_value_t, requires = "demo")]
        services: DemoServices,
    },
    /// An OpenAI-compatible stand-in model server.
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: String,
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
        #[arg(long, default_value_t = 500)]
        fail_status: u16,
    },
    /// Prints the SHA-256 digest of an API key, for `tenants[].api_key_sha256`; reads the key
    /// as one line from stdin (`printf %s "$KEY" | sluice hash-key`).
    HashKey {
        /// Deprecated: a key given here is visible in shell history and `ps`.
        key: Option<String>,
    },
    /// Configuration: the reference of every key, and checking a file without starting a role.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Client: uploads a JSONL file and creates a batch; with --wait, follows it and downloads
    /// the results (exit code 0 only if every line succeeded).
    Submit {
        #[command(flatten)]
        args: SubmitArgs,
        #[command(flatten)]
        connection: Connection,
    },
    /// Client: lists, shows, cancels and waits for batches, and reads their results.
    Batches {
        #[command(subcommand)]
        command: BatchesCommand,
        #[command(flatten)]
        connection: Connection,
    },
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        // One line, without a backtrace even under RUST_BACKTRACE, and an exit before the runtime
        // shuts down under lapin's I/O threads (which then panic).
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}

/// `sluice hash-key`: the key from stdin (or, for compatibility, the argument, with a warning);
/// returns the exit code, 2 for an empty key or unreadable stdin.
fn hash_key(argument: Option<String>) -> i32 {
    let key = match argument {
        Some(key) => {
            eprintln!(
                "Warning: a key given on the command line is visible in shell history and `ps`; pipe it instead: printf %s \"$KEY\" | sluice hash-key"
            );
            key
        }
        None => {
            let mut line = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut line) {
                eprintln!("Error: cannot read the key from stdin: {e}");
                return 2;
            }
            let key = line.strip_suffix('\n').unwrap_or(&line);
            key.strip_suffix('\r').unwrap_or(key).to_owned()
        }
    };
    if key.is_empty() {
        eprintln!(
            "Error: the key is empty (pipe it on stdin: printf %s \"$KEY\" | sluice hash-key)"
        );
        return 2;
    }
    println!("{}", hash_api_key(&key));
    0
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.role {
        Role::HashKey { key } => std::process::exit(hash_key(key)),
        // Reads only the file it is given (and the environment); exit code 1 on any problem.
        Role::Config { command } => std::process::exit(config_cmd::run(command)?),
        // Clients: no configuration file, no logging set-up, their own exit codes.
        Role::Submit { args, connection } => {
            std::process::exit(client::run(connection, client::Command::Submit(args)).await)
        }
        Role::Batches {
            command,
            connection,
        } => std::process::exit(client::run(connection, client::Command::Batches(command)).await),
        _ => {}
    }
    let mut settings = Settings::load(cli.config.as_deref())?;
    telemetry::init(&settings.log);
    let stop = CancellationToken::new();
    shutdown::install(stop.clone());
    let metrics = Metrics::new();
    // Built before `--demo` may set a deadline, so the `all` arm makes its own.
    let startup = Startup::new(&settings.dependencies, Health::default());
    match cli.role {
        Role::Api => run_api(settings, metrics, stop, startup, true).await,
        Role::Worker => run_backend(settings, metrics, stop, startup, true, false).await,
        Role::Aggregator => run_backend(settings, metrics, stop, startup, false, true).await,
        Role::All { demo, services } => {
            // Held until every role has stopped: dropping it stops the private servers.
            let mut _private = None;
            if demo {
                // A demo is run by hand: a missing dependency ends it with one line at once,
                // unless a deadline is configured.
                settings.dependencies.startup_deadline_secs.get_or_insert(0);
                _private =
                    Some(private_services(&mut settings, cli.config.as_deref(), services).await?);
                add_demo(&mut settings, cli.config.as_deref(), stop.clone()).await?;
            }
            // One start-up state for both halves: the back end's `/readyz` reports the API's
            // attempts too.
            let startup = Startup::new(&settings.dependencies, Health::default());
            let api = tokio::spawn(run_api(
                settings.clone(),
                metrics.clone(),
                stop.clone(),
                startup.clone(),
                false,
            ));
            run_backend(settings, metrics, stop, startup, true, true).await?;
            api.await?
        }
        Role::MockUpstream {
            listen,
            latency_ms,
            fail_rate,
            fail_status,
        } => {
            let config = MockConfig {
                latency_ms,
                fail_rate,
                fail_status,
                ..Default::default()
            };
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            tracing::info!(%listen, "Mock upstream listening.");
            Ok(MockUpstream::new(config).serve(listener, stop).await?)
        }
        Role::HashKey { .. } | Role::Config { .. } | Role::Submit { .. } | Role::Batches { .. } => {
            unreachable!("handled before configuration is loaded")
        }
    }
}
