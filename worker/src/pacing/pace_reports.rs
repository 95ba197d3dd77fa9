//! Successful calls to a rate-paced provider, reported to the fleet limiter together.
//!
//! A success changes little in the limiter: it corrects the token bucket by (actual − charged)
//! tokens, moves the learnt actual/estimate ratio, and resets the breaker's failure count. Summed
//! over `worker.pacing_report_ms`, one script call carries them all instead of one per line.
//! What must act at once is still reported per call: failures, 429s, pauses, breaker probes, and
//! every call of a provider with a concurrency limit (its lease must come back).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_core::pacing::{PaceLimits, Successes};
use sluice_store::pacing::Pacer;

/// Per provider: the successes not yet reported, and whether a flush is scheduled.
#[derive(Default)]
struct Pending {
    sum: Successes,
    limits: Option<PaceLimits>,
    flushing: bool,
}

/// The successes each provider's calls have not reported yet.
#[derive(Clone)]
pub(crate) struct PaceReports {
    pacer: Pacer,
    every: Duration,
    pending: Arc<Mutex<HashMap<String, Pending>>>,
}

impl PaceReports {
    /// Reports through `pacer`, each provider's successes summed over `every`.
    pub(crate) fn new(pacer: Pacer, every: Duration) -> Self {
        Self {
            pacer,
            every,
            pending: Arc::default(),
        }
    }

    /// Adds one successful call; the first one of a period schedules its flush.
    pub(crate) fn add(&self, provider: &str, limits: &PaceLimits, call: Successes) {
        let mut pending = self.pending.lock().expect("reports lock");
        let p = pending.entry(provider.to_owned()).or_default();
        p.sum.add(call);
        if p.limits.is_none() {
            p.limits = Some(limits.clone());
        }
        if !p.flushing {
            p.flushing = true;
            let (this, provider) = (self.clone(), provider.to_owned());
            tokio::spawn(async move { this.flush_until_idle(&provider).await });
        }
    }

    /// Every period, reports what arrived during it; stops after a period with nothing.
    async fn flush_until_idle(&self, provider: &str) {
        loop {
            tokio::time::sleep(self.every).await;
            let (sum, limits) = {
                let mut pending = self.pending.lock().expect("reports lock");
                let Some(p) = pending.get_mut(provider) else {
                    return;
                };
                if p.sum.calls == 0 {
                    p.flushing = false;
                    return;
                }
                (std::mem::take(&mut p.sum), p.limits.clone())
            };
            let Some(limits) = limits else { continue };
            if let Err(e) = self.pacer.report_successes(provider, &limits, sum).await {
                // Lost corrections only leave the token bucket charged by estimates for a while.
                tracing::warn!(provider, error = %e, "Could not report successes to the fleet limiter.");
            }
        }
    }
}
