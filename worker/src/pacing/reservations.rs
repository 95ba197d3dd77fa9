//! A worker's lines to one rate-paced provider ask the fleet limiter together.
//!
//! Each call to a provider with an `rpm` or `tpm` limit (and no `max_concurrency`, whose leases
//! are per call) needs a reserved start. Asked one by one, that is a script call per line.
//! Instead, lines that want a start join their provider's queue here, and one task per provider
//! asks for all of them at once ([`Pacer::acquire_many`]): the script reserves their starts in
//! order, exactly as that many single asks would.
//!
//! Lines arriving while an ask is out join the next one. While the fleet is booked ahead (the last
//! ask's latest start was in the future), the task also waits before asking, for at most half
//! of how far it is booked and `worker.pacing_coalesce_ms`, so more lines share an ask at no cost
//! in throughput. When the fleet is not booked ahead, it asks at once. Lines whose starts would be
//! past `reserve_ahead_ms` stay queued and ask again together (see [`Reservations::after_ask`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use sluice_core::pacing::{CallOutcome, Grant, Hold, PaceLimits, TokenUse};
use sluice_store::pacing::Pacer;
use tokio::sync::oneshot;

/// Most calls one ask reserves for.
const MAX_PER_ASK: usize = 256;

type Reply = oneshot::Sender<Result<Grant, String>>;

/// One line waiting for its start: its estimated token cost, and where its grant goes.
struct Waiter {
    tokens: u64,
    reply: Reply,
}

/// One provider's lines waiting for an ask.
#[derive(Default)]
struct Queue {
    waiting: Vec<Waiter>,
    /// Whether the provider's ask task runs (it exits once nothing waits).
    asking: bool,
    /// When the next ask may go, as the last one left it ([`Reservations::after_ask`]).
    next_ask: Option<Instant>,
}

/// The reservation queues of this worker's rate-paced providers.
#[derive(Clone)]
pub(crate) struct Reservations {
    pacer: Pacer,
    coalesce: Duration,
    queues: Arc<Mutex<HashMap<String, Queue>>>,
}

impl Reservations {
    /// Queues asking through `pacer`, waiting at most `coalesce` to ask together.
    pub(crate) fn new(pacer: Pacer, coalesce: Duration) -> Self {
        Self {
            pacer,
            coalesce,
            queues: Arc::default(),
        }
    }

    /// Whether calls to a provider with `limits` reserve their starts here: a rate limit and no
    /// concurrency limit.
    pub(crate) fn batches(limits: &PaceLimits) -> bool {
        limits.rate_limited() && !Pacer::leases(limits)
    }

    /// The fleet limiter's answer for one call costing `tokens` (estimated), asked with the other
    /// lines waiting for `provider`.
    pub(crate) async fn reserve(
        &self,
        provider: &str,
        limits: &PaceLimits,
        tokens: u64,
    ) -> anyhow::Result<Grant> {
        debug_assert!(Self::batches(limits));
        let (reply, answer) = oneshot::channel();
        {
            let mut queues = self.queues.lock().expect("reservations lock");
            let q = queues.entry(provider.to_owned()).or_default();
            q.waiting.push(Waiter { tokens, reply });
            if !q.asking {
                q.asking = true;
                let (this, provider, limits) = (self.clone(), provider.to_owned(), limits.clone());
                tokio::spawn(async move { this.ask_while_waited(&provider, &limits).await });
            }
        }
        match answer.await {
            Ok(Ok(grant)) => Ok(grant),
            Ok(Err(e)) => Err(anyhow::anyhow!("fleet limiter: {e}")),
            Err(_) => Err(anyhow::anyhow!("fleet limiter: the reservation task ended")),
        }
    }

    /// Asks for the provider's waiting lines, again and again, until none waits.
    async fn ask_while_waited(&self, provider: &str, limits: &PaceLimits) {
        loop {
            let next_ask = {
                let mut queues = self.queues.lock().expect("reservations lock");
                queues.get_mut(provider).and_then(|q| q.next_ask.take())
            };
            if let Some(at) = next_ask {
                tokio::time::sleep_until(at).await;
            }
            let asking = {
                let mut queues = self.queues.lock().expect("reservations lock");
                let q = queues.get_mut(provider).expect("queue of an asking task");
                // A line abandoned while it waited wants nothing.
                q.waiting.retain(|w| !w.reply.is_closed());
                if q.waiting.is_empty() {
                    q.asking = false;
                    return;
                }
                let n = q.waiting.len().min(MAX_PER_ASK);
                q.waiting.drain(..n).collect::<Vec<_>>()
            };
            let tokens: Vec<u64> = asking.iter().map(|w| w.tokens).collect();
            match self.pacer.acquire_many(provider, limits, &tokens, "").await {
                Ok(grants) => {
                    let latest = grants
                        .iter()
                        .filter_map(|g| match g {
                            Grant::Go { wait, .. } => Some(*wait),
                            Grant::Hold { .. } => None,
                        })
                        .max()
                        .unwrap_or(Duration::ZERO);
                    let (mut held, mut rate_wait) = (Vec::new(), Duration::ZERO);
                    for (waiter, grant) in asking.into_iter().zip(grants) {
                        if let Grant::Hold {
                            why: Hold::Rate,
                            wait,
                        } = grant
                        {
                            held.push(waiter);
                            rate_wait = wait;
                        } else if waiter.reply.send(Ok(grant)).is_err() {
                            self.give_back(provider, limits, waiter.tokens, grant).await;
                        }
                    }
                    self.after_ask(provider, held, latest, rate_wait, limits.reserve_ahead());
                }
                Err(e) => {
                    let e = e.to_string();
                    for waiter in asking {
                        // Nobody to tell: the line left.
                        waiter.reply.send(Err(e.clone())).ok();
                    }
                }
            }
        }
    }

    /// Sets when the next ask may go, keeping the lines the rate `held` at the head of the queue.
    ///
    /// Held lines keep their call slots, as a line waiting for its start does, and ask again once
    /// their starts (`wait` away) come within the reservation horizon `ahead`, and half of it
    /// more, so one ask takes many starts. Otherwise, while the fleet is booked ahead (the last
    /// start granted was `latest` away), the next ask waits for at most half of that and
    /// `coalesce`, so more lines share it. Either way the fleet stays booked past the wait, so it
    /// costs no throughput.
    fn after_ask(
        &self,
        provider: &str,
        held: Vec<Waiter>,
        latest: Duration,
        wait: Duration,
        ahead: Duration,
    ) {
        let linger = if held.is_empty() {
            (latest / 2).min(self.coalesce)
        } else {
            wait.saturating_sub(ahead) + ahead / 2
        };
        let mut queues = self.queues.lock().expect("reservations lock");
        let q = queues.get_mut(provider).expect("queue of an asking task");
        q.waiting.splice(0..0, held);
        q.next_ask = (!linger.is_zero()).then(|| Instant::now() + linger);
    }

    /// Returns the tokens a reservation charged for a line that left before its grant arrived
    /// (its request slot stays spent, as for any reservation not used).
    async fn give_back(&self, provider: &str, limits: &PaceLimits, tokens: u64, grant: Grant) {
        let Grant::Go { charged, .. } = grant else {
            return;
        };
        if charged == 0 {
            return;
        }
        let unused = TokenUse {
            estimate: tokens,
            charged,
            actual: None,
        };
        if let Err(e) = self
            .pacer
            .release(provider, limits, "", CallOutcome::Unused, unused, None)
            .await
        {
            tracing::debug!(provider, error = %e, "Could not give back an unused reservation.");
        }
    }
}
