//! The fleet limiter's side of one call: waiting for a slot (or handing the line to a delay
//! queue during a long pause or an open breaker), and reporting how the call went.

use std::time::{Duration, Instant};

use sluice_core::domain::LineItem;
use sluice_core::pacing::{
    BreakerState, CallOutcome, Grant, Hold, MAX_FLEET_PAUSE, PaceLimits, Successes, TokenUse,
};
use sluice_store::pacing::Pacer;
use tokio_util::sync::CancellationToken;

use super::gate::{REGATE_AFTER, regate};
use crate::WorkerContext;
use crate::pacing::reservations::Reservations;
use crate::upstream::Attempt;

/// Sleeps for `d` unless the worker abandons its lines first (then false).
async fn pause(abandon: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = abandon.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// The fleet pacing of one line's call: the provider it goes to and that provider's limits.
pub(super) struct Paced<'b> {
    pub(super) provider: &'b str,
    pub(super) limits: &'b PaceLimits,
    pub(super) lease: String,
    /// Tokens charged to the limiter (the estimate, capped per call).
    pub(super) tokens: u64,
    /// Whether the estimate was capped: such a call does not teach the actual/estimate ratio.
    pub(super) capped: bool,
}

impl Paced<'_> {
    /// The estimate reported back to the limiter (0: learn nothing from this call).
    fn learnt_estimate(&self) -> u64 {
        if self.capped { 0 } else { self.tokens }
    }
}

/// What waiting for the fleet limiter ended with.
pub(super) enum Slot {
    /// Call now; `probe`: the breaker is half-open and this call tests the upstream; `charged`:
    /// tokens the reservation took.
    Call { probe: bool, charged: u64 },
    /// A fleet pause or open breaker longer than a hold: the line goes to a delay queue for this
    /// long, without spending an attempt.
    Delay(Duration),
    /// The line needs no call any more: ack it.
    Done,
    /// Abandoned for shutdown: do not ack.
    Abandoned,
}

