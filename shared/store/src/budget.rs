//! Per-tenant token and request budgets, counted fleet-wide in Redis.
//!
//! Usage is counted per UTC day and per UTC calendar month (or per test-clock window,
//! `tenants[].budget.window_secs`), in one hash per tenant and window. A line counts as one request
//! when it is let through to its upstream call (its retries do not count again) and adds its
//! answer's `usage.total_tokens` once the answer is in. Both are recorded against a per-batch
//! bitmap in the tenant's hash slot, so a redelivered line never counts twice.
//!
//! Requests are checked and counted in one script, so a request limit is never passed; tokens are
//! known only after a call, so a token limit can be passed by the calls in flight when it runs out.

use std::sync::LazyLock;

use chrono::{DateTime, Datelike, NaiveDate};
use redis::Script;

use crate::Store;
use crate::StoreError;
use sluice_core::config::BudgetSettings;

const DAY_SECS: i64 = 86_400;
/// A test-clock month is this many test-clock days.
const TEST_MONTH_DAYS: i64 = 30;
/// A window's counters outlive its end by this much (or one window, when longer), so the last
/// windows stay readable.
const KEEP_AFTER_END_SECS: i64 = 3_600;

/// The two budget windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// A calendar day (UTC).
    Day,
    /// A calendar month (UTC).
    Month,
}

impl WindowKind {
    /// `day` / `month`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
        }
    }

    /// `daily` / `monthly`, for messages.
    fn adjective(self) -> &'static str {
        match self {
            Self::Day => "daily",
            Self::Month => "monthly",
        }
    }
}

/// One window: `[start, end)` in unix seconds; `end` is when its budget resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Day or month.
    pub kind: WindowKind,
    /// Unix s the window starts.
    pub start: i64,
    /// Unix s the window ends (exclusive).
    pub end: i64,
}

impl Window {
    /// The day and the month holding `now` (unix seconds), on the test clock when `window_secs`
    /// is set.
    pub fn current(now: i64, window_secs: Option<u64>) -> [Self; 2] {
        let aligned = |kind, len: i64| {
            let start = now - now.rem_euclid(len);
            Self {
                kind,
                start,
                end: start + len,
            }
        };
        match window_secs {
            Some(w) => {
                let w = w.max(1) as i64;
                [
                    aligned(WindowKind::Day, w),
                    aligned(WindowKind::Month, w * TEST_MONTH_DAYS),
                ]
            }
            None => [aligned(WindowKind::Day, DAY_SECS), calendar_month(now)],
        }
    }

    fn key_part(&self) -> String {
        match self.kind {
            WindowKind::Day => format!("d{}", self.start),
            WindowKind::Month => format!("m{}", self.start),
        }
    }

    /// When the window's counters may go (unix ms).
    fn keep_until_ms(&self) -> i64 {
        (self.end + (self.end - self.start).max(KEEP_AFTER_END_SECS)) * 1000
    }
}

/// The UTC calendar month holding `now`.
fn calendar_month(now: i64) -> Window {
    let first_of = |year: i32, month: u32| {
        NaiveDate::from_ymd_opt(year, month, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc().timestamp())
    };
    let date = DateTime::from_timestamp(now, 0)
        .map(|t| t.date_naive())
        .unwrap_or_default();
    let (next_year, next_month) = if date.month() == 12 {
        (date.year() + 1, 1)
    } else {
        (date.year(), date.month() + 1)
    };
    match (
        first_of(date.year(), date.month()),
        first_of(next_year, next_month),
    ) {
        (Some(start), Some(end)) => Window {
            kind: WindowKind::Month,
            start,
            end,
        },
        // Out of chrono's range (a clock gone mad): a day-long window rather than a panic.
        _ => Window {
            kind: WindowKind::Month,
            start: now,
            end: now + DAY_SECS,
        },
    }
}

/// What a tenant used in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    /// Requests counted.
    pub requests: u64,
    /// Tokens counted.
    pub tokens: u64,
}

