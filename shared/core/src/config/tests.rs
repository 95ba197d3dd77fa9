//! Loading and validation tests of the whole configuration (figment jails for file and environment
//! layers).

#![allow(clippy::result_large_err)] // figment::Jail closures return figment::Error by design

use std::path::Path;

use super::tenancy::{EMPTY_KEY_SHA256, check_tasks};
use super::*;

#[test]
fn input_limits_below_their_floor_are_refused_by_name() {
    let mut s = Settings::default();
    s.limits.max_reported_errors = 0;
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("limits.max_reported_errors"), "{err}");
    let mut s = Settings::default();
    s.limits.max_id_chars = 10;
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("limits.max_id_chars"), "{err}");
}

#[test]
fn s3_static_credentials_load_from_the_environment_and_never_print() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("SLUICE_STORAGE__KIND", "s3");
        jail.set_env("SLUICE_STORAGE__BUCKET", "b");
        jail.set_env("SLUICE_STORAGE__ACCESS_KEY_ID", "AKIDEXAMPLE");
        jail.set_env("SLUICE_STORAGE__SECRET_ACCESS_KEY", "very-secret-value");
        let s = Settings::load(None).map_err(|e| e.to_string())?;
        let StorageSettings::S3 {
            secret_access_key, ..
        } = &s.storage
        else {
            panic!("s3 storage expected: {:?}", s.storage);
        };
        assert_eq!(
            secret_access_key.as_ref().map(|k| k.0.as_str()),
            Some("very-secret-value")
        );
        assert!(!format!("{s:?}").contains("very-secret-value"));
        // A key id without its secret is refused by name.
        let mut s = s;
        if let StorageSettings::S3 {
            secret_access_key, ..
        } = &mut s.storage
        {
            *secret_access_key = None;
        }
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("storage.secret_access_key"), "{err}");
        Ok(())
    });
}

#[test]
fn s3_storage_loads_from_a_file_and_stray_variables_are_ignored() {
    figment::Jail::expect_with(|jail| {
        jail.create_file(
            "s.toml",
            "[storage]\nkind = \"s3\"\nbucket = \"b\"\n[worker]\nconcurrency = 7\n",
        )?;
        jail.set_env("SLUICE_API_PORT", "tcp://10.0.0.1:80");
        jail.set_env("SLUICE_CONFIG", "s.toml");
        jail.set_env("SLUICE_LIMITS__MAX_LINES", "12");
        let s = Settings::load(Some(Path::new("s.toml"))).map_err(|e| e.to_string())?;
        assert!(matches!(s.storage, StorageSettings::S3 { ref bucket, .. } if bucket == "b"));
        assert_eq!(s.worker.concurrency, 7);
        assert_eq!(s.limits.max_lines, 12);
        assert_eq!(s.namespace, "sluice");
        Ok(())
    });
}

#[test]
fn unknown_keys_in_the_file_are_refused() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("s.toml", "[worker]\nconcurency = 7\n")?;
        let err = Settings::load(Some(Path::new("s.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("concurency"), "{err}");
        Ok(())
    });
}

