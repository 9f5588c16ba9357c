//! Env-file selection, ${VAR} expansion, validation and check-config masking.

use std::collections::HashMap;
use std::process::Command;

use user_service::config::{choose_env_file, parse_env_file, Environment, Settings};
use user_service::crypto::key_material;

pub(crate) fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
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

pub(crate) const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The repository's three env files copied into a fresh folder, so a developer's
/// own `.env` in the checkout cannot change what these tests see.
pub(crate) fn env_files() -> std::path::PathBuf {
    let dir = tempdir();
    for f in [".env.dev", ".env.staging", ".env.production"] {
        std::fs::copy(format!("{REPO}/{f}"), dir.join(f)).unwrap();
    }
    dir
}

/// Fresh key material under `prefix` (STAGING_, PRODUCTION_ or none), as an
/// operator would generate it: never a committed key.
pub(crate) fn fresh_keys(prefix: &str) -> Vec<(String, String)> {
    key_material::GENERATED_IN_DEVELOPMENT
        .into_iter()
        .map(|k| (format!("{prefix}{k}"), key_material::generate(k).unwrap()))
        .collect()
}

/// What .env.production leaves to the environment, filled with test values.
fn production_secrets() -> HashMap<String, String> {
    let mut v = vars(&[
        ("APP_ENV", "production"),
        ("PRODUCTION_DB_PASSWORD", "pw-from-vault"),
        ("SENTRY_DSN", ""),
        ("PRODUCTION_JWT_PREVIOUS_PUBLIC_KEYS", ""),
    ]);
    v.extend(fresh_keys("PRODUCTION_"));
    v
}

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

    let mut staging_secrets = vars(&[("APP_ENV", "staging")]);
    staging_secrets.extend(fresh_keys("STAGING_"));
    let stg = Settings::load_from(&staging_secrets, dir).unwrap();
    assert_eq!(stg.user_service_port, 8111);
    assert_eq!(stg.user_service_host, "127.0.0.1");
    assert_eq!(stg.login_max_attempts, 5);
    assert!(stg.problems().is_empty(), "{:?}", stg.problems());

    let prd = Settings::load_from(&production_secrets(), dir).unwrap();
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
    for key in [
        "JWT_PRIVATE_KEY",
        "CREDENTIALS_ENCRYPTION_KEYS",
        "API_KEY_HASH_SECRET",
    ] {
        assert!(
            problems.contains(&format!("{key} is required in production")),
            "{problems}"
        );
    }
    assert!(s.validate().is_err());
}

#[test]
fn production_refuses_plaintext_stores_off_loopback() {
    let dir = &env_files();
    let mut v = production_secrets();
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

pub(crate) fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_user-service")
}

#[test]
fn check_config_masks_every_secret_and_exits_non_zero_on_a_problem() {
    let dir = env_files();
    let out = Command::new(binary())
        .arg("check-config")
        .current_dir(&dir)
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
    assert!(!stdout.contains("stocksblitz123"), "{stdout}");
    for (name, value) in dev_secrets(&dir) {
        for part in value.split([':', '\n']).filter(|p| p.len() > 8) {
            assert!(!stdout.contains(part), "{name} leaked:\n{stdout}");
        }
    }

    // Production with the dev file's insecure values: one `error:` line per problem.
    let out = Command::new(binary())
        .arg("check-config")
        .current_dir(&dir)
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
    assert!(!dbg.contains("stocksblitz123"), "{dbg}");
    for (name, value) in dev_secrets(dir) {
        for part in value.split([':', '\n']).filter(|p| p.len() > 8) {
            assert!(!dbg.contains(part), "{name} leaked: {dbg}");
        }
    }
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

// ---- one pass, placeholders, generated development keys, development key checks ----

/// The values in a directory's generated `.secrets/dev.env`.
pub(crate) fn dev_secrets(dir: &std::path::Path) -> Vec<(String, String)> {
    let content = std::fs::read_to_string(dir.join(".secrets/dev.env")).unwrap();
    parse_env_file(&content, "dev.env", &HashMap::new()).unwrap()
}

fn error_lines(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect()
}

#[test]
fn check_config_reports_every_problem_in_one_pass() {
    // The project's own .env.staging, no key material exported, and three unsafe
    // overrides: every one of them is reported, not just the first unset variable.
    let dir = env_files();
    let out = Command::new(binary())
        .arg("check-config")
        .current_dir(&dir)
        .env_clear()
        .env("APP_ENV", "staging")
        .env("DEBUG", "true")
        .env("SESSION_COOKIE_SECURE", "false")
        .env("CORS_ALLOWED_ORIGINS", "*")
        .env("USER_SERVICE_PORT", "not-a-port")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let errors = error_lines(&stdout);
    for expected in [
        "variable ${STAGING_JWT_PRIVATE_KEY} is not set",
        "variable ${STAGING_CREDENTIALS_ENCRYPTION_KEYS} is not set",
        "variable ${STAGING_API_KEY_HASH_SECRET} is not set",
        "DEBUG=true is not allowed in staging",
        "SESSION_COOKIE_SECURE=false is not allowed in staging",
        "CORS_ALLOWED_ORIGINS must not contain '*' in staging",
        "JWT_PRIVATE_KEY is required in staging",
        "CREDENTIALS_ENCRYPTION_KEYS is required in staging",
        "API_KEY_HASH_SECRET is required in staging",
        "USER_SERVICE_PORT: invalid digit found in string",
    ] {
        assert_eq!(
            errors.iter().filter(|l| l.ends_with(expected)).count(),
            1,
            "one line for {expected:?}:\n{stdout}"
        );
    }
    assert_eq!(errors.len(), 10, "{stdout}");
    // The effective settings are still shown, the bad port left at its default.
    assert!(stdout.contains("APP_ENV=staging\n"), "{stdout}");
    assert!(stdout.contains("USER_SERVICE_PORT=8011\n"), "{stdout}");
    assert!(!stdout.contains("not-a-port"), "{stdout}");

    // `serve` refuses with the same list.
    let out = Command::new(binary())
        .arg("serve")
        .current_dir(&dir)
        .env_clear()
        .env("APP_ENV", "staging")
        .env("DEBUG", "true")
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: DEBUG=true is not allowed in staging")
            && stderr.contains("variable ${STAGING_API_KEY_HASH_SECRET} is not set"),
        "{stderr}"
    );
}

