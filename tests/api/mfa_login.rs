//! The two-step login (issue 14 points 2 and 4): `mfa_required`, the single-use
//! `mfa_token`, the lockout shared with passwords, and `amr`/`auth_time` in
//! tokens, VerifyToken and the session list.

use reqwest::Method;
use serde_json::json;
use user_service::proto::auth_service_client::AuthServiceClient;
use user_service::proto::VerifyTokenRequest;

use crate::helpers::{assert_problem, TestApp, STRONG_PASSWORD};
use crate::mfa_support::*;

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test]
async fn login_takes_two_steps_and_tokens_say_how() {
    let app = TestApp::spawn().await;
    let mut u = mfa_user(&app).await;

    let res = send(
        &app,
        Method::POST,
        "/v1/auth/login",
        None,
        Some(json!({"email": u.email, "password": STRONG_PASSWORD})),
    )
    .await;
    assert_eq!(res.status().as_u16(), 200);
    assert!(res.headers().get("set-cookie").is_none(), "no cookie yet");
    assert_eq!(res.headers()["cache-control"], "no-store");
    let first: serde_json::Value = res.json().await.unwrap();
    assert_eq!(first["mfa_required"], true);
    assert_eq!(first["methods"], json!(["totp", "recovery_code"]));
    assert_eq!(first["expires_in"], 300);
    assert!(first.get("access_token").is_none() && first.get("refresh_token").is_none());
    let mfa_token = first["mfa_token"].as_str().unwrap().to_string();
    assert!(mfa_token.len() >= 43);
    assert_eq!(audit_count(&app, "auth.login.mfa_required").await, 1);

    let code = u.next_code().await;
    let res = mfa_step(&app, &mfa_token, "totp", &code).await;
    assert_eq!(res.status().as_u16(), 200);
    let cookie = res.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.starts_with("sb_session=") && cookie.contains("HttpOnly"));
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["user"]["email"], u.email);
    let access = body["access_token"].as_str().unwrap().to_string();
    let c = claims(&access);
    assert_eq!(c["amr"], json!(["pwd", "otp", "mfa"]));
    let auth_time = c["auth_time"].as_i64().unwrap();
    assert!((now_secs() - auth_time).abs() <= 5, "{c}");

    // The token completed one login: used up, even with a fresh code.
    let code = u.next_code().await;
    assert_problem(
        mfa_step(&app, &mfa_token, "totp", &code).await,
        401,
        "invalid_credentials",
    )
    .await;

    // A password-only login (before enrolment) said so too.
    let pwd = claims(&u.enrol_token);
    assert_eq!(pwd["amr"], json!(["pwd"]));
    assert!(pwd["auth_time"].is_i64());

    // The session list shows both sessions' amr and auth_time.
    let sessions = json_of(
        send(
            &app,
            Method::GET,
            "/v1/users/me/sessions",
            Some(&access),
            None,
        )
        .await,
        200,
    )
    .await;
    let items = sessions["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let current = items.iter().find(|s| s["current"] == true).unwrap();
    assert_eq!(current["amr"], json!(["pwd", "otp", "mfa"]));
    let at = chrono::DateTime::parse_from_rfc3339(current["auth_time"].as_str().unwrap()).unwrap();
    assert_eq!(at.timestamp(), auth_time);
    let other = items.iter().find(|s| s["current"] == false).unwrap();
    assert_eq!(other["amr"], json!(["pwd"]));

    // VerifyToken carries them (fields 7 and 8).
    let svc = app.service_token(&["auth:verify"]).await;
    let mut grpc = AuthServiceClient::new(app.grpc_with_token(&svc).await);
    for _ in 0..2 {
        // The second answer comes from the verification caches.
        let v = grpc
            .verify_token(VerifyTokenRequest {
                token: access.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(v.valid);
        assert_eq!(v.amr, ["pwd", "otp", "mfa"]);
        assert_eq!(v.auth_time.unwrap().seconds, auth_time);
    }
    let v = grpc
        .verify_token(VerifyTokenRequest {
            token: u.enrol_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.amr, ["pwd"]);

    // A refresh keeps how the session was authenticated.
    let refreshed = json_of(
        send(
            &app,
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": body["refresh_token"]})),
        )
        .await,
        200,
    )
    .await;
    let rc = claims(refreshed["access_token"].as_str().unwrap());
    assert_eq!(rc["amr"], json!(["pwd", "otp", "mfa"]));
    assert_eq!(rc["auth_time"], auth_time);
}

fn lockout(max: &'static str) -> impl FnOnce(&mut std::collections::HashMap<String, String>) {
    move |v| {
        v.insert("LOGIN_MAX_ATTEMPTS".into(), max.into());
    }
}

#[tokio::test]
async fn wrong_second_factors_count_toward_the_password_lockout() {
    let app = TestApp::spawn_with(lockout("3")).await;
    let mut u = mfa_user(&app).await;
    // A wrong password, then the right one: no reset (the login is not complete).
    let (status, _) = password_step(&app, &u.email, "not-the-password-at-all").await;
    assert_eq!(status, 401);
    let (status, first) = password_step(&app, &u.email, STRONG_PASSWORD).await;
    assert_eq!(status, 200);
    let token = first["mfa_token"].as_str().unwrap().to_string();
    // Two wrong codes make three failures: locked.
    for bad in ["000000", "999999"] {
        assert_problem(
            mfa_step(&app, &token, "totp", bad).await,
            401,
            "invalid_credentials",
        )
        .await;
    }
    assert_eq!(audit_count(&app, "auth.lockout").await, 1);
    assert_eq!(audit_count(&app, "auth.mfa.failed").await, 2);
    // Now even the right code is refused, and so is the right password: a
    // locked account never reaches the second step.
    let last_step = || async {
        sqlx::query_scalar::<_, Option<i64>>("select last_used_step from user_totp")
            .fetch_one(&app.db)
            .await
            .unwrap()
    };
    let before = last_step().await;
    let code = u.next_code().await;
    assert_problem(
        mfa_step(&app, &token, "totp", &code).await,
        401,
        "invalid_credentials",
    )
    .await;
    // Refused without being checked: the code was not used up.
    assert_eq!(last_step().await, before);
    let (status, body) = password_step(&app, &u.email, STRONG_PASSWORD).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.get("mfa_token").is_none());
    assert_eq!(body["code"], "invalid_credentials");
}

#[tokio::test]
async fn a_flood_of_guesses_on_a_locked_mfa_token_writes_nothing() {
    let app = TestApp::spawn_with(lockout("3")).await;
    let mut u = mfa_user(&app).await;
    let (_, first) = password_step(&app, &u.email, STRONG_PASSWORD).await;
    let token = first["mfa_token"].as_str().unwrap().to_string();
    // Three wrong codes lock the account; thirty more are a flood.
    for _ in 0..33 {
        assert_problem(
            mfa_step(&app, &token, "totp", "000000").await,
            401,
            "invalid_credentials",
        )
        .await;
    }
    // Three counted failures and one row for the lock: the flood behind it
    // reached neither the lockout nor the audit log, but it shows in metrics.
    assert_eq!(audit_count(&app, "auth.mfa.failed").await, 4);
    assert_eq!(audit_count(&app, "auth.lockout").await, 1);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let refused: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("logins_total{result=\"mfa_token_refused\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(refused >= 1.0, "no mfa_token_refused in {metrics}");
    // While locked even the right code is refused; the token itself lives on
    // (§8: it dies after one success or 300 s) and works once the lock lapses.
    let code = u.next_code().await;
    assert_problem(
        mfa_step(&app, &token, "totp", &code).await,
        401,
        "invalid_credentials",
    )
    .await;
    sqlx::query("delete from login_failures")
        .execute(&app.db)
        .await
        .unwrap();
    // A lifted lock shows within a second (the refusal is remembered that long).
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    json_of(mfa_step(&app, &token, "totp", &code).await, 200).await;
    assert_eq!(audit_count(&app, "auth.mfa.failed").await, 4);
}

#[tokio::test]
async fn a_completed_login_resets_the_count() {
    let app = TestApp::spawn_with(lockout("3")).await;
    let mut u = mfa_user(&app).await;
    for _ in 0..2 {
        let (_, first) = password_step(&app, &u.email, STRONG_PASSWORD).await;
        let token = first["mfa_token"].as_str().unwrap().to_string();
        assert_problem(
            mfa_step(&app, &token, "totp", "123456").await,
            401,
            "invalid_credentials",
        )
        .await;
        assert_problem(
            mfa_step(&app, &token, "totp", "654321").await,
            401,
            "invalid_credentials",
        )
        .await;
        // Two failures, then a completed login: the count starts again.
        let code = u.next_code().await;
        json_of(mfa_step(&app, &token, "totp", &code).await, 200).await;
    }
    assert_eq!(audit_count(&app, "auth.lockout").await, 0);
}

#[tokio::test]
async fn dead_tokens_and_unknown_methods() {
    let app = TestApp::spawn().await;
    let mut u = mfa_user(&app).await;
    let (_, first) = password_step(&app, &u.email, STRONG_PASSWORD).await;
    let token = first["mfa_token"].as_str().unwrap().to_string();

    // A method the user does not hold, an unknown one, no code: 400 on the field.
    for (method, code, field) in [
        ("webauthn", Some("123456"), "method"),
        ("sms", Some("123456"), "method"),
        ("totp", None, "code"),
    ] {
        let mut body = json!({"mfa_token": token, "method": method});
        if let Some(c) = code {
            body["code"] = c.into();
        }
        let p = assert_problem(
            send(&app, Method::POST, "/v1/auth/mfa", None, Some(body)).await,
            400,
            "validation_failed",
        )
        .await;
        assert_eq!(p["errors"][0]["field"], field, "{p}");
    }
    // Unknown fields and made-up tokens.
    assert_problem(
        send(
            &app,
            Method::POST,
            "/v1/auth/mfa",
            None,
            Some(json!({"mfa_token": token, "method": "totp", "code": "1", "extra": 1})),
        )
        .await,
        400,
        "validation_failed",
    )
    .await;
    let code = u.next_code().await;
    assert_problem(
        mfa_step(&app, "made-up-token", "totp", &code).await,
        401,
        "invalid_credentials",
    )
    .await;
    // Past its 300 seconds: dead.
    sqlx::query("update mfa_challenges set expires_at = now() - interval '1 second'")
        .execute(&app.db)
        .await
        .unwrap();
    assert_problem(
        mfa_step(&app, &token, "totp", &code).await,
        401,
        "invalid_credentials",
    )
    .await;
    // The code was not spent on a dead token.
    let (_, again) = password_step(&app, &u.email, STRONG_PASSWORD).await;
    json_of(
        mfa_step(&app, again["mfa_token"].as_str().unwrap(), "totp", &code).await,
        200,
    )
    .await;
}

#[tokio::test]
async fn the_login_answer_is_documented_both_ways() {
    let app = TestApp::spawn().await;
    let doc = json_of(
        send(&app, Method::GET, "/openapi.json", None, None).await,
        200,
    )
    .await;
    let schemas = &doc["components"]["schemas"];
    let answer = &schemas["LoginAnswer"]["oneOf"];
    let refs = answer.to_string();
    assert!(
        refs.contains("#/components/schemas/TokenPair")
            && refs.contains("#/components/schemas/MfaRequiredBody"),
        "{answer}"
    );
    let mfa = &schemas["MfaRequiredBody"];
    for f in ["mfa_required", "mfa_token", "methods", "expires_in"] {
        assert!(mfa["properties"].get(f).is_some(), "MfaRequiredBody.{f}");
    }
    assert_eq!(
        doc["paths"]["/v1/auth/login"]["post"]["responses"]["200"]["content"]["application/json"]
            ["schema"]["$ref"],
        "#/components/schemas/LoginAnswer"
    );
}
