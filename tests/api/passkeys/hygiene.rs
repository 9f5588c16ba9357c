//! Passkey settings per environment, and what ceremonies leave in the log and
//! the audit trail.

use std::collections::HashMap;

use serde_json::json;
use uuid::Uuid;

use super::client::*;
use crate::helpers::TestApp;

#[test]
fn relying_party_settings_follow_the_environment() {
    use user_service::config::Settings;
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |f: &str| {
        let text = std::fs::read_to_string(repo.join(f)).unwrap();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_default()
                .to_string()
        };
        (get("WEBAUTHN_RP_ID"), get("WEBAUTHN_ORIGINS"))
    };
    assert_eq!(
        read(".env.dev"),
        (
            "localhost".into(),
            "http://localhost:3000,http://localhost:3001,http://localhost:5173".into()
        )
    );
    assert_eq!(
        read(".env.production"),
        (
            "stocksblitz.com".into(),
            "https://app.stocksblitz.com".into()
        )
    );
    assert_eq!(
        read(".env.staging"),
        (
            "staging.stocksblitz.com".into(),
            "https://app.staging.stocksblitz.com".into()
        )
    );

    // An origin outside the rp id, or plain http outside development, is a
    // start-up problem with its own line.
    let mut vars = crate::helpers::test_vars("postgres://u@localhost/db");
    vars.insert("WEBAUTHN_RP_ID".into(), "stocksblitz.com".into());
    vars.insert(
        "WEBAUTHN_ORIGINS".into(),
        "https://app.stocksblitz.com,https://evil.example".into(),
    );
    let s = Settings::from_vars(vars.clone()).unwrap();
    let problems = s.problems();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("https://evil.example") && p.contains("not under WEBAUTHN_RP_ID")),
        "{problems:?}"
    );
    // Unset, the origins are the CORS origins.
    vars.remove("WEBAUTHN_ORIGINS");
    vars.insert("WEBAUTHN_RP_ID".into(), "localhost".into());
    let s = Settings::from_vars(vars.clone()).unwrap();
    assert_eq!(s.webauthn_origins(), s.cors_origins());
    // Without CORS origins either (the compose file sets neither), the relying
    // party's own https origin, and the service still starts.
    vars.insert("CORS_ALLOWED_ORIGINS".into(), String::new());
    let bare = Settings::from_vars(vars).unwrap();
    assert_eq!(
        bare.webauthn_origins(),
        vec!["https://localhost".to_string()]
    );
    assert!(bare.problems().is_empty(), "{:?}", bare.problems());
    let shown: HashMap<_, _> = s.effective().into_iter().collect();
    assert_eq!(shown["WEBAUTHN_RP_ID"], "localhost");
}

/// Nothing of a ceremony reaches the service's log, even at debug level: not the
/// challenge, the attestation, the client data, the signature, nor the tokens a
/// passwordless login hands out; and no audit row holds them either.
#[tokio::test]
async fn ceremonies_leave_no_secret_in_the_log_or_the_audit_trail() {
    let port = crate::helpers::free_port();
    let database_url = crate::helpers::fresh_database().await;
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_user-service"))
        .arg("serve")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("ENV_FILE", ".env.dev")
        .envs(crate::helpers::test_keys().iter().cloned())
        .env("APP_ENV", "development")
        .env("DATABASE_URL", &database_url)
        .env("REDIS_URL", crate::helpers::redis_url())
        .env(
            "REDIS_KEY_PREFIX",
            format!("test:{}:", Uuid::new_v4().simple()),
        )
        .env("USER_SERVICE_HOST", "127.0.0.1")
        .env("USER_SERVICE_PORT", port.to_string())
        .env("LOG_LEVEL", "debug")
        .env("LOG_FORMAT", "json")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    assert!(
        crate::helpers::wait_for_port(port).await,
        "the service starts"
    );
    let app = TestApp::spawn_vars({
        // A second, in-process replica only for the harness's helpers; the
        // requests below all go to the child.
        crate::helpers::test_vars(&database_url)
    })
    .await;
    let child_app = TestApp {
        addr: format!("http://127.0.0.1:{port}"),
        port,
        database_url: database_url.clone(),
        db: app.db.clone(),
        services: app.services.clone(),
        settings: app.settings.clone(),
        shutdown: app.shutdown.clone(),
        http: reqwest::Client::new(),
        server: None,
    };
    let (_, _, token) = child_app.user_with_token().await;
    let mut device = soft_passkey();
    let start = json_of(
        post(
            &child_app,
            "/v1/users/me/passkeys/register/start",
            Some(&token),
            &json!({}),
        )
        .await,
        200,
    )
    .await;
    let credential = device.create(ORIGIN, &start["options"]);
    let res = post(
        &child_app,
        "/v1/users/me/passkeys/register/finish",
        Some(&token),
        &json!({"challenge_id": start["challenge_id"], "credential": credential}),
    )
    .await;
    json_of(res, 201).await;
    let (challenge_id, options) = login_start(&child_app).await;
    let assertion = device.get(ORIGIN, &options);
    let login = json_of(
        login_finish(&child_app, &challenge_id, &assertion).await,
        200,
    )
    .await;
    // A refused one (replayed) logs its refusal, not its content.
    assert_eq!(
        login_finish(&child_app, &challenge_id, &assertion)
            .await
            .status()
            .as_u16(),
        401
    );
    let wrong = device.get("http://localhost:9999", &login_start(&child_app).await.1);
    let _ = login_finish(&child_app, &login_start(&child_app).await.0, &wrong).await;

    let mut child = child;
    let _ = child.start_kill();
    let out = child.wait_with_output().await.unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(log.contains("passkey"), "debug logging ran: {log}");
    let audit: String = sqlx::query_scalar(
        "select coalesce(string_agg(concat_ws(' ', actor_id, action, target_id, details::text), '\n'), '') from audit_logs",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    let secrets = [
        (
            "registration challenge",
            start["options"]["challenge"].as_str().unwrap(),
        ),
        ("login challenge", options["challenge"].as_str().unwrap()),
        (
            "attestation",
            credential["response"]["attestationObject"]
                .as_str()
                .unwrap(),
        ),
        (
            "client data",
            assertion["response"]["clientDataJSON"].as_str().unwrap(),
        ),
        (
            "signature",
            assertion["response"]["signature"].as_str().unwrap(),
        ),
        (
            "authenticator data",
            assertion["response"]["authenticatorData"].as_str().unwrap(),
        ),
        ("access token", login["access_token"].as_str().unwrap()),
        ("refresh token", login["refresh_token"].as_str().unwrap()),
    ];
    for (what, value) in secrets {
        assert!(!log.contains(value), "the {what} is in the log");
        assert!(!audit.contains(value), "the {what} is in the audit trail");
    }
}