/// Waits (in the consumer slot, up to `max_hold_ms` at a time) until the fleet lets this call
/// start; a longer fleet pause or open breaker answers [`Slot::Delay`], for the caller to hand the
/// line to a delay queue.
pub(super) async fn wait_for_slot(
    ctx: &WorkerContext,
    batch: &str,
    item: &LineItem<'_>,
    paced: &Paced<'_>,
    mut gated_at: Instant,
    abandon: &CancellationToken,
) -> anyhow::Result<Slot> {
    let hold = Duration::from_millis(ctx.settings.worker.max_hold_ms);
    let name = paced.provider;
    let together = Reservations::batches(paced.limits);
    if !together {
        tokio::select! {
            _ = abandon.cancelled() => return Ok(Slot::Abandoned),
            _ = ctx.local_pace.until_ready(name) => {}
        }
    }
    // A line whose gate answer would be older than `REGATE_AFTER` when it calls asks the gate
    // again, as after any other wait.
    loop {
        let grant = match viewed_grant(ctx, paced).await? {
            Some(grant) => grant,
            None if together => {
                tokio::select! {
                    _ = abandon.cancelled() => return Ok(Slot::Abandoned),
                    grant = ctx.reservations.reserve(name, paced.limits, paced.tokens) => grant?,
                }
            }
            None => {
                ctx.pacer
                    .acquire(name, paced.limits, paced.tokens, &paced.lease)
                    .await?
            }
        };
        let (wait, why, probe) = match grant {
            Grant::Go {
                wait,
                probe,
                charged,
            } if wait.is_zero() => {
                if gated_at.elapsed() > REGATE_AFTER
                    && !regate(ctx, batch, item, Instant::now()).await?
                {
                    release_unused(ctx, paced, charged).await;
                    return Ok(Slot::Done);
                }
                return Ok(Slot::Call { probe, charged });
            }
            Grant::Go {
                wait,
                probe,
                charged,
            } => (wait, Hold::Rate, Some((probe, charged))),
            Grant::Hold { wait, why } => (wait, why, None),
        };
        // A long pause or outage sends the line to a delay queue. A long wait for the rate does
        // not: another consumer would take the next line and meet the same wait, so the line keeps
        // its slot (the queue holds the rest: backpressure) and asks again once a reservation
        // within `reserve_ahead_ms` becomes possible.
        let ahead = paced.limits.reserve_ahead();
        let wait = match why {
            // Waiters spread their next asks over the reservation horizon instead of all
            // polling at once.
            Hold::Rate if wait > ahead => (wait - ahead
                + ahead.mul_f64(rand::random_range(0.25..0.75)))
            .clamp(Duration::from_millis(100).min(hold), hold),
            _ => wait,
        };
        if probe.is_none() && wait > hold {
            ctx.metrics
                .requeued
                .with_label_values(&[name, why.as_str()])
                .inc();
            tracing::debug!(
                provider = name,
                reason = why.as_str(),
                wait_ms = wait.as_millis() as u64,
                "Line goes to a delay queue."
            );
            return Ok(Slot::Delay(wait));
        }
        // Spread the holders of one pause or breaker so they do not all come back at once.
        let jitter = match probe {
            Some(_) => Duration::ZERO,
            None => wait.mul_f64(rand::random_range(0.0..0.1)),
        };
        ctx.metrics
            .pacing_wait
            .with_label_values(&[name, why.as_str()])
            .observe((wait + jitter).as_secs_f64());
        let call_at = Instant::now() + wait + jitter;
        // A reserved start asks the gate again with the batch's lines calling about then, while
        // the line sleeps.
        let (woke, gate) = match probe {
            Some(_) if call_at.duration_since(gated_at) > REGATE_AFTER => {
                let (woke, gate) = tokio::join!(
                    pause(abandon, wait + jitter),
                    regate(ctx, batch, item, call_at)
                );
                gated_at = call_at.checked_sub(REGATE_AFTER).unwrap_or(call_at);
                (woke, Some(gate?))
            }
            _ => (pause(abandon, wait + jitter).await, None),
        };
        if !woke {
            if let Some((_, charged)) = probe {
                release_unused(ctx, paced, charged).await;
            }
            return Ok(Slot::Abandoned);
        }
        let Some((probe, charged)) = probe else {
            continue;
        };
        if gate == Some(false) {
            release_unused(ctx, paced, charged).await;
            return Ok(Slot::Done);
        }
        // A fleet pause set while this call waited for its reserved start wins over the
        // reservation (as this worker's copy of the fleet view sees it: `worker.fleet_view_ms` old
        // at most, the bound a pause reaches every replica within).
        if ctx.fleet_views.get(name).await?.paused_for.is_some() {
            release_unused(ctx, paced, charged).await;
            continue;
        }
        return Ok(Slot::Call { probe, charged });
    }
}

/// For an unpaced provider, what this worker's copy of the fleet pause and breaker says, with no
/// script: hold while paused, go while the breaker is closed. `None`: ask the fleet limiter (a
/// paced provider, or a breaker that is not closed, whose probes the limiter hands out).
async fn viewed_grant(ctx: &WorkerContext, paced: &Paced<'_>) -> anyhow::Result<Option<Grant>> {
    if !paced.limits.unpaced() {
        return Ok(None);
    }
    let view = ctx.fleet_views.get(paced.provider).await?;
    if let Some(wait) = view.paused_for {
        return Ok(Some(Grant::Hold {
            wait,
            why: Hold::Paused,
        }));
    }
    Ok((view.breaker == BreakerState::Closed).then_some(Grant::Go {
        wait: Duration::ZERO,
        probe: false,
        charged: 0,
    }))
}

async fn release_unused(ctx: &WorkerContext, paced: &Paced<'_>, charged: u64) {
    // An unpaced provider's reservation holds nothing (no lease, no rate) to give back.
    if paced.limits.unpaced() {
        return;
    }
    if let Err(e) = ctx
        .pacer
        .release(
            paced.provider,
            paced.limits,
            &paced.lease,
            CallOutcome::Unused,
            TokenUse {
                estimate: paced.learnt_estimate(),
                charged,
                actual: None,
            },
            None,
        )
        .await
    {
        tracing::debug!(error = %e, "Could not release a pacing lease; it expires.");
    }
}

