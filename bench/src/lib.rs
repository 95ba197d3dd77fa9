//! Pieces the benchmark programs share: finding the `sluice` binary, waiting for the API, and
//! reading a process's memory and CPU time from `/proc`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use sluice_tests::KEY_A;
/// Child processes of a benchmark run are held in this guard, killed when the run ends or fails.
pub use sluice_tests::KillOnDrop;

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

/// Peak resident set (VmHWM) and current resident set (VmRSS) of a process, in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// CPU time (user + system) a process has used so far, in seconds, from `/proc/<pid>/stat`.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let field = |n: usize| -> u64 {
        rest.split_whitespace()
            .nth(n)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 (11 and 12 after the name), in USER_HZ, which the
    // kernel fixes at 100 for user space on every architecture Sluice runs on.
    (field(11) + field(12)) as f64 / 100.0
}

/// The process listening on TCP `port` on this machine (from `ss`), if it can be seen.
pub fn listener_pid(port: u16) -> Option<u32> {
    let out = std::process::Command::new("ss")
        .args(["-ltnpH", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("pid=")? + 4;
    text[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Calls per command from Redis' `INFO commandstats` (`cmdstat_evalsha:calls=3,...`).
pub async fn redis_commandstats(
    store: &sluice_store::Store,
) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut store.conn())
        .await?;
    Ok(info
        .lines()
        .filter_map(|l| {
            let (name, stats) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect())
}

/// CPU seconds of a set of processes, read before and after a run.
pub struct CpuMeter {
    procs: Vec<(String, Vec<u32>, f64)>,
}

impl CpuMeter {
    /// Starts measuring `procs` (a label and the pids counted under it).
    pub fn start(procs: Vec<(String, Vec<u32>)>) -> Self {
        Self {
            procs: procs
                .into_iter()
                .map(|(label, pids)| {
                    let cpu = pids.iter().map(|p| cpu_secs(*p)).sum();
                    (label, pids, cpu)
                })
                .collect(),
        }
    }

    /// CPU seconds each label used since [`CpuMeter::start`].
    pub fn used(&self) -> Vec<(String, f64)> {
        self.procs
            .iter()
            .map(|(label, pids, before)| {
                let now: f64 = pids.iter().map(|p| cpu_secs(*p)).sum();
                (label.clone(), now - before)
            })
            .collect()
    }
}
