//! Fleet-wide pacing of upstream calls, shared by every worker replica through Redis.
//!
//! One provider's state lives under the hash tag `{<provider>}` (see [`Keys::pacing`]), and two Lua
//! scripts touch it atomically:
//!
//! - [`Pacer::acquire`] runs before every call to a paced provider (one with a rate or
//!   concurrency limit; an unpaced provider's calls read [`Pacer::view`], cached per worker, and
//!   come here only while the breaker is not closed). It checks, in order, the circuit breaker (open:
//!   wait; half-open: only a few probes), the fleet pause (set after a 429 or an exhausted
//!   `x-ratelimit-remaining-*`), the adaptive concurrency limit (leases that expire, so a dead
//!   worker holds a slot no longer than one call's timeout), then the request and token rates.
//!   Rates use GCRA in reservation form: each call is given a start time `S` no earlier than
//!   `TAT − tolerance` of every bucket, and each bucket's theoretical arrival time moves to
//!   `max(TAT, S) + cost·T`. The caller sleeps until `S`, so calls leave the fleet evenly spaced.
//!   A reservation further away than `reserve_ahead` is not taken: the caller waits and asks
//!   again (the line keeps its consumer slot; the queue holds the rest).
//! - [`Pacer::release`] runs after every call that has something to say at once (successes
//!   without a lease are summed into [`Pacer::report_successes`]): it frees the lease, corrects the token bucket by
//!   (actual − charged) tokens, learns the provider's ratio of actual to estimated tokens (an
//!   average that scales the next charges, so reservations taken ahead are right too), applies
//!   AIMD to the concurrency limit (halve on a 429 at most once a second, +1 per `limit`
//!   successes), feeds the breaker and sets a fleet pause.
//!
//! Redis' own clock (`TIME`) is the only clock, so worker clocks may drift freely.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use crate::{Store, StoreError};
use sluice_core::config::{PacingSettings, WorkerSettings};

type Result<T> = std::result::Result<T, StoreError>;

/// Lifetime of a concurrency lease past its call's start; renewed every third of it while the
/// call runs.
pub const LEASE_MS: u64 = 30_000;

/// Longest fleet pause any upstream header can cause, however odd its value.
pub const MAX_FLEET_PAUSE: Duration = Duration::from_secs(60);

static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/acquire_pace.lua")));

static RENEW: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/renew_pace_lease.lua")));

static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/release_pace.lua")));

/// The limits one provider is paced with, in the units the scripts use.
#[derive(Debug, Clone)]
pub struct PaceLimits {
    /// Milliseconds per request (0 = no request rate).
    request_interval_ms: f64,
    /// Milliseconds per token (0 = no token rate).
    token_interval_ms: f64,
    /// How far ahead of the request rate a call may start: `burst_ms` less one interval, so at
    /// most `burst_ms` worth of requests go at once.
    request_tolerance_ms: f64,
    /// The same for tokens (a call's whole cost is charged when it starts).
    token_tolerance_ms: f64,
    max_concurrency: u32,
    /// Longest time ahead a rate reservation is taken.
    reserve_ahead_ms: u64,
    lease_ms: u64,
    breaker_failures: u32,
    breaker_cooldown_ms: u64,
    breaker_probes: u32,
    /// Largest token cost one call is charged (`pacing.max_call_tokens`, else `tpm`).
    max_call_tokens: u64,
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
            // ([`Pacer::renew`]), so a dead worker's slots come back within this time.
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

/// The answer of [`Pacer::acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// A slot is reserved: start the call after `wait`. `probe`: the breaker is half-open and this
    /// call tests the upstream. `charged`: tokens taken from the token bucket (the estimate scaled
    /// by the learnt actual/estimate ratio), to pass back to [`Pacer::release`].
    Go {
        wait: Duration,
        probe: bool,
        charged: u64,
    },
    /// Nothing reserved: try again after `wait`.
    Hold { wait: Duration, why: Hold },
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
    fn as_str(self) -> &'static str {
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
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    /// The state the scripts store (`None`: no breaker hash yet, so closed).
    fn parse(stored: Option<&str>) -> Self {
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

/// Successful calls of one provider summed for one report ([`Pacer::report_successes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Successes {
    /// Calls summed.
    pub calls: u64,
    /// Sum of (actual − charged) tokens.
    pub token_delta: i64,
    /// Sums of the estimate and the actual tokens of the calls that teach the ratio.
    pub estimate: u64,
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

/// What [`Pacer::release`] left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// The breaker's state after this outcome.
    pub breaker: BreakerState,
    /// Whether this outcome changed it.
    pub breaker_changed: bool,
    /// The adaptive concurrency limit (0 when none is configured).
    pub concurrency_limit: u32,
}

/// The fleet-wide limiter of every provider, on the shared store.
#[derive(Debug, Clone)]
pub struct Pacer {
    store: Store,
}

impl Pacer {
    /// A pacer on `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    fn keys(&self, provider: &str) -> [String; 6] {
        let k = self.store.keys();
        ["rq", "tk", "pause", "conc", "aimd", "breaker"].map(|part| k.pacing(provider, part))
    }

