//! Fleet-wide pacing, observed from the upstream's side: rate limits shared by several
//! worker processes, the fleet pause after a 429 or an exhausted `x-ratelimit-*` header, retries
//! that wait outside the consumer slots, the circuit breaker, and fairness between batches.
//!
//! Timings are asserted loosely (a loaded 2-core machine must not flake them): upper bounds on
//! what a limiter guarantees, wide quiet windows around pauses. Precise figures are measured by
//! `sluice-bench pacing` (docs/benchmarks.md).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_core::Settings;
use sluice_core::config::PacingSettings;
use sluice_tests::*;

/// Applies `pacing` to the mock provider.
fn pace(s: &mut Settings, pacing: PacingSettings) {
    s.providers[0].pacing = pacing;
}

/// Paces the test provider at `rpm` requests a minute with a burst of `burst_ms`.
fn pace_rpm(s: &mut Settings, rpm: u64, burst_ms: u64) {
    pace(
        s,
        PacingSettings {
            rpm: Some(rpm),
            burst_ms: Some(burst_ms),
            ..PacingSettings::default()
        },
    );
}

/// Healthy lines `ok-0…` (each its own mock key), optionally with extra mock directives.
fn healthy(n: usize, mock: Value) -> Vec<Value> {
    (0..n)
        .map(|i| chat_line_with_mock(&format!("ok-{i}"), mock.clone()))
        .collect()
}

