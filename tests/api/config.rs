//! Env-file selection, ${VAR} expansion, validation and check-config masking.

use std::collections::HashMap;
use std::process::Command;

use user_service::config::{choose_env_file, Environment, Settings};

fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("us-config-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The repository's three env files copied into a fresh folder, so a developer's
/// own `.env` in the checkout cannot change what these tests see.
fn env_files() -> std::path::PathBuf {
    let dir = tempdir();
    for f in [".env.dev", ".env.staging", ".env.production"] {
        std::fs::copy(format!("{REPO}/{f}"), dir.join(f)).unwrap();
    }
    dir
}

/// What .env.production leaves to the environment, filled with test values.
const PRODUCTION_SECRETS: [(&str, &str); 7] = [
        ("APP_ENV", "production"),
        ("PRODUCTION_DB_PASSWORD", "pw-from-vault"),
        ("SENTRY_DSN", ""),
        ("PRODUCTION_JWT_PRIVATE_KEY", "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIKqg0ZQ3zbrb0k7qkQ8i7i0dqS2Qmpe1Lw3RkR3dX0aS\n-----END PRIVATE KEY-----"),
        ("PRODUCTION_JWT_PREVIOUS_PUBLIC_KEYS", ""),
        ("PRODUCTION_CREDENTIALS_ENCRYPTION_KEYS", "prd-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
        ("PRODUCTION_API_KEY_HASH_SECRET", "0123456789abcdef0123456789abcdef-production"),
];

#[test]
fn env_file_selection_follows_env_file_then_dot_env_then_app_env() {
    let dir = tempdir();
    for f in [".env.dev", ".env.staging", ".env.production"] {
        std::fs::write(dir.join(f), "X=1\n").unwrap();
    }
    // By APP_ENV (development when unset).
    assert_eq!(
        choose_env_file(&vars(&[]), &dir).unwrap(),
        dir.join(".env.dev")
    );
    assert_eq!(
        choose_env_file(&vars(&[("APP_ENV", "staging")]), &dir).unwrap(),
        dir.join(".env.staging")
    );
    assert_eq!(
        choose_env_file(&vars(&[("APP_ENV", "production")]), &dir).unwrap(),
        dir.join(".env.production")
    );
    // .env wins over APP_ENV (the seed's `cp .env.dev .env` habit).
    std::fs::write(dir.join(".env"), "X=2\n").unwrap();
    assert_eq!(
        choose_env_file(&vars(&[("APP_ENV", "production")]), &dir).unwrap(),
        dir.join(".env")
    );
    // ENV_FILE wins over everything.
    assert_eq!(
        choose_env_file(&vars(&[("ENV_FILE", ".env.staging")]), &dir).unwrap(),
        dir.join(".env.staging")
    );
}

#[test]
fn the_three_env_files_carry_the_seed_values() {
    let dir = &env_files();
    let dev = Settings::load_from(&vars(&[("APP_ENV", "development")]), dir).unwrap();
    assert_eq!(dev.app_env, Environment::Development);
    assert_eq!(dev.user_service_port, 8011);
    assert_eq!(dev.login_max_attempts, 5);
    assert_eq!(dev.password_min_length, 12);
    assert!(dev.debug);
    assert!(dev.problems().is_empty(), "{:?}", dev.problems());

    let staging_secrets = [
        ("APP_ENV", "staging"),
        ("STAGING_JWT_PRIVATE_KEY", "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIKqg0ZQ3zbrb0k7qkQ8i7i0dqS2Qmpe1Lw3RkR3dX0aS\n-----END PRIVATE KEY-----"),
        ("STAGING_CREDENTIALS_ENCRYPTION_KEYS", "stg-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
        ("STAGING_API_KEY_HASH_SECRET", "0123456789abcdef0123456789abcdef-staging"),
    ];
    let stg = Settings::load_from(&vars(&staging_secrets), dir).unwrap();
    assert_eq!(stg.user_service_port, 8111);
    assert_eq!(stg.user_service_host, "127.0.0.1");
    assert_eq!(stg.login_max_attempts, 5);
    assert!(stg.problems().is_empty(), "{:?}", stg.problems());

    let prd = Settings::load_from(&vars(&PRODUCTION_SECRETS), dir).unwrap();
    assert_eq!(prd.user_service_port, 8211);
    assert_eq!(prd.login_max_attempts, 3);
    assert_eq!(prd.password_min_length, 14);
    assert!(!prd.registration_enabled());
    assert!(prd.problems().is_empty(), "{:?}", prd.problems());
    // ${PRODUCTION_DB_PASSWORD} was expanded into DATABASE_URL, the service's own
    // role (the owner `stocksblitz` only migrates, deploy/postgres/roles.sql).
    let shown: HashMap<_, _> = prd.effective().into_iter().collect();
    assert_eq!(
        shown["DATABASE_URL"],
        "postgresql://user_service_app:***@localhost:8203/stocksblitz_unified_production"
    );
}

#[test]
fn an_unset_variable_is_a_start_up_error_naming_it() {
    let dir = &env_files();
    let err = Settings::load_from(&vars(&[("APP_ENV", "production")]), dir).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("PRODUCTION_DB_PASSWORD"), "{msg}");
}

#[test]
fn production_refuses_debug_insecure_cookie_wildcard_cors_and_dev_keys() {
    let dir = tempdir();
    std::fs::write(
        dir.join(".env.production"),
        std::fs::read_to_string(format!("{REPO}/.env.dev"))
            .unwrap()
            .replace("APP_ENV=development", "APP_ENV=production")
            .replace(
                "CORS_ALLOWED_ORIGINS=http://localhost:3000",
                "CORS_ALLOWED_ORIGINS=*,http://localhost:3000",
            ),
    )
    .unwrap();
    let s = Settings::load_from(&vars(&[("APP_ENV", "production")]), &dir).unwrap();
    let problems = s.problems().join("\n");
    assert!(
        problems.contains("DEBUG=true is not allowed in production"),
        "{problems}"
    );
    assert!(
        problems.contains("SESSION_COOKIE_SECURE=false"),
        "{problems}"
    );
    assert!(problems.contains("CORS_ALLOWED_ORIGINS"), "{problems}");
    assert!(
        problems.contains("JWT_PRIVATE_KEY is the development key"),
        "{problems}"
    );
    assert!(
        problems.contains("CREDENTIALS_ENCRYPTION_KEYS"),
        "{problems}"
    );
    assert!(problems.contains("API_KEY_HASH_SECRET"), "{problems}");
    assert!(s.validate().is_err());
}

#[test]
fn production_refuses_plaintext_stores_off_loopback() {
    let dir = &env_files();
    let mut v = vars(&PRODUCTION_SECRETS);
    v.insert(
        "DATABASE_URL".into(),
        "postgresql://u:pw@db.internal:5432/prod?sslmode=require".into(),
    );
    v.insert(
        "REDIS_URL".into(),
        "redis://:pw@cache.internal:6379/0".into(),
    );
    let s = Settings::load_from(&v, dir).unwrap();
    let problems = s.problems().join("\n");
    assert!(
        problems.contains("DATABASE_URL points at db.internal without sslmode=verify-full"),
        "{problems}"
    );
    assert!(
        problems.contains("REDIS_URL points at cache.internal without TLS"),
        "{problems}"
    );
    assert!(
        !problems.contains("pw"),
        "no password in the messages: {problems}"
    );
    assert!(s.validate().is_err());

    v.insert(
        "DATABASE_URL".into(),
        "postgresql://u:pw@db.internal:5432/prod?sslmode=verify-full&sslrootcert=/etc/ca.pem"
            .into(),
    );
    v.insert(
        "REDIS_URL".into(),
        "rediss://:pw@cache.internal:6380/0".into(),
    );
    let s = Settings::load_from(&v, dir).unwrap();
    assert!(s.problems().is_empty(), "{:?}", s.problems());
}

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_user-service")
}

#[test]
fn check_config_masks_every_secret_and_exits_non_zero_on_a_problem() {
    let out = Command::new(binary())
        .arg("check-config")
        .current_dir(REPO)
        .env_clear()
        .env("APP_ENV", "development")
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("USER_SERVICE_PORT=8011"));
    assert!(stdout.contains("JWT_PRIVATE_KEY=***"));
    assert!(stdout.contains("API_KEY_HASH_SECRET=***"));
    assert!(stdout.contains("DATABASE_URL=postgresql://stocksblitz:***@localhost:8003/"));
    for secret in [
        "stocksblitz123",
        "MC4CAQAwBQYDK2VwBCIE",
        "dev-only-api-key",
        "ve4sOU9",
    ] {
        assert!(!stdout.contains(secret), "{secret} leaked:\n{stdout}");
    }

    // Production with the dev file's insecure values: one `error:` line per problem.
    let out = Command::new(binary())
        .arg("check-config")
        .current_dir(REPO)
        .env_clear()
        .env("ENV_FILE", ".env.dev")
        .env("APP_ENV", "production")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l == "error: DEBUG=true is not allowed in production"),
        "{stdout}"
    );
    assert!(
        stdout.lines().filter(|l| l.starts_with("error: ")).count() >= 4,
        "{stdout}"
    );
}

