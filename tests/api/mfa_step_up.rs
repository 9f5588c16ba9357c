//! Step-up and the enrolment policy (issue 14 points 5 and 6): the operations of
//! DESIGN §8 need a recent second factor from users who have one (403
//! `mfa_required`, then POST /v1/auth/step-up), MFA_REQUIRED_ROLES and
//! MFA_REQUIRED_FOR_MANAGERS make enrolment compulsory, and an admin can remove
//! a user's factors.

use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{assert_problem, TestApp, STRONG_PASSWORD};
use crate::mfa_support::*;

async fn new_account(app: &TestApp, token: &str) -> Uuid {
    let body = json_of(
        send(
            app,
            Method::POST,
            "/v1/trading-accounts",
            Some(token),
            Some(json!({"broker": "zerodha", "broker_user_id": Uuid::new_v4().simple().to_string(), "nickname": "main"})),
        )
        .await,
        201,
    )
    .await;
    body["id"].as_str().unwrap().parse().unwrap()
}

/// Every step-up operation of §8 this branch owns, as (method, path, body).
fn operations(
    account: Uuid,
    other: Uuid,
    key: Option<&str>,
) -> Vec<(Method, String, Option<Value>)> {
    let mut ops = vec![
        (
            Method::PUT,
            format!("/v1/trading-accounts/{account}/credentials"),
            Some(json!({"api_key": "broker-key-0001", "api_secret": "broker-secret"})),
        ),
        (
            Method::POST,
            "/v1/api-keys".to_string(),
            Some(json!({"name": "bot", "scopes": ["accounts:read"]})),
        ),
        (
            Method::POST,
            format!("/v1/trading-accounts/{account}/members"),
            Some(json!({"user_id": other, "role": "viewer"})),
        ),
        (
            Method::POST,
            "/v1/users/me/password".to_string(),
            Some(
                json!({"current_password": STRONG_PASSWORD, "new_password": "amber-lantern-quiet-42-fjord"}),
            ),
        ),
        (
            Method::POST,
            "/v1/users/me/mfa/recovery-codes".to_string(),
            None,
        ),
    ];
    if let Some(k) = key {
        ops.push((Method::POST, format!("/v1/api-keys/{k}/rotate"), None));
    }
    ops
}

