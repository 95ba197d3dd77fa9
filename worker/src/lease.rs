//! A Redis lease held while one replica works on a batch, renewed in the background.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sluice_store::Store;
use tokio_util::sync::CancellationToken;

/// Proof of holding a lease. Dropping it stops renewal; call [`Lease::release`] to give it back early.
#[derive(Debug)]
pub(crate) struct Lease {
    store: Store,
    key: String,
    token: String,
    lost: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Lease {
    /// Takes `key` if free, renewing it every third of `ttl` until released or dropped.
    pub(crate) async fn acquire(
        store: &Store,
        key: String,
        ttl: Duration,
    ) -> Result<Option<Self>, sluice_store::StoreError> {
        let Some(token) = store.acquire_lease(&key, ttl).await? else {
            return Ok(None);
        };
        let lost = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let (s, k, t, l, st) = (
            store.clone(),
            key.clone(),
            token.clone(),
            lost.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = st.cancelled() => return,
                    _ = tokio::time::sleep(ttl / 3) => {}
                }
                match s.renew_lease(&k, &t, ttl).await {
                    Ok(true) => {}
                    Ok(false) => {
                        l.store(true, Ordering::SeqCst);
                        return;
                    }
                    // A Redis blip: keep trying; the lease stays valid until its TTL anyway.
                    Err(e) => tracing::warn!(error = %e, "Could not renew a lease."),
                }
            }
        });
        Ok(Some(Self {
            store: store.clone(),
            key,
            token,
            lost,
            stop,
        }))
    }

    /// Whether another replica may have taken over (work must stop).
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Gives the lease back.
    pub(crate) async fn release(self) {
        self.stop.cancel();
        if let Err(e) = self.store.release_lease(&self.key, &self.token).await {
            tracing::warn!(error = %e, "Could not release a lease; it will expire.");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