/// The most calls among `times` (unix ms, any order) in any window of `window_ms`.
pub(crate) fn max_in_window(times: &[u64], window_ms: u64) -> usize {
    let mut t = times.to_vec();
    t.sort_unstable();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..t.len() {
        while t[hi] - t[lo] >= window_ms {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// Calls of `times` strictly inside `(from, to)`.
fn calls_between(times: &[u64], from: u64, to: u64) -> Vec<u64> {
    times
        .iter()
        .copied()
        .filter(|t| *t > from && *t < to)
        .collect()
}

/// Waits for the batch to complete and checks that every line is in the output exactly once.
async fn completes(app: &TestApp, id: &str, lines: &[Value], timeout: Duration) -> Value {
    let batch = app.wait_terminal(KEY_A, id, timeout).await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    let (output, errors) = app.results(KEY_A, &batch).await;
    let ids: Vec<String> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_owned())
        .collect();
    assert_exactly_once(&output, &errors, &ids);
    batch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_worker_processes_together_stay_under_the_fleet_request_rate() {
    let options = AppOptions {
        worker: false,
        ..AppOptions::default()
    };
    // 600 RPM = one call per 100 ms for the whole fleet; a burst of 500 ms lets ~6 go at once.
    let mut app = spawn_app_with(options, |s| pace_rpm(s, 600, 500)).await;
    for _ in 0..3 {
        app.spawn_worker_process();
    }
    let lines = healthy(60, json!({}));
    let id = app.submit(KEY_A, &lines).await;
    let batch = completes(&app, &id, &lines, Duration::from_secs(60)).await;
    assert_eq!(batch["request_counts"]["completed"], 60);

    let times = app.upstream_stats().times;
    assert_eq!(times.len(), 60, "one call per line");
    let (first, last) = (*times.iter().min().unwrap(), *times.iter().max().unwrap());
    // 60 calls at 10/s after a burst of at most 6: at least ~5.3 s from first to last.
    assert!(
        last - first >= 5_000,
        "60 calls in {} ms: faster than 600 RPM",
        last - first
    );
    // Any second holds at most 10 calls plus the burst (and a little for clock granularity).
    let peak = max_in_window(&times, 1_000);
    assert!(peak <= 10 + 6 + 2, "{peak} calls in one second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_with_retry_after_pauses_the_whole_fleet_for_that_long() {
    // 300 RPM spreads the healthy lines over ~6 s, so some would be called during the pause.
    let app = spawn_app_with(AppOptions::default(), |s| pace_rpm(s, 300, 200)).await;
    // The throttled line's batch goes first, so its line is first to ask for a call (the lines of
    // one batch run in no fixed order); the healthy batch right behind it is then queued or
    // reserved when the 429 comes back.
    let limited_line = vec![chat_line_with_mock(
        "limited",
        json!({"status": 429, "retry_after": 3, "times": 1}),
    )];
    let limited_id = app.submit(KEY_A, &limited_line).await;
    let lines = healthy(25, json!({}));
    let id = app.submit(KEY_A, &lines).await;
    completes(&app, &limited_id, &limited_line, Duration::from_secs(60)).await;
    completes(&app, &id, &lines, Duration::from_secs(60)).await;

    let stats = app.upstream_stats();
    let limited = &stats.per_key["limited"];
    assert_eq!(limited.len(), 2, "one 429, then a success: {limited:?}");
    let t429 = limited[0];
    assert!(
        limited[1] - t429 >= 2_950,
        "retried {} ms after a Retry-After of 3 s",
        limited[1] - t429
    );
    // Calls already on their way when the 429 came back may land just after it; then nothing.
    let during = calls_between(&stats.times, t429 + 150, t429 + 2_900);
    assert!(
        during.is_empty(),
        "{} calls during the 3 s pause (429 at {t429}): {during:?}",
        during.len()
    );
    let after = calls_between(&stats.times, t429 + 2_900, u64::MAX);
    assert!(
        after.len() > 5,
        "the lines waited for the pause to end: {} calls after it",
        after.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exhausted_ratelimit_header_pauses_the_fleet_until_its_reset_and_odd_values_do_not() {
    let app = spawn_app_with(AppOptions::default(), |s| pace_rpm(s, 300, 200)).await;
    // The first answers are successes that say the request budget is spent for 2 s; the odd
    // headers of the neighbours (negative, unparsable) must not pause anything.
    let mut lines = vec![chat_line_with_mock(
        "exhausted",
        json!({"times": 1, "headers": {
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "2s",
        }}),
    )];
    lines.extend(healthy(
        20,
        json!({"headers": {
            "x-ratelimit-remaining-requests": "-1",
            "x-ratelimit-reset-requests": "soon",
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-reset-tokens": "-5s",
        }}),
    ));
    let id = app.submit(KEY_A, &lines).await;
    let batch = completes(&app, &id, &lines, Duration::from_secs(60)).await;
    assert_eq!(batch["request_counts"]["completed"], 21);

    let stats = app.upstream_stats();
    let t0 = stats.per_key["exhausted"][0];
    let during = calls_between(&stats.times, t0 + 150, t0 + 1_900);
    assert!(
        during.is_empty(),
        "{} calls while the budget was spent: {during:?}",
        during.len()
    );
    // 21 calls at 5/s with only one 2 s pause: the odd headers paused nothing else.
    let (first, last) = (
        *stats.times.iter().min().unwrap(),
        *stats.times.iter().max().unwrap(),
    );
    assert!(last - first < 15_000, "{} ms for 21 calls", last - first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_line_waiting_to_retry_does_not_hold_a_consumer_slot() {
    // One slot: if the retrying line held it during its backoff, nothing else could run.
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.worker.concurrency = 1;
        s.worker.backoff_base_ms = 3_000;
        s.worker.backoff_max_ms = 3_000;
    })
    .await;
    let mut lines = vec![chat_line_with_mock(
        "flaky",
        json!({"status": 503, "times": 1}),
    )];
    lines.extend(healthy(5, json!({"delay_ms": 50})));
    let id = app.submit(KEY_A, &lines).await;
    completes(&app, &id, &lines, Duration::from_secs(30)).await;

    let stats = app.upstream_stats();
    let flaky = &stats.per_key["flaky"];
    assert_eq!(flaky.len(), 2, "{flaky:?}");
    assert!(flaky[1] - flaky[0] >= 1_400, "backoff of at least 1.5 s");
    for i in 0..5 {
        let t = stats.per_key[&format!("ok-{i}")][0];
        assert!(
            t < flaky[1],
            "ok-{i} ran only after the retry: the waiting line held the slot"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_breaker_opens_during_an_outage_probes_and_closes_and_no_line_loses_its_budget() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.worker.concurrency = 4;
        s.worker.max_attempts = 3;
        s.worker.breaker_failures = 3;
        s.worker.breaker_cooldown_ms = 500;
        s.worker.breaker_probes = 1;
    })
    .await;
    app.mock.set_outage(Some(503));
    let lines = healthy(20, json!({}));
    let id = app.submit(KEY_A, &lines).await;

    // Let the outage last 4 s.
    let breaker = app.keys().pacing("mock", "breaker");
    let started = Instant::now();
    let mut saw_open = false;
    while started.elapsed() < Duration::from_secs(4) {
        let state: Option<String> = redis::cmd("HGET")
            .arg(&breaker)
            .arg("state")
            .query_async(&mut app.store.conn())
            .await
            .unwrap();
        saw_open |= state.as_deref() == Some("open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let during_outage = app.upstream_stats().calls;
    app.mock.set_outage(None);
    assert!(saw_open, "the breaker never opened");
    // Without a breaker, 20 lines × 3 attempts would all be spent; with it, the first wave (the
    // calls in flight when it opened) plus about one probe per cool-down.
    assert!(
        during_outage <= 4 + 3 + 4_000 / 500 + 4,
        "{during_outage} calls during a 4 s outage"
    );

    let batch = completes(&app, &id, &lines, Duration::from_secs(30)).await;
    assert_eq!(
        batch["request_counts"]["completed"], 20,
        "no line ran out of attempts because of the outage: {batch:#}"
    );
    let state: Option<String> = redis::cmd("HGET")
        .arg(&breaker)
        .arg("state")
        .query_async(&mut app.store.conn())
        .await
        .unwrap();
    assert_eq!(state.as_deref(), Some("closed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_token_limit_paces_calls_by_their_usage() {
    // 60,000 TPM = 1,000 tokens a second; each call reports 1,000 tokens and asks for 1,000.
    let app = spawn_app_with(AppOptions::default(), |s| {
        pace(
            s,
            PacingSettings {
                tpm: Some(60_000),
                burst_ms: Some(500),
                ..PacingSettings::default()
            },
        )
    })
    .await;
    let mut lines = healthy(8, json!({"usage_tokens": 1_000}));
    for line in &mut lines {
        line["body"]["max_tokens"] = json!(960);
    }
    let id = app.submit(KEY_A, &lines).await;
    completes(&app, &id, &lines, Duration::from_secs(60)).await;

    let stats = app.upstream_stats();
    let total: u64 = stats.tokens.iter().map(|(_, n)| n).sum();
    assert_eq!(total, 8_000);
    let (first, last) = (
        *stats.times.iter().min().unwrap(),
        *stats.times.iter().max().unwrap(),
    );
    // 8,000 tokens at 1,000/s with a 500-token burst: at least ~6.5 s between first and last.
    assert!(last - first >= 6_000, "8,000 tokens in {} ms", last - first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_batch_of_another_tenant_is_not_starved_by_a_big_one() {
    // 1,200 RPM: tenant A's 240 lines need about 12 s; each batch has at most 20 lines queued.
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.worker.batch_window = 20;
        // Both batches in the main queue: this is the window policy on its own.
        s.worker.express_lines = 0;
        pace_rpm(s, 1_200, 200)
    })
    .await;
    let big: Vec<Value> = (0..240)
        .map(|i| chat_line(&format!("a-{i}"), "big batch"))
        .collect();
    let a_started = Instant::now();
    let a = app.submit(KEY_A, &big).await;
    app.wait_for(KEY_A, &a, Duration::from_secs(30), |b| {
        b["request_counts"]["completed"].as_u64().unwrap_or(0) >= 20
    })
    .await;

    let small: Vec<Value> = (0..5)
        .map(|i| chat_line(&format!("b-{i}"), "small batch"))
        .collect();
    let b_started = Instant::now();
    let b = app.submit(KEY_B, &small).await;
    let b_batch = app.wait_terminal(KEY_B, &b, Duration::from_secs(60)).await;
    let b_took = b_started.elapsed();
    assert_eq!(b_batch["status"], "completed", "{b_batch:#}");
    let a_now = app.get_batch(KEY_A, &a).await;
    assert_ne!(
        a_now["status"], "completed",
        "B finished only after A: {a_now:#}"
    );

    let a_batch = app.wait_terminal(KEY_A, &a, Duration::from_secs(90)).await;
    let a_took = a_started.elapsed();
    assert_eq!(a_batch["status"], "completed", "{a_batch:#}");
    assert_eq!(a_batch["request_counts"]["completed"], 240);
    assert!(
        b_took < a_took / 3,
        "B took {b_took:?} while A took {a_took:?}"
    );
    let (output, errors) = app.results(KEY_A, &a_batch).await;
    let ids: Vec<String> = (0..240).map(|i| format!("a-{i}")).collect();
    assert_exactly_once(&output, &errors, &ids);
}

/// A small batch goes through the express queue: it does not wait behind the lines of a big batch
/// already in the main queue, even when that batch's window holds all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_batch_takes_the_express_queue_past_a_big_batch_already_queued() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.worker.express_lines = 100;
        s.worker.batch_window = 10_000;
    })
    .await;
    // 16 calls of 50 ms at once: A's 600 lines need about 2 s.
    let big = healthy(600, json!({"delay_ms": 50}));
    let a = app.submit(KEY_A, &big).await;
    app.wait_for(KEY_A, &a, Duration::from_secs(30), |b| {
        b["request_counts"]["completed"].as_u64().unwrap_or(0) >= 32
    })
    .await;

    let small: Vec<Value> = (0..5)
        .map(|i| chat_line_with_mock(&format!("b-{i}"), json!({"delay_ms": 50})))
        .collect();
    let b = app.submit(KEY_B, &small).await;
    let b_batch = app.wait_terminal(KEY_B, &b, Duration::from_secs(30)).await;
    assert_eq!(b_batch["status"], "completed", "{b_batch:#}");
    let a_done = app.get_batch(KEY_A, &a).await["request_counts"]["completed"]
        .as_u64()
        .unwrap();
    // Behind A's queue B would finish after all 600 of A's lines.
    assert!(a_done < 400, "B finished after {a_done} of A's 600 lines");

    completes(&app, &a, &big, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_while_topping_up_a_window_is_replaced_and_every_line_ends_exactly_once() {
    let options = AppOptions {
        worker: false,
        ..AppOptions::default()
    };
    let mut app = spawn_app_with(options, |s| s.worker.batch_window = 40).await;
    let pid = app.spawn_worker_process();
    // 100 ms calls: a 40-line window then finishes 400 lines/s, slow enough that the kill lands
    // long before the whole batch could have gone through the window.
    let lines = healthy(300, json!({"delay_ms": 100}));
    let id = app.submit(KEY_A, &lines).await;
    // Kill it once the first windows are done: its top-up loop dies with it (the control message
    // was acked), so only the sweep's re-dispatch can publish the rest.
    app.wait_for(KEY_A, &id, Duration::from_secs(30), |b| {
        b["request_counts"]["completed"].as_u64().unwrap_or(0) >= 60
    })
    .await;
    app.signal_process(pid, "KILL");
    let dispatched: i64 = app
        .store
        .get_batch(&id)
        .await
        .unwrap()
        .unwrap()
        .dispatched
        .unwrap();
    assert!(
        dispatched < 300,
        "the window kept most lines out of the queue"
    );
    app.spawn_worker_process();
    let batch = completes(&app, &id, &lines, Duration::from_secs(60)).await;
    assert_eq!(batch["request_counts"]["completed"], 300);
}

/// The fleet limiter alone, on a namespace of its own in the real Redis.
async fn limiter() -> (sluice_store::Store, sluice_store::pacing::Pacer) {
    let store = sluice_store::Store::open(&Settings {
        namespace: format!("t-{}", uuid::Uuid::new_v4().simple()),
        ..Settings::default()
    })
    .await
    .unwrap();
    (store.clone(), sluice_store::pacing::Pacer::new(store))
}

/// The limiter scripts on their own, against the real Redis: leases, AIMD and the breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limiter_leases_concurrency_halves_it_on_a_429_and_grows_it_back() {
    use sluice_core::pacing::{CallOutcome, Grant, Hold, PaceLimits, TokenUse};
    use sluice_store::pacing::Pacer;
    let (store, pacer) = limiter().await;
    let mut w = Settings::default().worker;
    w.breaker_failures = 2;
    w.breaker_cooldown_ms = 300;
    w.breaker_probes = 1;
    let limits = PaceLimits::new(
        &PacingSettings {
            max_concurrency: Some(4),
            ..PacingSettings::default()
        },
        &w,
    );
    let go = |g: Grant| matches!(g, Grant::Go { .. });
    for i in 0..4 {
        let g = pacer
            .acquire("p", &limits, 0, &format!("l{i}"))
            .await
            .unwrap();
        assert!(go(g), "{i}: {g:?}");
    }
    let g = pacer.acquire("p", &limits, 0, "l4").await.unwrap();
    assert!(
        matches!(
            g,
            Grant::Hold {
                why: Hold::Concurrency,
                ..
            }
        ),
        "{g:?}"
    );
    // A running call renews its lease; a released or unknown one is gone.
    assert!(Pacer::leases(&limits));
    assert!(pacer.renew("p", "l3").await.unwrap());
    assert!(!pacer.renew("p", "nobody").await.unwrap());
    // A 429 halves the limit: two calls still in flight fill it.
    let r = pacer
        .release(
            "p",
            &limits,
            "l0",
            CallOutcome::Throttled,
            TokenUse::default(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.concurrency_limit, 2);
    pacer
        .release(
            "p",
            &limits,
            "l1",
            CallOutcome::Ok,
            TokenUse::default(),
            None,
        )
        .await
        .unwrap();
    let g = pacer.acquire("p", &limits, 0, "l5").await.unwrap();
    assert!(!go(g), "limit 2, two in flight: {g:?}");
    // Successes grow it back by one per `limit` successes, up to the maximum.
    let mut limit = 0;
    for i in 0..20 {
        let lease = format!("g{i}");
        pacer.acquire("p", &limits, 0, &lease).await.unwrap();
        limit = pacer
            .release(
                "p",
                &limits,
                &lease,
                CallOutcome::Ok,
                TokenUse::default(),
                None,
            )
            .await
            .unwrap()
            .concurrency_limit;
    }
    assert_eq!(limit, 4);

    // Two consecutive failures open the breaker; after the cool-down one probe goes through,
    // and its success closes it.
    for i in 0..2 {
        pacer
            .release(
                "q",
                &limits,
                &format!("f{i}"),
                CallOutcome::Failed,
                TokenUse::default(),
                None,
            )
            .await
            .unwrap();
    }
    let g = pacer.acquire("q", &limits, 0, "x").await.unwrap();
    assert!(
        matches!(
            g,
            Grant::Hold {
                why: Hold::BreakerOpen,
                ..
            }
        ),
        "{g:?}"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let g = pacer.acquire("q", &limits, 0, "probe").await.unwrap();
    assert!(matches!(g, Grant::Go { probe: true, .. }), "{g:?}");
    let g = pacer.acquire("q", &limits, 0, "second").await.unwrap();
    assert!(
        matches!(
            g,
            Grant::Hold {
                why: Hold::BreakerOpen,
                ..
            }
        ),
        "one probe at a time: {g:?}"
    );
    let r = pacer
        .release(
            "q",
            &limits,
            "probe",
            CallOutcome::Ok,
            TokenUse::default(),
            None,
        )
        .await
        .unwrap();
    assert!(r.breaker_changed);
    let g = pacer.acquire("q", &limits, 0, "after").await.unwrap();
    assert!(matches!(g, Grant::Go { probe: false, .. }), "{g:?}");
    store.purge_namespace().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fleet_concurrency_cap_bounds_calls_in_flight() {
    let app = spawn_app_with(AppOptions::default(), |s| {
        pace(
            s,
            PacingSettings {
                max_concurrency: Some(2),
                ..PacingSettings::default()
            },
        )
    })
    .await;
    // Each call takes 400 ms; with two in flight at most, no 380 ms holds three arrivals.
    let lines = healthy(12, json!({"delay_ms": 400}));
    let id = app.submit(KEY_A, &lines).await;
    completes(&app, &id, &lines, Duration::from_secs(30)).await;
    let times = app.upstream_stats().times;
    assert_eq!(times.len(), 12);
    let peak = max_in_window(&times, 380);
    assert!(peak <= 2, "{peak} calls started within 380 ms");
    let (first, last) = (*times.iter().min().unwrap(), *times.iter().max().unwrap());
    assert!(last - first >= 1_900, "12 calls of 400 ms two at a time");
}

/// One ask for many calls reserves their starts in order, as that many single asks would: a burst
/// at once, then one interval apart, none past `reserve_ahead_ms`; a half-open breaker gives one
/// probe per ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ask_reserves_many_starts_as_single_asks_would() {
    use sluice_core::pacing::{CallOutcome, Grant, Hold, PaceLimits, TokenUse};
    let (store, pacer) = limiter().await;
    let mut w = Settings::default().worker;
    w.reserve_ahead_ms = 2_000;
    w.breaker_failures = 1;
    w.breaker_cooldown_ms = 200;
    w.breaker_probes = 1;
    // 600 RPM: a start every 100 ms after a burst of 10 (1 s).
    let limits = PaceLimits::new(
        &PacingSettings {
            rpm: Some(600),
            burst_ms: Some(1_000),
            ..PacingSettings::default()
        },
        &w,
    );
    let starts = |grants: &[Grant]| -> Vec<Option<u64>> {
        grants
            .iter()
            .map(|g| match g {
                Grant::Go { wait, probe, .. } => {
                    assert!(!probe, "{g:?}");
                    Some(wait.as_millis() as u64)
                }
                Grant::Hold { why, wait } => {
                    assert_eq!(*why, Hold::Rate, "{g:?}");
                    assert!(wait.as_millis() > 2_000, "{g:?}");
                    None
                }
            })
            .collect()
    };
    let many = pacer
        .acquire_many("p", &limits, &[0; 40], "")
        .await
        .unwrap();
    let mut single = Vec::new();
    for _ in 0..40 {
        single.push(pacer.acquire("s", &limits, 0, "").await.unwrap());
    }
    let (many, single) = (starts(&many), starts(&single));
    let expected: Vec<Option<u64>> = (0..40u64)
        .map(|i| match i {
            0..10 => Some(0),
            10..30 => Some((i - 9) * 100),
            _ => None,
        })
        .collect();
    assert_eq!(many, expected);
    // The single asks run over a few ms of Redis' clock; their starts are the same within that.
    for (i, (m, s)) in many.iter().zip(&single).enumerate() {
        match (m, s) {
            (Some(m), Some(s)) => assert!(m.abs_diff(*s) <= 50, "call {i}: {m} vs {s}"),
            (None, None) => {}
            _ => panic!("call {i}: {m:?} vs {s:?}"),
        }
    }
    // Every reservation is taken: the next ask waits past the horizon.
    let next = pacer.acquire_many("p", &limits, &[0; 3], "").await.unwrap();
    assert!(starts(&next).iter().all(Option::is_none), "{next:?}");

    // Tokens: 60,000 TPM is a token a millisecond, with 1 s of them at once. Each call is charged
    // its own estimate and starts once the tokens before it are (nearly) spent.
    let tokens = PaceLimits::new(
        &PacingSettings {
            tpm: Some(60_000),
            burst_ms: Some(1_000),
            ..PacingSettings::default()
        },
        &w,
    );
    let costs = [500, 500, 500, 2_000, 100];
    let grants = pacer.acquire_many("t", &tokens, &costs, "").await.unwrap();
    let charged: Vec<(Option<u64>, u64)> = grants
        .iter()
        .zip(starts(&grants))
        .map(|(g, start)| match g {
            Grant::Go { charged, .. } => (start, *charged),
            Grant::Hold { .. } => (start, 0),
        })
        .collect();
    // Spent after each: 500, 1,000, 1,500 (starts at once), 3,500 (starts at 500 ms); the fifth
    // would start at 2,500 ms, past the horizon.
    assert_eq!(
        charged,
        [
            (Some(0), 500),
            (Some(0), 500),
            (Some(0), 500),
            (Some(500), 2_000),
            (None, 0)
        ]
    );

    // An open breaker holds every call of an ask; half-open, the first is its one probe.
    pacer
        .release(
            "q",
            &limits,
            "",
            CallOutcome::Failed,
            TokenUse::default(),
            None,
        )
        .await
        .unwrap();
    let open = pacer.acquire_many("q", &limits, &[0; 3], "").await.unwrap();
    assert!(
        open.iter().all(|g| matches!(
            g,
            Grant::Hold {
                why: Hold::BreakerOpen,
                ..
            }
        )),
        "{open:?}"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    let half = pacer.acquire_many("q", &limits, &[0; 3], "").await.unwrap();
    assert!(matches!(half[0], Grant::Go { probe: true, .. }), "{half:?}");
    assert!(
        half[1..].iter().all(|g| matches!(
            g,
            Grant::Hold {
                why: Hold::BreakerOpen,
                ..
            }
        )),
        "{half:?}"
    );
    store.purge_namespace().await.unwrap();
}