/// A window and what was used in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowUsage {
    /// The window.
    pub window: Window,
    /// What it used.
    pub used: Used,
}

/// A budget found spent: which limit, and when it resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spent {
    /// The window whose limit is reached.
    pub window: Window,
    /// `tokens` or `requests`.
    pub what: &'static str,
    /// The limit reached.
    pub limit: u64,
}

impl Spent {
    /// Unix seconds at which the budget resets.
    pub fn reset_at(&self) -> i64 {
        self.window.end
    }

    /// The reset time in RFC 3339 (`2026-12-05T00:00:00Z`).
    pub fn reset_rfc3339(&self) -> String {
        DateTime::from_timestamp(self.reset_at(), 0).map_or_else(
            || self.reset_at().to_string(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
    }

    /// The sentence a client reads (the API's 429, a failed line's error row).
    pub fn message(&self) -> String {
        format!(
            "The {} {} budget of this tenant ({} {}) is spent; it resets at {} (unix {}).",
            self.window.kind.adjective(),
            if self.what == "tokens" {
                "token"
            } else {
                "request"
            },
            self.limit,
            self.what,
            self.reset_rfc3339(),
            self.reset_at(),
        )
    }
}

/// The limit `usage` has reached, if any. A spent month wins over a spent day: its reset is later,
/// and nothing runs before it.
pub fn spent(budget: &BudgetSettings, usage: &[WindowUsage; 2]) -> Option<Spent> {
    let [day, month] = usage;
    let over = |used: u64, limit: Option<u64>| limit.filter(|l| used >= *l);
    if let Some(limit) = over(month.used.tokens, budget.tokens_per_month) {
        return Some(Spent {
            window: month.window,
            what: "tokens",
            limit,
        });
    }
    if let Some(limit) = over(day.used.tokens, budget.tokens_per_day) {
        return Some(Spent {
            window: day.window,
            what: "tokens",
            limit,
        });
    }
    over(day.used.requests, budget.requests_per_day).map(|limit| Spent {
        window: day.window,
        what: "requests",
        limit,
    })
}

/// One line of a batch, as the budget counts it.
#[derive(Debug, Clone, Copy)]
pub struct BilledLine<'a> {
    /// The tenant billed.
    pub tenant: &'a str,
    /// The batch of the line.
    pub batch: &'a str,
    /// The line (0-based).
    pub line: u64,
    /// The batch's `expires_at` (unix seconds): the line cannot run after it, so its marks can go.
    pub batch_expires_at: Option<i64>,
}

/// What one charge counted (zeros when the line had already counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counted {
    /// Requests counted by this call.
    pub requests: u64,
    /// Tokens counted by this call.
    pub tokens: u64,
}

/// What an admission decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The line may call; what this admission counted (nothing for a line that already counted).
    Go(Counted),
    /// The budget is spent; nothing was counted.
    Spent(Spent),
}

/// KEYS: day hash, month hash, the batch's billed bitmap. ARGV: line, tokens to add, admit flag
/// (`1`: refuse a line not yet counted when a limit is reached), the request/day, token/day and
/// token/month limits (`-1` = none), then the expiries (unix ms) of the three keys.
/// Reply: `{0, requests counted, tokens counted}`, or `{1, day requests, day tokens, month
/// requests, month tokens}` when refused.
static CHARGE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/charge_budget.lua")));

/// A line's marks stay this long past its batch's `expires_at` (or from now, when it has none).
const BILLED_GRACE_MS: i64 = 3_600_000;
const BILLED_WITHOUT_DEADLINE_MS: i64 = 8 * DAY_SECS * 1000;