#[tokio::test]
async fn step_up_operations_need_a_recent_second_factor() {
    let app = TestApp::spawn_with(|v| {
        v.insert("MFA_STEP_UP_SECONDS".into(), "5".into());
    })
    .await;
    let mut u = mfa_user(&app).await;
    let (other, _, _) = app.user_with_token().await;
    // Not a step-up operation: creating an account.
    let account = new_account(&app, &u.enrol_token).await;

    // The enrolling session used a password only.
    for (method, path, body) in operations(account, other, None) {
        assert_problem(
            send(&app, method, &path, Some(&u.enrol_token), body).await,
            403,
            "mfa_required",
        )
        .await;
    }
    assert_eq!(audit_count(&app, "auth.step_up.required").await, 5);

    // A wrong code: 401, counted and audited.
    assert_problem(
        send(
            &app,
            Method::POST,
            "/v1/auth/step-up",
            Some(&u.enrol_token),
            Some(json!({"method": "totp", "code": "000000"})),
        )
        .await,
        401,
        "invalid_credentials",
    )
    .await;
    assert_eq!(audit_count(&app, "auth.step_up.failed").await, 1);
    let failures: i32 = sqlx::query_scalar(
        "select failures from login_failures where user_id = $1 and client_ip = ''",
    )
    .bind(u.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(failures, 1);

    let code = u.next_code().await;
    let res = send(
        &app,
        Method::POST,
        "/v1/auth/step-up",
        Some(&u.enrol_token),
        Some(json!({"method": "totp", "code": code})),
    )
    .await;
    assert!(res.headers().get("set-cookie").is_some());
    let stepped = json_of(res, 200).await;
    let token = stepped["access_token"].as_str().unwrap().to_string();
    let c = claims(&token);
    assert_eq!(c["amr"], json!(["pwd", "otp", "mfa"]));
    assert!((chrono::Utc::now().timestamp() - c["auth_time"].as_i64().unwrap()).abs() <= 5);
    assert_eq!(c["sid"], claims(&u.enrol_token)["sid"], "the same session");
    assert_eq!(audit_count(&app, "auth.step_up.succeeded").await, 1);

    // Within the window every operation goes through.
    let key = json_of(
        send(
            &app,
            Method::POST,
            "/v1/api-keys",
            Some(&token),
            Some(json!({"name": "first", "scopes": ["accounts:read"]})),
        )
        .await,
        201,
    )
    .await;
    let key_id = key["id"].as_str().unwrap().to_string();
    for (method, path, body) in operations(account, other, Some(&key_id)) {
        let res = send(&app, method.clone(), &path, Some(&token), body).await;
        assert!(
            res.status().is_success(),
            "{method} {path}: {}",
            res.text().await.unwrap()
        );
    }
    // An API key of this user never counts as a second factor.
    let key = json_of(
        send(
            &app,
            Method::POST,
            "/v1/api-keys",
            Some(&token),
            Some(json!({"name": "writer", "scopes": ["accounts:read", "accounts:write"]})),
        )
        .await,
        201,
    )
    .await;
    let res = reqwest::Client::new()
        .put(app.url(&format!("/v1/trading-accounts/{account}/credentials")))
        .header("x-api-key", key["key"].as_str().unwrap())
        .json(&json!({"api_key": "broker-key-0002", "api_secret": "broker-secret"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 403, "mfa_required").await;

    // Past MFA_STEP_UP_SECONDS: a new step-up is needed.
    tokio::time::sleep(std::time::Duration::from_millis(6200)).await;
    assert_problem(
        send(
            &app,
            Method::POST,
            "/v1/api-keys",
            Some(&token),
            Some(json!({"name": "late", "scopes": ["accounts:read"]})),
        )
        .await,
        403,
        "mfa_required",
    )
    .await;
}

#[tokio::test]
async fn users_without_a_factor_are_not_asked() {
    let app = TestApp::spawn().await;
    let (other, _, _) = app.user_with_token().await;
    let (_, _, token) = app.user_with_token().await;
    let account = new_account(&app, &token).await;
    for (method, path, body) in operations(account, other, None).into_iter().take(4) {
        let res = send(&app, method.clone(), &path, Some(&token), body).await;
        assert!(res.status().is_success(), "{method} {path}");
    }
    assert_eq!(audit_count(&app, "auth.step_up.required").await, 0);
}

#[tokio::test]
async fn the_policy_makes_admins_and_managers_enrol() {
    let app = TestApp::spawn_with(|v| {
        v.insert("MFA_REQUIRED_ROLES".into(), "admin".into());
        v.insert("MFA_REQUIRED_FOR_MANAGERS".into(), "true".into());
    })
    .await;
    let new_key = |token: String| {
        let app = &app;
        async move {
            send(
                app,
                Method::POST,
                "/v1/api-keys",
                Some(&token),
                Some(json!({"name": "k", "scopes": ["accounts:read"]})),
            )
            .await
        }
    };
    // A plain user: nothing required.
    let (_, _, plain) = app.user_with_token().await;
    assert_eq!(new_key(plain.clone()).await.status().as_u16(), 201);

    // An admin must enrol first…
    let (admin_id, admin_email, admin) = app.user_with_token().await;
    app.make_admin(admin_id).await;
    assert_problem(new_key(admin.clone()).await, 403, "mfa_enrollment_required").await;
    // …enrolling is allowed, then the usual step-up applies.
    let enrol = json_of(
        send(
            &app,
            Method::POST,
            "/v1/users/me/mfa/totp",
            Some(&admin),
            None,
        )
        .await,
        201,
    )
    .await;
    let secret = enrol["secret"].as_str().unwrap();
    let step = chrono::Utc::now().timestamp() as u64 / 30;
    json_of(
        send(
            &app,
            Method::POST,
            "/v1/users/me/mfa/totp/confirm",
            Some(&admin),
            Some(json!({"code": code_at(secret, step - 1)})),
        )
        .await,
        200,
    )
    .await;
    assert_problem(new_key(admin.clone()).await, 403, "mfa_required").await;
    let stepped = json_of(
        send(
            &app,
            Method::POST,
            "/v1/auth/step-up",
            Some(&admin),
            Some(json!({"method": "totp", "code": code_at(secret, step + 1)})),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(
        new_key(stepped["access_token"].as_str().unwrap().into())
            .await
            .status()
            .as_u16(),
        201
    );
    // Its login now takes two steps.
    let (_, first) = password_step(&app, &admin_email, STRONG_PASSWORD).await;
    assert_eq!(first["mfa_required"], true);

    // A manager of someone's trading account must enrol too.
    let (_, _, owner) = app.user_with_token().await;
    let account = new_account(&app, &owner).await;
    let (manager_id, _, manager) = app.user_with_token().await;
    sqlx::query(
        "insert into trading_account_memberships (id, trading_account_id, user_id, role)
         values ($1, $2, $3, 'manager')",
    )
    .bind(Uuid::now_v7())
    .bind(account)
    .bind(manager_id)
    .execute(&app.db)
    .await
    .unwrap();
    assert_problem(new_key(manager).await, 403, "mfa_enrollment_required").await;
    assert_eq!(audit_count(&app, "auth.step_up.required").await, 3);
}

#[tokio::test]
async fn an_admin_removes_a_users_factors() {
    let app = TestApp::spawn().await;
    let u = mfa_user(&app).await;
    let (admin_id, _, admin) = app.user_with_token().await;
    let path = format!("/v1/admin/users/{}/mfa", u.id);
    // Not an admin (the user themself included): 403.
    for t in [&admin, &u.enrol_token] {
        assert_problem(
            send(&app, Method::DELETE, &path, Some(t), None).await,
            403,
            "forbidden",
        )
        .await;
    }
    app.make_admin(admin_id).await;
    assert_problem(
        send(
            &app,
            Method::DELETE,
            &format!("/v1/admin/users/{}/mfa", Uuid::new_v4()),
            Some(&admin),
            None,
        )
        .await,
        404,
        "not_found",
    )
    .await;
    let res = send(&app, Method::DELETE, &path, Some(&admin), None).await;
    assert_eq!(res.status().as_u16(), 204);
    let (action, actor, details): (String, String, Value) = sqlx::query_as(
        "select action, actor_id, details from audit_logs where action = 'admin.user.mfa.removed'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(action, "admin.user.mfa.removed");
    assert_eq!(actor, admin_id.to_string());
    assert_eq!(
        details,
        json!({"totp": true, "recovery_codes": 10, "passkeys": 0})
    );
    // One step again; the recovery codes went too.
    let (status, body) = password_step(&app, &u.email, STRONG_PASSWORD).await;
    assert_eq!(status, 200);
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(
        json_of(
            send(&app, Method::GET, "/v1/users/me/mfa", Some(token), None).await,
            200
        )
        .await,
        json!({"totp": false, "passkeys": 0, "recovery_codes_left": 0})
    );
}

#[test]
fn policy_settings_default_per_environment() {
    use user_service::config::Settings;
    let mut vars = crate::helpers::test_vars("postgres://x@127.0.0.1:1/x");
    let dev = Settings::from_vars(vars.clone()).unwrap();
    assert!(dev.mfa_required_roles().is_empty());
    assert!(!dev.mfa_required_for_managers());
    assert_eq!(dev.mfa_step_up_seconds, 600);
    // Unset in production: admins and managers must enrol.
    vars.insert("APP_ENV".into(), "production".into());
    vars.remove("MFA_REQUIRED_ROLES");
    vars.remove("MFA_REQUIRED_FOR_MANAGERS");
    let prod = Settings::from_vars(vars.clone()).unwrap();
    assert_eq!(prod.mfa_required_roles(), ["admin"]);
    assert!(prod.mfa_required_for_managers());
    // The shipped production file says the same.
    let file =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.production")).unwrap();
    assert!(file.contains("\nMFA_REQUIRED_ROLES=admin\n"));
    assert!(file.contains("\nMFA_REQUIRED_FOR_MANAGERS=true\n"));
    // An unknown role or a zero window is a start-up problem.
    vars.insert("MFA_REQUIRED_ROLES".into(), "admin, root".into());
    vars.insert("MFA_STEP_UP_SECONDS".into(), "0".into());
    let bad = Settings::from_vars(vars).unwrap().problems();
    assert!(
        bad.iter()
            .any(|p| p.contains("MFA_REQUIRED_ROLES") && p.contains("root")),
        "{bad:?}"
    );
    assert!(
        bad.iter().any(|p| p.contains("MFA_STEP_UP_SECONDS")),
        "{bad:?}"
    );
}