/// Tells the fleet limiter how the call went; true when the breaker is open after it, so a failure
/// is the outage's, not the line's, and costs the line no attempt.
pub(super) async fn report(
    ctx: &WorkerContext,
    paced: &Paced<'_>,
    result: &Attempt,
    header_pause: Option<Duration>,
    probe: bool,
    charged: u64,
) -> bool {
    let base = Duration::from_millis(ctx.settings.worker.backoff_base_ms);
    let (outcome, pause, source, actual) = match result {
        // Only a success's usage says what a call costs (an error row has none).
        Attempt::Done(row, usage) => (
            CallOutcome::Ok,
            header_pause,
            "ratelimit_headers",
            (row.ok && usage.total > 0).then_some(usage.total as u64),
        ),
        Attempt::Retry {
            reason: "429",
            retry_after,
            ..
        } => (
            CallOutcome::Throttled,
            Some(retry_after.unwrap_or(base)),
            if retry_after.is_some() {
                "retry_after"
            } else {
                "429"
            },
            None,
        ),
        Attempt::Retry {
            reason: "408" | "409",
            ..
        } => (CallOutcome::Ok, header_pause, "ratelimit_headers", None),
        Attempt::Retry {
            retry_after: Some(asked),
            ..
        } => (CallOutcome::Failed, Some(*asked), "retry_after", None),
        Attempt::Retry { .. } => (CallOutcome::Failed, header_pause, "ratelimit_headers", None),
    };
    let name = paced.provider;
    if outcome == CallOutcome::Throttled {
        ctx.metrics.throttled.with_label_values(&[name]).inc();
    }
    if let Some(p) = pause {
        ctx.metrics
            .fleet_pauses
            .with_label_values(&[name, source])
            .inc();
        tracing::info!(
            provider = name,
            pause_ms = p.min(MAX_FLEET_PAUSE).as_millis() as u64,
            source,
            "Pausing the provider fleet-wide."
        );
    }
    let tokens = TokenUse {
        estimate: paced.learnt_estimate(),
        charged,
        actual: actual
            .filter(|_| paced.limits.counts_tokens())
            .map(|a| paced.limits.plausible_usage(a)),
    };
    // A plain success changes nothing the fleet must see at once (a call holding a lease must
    // give it back). Without a token limit it changes nothing at all unless failures are counted
    // (it resets them); with one, its token correction joins this worker's next summed report.
    if outcome == CallOutcome::Ok && pause.is_none() && !probe && !Pacer::leases(paced.limits) {
        if !paced.limits.counts_tokens() && ctx.fleet_views.quiet(name) {
            return false;
        }
        if !paced.limits.unpaced() {
            ctx.pace_reports
                .add(name, paced.limits, Successes::of(tokens));
            return false;
        }
    }
    match ctx
        .pacer
        .release(name, paced.limits, &paced.lease, outcome, tokens, pause)
        .await
    {
        Ok(released) => {
            ctx.fleet_views.learn(
                name,
                pause.map(|p| p.min(MAX_FLEET_PAUSE)),
                released.breaker,
                outcome,
            );
            ctx.metrics
                .breaker_state
                .with_label_values(&[name])
                .set(released.breaker.gauge());
            if released.concurrency_limit > 0 {
                ctx.metrics
                    .pacing_limit
                    .with_label_values(&[name, "concurrency"])
                    .set(released.concurrency_limit as i64);
            }
            if released.breaker_changed {
                ctx.metrics
                    .breaker_transitions
                    .with_label_values(&[name, released.breaker.as_str()])
                    .inc();
                match released.breaker {
                    BreakerState::Open => tracing::warn!(
                        provider = name,
                        probe,
                        "Circuit breaker opened: the provider is failing; calls stop until probes succeed."
                    ),
                    _ => tracing::info!(
                        provider = name,
                        state = released.breaker.as_str(),
                        "Circuit breaker closed: the provider answers again."
                    ),
                }
            }
            outcome == CallOutcome::Failed && released.breaker == BreakerState::Open
        }
        Err(e) => {
            tracing::warn!(provider = name, error = %e, "Could not report a call to the fleet limiter.");
            false
        }
    }
}
