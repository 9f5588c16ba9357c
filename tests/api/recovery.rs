//! Email verification, password reset, email change and the security notices
//! (DESIGN.md section 8), through the gateway, with a stand-in alert service
//! catching the messages.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use user_service::proto::user_service_client::UserServiceClient;
use user_service::proto::GetUserRequest;

use crate::alert_receiver::{to_receiver, Receiver};
use crate::helpers::{assert_problem, get_bearer, login_raw, TestApp, STRONG_PASSWORD};

const NEW_PASSWORD: &str = "copper-lantern-meadow-42-fjord";

fn email() -> String {
    format!(
        "r{}@example.com",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

async fn spawn(
    adjust: impl FnOnce(&mut std::collections::HashMap<String, String>),
) -> (TestApp, Receiver) {
    let receiver = Receiver::start().await;
    let app = TestApp::spawn_with(|v| {
        to_receiver(v, &receiver);
        adjust(v);
    })
    .await;
    (app, receiver)
}

async fn post(app: &TestApp, path: &str, token: Option<&str>, body: Value) -> reqwest::Response {
    let mut req = reqwest::Client::new().post(app.url(path)).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

fn token_of(message: &Value) -> String {
    message["data"]["token"].as_str().unwrap().to_string()
}

async fn audit_count(app: &TestApp, action: &str) -> i64 {
    sqlx::query_scalar("select count(*) from audit_logs where action = $1")
        .bind(action)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

async fn me(app: &TestApp, token: &str) -> Value {
    let res = get_bearer(app, "/v1/users/me", token).await;
    assert_eq!(res.status().as_u16(), 200);
    res.json().await.unwrap()
}

#[tokio::test]
async fn sign_up_sends_a_verification_link_that_verifies_once() {
    let (app, receiver) = spawn(|_| {}).await;
    let e = email();
    let user = app.register(&e, STRONG_PASSWORD).await;
    assert_eq!(user["email_verified"], false);
    let token = app.login(&e, STRONG_PASSWORD).await;
    assert_eq!(me(&app, &token).await["email_verified"], false);

    let message = receiver.message("email_verification", &e).await;
    let link_token = token_of(&message);
    assert!(message["data"]["link"]
        .as_str()
        .unwrap()
        .starts_with("http://localhost:3000/verify-email?token="));

    // Garbage and unknown tokens: 400 naming the field, never the value.
    for bad in ["nope", &"A".repeat(43)] {
        let res = post(&app, "/v1/auth/verify-email", None, json!({"token": bad})).await;
        let body = assert_problem(res, 400, "validation_failed").await;
        assert_eq!(body["errors"][0]["field"], "token");
        assert!(!body.to_string().contains(bad));
    }
    let res = post(
        &app,
        "/v1/auth/verify-email",
        None,
        json!({"token": link_token}),
    )
    .await;
    assert_eq!(res.status().as_u16(), 204);
    assert_eq!(me(&app, &token).await["email_verified"], true);
    // Single use.
    let res = post(
        &app,
        "/v1/auth/verify-email",
        None,
        json!({"token": link_token}),
    )
    .await;
    assert_problem(res, 400, "validation_failed").await;
    assert_eq!(audit_count(&app, "user.email.verified").await, 1);
    // The unknown token and the reuse (a malformed one is refused unread).
    assert_eq!(audit_count(&app, "user.email.verify_failed").await, 2);

    // gRPC users carry it too.
    let mut users = UserServiceClient::new(
        app.grpc_with_token(&app.service_token(&["users:read"]).await)
            .await,
    );
    let got = users
        .get_user(GetUserRequest {
            user_id: user["id"].as_str().unwrap().into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.user.unwrap().email_verified);
}

#[tokio::test]
async fn resend_sends_a_new_link_until_verified() {
    let (app, receiver) = spawn(|_| {}).await;
    let (_, e, token) = app.user_with_token().await;
    receiver.message("email_verification", &e).await;
    let res = post(
        &app,
        "/v1/users/me/email/verification",
        Some(&token),
        json!({}),
    )
    .await;
    assert_eq!(res.status().as_u16(), 202);
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.count("email_verification", &e) < 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = receiver
        .all()
        .into_iter()
        .filter(|r| r.body["to"] == e.as_str() && r.body["template"] == "email_verification")
        .nth(1)
        .unwrap()
        .body;
    let res = post(
        &app,
        "/v1/auth/verify-email",
        None,
        json!({"token": token_of(&second)}),
    )
    .await;
    assert_eq!(res.status().as_u16(), 204);
    // Verified: 202, and nothing more is sent.
    let res = post(
        &app,
        "/v1/users/me/email/verification",
        Some(&token),
        json!({}),
    )
    .await;
    assert_eq!(res.status().as_u16(), 202);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(receiver.count("email_verification", &e), 2);
    // Without a session: 401.
    let res = post(&app, "/v1/users/me/email/verification", None, json!({})).await;
    assert_problem(res, 401, "invalid_token").await;
}

#[tokio::test]
async fn step_up_operations_wait_for_a_verified_email_when_required() {
    let (app, receiver) = spawn(|v| {
        v.insert("REQUIRE_VERIFIED_EMAIL".into(), "true".into());
    })
    .await;
    let (_, e, token) = app.user_with_token().await;
    let key = json!({"name": "k", "scopes": ["accounts:read"]});
    let res = post(&app, "/v1/api-keys", Some(&token), key.clone()).await;
    assert_problem(res, 403, "email_unverified").await;
    let res = post(
        &app,
        "/v1/users/me/password",
        Some(&token),
        json!({"current_password": STRONG_PASSWORD, "new_password": NEW_PASSWORD}),
    )
    .await;
    assert_problem(res, 403, "email_unverified").await;
    let res = post(
        &app,
        "/v1/users/me/email",
        Some(&token),
        json!({"new_email": email(), "current_password": STRONG_PASSWORD}),
    )
    .await;
    assert_problem(res, 403, "email_unverified").await;
    // The account itself is the user's to create; its credentials wait.
    let res = post(
        &app,
        "/v1/trading-accounts",
        Some(&token),
        json!({"broker": "zerodha", "broker_user_id": "RV0001", "nickname": "main"}),
    )
    .await;
    assert_eq!(res.status().as_u16(), 201);
    let account: Value = res.json().await.unwrap();
    let creds = |t: &str| {
        reqwest::Client::new()
            .put(app.url(&format!(
                "/v1/trading-accounts/{}/credentials",
                account["id"].as_str().unwrap()
            )))
            .bearer_auth(t.to_string())
            .json(&json!({"api_key": "kite-key-123456", "api_secret": "kite-secret"}))
            .send()
    };
    assert_problem(creds(&token).await.unwrap(), 403, "email_unverified").await;
    let res = post(
        &app,
        &format!(
            "/v1/trading-accounts/{}/members",
            account["id"].as_str().unwrap()
        ),
        Some(&token),
        json!({"email": email(), "role": "viewer"}),
    )
    .await;
    assert_problem(res, 403, "email_unverified").await;

    let link = token_of(&receiver.message("email_verification", &e).await);
    let res = post(&app, "/v1/auth/verify-email", None, json!({"token": link})).await;
    assert_eq!(res.status().as_u16(), 204);
    let res = post(&app, "/v1/api-keys", Some(&token), key).await;
    assert_eq!(res.status().as_u16(), 201);
    assert_eq!(creds(&token).await.unwrap().status().as_u16(), 204);
}

#[tokio::test]
async fn development_does_not_require_a_verified_email() {
    let (app, _receiver) = spawn(|_| {}).await;
    let (_, _, token) = app.user_with_token().await;
    let res = post(
        &app,
        "/v1/api-keys",
        Some(&token),
        json!({"name": "k", "scopes": ["accounts:read"]}),
    )
    .await;
    assert_eq!(res.status().as_u16(), 201);
}

#[tokio::test]
async fn a_password_reset_replaces_the_password_and_ends_every_session() {
    let (app, receiver) = spawn(|_| {}).await;
    let (user_id, e, old_token) = app.user_with_token().await;
    let other_session = app.login(&e, STRONG_PASSWORD).await;

    let res = post(
        &app,
        "/v1/auth/password-reset",
        None,
        json!({"email": e.to_uppercase()}),
    )
    .await;
    assert_eq!(res.status().as_u16(), 202);
    let message = receiver.message("password_reset", &e).await;
    assert_eq!(message["user_id"], user_id.to_string());
    let link_token = token_of(&message);
    assert!(message["data"]["link"]
        .as_str()
        .unwrap()
        .ends_with(&format!("/reset-password?token={link_token}")));
    let expires: chrono::DateTime<chrono::Utc> = message["data"]["expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let ttl = expires - chrono::Utc::now();
    assert!(ttl > chrono::Duration::seconds(1700) && ttl <= chrono::Duration::seconds(1800));

    // The password policy applies; a refused password leaves the link usable.
    let confirm = |password: &str| {
        post(
            &app,
            "/v1/auth/password-reset/confirm",
            None,
            json!({"token": link_token, "new_password": password}),
        )
    };
    let body = assert_problem(confirm("password").await, 400, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "password");
    assert_eq!(confirm(NEW_PASSWORD).await.status().as_u16(), 204);
    // Single use.
    assert_problem(
        confirm("another-long-pass-phrase-77").await,
        400,
        "validation_failed",
    )
    .await;

    // Every session ended; the old password is dead, the new one works.
    for t in [&old_token, &other_session] {
        assert_eq!(
            get_bearer(&app, "/v1/users/me", t).await.status().as_u16(),
            401
        );
    }
    assert_eq!(
        login_raw(&app, &e, STRONG_PASSWORD).await.status().as_u16(),
        401
    );
    let token = app.login(&e, NEW_PASSWORD).await;
    // The link reached the address: it is verified now (as Kratos does).
    assert_eq!(me(&app, &token).await["email_verified"], true);
    receiver.message("password_changed", &e).await;
    assert_eq!(audit_count(&app, "user.password_reset.requested").await, 1);
    assert_eq!(audit_count(&app, "user.password.reset").await, 1);
}

#[tokio::test]
async fn an_expired_reset_link_is_refused() {
    let (app, receiver) = spawn(|_| {}).await;
    let (_, e, _) = app.user_with_token().await;
    let res = post(&app, "/v1/auth/password-reset", None, json!({"email": e})).await;
    assert_eq!(res.status().as_u16(), 202);
    let link_token = token_of(&receiver.message("password_reset", &e).await);
    sqlx::query("update user_tokens set expires_at = now() - interval '1 second' where purpose = 'reset_password'")
        .execute(&app.db)
        .await
        .unwrap();
    let res = post(
        &app,
        "/v1/auth/password-reset/confirm",
        None,
        json!({"token": link_token, "new_password": NEW_PASSWORD}),
    )
    .await;
    assert_problem(res, 400, "validation_failed").await;
    assert_eq!(
        login_raw(&app, &e, STRONG_PASSWORD).await.status().as_u16(),
        200
    );
}

#[tokio::test]
async fn a_reset_request_answers_the_same_for_unknown_addresses() {
    let (app, receiver) = spawn(|v| {
        v.insert("PASSWORD_RESET_EMAIL_MAX_PER_HOUR".into(), "0".into());
        v.insert("PASSWORD_RESET_IP_MAX_PER_HOUR".into(), "0".into());
    })
    .await;
    let (_, known, _) = app.user_with_token().await;
    let unknown = email();
    let ask = |e: String| {
        let app = &app;
        async move {
            let started = Instant::now();
            let res = post(app, "/v1/auth/password-reset", None, json!({"email": e})).await;
            let status = res.status().as_u16();
            let headers: Vec<String> = res
                .headers()
                .iter()
                .filter(|(k, _)| *k != "date" && *k != "x-request-id")
                .map(|(k, v)| format!("{k}: {v:?}"))
                .collect();
            let body = res.bytes().await.unwrap();
            (status, headers, body, started.elapsed())
        }
    };
    let a = ask(known.clone()).await;
    let b = ask(unknown.clone()).await;
    assert_eq!(
        (a.0, &a.1, &a.2),
        (b.0, &b.1, &b.2),
        "same status, headers and body"
    );
    assert_eq!(a.0, 202);
    assert!(a.2.is_empty());

    // Timing: the answer does no per-address work, so known and unknown addresses
    // take the same time. Paired samples, taken alternately, cancel the machine's
    // load; their median difference stays within noise. 41 pairs: with 15, a
    // noisy machine (pairs spread over ±10 ms) put the median past 3 ms by chance.
    let mut diffs = Vec::new();
    for _ in 0..41 {
        let k = ask(known.clone()).await.3.as_secs_f64() * 1000.0;
        let u = ask(unknown.clone()).await.3.as_secs_f64() * 1000.0;
        diffs.push(k - u);
    }
    diffs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = diffs[diffs.len() / 2];
    println!("password-reset request: median known - unknown = {median:.2} ms");
    // The bound: a quarter of the spread between the 20th and 80th percentile of
    // the differences, at least 3 ms. Per-address work (a lookup, a token, an
    // audit row in the request) shows as a shift well beyond it; a loaded machine
    // widens the spread and the bound with it.
    let spread = diffs[diffs.len() * 4 / 5] - diffs[diffs.len() / 5];
    let bound = (spread / 4.0).max(3.0);
    assert!(
        median.abs() < bound,
        "known - unknown = {median:.2} ms (bound {bound:.2} ms): {diffs:?}"
    );

    receiver.message("password_reset", &known).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.count("password_reset", &unknown), 0);
    // Audited either way.
    let deadline = Instant::now() + Duration::from_secs(5);
    while audit_count(&app, "user.password_reset.requested").await < 32 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn reset_requests_are_throttled_per_address_and_per_ip() {
    let (app, _receiver) = spawn(|v| {
        v.insert("PASSWORD_RESET_EMAIL_MAX_PER_HOUR".into(), "2".into());
        v.insert("PASSWORD_RESET_IP_MAX_PER_HOUR".into(), "6".into());
    })
    .await;
    let (_, known, _) = app.user_with_token().await;
    let unknown = email();
    // Per address, known or not: the third is refused.
    for e in [&known, &unknown] {
        for _ in 0..2 {
            let res = post(&app, "/v1/auth/password-reset", None, json!({"email": e})).await;
            assert_eq!(res.status().as_u16(), 202);
        }
        let res = post(&app, "/v1/auth/password-reset", None, json!({"email": e})).await;
        let res_headers = res.headers().clone();
        assert_problem(res, 429, "rate_limited").await;
        assert!(res_headers.contains_key("retry-after"));
    }
    // Per IP: six requests counted so far from this client; a seventh is refused.
    let res = post(
        &app,
        "/v1/auth/password-reset",
        None,
        json!({"email": email()}),
    )
    .await;
    assert_problem(res, 429, "rate_limited").await;
}

#[tokio::test]
async fn an_admin_can_send_a_reset_link() {
    let (app, receiver) = spawn(|_| {}).await;
    let (admin_id, _, admin) = app.user_with_token().await;
    app.make_admin(admin_id).await;
    let (user_id, e, user_token) = app.user_with_token().await;
    let path = format!("/v1/admin/users/{user_id}/password-reset");
    assert_problem(
        post(&app, &path, Some(&user_token), json!({})).await,
        403,
        "forbidden",
    )
    .await;
    let unknown = format!("/v1/admin/users/{}/password-reset", uuid::Uuid::new_v4());
    assert_problem(
        post(&app, &unknown, Some(&admin), json!({})).await,
        404,
        "not_found",
    )
    .await;
    assert_eq!(
        post(&app, &path, Some(&admin), json!({}))
            .await
            .status()
            .as_u16(),
        202
    );
    let link_token = token_of(&receiver.message("password_reset", &e).await);
    // The old password still works until the link is used.
    assert_eq!(
        login_raw(&app, &e, STRONG_PASSWORD).await.status().as_u16(),
        200
    );
    let res = post(
        &app,
        "/v1/auth/password-reset/confirm",
        None,
        json!({"token": link_token, "new_password": NEW_PASSWORD}),
    )
    .await;
    assert_eq!(res.status().as_u16(), 204);
    app.login(&e, NEW_PASSWORD).await;
    let issued: i64 = sqlx::query_scalar(
        "select count(*) from audit_logs where action = 'user.password_reset.issued'
            and actor_id = $1 and target_id = $2",
    )
    .bind(admin_id.to_string())
    .bind(user_id.to_string())
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(issued, 1);
}

#[tokio::test]
async fn an_email_change_applies_when_the_new_address_confirms_it() {
    let (app, receiver) = spawn(|_| {}).await;
    let (_, old, token) = app.user_with_token().await;
    let (_, taken, _) = app.user_with_token().await;
    let new = email();
    let change = |new_email: &str, password: &str| {
        post(
            &app,
            "/v1/users/me/email",
            Some(&token),
            json!({"new_email": new_email, "current_password": password}),
        )
    };
    let body = assert_problem(
        change(&new, "wrong-password-entirely").await,
        400,
        "validation_failed",
    )
    .await;
    assert_eq!(body["errors"][0]["field"], "current_password");
    let body = assert_problem(
        change("not-an-email", STRONG_PASSWORD).await,
        400,
        "validation_failed",
    )
    .await;
    assert_eq!(body["errors"][0]["field"], "new_email");
    let body = assert_problem(change(&taken, STRONG_PASSWORD).await, 409, "conflict").await;
    assert_eq!(body["errors"][0]["field"], "new_email");
    assert_eq!(change(&new, STRONG_PASSWORD).await.status().as_u16(), 202);

    // Nothing changes until the new address confirms.
    assert_eq!(me(&app, &token).await["email"], old.as_str());
    let message = receiver.message("email_verification", &new).await;
    let res = post(
        &app,
        "/v1/auth/verify-email",
        None,
        json!({"token": token_of(&message)}),
    )
    .await;
    assert_eq!(res.status().as_u16(), 204);
    let profile = me(&app, &token).await;
    assert_eq!(profile["email"], new.as_str());
    assert_eq!(profile["email_verified"], true);
    let notice = receiver.message("email_changed", &old).await;
    assert_eq!(notice["data"], json!({"new_email": new}));
    assert_eq!(
        login_raw(&app, &old, STRONG_PASSWORD)
            .await
            .status()
            .as_u16(),
        401
    );
    app.login(&new, STRONG_PASSWORD).await;
    assert_eq!(audit_count(&app, "user.email.change_requested").await, 1);
    assert_eq!(audit_count(&app, "user.email.changed").await, 1);

    // The sign-up link sent to the old address died with it.
    let first = receiver.message("email_verification", &old).await;
    let res = post(
        &app,
        "/v1/auth/verify-email",
        None,
        json!({"token": token_of(&first)}),
    )
    .await;
    assert_problem(res, 400, "validation_failed").await;
}

#[tokio::test]
async fn security_notices_go_out_in_the_transaction_of_the_change() {
    let (app, receiver) = spawn(|_| {}).await;
    let (_, e, token) = app.user_with_token().await;
    // The first sign-in is from an address never seen for this user.
    let notice = receiver.message("new_sign_in", &e).await;
    assert_eq!(notice["data"]["ip"], "127.0.0.1");
    // A second sign-in from the same address within 30 days is not news.
    app.login(&e, STRONG_PASSWORD).await;
    // …but one from an address last seen 31 days ago is.
    sqlx::query("update user_sign_in_ips set last_seen_at = now() - interval '31 days'")
        .execute(&app.db)
        .await
        .unwrap();
    app.login(&e, STRONG_PASSWORD).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.count("new_sign_in", &e) < 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let res = post(
        &app,
        "/v1/api-keys",
        Some(&token),
        json!({"name": "bot", "scopes": ["accounts:read"]}),
    )
    .await;
    assert_eq!(res.status().as_u16(), 201);
    let key: Value = res.json().await.unwrap();
    let notice = receiver.message("api_key_created", &e).await;
    assert_eq!(
        notice["data"],
        json!({"name": "bot", "prefix": key["prefix"]})
    );

    let res = post(
        &app,
        "/v1/trading-accounts",
        Some(&token),
        json!({"broker": "zerodha", "broker_user_id": "NT0001", "nickname": "n"}),
    )
    .await;
    let account: Value = res.json().await.unwrap();
    let res = reqwest::Client::new()
        .put(app.url(&format!(
            "/v1/trading-accounts/{}/credentials",
            account["id"].as_str().unwrap()
        )))
        .bearer_auth(&token)
        .json(&json!({"api_key": "kite-key-123456", "api_secret": "kite-secret"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 204);
    let notice = receiver.message("broker_credentials_changed", &e).await;
    assert_eq!(notice["data"], json!({"account_id": account["id"]}));

    let res = post(
        &app,
        "/v1/users/me/password",
        Some(&token),
        json!({"current_password": STRONG_PASSWORD, "new_password": NEW_PASSWORD}),
    )
    .await;
    assert_eq!(res.status().as_u16(), 204);
    let notice = receiver.message("password_changed", &e).await;
    assert_eq!(notice["data"], json!({}));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.count("new_sign_in", &e), 2);
}

#[tokio::test]
async fn a_password_reset_never_bypasses_the_second_factor() {
    let (app, receiver) = spawn(|_| {}).await;
    let u = crate::mfa_support::mfa_user(&app).await;
    let res = post(
        &app,
        "/v1/auth/password-reset",
        None,
        json!({"email": u.email}),
    )
    .await;
    assert_eq!(res.status().as_u16(), 202);
    let message = receiver.message("password_reset", &u.email).await;
    let res = post(
        &app,
        "/v1/auth/password-reset/confirm",
        None,
        json!({"token": token_of(&message), "new_password": NEW_PASSWORD}),
    )
    .await;
    assert_eq!(res.status().as_u16(), 204);
    // The new password is only the first step: the TOTP is still asked for, and
    // no token or cookie comes with the answer.
    let (status, body) = crate::mfa_support::password_step(&app, &u.email, NEW_PASSWORD).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["mfa_required"], true, "{body}");
    assert!(body["access_token"].is_null(), "{body}");
    assert!(body["methods"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m == "totp"));
    let factors: bool = sqlx::query_scalar(
        "select exists(select 1 from user_totp where user_id = $1 and confirmed_at is not null)",
    )
    .bind(u.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(factors, "the reset removed the TOTP authenticator");
}
