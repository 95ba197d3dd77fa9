//! Scheduling of a rate-limited provider: which running batch gets how many lines in the work
//! queue, fleet-wide.
//!
//! Lines wait for a provider's rate limit in one queue, served in arrival order, so a batch's share
//! of the provider's throughput is its share of the lines waiting (Little's law). The dispatcher
//! therefore schedules by sizing each batch's window (lines dispatched and not yet finished):
//!
//! 1. the provider's windows hold `rate × (batch_window_secs + upstream latency)` lines together,
//!    enough to keep it busy and few enough that a new plan takes effect within seconds;
//! 2. `high` and `normal` batches share it first, `background` batches only get what they leave
//!    unused;
//! 3. among tenants, the share follows `tenants[].weight` (water-filling: a tenant that needs
//!    less than its share leaves the rest to the others), whatever the number of their batches;
//! 4. within a tenant, every batch gets a floor (`worker.min_batch_share` of the tenant's share,
//!    split among its batches) against starvation, and the rest goes `high` first, then least
//!    slack first: slack = time to `expires_at` − remaining lines ÷ the provider's rate.
//!
//! Every running batch's dispatcher publishes its [`Entry`] in the provider's registry (a Redis
//! hash) and computes the same [`plan`] from it, so replicas agree without a leader.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// A batch's priority tier (`priority` create field, or the `priority` metadata key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Served first, and first within its tenant.
    High,
    /// The default tier.
    Normal,
    /// Only gets what the other tiers leave unused.
    Background,
}

impl Priority {
    /// Every tier's wire name.
    pub const ALL: [&'static str; 3] = ["high", "normal", "background"];

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "high" => Some(Self::High),
            "normal" => Some(Self::Normal),
            "background" => Some(Self::Background),
            _ => None,
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Normal => "normal",
            Self::Background => "background",
        }
    }
}

/// An entry older than this is a batch whose dispatcher stopped: it no longer counts.
pub const STALE_MS: i64 = 3_000;

/// One running batch as its dispatcher last saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The tenant owning the batch.
    pub tenant: String,
    /// The batch's tier.
    pub priority: Priority,
    /// Unix seconds.
    pub expires_at: i64,
    /// Lines without a row yet.
    pub remaining: u64,
    /// Lines dispatched and without a row yet.
    #[serde(default)]
    pub inflight: u64,
    /// The batch's own recent throughput, lines per second.
    pub rate: f64,
    /// When this entry was written (unix ms).
    pub seen_ms: i64,
}

/// Knobs of [`plan`].
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Lines the provider's windows hold together.
    pub total: u64,
    /// The provider's rate, lines per second (slack and risk estimates).
    pub rate: f64,
    /// Fraction of a tenant's share split evenly among its batches before deadline order applies.
    pub min_share: f64,
    /// Unix seconds.
    pub now: i64,
}

/// What [`plan`] decided.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    /// Batch id → its window, in lines (0: publish nothing for now).
    pub windows: HashMap<String, u64>,
    /// Batch id → its window before rounding to whole lines.
    pub exact: HashMap<String, f64>,
    /// Foreground tenant → the fraction of the foreground throughput its weight gives it, while
    /// two or more foreground tenants each want more than their share (empty otherwise: nobody
    /// is held back, so there is no share to keep).
    pub contended: BTreeMap<String, f64>,
    /// Batches that cannot finish before `expires_at` at the rate their window gives them.
    pub at_risk: Vec<String>,
}

/// Seconds of slack of a batch: time left to its deadline minus the time its remaining lines need
/// at the provider's whole `rate`.
pub fn slack(entry: &Entry, rate: f64, now: i64) -> f64 {
    (entry.expires_at - now) as f64 - entry.remaining as f64 / rate.max(1e-6)
}

/// Slacks closer than this are equal for the order (then batch id: a fixed order): batches whose slacks
/// cross back and forth as each runs would otherwise take turns at the whole share, and each turn
/// leaves the previous one's lines queued on top of the new one's.
const SLACK_STEP_SECS: f64 = 60.0;

fn slack_step(entry: &Entry, rate: f64, now: i64) -> i64 {
    (slack(entry, rate, now) / SLACK_STEP_SECS).floor() as i64
}