#[test]
fn serve_refuses_to_start_with_insecure_production_settings() {
    let out = Command::new(binary())
        .arg("serve")
        .current_dir(REPO)
        .env_clear()
        .env("ENV_FILE", ".env.dev")
        .env("APP_ENV", "production")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("error: DEBUG=true is not allowed in production"),
        "{stderr}"
    );
}

#[test]
fn debug_output_of_settings_hides_secrets() {
    let dir = &env_files();
    let s = Settings::load_from(&vars(&[("APP_ENV", "development")]), dir).unwrap();
    let dbg = format!("{s:?}");
    assert!(
        !dbg.contains("stocksblitz123") && !dbg.contains("dev-only-api-key"),
        "{dbg}"
    );
    assert!(!dbg.contains("MC4CAQAwBQYDK2VwBCIE"));
}

#[test]
fn a_session_idle_timeout_outside_two_minutes_to_the_refresh_ttl_is_refused() {
    let dir = &env_files();
    let s = Settings::load_from(
        &vars(&[
            ("APP_ENV", "development"),
            ("SESSION_IDLE_TIMEOUT_SECONDS", "30"),
        ]),
        dir,
    )
    .unwrap();
    assert_eq!(
        s.problems(),
        ["SESSION_IDLE_TIMEOUT_SECONDS must be at least 120"]
    );
    let s = Settings::load_from(
        &vars(&[
            ("APP_ENV", "development"),
            ("SESSION_IDLE_TIMEOUT_SECONDS", "99999999999"),
        ]),
        dir,
    )
    .unwrap();
    assert_eq!(
        s.problems(),
        ["SESSION_IDLE_TIMEOUT_SECONDS must not exceed REFRESH_TOKEN_TTL_SECONDS"]
    );
    let dev = Settings::load_from(&vars(&[("APP_ENV", "development")]), dir).unwrap();
    assert_eq!(dev.session_idle_timeout_seconds, 86400);
}
