//! Scale-out readiness: a batch end to end against a three-node Redis Cluster of its own.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_tests::*;

/// Three cluster-enabled `redis-server`s on spare ports, killed (and their files removed) on drop.
struct RedisCluster {
    ports: Vec<u16>,
    servers: Vec<Child>,
    dir: PathBuf,
}

impl RedisCluster {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("sluice-cluster-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("cluster directory");
        let ports = spare_cluster_ports(3);
        let servers = ports
            .iter()
            .map(|port| {
                Command::new("redis-server")
                    .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--cluster-enabled", "yes"])
                    .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                    .args(["--save", "", "--appendonly", "no"])
                    .arg("--dir")
                    .arg(&dir)
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("redis-server starts")
            })
            .collect();
        let cluster = Self {
            ports,
            servers,
            dir,
        };
        for port in &cluster.ports {
            cluster.wait_until(|| cli(*port, &["ping"]).contains("PONG"), "node up");
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let mut create = vec!["--cluster", "create"];
        create.extend(nodes.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = cli(cluster.ports[0], &create);
        assert!(out.contains("All 16384 slots covered"), "{out}");
        for port in &cluster.ports {
            cluster.wait_until(
                || cli(*port, &["cluster", "info"]).contains("cluster_state:ok"),
                "cluster state ok",
            );
        }
        cluster
    }

    fn wait_until(&self, ready: impl Fn() -> bool, what: &str) {
        let start = Instant::now();
        while !ready() {
            assert!(start.elapsed() < Duration::from_secs(30), "{what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Seed URLs in the form `redis_url` takes with `redis_cluster = true`.
    fn redis_url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn keys_per_node(&self) -> Vec<u64> {
        self.ports
            .iter()
            .map(|p| cli(*p, &["dbsize"]).trim().parse().unwrap_or(0))
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            server.kill().ok();
            server.wait().ok();
        }
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Ports free now whose cluster bus port (port + 10000) is free too.
fn spare_cluster_ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    while ports.len() < n {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        if port < 55_000
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
            && !ports.contains(&port)
        {
            ports.push(port);
        }
    }
    ports
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
    app.cleanup().await;
    drop(cluster);
}
