//! Compatibility with the official `openai` Python SDK: `tests/python/compat.py` drives a running
//! Sluice in strict response validation mode.
//!
//! The test finds a Python with `openai` importable (`SLUICE_TEST_PYTHON`, then `python3`/`python`
//! on the PATH), or else creates a virtualenv at `<workspace>/target/py-venv` once and installs
//! `openai` from PyPI into it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_tests::*;

/// Longest the script may run (the first run may also be installing the SDK, which is not counted).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Whether `python` runs and can import the SDK.
fn has_openai(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import openai"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} does not start: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Python interpreter with `openai` importable, installing it into a virtualenv if needed.
///
/// Concurrent callers each build their own temporary venv and `rename` it into place; the first
/// rename wins and the others use the winner's, so no lock is needed.
fn python_with_openai() -> PathBuf {
    if let Some(python) = std::env::var_os("SLUICE_TEST_PYTHON") {
        let python = PathBuf::from(python);
        assert!(
            has_openai(&python),
            "SLUICE_TEST_PYTHON={} cannot import openai",
            python.display()
        );
        return python;
    }
    for candidate in ["python3", "python"] {
        if has_openai(Path::new(candidate)) {
            return PathBuf::from(candidate);
        }
    }
    let venv = workspace().join("target").join("py-venv");
    let venv_python = venv.join("bin").join("python");
    if has_openai(&venv_python) {
        return venv_python;
    }
    let base = ["python3", "python"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("the compat test needs python3 (with the venv module) on the PATH");
    let tmp = workspace()
        .join("target")
        .join(format!("py-venv.tmp-{}", uuid::Uuid::new_v4().simple()));
    eprintln!("compat: installing the openai SDK into {}", venv.display());
    run(Command::new(base).args(["-m", "venv"]).arg(&tmp));
    let tmp_python = tmp.join("bin").join("python");
    run(Command::new(&tmp_python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "openai",
    ]));
    if venv.exists() && !has_openai(&venv_python) {
        // A broken leftover (interrupted by hand): replace it.
        std::fs::remove_dir_all(&venv).ok();
    }
    if std::fs::rename(&tmp, &venv).is_err() {
        // Another test process got there first.
        std::fs::remove_dir_all(&tmp).ok();
    }
    assert!(
        has_openai(&venv_python),
        "{} cannot import openai after installing it",
        venv_python.display()
    );
    venv_python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_openai_python_sdk_works_against_sluice() {
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .expect("python lookup");
    const MAX_UPLOAD: u64 = 1024 * 1024;
    let app = spawn_app_with(AppOptions::default(), |s| {
        s.limits.max_upload_bytes = MAX_UPLOAD
    })
    .await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join("compat.py");

    let child = tokio::process::Command::new(&python)
        .arg(&script)
        .env("OPENAI_BASE_URL", &app.base)
        .env("OPENAI_API_KEY", KEY_A)
        .env("SLUICE_MODEL", MODEL)
        .env("SLUICE_MAX_UPLOAD_BYTES", MAX_UPLOAD.to_string())
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("PYTHONUNBUFFERED", "1")
        .env_remove("OPENAI_ORG_ID")
        .env_remove("OPENAI_PROJECT_ID")
        .env_remove("OPENAI_WEBHOOK_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python starts");
    let out = tokio::time::timeout(SCRIPT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("compat.py did not finish in {SCRIPT_TIMEOUT:?}"))
        .expect("compat.py runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "compat.py failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("compat: all checks passed"),
        "compat.py stopped early:\n{stdout}\n{stderr}"
    );

    // The script's two batches ran through the real pipeline: 5 lines completed, the slow batch
    // cancelled with at most its 40 lines started.
    let calls = app.upstream_stats().calls;
    assert!((5..=45).contains(&calls), "upstream calls: {calls}");
    app.cleanup().await;
}
