//! `tenants[].budget`: the token and request budget of one tenant, per UTC day and month.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::validate::Problems;

/// A tenant's budget. Every limit is optional (unset = unlimited); usage is counted fleet-wide in
/// Redis from the answers' `usage`, one request per line sent upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetSettings {
    /// Tokens (`usage.total_tokens`) per UTC day.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    /// Lines sent upstream per UTC day (a line's retries count once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_day: Option<u64>,
    /// Tokens per UTC calendar month.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_month: Option<u64>,
    /// What a running batch's remaining lines do once the budget is spent.
    pub on_exhausted: OnExhausted,
    #[schemars(extend("x-advanced" = "a test clock; leave it unset in production"))]
    /// Test clock: a "day" lasts this many seconds (windows aligned on multiples of it since the
    /// Unix epoch) and a "month" 30 of them, so a test reaches a reset in seconds. Unset in
    /// production: UTC days and calendar months.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_secs: Option<u64>,
}

/// What a line does when its tenant's budget is spent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnExhausted {
    /// Wait in a delay queue until the window resets (the batch's `expires_at` still ends it).
    #[default]
    Wait,
    /// Fail with an error row `budget_exceeded`, without calling the upstream.
    Fail,
}

impl OnExhausted {
    /// The configuration word.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wait => "wait",
            Self::Fail => "fail",
        }
    }
}

impl BudgetSettings {
    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.tokens_per_day.is_some()
            || self.requests_per_day.is_some()
            || self.tokens_per_month.is_some()
    }
}

/// Range checks of one tenant's budget.
pub(super) fn check_budget(tenant: &str, budget: &BudgetSettings, found: &mut Problems) {
    const MAX_AMOUNT: u64 = 1 << 53;
    const MAX_WINDOW_SECS: u64 = 31 * 86_400;
    let key = |k: &str| format!("tenants[{tenant}].budget.{k}");
    for (k, v) in [
        ("tokens_per_day", budget.tokens_per_day),
        ("requests_per_day", budget.requests_per_day),
        ("tokens_per_month", budget.tokens_per_month),
    ] {
        if let Some(v) = v {
            found.within(key(k), v, 0..=MAX_AMOUNT);
        }
    }
    if let Some(v) = budget.window_secs {
        found.within(key("window_secs"), v, 1..=MAX_WINDOW_SECS);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::result_large_err)] // figment::Jail closures return figment::Error by design

    use std::path::Path;

    use super::*;
    use crate::config::Settings;

    const TENANT: &str = "[[tenants]]\nid = \"acme\"\napi_key_sha256 = []\n";

    fn load(budget: &str) -> Result<Settings, String> {
        let mut out = Err(String::new());
        figment::Jail::expect_with(|jail| {
            jail.create_file("s.toml", &format!("{TENANT}[tenants.budget]\n{budget}"))?;
            out = Settings::load(Some(Path::new("s.toml"))).map_err(|e| e.to_string());
            Ok(())
        });
        out
    }

    #[test]
    fn a_budget_loads_from_the_tenant_s_table() {
        let s = load(
            "tokens_per_day = 1000\nrequests_per_day = 10\ntokens_per_month = 20000\n\
             on_exhausted = \"fail\"\nwindow_secs = 5\n",
        )
        .unwrap();
        let budget = s.tenants[0].budget.clone().unwrap();
        assert_eq!(
            budget,
            BudgetSettings {
                tokens_per_day: Some(1_000),
                requests_per_day: Some(10),
                tokens_per_month: Some(20_000),
                on_exhausted: OnExhausted::Fail,
                window_secs: Some(5),
            }
        );
        assert!(budget.is_limited());
        let waits = load("requests_per_day = 1\n").unwrap();
        assert_eq!(
            waits.tenants[0].budget.as_ref().unwrap().on_exhausted,
            OnExhausted::Wait
        );
    }

    #[test]
    fn bad_budgets_are_refused_naming_the_key() {
        let err = load("on_exhausted = \"queue\"\n").unwrap_err();
        assert!(
            err.contains("on_exhausted") || err.contains("queue"),
            "{err}"
        );
        let err = load("tokens_per_dya = 5\n").unwrap_err();
        assert!(err.contains("tokens_per_dya"), "{err}");
        let err = load("window_secs = 0\n").unwrap_err();
        assert!(err.contains("tenants[acme].budget.window_secs"), "{err}");
        let err = load(&format!("tokens_per_day = {}\n", (1u64 << 53) + 1)).unwrap_err();
        assert!(err.contains("tenants[acme].budget.tokens_per_day"), "{err}");
    }
}
