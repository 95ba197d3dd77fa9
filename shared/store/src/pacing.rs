//! Fleet-wide pacing of upstream calls, shared by every worker replica through Redis.
//!
//! One provider's state lives under the hash tag `{<provider>}` (see [`Keys::pacing`](sluice_core::keys::Keys::pacing)), and two Lua
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
use sluice_core::pacing::{
    BreakerState, CallOutcome, FleetView, Grant, Hold, LEASE_MS, MAX_FLEET_PAUSE, PaceLimits,
    Released, Successes, TokenUse,
};

type Result<T> = std::result::Result<T, StoreError>;

static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/acquire_pace.lua")));

static RENEW: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/renew_pace_lease.lua")));

static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/release_pace.lua")));

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
