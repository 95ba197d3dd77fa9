//! Reaching RabbitMQ and Redis at start, and what a role says while it cannot.
//!
//! A dependency that refuses the connection fails fast; one that accepts and stays silent (a
//! stalled broker, a SIGSTOPped Redis, a wrong port) costs at most
//! `dependencies.connect_timeout_ms` per attempt. Either way the role logs one `warn` line per
//! attempt naming the dependency, its URL without credentials and what failed, keeps retrying with
//! capped backoff, and [`Health`] makes `/readyz` answer 503 with that line. With
//! `dependencies.startup_deadline_secs` set it gives up once the deadline has passed, with the
//! same line as its error, so `main` can print it and exit non-zero.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sluice_broker::Publisher;
use sluice_core::config::DependencySettings;
use sluice_core::connect::{ConnectError, Dependency, host_port, redact, secs, within};
use sluice_store::Store;

/// Opens (and drops) a TCP connection to `addr` within `timeout`.
pub async fn tcp_check(addr: &str, timeout: Duration) -> Result<(), ConnectError> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err(ConnectError::Refused)
        }
        Ok(Err(e)) => Err(ConnectError::Failed {
            stage: "the TCP connect",
            error: e.to_string(),
        }),
        Err(_) => Err(ConnectError::Stalled {
            stage: "the TCP connect",
            after: timeout,
        }),
    }
}

/// What `/readyz` reports: the start-up attempts still failing, then the live connections.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Default)]
struct HealthInner {
    /// Component (e.g. "api") → the line of its last failed attempt.
    waiting: Mutex<BTreeMap<String, String>>,
    store: OnceLock<Store>,
    publisher: OnceLock<Publisher>,
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health").finish_non_exhaustive()
    }
}

impl Health {
    fn set_waiting(&self, component: &str, line: Option<String>) {
        let mut waiting = self.inner.waiting.lock().unwrap_or_else(|e| e.into_inner());
        match line {
            Some(line) => waiting.insert(component.to_owned(), line),
            None => waiting.remove(component),
        };
    }

    /// Hands over the connections readiness checks (the first one given is kept).
    pub fn connected(&self, store: &Store, publisher: &Publisher) {
        self.inner.store.get_or_init(|| store.clone());
        self.inner.publisher.get_or_init(|| publisher.clone());
    }

    /// Whether [`Health::connected`] was called (start-up is over).
    pub fn is_connected(&self) -> bool {
        self.inner.store.get().is_some() && self.inner.publisher.get().is_some()
    }

