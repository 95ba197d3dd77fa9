//! Why a dependency could not be reached, and URLs made safe for logs.

use std::fmt;
use std::future::Future;
use std::time::Duration;

/// A service Sluice cannot run without.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// RabbitMQ (the queues).
    RabbitMq,
    /// Redis (the store).
    Redis,
}

impl Dependency {
    /// Its name in log lines and `/readyz`.
    pub fn name(self) -> &'static str {
        match self {
            Self::RabbitMq => "RabbitMQ",
            Self::Redis => "Redis",
        }
    }

    /// How an operator gets it running, for the start-up line.
    pub fn hint(self) -> &'static str {
        match self {
            Self::RabbitMq => {
                "Start RabbitMQ (e.g. `docker run -d -p 5672:5672 rabbitmq:3`) or point amqp_url \
                 (SLUICE_AMQP_URL) at a running broker."
            }
            Self::Redis => {
                "Start Redis (e.g. `docker run -d -p 6379:6379 redis:7`) or point redis_url \
                 (SLUICE_REDIS_URL) at a running server."
            }
        }
    }
}

impl fmt::Display for Dependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why one attempt to reach a dependency failed.
#[derive(Debug, Clone)]
pub enum ConnectError {
    /// Nothing listens there (or a firewall rejects).
    Refused,
    /// No answer within `after` while doing `stage` (e.g. "the AMQP handshake").
    Stalled {
        /// What was being done.
        stage: &'static str,
        /// How long it waited.
        after: Duration,
    },
    /// It answered, with an error (bad credentials, unknown vhost, closed during the handshake…).
    Failed {
        /// What was being done.
        stage: &'static str,
        /// What the service answered.
        error: String,
    },
    /// The URL itself is wrong: retrying cannot help.
    InvalidUrl(String),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused => f.write_str("refused the connection"),
            Self::Stalled { stage, after } => {
                write!(f, "did not answer {stage} within {}", secs(*after))
            }
            Self::Failed { stage, error } => write!(f, "failed {stage}: {error}"),
            Self::InvalidUrl(error) => write!(f, "is not a valid URL: {error}"),
        }
    }
}

impl std::error::Error for ConnectError {}

impl ConnectError {
    /// Classifies an error of `stage`, spotting a refused connection in its text (lapin and redis
    /// wrap the I/O error in their own types).
    pub fn from_error(stage: &'static str, error: &dyn fmt::Display) -> Self {
        let text = error.to_string();
        if text.contains("Connection refused") || text.contains("os error 111") {
            Self::Refused
        } else {
            Self::Failed { stage, error: text }
        }
    }
}

/// `d` as a short text for log lines: `5s`, `0.5s`.
pub fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// `url` without user name and password (each of a comma-separated list), for logs and `/readyz`.
pub fn redact(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let one = one.trim();
            let Some((scheme, rest)) = one.split_once("://") else {
                return one.to_owned();
            };
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `host:port` of a URL (default port when it names none), for a plain TCP check.
pub fn host_port(url: &str, default_port: u16) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() {
        return None;
    }
    // `[::1]:5672`, `host:5672`, `host`.
    let has_port = match host.rfind(']') {
        Some(end) => host[end..].contains(':'),
        None => host.contains(':'),
    };
    Some(if has_port {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    })
}

/// Runs `fut`, calling it stalled at `stage` when it takes longer than `timeout`.
pub async fn within<T, E: fmt::Display>(
    stage: &'static str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, ConnectError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ConnectError::from_error(stage, &e)),
        Err(_) => Err(ConnectError::Stalled {
            stage,
            after: timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_a_log_line() {
        assert_eq!(
            redact("amqp://guest:s3cret@rabbit:5672/%2f?heartbeat=5"),
            "amqp://rabbit:5672/%2f?heartbeat=5"
        );
        assert_eq!(redact("redis://:pw@r:6379/0"), "redis://r:6379/0");
        assert_eq!(
            redact("redis://a:1/,redis://u:p@b:2/"),
            "redis://a:1/,redis://b:2/"
        );
        assert_eq!(redact("amqp://h"), "amqp://h");
        assert_eq!(redact("not a url"), "not a url");
        assert_eq!(redact("amqp://u:p@w@h/v"), "amqp://h/v");
    }

    #[test]
    fn host_port_fills_the_default_port() {
        assert_eq!(
            host_port("amqp://u:p@h/%2f", 5672).as_deref(),
            Some("h:5672")
        );
        assert_eq!(
            host_port("redis://h:7000/", 6379).as_deref(),
            Some("h:7000")
        );
        assert_eq!(
            host_port("redis://[::1]/", 6379).as_deref(),
            Some("[::1]:6379")
        );
        assert_eq!(
            host_port("redis://[::1]:1/", 6379).as_deref(),
            Some("[::1]:1")
        );
        assert_eq!(host_port("nope", 1), None);
    }
}
