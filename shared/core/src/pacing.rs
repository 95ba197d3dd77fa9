//! The fleet-wide limiter's vocabulary and its pure rules: the limits a provider is paced with
//! (in the units the limiter's scripts use), what a call may be told (go after a wait, or hold and
//! why), how a call went, the breaker's states and the token sums reported back. The limiter
//! itself runs in Redis (`sluice_store::pacing::Pacer`).

use std::time::Duration;

use crate::config::{PacingSettings, WorkerSettings};

/// Lifetime of a concurrency lease past its call's start; renewed every third of it while the
/// call runs.
pub const LEASE_MS: u64 = 30_000;

/// Longest fleet pause any upstream header can cause, however odd its value.
pub const MAX_FLEET_PAUSE: Duration = Duration::from_secs(60);

/// The limits one provider is paced with, in the units the scripts use.
#[derive(Debug, Clone)]
pub struct PaceLimits {
    /// Milliseconds per request (0 = no request rate).
    pub request_interval_ms: f64,
    /// Milliseconds per token (0 = no token rate).
    pub token_interval_ms: f64,
    /// How far ahead of the request rate a call may start: `burst_ms` less one interval, so at
    /// most `burst_ms` worth of requests go at once.
    pub request_tolerance_ms: f64,
    /// The same for tokens (a call's whole cost is charged when it starts).
    pub token_tolerance_ms: f64,
    /// Calls in flight at most, fleet-wide (0 = no concurrency limit).
    pub max_concurrency: u32,
    /// Longest time ahead a rate reservation is taken.
    pub reserve_ahead_ms: u64,
    /// Lifetime of a concurrency lease: the wait for its start plus [`LEASE_MS`].
    pub lease_ms: u64,
    /// Failures in a row that open the breaker.
    pub breaker_failures: u32,
    /// How long an open breaker waits before letting probes through.
    pub breaker_cooldown_ms: u64,
    /// Probe calls a half-open breaker lets through.
    pub breaker_probes: u32,
    /// Largest token cost one call is charged (`pacing.max_call_tokens`, else `tpm`).
    pub max_call_tokens: u64,
}

impl PaceLimits {
    /// The limits of a provider's `pacing` settings under the worker settings.
    pub fn new(p: &PacingSettings, w: &WorkerSettings) -> Self {
        let request = p.rpm.map_or(0.0, |r| 60_000.0 / r as f64);
        let burst = p.burst_ms.unwrap_or(1_000) as f64;
        Self {
            request_interval_ms: request,
            token_interval_ms: p.tpm.map_or(0.0, |t| 60_000.0 / t as f64),
            request_tolerance_ms: (burst - request).max(0.0),
            token_tolerance_ms: burst,
            max_concurrency: p.max_concurrency.unwrap_or(0),
            reserve_ahead_ms: w.reserve_ahead_ms.min(w.max_hold_ms),
            // A lease covers the wait for its start and is renewed while its call runs
            // (`Pacer::renew`), so a dead worker's slots come back within this time.
            lease_ms: w.reserve_ahead_ms.min(w.max_hold_ms) + LEASE_MS,
            breaker_failures: w.breaker_failures,
            breaker_cooldown_ms: w.breaker_cooldown_ms,
            breaker_probes: w.breaker_probes,
            max_call_tokens: p.max_call_tokens.or(p.tpm).unwrap_or(u64::MAX),
        }
    }

    /// The token cost to charge for a call estimated at `estimate`, and whether it was capped.
    /// A capped estimate says nothing about the provider (the line asked for an absurd budget),
    /// so it must not teach the limiter's actual/estimate ratio either.
    pub fn charge_for(&self, estimate: u64) -> (u64, bool) {
        if estimate > self.max_call_tokens {
            (self.max_call_tokens, true)
        } else {
            (estimate, false)
        }
    }

    /// What a call's `usage` may count toward the token bucket: an upstream that reports more than
    /// a call can use would otherwise push every tenant's calls far into the future.
    pub fn plausible_usage(&self, actual: u64) -> u64 {
        actual.min(self.max_call_tokens)
    }

    /// Longest time ahead a rate reservation is taken.
    pub fn reserve_ahead(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.reserve_ahead_ms)
    }

    /// Whether a token limit applies (then a token estimate is needed).
    pub fn counts_tokens(&self) -> bool {
        self.token_interval_ms > 0.0
    }

    /// Whether a request or token rate applies: calls then wait for reserved starts, spaced over
    /// time, so they also finish one at a time.
    pub fn rate_limited(&self) -> bool {
        self.request_interval_ms > 0.0 || self.token_interval_ms > 0.0
    }

    /// Whether no rate or concurrency limit applies: a call then needs only the fleet pause and
    /// the breaker, which workers read from a cached [`FleetView`] instead of a script per call.
    pub fn unpaced(&self) -> bool {
        self.request_interval_ms == 0.0
            && self.token_interval_ms == 0.0
            && self.max_concurrency == 0
    }
}