    /// `Ok` when Redis answers a PING and takes a write, and the broker a passive declare, each
    /// within `timeout`; otherwise why not, in one line.
    pub async fn check(&self, timeout: Duration) -> Result<(), String> {
        let waiting: Vec<String> = self
            .inner
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        if !waiting.is_empty() {
            return Err(format!("Starting: {}", waiting.join("; ")));
        }
        let (Some(store), Some(publisher)) = (self.inner.store.get(), self.inner.publisher.get())
        else {
            return Err("Starting: not connected yet.".to_owned());
        };
        let redis = async {
            within("a PING", timeout, store.ping())
                .await
                .map_err(|e| e.to_string())?;
            sluice_store::redis_policy::write_probe(store, timeout).await
        };
        let broker = publisher.probe(timeout);
        let (redis, broker) = tokio::join!(redis, broker);
        let mut problems = Vec::new();
        if let Err(e) = redis {
            problems.push(format!("Redis at {} {e}", redact(store.url())));
        }
        if let Err(e) = broker {
            problems.push(format!("RabbitMQ at {} {e}", publisher.redacted_url()));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// Start-up attempts of one role: retries, their log lines and the optional deadline.
#[derive(Debug, Clone)]
pub struct Startup {
    health: Health,
    settings: DependencySettings,
    started: Instant,
}

impl Startup {
    /// Starts the clock of `dependencies.startup_deadline_secs` now.
    pub fn new(settings: &DependencySettings, health: Health) -> Self {
        Self {
            health,
            settings: settings.clone(),
            started: Instant::now(),
        }
    }

    /// The readiness state the attempts report into.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Runs `attempt` until it succeeds; after each failure logs one `warn` line and waits (0.5 s
    /// doubling up to `retry_max_backoff_ms`). Past the start-up deadline, returns the line as
    /// the error instead.
    pub async fn until_reached<T, F, Fut>(
        &self,
        component: &str,
        dependency: Dependency,
        url: &str,
        mut attempt: F,
    ) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ConnectError>>,
    {
        let url = redact(url);
        let max = Duration::from_millis(self.settings.retry_max_backoff_ms);
        let deadline = self
            .settings
            .startup_deadline_secs
            .map(|s| self.started + Duration::from_secs(s));
        let mut backoff = Duration::from_millis(500).min(max);
        for n in 1u32.. {
            let error = match attempt().await {
                Ok(v) => {
                    self.health.set_waiting(component, None);
                    if n > 1 {
                        tracing::info!(dependency = dependency.name(), %url, attempts = n, "{dependency} reached.");
                    }
                    return Ok(v);
                }
                Err(e) => e,
            };
            let line = format!("{dependency} at {url} {error}.");
            if let ConnectError::InvalidUrl(_) = error {
                anyhow::bail!("Failed to connect to {dependency}: {line}");
            }
            if deadline.is_some_and(|d| Instant::now() + backoff > d) {
                self.health.set_waiting(component, Some(line.clone()));
                anyhow::bail!(
                    "{line} {} Gave up after {n} attempt(s) (dependencies.startup_deadline_secs).",
                    dependency.hint()
                );
            }
            self.health.set_waiting(component, Some(line.clone()));
            tracing::warn!(
                dependency = dependency.name(),
                %url,
                attempt = n,
                retry_in_ms = backoff.as_millis() as u64,
                "{line} Retrying in {}. {}",
                secs(backoff),
                dependency.hint()
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(max);
        }
        unreachable!("the attempts loop only ends by returning")
    }

    /// Opens the store, retrying as [`Startup::until_reached`] does, then refuses an evicting
    /// Redis (see [`sluice_store::redis_policy`]).
    pub async fn store(
        &self,
        component: &str,
        settings: &sluice_core::Settings,
    ) -> anyhow::Result<Store> {
        let store = self.reach_store(component, settings).await?;
        sluice_store::redis_policy::check_eviction_policy(&store, settings.redis_allow_eviction)
            .await?;
        Ok(store)
    }

    /// Opens the store, retrying as [`Startup::until_reached`] does.
    async fn reach_store(
        &self,
        component: &str,
        settings: &sluice_core::Settings,
    ) -> anyhow::Result<Store> {
        let deps = &settings.dependencies;
        self.until_reached(
            component,
            Dependency::Redis,
            &settings.redis_url,
            || async {
                for url in settings.redis_url.split(',').map(str::trim) {
                    if settings.redis_cluster && url.is_empty() {
                        continue;
                    }
                    redis::IntoConnectionInfo::into_connection_info(url)
                        .map_err(|e| ConnectError::InvalidUrl(e.to_string()))?;
                }
                // A plain TCP connect first tells "nothing listens" and "accepts but stays silent"
                // apart in the log line (a cluster is checked through its client only).
                if !settings.redis_cluster
                    && let Some(addr) = host_port(&settings.redis_url, 6379)
                {
                    tcp_check(&addr, deps.connect_timeout()).await?;
                }
                // The client retries within this budget; its handshake and first PING count too.
                within(
                    "the Redis handshake",
                    deps.connect_timeout(),
                    Store::open(settings),
                )
                .await
            },
        )
        .await
    }

    /// Connects a publisher (topology declared, confirms on), retrying as
    /// [`Startup::until_reached`] does.
    pub async fn publisher(
        &self,
        component: &str,
        settings: &sluice_core::Settings,
        connection_name: &str,
    ) -> anyhow::Result<Publisher> {
        let publisher = Publisher::new(
            &settings.amqp_url,
            connection_name,
            sluice_core::Keys::new(&settings.namespace),
            settings.worker.delivery_limit,
            &settings.dependencies,
        );
        self.until_reached(
            component,
            Dependency::RabbitMq,
            &settings.amqp_url,
            || async {
                settings
                    .amqp_url
                    .parse::<lapin::uri::AMQPUri>()
                    .map_err(ConnectError::InvalidUrl)?;
                publisher.reconnect().await.map(|_| ())
            },
        )
        .await?;
        Ok(publisher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_deadline_turns_the_failure_line_into_the_error() {
        let settings = DependencySettings {
            startup_deadline_secs: Some(0),
            ..Default::default()
        };
        let startup = Startup::new(&settings, Health::default());
        let err = startup
            .until_reached("t", Dependency::RabbitMq, "amqp://u:pw@h:1/%2f", || async {
                Err::<(), _>(ConnectError::Refused)
            })
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("RabbitMQ at amqp://h:1/%2f refused the connection."),
            "{err}"
        );
        assert!(err.contains("docker run") && !err.contains("pw"), "{err}");
        let ready = startup.health().check(Duration::from_millis(10)).await;
        assert!(ready.unwrap_err().contains("refused"));
    }
}
