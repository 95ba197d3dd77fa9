//! The web console at `/console`: its embedded assets and headers, and the whole flow driven in
//! headless Debian chromium by `tests/console/console.test.mjs` (playwright-core) against a real
//! Sluice with two tenants and the mock upstream.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    X_CONTENT_TYPE_OPTIONS,
};
use serde_json::{Value, json};
use sluice_tests::*;

/// Longest the browser script may run (two batches, one of them cancelled).
const BROWSER_TIMEOUT: Duration = Duration::from_secs(300);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn root(app: &TestApp) -> String {
    app.base.trim_end_matches("/v1").to_owned()
}

/// Every file the page loads, with the content type it must be served with.
const ASSETS: [(&str, &str); 8] = [
    ("/console", "text/html; charset=utf-8"),
    ("/console/", "text/html; charset=utf-8"),
    ("/console/app.js", "text/javascript; charset=utf-8"),
    ("/console/api.js", "text/javascript; charset=utf-8"),
    ("/console/ui.js", "text/javascript; charset=utf-8"),
    ("/console/batch.js", "text/javascript; charset=utf-8"),
    ("/console/style.css", "text/css; charset=utf-8"),
    ("/console/icon.svg", "image/svg+xml"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_assets_are_served_without_a_key_under_a_strict_policy() {
    let app = spawn_app_with(AppOptions::api_only(), |_| {}).await;
    let root = root(&app);
    let http = reqwest::Client::new();
    for (path, content_type) in ASSETS {
        let response = http.get(format!("{root}{path}")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let headers = response.headers().clone();
        let header = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(header(CONTENT_TYPE), content_type, "{path}");
        assert_eq!(header(X_CONTENT_TYPE_OPTIONS), "nosniff", "{path}");
        assert_eq!(header(CACHE_CONTROL), "no-cache", "{path}");
        let csp = header(CONTENT_SECURITY_POLICY);
        assert!(csp.contains("default-src 'self'"), "{path}: {csp}");
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        let etag = header(ETAG);
        assert!(etag.starts_with('"'), "{path}: ETag {etag:?}");
        let body = response.bytes().await.unwrap();
        // The binary serves what is in api/console: nothing is read from disk at run time, so
        // the two can only differ if the binary is stale.
        let file = if path.ends_with('/') || path == "/console" {
            "index.html"
        } else {
            path.trim_start_matches("/console/")
        };
        let on_disk = std::fs::read(workspace().join("api/console").join(file)).unwrap();
        assert_eq!(body.as_ref(), on_disk.as_slice(), "{path}");

        let again = http
            .get(format!("{root}{path}"))
            .header(IF_NONE_MATCH, &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
        assert!(again.bytes().await.unwrap().is_empty());
    }

    // The page has no inline script or style for the policy to block, and loads only assets
    // that exist (checked above).
    let index = std::fs::read_to_string(workspace().join("api/console/index.html")).unwrap();
    assert!(!index.contains("<script>") && !index.contains("style="));
    let handlers: Vec<&str> = index
        .split(|c: char| c.is_whitespace())
        .filter(|w| w.starts_with("on") && w.contains('=') && !w.starts_with("one"))
        .collect();
    assert!(handlers.is_empty(), "inline handlers: {handlers:?}");
    for asset in ["/console/app.js", "/console/style.css", "/console/icon.svg"] {
        assert!(index.contains(asset), "index.html loads {asset}");
    }

    let missing = http
        .get(format!("{root}/console/secrets.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    let traversal = http
        .get(format!("{root}/console/..%2FCargo.toml"))
        .send()
        .await
        .unwrap();
    assert_eq!(traversal.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_can_be_turned_off() {
    let app = spawn_app_with(AppOptions::api_only(), |s| s.api.console = false).await;
    let root = root(&app);
    for path in ["/console", "/console/", "/console/app.js"] {
        let response = app.http.get(format!("{root}{path}")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["error"]["type"], "invalid_request_error",
            "{path}: {body}"
        );
    }
    // The API itself is unaffected.
    let (status, _) = list(&app, KEY_A).await;
    assert_eq!(status, 200);
}

/// The browser to drive: `CHROMIUM_PATH`, else Debian's `chromium`.
fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "chromium is missing at {}: install it with `apt-get install -y chromium` (.ci/run does), \
         or set CHROMIUM_PATH",
        path.display()
    );
    path
}

/// `tests/console` with its locked `node_modules` (playwright-core, typescript), installed on
/// first use. Installed beside it and renamed into place, so two tests that start at once do not
/// run `npm ci` into the same directory.
fn console_scripts() -> PathBuf {
    let dir = workspace().join("tests/console");
    let modules = dir.join("node_modules");
    if modules.join("playwright-core").exists() && modules.join("typescript").exists() {
        return dir;
    }
    let tmp = workspace().join(format!(
        "target/console-npm-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&tmp).expect("a directory for npm ci");
    for file in ["package.json", "package-lock.json"] {
        std::fs::copy(dir.join(file), tmp.join(file)).expect("copy the npm manifest");
    }
    eprintln!("npm ci for {}", dir.display());
    let out = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&tmp)
        .output()
        .expect("npm (with node) must be on the PATH");
    assert!(
        out.status.success(),
        "npm ci for tests/console failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A stale or partial node_modules (an older lockfile) is replaced; losing the race to a
    // concurrent install is fine, its result is the same.
    if !modules.join("typescript").exists() {
        std::fs::remove_dir_all(&modules).ok();
    }
    std::fs::rename(tmp.join("node_modules"), &modules).ok();
    std::fs::remove_dir_all(&tmp).ok();
    assert!(
        modules.join("playwright-core").exists(),
        "no node_modules in {}",
        dir.display()
    );
    dir
}

#[test]
fn the_console_scripts_type_check() {
    let dir = console_scripts();
    let out = std::process::Command::new("node")
        .arg(dir.join("node_modules/typescript/bin/tsc"))
        .args(["-p", "tsconfig.json"])
        .current_dir(&dir)
        .output()
        .expect("node must be on the PATH");
    assert!(
        out.status.success(),
        "tsc found errors in api/console:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` chat lines that each take `delay_ms` upstream; `failing` custom ids answer `status`.
fn delayed_lines(prefix: &str, n: usize, delay_ms: u64, failing: &[(usize, u16)]) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i}");
            match failing.iter().find(|(at, _)| *at == i) {
                Some((_, status)) => chat_line_with_mock(&id, json!({"status": status})),
                None => chat_line_with_mock(&id, json!({"delay_ms": delay_ms})),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_runs_a_batch_end_to_end_in_a_real_browser() {
    let browser = chromium();
    let scripts = console_scripts();
    // Four lines at a time at 600 ms each: about six seconds of visible progress for 40 lines,
    // several of the console's 2 s polls.
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.worker.concurrency = 4;
        s.worker.lines_per_message = 4;
    })
    .await;
    let dir = tempdir();
    let fast = dir.join("fast.jsonl");
    let slow = dir.join("slow.jsonl");
    std::fs::write(
        &fast,
        jsonl(&delayed_lines(
            "fast",
            40,
            600,
            &[(5, 400), (17, 400), (30, 422)],
        )),
    )
    .unwrap();
    std::fs::write(&slow, jsonl(&delayed_lines("slow", 80, 3_000, &[]))).unwrap();
    let bad = dir.join("bad.jsonl");
    let mut bad_lines = jsonl(&chat_lines(1));
    bad_lines.extend_from_slice(
        b"{\"custom_id\":\"no-url\",\"method\":\"POST\",\"body\":{}}\nnot json\n",
    );
    std::fs::write(&bad, bad_lines).unwrap();
    let screenshot = std::env::var_os("CONSOLE_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/console-batch.png"));

    let child = tokio::process::Command::new("node")
        .arg(scripts.join("console.test.mjs"))
        .current_dir(&scripts)
        .env("SLUICE_CONSOLE_ROOT", root(&app))
        .env("SLUICE_KEY_A", KEY_A)
        .env("SLUICE_KEY_B", KEY_B)
        .env("SLUICE_FAST_JSONL", &fast)
        .env("SLUICE_SLOW_JSONL", &slow)
        .env("SLUICE_BAD_JSONL", &bad)
        .env("CONSOLE_SCREENSHOT", &screenshot)
        .env("CHROMIUM_PATH", &browser)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node must be on the PATH");
    let out = tokio::time::timeout(BROWSER_TIMEOUT, child.wait_with_output())
        .await
        .expect("the browser test finishes in time")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("console test passed"), "{stdout}");
    assert!(
        screenshot.exists(),
        "no screenshot at {}",
        screenshot.display()
    );

    // What the browser did, seen from the server: tenant A owns the four batches (completed,
    // cancelled, failed validation, and the completed retry of the first); tenant B owns nothing.
    let (_, list_a) = list(&app, KEY_A).await;
    let statuses: Vec<_> = list_a
        .iter()
        .map(|b| b["status"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        statuses,
        ["completed", "failed", "cancelled", "completed"],
        "{list_a:?}"
    );
    assert_eq!(list_a[3]["metadata"]["project"], "console-test");
    assert_eq!(list_a[0]["retry_of"], list_a[3]["id"]);
    assert_eq!(list_a[3]["retries"], json!([list_a[0]["id"]]));
    let (_, list_b) = list(&app, KEY_B).await;
    assert!(list_b.is_empty(), "{list_b:?}");
    std::fs::remove_dir_all(&dir).ok();
}

async fn list(app: &TestApp, key: &str) -> (u16, Vec<Value>) {
    let response = app
        .req(reqwest::Method::GET, "/batches?limit=100", key)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (status, body["data"].as_array().cloned().unwrap_or_default())
}

fn tempdir() -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("sluice-console-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