impl Store {
    /// Lets `line` through to its call unless `budget` is spent; a line let through counts one
    /// request, once whatever its redeliveries.
    pub async fn budget_admit(
        &self,
        budget: &BudgetSettings,
        line: BilledLine<'_>,
        now_ms: i64,
    ) -> Result<Admit, StoreError> {
        let limit = |l: Option<u64>| l.map_or(-1, |v| v.min(i64::MAX as u64) as i64);
        let limits = [
            limit(budget.requests_per_day),
            limit(budget.tokens_per_day),
            limit(budget.tokens_per_month),
        ];
        let windows = Window::current(now_ms / 1000, budget.window_secs);
        let reply = self
            .charge_script(line, 0, Some(limits), &windows, now_ms)
            .await?;
        match reply.as_slice() {
            [0, requests, _] => Ok(Admit::Go(Counted {
                requests: (*requests).max(0) as u64,
                tokens: 0,
            })),
            [1, dr, dt, mr, mt] => {
                let used = |r: i64, t: i64| Used {
                    requests: r.max(0) as u64,
                    tokens: t.max(0) as u64,
                };
                let usage = [
                    WindowUsage {
                        window: windows[0],
                        used: used(*dr, *dt),
                    },
                    WindowUsage {
                        window: windows[1],
                        used: used(*mr, *mt),
                    },
                ];
                spent(budget, &usage).map(Admit::Spent).ok_or_else(|| {
                    StoreError::Protocol(format!("budget: refused under the limits: {reply:?}"))
                })
            }
            _ => Err(StoreError::Protocol(format!("budget: {reply:?}"))),
        }
    }

    /// Counts a called line's request (if its admission did not) and its answer's `tokens`, each
    /// once per line.
    pub async fn budget_charge(
        &self,
        window_secs: Option<u64>,
        line: BilledLine<'_>,
        tokens: u64,
        now_ms: i64,
    ) -> Result<Counted, StoreError> {
        let windows = Window::current(now_ms / 1000, window_secs);
        let reply = self
            .charge_script(line, tokens, None, &windows, now_ms)
            .await?;
        match reply.as_slice() {
            [0, requests, tokens] => Ok(Counted {
                requests: (*requests).max(0) as u64,
                tokens: (*tokens).max(0) as u64,
            }),
            _ => Err(StoreError::Protocol(format!("budget: {reply:?}"))),
        }
    }

    async fn charge_script(
        &self,
        line: BilledLine<'_>,
        tokens: u64,
        admit: Option<[i64; 3]>,
        windows: &[Window; 2],
        now_ms: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let keys = self.keys();
        let billed_until = line
            .batch_expires_at
            .map_or(now_ms + BILLED_WITHOUT_DEADLINE_MS, |at| {
                at.saturating_mul(1000) + BILLED_GRACE_MS
            });
        let mut inv = CHARGE.key(keys.tenant_budget(line.tenant, &windows[0].key_part()));
        inv.key(keys.tenant_budget(line.tenant, &windows[1].key_part()))
            .key(keys.tenant_billed(line.tenant, line.batch))
            .arg(line.line)
            .arg(tokens)
            .arg(if admit.is_some() { "1" } else { "0" });
        for limit in admit.unwrap_or([-1; 3]) {
            inv.arg(limit);
        }
        inv.arg(windows[0].keep_until_ms())
            .arg(windows[1].keep_until_ms())
            .arg(billed_until);
        Ok(inv.invoke_async(&mut self.conn()).await?)
    }

