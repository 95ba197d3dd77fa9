//! `sluice`: one binary, one subcommand per role.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sluice_shared::config::{ProviderSettings, TenantSettings, hash_api_key};
use sluice_shared::{Settings, metrics::Metrics, shutdown, telemetry};
use sluice_worker::mock_upstream::{MockConfig, MockUpstream};
use sluice_worker::{WorkerContext, ops};
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
    /// Prints the SHA-256 digest of an API key, for `tenants[].api_key_sha256`.
    HashKey { key: String },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Role::HashKey { key } = &cli.role {
        println!("{}", hash_api_key(key));
        return Ok(());
    }
    let mut settings = Settings::load(cli.config.as_deref())?;
    telemetry::init(&settings.log);
    let stop = CancellationToken::new();
    shutdown::install(stop.clone());
    let metrics = Metrics::new();
    match cli.role {
        Role::Api => run_api(settings, metrics, stop, true).await,
        Role::Worker => run_backend(settings, metrics, stop, true, false).await,
        Role::Aggregator => run_backend(settings, metrics, stop, false, true).await,
        Role::All { demo } => {
            if demo {
                add_demo(&mut settings, stop.clone()).await?;
            }
            let api = tokio::spawn(run_api(
                settings.clone(),
                metrics.clone(),
                stop.clone(),
                false,
            ));
            run_backend(settings, metrics, stop, true, true).await?;
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
        Role::HashKey { .. } => unreachable!("handled before configuration is loaded"),
    }
}

/// Runs the API; `with_ops` also serves `/metrics`, `/livez` and `/readyz` on the metrics port
/// (in `all`, the back end serves them for the whole process).
async fn run_api(
    settings: Settings,
    metrics: Metrics,
    stop: CancellationToken,
    with_ops: bool,
) -> anyhow::Result<()> {
    let ops_addr = settings.api.metrics_listen;
    let app = sluice_api::Application::build(settings, metrics.clone()).await?;
    if with_ops {
        let (store, publisher) = (app.store().clone(), app.publisher().clone());
        ops::serve(ops_addr, metrics, store, publisher, stop.clone()).await?;
    }
    app.run_until_stopped(stop).await
}

async fn run_backend(
    settings: Settings,
    metrics: Metrics,
    stop: CancellationToken,
    worker: bool,
    aggregator: bool,
) -> anyhow::Result<()> {
    let ops_addr = settings.api.metrics_listen;
    let ctx = WorkerContext::build(settings, metrics.clone()).await?;
    let port = ops::serve(
        ops_addr,
        metrics,
        ctx.store.clone(),
        ctx.publisher.clone(),
        stop.clone(),
    )
    .await?;
    tracing::info!(port, worker, aggregator, "Back-end roles starting.");
    let agg =
        aggregator.then(|| tokio::spawn(sluice_worker::run_aggregator(ctx.clone(), stop.clone())));
    if worker {
        sluice_worker::run_worker(ctx, stop).await?;
    }
    if let Some(agg) = agg {
        agg.await??;
    }
    Ok(())
}

/// Starts a mock upstream serving every model and, when no tenant is configured, a demo tenant.
async fn add_demo(settings: &mut Settings, stop: CancellationToken) -> anyhow::Result<()> {
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
    });
    // Task models (extract, summarize, classify) run on the demo upstream too.
    settings
        .tasks
        .model
        .get_or_insert_with(|| "demo/demo-model".into());
    if settings.tenants.is_empty() {
        settings.tenants.push(TenantSettings {
            id: "demo".into(),
            api_key_sha256: vec![hash_api_key("sk-demo")],
            completed_as: None,
            errors_in_output: false,
        });
    }
    eprintln!(
        "Sluice demo: API on {} (key sk-demo), mock upstream serving every model. See README.md to submit a batch.",
        settings.api.listen
    );
    Ok(())
}