/// Splits `amount` among claimants by weight, none getting more than its demand; what a
/// claimant cannot use goes to the others (water-filling).
fn water_fill(amount: f64, claims: &[(f64, f64)]) -> Vec<f64> {
    let mut given = vec![0.0; claims.len()];
    let mut open: Vec<usize> = (0..claims.len()).filter(|&i| claims[i].1 > 0.0).collect();
    let mut left = amount;
    while !open.is_empty() && left > 1e-9 {
        let weights: f64 = open.iter().map(|&i| claims[i].0).sum();
        let (full, rest): (Vec<usize>, Vec<usize>) = open
            .iter()
            .partition(|&&i| claims[i].1 - given[i] <= left * claims[i].0 / weights);
        if full.is_empty() {
            for &i in &open {
                given[i] += left * claims[i].0 / weights;
            }
            break;
        }
        for i in full {
            left -= claims[i].1 - given[i];
            given[i] = claims[i].1;
        }
        open = rest;
    }
    given
}

/// The windows of every batch of one provider. `weight` gives a tenant's weight.
pub fn plan(entries: &[(String, Entry)], shape: Shape, weight: impl Fn(&str) -> f64) -> Plan {
    let mut windows: HashMap<String, f64> = HashMap::new();
    let mut contended = BTreeMap::new();
    let mut left = shape.total as f64;
    // Foreground first; background shares what foreground cannot use.
    for background in [false, true] {
        let tier: Vec<&(String, Entry)> = entries
            .iter()
            .filter(|(_, e)| (e.priority == Priority::Background) == background)
            .collect();
        let mut tenants: BTreeMap<&str, Vec<&(String, Entry)>> = BTreeMap::new();
        for item in &tier {
            tenants
                .entry(item.1.tenant.as_str())
                .or_default()
                .push(item);
        }
        let claims: Vec<(f64, f64)> = tenants
            .iter()
            .map(|(t, batches)| {
                let demand: u64 = batches.iter().map(|(_, e)| e.remaining).sum();
                (weight(t).max(1e-6), demand as f64)
            })
            .collect();
        let shares = water_fill(left, &claims);
        let all_held_back = claims.len() >= 2
            && claims
                .iter()
                .zip(&shares)
                .all(|((_, demand), share)| share + 1e-9 < *demand);
        let tier_share: f64 = shares.iter().sum();
        if !background && all_held_back && tier_share > 0.0 {
            for ((tenant, _), share) in tenants.iter().zip(&shares) {
                contended.insert((*tenant).to_owned(), share / tier_share);
            }
        }
        for ((_, batches), share) in tenants.iter_mut().zip(shares) {
            left -= share;
            for (id, w) in within_tenant(batches, share, shape) {
                windows.insert(id, w);
            }
        }
    }
    let sum: f64 = windows.values().sum();
    let mut plan = Plan {
        contended,
        ..Plan::default()
    };
    for (id, entry) in entries {
        let w = windows.get(id).copied().unwrap_or(0.0);
        // A batch that gets any share gets a whole line, or it would never move.
        let lines = if w > 0.0 {
            w.round().max(1.0) as u64
        } else {
            0
        };
        let own_rate = if sum > 0.0 { shape.rate * w / sum } else { 0.0 };
        let left_secs = (entry.expires_at - shape.now) as f64;
        if entry.remaining > 0 && entry.remaining as f64 > own_rate * left_secs {
            plan.at_risk.push(id.clone());
        }
        plan.windows.insert(id.clone(), lines);
        plan.exact.insert(id.clone(), w);
    }
    plan.at_risk.sort();
    plan
}