    /// Adds the usage of lines that just got their rows (`requests` lines, `tokens` tokens) to
    /// `tenant`'s current day and month, in one round trip for many lines. For tenants without
    /// limits: nothing is enforced from these counts, so a line is not marked (a worker dying
    /// between writing rows and this call leaves them uncounted, never counted twice).
    pub async fn budget_add(
        &self,
        tenant: &str,
        window_secs: Option<u64>,
        used: Used,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if used.requests == 0 && used.tokens == 0 {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for w in Window::current(now_ms / 1000, window_secs) {
            let key = self.keys().tenant_budget(tenant, &w.key_part());
            pipe.cmd("HINCRBY")
                .arg(&key)
                .arg("requests")
                .arg(used.requests)
                .ignore()
                .cmd("HINCRBY")
                .arg(&key)
                .arg("tokens")
                .arg(used.tokens)
                .ignore()
                .cmd("PEXPIREAT")
                .arg(&key)
                .arg(w.keep_until_ms())
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn()).await?;
        Ok(())
    }

    /// What `tenant` used in the current day and month.
    pub async fn budget_usage(
        &self,
        tenant: &str,
        window_secs: Option<u64>,
        now_secs: i64,
    ) -> Result<[WindowUsage; 2], StoreError> {
        let windows = Window::current(now_secs, window_secs);
        let mut pipe = redis::pipe();
        for w in &windows {
            pipe.cmd("HMGET")
                .arg(self.keys().tenant_budget(tenant, &w.key_part()))
                .arg("requests")
                .arg("tokens");
        }
        let counts: Vec<(Option<u64>, Option<u64>)> = pipe.query_async(&mut self.conn()).await?;
        let used = |i: usize| {
            let (requests, tokens) = counts.get(i).copied().unwrap_or_default();
            Used {
                requests: requests.unwrap_or(0),
                tokens: tokens.unwrap_or(0),
            }
        };
        Ok([
            WindowUsage {
                window: windows[0],
                used: used(0),
            },
            WindowUsage {
                window: windows[1],
                used: used(1),
            },
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp()
    }

    #[test]
    fn windows_are_the_utc_day_and_calendar_month() {
        let [day, month] = Window::current(at("2024-02-29T13:45:00Z"), None);
        assert_eq!(
            (day.start, day.end),
            (at("2024-02-29T00:00:00Z"), at("2024-03-01T00:00:00Z"))
        );
        assert_eq!(
            (month.start, month.end),
            (at("2024-02-01T00:00:00Z"), at("2024-03-01T00:00:00Z"))
        );
        let [_, december] = Window::current(at("2026-12-31T23:59:59Z"), None);
        assert_eq!(december.end, at("2027-01-01T00:00:00Z"));
        // The first second of a window belongs to it.
        let [day, _] = Window::current(at("2026-12-05T00:00:00Z"), None);
        assert_eq!(day.start, at("2026-12-05T00:00:00Z"));
    }

    #[test]
    fn the_test_clock_shortens_both_windows() {
        let [day, month] = Window::current(1_000_007, Some(10));
        assert_eq!((day.start, day.end), (1_000_000, 1_000_010));
        assert_eq!((month.start, month.end), (999_900, 1_000_200));
        assert_ne!(day.key_part(), month.key_part());
    }

    #[test]
    fn a_spent_month_wins_and_unset_limits_never_spend() {
        let [d, m] = Window::current(at("2026-12-04T20:00:00Z"), None);
        let usage = |day: (u64, u64), month: u64| {
            [
                WindowUsage {
                    window: d,
                    used: Used {
                        requests: day.0,
                        tokens: day.1,
                    },
                },
                WindowUsage {
                    window: m,
                    used: Used {
                        requests: 0,
                        tokens: month,
                    },
                },
            ]
        };
        let budget = BudgetSettings {
            tokens_per_day: Some(100),
            requests_per_day: Some(5),
            tokens_per_month: Some(1_000),
            ..BudgetSettings::default()
        };
        assert_eq!(spent(&budget, &usage((4, 99), 999)), None);
        let day = spent(&budget, &usage((5, 0), 0)).unwrap();
        assert_eq!(
            (day.what, day.limit, day.reset_at()),
            ("requests", 5, d.end)
        );
        assert_eq!(spent(&budget, &usage((0, 100), 0)).unwrap().what, "tokens");
        let month = spent(&budget, &usage((5, 100), 1_000)).unwrap();
        assert_eq!(
            (month.window.kind, month.reset_at()),
            (WindowKind::Month, m.end)
        );
        assert!(
            month
                .message()
                .contains("monthly token budget of this tenant (1000 tokens)"),
            "{}",
            month.message()
        );
        assert!(month.message().contains("2027-01-01T00:00:00Z"));
        assert_eq!(
            spent(
                &BudgetSettings::default(),
                &usage((1 << 40, 1 << 40), 1 << 40)
            ),
            None
        );
    }
}