/// What every replica must see of a provider without running a script: its fleet pause and its
/// breaker, read with one pipelined round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetView {
    /// Time left of the fleet pause, if one is set.
    pub paused_for: Option<Duration>,
    /// The breaker's state as stored (an open breaker past its cool-down still reads open: the
    /// acquire script moves it to half-open).
    pub breaker: BreakerState,
    /// Failures counted toward opening the breaker since the last success reported.
    pub fails: u64,
}

/// Why a call cannot start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The breaker is open (or half-open with its probes out).
    BreakerOpen,
    /// The fleet is paused after a 429 or an exhausted rate-limit header.
    Paused,
    /// The adaptive concurrency limit is reached.
    Concurrency,
    /// The next slot of the request or token rate is further away than `reserve_ahead_ms`.
    Rate,
}

impl Hold {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BreakerOpen => "breaker",
            Self::Paused => "pause",
            Self::Concurrency => "concurrency",
            Self::Rate => "rate",
        }
    }
}

/// The answer of `Pacer::acquire`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// A slot is reserved: start the call after `wait`. `probe`: the breaker is half-open and this
    /// call tests the upstream. `charged`: tokens taken from the token bucket (the estimate scaled
    /// by the learnt actual/estimate ratio), to pass back to `Pacer::release`.
    Go {
        /// How long to wait before starting the call.
        wait: Duration,
        /// Whether this call is the half-open breaker's probe.
        probe: bool,
        /// Tokens charged to the token bucket.
        charged: u64,
    },
    /// Nothing reserved: try again after `wait`.
    Hold {
        /// How long to wait before asking again.
        wait: Duration,
        /// What holds the call.
        why: Hold,
    },
}

/// How a call went, as the pacer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// The upstream answered (2xx or a 4xx that is the request's fault).
    Ok,
    /// 429: the upstream is alive but over its limit.
    Throttled,
    /// 5xx, timeout or connection failure: counts toward opening the breaker.
    Failed,
    /// No call happened (the reservation went unused).
    Unused,
}

impl CallOutcome {
    /// The name the limiter's scripts know the outcome by.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Throttled => "throttled",
            Self::Failed => "fail",
            Self::Unused => "unused",
        }
    }
}

/// State of a provider's breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// A few probe calls test the upstream after a cool-down.
    HalfOpen,
    /// Calls wait: the upstream failed too often.
    Open,
}

impl BreakerState {
    /// The state the scripts store (`None`: no breaker hash yet, so closed).
    pub fn parse(stored: Option<&str>) -> Self {
        match stored {
            Some("open") => Self::Open,
            Some("half") => Self::HalfOpen,
            _ => Self::Closed,
        }
    }

    /// Gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }

    /// Log and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half_open",
            Self::Open => "open",
        }
    }
}

/// Tokens of one call, for the token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenUse {
    /// The estimate made before the call.
    pub estimate: u64,
    /// What [`Grant::Go`] charged for it.
    pub charged: u64,
    /// What the answer's `usage` says it used (`None`: no answer, or no call).
    pub actual: Option<u64>,
}

/// Successful calls of one provider summed for one report (`Pacer::report_successes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Successes {
    /// Calls summed.
    pub calls: u64,
    /// Sum of (actual − charged) tokens.
    pub token_delta: i64,
    /// Sums of the estimate and the actual tokens of the calls that teach the ratio.
    pub estimate: u64,
    /// Sum of the actual tokens of the calls that teach the ratio.
    pub actual: u64,
    /// Calls that teach the ratio (an estimate and a reported usage).
    pub samples: u64,
}

impl Successes {
    /// One successful call's tokens.
    pub fn of(tokens: TokenUse) -> Self {
        let teaches = tokens.estimate > 0 && tokens.actual.is_some();
        Self {
            calls: 1,
            token_delta: tokens.actual.unwrap_or(0) as i64 - tokens.charged as i64,
            estimate: if teaches { tokens.estimate } else { 0 },
            actual: if teaches {
                tokens.actual.unwrap_or(0)
            } else {
                0
            },
            samples: u64::from(teaches),
        }
    }

    /// Adds `other` to the sums.
    pub fn add(&mut self, other: Self) {
        self.calls += other.calls;
        self.token_delta += other.token_delta;
        self.estimate += other.estimate;
        self.actual += other.actual;
        self.samples += other.samples;
    }
}

/// What `Pacer::release` left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// The breaker's state after this outcome.
    pub breaker: BreakerState,
    /// Whether this outcome changed it.
    pub breaker_changed: bool,
    /// The adaptive concurrency limit (0 when none is configured).
    pub concurrency_limit: u32,
}