/// One tenant's `share` among its batches: an even floor, then `high` first and least slack first.
fn within_tenant(batches: &mut [&(String, Entry)], share: f64, shape: Shape) -> Vec<(String, f64)> {
    batches.sort_by(|(a_id, a), (b_id, b)| {
        a.priority
            .cmp(&b.priority)
            .then(slack_step(a, shape.rate, shape.now).cmp(&slack_step(b, shape.rate, shape.now)))
            .then(a_id.cmp(b_id))
    });
    // At least a whole line, or a batch whose floor rounds up would take more than the tenant's
    // share, and one whose floor rounds down would starve.
    let floor = (share * shape.min_share.clamp(0.0, 1.0) / batches.len().max(1) as f64).max(1.0);
    let mut given: Vec<f64> = batches
        .iter()
        .map(|(_, e)| floor.min(e.remaining as f64))
        .collect();
    let mut left = share - given.iter().sum::<f64>();
    for (g, (_, e)) in given.iter_mut().zip(batches.iter()) {
        let more = left.min(e.remaining as f64 - *g).max(0.0).floor();
        *g += more;
        left -= more;
    }
    // Lines already queued count against the tenant's share: when the order changes, a batch
    // whose window shrank still has its lines queued, and the new first batch only gets room
    // as they drain.
    let room = share - batches.iter().map(|(_, e)| e.inflight as f64).sum::<f64>();
    for (g, (_, e)) in given.iter_mut().zip(batches.iter()) {
        *g = g.min(e.inflight as f64 + room.max(0.0));
    }
    batches
        .iter()
        .zip(given)
        .map(|((id, _), g)| (id.clone(), g))
        .collect()
}

/// Each foreground tenant's fraction of the foreground batches' measured throughput; `None` while
/// any of those batches has no rate measured yet (a batch just started would look starved).
pub fn measured_fractions(entries: &[(String, Entry)]) -> Option<BTreeMap<String, f64>> {
    let mut rates: BTreeMap<String, f64> = BTreeMap::new();
    for (_, e) in entries
        .iter()
        .filter(|(_, e)| e.priority != Priority::Background)
    {
        if e.rate <= 0.0 {
            return None;
        }
        *rates.entry(e.tenant.clone()).or_default() += e.rate;
    }
    let sum: f64 = rates.values().sum();
    (sum > 0.0).then(|| rates.into_iter().map(|(t, r)| (t, r / sum)).collect())
}

/// A tenant's throughput follows its window only roughly: lines wait for top-up rounds, rows are
/// written in groups, and each batch sizes its window from a registry a round old. The
/// correction is an integral controller on the tenant's measured share of the throughput that
/// scales its batches' windows until the share is the one the weights give.
#[derive(Debug, Clone, Copy)]
pub struct ShareCorrection {
    factor: f64,
}

impl Default for ShareCorrection {
    fn default() -> Self {
        Self { factor: 1.0 }
    }
}

impl ShareCorrection {
    /// Fraction of the relative error corrected per update: small, because a change of window
    /// shows in the throughput only once the queued lines drain (seconds), and the measured
    /// rates are noisy from one round to the next.
    const GAIN: f64 = 0.03;
    const BOUNDS: (f64, f64) = (0.5, 2.0);

    /// The correction factor applied to the tenants' shares now.
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// One step toward `target` (the tenant's planned fraction) from `measured` (its fraction of
    /// what the provider did). The step is linear in `measured`, so noise in it averages out: a
    /// step on the ratio's logarithm would settle where the mean measured share is above the
    /// target, over-serving the tenant with the noisier (smaller) rate.
    pub fn update(&mut self, target: f64, measured: f64) {
        if target <= 0.0 {
            return;
        }
        let error = ((target - measured) / target).clamp(-1.0, 1.0);
        self.factor =
            (self.factor * (1.0 + Self::GAIN * error)).clamp(Self::BOUNDS.0, Self::BOUNDS.1);
    }
}

/// Whole-line windows whose average over rounds is the exact one (error diffusion): rounding a
/// 15.3-line window to 15 every round would give its tenant 2 % less than its weight.
#[derive(Debug, Default, Clone, Copy)]
pub struct Dither {
    carry: f64,
}

impl Dither {
    /// Whole lines for `exact` lines, carrying the fraction over to the next call.
    pub fn lines(&mut self, exact: f64) -> u64 {
        if exact <= 0.0 {
            self.carry = 0.0;
            return 0;
        }
        let want = exact + self.carry;
        // A batch that gets any share gets a whole line, or it would never move.
        let lines = want.round().max(1.0);
        self.carry = (want - lines).clamp(-1.0, 1.0);
        lines as u64
    }
}

/// The provider's current rate (lines per second): its batches' throughput together (never above
/// `limit`, the configured rpm: more is a burst), or `limit` before any was measured.
pub fn provider_rate(entries: &[(String, Entry)], limit: Option<f64>) -> f64 {
    let measured: f64 = entries.iter().map(|(_, e)| e.rate).sum();
    match limit {
        Some(limit) if measured > 0.0 => measured.min(limit),
        None if measured > 0.0 => measured,
        limit => limit.unwrap_or(1.0),
    }
}

