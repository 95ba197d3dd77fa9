//! Per-process smoothing under the fleet limiter.
//!
//! The fleet-wide limits live in Redis ([`sluice_store::pacing`]): every call reserves its start
//! there. Inside one process a `governor` limiter per provider with an RPM limit spaces the asks
//! first, at the fleet rate and burst, so one worker never sends the shared limiter more requests
//! than the whole fleet may make, and a burst of lines arriving together in one worker waits here
//! (no Redis round trip) instead of each asking Redis for a reservation far ahead.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sluice_core::config::ProviderSettings;

/// One limiter per provider that has an RPM limit.
#[derive(Clone, Default)]
pub(crate) struct LocalPace(Arc<HashMap<String, DefaultDirectRateLimiter>>);

impl LocalPace {
    /// Limiters for the providers with `pacing.rpm`, at that rate with `pacing.burst_ms` of burst.
    pub(crate) fn new(providers: &[ProviderSettings]) -> Self {
        let limiters = providers
            .iter()
            .filter_map(|p| {
                let rpm = p.pacing.rpm.filter(|r| *r > 0)?;
                let period = Duration::from_secs_f64(60.0 / rpm as f64);
                let burst_ms = p.pacing.burst_ms.unwrap_or(1_000);
                let burst = ((rpm * burst_ms) / 60_000).clamp(1, u32::MAX as u64) as u32;
                let quota = Quota::with_period(period)?
                    .allow_burst(NonZeroU32::new(burst).expect("clamped to at least 1"));
                Some((p.name.clone(), RateLimiter::direct(quota)))
            })
            .collect();
        Self(Arc::new(limiters))
    }

    /// Waits until this process may ask the fleet limiter for a call to `provider`.
    pub(crate) async fn until_ready(&self, provider: &str) {
        if let Some(limiter) = self.0.get(provider) {
            limiter.until_ready().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(rpm: Option<u64>) -> ProviderSettings {
        ProviderSettings {
            name: "p".into(),
            base_url: "http://127.0.0.1:1".into(),
            api_key_env: None,
            models: vec!["m".into()],
            endpoints: Vec::new(),
            batch: true,
            flavors: Vec::new(),
            pacing: sluice_core::config::PacingSettings {
                rpm,
                ..Default::default()
            },
            refused_body_fields: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_provider_with_an_rpm_limit_is_spaced_after_its_burst() {
        // 1,200 RPM: 20 per second, burst of 20 (1 s).
        let pace = LocalPace::new(&[provider(Some(1_200))]);
        let limiter = pace.0.get("p").expect("limiter");
        let allowed = (0..40).filter(|_| limiter.check().is_ok()).count();
        assert_eq!(allowed, 20);
    }

    #[tokio::test]
    async fn a_provider_without_an_rpm_limit_has_no_local_limiter() {
        let pace = LocalPace::new(&[provider(None)]);
        assert!(pace.0.is_empty());
        pace.until_ready("p").await;
    }
}
