//! Python tools the tests drive (the official `openai` SDK, schemathesis), installed on demand.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Whether `python` runs and can import `module`.
fn can_import(python: &Path, module: &str) -> bool {
    Command::new(python)
        .args(["-c", &format!("import {module}")])
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

/// A Python interpreter that can import `module`: `SLUICE_TEST_PYTHON` if set, else `python3` or
/// `python` from the PATH if they can, else a virtualenv at `<workspace>/target/<venv>`, created
/// once with `pip install <package>` from PyPI.
///
/// Concurrent callers each build their own temporary venv and `rename` it into place; the first
/// rename wins and the others use the winner's, so no lock is needed.
pub fn python_with(module: &str, package: &str, venv: &str) -> PathBuf {
    if let Some(python) = std::env::var_os("SLUICE_TEST_PYTHON") {
        let python = PathBuf::from(python);
        if can_import(&python, module) {
            return python;
        }
    }
    for candidate in ["python3", "python"] {
        if can_import(Path::new(candidate), module) {
            return PathBuf::from(candidate);
        }
    }
    let venv = workspace().join("target").join(venv);
    let venv_python = venv.join("bin").join("python");
    if can_import(&venv_python, module) {
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
        .expect("python3 (with the venv module) must be on the PATH");
    let tmp = venv.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    eprintln!("installing {package} into {}", venv.display());
    run(Command::new(base).args(["-m", "venv"]).arg(&tmp));
    let tmp_python = tmp.join("bin").join("python");
    run(Command::new(&tmp_python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        package,
    ]));
    if venv.exists() && !can_import(&venv_python, module) {
        // A broken leftover (interrupted by hand): replace it.
        std::fs::remove_dir_all(&venv).ok();
    }
    if std::fs::rename(&tmp, &venv).is_err() {
        // Another test process got there first.
        std::fs::remove_dir_all(&tmp).ok();
    }
    assert!(
        can_import(&venv_python, module),
        "{} cannot import {module} after installing {package}",
        venv_python.display()
    );
    venv_python
}

/// Runs `tests/python/<script>` with a Python that has the official `openai` SDK (installed into
/// `target/py-venv` when missing), pointed at `base` with `key` and given `env`; panics with its
/// output unless it exits 0 within `timeout`. Returns its stdout.
pub async fn run_openai_script(
    script: &str,
    base: &str,
    key: &str,
    env: &[(&str, &str)],
    timeout: std::time::Duration,
) -> String {
    let python = tokio::task::spawn_blocking(|| python_with("openai", "openai", "py-venv"))
        .await
        .expect("python lookup");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let child = tokio::process::Command::new(&python)
        .arg(&path)
        .env("OPENAI_BASE_URL", base)
        .env("OPENAI_API_KEY", key)
        .envs(env.iter().copied())
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
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish in {timeout:?}"))
        .unwrap_or_else(|e| panic!("{script} does not run: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
