//! Each worker's copy of the fleet pause and breaker of its unpaced providers.
//!
//! A provider with no `rpm`, `tpm` or `max_concurrency` needs no reservation per call, only to know
//! whether the fleet is paused and whether its breaker is closed. Running the limiter's scripts
//! for that on every call cost two script calls per line; instead each worker reads both with one
//! pipelined round trip at most every `worker.fleet_view_ms`, and a call never starts on a copy
//! older than that. A pause or breaker change made by any replica therefore stops the others'
//! calls within `fleet_view_ms` plus one Redis round trip. The replica that causes a pause or
//! opens the breaker updates its own copy at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_core::pacing::{BreakerState, CallOutcome, FleetView};
use sluice_store::StoreError;
use sluice_store::pacing::Pacer;

/// A provider's view and when it was read.
#[derive(Debug, Clone, Copy)]
struct Cached {
    /// When the read was sent: the copy is at least this fresh.
    read_at: Instant,
    paused_until: Option<Instant>,
    breaker: BreakerState,
    fails: u64,
}

impl Cached {
    fn view(&self, now: Instant) -> FleetView {
        FleetView {
            paused_for: self
                .paused_until
                .and_then(|until| until.checked_duration_since(now))
                .filter(|left| !left.is_zero()),
            breaker: self.breaker,
            fails: self.fails,
        }
    }
}

#[derive(Default)]
struct Provider {
    cached: Mutex<Option<Cached>>,
    /// One read at a time per provider: callers that find the copy stale wait for it.
    reading: tokio::sync::Mutex<()>,
}

/// The views of every provider this worker has called, refreshed on demand.
#[derive(Clone)]
pub(crate) struct FleetViews {
    pacer: Pacer,
    max_age: Duration,
    providers: Arc<Mutex<HashMap<String, Arc<Provider>>>>,
}

impl FleetViews {
    /// Views read through `pacer`, never used older than `max_age`.
    pub(crate) fn new(pacer: Pacer, max_age: Duration) -> Self {
        Self {
            pacer,
            max_age,
            providers: Arc::default(),
        }
    }

    fn provider(&self, name: &str) -> Arc<Provider> {
        let mut map = self.providers.lock().expect("views lock");
        map.entry(name.to_owned()).or_default().clone()
    }

    fn fresh(&self, p: &Provider, now: Instant) -> Option<FleetView> {
        let cached = p.cached.lock().expect("view lock");
        cached
            .filter(|c| now.duration_since(c.read_at) < self.max_age)
            .map(|c| c.view(now))
    }

    /// The provider's pause and breaker, read from Redis if this worker's copy is older than
    /// `max_age`.
    pub(crate) async fn get(&self, name: &str) -> Result<FleetView, StoreError> {
        let p = self.provider(name);
        if let Some(view) = self.fresh(&p, Instant::now()) {
            return Ok(view);
        }
        let _reading = p.reading.lock().await;
        // Another caller may have read it while this one waited.
        if let Some(view) = self.fresh(&p, Instant::now()) {
            return Ok(view);
        }
        let read_at = Instant::now();
        let view = self.pacer.view(name).await?;
        // The pause is counted from when its time left arrived, so it never ends early here.
        let cached = Cached {
            read_at,
            paused_until: view.paused_for.map(|left| Instant::now() + left),
            breaker: view.breaker,
            fails: view.fails,
        };
        *p.cached.lock().expect("view lock") = Some(cached);
        Ok(cached.view(Instant::now()))
    }

    /// Whether a success has nothing to tell the fleet: as last read or learnt, the breaker is
    /// closed with no failures counted (a success would reset them).
    pub(crate) fn quiet(&self, name: &str) -> bool {
        let p = self.provider(name);
        let cached = p.cached.lock().expect("view lock");
        cached.is_some_and(|c| c.breaker == BreakerState::Closed && c.fails == 0)
    }

    /// Records what this worker just reported (a pause it set, the breaker's state after its
    /// outcome), so its own next calls need not wait for a read.
    pub(crate) fn learn(
        &self,
        name: &str,
        pause: Option<Duration>,
        breaker: BreakerState,
        outcome: CallOutcome,
    ) {
        let p = self.provider(name);
        let mut cached = p.cached.lock().expect("view lock");
        let Some(c) = cached.as_mut() else { return };
        if let Some(pause) = pause {
            let until = Instant::now() + pause;
            c.paused_until = Some(c.paused_until.map_or(until, |u| u.max(until)));
        }
        c.breaker = breaker;
        // As the release script counts: a success or a 429 resets the failures, a failure adds one.
        match outcome {
            CallOutcome::Ok | CallOutcome::Throttled => c.fails = 0,
            CallOutcome::Failed => c.fails += 1,
            CallOutcome::Unused => {}
        }
    }
}
