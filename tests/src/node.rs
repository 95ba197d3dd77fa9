//! The official `openai` Node SDK, installed on demand next to the scripts that import it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory under `<workspace>/target` holding `node_modules/openai` (npm registry, once) and a
/// copy of `script`, so the script's `import 'openai'` resolves there. Returns the copy's path.
pub fn script_with_openai(script: &Path) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let dir = workspace.join("target").join("node-sdk");
    if !dir.join("node_modules").join("openai").exists() {
        let tmp = dir.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&tmp).expect("node-sdk directory");
        eprintln!("installing the openai Node SDK into {}", dir.display());
        let out = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
            .arg(&tmp)
            .arg("openai@7")
            .output()
            .expect("npm (with node) must be on the PATH");
        assert!(
            out.status.success(),
            "npm install openai failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_dir_all(&dir).ok();
        if std::fs::rename(&tmp, &dir).is_err() {
            std::fs::remove_dir_all(&tmp).ok();
        }
    }
    let copy = dir.join(script.file_name().expect("script file name"));
    std::fs::copy(script, &copy).expect("copy the script next to node_modules");
    copy
}