/// Runs `command` with an example secrets file of deploy/systemd sourced the way
/// systemd's EnvironmentFile= or run-local reads it.
fn run_with_example(env: &str, command: &str) -> (Option<i32>, String) {
    let dir = env_files();
    let example = format!("{REPO}/deploy/systemd/{env}.env.example");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -a; . '{example}'; set +a; exec '{}' {command}",
            binary()
        ))
        .current_dir(&dir)
        .env_clear()
        .env("APP_ENV", env)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[test]
fn the_unfilled_example_secrets_are_refused_by_check_config_and_serve() {
    for env in ["staging", "production"] {
        let prefix = env.to_ascii_uppercase();
        for command in ["check-config", "serve"] {
            let (code, text) = run_with_example(env, command);
            assert_eq!(code, Some(1), "{env} {command}: {text}");
            for key in [
                "JWT_PRIVATE_KEY",
                "CREDENTIALS_ENCRYPTION_KEYS",
                "API_KEY_HASH_SECRET",
            ] {
                assert!(
                    text.contains(&format!(
                        "error: {key} still holds the example placeholder REPLACE_ME"
                    )),
                    "{env} {command} {key}: {text}"
                );
            }
            if env == "production" {
                assert!(
                    text.contains("error: DATABASE_URL still holds the example placeholder"),
                    "{text}"
                );
            }
            assert!(!text.contains(&format!("{prefix}_JWT")), "{text}");
        }
    }
}

#[test]
fn development_generates_its_keys_once_per_directory_and_reuses_them() {
    use std::os::unix::fs::PermissionsExt;
    let dir = env_files();
    let dev = vars(&[("APP_ENV", "development")]);
    assert!(!dir.join(".secrets").exists());

    // Replicas starting at the same moment from one directory end up with one set.
    let loaded: Vec<Settings> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| Settings::load_from(&dev, &dir).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let file = dir.join(".secrets/dev.env");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&dir.join(".secrets")), 0o700);
    let written = std::fs::read_to_string(&file).unwrap();
    let secrets = dev_secrets(&dir);
    let names: Vec<&str> = secrets.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "JWT_PRIVATE_KEY",
            "CREDENTIALS_ENCRYPTION_KEYS",
            "API_KEY_HASH_SECRET"
        ]
    );
    use secrecy::ExposeSecret;
    let kid = |s: &Settings| {
        user_service::crypto::jwt::JwtKeys::from_settings(s)
            .unwrap()
            .kid()
            .to_string()
    };
    let first = kid(&loaded[0]);
    for s in &loaded {
        assert_eq!(kid(s), first);
        assert_eq!(
            s.api_key_hash_secret.as_ref().unwrap().expose_secret(),
            loaded[0]
                .api_key_hash_secret
                .as_ref()
                .unwrap()
                .expose_secret()
        );
        assert!(s.problems().is_empty(), "{:?}", s.problems());
    }

    // The real binary, started again in that directory, reuses the file as it is.
    let out = Command::new(binary())
        .arg("check-config")
        .current_dir(&dir)
        .env_clear()
        .env("APP_ENV", "development")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), written);
    assert_eq!(kid(&Settings::load_from(&dev, &dir).unwrap()), first);

    // A fresh directory gets keys of its own; a value set in the environment wins
    // and is not written to the file.
    let other = env_files();
    let mut with_secret = dev.clone();
    with_secret.insert("API_KEY_HASH_SECRET".into(), "x".repeat(40));
    let s = Settings::load_from(&with_secret, &other).unwrap();
    assert_ne!(kid(&s), first);
    assert_eq!(
        s.api_key_hash_secret.unwrap().expose_secret(),
        &"x".repeat(40)
    );
    assert!(!dev_secrets(&other)
        .iter()
        .any(|(k, _)| k == "API_KEY_HASH_SECRET"));
}
