//! Pieces the benchmark programs (`sluice-bench`, `sluice-bench-pacing`) share.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::KEY_A;

/// The `sluice` binary next to the benchmark's own (both built by `cargo build --release --bins`).
pub fn sluice_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.parent().expect("target dir").join("sluice")
}

/// Waits until the API at `base` (ending in `/v1`) answers tenant A's batch listing.
pub async fn wait_ready(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(r) = http
            .get(format!("{base}/batches"))
            .bearer_auth(KEY_A)
            .send()
            .await
            && r.status().is_success()
        {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "API did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
