//! A worker's lines of one batch ask the call gate again together.
//!
//! A line that waited (for a call slot, for its reserved start) asks the gate again before its call,
//! so a cancel or expiry stops it. Asked one by one, that is a script call per line on a paced
//! provider, where every line waits. Instead, a line says when it will call, and one task per batch
//! asks for every line of that batch calling within the next [`FRESH`] with one script call, when
//! the earliest of them is due. Each line's answer is then at most [`FRESH`] old when it calls: the
//! bound a cancel stops calls within, as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_core::domain::now_millis;
use sluice_store::{CallGate, Store};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

/// Oldest gate answer a line may call on.
pub(crate) const FRESH: Duration = Duration::from_millis(250);

/// Lines due this much later than the ask are not taken by it: their answer would be too old by
/// the time the script's answer arrives and they call.
const MARGIN: Duration = Duration::from_millis(25);

type Reply = oneshot::Sender<Result<CallGate, String>>;

struct Check {
    line: u64,
    call_at: Instant,
    reply: Reply,
}

#[derive(Default)]
struct Batch {
    waiting: Vec<Check>,
    /// Woken when a line due earlier than the others arrives.
    wake: Arc<Notify>,
}

/// The gate checks of this worker's lines, by batch.
#[derive(Clone)]
pub(crate) struct GateChecks {
    store: Store,
    /// How long a gate's in-flight mark lasts from its check: one call and the longest hold.
    in_flight_for: Duration,
    batches: Arc<Mutex<HashMap<String, Batch>>>,
}

impl GateChecks {
    /// Checks through `store` that mark lines in flight for `in_flight_for`.
    pub(crate) fn new(store: Store, in_flight_for: Duration) -> Self {
        Self {
            store,
            in_flight_for,
            batches: Arc::default(),
        }
    }

    /// The gate's answer for `line` of `batch`, which calls at `call_at`: asked at most [`FRESH`]
    /// before then, with the batch's other lines due about then. Marks the line in flight when the
    /// answer is [`CallGate::Go`].
    pub(crate) async fn check(
        &self,
        batch: &str,
        line: u64,
        call_at: Instant,
    ) -> anyhow::Result<CallGate> {
        let (reply, answer) = oneshot::channel();
        {
            let mut batches = self.batches.lock().expect("gate checks lock");
            let spawn = !batches.contains_key(batch);
            let b = batches.entry(batch.to_owned()).or_default();
            let earliest = b.waiting.iter().map(|c| c.call_at).min();
            b.waiting.push(Check {
                line,
                call_at,
                reply,
            });
            if spawn {
                let (this, batch) = (self.clone(), batch.to_owned());
                tokio::spawn(async move { this.check_while_waited(&batch).await });
            } else if earliest.is_none_or(|e| call_at < e) {
                b.wake.notify_one();
            }
        }
        match answer.await {
            Ok(Ok(gate)) => Ok(gate),
            Ok(Err(e)) => Err(anyhow::anyhow!("call gate: {e}")),
            Err(_) => Err(anyhow::anyhow!("call gate: the check task ended")),
        }
    }

    /// Asks for the batch's lines as they come due, until none waits.
    async fn check_while_waited(&self, batch: &str) {
        loop {
            let (earliest, wake) = {
                let mut batches = self.batches.lock().expect("gate checks lock");
                let b = batches.get_mut(batch).expect("batch of a checking task");
                // A line abandoned while it waited wants nothing.
                b.waiting.retain(|c| !c.reply.is_closed());
                let Some(earliest) = b.waiting.iter().map(|c| c.call_at).min() else {
                    batches.remove(batch);
                    return;
                };
                (earliest, b.wake.clone())
            };
            if earliest > Instant::now() {
                tokio::select! {
                    _ = tokio::time::sleep_until(earliest) => {}
                    _ = wake.notified() => continue,
                }
            }
            let due = {
                let mut batches = self.batches.lock().expect("gate checks lock");
                let b = batches.get_mut(batch).expect("batch of a checking task");
                let horizon = Instant::now() + FRESH - MARGIN;
                let (due, later): (Vec<Check>, Vec<Check>) = std::mem::take(&mut b.waiting)
                    .into_iter()
                    .partition(|c| c.call_at <= horizon);
                b.waiting = later;
                due
            };
            if due.is_empty() {
                continue;
            }
            let lines: Vec<u64> = due.iter().map(|c| c.line).collect();
            let deadline = now_millis() + self.in_flight_for.as_millis() as i64;
            match self.store.begin_calls(batch, &lines, deadline).await {
                Ok(gates) => {
                    for (check, gate) in due.into_iter().zip(gates) {
                        // A line that left (its worker abandons its lines) while the gate marked
                        // it in flight must not hold its batch's drain until the mark expires.
                        if check.reply.send(Ok(gate)).is_err()
                            && gate == CallGate::Go
                            && let Err(e) = self.store.end_call(batch, check.line).await
                        {
                            tracing::debug!(error = %e, "Could not clear an in-flight mark; it expires.");
                        }
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    for check in due {
                        // Nobody to tell: the line left.
                        check.reply.send(Err(e.clone())).ok();
                    }
                }
            }
        }
    }
}
