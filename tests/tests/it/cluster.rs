//! Scale-out readiness: a batch end to end against a three-node Redis Cluster of its own.

use std::time::{Duration, Instant};

use sluice_tests::redis_server::RedisServer;
use sluice_tests::*;

/// Three cluster-enabled `redis-server`s of this test, joined into one cluster.
struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start(&["--cluster-enabled", "yes", "--appendonly", "no"]))
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let mut create = vec!["--cluster", "create"];
        create.extend(addrs.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = nodes[0].cli(&create);
        assert!(out.contains("All 16384 slots covered"), "{out}");
        for node in &nodes {
            let start = Instant::now();
            while !node.cli(&["cluster", "info"]).contains("cluster_state:ok") {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "cluster state ok"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Self { nodes }
    }

    /// Seed URLs in the form `redis_url` takes with `redis_cluster = true`.
    fn redis_url(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    fn keys_per_node(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|n| n.cli(&["dbsize"]).trim().parse().unwrap_or(0))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_completes_against_a_three_node_redis_cluster() {
    let cluster = RedisCluster::start();
    let url = cluster.redis_url();
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.redis_url = url;
        s.redis_cluster = true;
    })
    .await;

    let mut lines = chat_lines(300);
    lines.push(chat_line_with_mock(
        "refused",
        serde_json::json!({"status": 400}),
    ));
    let expected: Vec<String> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_owned())
        .collect();
    let batch_id = app.submit(KEY_A, &lines).await;
    let batch = app
        .wait_terminal(KEY_A, &batch_id, Duration::from_secs(60))
        .await;
    assert_eq!(batch["status"], "completed", "{batch:#}");
    assert_eq!(batch["request_counts"]["completed"], 300);
    assert_eq!(batch["request_counts"]["failed"], 1);
    let (output, errors) = app.results(KEY_A, &batch).await;
    assert_exactly_once(&output, &errors, &expected);

    // Listing reads records that live on different nodes.
    let second = app.submit(KEY_A, &chat_lines(5)).await;
    let listed: serde_json::Value = app
        .req(reqwest::Method::GET, "/batches?limit=10", KEY_A)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [second.as_str(), batch_id.as_str()], "{listed:#}");
    let (status, _) = app.get_batch_raw(KEY_B, &batch_id).await;
    assert_eq!(status, 404);

    let spread = cluster.keys_per_node();
    assert!(
        spread.iter().filter(|n| **n > 0).count() >= 2,
        "keys should spread over the cluster's nodes: {spread:?}"
    );
    drop(app);
    drop(cluster);
}