/// A batch to be created, as admission control sees it.
#[derive(Debug, Clone, Copy)]
pub struct Newcomer<'a> {
    /// The tenant creating it.
    pub tenant: &'a str,
    /// Its lines.
    pub lines: u64,
    /// Unix seconds.
    pub expires_at: i64,
    /// Its tier.
    pub priority: Priority,
}

/// Seconds a new batch needs on the provider under this module's policy, at the provider's
/// `rate`:
/// - a foreground batch waits for its own tenant's foreground lines that expire no later
///   (deadline order within a tenant), and its tenant gets the weighted share of the rate among
///   the tenants with foreground work, more as the others finish (weighted processor sharing);
/// - a background batch waits for every foreground line, and then shares the same way among the
///   background tenants.
pub fn admission_secs(
    entries: &[(String, Entry)],
    rate: f64,
    new: Newcomer<'_>,
    weight: impl Fn(&str) -> f64,
) -> f64 {
    let background = new.priority == Priority::Background;
    let foreground_lines: u64 = entries
        .iter()
        .filter(|(_, e)| e.priority != Priority::Background)
        .map(|(_, e)| e.remaining)
        .sum();
    let mut demand: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, e) in entries
        .iter()
        .filter(|(_, e)| (e.priority == Priority::Background) == background)
    {
        if e.tenant != new.tenant || e.expires_at <= new.expires_at {
            *demand.entry(e.tenant.as_str()).or_default() += e.remaining;
        }
    }
    *demand.entry(new.tenant).or_default() += new.lines;
    let before = if background {
        foreground_lines as f64 / rate.max(1e-6)
    } else {
        0.0
    };
    before + sharing_secs(&demand, new.tenant, rate, weight)
}

