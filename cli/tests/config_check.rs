//! `sluice config check` run as a binary: its output lines and exit codes.

use std::path::Path;
use std::process::Command;

fn sluice_config_check(file: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["config", "check"])
        .arg(file)
        .env_remove("SLUICE_CONFIG")
        .output()
        .expect("sluice runs");
    (
        out.status.code().expect("sluice exits"),
        String::from_utf8(out.stdout).expect("UTF-8 output"),
    )
}

#[test]
fn config_check_prints_ok_or_every_problem_with_its_key() {
    let dir = std::env::temp_dir().join(format!("sluice-config-check-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, "[worker]\nconcurrency = 8\n").unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[worker]\nconcurrency = 0\n[api]\nmax_connections = 0\n",
    )
    .unwrap();
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "[worker]\nconcurency = 8\n").unwrap();

    assert_eq!(sluice_config_check(&good), (0, "ok\n".to_owned()));
    assert_eq!(
        sluice_config_check(&bad),
        (
            1,
            "worker.concurrency: must be at least 1 (it is 0)\napi.max_connections: must be at least 1\n"
                .to_owned()
        )
    );
    assert_eq!(
        sluice_config_check(&typo),
        (
            1,
            "worker.concurency: unknown key (did you mean `concurrency`?)\n".to_owned()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_shipped_configuration_passes_the_check() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let files = [
        "config/sluice.toml",
        "kubernetes/base/config/sluice.toml",
        "kubernetes/overlays/example/sluice.toml",
    ];
    for file in files {
        let (code, out) = sluice_config_check(&deploy.join(file));
        assert_eq!((code, out.as_str()), (0, "ok\n"), "deploy/{file}");
    }
}
