//! The harness itself: a test app takes down its processes and deletes its namespace's keys,
//! queues and files when it goes out of scope, also when the test fails.

use std::path::PathBuf;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use sluice_tests::*;

/// What a dropped app must have removed.
struct Leftovers {
    namespace: String,
    amqp_url: String,
    control_queue: String,
    dir: PathBuf,
    worker_pid: u32,
}

/// Starts an app with a finished batch and a worker process; what it leaves behind once dropped.
async fn busy_app() -> (TestApp, Leftovers) {
    let mut app = spawn_app().await;
    let id = app.submit(KEY_A, &chat_lines(3)).await;
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(30)).await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    let worker_pid = app.spawn_worker_process();
    let dir = app
        .write_config()
        .parent()
        .expect("config directory")
        .to_owned();
    let leftovers = Leftovers {
        namespace: app.settings.namespace.clone(),
        amqp_url: app.settings.amqp_url.clone(),
        control_queue: app.keys().control_queue(),
        dir,
        worker_pid,
    };
    assert!(namespace_keys(&app.store, &leftovers.namespace).await > 0);
    (app, leftovers)
}

async fn namespace_keys(store: &sluice_store::Store, namespace: &str) -> usize {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{namespace}:*"))
        .query_async(&mut store.conn())
        .await
        .expect("redis");
    keys.len()
}

async fn assert_nothing_left(store: &sluice_store::Store, left: &Leftovers) {
    assert_eq!(namespace_keys(store, &left.namespace).await, 0);
    assert!(
        !PathBuf::from(format!("/proc/{}", left.worker_pid)).exists(),
        "the worker process is still there"
    );
    assert!(!left.dir.exists(), "{} is still there", left.dir.display());
    let conn = sluice_broker::connect(&left.amqp_url, "harness-test")
        .await
        .expect("broker");
    let channel = conn.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            left.control_queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            Default::default(),
        )
        .await;
    assert!(
        declared.is_err(),
        "{} is still declared",
        left.control_queue
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_app_leaves_no_process_key_queue_or_file() {
    let (app, left) = busy_app().await;
    let store = app.store.clone();
    drop(app);
    assert_nothing_left(&store, &left).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_in_a_failing_test_is_cleaned_up_too() {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let failing = tokio::spawn(async move {
        let (app, left) = busy_app().await;
        sender
            .send((app.store.clone(), left))
            .unwrap_or_else(|_| panic!("the test waits"));
        panic!("a failing test");
    });
    assert!(failing.await.expect_err("the task panics").is_panic());
    let (store, left) = receiver.await.expect("leftovers");
    assert_nothing_left(&store, &left).await;
}