    /// Asks for a slot for one call costing `tokens` (estimated) under `lease`, a unique id of this
    /// call that [`Pacer::release`] must be given.
    pub async fn acquire(
        &self,
        provider: &str,
        limits: &PaceLimits,
        tokens: u64,
        lease: &str,
    ) -> Result<Grant> {
        let mut grants = self
            .acquire_many(provider, limits, &[tokens], lease)
            .await?;
        Ok(grants.pop().expect("one grant per call"))
    }

    /// Asks for slots for several calls at once, costing `tokens` (estimated) each: one script
    /// call reserves their starts in order, exactly as that many [`Pacer::acquire`]s would, and
    /// answers one [`Grant`] per call. The calls granted come first; the others are told how long
    /// to wait (the rate's next slot is past `reserve_ahead_ms`, or a half-open breaker gave its
    /// one probe of this ask to the first call). A provider with a concurrency limit holds a lease
    /// per call, so its calls ask one at a time under `lease`; without one, `lease` is unused.
    pub async fn acquire_many(
        &self,
        provider: &str,
        limits: &PaceLimits,
        tokens: &[u64],
        lease: &str,
    ) -> Result<Vec<Grant>> {
        assert!(
            !tokens.is_empty() && (tokens.len() == 1 || !Self::leases(limits)),
            "one call per ask under a concurrency limit"
        );
        let keys = self.keys(provider);
        let mut inv = ACQUIRE.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        let costs = tokens
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        inv.arg(limits.request_interval_ms)
            .arg(limits.token_interval_ms)
            .arg(costs)
            .arg(limits.request_tolerance_ms)
            .arg(limits.max_concurrency)
            .arg(lease)
            .arg(limits.lease_ms)
            .arg(limits.reserve_ahead_ms)
            .arg(limits.breaker_cooldown_ms)
            .arg(limits.breaker_probes)
            .arg(limits.token_tolerance_ms)
            .arg(limits.max_call_tokens);
        let (verdict, wait, flag, granted): (String, i64, i64, Vec<i64>) =
            inv.invoke_async(&mut self.store.conn()).await?;
        let millis = |ms: i64| Duration::from_millis(ms.unsigned_abs());
        let hold = |why| Grant::Hold {
            wait: millis(wait),
            why,
        };
        let all = |grant| Ok(vec![grant; tokens.len()]);
        match verdict.as_str() {
            "go" => {}
            "open" => return all(hold(Hold::BreakerOpen)),
            "paused" => return all(hold(Hold::Paused)),
            "busy" => return all(hold(Hold::Concurrency)),
            "rate" => return all(hold(Hold::Rate)),
            other => return Err(StoreError::Protocol(format!("acquire: {other}"))),
        }
        // `wait` is then what the calls not granted wait for: the rate (> 0), the breaker's next
        // ask (< 0).
        let rest = match wait {
            w if w < 0 => hold(Hold::BreakerOpen),
            _ => hold(Hold::Rate),
        };
        let mut grants: Vec<Grant> = granted
            .chunks_exact(2)
            .map(|g| Grant::Go {
                wait: millis(g[0].max(0)),
                probe: flag == 1,
                charged: g[1].max(0) as u64,
            })
            .collect();
        if grants.is_empty() || grants.len() > tokens.len() {
            return Err(StoreError::Protocol(format!(
                "acquire: {} grants for {} calls",
                grants.len(),
                tokens.len()
            )));
        }
        grants.resize(tokens.len(), rest);
        Ok(grants)
    }

