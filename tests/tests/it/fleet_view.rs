//! A provider with no pacing configured costs no limiter script per call: each worker
//! keeps a copy of the fleet pause and breaker, read at most `worker.fleet_view_ms` before a
//! call, and a pause set by one replica stops every replica's calls within 250 ms.

use std::time::Duration;

use serde_json::json;
use sluice_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_on_one_replica_pauses_the_other_replicas_within_250_ms() {
    let options = AppOptions {
        worker: false,
        ..AppOptions::default()
    };
    // No pacing: the calls run as fast as the slots allow, so without the pause reaching every
    // replica they would keep starting during it.
    let mut app = spawn_app_with(options, |s| {
        s.worker.concurrency = 4;
        s.worker.fleet_view_ms = 100;
    })
    .await;
    // Three replicas: a replica whose copy were older than the bound would be caught unless it
    // happened to read within 250 ms of the pause, and all the other two would have to.
    for _ in 0..3 {
        app.spawn_worker_process();
    }
    // 12 slots × 50 ms calls: about 5 s of calls without the pause, so the big batch still has
    // lines to call on every replica when the 429 comes and after the pause ends.
    let lines: Vec<_> = (0..1_200)
        .map(|i| chat_line_with_mock(&format!("ok-{i}"), json!({"delay_ms": 50})))
        .collect();
    let id = app.submit(KEY_A, &lines).await;
    // Every replica is calling before the 429 arrives.
    while app.upstream_stats().calls < 60 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let limited = vec![chat_line_with_mock(
        "limited",
        json!({"status": 429, "retry_after": 2, "times": 1}),
    )];
    let limited_id = app.submit(KEY_A, &limited).await;
    for (id, n) in [(&limited_id, 1), (&id, lines.len())] {
        let batch = app.wait_terminal(KEY_A, id, Duration::from_secs(60)).await;
        assert_eq!(batch["status"], "completed", "{batch:#}");
        assert_eq!(batch["request_counts"]["completed"], n, "{batch:#}");
    }

    let stats = app.upstream_stats();
    let attempts = &stats.per_key["limited"];
    assert_eq!(attempts.len(), 2, "one 429, then a success: {attempts:?}");
    let t429 = attempts[0];
    let before = stats
        .times
        .iter()
        .filter(|t| **t + 300 > t429 && **t < t429)
        .count();
    assert!(
        before >= 12,
        "the fleet was busy when the 429 came: {before} calls in the 300 ms before"
    );
    // Calls already started when the 429 came back may still land; none may start later than
    // 250 ms after it (the 429 answers at once, so the pause is set within a few ms of t429).
    let during: Vec<u64> = stats
        .times
        .iter()
        .copied()
        .filter(|t| *t > t429 + 250 && *t < t429 + 1_900)
        .collect();
    assert!(
        during.is_empty(),
        "{} calls started during the 2 s pause (429 at {t429}): {:?}",
        during.len(),
        during.iter().map(|t| t - t429).collect::<Vec<_>>()
    );
    // The quiet window was the pause, not the end of the work.
    let after = stats.times.iter().filter(|t| **t >= t429 + 1_900).count();
    assert!(
        after >= 40,
        "only {after} calls after the pause: the big batch ended before the 429"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn successes_of_an_unpaced_provider_run_no_limiter_script() {
    let app = spawn_app().await;
    let lines: Vec<_> = (0..40)
        .map(|i| chat_line_with_mock(&format!("ok-{i}"), json!({})))
        .collect();
    let id = app.submit(KEY_A, &lines).await;
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(60)).await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    assert_eq!(batch["request_counts"]["completed"], 40);
    // The limiter's report script writes the breaker's failure count after every call it hears
    // of; with nothing to report, the provider's breaker was never written.
    let breaker: i64 = redis::cmd("EXISTS")
        .arg(app.keys().pacing("mock", "breaker"))
        .query_async(&mut app.store.conn())
        .await
        .unwrap();
    assert_eq!(breaker, 0, "a report script ran for a success");
}

/// The summed report of a paced provider's successes, against the real Redis: token corrections
/// add up, n samples move the learnt ratio as n steps would, failures are reset, and successes
/// never close a half-open breaker (only its probes may).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summed_successes_correct_tokens_teach_the_ratio_and_leave_a_half_open_breaker_alone() {
    use sluice_core::Settings;
    use sluice_core::config::PacingSettings;
    use sluice_core::pacing::{PaceLimits, Successes, TokenUse};
    use sluice_store::pacing::Pacer;
    let ns = format!("t-{}", uuid::Uuid::new_v4().simple());
    let store = sluice_store::Store::open(&Settings {
        namespace: ns,
        ..Settings::default()
    })
    .await
    .unwrap();
    let pacer = Pacer::new(store.clone());
    // 60,000 TPM: one token per millisecond of the bucket's arrival time.
    let limits = PaceLimits::new(
        &PacingSettings {
            tpm: Some(60_000),
            ..PacingSettings::default()
        },
        &Settings::default().worker,
    );
    let get = |key: &'static str| {
        let key = store.keys().pacing("p", key);
        let mut conn = store.conn();
        async move {
            let v: Option<String> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            v.map(|v| v.parse::<f64>().unwrap())
        }
    };
    pacer.acquire("p", &limits, 1_000, "").await.unwrap();
    let tat = get("tk").await.expect("the call was charged");
    // Two calls estimated at 100 tokens each that used 200 each: +200 tokens, ratio sample 2.
    let mut sum = Successes::default();
    for _ in 0..2 {
        sum.add(Successes::of(TokenUse {
            estimate: 100,
            charged: 100,
            actual: Some(200),
        }));
    }
    set_breaker(&store, &[("state", "closed"), ("fails", "3")]).await;
    pacer.report_successes("p", &limits, sum).await.unwrap();
    let moved = get("tk").await.unwrap() - tat;
    assert!(
        (moved - 200.0).abs() < 1.0,
        "token bucket moved by {moved} ms"
    );
    let ratio = hget(&store, "aimd", "tk_ratio").await;
    // 1 + (1 − 0.8²) × (2 − 1)
    assert_eq!(ratio.as_deref(), Some("1.3600"));
    let fails = hget(&store, "breaker", "fails").await;
    assert_eq!(
        fails.as_deref(),
        Some("0"),
        "a success resets the failure count"
    );

    set_breaker(&store, &[("state", "half")]).await;
    pacer
        .report_successes("p", &limits, Successes::of(TokenUse::default()))
        .await
        .unwrap();
    let state = hget(&store, "breaker", "state").await;
    assert_eq!(
        state.as_deref(),
        Some("half"),
        "summed successes closed a half-open breaker"
    );
    store.purge_namespace().await.unwrap();
}

/// Writes fields of provider `p`'s breaker hash as the limiter scripts would have.
async fn set_breaker(store: &sluice_store::Store, fields: &[(&str, &str)]) {
    let mut cmd = redis::cmd("HSET");
    cmd.arg(store.keys().pacing("p", "breaker"));
    for (field, value) in fields {
        cmd.arg(*field).arg(*value);
    }
    let _: i64 = cmd.query_async(&mut store.conn()).await.unwrap();
}

/// A field of one of provider `p`'s pacing hashes.
async fn hget(store: &sluice_store::Store, part: &str, field: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(store.keys().pacing("p", part))
        .arg(field)
        .query_async(&mut store.conn())
        .await
        .unwrap()
}