#[test]
fn provider_pacing_loads_and_zero_limits_are_refused() {
    figment::Jail::expect_with(|jail| {
        let provider =
            "[[providers]]\nname = \"p\"\nbase_url = \"http://p/v1\"\nmodels = [\"*\"]\n";
        jail.create_file(
            "s.toml",
            &format!("{provider}[providers.pacing]\nrpm = 600\ntpm = 90000\nmax_concurrency = 8\n"),
        )?;
        let s = Settings::load(Some(Path::new("s.toml"))).map_err(|e| e.to_string())?;
        assert_eq!(s.providers[0].pacing.rpm, Some(600));
        assert_eq!(s.providers[0].pacing.tpm, Some(90_000));
        assert_eq!(s.providers[0].pacing.max_concurrency, Some(8));
        assert_eq!(s.providers[0].pacing.burst_ms, None);
        jail.create_file(
            "z.toml",
            &format!("{provider}[providers.pacing]\nrpm = 0\n"),
        )?;
        let err = Settings::load(Some(Path::new("z.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("pacing"), "{err}");
        Ok(())
    });
}

#[test]
fn zero_lines_per_message_is_refused_and_zero_express_lines_is_allowed() {
    let mut s = Settings::default();
    s.worker.express_lines = 0;
    s.validate().unwrap();
    s.worker.lines_per_message = 0;
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("lines_per_message"), "{err}");
    let mut s = Settings::default();
    s.worker.paced_lines_per_message = 0;
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("paced_lines_per_message"), "{err}");
}

#[test]
fn scheduled_batches_get_the_smaller_of_the_two_message_sizes() {
    let mut s = Settings::default();
    assert_eq!(s.worker.lines_per_message_for(false), 128);
    assert_eq!(s.worker.lines_per_message_for(true), 16);
    s.worker.lines_per_message = 4;
    assert_eq!(s.worker.lines_per_message_for(false), 4);
    assert_eq!(s.worker.lines_per_message_for(true), 4);
}

#[test]
fn values_that_would_panic_or_overflow_are_refused_with_their_key() {
    type Tweak = fn(&mut Settings);
    let cases: [(&str, Tweak); 8] = [
        ("worker.max_hold_ms", |s| s.worker.max_hold_ms = 50),
        ("worker.lines_per_message", |s| {
            s.worker.lines_per_message = usize::MAX
        }),
        ("worker.paced_lines_per_message", |s| {
            s.worker.paced_lines_per_message = 20_000
        }),
        ("aggregator.sweep_interval_ms", |s| {
            s.aggregator.sweep_interval_ms = 0
        }),
        ("worker.backoff_base_ms", |s| {
            s.worker.backoff_base_ms = 60_000
        }),
        ("worker.request_timeout_ms", |s| {
            s.worker.request_timeout_ms = u64::MAX
        }),
        ("limits.max_response_bytes", |s| {
            s.limits.max_response_bytes = 0
        }),
        ("providers[p].pacing.burst_ms", |s| {
            s.providers.push(ProviderSettings {
                name: "p".into(),
                base_url: "http://p/v1".into(),
                api_key_env: None,
                models: vec!["*".into()],
                endpoints: Vec::new(),
                batch: true,
                flavors: Vec::new(),
                pacing: PacingSettings {
                    rpm: Some(600),
                    burst_ms: Some(u64::MAX),
                    ..PacingSettings::default()
                },
                refused_body_fields: Vec::new(),
            })
        }),
    ];
    for (key, set) in cases {
        let mut s = Settings::default();
        set(&mut s);
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
}

#[test]
fn the_digest_of_the_empty_key_is_refused_naming_the_tenant() {
    assert_eq!(hash_api_key(""), EMPTY_KEY_SHA256);
    let mut s = Settings::default();
    s.tenants.push(TenantSettings {
        id: "acme".into(),
        api_key_sha256: vec![hash_api_key("").to_ascii_uppercase()],
        ..Default::default()
    });
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("tenants[acme].api_key_sha256"), "{err}");
    s.tenants[0].api_key_sha256 = vec![hash_api_key("sk-real")];
    s.validate().unwrap();
}

#[test]
fn dependency_timeouts_of_zero_are_refused_with_the_key_named() {
    let mut s = Settings::default();
    s.dependencies.probe_timeout_ms = 0;
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("dependencies.probe_timeout_ms"), "{err}");
    let mut s = Settings::default();
    s.dependencies.startup_deadline_secs = Some(0);
    s.validate().unwrap();
}

#[test]
fn zero_server_limits_are_refused_naming_the_key() {
    let mut s = Settings::default();
    s.api.max_uploads_per_tenant = 0;
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("api.max_uploads_per_tenant"), "{err}");
    let mut s = Settings::default();
    s.api.header_read_timeout_ms = 0;
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("api.header_read_timeout_ms"), "{err}");
}

