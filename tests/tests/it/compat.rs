//! Compatibility with the official `openai` SDKs: `tests/python/compat.py` drives a running Sluice
//! in strict response validation mode, `tests/node/compat.mjs` with the Node SDK.
//!
//! The tests find or install the SDKs (see [`run_openai_script`] and [`script_with_openai`]).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use sluice_tests::node::script_with_openai;
use sluice_tests::python::run_openai_script;
use sluice_tests::*;

/// Longest the script may run (the first run may also be installing the SDK, which is not counted).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_openai_python_sdk_works_against_sluice() {
    const MAX_UPLOAD: u64 = 1024 * 1024;
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.limits.max_upload_bytes = MAX_UPLOAD
    })
    .await;
    let max_upload = MAX_UPLOAD.to_string();
    let env = [
        ("SLUICE_MODEL", MODEL),
        ("SLUICE_MAX_UPLOAD_BYTES", max_upload.as_str()),
    ];
    let stdout = run_openai_script("compat.py", &app.base, KEY_A, &env, SCRIPT_TIMEOUT).await;
    assert!(
        stdout.contains("compat: all checks passed"),
        "compat.py stopped early:\n{stdout}"
    );

    // The script's two batches ran through the real pipeline: 5 lines completed, the slow batch
    // cancelled with at most its 40 lines started.
    let calls = app.upstream_stats().calls;
    assert!((5..=45).contains(&calls), "upstream calls: {calls}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_openai_node_sdk_works_against_sluice() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("node")
        .join("compat.mjs");
    let script = tokio::task::spawn_blocking(move || script_with_openai(&source))
        .await
        .expect("node SDK lookup");
    let app = spawn_app().await;
    let child = tokio::process::Command::new("node")
        .arg(&script)
        .env("SLUICE_BASE", &app.base)
        .env("SLUICE_KEY", KEY_A)
        .env("SLUICE_MODEL", MODEL)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node starts");
    let out = tokio::time::timeout(SCRIPT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("compat.mjs did not finish in {SCRIPT_TIMEOUT:?}"))
        .expect("compat.mjs runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("node compat: ok"),
        "compat.mjs failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