/// When `tenant` finishes its `demand` if the tenants share `rate` by weight and each keeps
/// asking until its own demand is done (weighted processor sharing).
fn sharing_secs(
    demand: &BTreeMap<&str, u64>,
    tenant: &str,
    rate: f64,
    weight: impl Fn(&str) -> f64,
) -> f64 {
    let mut left: Vec<(&str, f64, f64)> = demand
        .iter()
        .map(|(t, d)| (*t, *d as f64, weight(t).max(1e-6)))
        .collect();
    let mut secs = 0.0;
    while !left.is_empty() {
        let weights: f64 = left.iter().map(|(_, _, w)| w).sum();
        // The next tenant to finish: least demand per unit of weight.
        let (next, _) = left
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| (a.1 / a.2).total_cmp(&(b.1 / b.2)))
            .expect("not empty");
        let (name, d, w) = left[next];
        let dt = d / (rate.max(1e-6) * w / weights);
        secs += dt;
        if name == tenant {
            return secs;
        }
        for (_, d_other, w_other) in &mut left {
            *d_other = (*d_other - rate * *w_other / weights * dt).max(0.0);
        }
        left.remove(next);
    }
    secs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tenant: &str, priority: Priority, expires_in: i64, remaining: u64) -> Entry {
        Entry {
            tenant: tenant.into(),
            priority,
            expires_at: 1_000 + expires_in,
            remaining,
            inflight: 0,
            rate: 0.0,
            seen_ms: 0,
        }
    }

    fn shape(total: u64) -> Shape {
        Shape {
            total,
            rate: 10.0,
            min_share: 0.1,
            now: 1_000,
        }
    }

    fn w(plan: &Plan, id: &str) -> u64 {
        plan.windows[id]
    }

    #[test]
    fn tenants_share_by_weight_whatever_their_number_of_batches() {
        let mut entries = vec![("a1".into(), entry("a", Priority::Normal, 86_400, 10_000))];
        for i in 0..5 {
            entries.push((
                format!("b{i}"),
                entry("b", Priority::Normal, 86_400, 10_000),
            ));
        }
        let p = plan(&entries, shape(100), |_| 1.0);
        assert_eq!(w(&p, "a1"), 50);
        let b: u64 = (0..5).map(|i| w(&p, &format!("b{i}"))).sum();
        assert_eq!(b, 50);
        let p = plan(&entries, shape(100), |t| if t == "a" { 3.0 } else { 1.0 });
        assert_eq!(w(&p, "a1"), 75);
    }

    #[test]
    fn a_tenant_needing_less_than_its_share_leaves_the_rest() {
        let entries = vec![
            ("a".into(), entry("a", Priority::Normal, 86_400, 10)),
            ("b".into(), entry("b", Priority::Normal, 86_400, 10_000)),
        ];
        let p = plan(&entries, shape(100), |_| 1.0);
        assert_eq!((w(&p, "a"), w(&p, "b")), (10, 90));
    }

    #[test]
    fn least_slack_goes_first_and_the_other_keeps_its_floor() {
        let entries = vec![
            ("long".into(), entry("a", Priority::Normal, 86_400, 1_000)),
            ("short".into(), entry("a", Priority::Normal, 3_600, 1_000)),
        ];
        let p = plan(&entries, shape(100), |_| 1.0);
        assert_eq!((w(&p, "short"), w(&p, "long")), (95, 5));
    }

    #[test]
    fn high_goes_before_a_nearer_deadline_and_background_gets_only_spare() {
        let entries = vec![
            ("n".into(), entry("a", Priority::Normal, 600, 1_000)),
            ("h".into(), entry("a", Priority::High, 86_400, 1_000)),
            ("bg".into(), entry("b", Priority::Background, 60, 1_000)),
        ];
        let p = plan(&entries, shape(100), |_| 1.0);
        assert_eq!((w(&p, "h"), w(&p, "n"), w(&p, "bg")), (95, 5, 0));
        let entries = vec![
            ("n".into(), entry("a", Priority::Normal, 600, 30)),
            ("bg".into(), entry("b", Priority::Background, 600, 1_000)),
        ];
        let p = plan(&entries, shape(100), |_| 1.0);
        assert_eq!((w(&p, "n"), w(&p, "bg")), (30, 70));
    }

    #[test]
    fn a_batch_that_cannot_finish_in_time_is_at_risk() {
        // 10 lines/s for the provider, shared evenly: 5 lines/s each; 1,000 lines need 200 s.
        let entries = vec![
            ("late".into(), entry("a", Priority::Normal, 100, 1_000)),
            ("fine".into(), entry("b", Priority::Normal, 86_400, 1_000)),
        ];
        let p = plan(&entries, shape(100), |_| 1.0);
        assert_eq!(p.at_risk, vec!["late".to_owned()]);
    }

    #[test]
    fn admission_counts_the_work_due_no_later() {
        let entries = vec![
            ("soon".into(), entry("a", Priority::Normal, 600, 300)),
            ("later".into(), entry("a", Priority::Normal, 86_400, 5_000)),
            ("bg".into(), entry("a", Priority::Background, 60, 5_000)),
        ];
        let new = |tenant, priority| Newcomer {
            tenant,
            lines: 100,
            expires_at: 1_000 + 3_600,
            priority,
        };
        let secs = admission_secs(&entries, 10.0, new("a", Priority::Normal), |_| 1.0);
        assert_eq!(secs, 40.0);
        let secs = admission_secs(&entries, 10.0, new("a", Priority::Background), |_| 1.0);
        assert_eq!(secs, 5_300.0 / 10.0 + 5_100.0 / 10.0);
    }

    #[test]
    fn admission_shares_the_rate_by_weight_between_tenants() {
        let entries = vec![("b1".into(), entry("b", Priority::Normal, 86_400, 1_000))];
        let new = Newcomer {
            tenant: "a",
            lines: 300,
            expires_at: 1_000 + 3_600,
            priority: Priority::Normal,
        };
        // Equal weights: 5 lines/s each while both run, 300 lines take 60 s.
        assert_eq!(admission_secs(&entries, 10.0, new, |_| 1.0), 60.0);
        // Weight 3 to B: A gets 2.5 lines/s, 120 s.
        let secs = admission_secs(&entries, 10.0, new, |t| if t == "b" { 3.0 } else { 1.0 });
        assert_eq!(secs, 120.0);
        // B has only 100 lines: it is done after 20 s (A did 100), then A has the whole rate.
        let entries = vec![("b1".into(), entry("b", Priority::Normal, 86_400, 100))];
        assert_eq!(admission_secs(&entries, 10.0, new, |_| 1.0), 40.0);
    }

    #[test]
    fn contended_tenants_get_their_weighted_fraction_and_a_satisfied_one_ends_contention() {
        let entries = vec![
            ("a".into(), entry("a", Priority::Normal, 86_400, 10_000)),
            ("b".into(), entry("b", Priority::Normal, 86_400, 10_000)),
            (
                "bg".into(),
                entry("c", Priority::Background, 86_400, 10_000),
            ),
        ];
        let p = plan(&entries, shape(100), |t| if t == "a" { 3.0 } else { 1.0 });
        assert_eq!(p.contended.len(), 2, "{:?}", p.contended);
        assert!((p.contended["a"] - 0.75).abs() < 1e-9);
        assert!((p.contended["b"] - 0.25).abs() < 1e-9);
        let entries = vec![
            ("a".into(), entry("a", Priority::Normal, 86_400, 10_000)),
            ("b".into(), entry("b", Priority::Normal, 86_400, 10)),
        ];
        assert!(plan(&entries, shape(100), |_| 1.0).contended.is_empty());
    }

    #[test]
    fn measured_fractions_wait_for_every_rate() {
        let mut a = entry("a", Priority::Normal, 86_400, 100);
        let mut b = entry("b", Priority::Normal, 86_400, 100);
        a.rate = 30.0;
        assert_eq!(
            measured_fractions(&[("a".into(), a.clone()), ("b".into(), b.clone())]),
            None
        );
        b.rate = 10.0;
        let m = measured_fractions(&[("a".into(), a), ("b".into(), b)]).expect("measured");
        assert!((m["a"] - 0.75).abs() < 1e-9 && (m["b"] - 0.25).abs() < 1e-9);
    }

    /// A provider that serves tenant B 10 % less per window line than tenant A: the corrections
    /// bring the shares back to 3:1.
    #[test]
    fn the_correction_removes_a_steady_bias_between_tenants() {
        let (mut ca, mut cb) = (ShareCorrection::default(), ShareCorrection::default());
        let (wa, wb) = (45.0, 15.0);
        let mut measured = (0.0, 0.0);
        for _ in 0..2_000 {
            let (ea, eb) = (wa * ca.factor(), wb * cb.factor() * 0.9);
            measured = (ea / (ea + eb), eb / (ea + eb));
            ca.update(0.75, measured.0);
            cb.update(0.25, measured.1);
        }
        let ratio = measured.0 / measured.1;
        assert!((ratio - 3.0).abs() < 0.01, "{ratio}");
    }

    /// B's measured share is noisy (×0.6 and ×1.4 in turn, right on average): the true shares
    /// still settle at 3:1, averaged over the last rounds.
    #[test]
    fn noise_in_a_measured_share_does_not_bias_the_correction() {
        let (mut ca, mut cb) = (ShareCorrection::default(), ShareCorrection::default());
        let mut ratios = Vec::new();
        for round in 0..4_000 {
            let (ea, eb) = (45.0 * ca.factor(), 15.0 * cb.factor());
            let (a, b) = (ea / (ea + eb), eb / (ea + eb));
            let noise = if round % 2 == 0 { 0.6 } else { 1.4 };
            ca.update(0.75, a);
            cb.update(0.25, b * noise);
            if round >= 3_000 {
                ratios.push(a / b);
            }
        }
        let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
        assert!((mean - 3.0).abs() < 0.03, "{mean}");
    }

    #[test]
    fn dithered_windows_average_the_exact_one() {
        let mut d = Dither::default();
        let sum: u64 = (0..1_000).map(|_| d.lines(15.3)).sum();
        assert_eq!(sum, 15_300);
        assert_eq!(d.lines(0.2), 1, "a batch with any share gets a line");
        assert_eq!(d.lines(0.0), 0);
    }

    #[test]
    fn min_batch_share_sets_the_floor_of_the_batches_behind() {
        let entries = vec![
            ("long".into(), entry("a", Priority::Normal, 86_400, 1_000)),
            ("short".into(), entry("a", Priority::Normal, 3_600, 1_000)),
        ];
        let mut half = shape(100);
        half.min_share = 0.5;
        let p = plan(&entries, half, |_| 1.0);
        assert_eq!((w(&p, "short"), w(&p, "long")), (75, 25));
        half.min_share = 0.0;
        let p = plan(&entries, half, |_| 1.0);
        assert_eq!(
            (w(&p, "short"), w(&p, "long")),
            (99, 1),
            "a whole line at least"
        );
    }
}
