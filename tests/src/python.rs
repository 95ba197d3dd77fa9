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