    /// Reports a call acquired under `lease`: `tokens` are what the token bucket was charged and
    /// what the call used, and `pause` a fleet-wide pause the upstream asked for (capped at
    /// [`MAX_FLEET_PAUSE`]).
    pub async fn release(
        &self,
        provider: &str,
        limits: &PaceLimits,
        lease: &str,
        outcome: CallOutcome,
        tokens: TokenUse,
        pause: Option<Duration>,
    ) -> Result<Released> {
        let token_delta = tokens.actual.unwrap_or(0) as i64 - tokens.charged as i64;
        let keys = self.keys(provider);
        let pause_ms = pause.map_or(0, |p| p.min(MAX_FLEET_PAUSE).as_millis() as u64);
        let mut inv = RELEASE.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        inv.arg(lease)
            .arg(outcome.as_str())
            .arg(limits.max_concurrency)
            .arg(token_delta)
            .arg(limits.token_interval_ms)
            .arg(limits.breaker_failures)
            .arg(limits.breaker_cooldown_ms)
            .arg(pause_ms)
            .arg(tokens.estimate)
            .arg(tokens.actual.map_or(-1, |a| a as i64));
        let (state, changed, limit): (String, i64, i64) =
            inv.invoke_async(&mut self.store.conn()).await?;
        let breaker = BreakerState::parse(Some(&state));
        Ok(Released {
            breaker,
            breaker_changed: changed == 1,
            concurrency_limit: limit.max(0) as u32,
        })
    }

    /// Reports successful calls summed over a while: their token corrections, what they teach the
    /// actual/estimate ratio, and a reset of the breaker's failure count. No lease, AIMD step,
    /// pause or breaker transition rides on it; those are reported per call.
    pub async fn report_successes(
        &self,
        provider: &str,
        limits: &PaceLimits,
        sum: Successes,
    ) -> Result<()> {
        let keys = self.keys(provider);
        let mut inv = RELEASE.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        let (estimate, actual) = if sum.samples > 0 {
            (sum.estimate, sum.actual as i64)
        } else {
            (0, -1)
        };
        inv.arg("")
            .arg("oks")
            .arg(0)
            .arg(sum.token_delta)
            .arg(limits.token_interval_ms)
            .arg(limits.breaker_failures)
            .arg(limits.breaker_cooldown_ms)
            .arg(0)
            .arg(estimate)
            .arg(actual)
            .arg(sum.samples.max(1));
        let _: (String, i64, i64) = inv.invoke_async(&mut self.store.conn()).await?;
        Ok(())
    }

    /// Whether calls hold concurrency leases (then they must be renewed while the call runs).
    pub fn leases(limits: &PaceLimits) -> bool {
        limits.max_concurrency > 0
    }

    /// Extends the concurrency lease of a call still running; false if it is gone (expired).
    pub async fn renew(&self, provider: &str, lease: &str) -> Result<bool> {
        let n: i64 = RENEW
            .key(self.store.keys().pacing(provider, "conc"))
            .arg(lease)
            .arg(LEASE_MS)
            .invoke_async(&mut self.store.conn())
            .await?;
        Ok(n == 1)
    }

    /// The provider's fleet pause and breaker, in one round trip.
    pub async fn view(&self, provider: &str) -> Result<FleetView> {
        let k = self.store.keys();
        let (left, (state, fails)): (i64, (Option<String>, Option<u64>)) = redis::pipe()
            .cmd("PTTL")
            .arg(k.pacing(provider, "pause"))
            .cmd("HMGET")
            .arg(k.pacing(provider, "breaker"))
            .arg("state")
            .arg("fails")
            .query_async(&mut self.store.conn())
            .await?;
        Ok(FleetView {
            paused_for: (left > 0).then(|| Duration::from_millis(left as u64)),
            breaker: BreakerState::parse(state.as_deref()),
            fails: fails.unwrap_or(0),
        })
    }
}