#[test]
fn an_explicit_listen_address_is_told_from_the_default() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("none.toml", "namespace = \"x\"\n")?;
        jail.create_file("some.toml", "[api]\nlisten = \"0.0.0.0:8080\"\n")?;
        assert!(!Settings::sets(Some(Path::new("none.toml")), "api.listen"));
        assert!(Settings::sets(Some(Path::new("some.toml")), "api.listen"));
        jail.set_env("SLUICE_API__LISTEN", "0.0.0.0:9000");
        assert!(Settings::sets(Some(Path::new("none.toml")), "api.listen"));
        assert!(Settings::sets(None, "api.listen"));
        Ok(())
    });
}

#[test]
fn a_tenant_s_own_quota_wins_over_the_default() {
    let mut s = Settings::default();
    s.tenants.push(TenantSettings {
        id: "small".into(),
        api_key_sha256: vec![hash_api_key("sk-small")],
        storage_quota_bytes: Some(1_000),
        ..Default::default()
    });
    s.validate().unwrap();
    let default = s.lifecycle.storage_quota_files;
    assert_eq!(
        s.storage_quota("small"),
        StorageQuota {
            bytes: 1_000,
            files: default
        }
    );
    assert_eq!(s.storage_quota("other").bytes, 1 << 40);
    s.tenants[0].storage_quota_bytes = Some(u64::MAX);
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("tenants[small].storage_quota_bytes"), "{err}");
}

#[test]
fn lifecycle_clocks_of_zero_are_refused_naming_the_key() {
    let mut s = Settings::default();
    s.lifecycle.batch_retention_secs = 0;
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("lifecycle.batch_retention_secs"), "{err}");
    let mut s = Settings::default();
    s.lifecycle.batch_file_expires_after_secs = 2;
    s.validate().unwrap();
}

#[test]
fn defaults_validate() {
    Settings::default().validate().unwrap();
}

#[test]
fn the_task_backing_model_cannot_be_a_task_model() {
    assert!(
        check_tasks(&TaskSettings {
            model: Some("extract".into()),
            ..TaskSettings::default()
        })
        .is_err()
    );
    assert!(
        check_tasks(&TaskSettings {
            model: Some("gpt-4o-mini".into()),
            ..TaskSettings::default()
        })
        .is_ok()
    );
}

#[test]
fn a_tenant_id_listed_twice_is_refused_naming_both_positions() {
    let mut s = Settings::default();
    for (id, key) in [("acme", "sk-a"), ("beta", "sk-b"), ("acme", "sk-c")] {
        s.tenants.push(TenantSettings {
            id: id.into(),
            api_key_sha256: vec![hash_api_key(key)],
            ..Default::default()
        });
    }
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("tenants[2].id"), "{err}");
    assert!(err.contains("tenants[0]"), "{err}");
    assert!(!err.contains("tenants[1].id"), "{err}");
    s.tenants[2].id = "gamma".into();
    s.validate().unwrap();
}

#[test]
fn one_key_digest_under_two_tenants_or_twice_is_refused_naming_both_positions() {
    let tenant = |id: &str, keys: &[&str]| TenantSettings {
        id: id.into(),
        api_key_sha256: keys.iter().map(|k| hash_api_key(k)).collect(),
        ..Default::default()
    };
    // Under two tenants, in either case of hex digits.
    let mut s = Settings::default();
    s.tenants.push(tenant("acme", &["sk-a", "sk-shared"]));
    s.tenants.push(tenant("beta", &["sk-b"]));
    s.tenants[1]
        .api_key_sha256
        .push(hash_api_key("sk-shared").to_ascii_uppercase());
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("tenants[1].api_key_sha256[1]"), "{err}");
    assert!(err.contains("tenants[0].api_key_sha256[1]"), "{err}");
    // Twice under one tenant.
    let mut s = Settings::default();
    s.tenants.push(tenant("acme", &["sk-a", "sk-b", "sk-a"]));
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("tenants[0].api_key_sha256[2]"), "{err}");
    assert!(err.contains("tenants[0].api_key_sha256[0]"), "{err}");
    // Distinct keys pass.
    s.tenants[0].api_key_sha256.pop();
    s.validate().unwrap();
}
