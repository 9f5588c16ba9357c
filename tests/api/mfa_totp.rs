//! TOTP enrolment, status, removal, recovery codes and key rotation (issue 14
//! point 1), through the real routes.

use reqwest::Method;
use serde_json::json;

use crate::helpers::{assert_problem, TestApp, STRONG_PASSWORD};
use crate::mfa_support::*;

#[tokio::test]
async fn enrolment_confirmation_and_status() {
    let app = TestApp::spawn().await;
    let email = email();
    app.register(&email, STRONG_PASSWORD).await;
    let token = app.login(&email, STRONG_PASSWORD).await;

    let status = json_of(
        send(&app, Method::GET, "/v1/users/me/mfa", Some(&token), None).await,
        200,
    )
    .await;
    assert_eq!(
        status,
        json!({"totp": false, "passkeys": 0, "recovery_codes_left": 0})
    );

    let res = send(
        &app,
        Method::POST,
        "/v1/users/me/mfa/totp",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(res.headers()["cache-control"], "no-store");
    let e = json_of(res, 201).await;
    let secret = e["secret"].as_str().unwrap();
    assert_eq!(secret.len(), 32, "160 bits in base32");
    let uri = e["otpauth_uri"].as_str().unwrap();
    let label = email.replace('@', "%40");
    assert!(
        uri.starts_with(&format!("otpauth://totp/StocksBlitz:{label}?")),
        "{uri}"
    );
    assert!(uri.contains(&format!("secret={secret}")) && uri.contains("issuer=StocksBlitz"));
    let svg = e["qr_svg"].as_str().unwrap();
    assert!(svg.contains("<svg") && svg.contains("</svg>"));

    // Pending: not yet a factor, and the secret is sealed at rest.
    let (kid, row): (String, String) =
        sqlx::query_as("select secret_key_id, row_to_json(t)::text from user_totp t")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(!row.contains(secret), "plaintext secret at rest");
    let active = app.settings.credentials_encryption_keys.as_ref().map(|k| {
        use secrecy::ExposeSecret;
        k.expose_secret().split(':').next().unwrap().to_string()
    });
    assert_eq!(Some(kid), active);
    let (status, body) = password_step(&app, &email, STRONG_PASSWORD).await;
    assert_eq!(status, 200);
    assert!(
        body["access_token"].is_string(),
        "pending TOTP asks nothing"
    );

    // A wrong code: 400 naming `code`.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 30;
    let wrong = code_at(secret, now + 5);
    let body = assert_problem(
        send(
            &app,
            Method::POST,
            "/v1/users/me/mfa/totp/confirm",
            Some(&token),
            Some(json!({"code": wrong})),
        )
        .await,
        400,
        "validation_failed",
    )
    .await;
    assert_eq!(body["errors"][0]["field"], "code");

    // The right one: ten distinct recovery codes, shown once.
    let res = send(
        &app,
        Method::POST,
        "/v1/users/me/mfa/totp/confirm",
        Some(&token),
        Some(json!({"code": code_at(secret, now)})),
    )
    .await;
    assert_eq!(res.headers()["cache-control"], "no-store");
    let codes = json_of(res, 200).await["recovery_codes"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(codes.len(), 10);
    let mut uniq: Vec<_> = codes.iter().map(|c| c.as_str().unwrap()).collect();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 10);
    let stored: Vec<String> =
        sqlx::query_scalar("select row_to_json(r)::text from user_recovery_codes r")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(stored.len(), 10);
    // A factor changed: the `mfa_enabled` security notice is in the outbox,
    // written with the change.
    let notices: Vec<String> = sqlx::query_scalar(
        "select template from notification_outbox where template like 'mfa_%' order by created_at",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(notices, ["mfa_enabled"]);
    for c in &uniq {
        let bare = c.replace('-', "");
        assert!(
            stored.iter().all(|r| !r.contains(c) && !r.contains(&bare)),
            "recovery code stored in clear"
        );
    }

    let status = json_of(
        send(&app, Method::GET, "/v1/users/me/mfa", Some(&token), None).await,
        200,
    )
    .await;
    assert_eq!(
        status,
        json!({"totp": true, "passkeys": 0, "recovery_codes_left": 10})
    );
    // Enrolling again while on, or confirming again: 409.
    assert_problem(
        send(
            &app,
            Method::POST,
            "/v1/users/me/mfa/totp",
            Some(&token),
            None,
        )
        .await,
        409,
        "conflict",
    )
    .await;
    assert_problem(
        send(
            &app,
            Method::POST,
            "/v1/users/me/mfa/totp/confirm",
            Some(&token),
            Some(json!({"code": code_at(secret, now + 1)})),
        )
        .await,
        409,
        "conflict",
    )
    .await;
    assert_eq!(audit_count(&app, "mfa.totp.enrolment_started").await, 1);
    assert_eq!(audit_count(&app, "mfa.totp.confirm_failed").await, 1);
    assert_eq!(audit_count(&app, "mfa.totp.enabled").await, 1);

    // Factors are not managed with an API key.
    let key = json_of(
        send(
            &app,
            Method::POST,
            "/v1/api-keys",
            Some(&token),
            Some(json!({"name": "k", "scopes": ["accounts:read"]})),
        )
        .await,
        403,
    )
    .await;
    assert_eq!(
        key["code"], "mfa_required",
        "the enrolling session has no second factor"
    );
}

#[tokio::test]
async fn a_code_is_accepted_once_and_within_one_step() {
    let app = TestApp::spawn().await;
    let mut u = mfa_user(&app).await;
    full_login(&app, &mut u).await;
    // The same code again: refused, although its step is still current.
    let (_, first) = password_step(&app, &u.email, STRONG_PASSWORD).await;
    let token = first["mfa_token"].as_str().unwrap();
    assert_problem(
        mfa_step(&app, token, "totp", &u.last_code()).await,
        401,
        "invalid_credentials",
    )
    .await;
    // Two steps off either way: refused.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 30;
    for step in [now - 3, now + 3] {
        assert_problem(
            mfa_step(&app, token, "totp", &code_at(&u.secret, step)).await,
            401,
            "invalid_credentials",
        )
        .await;
    }
    // The token survived the wrong codes: a good code still finishes.
    let code = u.next_code().await;
    json_of(mfa_step(&app, token, "totp", &code).await, 200).await;
    assert_eq!(audit_count(&app, "auth.mfa.failed").await, 3);
}

#[tokio::test]
async fn recovery_codes_log_in_once_each_and_can_be_replaced() {
    let app = TestApp::spawn().await;
    let u = mfa_user(&app).await;
    let rc = u.recovery_codes[0].clone();
    let (_, first) = password_step(&app, &u.email, STRONG_PASSWORD).await;
    assert_eq!(first["methods"], json!(["totp", "recovery_code"]));
    // Typed in capitals without dashes: still the code.
    let typed = rc.replace('-', "").to_uppercase();
    let body = json_of(
        mfa_step(
            &app,
            first["mfa_token"].as_str().unwrap(),
            "recovery_code",
            &typed,
        )
        .await,
        200,
    )
    .await;
    let c = claims(body["access_token"].as_str().unwrap());
    assert_eq!(c["amr"], json!(["pwd", "rc", "mfa"]));
    let token = body["access_token"].as_str().unwrap().to_string();
    // Spent.
    let (_, again) = password_step(&app, &u.email, STRONG_PASSWORD).await;
    assert_problem(
        mfa_step(
            &app,
            again["mfa_token"].as_str().unwrap(),
            "recovery_code",
            &rc,
        )
        .await,
        401,
        "invalid_credentials",
    )
    .await;
    let status = json_of(
        send(&app, Method::GET, "/v1/users/me/mfa", Some(&token), None).await,
        200,
    )
    .await;
    assert_eq!(status["recovery_codes_left"], 9);
    assert_eq!(audit_count(&app, "mfa.recovery_code.used").await, 1);

    // A new set (this session just used a second factor): the old set dies.
    let fresh = json_of(
        send(
            &app,
            Method::POST,
            "/v1/users/me/mfa/recovery-codes",
            Some(&token),
            None,
        )
        .await,
        200,
    )
    .await;
    let new_codes = fresh["recovery_codes"].as_array().unwrap();
    assert_eq!(new_codes.len(), 10);
    let (_, third) = password_step(&app, &u.email, STRONG_PASSWORD).await;
    let mfa_token = third["mfa_token"].as_str().unwrap();
    assert_problem(
        mfa_step(&app, mfa_token, "recovery_code", &u.recovery_codes[1]).await,
        401,
        "invalid_credentials",
    )
    .await;
    json_of(
        mfa_step(
            &app,
            mfa_token,
            "recovery_code",
            new_codes[0].as_str().unwrap(),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(audit_count(&app, "mfa.recovery_codes.regenerated").await, 1);
}

#[tokio::test]
async fn removing_totp_needs_step_up_and_ends_the_second_step() {
    let app = TestApp::spawn().await;
    let mut u = mfa_user(&app).await;
    // The enrolling session authenticated with a password only.
    assert_problem(
        send(
            &app,
            Method::DELETE,
            "/v1/users/me/mfa/totp",
            Some(&u.enrol_token),
            None,
        )
        .await,
        403,
        "mfa_required",
    )
    .await;
    let code = u.next_code().await;
    let stepped = json_of(
        send(
            &app,
            Method::POST,
            "/v1/auth/step-up",
            Some(&u.enrol_token),
            Some(json!({"method": "totp", "code": code})),
        )
        .await,
        200,
    )
    .await;
    let token = stepped["access_token"].as_str().unwrap();
    let res = send(
        &app,
        Method::DELETE,
        "/v1/users/me/mfa/totp",
        Some(token),
        None,
    )
    .await;
    assert_eq!(res.status().as_u16(), 204);
    assert_eq!(
        json_of(
            send(&app, Method::GET, "/v1/users/me/mfa", Some(token), None).await,
            200
        )
        .await,
        json!({"totp": false, "passkeys": 0, "recovery_codes_left": 0})
    );
    // One step again, and nothing left to remove.
    let (status, body) = password_step(&app, &u.email, STRONG_PASSWORD).await;
    assert_eq!(status, 200);
    assert!(body["access_token"].is_string());
    assert_problem(
        send(
            &app,
            Method::DELETE,
            "/v1/users/me/mfa/totp",
            Some(token),
            None,
        )
        .await,
        404,
        "not_found",
    )
    .await;
    assert_eq!(audit_count(&app, "mfa.totp.removed").await, 1);
}

#[tokio::test]
async fn reencryption_moves_totp_secrets_to_the_new_key() {
    const NEW_KEY: &str = "new:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    let app = TestApp::spawn().await;
    let mut u = mfa_user(&app).await;
    let mut vars = crate::helpers::test_vars(&app.database_url);
    let old = vars["CREDENTIALS_ENCRYPTION_KEYS"].clone();
    vars.insert(
        "CREDENTIALS_ENCRYPTION_KEYS".into(),
        format!("{NEW_KEY},{old}"),
    );
    let rotated = TestApp::spawn_vars(vars.clone()).await;
    let summary = rotated.services.mfa.reencrypt_totp_secrets().await.unwrap();
    assert_eq!((summary.candidates, summary.reencrypted), (1, 1));
    assert!(summary.failed.is_empty());
    let again = rotated.services.mfa.reencrypt_totp_secrets().await.unwrap();
    assert_eq!(again.candidates, 0);
    let kid: String = sqlx::query_scalar("select secret_key_id from user_totp")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(kid, "new");
    assert_eq!(audit_count(&app, "mfa.totp.reencrypted").await, 1);
    // A replica with only the new key still checks the user's codes.
    vars.insert("CREDENTIALS_ENCRYPTION_KEYS".into(), NEW_KEY.into());
    vars.insert(
        "REDIS_KEY_PREFIX".into(),
        format!("test:{}:", uuid::Uuid::new_v4().simple()),
    );
    let only_new = TestApp::spawn_vars(vars).await;
    full_login(&only_new, &mut u).await;
}
